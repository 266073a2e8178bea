"""AdamW with the usual split: weight decay on the matrices of linear layers, none on norms, biases, embeddings.

Decaying a norm's gain or a bias pulls it towards zero for no benefit, and decaying embeddings penalises
rare tokens whose rows are seldom updated; GPT-style recipes (nanoGPT, litgpt, torchtitan) leave them alone.
Only parameters with `requires_grad` are optimised, so the same functions serve LoRA fine-tuning.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from training.config import OptimSection


def _no_decay_ids(model: nn.Module) -> set[int]:
    """ids of parameters that must not decay: anything in an embedding or a norm, and every vector."""
    ids: set[int] = set()
    for module in model.modules():
        is_norm = isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or type(module).__name__.endswith("Norm")
        if isinstance(module, nn.Embedding) or is_norm:
            ids.update(id(p) for p in module.parameters(recurse=False))
    ids.update(id(p) for p in model.parameters() if p.ndim < 2)
    return ids


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW parameter groups (decay, no decay) over the trainable parameters, tied weights once.

    Each group carries `names` (parameter names) so logs and tests can see where a parameter went.
    """
    skip = _no_decay_ids(model)
    decay: dict[str, list] = {"params": [], "names": []}
    no_decay: dict[str, list] = {"params": [], "names": []}
    seen: set[int] = set()
    for name, p in model.named_parameters():  # named_parameters already yields a tied tensor once
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        group = no_decay if id(p) in skip else decay
        group["params"].append(p)
        group["names"].append(name)
    groups = []
    if decay["params"]:
        groups.append({**decay, "weight_decay": weight_decay})
    if no_decay["params"]:
        groups.append({**no_decay, "weight_decay": 0.0})
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return groups


def fused_available(model: nn.Module) -> bool:
    """Fused AdamW runs on CUDA; every trainable parameter must live there."""
    params = [p for p in model.parameters() if p.requires_grad]
    return bool(params) and all(p.device.type == "cuda" for p in params)


def build_optimizer(model: nn.Module, cfg: OptimSection) -> torch.optim.AdamW:
    """AdamW over `param_groups(model, cfg.weight_decay)`; fused when `cfg.fused` is None and CUDA allows."""
    fused = fused_available(model) if cfg.fused is None else cfg.fused
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                             eps=cfg.eps, fused=fused or None)
