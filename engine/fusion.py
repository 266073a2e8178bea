"""Inference-time fusions, as a transform on a built model (the model file stays as it is).

`fuse_model(model)` swaps, in place and under the same attribute names:
  - each Attention's q/k/v projections for one `qkv_proj` (one matmul reads x once; the
    three outputs are column slices of it),
  - each MLP's gate/up projections for one `gate_up_proj` followed by the fused SwiGLU kernel,
  - every RMSNorm for one that runs the fused kernel, and each decoder layer's forward for one
    that folds both residual adds into the norms after them (the next layer's, or the final one).
At decode a layer then launches about 10 kernels instead of about 30, which matters once CUDA
graphs have removed the launch overhead: each small kernel still costs a couple of microseconds.

Dense (nn.Linear) and quantized (QuantLinear) projections are merged alike, by stacking their
output rows (int4 rows and their group scales are independent, so stacking is exact).
The fused model computes the same function (same rounding points); its state dict, though, has
the merged names, so fuse only models that are served, never ones being saved or wrapped by LoRA.
"""
from __future__ import annotations

import torch
from torch import nn

from engine.kernels.activation import silu_and_mul
from engine.kernels.rmsnorm import rmsnorm
from engine.model import MLP, Attention, DecoderLayer, RMSNorm, apply_rope, causal_attention
from engine.quant import QuantLinear

# Each fused projection and the projections it stacks, in output order.
PACKED_PROJECTIONS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def merge_linears(layers: list[nn.Module]) -> nn.Module:
    """One layer whose output is the concatenation of `layers`' outputs (same input width)."""
    first = layers[0]
    has_bias = first.bias is not None
    if isinstance(first, QuantLinear):
        if any(not isinstance(m, QuantLinear) or (m.bits, m.group_size) != (first.bits, first.group_size)
               for m in layers):
            raise ValueError("cannot merge projections quantized differently")
        merged = QuantLinear(first.in_features, sum(m.out_features for m in layers), first.bits, first.group_size,
                             has_bias, dtype=first.scales.dtype, device="meta")
        merged.qweight = torch.cat([m.qweight for m in layers])
        merged.scales = torch.cat([m.scales for m in layers])
    elif all(type(m) is nn.Linear for m in layers):
        w = torch.cat([m.weight.detach() for m in layers])
        merged = nn.Linear(first.in_features, w.shape[0], bias=has_bias, device="meta")
        merged.weight = nn.Parameter(w, requires_grad=False)
    else:
        raise TypeError(f"cannot merge {[type(m).__name__ for m in layers]}")
    if has_bias:
        merged.bias = nn.Parameter(torch.cat([m.bias.detach() for m in layers]), requires_grad=False)
    return merged


def split_qkv(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int):
    """A fused projection's output [B, T, (Hq + 2 Hkv) D] -> strided views q [B, T, Hq, D], k, v [B, T, Hkv, D]."""
    b, t, _ = qkv.shape
    q_dim, kv_dim = num_heads * head_dim, num_kv_heads * head_dim
    q = qkv[..., :q_dim].view(b, t, num_heads, head_dim)
    k = qkv[..., q_dim:q_dim + kv_dim].view(b, t, num_kv_heads, head_dim)
    v = qkv[..., q_dim + kv_dim:].view(b, t, num_kv_heads, head_dim)
    return q, k, v


class FusedRMSNorm(nn.Module):
    """RMSNorm through the fused kernel; `forward(x, residual)` also adds the residual first."""

    def __init__(self, norm: RMSNorm):
        super().__init__()
        self.weight = norm.weight
        self.eps = norm.eps

    def forward(self, x, residual: torch.Tensor | None = None):
        """x [..., d] -> normed; with a residual -> (normed(x + residual), x + residual).

        x may also be a fused layer's (delta, residual) pair (see FusedDecoderLayer): the final
        norm of the stack then adds the last layer's MLP output in the same kernel.
        """
        if isinstance(x, tuple):
            return rmsnorm(x[0], self.weight, self.eps, x[1])[0]
        out, summed = rmsnorm(x, self.weight, self.eps, residual)
        return out if residual is None else (out, summed)


class FusedAttention(nn.Module):
    """Attention with one qkv projection; otherwise the model's Attention.forward."""

    def __init__(self, attn: Attention):
        super().__init__()
        self.layer_idx = attn.layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        self.qkv_proj = merge_linears([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o_proj = attn.o_proj

    def forward(self, x, cos, sin, attn):
        b, t, _ = x.shape
        q, k, v = split_qkv(self.qkv_proj(x), self.num_heads, self.num_kv_heads, self.head_dim)
        if cos is not None:  # None: the backend rotates q and k itself
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = causal_attention(q, k, v) if attn is None else attn.attend(self.layer_idx, q, k, v)
        return self.o_proj(out.reshape(b, t, -1))


class FusedMLP(nn.Module):
    """SwiGLU with one gate/up projection and the fused activation kernel."""

    def __init__(self, mlp: MLP):
        super().__init__()
        self.gate_up_proj = merge_linears([mlp.gate_proj, mlp.up_proj])
        self.down_proj = mlp.down_proj

    def forward(self, x):
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))  # [..., 2I] -> [..., I] -> [..., d]


class FusedDecoderLayer(nn.Module):
    """A decoder layer whose norms also perform the residual adds before them.

    Layers hand each other (MLP output, residual stream) pairs instead of their sum: the next
    layer's input norm (or the stack's final norm) adds them in its fused kernel, so no layer
    launches a separate add. The first layer receives the embeddings as a plain tensor.
    """

    def __init__(self, layer: DecoderLayer):
        super().__init__()
        self.self_attn = layer.self_attn
        self.input_layernorm = layer.input_layernorm
        self.post_attention_layernorm = layer.post_attention_layernorm
        if hasattr(layer, "block_sparse_moe"):
            self.block_sparse_moe = layer.block_sparse_moe
        else:
            self.mlp = layer.mlp

    def feed_forward(self, x):
        return self.block_sparse_moe(x) if hasattr(self, "block_sparse_moe") else self.mlp(x)

    def forward(self, x, cos, sin, attn):
        if isinstance(x, tuple):  # (previous layer's MLP output, residual stream)
            n, x = self.input_layernorm(x[0], x[1])  # x <- residual + delta; n = norm(x)
        else:
            n = self.input_layernorm(x)
        a = self.self_attn(n, cos, sin, attn)
        h, x = self.post_attention_layernorm(a, x)  # x <- x + a; h = norm(x)
        return self.feed_forward(h), x


def fuse_model(model: nn.Module) -> nn.Module:
    """Apply the fusions above in place (a no-op on an already fused model); returns the model."""
    stack = model.model
    for i, layer in enumerate(stack.layers):
        if not isinstance(layer, DecoderLayer):
            continue
        if isinstance(layer.self_attn, Attention):
            layer.self_attn = FusedAttention(layer.self_attn)
        if isinstance(getattr(layer, "mlp", None), MLP):
            layer.mlp = FusedMLP(layer.mlp)
        layer.input_layernorm = FusedRMSNorm(layer.input_layernorm)
        layer.post_attention_layernorm = FusedRMSNorm(layer.post_attention_layernorm)
        stack.layers[i] = FusedDecoderLayer(layer)
    if isinstance(stack.norm, RMSNorm):
        stack.norm = FusedRMSNorm(stack.norm)
    return model.train(model.training)  # the new modules take the model's mode
