"""Resumable checkpoints of adapter training: only the adapter and its optimizer state, never the base.

Same folder layout and guarantees as training/checkpointing.py (atomic rename, trainer_state.json
listing every file, pruning to the newest K), with `adapter/` (PEFT layout, loadable by `peft` and
`ember serve` as is) in place of `model/`. `list_checkpoints` / `latest_checkpoint` work on both kinds.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from engine.adapter_io import read_adapter, save_adapter
from engine.lora import LoraConfig, lora_modules
from training.checkpointing import (FORMAT_VERSION, STATE_FILE, _join_optimizer_state, _split_optimizer_state,
                                    atomic_dir, is_complete, prune_checkpoints, read_trainer_state, rng_state,
                                    set_rng_state, step_dir_name, write_json)

ADAPTER_DIR = "adapter"


def _optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_adapter_checkpoint(root: str | os.PathLike, step: int, *, model: nn.Module, lora_config: LoraConfig,
                            optimizer: torch.optim.Optimizer, scheduler=None, state: dict[str, Any] | None = None,
                            base_model_name_or_path: str | None = None, keep_last: int | None = 3) -> Path:
    """Write `<root>/step_<N>/` atomically (adapter, optimizer, RNG, trainer state); prune to keep_last."""
    final = Path(root) / step_dir_name(step)
    with atomic_dir(final) as tmp:
        save_adapter(model, lora_config, tmp / ADAPTER_DIR, base_model_name_or_path)
        tensors, plain = _split_optimizer_state(_optimizer_state(model, optimizer))
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        write_json(tmp / "optimizer.json", plain)
        rng_tensors, rng_plain = rng_state()
        save_file(rng_tensors, str(tmp / "rng_rank0.safetensors"))
        write_json(tmp / "rng_rank0.json", rng_plain)
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        write_json(tmp / STATE_FILE, {
            "format_version": FORMAT_VERSION, "step": step,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "state": state or {}, "files": files,
        })
    prune_checkpoints(root, keep_last)
    return final


def load_adapter_checkpoint(path: str | os.PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                            scheduler=None) -> dict[str, Any]:
    """Restore adapter weights (into the already injected model), optimizer, scheduler and RNG."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    path = Path(path)
    if not is_complete(path) or not (path / ADAPTER_DIR).is_dir():
        raise FileNotFoundError(f"{path}: not a complete adapter training checkpoint")
    trainer_state = read_trainer_state(path)
    adapter = read_adapter(path / ADAPTER_DIR, dtype=None)
    modules = dict(lora_modules(model))
    if set(modules) != set(adapter.tensors):
        raise ValueError(f"{path / ADAPTER_DIR}: adapts {len(adapter.tensors)} modules, the model being trained "
                         f"has {len(modules)}; resume with the same lora settings")
    with torch.no_grad():
        for name, module in modules.items():
            for key, value in adapter.tensors[name].items():
                module.get_parameter(key).copy_(value)
    tensors = load_file(str(path / "optimizer.safetensors"))
    plain = json.loads((path / "optimizer.json").read_text(encoding="utf-8"))
    set_optimizer_state_dict(model, optimizer, _join_optimizer_state(tensors, plain),
                             options=StateDictOptions(full_state_dict=True))
    if scheduler is not None and trainer_state.get("scheduler") is not None:
        scheduler.load_state_dict(trainer_state["scheduler"])
    set_rng_state(load_file(str(path / "rng_rank0.safetensors")),
                  json.loads((path / "rng_rank0.json").read_text(encoding="utf-8")))
    return trainer_state
