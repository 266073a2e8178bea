"""Attention over one shared, cached prefix plus each row's own tokens.

Multiple-choice scoring runs a question once (recording every layer's keys and values), then runs
all its answers as one batch that attends to those cached keys: the context is computed once however
many choices it has. It plugs into the model's attention-backend argument; nothing else changes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.model import causal_attention


class SharedPrefixAttention:
    """First call per layer (batch 1) records the prefix K/V; after `freeze()`, rows attend to it."""

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.frozen = False

    def freeze(self) -> None:
        self.frozen = True

    @property
    def prefix_len(self) -> int:
        return next(iter(self.keys.values())).shape[1] if self.keys else 0

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if not self.frozen:
            self.keys[layer_idx], self.values[layer_idx] = k, v  # [1,P,Hkv,D]
            return causal_attention(q, k, v)
        if layer_idx not in self.keys:  # an empty prefix: plain causal attention over the rows
            return causal_attention(q, k, v)
        b, t = q.shape[:2]
        pk, pv = self.keys[layer_idx], self.values[layer_idx]
        p = pk.shape[1]
        k = torch.cat([pk.expand(b, -1, -1, -1), k], dim=1)  # [B,P+T,Hkv,D]
        v = torch.cat([pv.expand(b, -1, -1, -1), v], dim=1)
        groups = q.shape[2] // k.shape[2]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        # Row token i sees the whole prefix and its own tokens 0..i.
        mask = torch.ones(t, p + t, dtype=torch.bool, device=q.device).tril(diagonal=p)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2)
