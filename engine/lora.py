"""LoRA and DoRA adapters: the math, a wrapper module around a linear layer, and one injection function.

LoRA adds a low-rank update to a frozen linear layer: y = W x + b + s * B A x, with A [r, in], B [out, r]
and s = alpha / r (alpha / sqrt(r) with rsLoRA). DoRA (Liu et al. 2024) also learns a magnitude vector m
[out] and rescales each output row of the adapted weight to it: W' = m * (W + s B A) / ||W + s B A||_row.
Following the paper (section 4.3) and `peft`, the row norm is treated as a constant: it is detached from
the gradient graph.

The math lives in plain functions (`lora_delta`, `delta_weight`, `dora_weight_norm`, `dora_output`) so a
batched serving path that gathers A, B and m per token can reuse them; `LoraLinear` composes them for one
adapter. The adapter files (PEFT layout) are read and written by `engine/adapter_io.py`.
"""
from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

# The projections of a Llama block, the modules the seed LoRA config targets.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALL_LINEAR = "all-linear"  # PEFT's shorthand: every linear layer except the output head


# ---------------------------------------------------------------------------------------------------------
# The math, as functions of tensors (reused by batched multi-adapter serving).
# ---------------------------------------------------------------------------------------------------------

def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """The factor s on B A: alpha / r, or alpha / sqrt(r) with rank-stabilised LoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def lora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """The adapter's output s * B A x: x [..., in], a [r, in], b [out, r] -> [..., out]."""
    return F.linear(F.linear(x, a), b) * scaling


def delta_weight(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """The dense update s * B A [out, in], computed in fp32 for accuracy and returned in fp32."""
    return (b.float() @ a.float()) * scaling


def dora_weight_norm(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Row norms ||W + dW|| [out] of the adapted weight, detached (a constant for the gradient, as in DoRA)."""
    return torch.linalg.norm(weight + delta, dim=1).to(weight.dtype).detach()


def dora_scale(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
               magnitude: torch.Tensor) -> torch.Tensor:
    """m / ||W + s B A||_row [out] (fp32): the per-row factor DoRA applies; constant for a loaded adapter,
    so serving can compute it once per adapter and use `dora_output` with weight_norm = m / factor."""
    weight = weight.float()
    return magnitude.float() / dora_weight_norm(weight, delta_weight(a, b, scaling))


def dora_output(base_out: torch.Tensor, lora_out: torch.Tensor, magnitude: torch.Tensor,
                weight_norm: torch.Tensor) -> torch.Tensor:
    """DoRA's addition to the base output: (m/n - 1) * W x + (m/n) * s B A x.

    base_out is W x without bias, lora_out is s B A x, both [..., out]; magnitude and weight_norm are [out].
    Adding the result to the base layer's output (bias included) gives m/n * (W + s B A) x + b.
    """
    scale = magnitude / weight_norm  # [out]
    return (scale - 1) * base_out + scale * lora_out


def is_quantized(layer: nn.Module) -> bool:
    """True for a bitsandbytes 4-bit layer (its weight carries a quant_state)."""
    return getattr(getattr(layer, "weight", None), "quant_state", None) is not None


def base_weight(layer: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense [out, in] weight of a linear layer; NF4/FP4 (bitsandbytes Linear4bit) weights are dequantized."""
    weight = layer.weight
    if getattr(weight, "quant_state", None) is not None:
        import bitsandbytes.functional as bnbf  # only quantized bases need it

        weight = bnbf.dequantize_4bit(weight.data, weight.quant_state)
    return weight if dtype is None else weight.to(dtype)


# ---------------------------------------------------------------------------------------------------------
# The configuration and the wrapper module.
# ---------------------------------------------------------------------------------------------------------

@dataclass
class LoraConfig:
    """Which layers get adapters and their shape; field names follow PEFT's adapter_config.json.

    target_modules is a list of module-name suffixes (`q_proj` matches `model.layers.3.self_attn.q_proj`),
    a single regular expression matched against the full module path, or "all-linear".
    rank_pattern / alpha_pattern override r / lora_alpha for modules whose path matches a key (as in PEFT).
    """

    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: list(DEFAULT_TARGETS))
    use_rslora: bool = False
    use_dora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if int(self.r) <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {self.r}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = sorted({str(t) for t in self.target_modules})
            if not self.target_modules:
                raise ValueError("target_modules is empty; name at least one module, e.g. q_proj")
        elif not isinstance(self.target_modules, str) or not self.target_modules:
            raise ValueError(f"target_modules must be a list of names or a regex string, got {self.target_modules!r}")
        for key, value in {**self.rank_pattern, **self.alpha_pattern}.items():
            if float(value) <= 0:
                raise ValueError(f"rank_pattern/alpha_pattern value for {key!r} must be positive, got {value}")

    def matches(self, path: str) -> bool:
        """Whether the module at `path` (e.g. model.layers.0.self_attn.q_proj) is a target."""
        if self.target_modules == ALL_LINEAR:
            return path != "lm_head"
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, path) is not None
        return any(path == t or path.endswith("." + t) for t in self.target_modules)

    def rank_and_alpha(self, path: str) -> tuple[int, float]:
        """(r, alpha) for one module, after rank_pattern / alpha_pattern."""
        return (int(_pattern_value(self.rank_pattern, path, self.r)),
                float(_pattern_value(self.alpha_pattern, path, self.lora_alpha)))


def _pattern_value(patterns: dict[str, float], path: str, default: float) -> float:
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


class LoraLinear(nn.Module):
    """A frozen linear layer plus a LoRA (or DoRA) update; `merge()` folds the update into the weight.

    Parameter names equal PEFT's saved names: `lora_A.weight` [r, in], `lora_B.weight` [out, r] and, for
    DoRA, `lora_magnitude_vector` [out]. The base layer (`base_layer`) may be an nn.Linear or a bitsandbytes
    Linear4bit. Adapter weights are kept in `adapter_dtype` (fp32 by default, as PEFT does for bf16 bases).
    """

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, use_dora: bool = False,
                 adapter_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.alpha, self.use_rslora, self.use_dora = int(r), float(alpha), use_rslora, use_dora
        self.scaling = lora_scaling(self.r, self.alpha, use_rslora)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = _device_of(base_layer)
        self.lora_A = nn.Linear(self.in_features, self.r, bias=False, device=device, dtype=adapter_dtype)
        self.lora_B = nn.Linear(self.r, self.out_features, bias=False, device=device, dtype=adapter_dtype)
        if use_dora:
            self.lora_magnitude_vector = nn.Parameter(torch.empty(self.out_features, device=device,
                                                                  dtype=adapter_dtype))
        self.merged = False
        self.enabled = True
        self._merged_norm: torch.Tensor | None = None
        self.reset_adapter()

    def reset_adapter(self) -> None:
        """Fresh adapter: A Kaiming-uniform (nn.Linear's default), B zero, so the layer starts as the base."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        if self.use_dora:
            self.reset_magnitude()

    @torch.no_grad()
    def reset_magnitude(self) -> None:
        """m = ||W + s B A||_row: with the current A, B the DoRA layer then equals the LoRA layer."""
        weight = base_weight(self.base_layer, torch.float32)
        norm = dora_weight_norm(weight, delta_weight(self.lora_A.weight, self.lora_B.weight, self.scaling))
        self.lora_magnitude_vector.copy_(norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged or not self.enabled:
            return result
        if not self.use_dora:
            # Under autocast the matmuls pick their own dtype; an fp32 copy of the activations would only cost memory.
            xa = x if torch.is_autocast_enabled(x.device.type) else x.to(self.lora_A.weight.dtype)
            out = lora_delta(self.lora_dropout(xa), self.lora_A.weight, self.lora_B.weight, self.scaling)
            return result + out.to(result.dtype)
        # DoRA's weight norms are taken in the adapter's dtype (fp32), as peft does.
        return result + self._dora_extra(x.to(self.lora_A.weight.dtype), result).to(result.dtype)

    def _dora_extra(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        weight = base_weight(self.base_layer, x.dtype)  # [out, in]
        delta = (self.lora_B.weight @ self.lora_A.weight).to(x.dtype) * self.scaling
        norm = dora_weight_norm(weight, delta.detach())
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            # Reuse the base output: W x is the result without its bias.
            bias = getattr(self.base_layer, "bias", None)
            base_out = result.to(x.dtype) - (bias.to(x.dtype) if bias is not None else 0)
        else:
            # With dropout, PEFT rescales W applied to the dropped-out input.
            x = self.lora_dropout(x)
            base_out = F.linear(x, weight)
        lora_out = lora_delta(x, self.lora_A.weight, self.lora_B.weight, self.scaling)
        return dora_output(base_out, lora_out, self.lora_magnitude_vector.to(x.dtype), norm)

    def merged_weight(self) -> torch.Tensor:
        """The dense weight the adapter amounts to, in fp32: W + s B A, or DoRA's m * (W + s B A) / ||.||."""
        weight = base_weight(self.base_layer, torch.float32)
        merged = weight + delta_weight(self.lora_A.weight, self.lora_B.weight, self.scaling)
        if self.use_dora:
            norm = dora_weight_norm(weight, merged - weight)
            merged = merged * (self.lora_magnitude_vector.float() / norm).unsqueeze(1)
        return merged

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight in place (the forward then skips the adapter)."""
        if self.merged:
            return
        if is_quantized(self.base_layer) or not isinstance(self.base_layer, nn.Linear):
            raise TypeError(f"cannot merge into a {type(self.base_layer).__name__} in place; "
                            "merge into a full-precision base instead (merge_adapters on a dense model)")
        weight = self.base_layer.weight
        if self.use_dora:  # unmerge needs the norm of the unmerged weight
            self._merged_norm = dora_weight_norm(weight.float(), delta_weight(
                self.lora_A.weight, self.lora_B.weight, self.scaling))
        weight.copy_(self.merged_weight().to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge()` (exact up to rounding in the weight's dtype)."""
        if not self.merged:
            return
        weight = self.base_layer.weight
        delta = delta_weight(self.lora_A.weight, self.lora_B.weight, self.scaling)
        restored = weight.float()
        if self.use_dora:
            restored = restored / (self.lora_magnitude_vector.float() / self._merged_norm).unsqueeze(1)
            self._merged_norm = None
        weight.copy_((restored - delta).to(weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        kind = "dora" if self.use_dora else "lora"
        return f"{kind}: r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}"


def _device_of(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------------------
# Transforms on a built model.
# ---------------------------------------------------------------------------------------------------------

def is_linear(module: nn.Module) -> bool:
    """nn.Linear or a bitsandbytes 4-bit/8-bit linear (anything with in/out features and a weight)."""
    return isinstance(module, nn.Linear) or (
        hasattr(module, "in_features") and hasattr(module, "out_features") and hasattr(module, "weight")
        and not isinstance(module, LoraLinear))


def inject_adapters(model: nn.Module, config: LoraConfig, adapter_dtype: torch.dtype = torch.float32) -> list[str]:
    """Wrap every targeted linear layer of `model` in a LoraLinear, in place; returns the wrapped paths.

    Raises ValueError naming the available linear layers when no module matches the targets.
    """
    if any(True for _ in lora_modules(model)):
        raise ValueError("the model already has adapters; merge them (merge_adapters) or start from the base")
    targets = [(path, mod) for path, mod in model.named_modules()
               if path and is_linear(mod) and config.matches(path)]
    if not targets:
        names = sorted({p.rsplit(".", 1)[-1] for p, m in model.named_modules() if p and is_linear(m)})
        raise ValueError(f"no linear layer matches target_modules {config.target_modules!r}; "
                         f"this model's linear layers are named {', '.join(names)}")
    for path, _ in targets:
        wrap_linear(model, path, config, adapter_dtype)
    return [path for path, _ in targets]


def wrap_linear(model: nn.Module, path: str, config: LoraConfig,
                adapter_dtype: torch.dtype = torch.float32) -> LoraLinear:
    """Replace the linear layer at `path` by a LoraLinear around it (rank/alpha from the config)."""
    r, alpha = config.rank_and_alpha(path)
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    wrapper = LoraLinear(getattr(parent, leaf), r, alpha, config.lora_dropout, config.use_rslora,
                         config.use_dora, adapter_dtype)
    setattr(parent, leaf, wrapper)
    return wrapper


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    """(path, module) for every LoraLinear in the model; the path is the wrapped layer's original name."""
    for path, module in model.named_modules():
        if isinstance(module, LoraLinear):
            yield path, module


def mark_only_adapters_trainable(model: nn.Module) -> int:
    """Freeze everything but the adapter parameters; returns the number of trainable parameters."""
    count = 0
    for name, param in model.named_parameters():
        trainable = ".lora_" in name
        param.requires_grad_(trainable)
        count += param.numel() if trainable else 0
    return count


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors keyed by module path + PEFT suffix (lora_A.weight, lora_B.weight, ...)."""
    return {name: p.detach() for name, p in model.named_parameters() if ".lora_" in name}


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model alone inside the block (e.g. the DPO reference); adapters come back after."""
    modules = [m for _, m in lora_modules(model)]
    if any(m.merged for m in modules):
        raise RuntimeError("adapters are merged into the weights; unmerge them before disabling")
    previous = [m.enabled for m in modules]
    for m in modules:
        m.enabled = False
    try:
        yield
    finally:
        for m, flag in zip(modules, previous):
            m.enabled = flag


@torch.no_grad()
def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into its layer and put plain nn.Linear layers back (in place; returns model).

    A quantized base layer becomes a dense nn.Linear holding the dequantized, merged weight.
    """
    for path, module in list(lora_modules(model)):
        base = module.base_layer
        if isinstance(base, nn.Linear) and not is_quantized(base):
            module.merge()
            dense = base
        else:
            dense = nn.Linear(module.in_features, module.out_features, bias=base.bias is not None,
                              device=_device_of(module.lora_A), dtype=module.lora_A.weight.dtype)
            dense.weight.copy_(module.merged_weight())
            if base.bias is not None:
                dense.bias.copy_(base.bias)
        parent_path, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, leaf, dense)
    return model
