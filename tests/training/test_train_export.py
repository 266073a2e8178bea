"""`ember train` end to end with a real tokenizer and prepared shards; the result in transformers; eval-ppl."""
import json
import math
from pathlib import Path

import pytest
import torch

from ember_cli.main import main
from engine.checkpoint import load_model
from training.eval_ppl import stream_nll

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "engine" / "assets" / "tiny_corpus.txt"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """configs/tiny.yaml trained 12 steps through the CLI on the bundled corpus."""
    from training.data import DataConfig, prepare_data
    from training.tokenizer_train import train_tiny_tokenizer

    tmp = tmp_path_factory.mktemp("cli")
    tok = train_tiny_tokenizer(tmp / "tok", vocab_size=512)
    prepare_data([CORPUS], tmp / "data", tok, DataConfig(val_fraction=0.2))
    rc = main(["train", "--config", str(ROOT / "configs" / "tiny.yaml"), f"data.train={tmp / 'data'}",
               f"data.tokenizer={tok}", f"out_dir={tmp / 'run'}", "train.max_steps=12", "train.device=cpu",
               "train.precision=fp32", "data.seq_len=32", "data.micro_batch_size=4", "eval.every=6",
               "eval.max_new_tokens=6", "checkpoint.every=6", "log.every=3", "log.progress=false"])
    assert rc == 0
    return tmp / "run"


def test_cli_run_writes_logs_checkpoints_and_samples(trained):
    assert list((trained / "tb").glob("events.out.tfevents.*"))
    assert (trained / "checkpoints" / "step_000000012" / "trainer_state.json").is_file()
    for name in ("tokenizer.model", "tokenizer_config.json", "train_config.yaml", "model.safetensors"):
        assert (trained / "final" / name).is_file(), name
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_loss" in r] == [6, 12]


def test_trained_checkpoint_gives_same_logits_in_transformers(trained):
    ours, config = load_model(trained / "final", dtype="float32")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(trained / "final", dtype=torch.float32).eval()
    ids = torch.randint(0, config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want, got = theirs(ids).logits, ours(ids)
    assert want.abs().max() > 0.1  # trained weights, not a degenerate all-zero head
    assert (got - want).abs().max().item() < 1e-4


def test_eval_ppl_cli_and_agreement_with_transformers(trained, tmp_path):
    out = tmp_path / "ppl.json"
    assert main(["eval-ppl", "--model", str(trained / "final"), "--text", str(CORPUS), "--seq-len", "64",
                 "--stride", "32", "--device", "cpu", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert 1.0 < res["perplexity"] < 512 and res["perplexity"] == pytest.approx(math.exp(res["loss"]))
    # One window covering the whole stream equals transformers' mean next-token loss.
    from engine.tokenizer import Tokenizer

    ids = Tokenizer.from_dir(trained / "final").encode(CORPUS.read_text()[:300], add_bos=True)
    ours, _ = load_model(trained / "final", dtype="float32")
    nll, count = stream_nll(ours, ids, seq_len=len(ids), stride=len(ids) - 1)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(trained / "final", dtype=torch.float32).eval()
    with torch.no_grad():
        t = torch.tensor([ids])
        want = theirs(t, labels=t).loss.item()
    assert count == len(ids) - 1 and nll / count == pytest.approx(want, rel=1e-4)
