"""Rotary embedding (rotate-half / GPT-NeoX layout, as Llama) fused with the paged KV-cache write.

cos_sin_cache [max_positions, D] float32: row p holds cos(p * inv_freq) in its first D/2 columns
and sin(p * inv_freq) in its last D/2 (inv_freq has D/2 entries, any RoPE scaling already in it).
For x of head dim D with halves x1 = x[:D/2], x2 = x[D/2:]:
    out1 = x1 * cos - x2 * sin,   out2 = x2 * cos + x1 * sin
which equals x * cat(cos, cos) + rotate_half(x) * cat(sin, sin). Products run in fp32.

Optional RMS scale (`rms_source`, for a model whose RMSNorm weights were folded into the q/k/v
projection, see engine/norm_folding.py): q, k and v of token t are first multiplied by
rsqrt(mean(s_t^2) + eps), s_t being row t of rms_source [T, d], in fp32 with the rotation (RoPE
is linear, so the kernel scales cos and sin instead of the inputs).
"""
from __future__ import annotations

import torch

from engine.kernels._dispatch import use_triton
from engine.kernels.kv_write import write_kv_ref
from engine.kernels.rmsnorm import rms_scale


def build_cos_sin_cache(inv_freq: torch.Tensor, max_positions: int) -> torch.Tensor:
    """[max_positions, D] float32 table (cos | sin) for `inv_freq` [D/2]."""
    pos = torch.arange(max_positions, dtype=torch.float32, device=inv_freq.device)
    freqs = pos[:, None] * inv_freq.float()[None, :]  # [P, D/2]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def apply_rope_ref(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                   scale: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate x [T, H, D] at positions [T] (pure torch); scale [T] (fp32) multiplies each token first."""
    half = x.shape[-1] // 2
    cs = cos_sin_cache[positions.long()].float()  # [T, D]
    if scale is not None:
        cs = cs * scale[:, None]
    cos, sin = cs[:, None, :half], cs[:, None, half:]
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def rope_and_write_kv_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    rms_source: torch.Tensor | None = None,
    eps: float = 0.0,
) -> torch.Tensor:
    """Rotate q [T, Hq, D] and k [T, Hkv, D]; write rotated k and v into the paged cache; return rotated q.
    With rms_source [T, d], q, k and v are first scaled by its rows' rsqrt(mean square + eps)."""
    scale = None if rms_source is None else rms_scale(rms_source, eps)
    if scale is not None:
        v = (v.float() * scale[:, None, None]).to(v.dtype)
    write_kv_ref(apply_rope_ref(k, positions, cos_sin_cache, scale), v, k_cache, v_cache, slot_mapping)
    return apply_rope_ref(q, positions, cos_sin_cache, scale)


def rope_and_write_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    rms_source: torch.Tensor | None = None,
    eps: float = 0.0,
) -> torch.Tensor:
    """One pass on CUDA (Triton): RoPE on q and k (and the optional RMS scale of all three), k and v
    into the cache; the reference elsewhere."""
    if use_triton(q, k_cache):
        from engine.kernels.rope_triton import rope_and_write_kv_triton

        return rope_and_write_kv_triton(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping,
                                        rms_source=rms_source, eps=eps)
    return rope_and_write_kv_ref(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, rms_source, eps)
