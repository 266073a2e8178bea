"""Writing this step's keys and values into the paged KV cache.

k, v: [num_tokens, Hkv, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D];
slot_mapping int64 [num_tokens]: slot = block_id * block_size + offset, -1 skips the token (padding).
"""
from __future__ import annotations

import torch

from engine.kernels._dispatch import use_triton


def write_kv_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter k and v into the caches in place (pure torch)."""
    block_size = k_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, offsets] = k[keep].to(k_cache.dtype)
    v_cache[blocks, offsets] = v[keep].to(v_cache.dtype)


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter k and v into the caches in place: Triton on CUDA tensors, the reference elsewhere."""
    if use_triton(k, k_cache):
        from engine.kernels.kv_write_triton import write_kv_triton

        write_kv_triton(k, v, k_cache, v_cache, slot_mapping)
    else:
        write_kv_ref(k, v, k_cache, v_cache, slot_mapping)
