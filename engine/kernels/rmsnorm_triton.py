"""Triton fused residual add + RMSNorm, one row per program (see rmsnorm.py for the semantics)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels._triton_util import pdl_launch, wait_for_inputs


@triton.jit
def row_rms_scale(src_ptr, n_cols, eps, BLOCK: tl.constexpr):
    """rsqrt(mean(row^2) + eps) of the n_cols values at src_ptr, in fp32."""
    cols = tl.arange(0, BLOCK)
    x = tl.load(src_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    return 1.0 / tl.sqrt(tl.sum(x * x, 0) / n_cols + eps)


@triton.jit
def _rmsnorm_kernel(
    x_ptr, r_ptr, w_ptr, out_ptr, res_out_ptr, eps, n_cols,
    stride_x, stride_r, stride_o, stride_ro,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)  # rounded like an unfused add
        tl.store(res_out_ptr + row * stride_ro + cols, x, mask=mask)
    h = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, 0) / n_cols + eps)
    normed = (h * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def rmsnorm_triton(
    x: torch.Tensor, w: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, new_residual) for x [..., H]; new_residual is x itself when no residual is given."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    assert x2.stride(-1) == 1 and w.is_contiguous()
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, w.dtype), device=x.device)
    out2 = out.view(-1, n)
    if residual is not None:
        r2 = residual.reshape(-1, n)
        new_res = torch.empty_like(x)
        res2 = new_res.view(-1, n)
    else:
        r2 = res2 = x2  # unused
        new_res = x
    rows = x2.shape[0]
    if rows == 0:
        return out, new_res
    block = triton.next_power_of_2(n)
    _rmsnorm_kernel[(rows,)](
        x2, r2, w, out2, res2, eps, n,
        x2.stride(0), r2.stride(0), out2.stride(0), res2.stride(0),
        HAS_RESIDUAL=residual is not None, BLOCK=block,
        num_warps=min(max(block // 512, 1), 16), **pdl_launch(x.device),
    )
    return out, new_res
