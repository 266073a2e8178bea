"""DPO: the loss formula, preference formats, one step widens the margin, a tiny run's loss falls."""
import json
import math

import pytest
import torch

from engine.checkpoint import load_model
from engine.lora import LoraConfig, inject_adapters, mark_only_adapters_trainable
from engine.tokenizer import Tokenizer
from finetune_fixtures import tiny_base, write_preferences
from training.dpo import DpoObjective, dpo_losses, frozen_copy, run_dpo, sequence_logps
from training.dpo_data import collate_pairs, load_pairs, record_pair
from training.finetune_config import load_finetune_config
from training.records import DataFormatError
from training.sft_data import IGNORE_INDEX


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_base(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def tok(base):
    return Tokenizer.from_dir(base)


@pytest.fixture(scope="module")
def pairs(tok, tmp_path_factory):
    return load_pairs(write_preferences(tmp_path_factory.mktemp("d") / "p.jsonl", repeat=1), tok, 128)


def test_loss_formula_by_hand():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-3.0, -5.0, -4.0, -4.5))
    losses, chosen, rejected = dpo_losses(pc, pr, rc, rr, beta=0.5)
    h = (-3.0 + 4.0) - (-5.0 + 4.5)  # 1.5
    assert losses.item() == pytest.approx(math.log1p(math.exp(-0.5 * h)))
    assert chosen.item() == pytest.approx(0.5) and rejected.item() == pytest.approx(-0.25)
    smoothed, _, _ = dpo_losses(pc, pr, rc, rr, beta=0.5, label_smoothing=0.2)
    want = 0.8 * math.log1p(math.exp(-0.75)) + 0.2 * math.log1p(math.exp(0.75))
    assert smoothed.item() == pytest.approx(want)


def test_sequence_logps_sums_labelled_tokens_only():
    logits = torch.randn(1, 4, 7)
    labels = torch.tensor([[IGNORE_INDEX, 2, 5, IGNORE_INDEX]])
    logp = torch.log_softmax(logits, -1)
    assert sequence_logps(logits, labels).item() == pytest.approx((logp[0, 1, 2] + logp[0, 2, 5]).item(), rel=1e-5)


def test_preference_formats():
    trl = record_pair({"prompt": "Q?", "chosen": "yes", "rejected": "no"}, "f:1")
    alpaca = record_pair({"instruction": "Q?", "input": "", "chosen": "yes", "rejected": "no"}, "f:2")
    share = record_pair({"conversations": [{"from": "human", "value": "Q?"}], "chosen": {"from": "gpt", "value": "yes"},
                         "rejected": {"from": "gpt", "value": "no"}}, "f:3")
    assert trl == alpaca == share == ([{"role": "user", "content": "Q?"}], "yes", "no")
    with pytest.raises(DataFormatError, match="f:4: field 'rejected' is missing"):
        record_pair({"prompt": "Q?", "chosen": "yes"}, "f:4")


def test_only_the_answer_is_labelled(tok, pairs):
    chosen = pairs[0].chosen
    text = tok.decode([t for t, lab in zip(chosen.input_ids, chosen.labels) if lab != IGNORE_INDEX],
                      skip_special_tokens=False)
    assert text.strip() == "Paris is the capital of France.<|im_end|>"
    rejected = pairs[0].rejected
    n_prompt = next(i for i, lab in enumerate(rejected.labels) if lab != IGNORE_INDEX)
    assert chosen.input_ids[:n_prompt] == rejected.input_ids[:n_prompt]  # the same prompt tokens


def _margin(objective, model, batch):
    with torch.no_grad():
        _, chosen, rejected = objective.terms(model, batch)
    return float((chosen - rejected).mean())


@pytest.mark.parametrize("method", ["lora", "full"])
def test_one_step_increases_margin(base, tok, pairs, method):
    torch.manual_seed(0)
    model, _ = load_model(base, dtype="float32")
    if method == "lora":
        inject_adapters(model, LoraConfig(r=8, lora_alpha=16))
        mark_only_adapters_trainable(model)
        with torch.no_grad():  # start away from B = 0 so the adapter has a gradient in every factor
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 1e-3)
        objective = DpoObjective(beta=0.1)
    else:
        objective = DpoObjective(beta=0.1, reference=frozen_copy(model))
    batch = collate_pairs(pairs, tok.pad_id)
    before = _margin(objective, model, batch)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2 if method == "full" else 1.0)
    objective(model, batch).backward()
    opt.step()
    after = _margin(objective, model, batch)
    assert after > before + 1e-4, (before, after)


def test_reference_is_base_with_adapters_disabled(base, tok, pairs):
    plain, _ = load_model(base, dtype="float32")
    model, _ = load_model(base, dtype="float32")
    inject_adapters(model, LoraConfig(r=4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    batch = collate_pairs(pairs[:2], tok.pad_id)
    policy, ref = DpoObjective(beta=0.1).logps(model, batch)
    with torch.no_grad():
        want = sequence_logps(plain(batch["input_ids"], batch["positions"]), batch["labels"])
    assert torch.allclose(ref, want, atol=1e-4)
    assert not torch.allclose(policy, want, atol=1e-2)


def test_tiny_dpo_run_loss_falls(base, tmp_path):
    data = write_preferences(tmp_path / "prefs.jsonl")
    cfg = load_finetune_config(None, ["train.max_steps=12", "data.seq_len=64", "data.micro_batch_size=6",
                                      "log.progress=false", "optim.lr=5e-3", "schedule.warmup_steps=1",
                                      "lora.dropout=0.0", "dpo.beta=0.5"],
                               base=str(base), method="lora", out_dir=str(tmp_path / "out"),
                               **{"data.path": str(data), "data.val_path": str(data)})
    summary = run_dpo(cfg)
    start, end = summary["val_start"], summary["val_end"]
    assert start["loss"] == pytest.approx(math.log(2), abs=1e-4)  # fresh adapter: policy == reference
    assert end["loss"] < start["loss"] - 0.1 and end["reward_accuracy"] == 1.0
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["peft_type"] == "LORA"
