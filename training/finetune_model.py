"""Turn a base model into what a fine-tuning method trains: all weights, LoRA/DoRA, or QLoRA on NF4.

`apply_method` is a transform on a built model (it also serves the benchmark, which builds random
models); `load_for_finetuning` loads the base checkpoint and applies it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.checkpoint import load_model
from engine.config import ModelConfig
from engine.lora import LoraConfig, inject_adapters, mark_only_adapters_trainable
from training.dropout import add_dropout
from training.finetune_config import FinetuneConfig, QloraSection


@dataclass(frozen=True)
class Prepared:
    """The model to train, its architecture and, for adapter methods, the adapter config."""

    model: nn.Module
    config: ModelConfig
    lora_config: LoraConfig | None
    trainable_params: int
    total_params: int


def apply_method(model: nn.Module, method: str, lora_config: LoraConfig | None, qlora: QloraSection,
                 device: torch.device) -> LoraConfig | None:
    """Make `model` trainable the way `method` says, in place; the base must already be on `device`
    (QLoRA: on the CPU or the device, in any float dtype; it is quantized while moved)."""
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return None
    if lora_config is None:
        raise ValueError(f"method {method} needs a LoRA config")
    if method == "qlora":
        from training.qlora import quantize_base

        quantize_base(model, qlora, device)
    for p in model.parameters():
        p.requires_grad_(False)
    inject_adapters(model, lora_config)
    mark_only_adapters_trainable(model)
    return lora_config


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a packed 4-bit weight counts its real element count."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if p.dtype == torch.uint8 and getattr(p, "quant_state", None) is not None:
            n = int(torch.Size(p.quant_state.shape).numel())
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def base_dtype(method: str, precision: str) -> torch.dtype:
    """Frozen LoRA/DoRA bases are held in bf16 when training in bf16 (the memory LoRA is for);
    full fine-tuning keeps fp32 master weights; QLoRA quantizes from fp32."""
    if method in ("lora", "dora") and precision == "bf16":
        return torch.bfloat16
    return torch.float32


def load_for_finetuning(cfg: FinetuneConfig, device: torch.device, precision: str) -> Prepared:
    """Load `cfg.base` and apply `cfg.method` (the base is read on the CPU first for QLoRA)."""
    load_device = "cpu" if cfg.method == "qlora" else device
    model, config = load_model(cfg.base, dtype=base_dtype(cfg.method, precision), device=load_device)
    lora_config = apply_method(model, cfg.method, cfg.lora_config() if cfg.uses_adapter else None,
                               cfg.qlora, device)
    model.to(device)
    add_dropout(model, cfg.train.dropout)  # residual dropout (train.dropout, default 0), training mode only
    model.gradient_checkpointing = cfg.train.gradient_checkpointing
    model.train()
    trainable, total = count_params(model)
    return Prepared(model, config, lora_config, trainable, total)
