"""Batched sampling: one set of tensor ops over all rows, whatever each request asked for.

Order (as vLLM): min_tokens mask, logit_bias, penalties, then temperature, min_p, top-k/top-p, and a
draw. Log-probabilities are read from the raw logits, before any of that.

Reproducible seeds: each row draws its noise from its own request's generator and samples by an
exponential race (argmax of p / E with E ~ Exp(1), which picks token i with probability p_i), so a
seeded request's draws do not depend on which other requests share its batch.

`sample` leaves the chosen tokens on the device and never waits for it: per-row settings travel
host-to-device without a sync and every decision is taken from host data, so the engine can launch
the next decode step before reading these tokens (engine/overlap.py). `__call__` also reads them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from engine.sampling import SamplingParams


@dataclass
class RowLogprobs:
    """Raw log-probability of the chosen token plus the top alternatives (ids and values)."""

    token_id: int
    logprob: float
    top_ids: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)


@dataclass
class SamplingRow:
    """What the sampler needs of one request this step (plain data, built by the engine)."""

    params: SamplingParams
    prompt_ids: Sequence[int]
    output_ids: Sequence[int]
    stop_ids: frozenset[int]  # masked while fewer than min_tokens were generated
    generator: torch.Generator | None


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[RowLogprobs | None]


class Sampler:
    """Applies every row's settings with batched tensor ops and draws one token per row."""

    def __init__(self, device: torch.device | str, seed: int = 0):
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)  # for unseeded rows

    def make_generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        """logits float32 [M, V], one row per entry of rows -> one token id per row (+ logprobs)."""
        token_list = self.sample(logits, rows).tolist()
        return SamplerOutput(token_ids=token_list, logprobs=self.logprobs(logits, token_list, rows))

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """logits float32 [M, V] -> int64 token ids [M], left on the device (no host sync)."""
        # The processors below edit in place; most steps need none, and then the raw logits serve
        # (no copy). Decisions are made from host data, so nothing here waits for the GPU.
        if self._edits_logits(rows):
            logits = logits.clone()
            self._mask_stop_tokens(logits, rows)
            self._add_logit_bias(logits, rows)
            if any(r.params.needs_penalties for r in rows):
                self._apply_penalties(logits, rows)
        tokens = logits.argmax(dim=-1)
        greedy = [r.params.greedy for r in rows]
        if not all(greedy):
            sampled = self._sample(logits, rows)
            tokens = sampled if not any(greedy) else torch.where(
                device_tensor(greedy, logits.device, torch.bool), tokens, sampled)
        return tokens

    # -- logits processors ----------------------------------------------------------------------
    @staticmethod
    def _edits_logits(rows: list[SamplingRow]) -> bool:
        """Whether any in-place processor (min_tokens mask, logit_bias, penalties) applies this step."""
        return any((r.stop_ids and len(r.output_ids) < r.params.min_tokens) or r.params.logit_bias
                   or r.params.needs_penalties for r in rows)

    @staticmethod
    def _mask_stop_tokens(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
        pairs = [(i, t) for i, r in enumerate(rows) if len(r.output_ids) < r.params.min_tokens
                 for t in r.stop_ids if t < logits.shape[1]]
        if pairs:
            idx = device_tensor(pairs, logits.device, torch.long).T
            logits[idx[0], idx[1]] = float("-inf")

    @staticmethod
    def _add_logit_bias(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
        triples = [(i, t, b) for i, r in enumerate(rows) if r.params.logit_bias
                   for t, b in r.params.logit_bias.items()]
        if triples:
            rows_idx = device_tensor([t[0] for t in triples], logits.device, torch.long)
            cols = device_tensor([t[1] for t in triples], logits.device, torch.long)
            vals = device_tensor([t[2] for t in triples], logits.device, logits.dtype)
            logits.index_put_((rows_idx, cols), vals, accumulate=True)

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
        """Repetition (prompt + output, HF style), then frequency and presence (output only, OpenAI style)."""
        m, v = logits.shape
        dev = logits.device
        counts = _token_counts([r.output_ids for r in rows], v, dev)  # [M, V]
        rep = device_tensor([r.params.repetition_penalty for r in rows], dev, torch.float32)[:, None]
        if any(r.params.repetition_penalty != 1.0 for r in rows):
            seen = (_token_counts([r.prompt_ids for r in rows], v, dev) > 0) | (counts > 0)
            penalised = torch.where(logits > 0, logits / rep, logits * rep)
            logits.copy_(torch.where(seen, penalised, logits))
        freq = device_tensor([r.params.frequency_penalty for r in rows], dev, torch.float32)[:, None]
        pres = device_tensor([r.params.presence_penalty for r in rows], dev, torch.float32)[:, None]
        logits.sub_(freq * counts + pres * (counts > 0).float())

    # -- drawing --------------------------------------------------------------------------------
    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        dev = logits.device
        temp = device_tensor([r.params.temperature if not r.params.greedy else 1.0 for r in rows], dev, torch.float32)
        logits = logits / temp[:, None]
        if any(r.params.min_p > 0 for r in rows):
            min_p = device_tensor([r.params.min_p for r in rows], dev, torch.float32)
            probs = logits.softmax(dim=-1)
            too_small = probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values
            logits = logits.masked_fill(too_small, float("-inf"))
        if any(r.params.needs_truncation for r in rows):
            logits = _top_k_top_p(logits, rows)
        probs = logits.softmax(dim=-1)
        noise = torch.empty_like(probs)
        unseeded = [i for i, r in enumerate(rows) if r.generator is None]
        if len(unseeded) == len(rows):  # the same draws as filling the rows below, without an index
            noise.exponential_(generator=self.generator)
        elif unseeded:
            noise[device_tensor(unseeded, dev, torch.long)] = torch.empty(
                len(unseeded), probs.shape[1], device=dev).exponential_(generator=self.generator)
        for i, r in enumerate(rows):
            if r.generator is not None:
                noise[i].exponential_(generator=r.generator)
        return (probs / noise).argmax(dim=-1)

    # -- log-probabilities ----------------------------------------------------------------------
    @staticmethod
    @torch.inference_mode()
    def logprobs(raw: torch.Tensor, tokens: list[int], rows: list[SamplingRow]) -> list[RowLogprobs | None]:
        """Each row's entry (None where its request asked for none) for the tokens chosen from raw logits [M, V]."""
        wanted = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        out: list[RowLogprobs | None] = [None] * len(rows)
        if not wanted:
            return out
        lp = raw[wanted].log_softmax(dim=-1)
        chosen = lp.gather(1, torch.tensor([[tokens[i]] for i in wanted], device=raw.device))[:, 0].tolist()
        k = max(rows[i].params.logprobs for i in wanted)
        top_v, top_i = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
        top_v, top_i = top_v.tolist(), top_i.tolist()
        for j, i in enumerate(wanted):
            ki = rows[i].params.logprobs
            out[i] = RowLogprobs(tokens[i], chosen[j], top_i[j][:ki], top_v[j][:ki])
        return out


def prompt_logprobs(logits: torch.Tensor, targets: Sequence[int], k: int) -> list[RowLogprobs]:
    """Log-probability of each target token under its row's raw logits, plus the k best alternatives."""
    lp = logits.log_softmax(dim=-1)  # [R, V]
    tgt = torch.tensor(list(targets), device=logits.device)[:, None]
    chosen = lp.gather(1, tgt)[:, 0].tolist()
    if k:
        top_v, top_i = (t.tolist() for t in lp.topk(k, dim=-1))
    else:
        top_v = top_i = [[] for _ in targets]
    return [RowLogprobs(int(t), c, ti, tv) for t, c, ti, tv in zip(targets, chosen, top_i, top_v)]


def _token_counts(seqs: list[Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[M, V] float counts of each token id in each row's sequence."""
    counts = torch.zeros(len(seqs), vocab + 1, device=device)
    longest = max((len(s) for s in seqs), default=0)
    if longest:
        # Pad with an extra id `vocab` whose column is dropped afterwards.
        padded = device_tensor([list(s) + [vocab] * (longest - len(s)) for s in seqs], device, torch.long)
        counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=counts.dtype))
    return counts[:, :vocab]


def _top_k_top_p(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Mask everything outside each row's top-k and its top-p nucleus (one sort for all rows)."""
    m, v = logits.shape
    dev = logits.device
    k = device_tensor([r.params.top_k if r.params.top_k > 0 else v for r in rows], dev, torch.long)
    p = device_tensor([r.params.top_p for r in rows], dev, torch.float32)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(v, device=dev)[None, :]
    sorted_logits = sorted_logits.masked_fill(ranks >= k[:, None], float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # the most likely token always has 0 before it
    outside = (mass_before >= p[:, None]) & (p[:, None] < 1.0)
    sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def device_tensor(values: Sequence, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A small host list as a tensor on `device`, without waiting for the device: on CUDA it is staged in
    page-locked memory and copied asynchronously (a plain `torch.tensor(..., device=)` syncs the stream)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
