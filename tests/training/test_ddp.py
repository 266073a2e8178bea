"""Data parallelism on the CPU: torchrun with 2 gloo processes matches 1 process with twice the accumulation."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from training.config import save_config
from training.pretrain import pretrain

sys.path.insert(0, str(Path(__file__).parent))
from train_fixtures import tiny_config, write_byte_shards  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
STEPS = 8


def _losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_with_double_accumulation(tmp_path, strategy):
    data = write_byte_shards(tmp_path / "data")
    common = dict(log={"every": 1}, eval={"every": 0, "batches": 4})
    single = tiny_config(data, tmp_path / "single", train={"max_steps": STEPS, "grad_accum_steps": 2}, **common)
    want = pretrain(single).losses
    multi = tiny_config(data, tmp_path / "multi", train={"max_steps": STEPS, "grad_accum_steps": 1},
                        parallel={"strategy": strategy}, **common)
    save_config(multi, tmp_path / "multi.yaml")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "ember_cli.main", "train", "--config", str(tmp_path / "multi.yaml")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    got = _losses(tmp_path / "multi")
    assert len(got) == STEPS
    # Same windows, same mean: only the order of float additions differs (bucketed all-reduce).
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert want[-1] < want[0] - 0.5
