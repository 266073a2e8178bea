"""Fold an adapter into its base and write a full checkpoint (`ember merge`).

The base is loaded in fp32 so the merge itself adds no rounding; the result is written in `dtype`
(default: the base's own dtype from config.json). The adapter may come from Ember or from `peft`.
A QLoRA adapter merges into the full-precision base it was quantized from.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from engine.adapter_io import load_adapter
from engine.checkpoint import load_config, load_model, parse_dtype, save_model
from engine.lora import merge_adapters


def merge_adapter(base_dir: str | os.PathLike, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike,
                  dtype: str | None = None) -> Path:
    """Load base + adapter, merge, save to out_dir (tokenizer files copied from the base)."""
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    if out_dir.resolve() == base_dir.resolve():
        raise ValueError(f"{out_dir}: the output directory must differ from the base checkpoint")
    target = parse_dtype(dtype or load_config(base_dir).torch_dtype) or torch.float32
    model, config = load_model(base_dir, dtype=torch.float32)
    adapter = load_adapter(model, adapter_dir)
    merge_adapters(model)
    model.to(target)
    save_model(model, config, out_dir, tokenizer_dir=base_dir)
    with open(out_dir / "merged_from.json", "w", encoding="utf-8") as f:
        json.dump({"base": str(base_dir), "adapter": str(adapter.path),
                   "use_dora": adapter.config.use_dora, "modules": len(adapter.tensors)}, f, indent=2)
        f.write("\n")
    return out_dir
