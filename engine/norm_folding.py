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

When it applies (`can_fold`): every layer dense (Attention + MLP) without biases (a bias would
be scaled by r as well), its projections plain nn.Linear or weight-only quantized (QuantLinear).
Quantized projections cannot take a column scale at load (int4 group scales run along K), so a
quantized layer folds only when the norms before it weigh 1 everywhere: `ember quantize` folds g
into the dense weights before it quantizes them (`fold_norm_weights`, on by default), which leaves
exactly that. A quantized residual add runs in the int8/int4 kernel's epilogue (`accumulate`).
Adapters are never folded: an adapter's A reads the normalized input, so the runner keeps the
plain fusion (engine/fusion.py) when it serves them.

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
from engine.quant import QuantLinear


def folding_enabled() -> bool:
    """EMBER_FOLD_NORMS=0 keeps the norms as kernels (A/B runs); on by default."""
    return env_switch("EMBER_FOLD_NORMS") is not False


def _dense_layers(model: nn.Module) -> bool:
    """Whether every decoder layer (folded ones aside) is a DecoderLayer with Attention and an MLP."""
    return all(isinstance(layer, FoldedDecoderLayer) or (
        isinstance(layer, DecoderLayer) and isinstance(layer.self_attn, Attention)
        and isinstance(getattr(layer, "mlp", None), MLP)) for layer in model.model.layers)


def _norm_inputs(layer: DecoderLayer) -> list[tuple[RMSNorm, list[nn.Module]]]:
    """Each norm of a dense layer with the projections that read its output."""
    a, m = layer.self_attn, layer.mlp
    return [(layer.input_layernorm, [a.q_proj, a.k_proj, a.v_proj]),
            (layer.post_attention_layernorm, [m.gate_proj, m.up_proj])]


def _foldable(projections: list[nn.Module], norm: RMSNorm) -> bool:
    """Bias-free and all plain nn.Linear (the norm folds into the columns), or all quantized
    behind a norm that weighs 1 everywhere (nothing left to fold)."""
    if any(p.bias is not None for p in projections):
        return False
    if all(type(p) is nn.Linear for p in projections):
        return True
    return all(isinstance(p, QuantLinear) for p in projections) and bool((norm.weight == 1).all())


def can_fold(model: nn.Module) -> bool:
    """Whether every decoder layer is dense and bias-free, with projections as `_foldable` says."""
    if not _dense_layers(model):
        return False
    for layer in model.model.layers:
        if isinstance(layer, FoldedDecoderLayer):
            continue
        a, m = layer.self_attn, layer.mlp
        if not all(_foldable(projs, norm) for norm, projs in _norm_inputs(layer)):
            return False
        if not all(type(p) in (nn.Linear, QuantLinear) and p.bias is None for p in (a.o_proj, m.down_proj)):
            return False
    return isinstance(model.model.norm, (RMSNorm, FusedRMSNorm))


def fold_norm_weights(model: nn.Module) -> nn.Module:
    """Before quantizing: scale the columns of the projections that read each layer norm by the
    norm's weight, and set that weight to 1 (the same function; `ember quantize` does this so the
    quantized layers can be served folded). Needs dense layers of plain nn.Linear projections."""
    if not _dense_layers(model) or any(isinstance(layer, FoldedDecoderLayer) for layer in model.model.layers):
        raise ValueError("folding norm weights needs dense (non-MoE) decoder layers")
    pairs = [pair for layer in model.model.layers for pair in _norm_inputs(layer)]
    if any(type(p) is not nn.Linear for _, projections in pairs for p in projections):  # checked before any change
        raise ValueError("folding norm weights needs plain nn.Linear projections (not yet quantized)")
    with torch.no_grad():
        for norm, projections in pairs:
            g = norm.weight.float()
            for p in projections:
                p.weight.copy_(p.weight.float() * g[None, :])
            norm.weight.fill_(1.0)
    return model


def _folded(projections: list[nn.Module], norm: RMSNorm) -> nn.Module:
    """One merged projection whose columns are scaled by the norm's weight (rounded once); quantized
    projections are merged as they are (`_foldable`: their norm weighs 1)."""
    merged = merge_linears(projections)
    if isinstance(merged, QuantLinear):
        return merged
    w = merged.weight.detach()
    merged.weight = nn.Parameter((w.float() * norm.weight.detach().float()[None, :]).to(w.dtype),
                                 requires_grad=False)
    return merged


def add_projection_(residual: torch.Tensor, x: torch.Tensor, proj: nn.Module) -> None:
    """residual [N, d] += proj(x [N, k]) in place, rounded once (no copy of the residual first)."""
    if isinstance(proj, QuantLinear):
        proj.forward_add_(x, residual)
    else:
        residual.addmm_(x, proj.weight.t())


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
        add_projection_(x2, out, self.o_proj)  # x += o_proj(out)
        h = silu_and_mul(self.gate_up_proj(x2), rms_source=x2, eps=self.mlp_eps)
        add_projection_(x2, h, self.down_proj)
        return x


def fold_norms(model: nn.Module) -> nn.Module:
    """Fold every layer's norms in place (callers check `can_fold` first; a no-op on folded layers);
    the final norm runs the fused kernel. Returns the model."""
    if not can_fold(model):
        raise ValueError("norm folding needs dense, bias-free layers of nn.Linear projections, or quantized ones "
                         "behind unit norm weights (see engine/norm_folding.py)")
    stack = model.model
    for i, layer in enumerate(stack.layers):
        if not isinstance(layer, FoldedDecoderLayer):
            stack.layers[i] = FoldedDecoderLayer(layer)
    if isinstance(stack.norm, RMSNorm):
        stack.norm = FusedRMSNorm(stack.norm)
    return model.train(model.training)

