"""From settings to a loaded engine: which checkpoint, which sizes, which served name.

With no model given, the server serves the bundled default model (`models/ember-stories`); when a
source checkout lacks it, a seeded tiny random model is written once to a cache directory instead,
so `ember serve` always has something to serve.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from server.settings import ServerSettings

log = logging.getLogger("ember.server")

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLED_MODEL = REPO_ROOT / "models" / "ember-stories"
TINY_NAME = "ember-tiny-seed0"


def cache_dir() -> Path:
    base = os.environ.get("EMBER_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "ember")
    return Path(base)


def default_model_dir() -> Path:
    """The bundled model, or a seeded tiny model created in the cache directory on first use."""
    if (BUNDLED_MODEL / "config.json").is_file():
        return BUNDLED_MODEL
    target = cache_dir() / TINY_NAME
    if (target / "config.json").is_file():
        return target
    from training.tiny import make_tiny_checkpoint

    log.warning("%s is missing; writing a seeded tiny random model to %s", BUNDLED_MODEL, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so a concurrent start never sees half a checkpoint.
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        make_tiny_checkpoint(tmp, seed=0)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def model_dir(settings: ServerSettings) -> Path:
    return Path(settings.model) if settings.model else default_model_dir()


def served_name(settings: ServerSettings, path: Path) -> str:
    return settings.served_model_name or path.resolve().name


def engine_config(settings: ServerSettings, path: Path) -> Any:
    from engine.config import EngineConfig

    return EngineConfig(
        model=str(path), dtype=settings.dtype, device=settings.device, max_model_len=settings.max_model_len,
        kv_cache_tokens=settings.kv_cache_tokens, gpu_memory_utilization=settings.gpu_memory_utilization,
        max_num_seqs=settings.max_num_seqs, max_num_batched_tokens=settings.max_num_batched_tokens,
        enable_prefix_caching=settings.enable_prefix_caching, seed=settings.seed,
    )


def adapter_config(settings: ServerSettings) -> Any:
    """The engine's adapter settings, or None when adapters are off."""
    if not settings.enable_lora:
        return None
    from engine.adapters import AdapterServingConfig

    return AdapterServingConfig(lora_root=settings.lora_root, max_loras=settings.max_loras,
                                max_lora_rank=settings.max_lora_rank, max_cpu_loras=settings.max_cpu_loras)


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "QUOTA PERIOD" or "max PERIOD"


def usable_cores() -> int:
    """CPUs this process may run on: its affinity set, capped by a cgroup CPU quota (a container's
    `--cpus`), which the affinity set does not show."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return cores


def cpu_threads(settings: ServerSettings) -> int | None:
    """torch's intra-op thread count for the server, None to leave torch's own choice.

    Engine steps run on a worker thread while the event loop streams their outputs. With as many
    intra-op threads as cores, the event loop's thread takes a core from the step's threads, which
    then wait on each other at every operation: on a 2-core machine 64 streams from the bundled
    model ran 2.9x faster with 1 thread than with 2 (benchmarks/bench_serve.py; docs/api.md). So
    one core is left to the event loop unless --cpu-threads or OMP_NUM_THREADS says otherwise.
    """
    if settings.cpu_threads is not None:
        return settings.cpu_threads
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    return max(1, usable_cores() - 1)


def apply_cpu_threads(settings: ServerSettings) -> int:
    """Set torch's intra-op threads for a server process (see cpu_threads); returns the count in use.
    Process-wide, so `ember serve` calls it, not the app factory (tests and embedders keep theirs)."""
    import torch

    threads = cpu_threads(settings)
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def build_engine(settings: ServerSettings, path: Path) -> Any:
    """Load the model and build the (synchronous) engine; the app wraps it in an AsyncEngine."""
    from engine.adapters import parse_lora_specs
    from engine.engine import Engine
    from engine.errors import InvalidRequestError

    engine = Engine(engine_config(settings, path), adapters=adapter_config(settings))
    for name, lora_path in parse_lora_specs(settings.lora):
        try:
            engine.adapters.load(name, lora_path)
        except InvalidRequestError as exc:
            raise ValueError(f"--lora {name}={lora_path}: {exc.message}") from None
    return engine
