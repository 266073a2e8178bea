"""Adapter files in PEFT's layout: `adapter_config.json` + `adapter_model.safetensors`.

Keys are `base_model.model.<module path>.lora_A.weight`, `.lora_B.weight` and, for DoRA,
`.lora_magnitude_vector`, so adapters move both ways between Ember and the `peft` library.
`read_adapter` parses and checks a directory on its own (a serving registry can hold the result);
`validate_adapter` checks it against a model; `load_adapter` does both and injects it. Every problem
raises AdapterError naming the file and what is wrong. Only safetensors are read, never pickle.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from engine.errors import CheckpointError
from engine.lora import LoraConfig, LoraLinear, is_linear, lora_modules, wrap_linear

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")
# Older PEFT versions stored the magnitude as a sub-module weight.
SUFFIX_ALIASES = {"lora_magnitude_vector.weight": "lora_magnitude_vector"}


class AdapterError(CheckpointError):
    """An adapter directory that cannot be used; the message names the file and the problem."""


@dataclass
class Adapter:
    """A parsed adapter: its config and tensors per module path ({'lora_A.weight': A, ...})."""

    path: Path
    config: LoraConfig
    base_model_name_or_path: str | None
    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def weights_file(self) -> Path:
        return self.path / WEIGHTS_FILE

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    def rank(self, module_path: str) -> int:
        return int(self.tensors[module_path]["lora_A.weight"].shape[0])


def peft_config_dict(config: LoraConfig, base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """The adapter_config.json fields PEFT reads for a LoRA/DoRA adapter of a causal LM."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": config.target_modules,
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": dict(config.alpha_pattern),
        "init_lora_weights": True,
        "inference_mode": True,
    }


def save_adapter(model: nn.Module, config: LoraConfig, out_dir: str | os.PathLike,
                 base_model_name_or_path: str | None = None) -> Path:
    """Write the model's adapters to out_dir in PEFT's layout (tensors contiguous, on CPU, own dtype)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for path, module in lora_modules(model):
        if module.merged:
            raise AdapterError(f"{out}: the adapter at {path} is merged into the weights; unmerge before saving")
        for name, param in module.named_parameters():
            if name.startswith("lora_"):
                tensors[f"{PREFIX}{path}.{name}"] = param.detach().contiguous().cpu()
    if not tensors:
        raise AdapterError(f"{out}: the model has no adapters to save")
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    with open(out / CONFIG_FILE, "w", encoding="utf-8") as f:
        json.dump(peft_config_dict(config, base_model_name_or_path), f, indent=2)
        f.write("\n")
    return out


def _read_config(path: Path) -> tuple[LoraConfig, dict[str, Any]]:
    if not path.is_file():
        raise AdapterError(f"{path}: missing; an adapter directory needs {CONFIG_FILE}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    if raw.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: peft_type {raw.get('peft_type')!r} is not supported; Ember loads LORA adapters")
    if raw.get("bias", "none") != "none":
        raise AdapterError(f"{path}: bias {raw['bias']!r} is not supported; only bias 'none' adapters load")
    if raw.get("modules_to_save"):
        raise AdapterError(f"{path}: modules_to_save {raw['modules_to_save']} (fully trained layers) is not "
                           "supported; merge the adapter with peft or train without modules_to_save")
    if raw.get("fan_in_fan_out"):
        raise AdapterError(f"{path}: fan_in_fan_out adapters (GPT-2 Conv1D) do not fit Llama-style models")
    if raw.get("lora_bias"):
        raise AdapterError(f"{path}: lora_bias adapters are not supported")
    if "r" not in raw or "target_modules" not in raw:
        raise AdapterError(f"{path}: needs 'r' and 'target_modules'")
    try:
        config = LoraConfig(
            r=int(raw["r"]), lora_alpha=float(raw.get("lora_alpha", raw["r"])),
            lora_dropout=float(raw.get("lora_dropout") or 0.0), target_modules=raw["target_modules"],
            use_rslora=bool(raw.get("use_rslora", False)), use_dora=bool(raw.get("use_dora", False)),
            rank_pattern=dict(raw.get("rank_pattern") or {}), alpha_pattern=dict(raw.get("alpha_pattern") or {}))
    except (TypeError, ValueError) as exc:
        raise AdapterError(f"{path}: {exc}") from exc
    return config, raw


def read_adapter(adapter_dir: str | os.PathLike, dtype: torch.dtype | None = torch.float32) -> Adapter:
    """Parse an adapter directory: config fields, tensor names, per-module completeness and rank."""
    root = Path(adapter_dir)
    if not root.is_dir():
        raise AdapterError(f"{root}: adapter directory does not exist")
    config, raw = _read_config(root / CONFIG_FILE)
    weights = root / WEIGHTS_FILE
    if not weights.is_file():
        pickles = [p.name for p in root.glob("*.bin")] + [p.name for p in root.glob("*.pt")]
        hint = (f" (found {', '.join(pickles)}: Ember never unpickles; re-save with safetensors)" if pickles else "")
        raise AdapterError(f"{weights}: missing{hint}")
    adapter = Adapter(root, config, raw.get("base_model_name_or_path"))
    try:
        handle = safe_open(str(weights), framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises several error types for a corrupt file
        raise AdapterError(f"{weights}: not a readable safetensors file ({exc})") from exc
    with handle:
        for key in handle.keys():
            module_path, suffix = _split_key(key, weights)
            tensor = handle.get_tensor(key)
            adapter.tensors.setdefault(module_path, {})[suffix] = tensor.to(dtype) if dtype else tensor
    if not adapter.tensors:
        raise AdapterError(f"{weights}: holds no tensors")
    for module_path, parts in adapter.tensors.items():
        _check_module(adapter, module_path, parts)
    return adapter


def _split_key(key: str, weights: Path) -> tuple[str, str]:
    if not key.startswith(PREFIX):
        raise AdapterError(f"{weights}: tensor {key!r} does not start with {PREFIX!r} (not a PEFT adapter key)")
    body = key[len(PREFIX):]
    for alias, suffix in SUFFIX_ALIASES.items():
        if body.endswith("." + alias):
            return body[: -len(alias) - 1], suffix
    for suffix in SUFFIXES:
        if body.endswith("." + suffix):
            return body[: -len(suffix) - 1], suffix
    raise AdapterError(f"{weights}: tensor {key!r} is not a LoRA tensor (expected a name ending in "
                       f"{', '.join(SUFFIXES)}); embedding adapters and extra modules are not supported")


def _check_module(adapter: Adapter, module_path: str, parts: dict[str, torch.Tensor]) -> None:
    weights, config = adapter.weights_file, adapter.config
    for needed in ("lora_A.weight", "lora_B.weight"):
        if needed not in parts:
            raise AdapterError(f"{weights}: {module_path} has no {needed}")
    a, b = parts["lora_A.weight"], parts["lora_B.weight"]
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise AdapterError(f"{weights}: {module_path}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                           "are not [r, in] and [out, r] of one rank")
    want_r, _ = config.rank_and_alpha(module_path)
    if a.shape[0] != want_r:
        raise AdapterError(f"{weights}: {module_path} has rank {a.shape[0]} but {CONFIG_FILE} says r={want_r}")
    if config.use_dora:
        mag = parts.get("lora_magnitude_vector")
        if mag is None:
            raise AdapterError(f"{weights}: {module_path} has no lora_magnitude_vector but use_dora is true")
        if tuple(mag.shape) != (b.shape[0],):
            raise AdapterError(f"{weights}: {module_path}.lora_magnitude_vector has shape {tuple(mag.shape)}, "
                               f"expected ({b.shape[0]},)")
    elif "lora_magnitude_vector" in parts:
        raise AdapterError(f"{weights}: {module_path} has a lora_magnitude_vector but use_dora is false "
                           f"in {CONFIG_FILE}")


def validate_adapter(adapter: Adapter, model: nn.Module) -> None:
    """Check that every adapter module exists in the model, is a target, and has matching shapes."""
    modules = dict(model.named_modules())
    weights = adapter.weights_file
    for module_path, parts in adapter.tensors.items():
        layer = modules.get(module_path)
        if isinstance(layer, LoraLinear):
            layer = layer.base_layer
        if layer is None or not is_linear(layer):
            raise AdapterError(f"{weights}: module {module_path!r} is not a linear layer of this model "
                               "(adapter trained for a different architecture?)")
        if not adapter.config.matches(module_path):
            raise AdapterError(f"{weights}: module {module_path!r} is not in target_modules "
                               f"{adapter.config.target_modules!r} of {CONFIG_FILE}")
        a, b = parts["lora_A.weight"], parts["lora_B.weight"]
        if a.shape[1] != layer.in_features or b.shape[0] != layer.out_features:
            raise AdapterError(
                f"{weights}: {module_path}: adapter expects a layer {a.shape[1]} -> {b.shape[0]}, the model's is "
                f"{layer.in_features} -> {layer.out_features} (adapter trained on a different base model?)")


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike,
                 dtype: torch.dtype = torch.float32) -> Adapter:
    """Read, validate and inject an adapter into a model without adapters; returns the parsed Adapter."""
    adapter = read_adapter(adapter_dir, dtype)
    if any(True for _ in lora_modules(model)):
        raise AdapterError(f"{adapter.path}: the model already has adapters; load into a fresh base model")
    validate_adapter(adapter, model)
    # Wrap exactly the modules the file holds (layers_to_transform may have left some targets out).
    for path in adapter.tensors:
        wrap_linear(model, path, adapter.config, dtype)
    with torch.no_grad():
        for path, module in lora_modules(model):
            parts = adapter.tensors[path]
            module.lora_A.weight.copy_(parts["lora_A.weight"])
            module.lora_B.weight.copy_(parts["lora_B.weight"])
            if module.use_dora:
                module.lora_magnitude_vector.copy_(parts["lora_magnitude_vector"])
    return adapter
