"""Helpers for kernel parity tests and benchmarks: random paged batches and error checks.

CPU cases run the Triton kernels under the interpreter (TRITON_INTERPRET=1 must be set before
triton is imported); GPU cases use CUDA. Nothing here is used on the serving path.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


def require_backend(device: str) -> None:
    """In a pytest run, skip unless Triton can run on `device` (CUDA, or the CPU interpreter)."""
    import pytest

    pytest.importorskip("triton")
    if device == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("needs CUDA")
    elif os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU Triton needs TRITON_INTERPRET=1 set before triton is imported")


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    """Max abs error relative to the reference's scale; NaN anywhere fails."""
    assert torch.isfinite(actual).all(), "non-finite values in kernel output"
    err = (actual.double() - expected.double()).abs().max().item()
    ref_scale = expected.double().abs().max().item() + 1e-6
    assert err <= tol * ref_scale, f"max abs err {err:.3e} > {tol} x {ref_scale:.3e}"


@dataclass
class PagedBatch:
    """A random varlen batch over a paged cache whose blocks are scattered and shuffled."""

    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    keys: list[torch.Tensor]  # per sequence [L, Hkv, D], contiguous, for an independent reference
    values: list[torch.Tensor]


def make_paged_batch(q_lens, ctx_lens, hq, hkv, d, page, dtype, device, poison=True) -> PagedBatch:
    """Fill a cache whose unused slots are NaN, so any read past a context shows up."""
    per_seq = [-(-c // page) for c in ctx_lens]
    max_blocks = max(per_seq + [1]) + 2
    num_blocks = sum(per_seq) + 5
    fill = float("nan") if poison else 0.0
    k_cache = torch.full((num_blocks, page, hkv, d), fill, dtype=dtype, device=device)
    v_cache = torch.full_like(k_cache, fill)
    perm = torch.randperm(num_blocks, device=device).to(torch.int32)  # not contiguous, not sorted
    # Unused table entries point at (NaN) blocks too: the kernel must never follow them.
    block_tables = perm[torch.randint(0, num_blocks, (len(ctx_lens), max_blocks), device=device)].clone()
    keys, values, used = [], [], 0
    for s, ctx in enumerate(ctx_lens):
        block_tables[s, : per_seq[s]] = perm[used : used + per_seq[s]]
        used += per_seq[s]
        k = torch.randn(ctx, hkv, d, device=device).to(dtype)
        v = torch.randn(ctx, hkv, d, device=device).to(dtype)
        pos = torch.arange(ctx, device=device)
        blocks = block_tables[s, pos // page].long()
        k_cache[blocks, pos % page] = k
        v_cache[blocks, pos % page] = v
        keys.append(k)
        values.append(v)
    cu = torch.zeros(len(q_lens) + 1, dtype=torch.int32, device=device)
    cu[1:] = torch.cumsum(torch.tensor(q_lens, device=device), 0)
    q = torch.randn(int(sum(q_lens)), hq, d, device=device).to(dtype)
    return PagedBatch(q, k_cache, v_cache, block_tables, torch.tensor(ctx_lens, dtype=torch.int32, device=device),
                      cu, keys, values)
