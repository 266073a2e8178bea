"""Training-state checkpoints written atomically, pruned to the last K, resolved to the newest complete one.

Layout of one checkpoint (`<root>/step_000001200/`):

    model/                    the model in the Hugging Face layout (fp32 master weights, tokenizer files):
                              `ember serve`, `load_model` and transformers read it as is
    optimizer.safetensors     every tensor of the optimizer state, keyed `<param name>/<state key>`
    optimizer.json            param groups and non-tensor optimizer state
    rng_rank<R>.safetensors   torch CPU (and CUDA) generator states of rank R
    rng_rank<R>.json          Python `random` and numpy generator states of rank R
    trainer_state.json        step, scheduler, data position and caller state; written last, lists every
                              file with its size

Atomicity: everything is written into `<root>/.tmp-step_...`, each file fsync'ed, the folder fsync'ed,
then renamed to its final name in one `rename` (atomic on POSIX) and the root fsync'ed. A crash at any
moment leaves either no new checkpoint folder or a complete one. Old checkpoints are first renamed to
`.trash-...` and only then deleted, so a half-deleted folder is never mistaken for a checkpoint.
Nothing is pickled: tensors go to safetensors, the rest to JSON.

Distributed runs: every rank calls `save_checkpoint` and `load_checkpoint` (FSDP gathers shards
collectively); rank 0 writes the shared files; each rank writes its own RNG state.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from engine.checkpoint import save_model
from engine.config import ModelConfig
from engine.model import Transformer, rope_inv_freq
from training.distributed import barrier, broadcast_object, is_distributed, unwrap_model

FORMAT_VERSION = 1
STATE_FILE = "trainer_state.json"
MODEL_DIR = "model"
STEP_RE = re.compile(r"^step_(\d+)$")
# Crash-test hook: when this variable names a point of the writer, the writer announces it on stdout
# and blocks there forever, so a test can SIGKILL it at exactly that point.
FAULT_ENV = "EMBER_CHECKPOINT_FAULT_AT"


def _fault_point(name: str) -> None:
    if os.environ.get(FAULT_ENV) == name:
        sys.stdout.write(f"EMBER_CHECKPOINT_FAULT {name}\n")
        sys.stdout.flush()
        threading.Event().wait()


def _rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def step_dir_name(step: int) -> str:
    return f"step_{step:09d}"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, data: Any) -> None:
    """Write JSON and fsync it."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync_tree(path: Path) -> None:
    for child in sorted(path.rglob("*")):
        if child.is_file():
            _fsync_file(child)
        else:
            _fsync_dir(child)
    _fsync_dir(path)


def _publish(tmp: Path, final: Path) -> None:
    """Rename a finished temporary folder into place, moving an older folder of that name aside first."""
    old = None
    if final.exists():
        old = final.parent / f".trash-{final.name}-{os.getpid()}"
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    _fault_point("renamed")
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; when the block ends, fsync it and rename it to `final`.

    On an exception the temporary folder is removed and nothing else changes. For any single-writer
    folder that must appear whole (adapter checkpoints, exported models).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, final)


# ---- what goes in: model, optimizer, RNG ----------------------------------------------------------------

def _is_plain(model: nn.Module) -> bool:
    """Single process and no DDP/FSDP wrapper: state dicts can be taken directly (DCP is slow to import)."""
    inner = unwrap_model(model)
    sharded = any(hasattr(p, "full_tensor") for p in inner.parameters())
    return not is_distributed() and not sharded


def _param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in unwrap_model(model).named_parameters()}


def _full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU state dict of a plain, DDP or FSDP2 model; empty on non-zero FSDP ranks."""
    if _is_plain(model):
        return {k: v.detach().cpu() for k, v in unwrap_model(model).state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(unwrap_model(model), options=opts)


def _full_optim_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Optimizer state keyed by parameter name (the layout of torch.distributed.checkpoint's full state)."""
    if not _is_plain(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(unwrap_model(model), optimizer, options=opts)
    names = _param_names(model)
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    raw = optimizer.state_dict()
    state = {order[i]: {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in entry.items()}
             for i, entry in raw["state"].items()}
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in raw["param_groups"]]
    return {"state": state, "param_groups": groups}


def _set_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    if _is_plain(model):
        unwrap_model(model).load_state_dict(state, strict=True)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(unwrap_model(model), state, options=StateDictOptions(full_state_dict=True))


def _set_optim_state(model: nn.Module, optimizer: torch.optim.Optimizer, osd: dict[str, Any]) -> None:
    if not _is_plain(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(unwrap_model(model), optimizer, osd, options=StateDictOptions(full_state_dict=True))
        return
    names = _param_names(model)
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    index = {name: i for i, name in enumerate(order)}
    missing = sorted(set(osd["state"]) - set(index))
    if missing:
        raise ValueError(f"optimizer state names parameters this model does not train: {', '.join(missing[:3])}")
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in osd["param_groups"]]
    optimizer.load_state_dict({"state": {index[n]: v for n, v in osd["state"].items()}, "param_groups": groups})


def model_from_state(state: dict[str, torch.Tensor], config: ModelConfig) -> Transformer:
    """A CPU Transformer that uses the given tensors (no copy), for writing with engine.checkpoint."""
    with torch.device("meta"):
        model = Transformer(config)
    state = dict(state)
    if config.tie_word_embeddings:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    model.load_state_dict(state, assign=True, strict=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(config)
    return model


def _split_optimizer_state(osd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, Any] = {"state": {}, "param_groups": osd["param_groups"]}
    for name, entry in osd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}/{key}"] = value.detach().cpu().contiguous()
            else:
                plain["state"].setdefault(str(name), {})[key] = value
    return tensors, plain


def _join_optimizer_state(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {name: dict(entry) for name, entry in plain["state"].items()}
    for flat, value in tensors.items():
        name, _, key = flat.rpartition("/")
        state.setdefault(name, {})[key] = value
    groups = []
    for group in plain["param_groups"]:
        group = dict(group)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's generator states: tensors (torch CPU/CUDA) and JSON (Python random, numpy)."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    plain = {"python": [version, list(internal), gauss],
             "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, plain


def set_rng_state(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    """Restore what `rng_state` captured (CUDA states only for devices that exist)."""
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[f"torch_cuda_{i}"] for i in range(torch.cuda.device_count()) if f"torch_cuda_{i}" in tensors]
        if states:
            torch.cuda.set_rng_state_all(states)
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# ---- save ------------------------------------------------------------------------------------------------

def save_checkpoint(root: str | os.PathLike, step: int, *, model: nn.Module, config: ModelConfig,
                    optimizer: torch.optim.Optimizer | None = None,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                    state: dict[str, Any] | None = None, tokenizer_dir: str | os.PathLike | None = None,
                    keep_last: int | None = 3) -> Path:
    """Write the checkpoint of `step` under `root` atomically and keep only the newest `keep_last`.

    state: JSON-safe caller state (data position, loop counters, the run's config ...), returned by
    `load_checkpoint`. Call on every rank in distributed runs. Returns the checkpoint folder.
    """
    root = Path(root)
    final = root / step_dir_name(step)
    model_state = _full_model_state(model)
    optim_state = _full_optim_state(model, optimizer) if optimizer is not None else None
    rank = _rank()
    tmp_name = broadcast_object(f".tmp-{final.name}-{os.getpid()}" if rank == 0 else None)
    tmp = root / tmp_name
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(root)
        tmp.mkdir()
    barrier()
    _fault_point("tmp_created")
    rng_tensors, rng_plain = rng_state()
    save_file(rng_tensors, str(tmp / f"rng_rank{rank}.safetensors"))
    write_json(tmp / f"rng_rank{rank}.json", rng_plain)
    _fsync_file(tmp / f"rng_rank{rank}.safetensors")
    barrier()
    if rank == 0:
        _write_main_files(tmp, step, model_state, config, optim_state, scheduler, state, tokenizer_dir)
        _publish(tmp, final)
        prune_checkpoints(root, keep_last)
    barrier()
    return final


def _write_main_files(tmp: Path, step: int, model_state: dict[str, torch.Tensor], config: ModelConfig,
                      optim_state: dict[str, Any] | None, scheduler, state: dict[str, Any] | None,
                      tokenizer_dir) -> None:
    save_model(model_from_state(model_state, config), config, tmp / MODEL_DIR, tokenizer_dir=tokenizer_dir)
    _fault_point("model_written")
    if optim_state is not None:
        tensors, plain = _split_optimizer_state(optim_state)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        write_json(tmp / "optimizer.json", plain)
    _fault_point("optimizer_written")
    files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    trainer_state = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "state": state or {},
        "files": files,
    }
    write_json(tmp / STATE_FILE, trainer_state)
    _fsync_tree(tmp)
    _fault_point("state_written")


def _remove_leftovers(root: Path) -> None:
    """Delete temporary and trash folders that a crashed writer left behind."""
    for path in root.iterdir():
        if path.name.startswith((".tmp-", ".trash-")) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def prune_checkpoints(root: str | os.PathLike, keep_last: int | None) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints (None or 0 keeps all); returns the deleted."""
    if not keep_last:
        return []
    doomed = list_checkpoints(root)[:-keep_last]
    for path in doomed:
        trash = path.parent / f".trash-{path.name}-{os.getpid()}"
        os.rename(path, trash)  # atomic: the folder stops being a checkpoint before any file goes
        _fault_point("pruning")
        shutil.rmtree(trash, ignore_errors=True)
    return doomed


# ---- find and load ---------------------------------------------------------------------------------------

def is_complete(path: str | os.PathLike) -> bool:
    """True when the folder holds a readable trainer_state.json and every file it lists, with its size."""
    path = Path(path)
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        files = state["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    for rel, size in files.items():
        f = path / rel
        if not f.is_file() or f.stat().st_size != size:
            return False
    return True


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (temporary and trash folders are never listed)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        m = STEP_RE.match(path.name)
        if m and path.is_dir() and is_complete(path):
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under `root`, or None. Never returns a half-written folder."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def read_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed trainer_state.json of a checkpoint folder."""
    return json.loads((Path(path) / STATE_FILE).read_text(encoding="utf-8"))


def load_model_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model tensors of a checkpoint (tied head filled in), on the CPU."""
    from engine.checkpoint import load_config, weight_files

    model_dir = Path(path) / MODEL_DIR
    config = load_config(model_dir)
    state: dict[str, torch.Tensor] = {}
    for f in weight_files(model_dir):
        state.update(load_file(str(f)))
    if config.tie_word_embeddings:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    return state


def load_checkpoint(path: str | os.PathLike, *, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                    restore_rng: bool = True) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNG from a checkpoint folder; return its trainer state.

    The returned dict has `step` and `state` (what `save_checkpoint` was given). Works for plain, DDP
    and FSDP2 models (every rank reads the full tensors and keeps its shard). Call on every rank.
    """
    path = Path(path)
    if not is_complete(path):
        raise FileNotFoundError(f"{path}: not a complete training checkpoint")
    trainer_state = read_trainer_state(path)
    if trainer_state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {trainer_state.get('format_version')} is not {FORMAT_VERSION}")
    _set_model_state(model, load_model_state(path))
    if optimizer is not None:
        tensors = load_file(str(path / "optimizer.safetensors"))
        plain = json.loads((path / "optimizer.json").read_text(encoding="utf-8"))
        _set_optim_state(model, optimizer, _join_optimizer_state(tensors, plain))
    if scheduler is not None and trainer_state.get("scheduler") is not None:
        scheduler.load_state_dict(trainer_state["scheduler"])
    if restore_rng:
        rank = _rank()
        rng_file = path / f"rng_rank{rank}.safetensors"
        if not rng_file.is_file():  # more ranks now than when saved: reuse rank 0's streams
            rng_file = path / "rng_rank0.safetensors"
            rank = 0
        set_rng_state(load_file(str(rng_file)), json.loads((path / f"rng_rank{rank}.json").read_text()))
    return trainer_state
