"""The pretraining loop on a tiny model: learning, a golden loss record, exact resume, NaN handling."""
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

from training.checkpointing import latest_checkpoint, list_checkpoints
from training.pretrain import pretrain
from training.trainer import NonFiniteLossError, Trainer

sys.path.insert(0, str(Path(__file__).parent))
from train_fixtures import tiny_config, write_byte_shards  # noqa: E402

GOLDEN = Path(__file__).parent / "golden" / "tiny_pretrain_losses.json"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_byte_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def straight_run(data_dir, tmp_path_factory):
    """30 uninterrupted steps with dropout (so RNG state matters), checkpointing every 10, validating."""
    out = tmp_path_factory.mktemp("straight")
    cfg = tiny_config(data_dir, out, checkpoint={"every": 10}, eval={"every": 10}, train={"dropout": 0.1})
    return cfg, pretrain(cfg)


def test_loss_falls_and_outputs_exist(straight_run):
    cfg, result = straight_run
    assert len(result.losses) == 30
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert first > math.log(258) - 0.3  # starts near uniform over the byte vocabulary
    assert last < first - 1.5
    assert result.val_loss is not None and result.val_loss < first - 1.5
    out = Path(cfg.out_dir)
    for name in ("config.yaml", "metrics.jsonl", "loss_curve.png", "final/config.json", "final/model.safetensors"):
        assert (out / name).is_file(), name
    assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "lr", "grad_norm", "tokens_per_s"} <= set(records[0])
    assert any("val_loss" in r for r in records)
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_000000020", "step_000000030"]


def test_losses_match_golden_record(straight_run):
    """First losses of the seeded run; regenerate with EMBER_UPDATE_GOLDEN=1 after an intended change."""
    _, result = straight_run
    got = result.losses[:20]
    if os.environ.get("EMBER_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps({"config": "tests/training/train_fixtures.py:tiny_config", "losses": got},
                                     indent=1) + "\n")
    want = json.loads(GOLDEN.read_text())["losses"]
    assert len(want) == 20
    # Loose enough for other CPUs' float kernels, tight enough to catch any change of the recipe.
    assert got == pytest.approx(want, rel=2e-4, abs=2e-4)


def test_stop_and_resume_gives_bit_identical_losses(straight_run, data_dir, tmp_path):
    cfg_straight, straight = straight_run
    cfg = tiny_config(data_dir, tmp_path, checkpoint={"every": 10}, eval={"every": 10}, train={"dropout": 0.1})
    first = pretrain(cfg, stop_at=13)  # stops between checkpoints; a checkpoint is written at the stop
    assert first.final_step == 13 and first.final_model is None
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_000000013"
    second = pretrain(cfg, resume=True)
    assert second.start_step == 13
    assert first.losses + second.losses == straight.losses  # exact equality, not approximate
    a = (Path(cfg_straight.out_dir) / "final" / "model.safetensors").read_bytes()
    b = (tmp_path / "final" / "model.safetensors").read_bytes()
    assert a == b


def _tiny_trainer(**kwargs):
    from engine.config import ModelConfig
    from engine.model import Transformer
    from training.config import OptimSection
    from training.optim import build_optimizer

    cfg = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, max_position_embeddings=32)
    model = Transformer(cfg)
    model.init_weights(0)
    return model, Trainer(model, build_optimizer(model, OptimSection(lr=1e-2)), **kwargs)


def _batch(seed=0):
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}


def test_nan_loss_skips_the_update_then_stops():
    from training.trainer import causal_lm_loss

    poisoned = {"on": False}

    def loss_fn(model, batch):
        loss = causal_lm_loss(model, batch)
        return loss * float("nan") if poisoned["on"] else loss

    model, trainer = _tiny_trainer(loss_fn=loss_fn, max_bad_steps=2)
    assert not trainer.step([_batch()]).skipped
    before = [p.detach().clone() for p in model.parameters()]
    poisoned["on"] = True
    res = trainer.step([_batch(1)])
    assert res.skipped and math.isnan(res.loss)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # weights untouched
    assert all(p.grad is None for p in model.parameters())  # the poisoned gradients were dropped
    poisoned["on"] = False
    assert not trainer.step([_batch(2)]).skipped  # a good step resets the count
    poisoned["on"] = True
    trainer.step([_batch(3)])
    with pytest.raises(NonFiniteLossError):
        trainer.step([_batch(4)])


def test_inf_gradient_is_skipped():
    model, trainer = _tiny_trainer()

    def hook(grad):
        return grad * float("inf")

    handle = model.model.norm.weight.register_hook(hook)
    res = trainer.step([_batch()])
    handle.remove()
    assert res.skipped and math.isfinite(res.loss) and not math.isfinite(res.grad_norm)


def test_accumulation_matches_one_big_batch():
    """Two micro-batches of 2 give the gradient of one batch of 4 (same targets, same mean)."""
    big = _batch(5)
    halves = [{k: v[:1] for k, v in big.items()}, {k: v[1:] for k, v in big.items()}]
    m1, t1 = _tiny_trainer(max_grad_norm=None)
    m2, t2 = _tiny_trainer(max_grad_norm=None)
    r1, r2 = t1.step([big]), t2.step(halves)
    assert r1.loss == pytest.approx(r2.loss, rel=1e-6)
    assert r1.grad_norm == pytest.approx(r2.grad_norm, rel=1e-5)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_learn(precision):
    from training.trainer import resolve_precision

    prec = resolve_precision(precision, torch.device("cpu"))
    assert (prec.scaler is not None) == (precision == "fp16")
    model, trainer = _tiny_trainer(precision=prec)
    losses = [trainer.step([_batch(0)]).loss for _ in range(8)]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.5
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights


def test_gradient_checkpointing_gives_the_same_step():
    m1, t1 = _tiny_trainer(max_grad_norm=None)
    m2, t2 = _tiny_trainer(max_grad_norm=None)
    m2.gradient_checkpointing = True
    r1, r2 = t1.step([_batch(1)]), t2.step([_batch(1)])
    assert r1.loss == r2.loss
    assert r1.grad_norm == pytest.approx(r2.grad_norm, rel=1e-6)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
