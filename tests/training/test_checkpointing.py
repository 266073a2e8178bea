"""Training checkpoints: exact round trip, pruning, and crash safety under a real SIGKILL mid-write."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.checkpoint import load_model
from training.checkpointing import (FAULT_ENV, atomic_dir, latest_checkpoint, list_checkpoints, load_checkpoint,
                                    read_trainer_state, save_checkpoint)
from training.config import OptimSection, ScheduleSection
from training.optim import build_optimizer
from training.schedule import build_scheduler

sys.path.insert(0, str(Path(__file__).parent))
from checkpoint_child import CONFIG  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).with_name("checkpoint_child.py")


def _fresh():
    from engine.model import Transformer

    model = Transformer(CONFIG)
    model.init_weights(123)
    optimizer = build_optimizer(model, OptimSection(lr=1e-3))
    return model, optimizer, build_scheduler(optimizer, ScheduleSection(warmup_steps=1), 10)


def _assert_loads(path: Path, step: int) -> None:
    model, optimizer, scheduler = _fresh()
    state = load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler)
    assert state["step"] == step and state["state"]["data_position"] == 2 * step
    assert scheduler.last_epoch == step
    assert len(optimizer.state) == len(list(model.parameters()))
    hf_model, _ = load_model(path / "model")  # the model part is a plain Hugging Face checkpoint
    for (name, a), b in zip(model.state_dict().items(), hf_model.state_dict().values()):
        assert torch.equal(a, b), name


def test_round_trip_restores_model_optimizer_schedule_and_rng(tmp_path):
    model, optimizer, scheduler = _fresh()
    ids = torch.randint(0, CONFIG.vocab_size, (2, 9))
    model(ids).sum().backward()
    optimizer.step()
    scheduler.step()
    torch.manual_seed(5)
    path = save_checkpoint(tmp_path, 1, model=model, config=CONFIG, optimizer=optimizer, scheduler=scheduler,
                           state={"data_position": 2, "note": "x"})
    expected_draw = torch.rand(3)
    m2, o2, s2 = _fresh()
    torch.manual_seed(99)
    state = load_checkpoint(path, model=m2, optimizer=o2, scheduler=s2)
    assert state["state"] == {"data_position": 2, "note": "x"}
    assert torch.equal(torch.rand(3), expected_draw)  # RNG continues where it was saved
    for a, b in zip(model.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    for p, q in zip(model.parameters(), m2.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(optimizer.state[p][key], o2.state[q][key])
    assert o2.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    assert s2.last_epoch == scheduler.last_epoch


def test_keep_last_and_latest(tmp_path):
    model, optimizer, scheduler = _fresh()
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, model=model, config=CONFIG, optimizer=optimizer, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000000003", "step_000000004"]
    assert latest_checkpoint(tmp_path).name == "step_000000004"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_truncated_file_is_not_latest(tmp_path):
    model, optimizer, _ = _fresh()
    for step in (1, 2):
        save_checkpoint(tmp_path, step, model=model, config=CONFIG, optimizer=optimizer, keep_last=3)
    weights = tmp_path / "step_000000002" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert latest_checkpoint(tmp_path).name == "step_000000001"
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "step_000000002", model=model)


def test_atomic_dir_leaves_nothing_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "adapter") as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(tmp_path / "adapter") as tmp:
        (tmp / "a.txt").write_text("whole")
    assert (tmp_path / "adapter" / "a.txt").read_text() == "whole"


# point at which the second save is killed -> the step `latest` must then resolve to
KILL_POINTS = {"tmp_created": 1, "optimizer_written": 1, "state_written": 1,
               "renamed": 2, "pruning": 2}


@pytest.mark.parametrize("point", sorted(KILL_POINTS))
def test_sigkill_during_save_never_leaves_a_broken_latest(tmp_path, point):
    env = {**os.environ, FAULT_ENV: point, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(CHILD), str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            env=env, cwd=ROOT)
    try:
        lines = []
        for line in proc.stdout:  # blocks until the child reaches the point (or exits)
            lines.append(line)
            if line.startswith("EMBER_CHECKPOINT_FAULT"):
                break
        assert lines and lines[-1].strip() == f"EMBER_CHECKPOINT_FAULT {point}", lines
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    latest = latest_checkpoint(tmp_path)
    assert latest is not None and read_trainer_state(latest)["step"] == KILL_POINTS[point]
    _assert_loads(latest, KILL_POINTS[point])
    # The next save clears what the killed writer left behind.
    model, optimizer, _ = _fresh()
    save_checkpoint(tmp_path, 3, model=model, config=CONFIG, optimizer=optimizer, state={"data_position": 6},
                    keep_last=1)
    assert [p.name for p in tmp_path.iterdir()] == ["step_000000003"]
