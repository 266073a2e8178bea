"""Serving-time RMSNorm folding: a decoder layer's two norms stop being kernel launches.

A pre-norm layer feeds its projections n = g * (x r), with r = rsqrt(mean(x^2) + eps) one scalar
per token. So W n = (W diag(g)) x * r: g is folded into the columns of the projections that read
the norm (q/k/v after the input norm, gate/up after the post-attention norm) once at load, and
the scalar r is applied after the matmul by the kernel that consumes its output anyway: the RoPE +
KV-write kernel for q, k and v (engine/kernels/rope.py), the SwiGLU kernel for gate and up
(engine/kernels/activation.py); each computes r from the token's residual row itself. The
residual adds move into the o_proj and down_proj matmuls (addmm_ in place: the residual is the
matmul's C operand, beta = 1), so layers hand each other one plain residual tensor. A decode step then
launches two kernels fewer a layer (the final norm before lm_head stays).

When it applies (`can_fold`): every layer dense (Attention + MLP, plain nn.Linear projections)
without biases (a bias would be scaled by r as well). Adapters are never folded: an adapter's A
reads the normalized input, so the runner keeps the plain fusion (engine/fusion.py) when it
serves them, and quantized projections cannot take a column scale (int4 group scales run along
K), so they keep it too.

Rounding differs from the unfused model in where it happens, not in how much: W diag(g) is
rounded once to the weight dtype (the unfused model rounds x r, then g (x r)), the matmul output
is rounded before r scales it, and each residual add is rounded once inside the matmul instead of
after a rounded projection. Same function in exact arithmetic; bf16 logits agree within bf16
tolerance (tests/engine/test_norm_folding.py).
"""
from __future__ import annotations

import torch
from torch import nn

from engine.config import env_switch
from engine.fusion import FusedRMSNorm, merge_linears, split_qkv
from engine.kernels.activation import silu_and_mul
from engine.kernels.rmsnorm import rms_scale
from engine.model import MLP, Attention, DecoderLayer, RMSNorm, apply_rope, causal_attention


def folding_enabled() -> bool:
    """EMBER_FOLD_NORMS=0 keeps the norms as kernels (A/B runs); on by default."""
    return env_switch("EMBER_FOLD_NORMS") is not False


def can_fold(model: nn.Module) -> bool:
    """Whether every decoder layer is dense, bias-free and built from plain nn.Linear projections."""
    for layer in model.model.layers:
        if isinstance(layer, FoldedDecoderLayer):
            continue
        if not (isinstance(layer, DecoderLayer) and isinstance(layer.self_attn, Attention)
                and isinstance(getattr(layer, "mlp", None), MLP)):
            return False
        a, m = layer.self_attn, layer.mlp
        for proj in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj):
            if type(proj) is not nn.Linear or proj.bias is not None:
                return False
    return isinstance(model.model.norm, (RMSNorm, FusedRMSNorm))


def _folded(projections: list[nn.Linear], norm: RMSNorm) -> nn.Linear:
    """One merged projection whose columns are scaled by the norm's weight (rounded once)."""
    merged = merge_linears(projections)
    w = merged.weight.detach()
    merged.weight = nn.Parameter((w.float() * norm.weight.detach().float()[None, :]).to(w.dtype),
                                 requires_grad=False)
    return merged


class FoldedDecoderLayer(nn.Module):
    """A dense decoder layer with its norms folded away (see the module docstring).

    forward(x, cos, sin, attn) updates the residual stream [B, T, d] in place and returns it. With
    an attention backend that applies RoPE (the serving kernels) the RMS scale of q, k and v rides
    along in its kernel; otherwise (attn None, or a backend given rotated inputs) it is applied here.
    """

    def __init__(self, layer: DecoderLayer):
        super().__init__()
        attn, mlp = layer.self_attn, layer.mlp
        self.layer_idx = attn.layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        self.attn_eps = layer.input_layernorm.eps
        self.mlp_eps = layer.post_attention_layernorm.eps
        self.qkv_proj = _folded([attn.q_proj, attn.k_proj, attn.v_proj], layer.input_layernorm)
        self.o_proj = attn.o_proj
        self.gate_up_proj = _folded([mlp.gate_proj, mlp.up_proj], layer.post_attention_layernorm)
        self.down_proj = mlp.down_proj

    def _attend(self, x, cos, sin, attn):
        # Projections of the un-normalized residual: r scales them next.
        q, k, v = split_qkv(self.qkv_proj(x), self.num_heads, self.num_kv_heads, self.head_dim)
        if getattr(attn, "applies_rope", False):
            return attn.attend(self.layer_idx, q, k, v, rms_source=x, eps=self.attn_eps)
        r = rms_scale(x, self.attn_eps)[..., None, None]  # [B, T, 1, 1]
        q, k, v = ((y.float() * r).to(y.dtype) for y in (q, k, v))
        if cos is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return causal_attention(q, k, v) if attn is None else attn.attend(self.layer_idx, q, k, v)

    def forward(self, x, cos, sin, attn):
        """x [B, T, d], the residual stream, is updated in place and returned (an out-of-place addmm
        first copies its C operand: one more kernel per residual add)."""
        b, t, d = x.shape
        out = self._attend(x, cos, sin, attn).reshape(b * t, -1)
        x2 = x.view(b * t, d)
        x2.addmm_(out, self.o_proj.weight.t())  # x += o_proj(out), rounded once
        h = silu_and_mul(self.gate_up_proj(x2), rms_source=x2, eps=self.mlp_eps)
        x2.addmm_(h, self.down_proj.weight.t())
        return x


def fold_norms(model: nn.Module) -> nn.Module:
    """Fold every layer's norms in place (callers check `can_fold` first; a no-op on folded layers);
    the final norm runs the fused kernel. Returns the model."""
    if not can_fold(model):
        raise ValueError("norm folding needs dense, bias-free nn.Linear layers (see engine/norm_folding.py)")
    stack = model.model
    for i, layer in enumerate(stack.layers):
        if not isinstance(layer, FoldedDecoderLayer):
            stack.layers[i] = FoldedDecoderLayer(layer)
    if isinstance(stack.norm, RMSNorm):
        stack.norm = FusedRMSNorm(stack.norm)
    return model.train(model.training)

