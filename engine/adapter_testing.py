"""Random adapters in PEFT's layout, for tests and benchmarks (never used on the serving path).

The tensors are drawn for the given model's layer shapes and written with PEFT's key names and
config fields, so the files load in Ember and in `peft` alike. B is non-zero (unlike a freshly
initialised adapter) so the adapter visibly changes the model's output.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from engine.adapter_io import CONFIG_FILE, PREFIX, WEIGHTS_FILE, peft_config_dict
from engine.lora import DEFAULT_TARGETS, LoraConfig, base_weight, is_linear, lora_scaling


def write_random_adapter(model: nn.Module, out_dir: str | os.PathLike, r: int = 8, alpha: float = 16.0,
                         targets: tuple[str, ...] = DEFAULT_TARGETS, use_dora: bool = False,
                         use_rslora: bool = False, seed: int = 0, strength: float = 1.0) -> Path:
    """Write an adapter for `model` whose update is about `strength` times the layer's own output scale."""
    gen = torch.Generator().manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), use_dora=use_dora,
                        use_rslora=use_rslora)
    scaling = lora_scaling(r, alpha, use_rslora)
    tensors: dict[str, torch.Tensor] = {}
    for path, layer in model.named_modules():
        if not (path and is_linear(layer) and config.matches(path)):
            continue
        weight = base_weight(layer, torch.float32)  # [out, in], on the model's device
        k, n = layer.in_features, layer.out_features
        a = torch.randn(r, k, generator=gen) / k ** 0.5
        # Scale B so that s B A has roughly the weight's row norm times `strength`.
        row = weight.norm(dim=1).mean().item()
        b = torch.randn(n, r, generator=gen) * (strength * row / (scaling * r ** 0.5))
        tensors[f"{PREFIX}{path}.lora_A.weight"] = a.contiguous()
        tensors[f"{PREFIX}{path}.lora_B.weight"] = b.contiguous()
        if use_dora:
            delta = scaling * (b.to(weight.device) @ a.to(weight.device))
            norm = torch.linalg.norm(weight + delta, dim=1).cpu()
            wobble = 1.0 + 0.3 * torch.rand(n, generator=gen)
            tensors[f"{PREFIX}{path}.lora_magnitude_vector"] = (norm * wobble).contiguous()
    if not tensors:
        raise ValueError(f"no linear layer of the model matches {targets}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(peft_config_dict(config), indent=2) + "\n", encoding="utf-8")
    return out
