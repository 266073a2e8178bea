"""Triton SwiGLU (see activation.py): each program handles BLOCK columns of one row (and, with
HAS_RMS, first computes its row's RMS scale from the source row: a few KB, read from L2 by all
of the row's programs)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels._triton_util import INTERPRET, pdl_launch, wait_for_inputs
from engine.kernels.rmsnorm_triton import row_rms_scale


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, rms_ptr, n_cols, stride_x, stride_o, stride_rms, rms_cols, eps,
                         BLOCK: tl.constexpr, HAS_RMS: tl.constexpr, RMS_BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RMS:  # each product rounded to the activation dtype, as a normalized input's would be
        r = row_rms_scale(rms_ptr + row * stride_rms, rms_cols, eps, RMS_BLOCK)
        g = (g * r).to(x_ptr.dtype.element_ty).to(tl.float32)
        u = (u * r).to(x_ptr.dtype.element_ty).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (act * u).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul_triton(x: torch.Tensor, rms_source: torch.Tensor | None = None, eps: float = 0.0) -> torch.Tensor:
    """[..., 2I] -> [..., I]; rows first RMS-scaled by rms_source [..., d] when given."""
    n = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * n)
    src = x2 if rms_source is None else rms_source.reshape(x2.shape[0], -1)
    assert x2.stride(-1) == 1 and src.stride(-1) == 1
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    out2 = out.view(-1, n)
    if x2.shape[0] == 0:
        return out
    block = triton.next_power_of_2(n) if INTERPRET else min(1024, triton.next_power_of_2(n))
    _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(n, block))](
        x2, out2, src, n, x2.stride(0), out2.stride(0), src.stride(0), src.shape[-1], eps,
        BLOCK=block, HAS_RMS=rms_source is not None, RMS_BLOCK=triton.next_power_of_2(src.shape[-1]), num_warps=4,
        **pdl_launch(x.device),
    )
    return out
