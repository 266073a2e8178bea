"""What every GPU benchmark records beside its figures: when, which commit, which GPU and software,
the command; plus the copy bandwidth the roofline percentages are set against."""
from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import time
from pathlib import Path

import torch


def git_commit() -> str | None:
    """The checkout's commit (EMBER_COMMIT wins: the device copy of the tree may have no .git)."""
    if os.environ.get("EMBER_COMMIT"):
        return os.environ["EMBER_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def run_info(argv: list[str]) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "command": "python " + shlex.join(argv),
        "torch": torch.__version__,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_gb"] = round(props.total_memory / 1e9, 1)
    else:
        info["hardware"] = cpu_name()
    return info


def cpu_name() -> str:
    """The CPU's model name and the cores this process may use, e.g. 'AMD EPYC (2 cores)'."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from server.engine_loader import usable_cores  # affinity set, capped by a cgroup CPU quota

    return f"{name} ({usable_cores()} cores)"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def copy_bandwidth(device: str = "cuda", nbytes: int = 2 << 30, repeats: int = 10) -> float:
    """Copy bandwidth in TB/s (bytes read plus bytes written), median of repeats; CUDA events on a GPU."""
    if not device.startswith("cuda"):  # CPU plumbing runs: a small buffer, wall time
        nbytes = 64 << 20
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    ms = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            ms.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            dst.copy_(src)
            ms.append((time.perf_counter() - t) * 1e3)
    del src, dst
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return 2 * nbytes / (statistics.median(ms) * 1e-3) / 1e12


def best_ms(fn, repeats: int) -> float:
    """Best wall time of `repeats` calls of fn, after one untimed (CPU benchmarks), in ms."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def write_json(path: str | os.PathLike, report: dict) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
