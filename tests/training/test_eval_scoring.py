"""Evaluation on a tiny model: transformers parity, in-process vs server-backed identity, adapters, the CLI."""
from __future__ import annotations

import json

import pytest
import torch

from tests.training.eval_fixtures import FIXTURES
from training.eval import EvalOptions, evaluate
from training.eval.data_ai2 import load_arc
from training.eval.data_mmlu import load_mmlu, load_mmlu_dev
from training.eval.fewshot import apply_fewshot
from training.eval.items import ScoreRequest
from training.eval.local import LocalModel
from training.eval.metrics import argmax
from training.tiny import make_tiny_checkpoint

QUIET = {"progress": False}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=3)


@pytest.fixture(scope="module")
def local(tiny):
    return LocalModel.load(tiny, batch_size=3)  # small batches: chunking is exercised too


@pytest.fixture(scope="module")
def hf(tiny):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(tiny)


def hf_loglikelihood(hf, context: str, continuation: str) -> float:
    """log p(continuation | context) by transformers alone: its tokenizer, its model, one full forward."""
    model, tok = hf
    ctx = tok(context)["input_ids"]
    whole = tok(context + continuation)["input_ids"]
    assert whole[:len(ctx)] == ctx
    with torch.no_grad():
        logp = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
    return float(sum(logp[t - 1, whole[t]] for t in range(len(ctx), len(whole))))


@pytest.mark.parametrize("task,data,k", [("arc_easy", "arc/ARC-Easy-Dev.jsonl", 0),
                                         ("arc_easy", "arc/ARC-Easy-Dev.jsonl", 2),
                                         ("mmlu", "mmlu", 1)])
def test_loglikelihoods_and_accuracy_match_transformers(local, hf, task, data, k):
    report = evaluate(task, local, EvalOptions(data=str(FIXTURES / data), num_fewshot=k, **QUIET))
    if task == "mmlu":
        items = apply_fewshot(load_mmlu(FIXTURES / data), k, load_mmlu_dev(FIXTURES / data), "first_n")
    else:
        items = apply_fewshot(load_arc(FIXTURES / data), k, load_arc(FIXTURES / "arc" / "ARC-Easy-Train.jsonl"))
    acc, acc_norm = [], []
    for item, sample in zip(items, report.samples, strict=True):
        expected = [hf_loglikelihood(hf, item.context, " " + c) for c in item.choices]
        assert sample["loglikelihoods"] == pytest.approx(expected, abs=1e-3)
        acc.append(argmax(expected) == item.gold)
        acc_norm.append(argmax([ll / len(c.encode()) for ll, c in zip(expected, item.choices)]) == item.gold)
    assert report.value("acc") == sum(acc) / len(acc)
    assert report.value("acc_norm") == sum(acc_norm) / len(acc_norm)


def test_perplexity_matches_transformers(local, hf, tiny):
    model, tok = hf
    text = (FIXTURES / "tinystories" / "valid_sample_cased.txt").read_text(encoding="utf-8")
    ids = tok(text)["input_ids"]
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    full_nll = -float(sum(logp[t - 1, ids[t]] for t in range(1, len(ids))))
    whole = evaluate("perplexity", local, EvalOptions(data=str(FIXTURES / "tinystories" / "valid_sample_cased.txt"),
                                                      seq_len=1024, **QUIET))
    assert whole.metrics[0].n == len(ids) - 1
    assert whole.value("token_perplexity") == pytest.approx(torch.exp(torch.tensor(full_nll / (len(ids) - 1))).item(),
                                                            rel=1e-4)
    assert whole.value("bits_per_byte") == pytest.approx(full_nll / torch.log(torch.tensor(2.0)).item()
                                                         / len(text.encode()), rel=1e-4)
    # Strided windows: each of 16 new tokens scored with at most 16 tokens of context before it.
    strided = evaluate("perplexity", local, EvalOptions(data=str(FIXTURES / "tinystories" / "valid_sample_cased.txt"),
                                                        seq_len=32, stride=16, **QUIET))
    nll, start = 0.0, 1
    while start < len(ids):
        end = min(start + (31 if start == 1 else 16), len(ids))
        window = ids[max(0, end - 32):end]
        with torch.no_grad():
            lp = model(torch.tensor([window])).logits[0].float().log_softmax(-1)
        offset = end - len(window)
        nll -= float(sum(lp[t - offset - 1, ids[t]] for t in range(start, end)))
        start = end
    assert strided.metrics[0].n == len(ids) - 1
    assert strided.value("token_perplexity") == pytest.approx(torch.exp(torch.tensor(nll / (len(ids) - 1))).item(),
                                                              rel=1e-4)
    assert strided.value("token_perplexity") > whole.value("token_perplexity") * 0.5  # same scale, less context


def test_shared_prefix_scoring_equals_scoring_each_sequence_alone(local):
    ctx = tuple(local.encode("Question: which way is up?\nAnswer:"))
    conts = [(300, 301), (302,), (303, 304, 305, 306)]
    together = local.loglikelihoods([ScoreRequest(ctx, c) for c in conts])  # shared context, one forward
    alone = [local.loglikelihoods([ScoreRequest(ctx, c)])[0] for c in conts]  # each a plain sequence
    assert [s.logprob for s in together] == pytest.approx([s.logprob for s in alone], abs=1e-5)
    assert [s.num_tokens for s in together] == [2, 1, 4]


def test_adapter_scores_equal_the_merged_model(tiny, tmp_path):
    from engine.adapter_io import load_adapter, save_adapter
    from engine.checkpoint import load_model
    from engine.lora import LoraConfig, inject_adapters, lora_modules, merge_adapters

    model, _ = load_model(tiny, dtype="float32")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    inject_adapters(model, config)
    gen = torch.Generator().manual_seed(0)
    for _, module in lora_modules(model):
        module.lora_B.weight.data = torch.randn(module.lora_B.weight.shape, generator=gen) * 0.5
    save_adapter(model, config, tmp_path / "adapter")

    with_adapter = LocalModel.load(tiny, tmp_path / "adapter")
    assert with_adapter.name.endswith("+adapter")
    merged, _ = load_model(tiny, dtype="float32")
    load_adapter(merged, tmp_path / "adapter")
    merge_adapters(merged)
    merged_lm = LocalModel(merged, with_adapter.tokenizer, "merged")
    base_lm = LocalModel.load(tiny)
    opts = EvalOptions(data=str(FIXTURES / "piqa" / "valid.jsonl"), **QUIET)
    a, m, b = (evaluate("piqa", lm, opts) for lm in (with_adapter, merged_lm, base_lm))
    for sa, sm, sb in zip(a.samples, m.samples, b.samples):
        assert sa["loglikelihoods"] == pytest.approx(sm["loglikelihoods"], abs=1e-4)
        assert max(abs(x - y) for x, y in zip(sa["loglikelihoods"], sb["loglikelihoods"])) > 1e-3


# -- the same task through a real server, item by item --------------------------------------------------
@pytest.fixture(scope="module")
def server(tiny):
    pytest.importorskip("fastapi", reason="the server extra (fastapi, uvicorn) is not installed")
    try:
        from server.app import create_app
        from server.settings import ServerSettings
        from server.testing import LiveServer
    except ImportError as exc:
        pytest.skip(f"the server package is not importable yet: {exc}")
    app = create_app(ServerSettings(model=str(tiny), served_model_name="tiny", dtype="float32", device="cpu"))
    with LiveServer(app) as live:
        yield live


SERVER_CASES = [
    ("arc_easy", "arc/ARC-Easy-Dev.jsonl", {"num_fewshot": 1}),
    ("openbookqa", "openbookqa/test.jsonl", {}),
    ("piqa", "piqa/valid.jsonl", {}),
    ("mmlu", "mmlu", {"num_fewshot": 2}),
    ("perplexity", "tinystories/valid_sample_cased.txt", {"seq_len": 32, "stride": 16}),
    ("gsm8k", "gsm8k/test.jsonl", {"num_fewshot": 1, "max_tokens": 12}),
    ("text_generation", "text_generation/pairs.jsonl", {"max_tokens": 12}),
]


@pytest.mark.parametrize("task,data,extra", SERVER_CASES, ids=[c[0] for c in SERVER_CASES])
def test_server_backed_scores_equal_in_process_item_by_item(local, server, task, data, extra):
    from training.eval.remote import ServerModel

    remote = ServerModel(server.url, "tiny", batch_size=4)  # tokenizes through the server's /tokenize
    assert remote.max_length == local.max_length
    opts = EvalOptions(data=str(FIXTURES / data), **extra, **QUIET)
    mine, theirs = evaluate(task, local, opts), evaluate(task, remote, opts)
    assert len(mine.samples) == len(theirs.samples) > 0
    for a, b in zip(mine.samples, theirs.samples):
        if "loglikelihoods" in a:  # multiple choice: same decisions, same scores up to fp32 rounding
            assert (a["pred"], a["pred_norm"], a["acc"], a["acc_norm"]) == (b["pred"], b["pred_norm"], b["acc"],
                                                                            b["acc_norm"])
            assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-4)
        elif "nll" in a:  # perplexity windows
            assert (a["start"], a["end"], a["context_tokens"]) == (b["start"], b["end"], b["context_tokens"])
            assert a["nll"] == pytest.approx(b["nll"], abs=1e-4)
        else:  # generation: greedy text identical
            assert a["generation"] == b["generation"]
    for x, y in zip(mine.metrics, theirs.metrics):
        assert (x.metric, x.n) == (y.metric, y.n)
        assert x.value == pytest.approx(y.value, rel=1e-5, abs=1e-9)


def test_cli_in_process_and_against_the_server(tiny, server, tmp_path, monkeypatch, capsys):
    from ember_cli.main import main

    monkeypatch.setenv("EMBER_DATA_DIR", str(FIXTURES))
    assert main(["eval", "--model", str(tiny), "--task", "arc_easy,piqa", "--no-progress",
                 "--json", str(tmp_path / "local.json"), "--samples", str(tmp_path / "items.jsonl")]) == 0
    table = capsys.readouterr().out
    assert "arc_easy" in table and "acc_norm" in table and "piqa" in table
    assert main(["eval", "--server", server.url, "--served-model", "tiny", "--task", "arc_easy,piqa",
                 "--no-progress", "--json", str(tmp_path / "server.json")]) == 0
    local_rows = json.loads((tmp_path / "local.json").read_text())["results"]
    server_rows = json.loads((tmp_path / "server.json").read_text())["results"]
    assert [(r["task"], r["metric"], r["n"]) for r in local_rows] == [
        ("arc_easy", "acc", 5), ("arc_easy", "acc_norm", 5), ("piqa", "acc", 4), ("piqa", "acc_norm", 4)]
    assert set(local_rows[0]) == {"task", "metric", "value", "stderr", "n", "model", "settings", "date"}
    assert [r["value"] for r in local_rows] == [r["value"] for r in server_rows]
    assert local_rows[0]["model"] == tiny.name and server_rows[0]["model"] == "tiny"
    assert server_rows[0]["settings"]["backend"] == "ServerModel"
    items = [json.loads(line) for line in (tmp_path / "items.jsonl").read_text().splitlines()]
    assert len(items) == 9 and items[0]["source"].endswith("ARC-Easy-Dev.jsonl:1")
    assert main(["eval", "--model", str(tiny), "--task", "gsm8k"]) == 2
    assert "task gsm8k has no default data: pass --data PATH" in capsys.readouterr().err
