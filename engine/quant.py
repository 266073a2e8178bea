"""Weight-only int8 / int4 quantization of a built model, and offline checkpoint conversion.

Quantization is a transform on a built model: every nn.Linear (except those named in
`modules_to_not_convert`, by default lm_head) is replaced, under the same name, by a QuantLinear.
A quantized layer's state dict holds

    <name>.qweight   int8 [out, in] (8-bit) or uint8 [out, in/2] (4-bit, two codes a byte)
    <name>.scales    [out] (8-bit, per output channel) or [out, in/group_size] (4-bit), model dtype
    <name>.bias      unchanged, when the layer has one

with the code layouts documented in engine/kernels/quant_matmul.py (symmetric; codes chosen by
round-to-nearest, or by GPTQ against a calibration text: engine/gptq.py).
A quantized checkpoint is a normal Hugging Face directory whose config.json carries

    "quantization_config": {
        "quant_method": "ember",        # this format
        "bits": 4,                      # 4 or 8
        "group_size": 128,              # 32, 64 or 128 for 4-bit; null for 8-bit (per channel)
        "symmetric": true,              # codes stand for c - 8 (4-bit) or c (8-bit), no zero points
        "modules_to_not_convert": ["lm_head"],  # left in floating point (names or name suffixes)
        "overrides": {"lm_head": {"bits": 8, "group_size": null}},  # optional: another scheme for
                                        # these layers (names or name suffixes, as above)
        "algorithm": "rtn",             # how the codes were chosen ("rtn" or "gptq"); informational
        "norms_folded": true            # the layer norms' weights were folded into the projections
    }                                   # before quantizing (their weights are 1); informational

Folding the norms first (engine/norm_folding.fold_norm_weights; `ember quantize` does it unless
told not to) leaves the same function and lets `ember serve` run the quantized layers without
norm kernels (engine/norm_folding.py).

engine/checkpoint.load_model calls apply_quantization(model, config) on the empty model before
filling in the tensors; `ember quantize` runs quantize_checkpoint.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.kernels.quant_matmul import (
    INT4_GROUP_SIZES,
    dequantize_int4,
    dequantize_int8,
    int4_matmul,
    int8_matmul,
    quantize_int4,
    quantize_int8,
)

QUANT_METHOD = "ember"
DEFAULT_SKIP = ("lm_head",)


class QuantLinear(nn.Module):
    """A linear layer with int8 (per-channel) or int4 (group-wise) weights; drop-in for nn.Linear."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None = None,
                 bias: bool = False, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        bits, group_size = _scheme_of(bits, group_size)
        if bits == 4 and in_features % group_size:
            raise ValueError(f"in_features {in_features} is not a multiple of the group size {group_size}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        if bits == 8:
            qshape, sshape, qdtype = (out_features, in_features), (out_features,), torch.int8
        else:
            qshape, qdtype = (out_features, in_features // 2), torch.uint8
            sshape = (out_features, in_features // group_size)
        self.register_buffer("qweight", torch.zeros(qshape, dtype=qdtype, device=device))
        self.register_buffer("scales", torch.ones(sshape, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int | None = None,
                    codes: tuple[torch.Tensor, torch.Tensor] | None = None) -> "QuantLinear":
        """Quantize a dense layer; scales take the layer's dtype. `codes` (qweight, scales) chosen
        elsewhere (GPTQ) are stored as given; by default they are rounded to nearest."""
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, bits, group_size, linear.bias is not None,
                    dtype=w.dtype, device=w.device)
        if w.device.type != "meta":
            if codes is None:
                codes = quantize_int8(w, w.dtype) if bits == 8 else quantize_int4(w, group_size, w.dtype)
            q, s = codes
            layer.qweight.copy_(q)
            layer.scales.copy_(s)
            if linear.bias is not None:
                layer.bias.data.copy_(linear.bias.detach())
        return layer

    def dequantize(self) -> torch.Tensor:
        """The dense [out, in] weight this layer multiplies by, in the scales' dtype."""
        dequantize = dequantize_int8 if self.bits == 8 else dequantize_int4
        return dequantize(self.qweight, self.scales, self.scales.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """Dequantized dense weight, rebuilt on each access (for merges and inspection, not the hot path)."""
        return self.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x)

    def forward_add_(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out += self(x) in place (rounded once, in the kernel's epilogue); returns out."""
        return self._matmul(x, accumulate=out)

    def _matmul(self, x: torch.Tensor, accumulate: torch.Tensor | None = None) -> torch.Tensor:
        matmul = int8_matmul if self.bits == 8 else int4_matmul
        return matmul(x, self.qweight, self.scales, self.bias, accumulate=accumulate)

    def extra_repr(self) -> str:
        scheme = "int8 per-channel" if self.bits == 8 else f"int4 group {self.group_size}"
        return f"in_features={self.in_features}, out_features={self.out_features}, {scheme}, bias={self.bias is not None}"


Scheme = tuple[int, int | None]  # (bits, group size or None)


def _scheme_of(bits: int, group_size: int | None) -> Scheme:
    """(bits, group size), checked; the group size is None for 8 bits (per-channel scales)."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if bits == 4 and group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"4-bit group size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    return bits, group_size if bits == 4 else None


def _skipped(name: str, skip: tuple[str, ...] | list[str]) -> bool:
    return any(name == s or name.endswith("." + s) or name.startswith(s + ".") for s in skip)


def _check_overrides(overrides: dict[str, dict[str, Any]] | None) -> dict[str, Scheme]:
    """{name or suffix: {"bits", "group_size"}} -> {name or suffix: (bits, group_size)}, checked."""
    checked = {}
    for key, entry in (overrides or {}).items():
        if not isinstance(entry, dict) or "bits" not in entry:
            raise ValueError(f"quantization override for {key!r} must be an object with \"bits\" "
                             f"(and \"group_size\" for 4 bits), got {entry!r}")
        checked[key] = _scheme_of(int(entry["bits"]), entry.get("group_size"))
    return checked


def _scheme(name: str, default: Scheme, overrides: dict[str, Scheme]) -> Scheme:
    return next((s for key, s in overrides.items() if _skipped(name, (key,))), default)


def _convertible(model: nn.Module, default: Scheme, overrides: dict[str, Scheme],
                 skip: list[str]) -> list[tuple[str, Scheme]]:
    """(name, scheme) of the nn.Linear layers to convert; layers whose width does not fit their groups
    join `skip`."""
    linears = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    unmatched = [key for key in overrides if not any(_skipped(name, (key,)) for name, _ in linears)]
    if unmatched:
        raise ValueError(f"quantization overrides {unmatched} match no linear layer of the model "
                         "(keys are layer names or name suffixes, e.g. \"lm_head\" or \"mlp.down_proj\")")
    layers = []
    for name, module in linears:
        if _skipped(name, skip):
            continue
        bits, group_size = scheme = _scheme(name, default, overrides)
        if bits == 4 and module.in_features % group_size:
            skip.append(name)
            continue
        layers.append((name, scheme))
    return layers


def _check_fusable(model: nn.Module, plan: list[tuple[str, Scheme]]) -> None:
    """The projections the server fuses (engine/fusion.py) must get one scheme (or all stay dense)."""
    from engine.fusion import PACKED_PROJECTIONS  # (fusion imports this module)

    schemes = dict(plan)
    for name, module in model.named_modules():
        for group in PACKED_PROJECTIONS.values():
            if not all(isinstance(getattr(module, leaf, None), nn.Linear) for leaf in group):
                continue
            names = [f"{name}.{leaf}" if name else leaf for leaf in group]
            got = [schemes.get(n) for n in names]
            if len(set(got)) > 1:
                described = ", ".join(f"{n}: {_describe(g)}" for n, g in zip(names, got))
                raise ValueError(f"{described}: the server runs these as one matmul, so they need the same "
                                 "scheme (check overrides and modules_to_not_convert)")


def _describe(scheme: Scheme | None) -> str:
    if scheme is None:
        return "not quantized"
    bits, group_size = scheme
    return f"int{bits}" + (f" group {group_size}" if group_size else "")


def _replace(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, layer)


def _swap(model: nn.Module, default: Scheme, overrides: dict[str, Scheme], skip: list[str]) -> list[str]:
    """Replace every convertible nn.Linear in place (round to nearest); returns the converted names."""
    layers = _convertible(model, default, overrides, skip)
    _check_fusable(model, layers)
    for name, (bits, group_size) in layers:
        _replace(model, name, QuantLinear.from_linear(model.get_submodule(name), bits, group_size))
    return [name for name, _ in layers]


GPTQ_HESSIAN_BYTES = 2 << 30  # input statistics gathered per calibration pass (layers are done in groups)


def _swap_gptq(model: nn.Module, default: Scheme, overrides: dict[str, Scheme], skip: list[str],
               batches: list[torch.Tensor]) -> list[str]:
    """As _swap, with GPTQ codes from the calibration batches (engine/gptq.py)."""
    from engine.gptq import gptq_quantize, input_hessians

    layers = _convertible(model, default, overrides, skip)
    _check_fusable(model, layers)
    schemes = dict(layers)
    groups: list[list[str]] = [[]]
    used = 0
    for name in schemes:  # as many layers a pass as their [K, K] statistics allow
        size = model.get_submodule(name).in_features ** 2 * 4
        if groups[-1] and used + size > GPTQ_HESSIAN_BYTES:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    for group in groups:
        hessians = input_hessians(model, group, batches)
        for name in group:
            linear = model.get_submodule(name)
            bits, group_size = schemes[name]
            codes = gptq_quantize(linear.weight, hessians.pop(name), bits, group_size, linear.weight.dtype)
            _replace(model, name, QuantLinear.from_linear(linear, bits, group_size, codes))
    return list(schemes)


def quantize_model(model: nn.Module, bits: int, group_size: int | None = 128,
                   modules_to_not_convert: tuple[str, ...] | list[str] = DEFAULT_SKIP,
                   calibration: list[torch.Tensor] | None = None, fold_norms: bool = False,
                   overrides: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Quantize `model`'s linear layers in place; returns its quantization_config.

    Round to nearest, or GPTQ when `calibration` (token-id batches [B, T] on the model's device) is given.
    fold_norms first moves the layer norms' weights into the projections that read them. `overrides`
    ({name or suffix: {"bits", "group_size"}}) gives some layers another scheme, e.g. an int8 head.
    """
    bits, group_size = _scheme_of(bits, group_size)
    schemes = _check_overrides(overrides)
    skip = list(modules_to_not_convert)
    if fold_norms:
        from engine.norm_folding import fold_norm_weights

        fold_norm_weights(model)
    with torch.no_grad():
        if calibration:
            _swap_gptq(model, (bits, group_size), schemes, skip, calibration)
        else:
            _swap(model, (bits, group_size), schemes, skip)
    qcfg = {"quant_method": QUANT_METHOD, "bits": bits, "group_size": group_size, "symmetric": True,
            "modules_to_not_convert": skip, "algorithm": "gptq" if calibration else "rtn", "norms_folded": fold_norms}
    if schemes:
        qcfg["overrides"] = {key: {"bits": b, "group_size": g} for key, (b, g) in schemes.items()}
    return qcfg


def prepare_cpu_layers(model: nn.Module) -> int:
    """Build, ahead of the first request, what the CPU kernels of engine/kernels/quant_matmul_cpu.py
    would otherwise build on first use: int4 layers' CPU packs (about 0.1 s per 16M weights) and
    aligned copies of int8 weights mapped off alignment. Returns the number of layers prepared."""
    from engine.kernels import quant_matmul_cpu as qcpu

    if not qcpu.cpu_kernels_available():
        return 0
    count = 0
    for layer in model.modules():
        if not isinstance(layer, QuantLinear) or layer.qweight.device.type != "cpu":
            continue
        if layer.bits == 4 and qcpu.int4_packable(layer.qweight):
            qcpu.int4_cpu_pack(layer.qweight, layer.scales, layer.scales.dtype)
            count += 1
        elif layer.bits == 8:
            qcpu.aligned_int8_weight(layer.qweight)
            count += 1
    return count


def apply_quantization(model: nn.Module, quantization_config: dict[str, Any]) -> list[str]:
    """Give `model` (typically still empty, on the meta device) the layer structure of a quantized
    checkpoint, so its qweight/scales tensors can be loaded. Returns the converted layer names."""
    method = quantization_config.get("quant_method", QUANT_METHOD)
    if method != QUANT_METHOD:
        raise ValueError(f"quantization_config.quant_method {method!r} is not supported; Ember reads {QUANT_METHOD!r} "
                         "checkpoints written by `ember quantize`")
    if not quantization_config.get("symmetric", True):
        raise ValueError("quantization_config.symmetric=false is not supported")
    default = _scheme_of(int(quantization_config.get("bits", 0)), quantization_config.get("group_size"))
    skip = list(quantization_config.get("modules_to_not_convert", DEFAULT_SKIP))
    return _swap(model, default, _check_overrides(quantization_config.get("overrides")), skip)


def calibration_batches(model_dir: str | os.PathLike, text_path: str | os.PathLike, samples: int, seq_len: int,
                        batch_size: int = 8, seed: int = 0) -> list[torch.Tensor]:
    """`samples` random windows of `seq_len` tokens from a text file, tokenized with the model's tokenizer."""
    from engine.tokenizer import Tokenizer

    path = Path(text_path)
    if not path.is_file():
        raise ValueError(f"calibration text {path} not found")
    ids = Tokenizer.from_dir(model_dir).encode(path.read_text(encoding="utf-8"), add_bos=False)
    if len(ids) < seq_len + 1:
        raise ValueError(f"calibration text {path} has {len(ids)} tokens; at least {seq_len + 1} are needed "
                         "(lower --calib-seq-len or give a longer text)")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len, (samples,), generator=gen).tolist()
    rows = torch.tensor([ids[s:s + seq_len] for s in starts])
    return list(rows.split(batch_size))


def quantize_checkpoint(model_dir: str | os.PathLike, out_dir: str | os.PathLike, bits: int,
                        group_size: int | None = 128, dtype: str | torch.dtype | None = None,
                        modules_to_not_convert: tuple[str, ...] | list[str] = DEFAULT_SKIP,
                        calibration_text: str | os.PathLike | None = None, calibration_samples: int = 128,
                        calibration_seq_len: int = 512, device: str = "cpu", fold_norms: bool = True,
                        overrides: dict[str, dict[str, Any]] | None = None) -> Path:
    """Read a floating-point checkpoint, quantize it (round to nearest, or GPTQ with a calibration text;
    norms folded first unless fold_norms is False; `overrides` as quantize_model's), write a quantized
    checkpoint (tokenizer included)."""
    from engine.checkpoint import load_config, load_model, save_model

    if Path(out_dir).resolve() == Path(model_dir).resolve():
        raise ValueError("--out must differ from --model")
    source_config = load_config(model_dir)
    calibration = None
    if calibration_text is not None:
        seq_len = min(calibration_seq_len, source_config.max_position_embeddings)
        calibration = [b.to(device) for b in calibration_batches(model_dir, calibration_text, calibration_samples,
                                                                 seq_len)]
    model, config = load_model(model_dir, dtype=dtype, device=device)
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError(f"{model_dir} is already quantized")
    if config.tie_word_embeddings and not _skipped("lm_head", modules_to_not_convert):
        # The head is quantized on its own: the checkpoint gets an untied copy (the embedding,
        # read one row a token, stays in floating point).
        model.lm_head.weight = nn.Parameter(model.model.embed_tokens.weight.detach().clone(), requires_grad=False)
        config = dataclasses.replace(config, tie_word_embeddings=False)
    if fold_norms:
        from engine.norm_folding import can_fold

        fold_norms = can_fold(model)  # dense, bias-free layers only (MoE or biased models stay as they are)
    qcfg = quantize_model(model, bits, group_size, modules_to_not_convert, calibration, fold_norms, overrides)
    return save_model(model.cpu(), config, out_dir, tokenizer_dir=model_dir,
                      extra_config={"quantization_config": qcfg})
