"""The serving attention backend: the model's `attn` argument when it runs over the paged KV cache.

The runner flattens a step's sequences into one row of tokens (batch 1, T = all tokens) and
builds a `PagedAttentionMetadata` for it; each layer then writes its new keys and values into the
cache blocks (slot mapping) and attends over each sequence's blocks (block tables).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine.kernels.kv_write import write_kv
from engine.kernels.paged_attention import paged_attention
from engine.kernels.rope import rope_and_write_kv


@dataclass(frozen=True)
class PagedAttentionMetadata:
    """Per-step layout of the flat token batch over the paged cache (see engine/kernels/paged_attention.py)."""

    slot_mapping: torch.Tensor  # int64 [N]: cache slot of each token (block_id * block_size + offset)
    block_tables: torch.Tensor  # int32 [S, max_blocks]: each sequence's blocks, zero padded
    context_lens: torch.Tensor  # int32 [S]: KV length of each sequence including this step's tokens
    cu_seqlens_q: torch.Tensor  # int32 [S + 1]: sequence s owns tokens cu[s]:cu[s + 1]
    max_seqlen_q: int  # host-side hints, so kernels need no device sync
    max_context_len: int | None  # None under CUDA graphs: the decode kernel sizes splits by table capacity


class KVCache:
    """Per-layer key and value block tensors, each [num_blocks, block_size, Hkv, D]."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        # One allocation for everything: [layers, k/v, blocks, block_size, Hkv, D].
        self.data = torch.zeros(num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim,
                                dtype=dtype, device=device)
        self.num_blocks = num_blocks
        self.block_size = block_size

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data[layer_idx, 0], self.data[layer_idx, 1]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        return num_layers * 2 * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


class PagedAttention:
    """`attend(layer_idx, q, k, v)` over the paged cache for one step's flat batch."""

    def __init__(self, kv_cache: KVCache, metadata: PagedAttentionMetadata, head_dim: int):
        self.kv_cache = kv_cache
        self.metadata = metadata
        self.scale = 1.0 / math.sqrt(head_dim)

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [1,N,Hq,D], k/v [1,N,Hkv,D] (RoPE applied) -> [1,N,Hq,D]; writes k/v into the cache first."""
        b, n, hq, d = q.shape
        meta = self.metadata
        k_cache, v_cache = self.kv_cache.layer(layer_idx)
        write_kv(k.reshape(b * n, -1, d), v.reshape(b * n, -1, d), k_cache, v_cache, meta.slot_mapping)
        out = paged_attention(q.reshape(b * n, hq, d), k_cache, v_cache, meta.block_tables, meta.context_lens,
                              meta.cu_seqlens_q, self.scale, max_seqlen_q=meta.max_seqlen_q,
                              max_context_len=meta.max_context_len)  # [N, Hq, D]
        return out.view(b, n, hq, d)


class FusedRopePagedAttention(PagedAttention):
    """PagedAttention that also applies RoPE: one kernel rotates q and k and writes k, v into the cache.

    The model sees `applies_rope` and hands over un-rotated q and k (see engine/model.py).
    positions [N] are the flat batch's token positions; cos_sin_cache [max_pos, D] float32 comes
    from engine.kernels.rope.build_cos_sin_cache.
    """

    applies_rope = True

    def __init__(self, kv_cache: KVCache, metadata: PagedAttentionMetadata, head_dim: int,
                 cos_sin_cache: torch.Tensor, positions: torch.Tensor):
        super().__init__(kv_cache, metadata, head_dim)
        self.cos_sin_cache = cos_sin_cache
        self.positions = positions

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               rms_source: torch.Tensor | None = None, eps: float = 0.0) -> torch.Tensor:
        """q [1,N,Hq,D], k/v [1,N,Hkv,D] before RoPE -> [1,N,Hq,D]. With rms_source [1,N,d], q, k and v
        are first scaled by its rows' rsqrt(mean square + eps), in the same kernel (engine/norm_folding.py)."""
        b, n, hq, d = q.shape
        meta = self.metadata
        k_cache, v_cache = self.kv_cache.layer(layer_idx)
        q_rot = rope_and_write_kv(q.reshape(b * n, hq, d), k.reshape(b * n, -1, d), v.reshape(b * n, -1, d),
                                  self.positions, self.cos_sin_cache, k_cache, v_cache, meta.slot_mapping,
                                  rms_source=None if rms_source is None else rms_source.reshape(b * n, -1), eps=eps)
        out = paged_attention(q_rot, k_cache, v_cache, meta.block_tables, meta.context_lens, meta.cu_seqlens_q,
                              self.scale, max_seqlen_q=meta.max_seqlen_q, max_context_len=meta.max_context_len)
        return out.view(b, n, hq, d)
