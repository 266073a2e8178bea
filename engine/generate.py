"""The reference generation path: one sequence, a plain contiguous KV cache, no scheduler.

It is deliberately simple; the paged engine is checked against it token for token.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from engine.model import Transformer


class ContiguousKVCache:
    """Attention backend over preallocated [B, max_len, Hkv, D] tensors per layer.

    Tokens passed to one forward are written at positions [length, length + T); call `advance(T)`
    after the forward so the next call appends after them.
    """

    def __init__(self, model: Transformer, batch: int, max_len: int):
        cfg = model.config
        p = next(model.parameters())
        shape = (batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in range(cfg.num_hidden_layers)]
        self.max_len = max_len
        self.length = 0

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        t, start = q.shape[1], self.length
        end = start + t
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; {end} needed")
        self.k[layer_idx][:, start:end] = k
        self.v[layer_idx][:, start:end] = v
        keys, values = self.k[layer_idx][:, :end], self.v[layer_idx][:, :end]
        groups = q.shape[2] // k.shape[2]
        qh = q.transpose(1, 2)  # [B,Hq,T,D]
        kh = keys.transpose(1, 2).repeat_interleave(groups, dim=1)  # [B,Hq,S,D]
        vh = values.transpose(1, 2).repeat_interleave(groups, dim=1)
        # Query i sits at position start + i and may see keys 0..start + i.
        mask = torch.arange(end, device=q.device)[None, :] <= (start + torch.arange(t, device=q.device))[:, None]
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
        return out.transpose(1, 2)

    def advance(self, t: int) -> None:
        self.length += t


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None) -> int:
    """Pick one token from a [V] logits row: greedy at temperature 0, else temperature + nucleus sampling."""
    if temperature <= 0:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=generator).item())


@torch.inference_mode()
def generate_reference(model: Transformer, prompt_ids: Sequence[int], max_tokens: int,
                       temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                       eos_ids: Sequence[int] = (), ignore_eos: bool = False,
                       max_len: int | None = None) -> list[int]:
    """Generate up to max_tokens after prompt_ids with a contiguous KV cache; stops at EOS unless ignored."""
    if not prompt_ids:
        raise ValueError("prompt_ids is empty: give at least one token")
    device = next(model.parameters()).device
    limit = max_len or model.config.max_position_embeddings
    max_tokens = min(max_tokens, limit - len(prompt_ids))
    if max_tokens <= 0:
        return []
    cache = ContiguousKVCache(model, batch=1, max_len=len(prompt_ids) + max_tokens)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    tokens = torch.tensor([list(prompt_ids)], device=device)
    positions = torch.arange(tokens.shape[1], device=device)[None]
    out: list[int] = []
    eos = set(eos_ids)
    for _ in range(max_tokens):
        logits = model(tokens, positions, attn=cache)[0, -1]
        cache.advance(tokens.shape[1])
        nxt = sample_next(logits, temperature, top_p, generator)
        out.append(nxt)
        if nxt in eos and not ignore_eos:
            break
        tokens = torch.tensor([[nxt]], device=device)
        positions = torch.tensor([[cache.length]], device=device)
    return out


@torch.inference_mode()
def greedy_recompute(model: Transformer, prompt_ids: Sequence[int], max_tokens: int) -> list[int]:
    """Greedy decoding that re-runs the whole sequence every step (no cache): the slowest, plainest oracle."""
    device = next(model.parameters()).device
    seq = list(prompt_ids)
    for _ in range(max_tokens):
        logits = model(torch.tensor([seq], device=device))[0, -1]
        seq.append(int(torch.argmax(logits).item()))
    return seq[len(prompt_ids):]
