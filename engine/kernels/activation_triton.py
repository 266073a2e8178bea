"""Triton SwiGLU (see activation.py): each program handles BLOCK columns of one row."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels._triton_util import INTERPRET


@triton.jit
def _silu_and_mul_kernel(x_ptr, delta_ptr, out_ptr, n_cols, stride_x, stride_d, stride_o, HAS_DELTA: tl.constexpr,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    u = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0)
    if HAS_DELTA:  # x + delta, rounded to the activation dtype like the projection's own output
        g = (g.to(tl.float32) + tl.load(delta_ptr + row * stride_d + cols, mask=mask, other=0.0).to(tl.float32))
        u = (u.to(tl.float32) + tl.load(delta_ptr + row * stride_d + n_cols + cols, mask=mask, other=0.0)
             .to(tl.float32))
        g, u = g.to(x_ptr.dtype.element_ty), u.to(x_ptr.dtype.element_ty)
    g, u = g.to(tl.float32), u.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (act * u).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul_triton(x: torch.Tensor, delta: torch.Tensor | None = None) -> torch.Tensor:
    """[..., 2I] (+ delta of the same shape) -> [..., I]."""
    n = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * n)
    assert x2.stride(-1) == 1
    d2 = x2 if delta is None else delta.reshape(-1, 2 * n)  # an unused pointer without a delta
    assert d2.shape == x2.shape and d2.stride(-1) == 1 and d2.dtype == x2.dtype
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    out2 = out.view(-1, n)
    if x2.shape[0] == 0:
        return out
    block = triton.next_power_of_2(n) if INTERPRET else min(1024, triton.next_power_of_2(n))
    _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(n, block))](
        x2, d2, out2, n, x2.stride(0), d2.stride(0), out2.stride(0), HAS_DELTA=delta is not None, BLOCK=block,
        num_warps=4
    )
    return out
