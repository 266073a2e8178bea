"""Load and save checkpoints in the Hugging Face layout, safetensors only.

Loading builds the model on the meta device and fills it one tensor at a time from memory-mapped
safetensors files, so peak memory stays near one copy of the weights. Every problem (no config, an
unknown model type, pickle-only weights, a missing tensor, a wrong shape) raises one CheckpointError
that names the file and what to fix.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.config import ModelConfig
from engine.errors import CheckpointError
from engine.model import Transformer, rope_inv_freq

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_PATTERNS = ("pytorch_model*.bin", "*.bin", "*.pt", "*.pth", "*.ckpt")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "added_tokens.json")
# Buffers some exporters store; Ember recomputes them.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    key = str(name).replace("torch.", "")
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of float32, float16, bfloat16")
    return DTYPES[key]


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc


def load_config(model_dir: str | os.PathLike) -> ModelConfig:
    """Read `config.json` of a checkpoint directory into a ModelConfig."""
    root = Path(model_dir)
    if not root.is_dir():
        raise CheckpointError(f"{root}: checkpoint directory does not exist")
    path = root / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a checkpoint directory needs a Hugging Face config.json")
    raw = read_json(path)
    try:
        return ModelConfig.from_hf_dict(raw)
    except (ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


def weight_files(root: Path) -> list[Path]:
    """The safetensors files holding the weights, in index order; clear errors otherwise."""
    index = root / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: has no 'weight_map'")
        files = [root / name for name in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f}: listed in {INDEX_FILE} but missing")
        return files
    single = root / SINGLE_FILE
    if single.is_file():
        return [single]
    loose = sorted(root.glob("*.safetensors"))
    if loose:
        return loose
    pickles = sorted({p.name for pat in PICKLE_PATTERNS for p in root.glob(pat)})
    if pickles:
        raise CheckpointError(
            f"{root / pickles[0]}: only pickle weights found ({', '.join(pickles)}); Ember never unpickles "
            "checkpoints. Convert them to safetensors first, e.g. with transformers: "
            "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT, safe_serialization=True)"
        )
    raise CheckpointError(f"{root}: no weights found (expected {SINGLE_FILE} or {INDEX_FILE})")


def _set_tensor(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    old = getattr(module, leaf)
    if isinstance(old, torch.nn.Parameter):
        setattr(module, leaf, torch.nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        module.register_buffer(leaf, value)


def load_model(model_dir: str | os.PathLike, dtype: str | torch.dtype | None = None,
               device: str | torch.device = "cpu") -> tuple[Transformer, ModelConfig]:
    """Load a Hugging Face layout checkpoint into Ember's Transformer (eval mode)."""
    root = Path(model_dir)
    config = load_config(root)
    raw = read_json(root / "config.json")
    files = weight_files(root)
    target = parse_dtype(dtype) or parse_dtype(config.torch_dtype) or torch.float32
    with torch.device("meta"):
        model = Transformer(config)
    quant_cfg = raw.get("quantization_config")
    if quant_cfg:
        from engine.quant import apply_quantization  # only quantized checkpoints need it

        apply_quantization(model, quant_cfg)
    expected = dict(model.state_dict(keep_vars=True))
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    seen: set[str] = set()
    for path in files:
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
        with handle:
            for name in handle.keys():
                if name.endswith(IGNORED_SUFFIXES) or (config.tie_word_embeddings and name == "lm_head.weight"):
                    continue
                if name not in expected:
                    raise CheckpointError(f"{path}: unexpected tensor {name!r} for a {config.model_type} model "
                                          "with this config.json")
                tensor = handle.get_tensor(name)
                want = tuple(expected[name].shape)
                if tuple(tensor.shape) != want:
                    raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                          f"config.json implies {want}")
                if tensor.is_floating_point() and expected[name].is_floating_point():
                    tensor = tensor.to(target)
                _set_tensor(model, name, tensor.to(device))
                seen.add(name)
    missing = [n for n in expected if n not in seen]
    if missing:
        where = files[0] if len(files) == 1 else root / INDEX_FILE
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{where}: missing tensor(s) {shown}")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(config).to(device)
    model.eval()
    return model, config


def _dtype_name(model: torch.nn.Module) -> str:
    for p in model.parameters():
        if p.is_floating_point():
            return str(p.dtype).replace("torch.", "")
    return "float32"


def save_model(model: Transformer, config: ModelConfig, out_dir: str | os.PathLike,
               tokenizer_dir: str | os.PathLike | None = None, max_shard_bytes: int = 4 << 30,
               extra_config: dict[str, Any] | None = None) -> Path:
    """Write config.json, generation_config.json and safetensors weights (sharded past max_shard_bytes)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    shards = _split_shards(state, max_shard_bytes)
    for stale in list(out.glob("model*.safetensors")) + [out / INDEX_FILE]:
        if stale.exists():
            stale.unlink()
    if len(shards) == 1:
        save_file(shards[0], str(out / SINGLE_FILE), metadata={"format": "pt"})
    else:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            total += sum(t.numel() * t.element_size() for t in shard.values())
        _write_json(out / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
    cfg = config.to_hf_dict()
    cfg["torch_dtype"] = _dtype_name(model)
    cfg.update(extra_config or {})
    _write_json(out / "config.json", cfg)
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    if config.pad_token_id is not None:
        gen["pad_token_id"] = config.pad_token_id
    _write_json(out / "generation_config.json", gen)
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, out)
    return out


def _split_shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike,
                         names: Iterable[str] = TOKENIZER_FILES) -> None:
    """Copy whichever tokenizer files exist in src into dst."""
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        return
    for name in names:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
