"""GPTQ: weight-only quantization that corrects each column's rounding error on the columns not yet
quantized, using second-order statistics of the layer's inputs (Frantar et al., 2022,
"GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers").

Same formats as round-to-nearest (engine/quant.py, layouts in engine/kernels/quant_matmul.py): only
the choice of codes differs, so GPTQ checkpoints load and run with the same kernels.

For a linear layer y = x W^T with calibration inputs X, GPTQ minimises ||X W^T - X Q^T||^2 column by
column. With H = X^T X (damped), quantizing column j leaves an error e_j that is spread over the
columns k > j as W[:, k] -= e_j * Hinv[j, k] / Hinv[j, j], where Hinv is the upper Cholesky factor of
H^-1; updates are applied lazily, block by block. int4 group scales are taken when the quantizer
reaches a group's first column, from the weights as updated so far (static groups, natural column
order); int8 scales are the per-row round-to-nearest ones.

Simplification: the statistics H of every layer are gathered from the unquantized model in one pass
(not re-gathered after each layer is quantized), which is enough for small and mid-size models.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from engine.kernels.quant_matmul import pack_int4

BLOCK = 128  # columns updated eagerly; a multiple of every int4 group size
DAMP = 0.01  # damping added to H's diagonal, as a fraction of its mean


@torch.no_grad()
def input_hessians(model: nn.Module, names: list[str], batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """H = X^T X / rows (fp32 [K, K]) of each named linear layer's inputs over the calibration batches."""
    stats: dict[str, list] = {}
    hooks = []
    for name in names:
        layer = model.get_submodule(name)
        stats[name] = [torch.zeros(layer.in_features, layer.in_features, device=layer.weight.device), 0]

        def hook(mod, args, out, entry=stats[name]):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            entry[0].addmm_(x.T, x)
            entry[1] += x.shape[0]

        hooks.append(layer.register_forward_hook(hook))
    try:
        for ids in batches:
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    return {name: h / max(rows, 1) for name, (h, rows) in stats.items()}


def _upper_inverse_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1 (so H^-1 = U^T U)."""
    h = h.clone()
    h.diagonal().add_(damp * h.diagonal().mean().clamp(min=1e-8))
    inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inv, upper=True)


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int | None,
                  scale_dtype: torch.dtype, damp: float = DAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize W [N, K] against its input statistics H [K, K].

    Returns what QuantLinear stores: int8 codes [N, K] and scales [N] (8-bit), or packed int4 codes
    [N, K/2] and group scales [N, K/G] (4-bit), scales in scale_dtype (codes rounded against them).
    """
    w = weight.detach().float().clone()
    n, k = w.shape
    h = hessian.float().clone()
    dead = h.diagonal() == 0  # inputs that never fire: their weights cannot matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    u = _upper_inverse_factor(h, damp)
    if bits == 8:
        qmin, qmax = -127, 127
        scales = (w.abs().amax(dim=1).clamp(min=1e-8) / 127.0).to(scale_dtype)
        col_scale = scales.float()  # [N], the same for every column
    else:
        if group_size is None or k % group_size or BLOCK % group_size:
            raise ValueError(f"group size {group_size} must divide {k} and {BLOCK}")
        qmin, qmax = -8, 7
        scales = torch.empty(n, k // group_size, dtype=scale_dtype, device=w.device)
    codes = torch.empty(n, k, dtype=torch.int8, device=w.device)
    for b0 in range(0, k, BLOCK):
        b1 = min(b0 + BLOCK, k)
        block = w[:, b0:b1]  # a view: updated in place
        errs = torch.empty_like(block)
        for i in range(b1 - b0):
            col = b0 + i
            if bits == 4 and col % group_size == 0:
                g = col // group_size
                scales[:, g] = (block[:, i:i + group_size].abs().amax(dim=1).clamp(min=1e-8) / 7.0).to(scale_dtype)
                col_scale = scales[:, g].float()
            q = torch.round(block[:, i] / col_scale).clamp(qmin, qmax)
            codes[:, col] = q.to(torch.int8)
            err = (block[:, i] - q * col_scale) / u[col, col]
            block[:, i:] -= err[:, None] * u[col, col:b1][None, :]
            errs[:, i] = err
        w[:, b1:] -= errs @ u[b0:b1, b1:]
    if bits == 8:
        return codes, scales
    return pack_int4((codes.to(torch.int16) + 8).to(torch.uint8), group_size), scales
