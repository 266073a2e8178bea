"""The int4 kernel's bit trick: MAGIC + code built from bits equals the arithmetic value.

Checked without tl.dot, so bf16 is exact under the CPU interpreter too.
"""
from __future__ import annotations

import pytest
import torch

from engine.kernels.testing import require_backend

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from engine.kernels.quant_matmul_triton import _MAGIC, _codes_as  # noqa: E402


@triton.jit
def _probe(c_ptr, o_ptr, MAGIC: tl.constexpr, DT: tl.constexpr):
    i = tl.arange(0, 16)
    tl.store(o_ptr + i, _codes_as(tl.load(c_ptr + i), DT, MAGIC).to(tl.float32))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_codes_as_float(dtype, device):
    require_backend(device)
    tl_dtype = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[dtype]
    magic = _MAGIC.get(dtype, 0)
    codes = torch.randperm(16).to(torch.uint8).to(device)
    out = torch.full((16,), float("nan"), device=device)
    _probe[(1,)](codes, out, MAGIC=magic, DT=tl_dtype)
    assert torch.equal(out.cpu(), codes.float().cpu() + magic)
