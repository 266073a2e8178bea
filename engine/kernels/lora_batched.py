"""Batched multi-adapter LoRA: every token of a flat batch gets the update of its own adapter.

For flat tokens x [N, K] and a per-token adapter slot (-1 = the base model alone), with adapters
stacked per slot (A [S, R, K], B [S, N_out, R], scaling [S]):

    y[i] += scaling[s] * B[s] (A[s] x[i])      with s = slot of token i, for tokens with s >= 0

and, when a per-slot rescale table g [S, N_out] is given (DoRA), those rows become
(y[i] + update) * g[s]: DoRA's m / ||W + s B A||_row applied to (base + LoRA) output. Rows of base
tokens are never touched, and LoRA slots in a DoRA-carrying batch have g = 1.

Tokens are grouped by slot once per step (`build_segments`, in the manner of Punica's SGMV): the
kernels then read each adapter's A and B once per group of up to `block_m` tokens rather than once
per token, and the grouping is shared by every adapted layer of the step. The Triton kernels are in
lora_batched_triton.py; `add_lora` picks them on CUDA and the torch reference elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from engine.kernels._dispatch import use_triton

SMALL_BLOCK_M = 16  # tl.dot's smallest tile; decode groups are a few tokens each
LARGE_BLOCK_M = 64  # prefill groups are long: fewer, larger tiles


@dataclass(frozen=True)
class LoraSegments:
    """A step's adapter tokens grouped by slot, in chunks of at most `block_m` tokens.

    Device tensors (int32) are views of one packed buffer, so a step costs one host-to-device copy.
    """

    rows: torch.Tensor  # [L] token rows of the adapter tokens, grouped by slot
    chunk_slot: torch.Tensor  # [C] slot of each chunk
    chunk_start: torch.Tensor  # [C] offset of the chunk's first row in `rows`
    chunk_len: torch.Tensor  # [C] rows in the chunk (1..block_m)
    groups: tuple[tuple[int, int, int], ...]  # host copy: (slot, start in rows, count) per slot
    block_m: int
    num_tokens: int  # N, the flat batch size (adapter and base tokens)

    @property
    def num_rows(self) -> int:
        return int(self.rows.shape[0])

    @property
    def num_chunks(self) -> int:
        return int(self.chunk_slot.shape[0])

    @property
    def slots(self) -> tuple[int, ...]:
        return tuple(slot for slot, _, _ in self.groups)


def _by_slot(token_slots: Sequence[int]) -> dict[int, list[int]]:
    by_slot: dict[int, list[int]] = {}
    for row, slot in enumerate(token_slots):
        if slot >= 0:
            by_slot.setdefault(int(slot), []).append(row)
    return by_slot


def _group(by_slot: dict[int, list[int]], block_m: int):
    """(rows, groups, chunk slots, chunk starts, chunk lengths) as host lists."""
    rows: list[int] = []
    groups, c_slot, c_start, c_len = [], [], [], []
    for slot in sorted(by_slot):
        members = by_slot[slot]
        groups.append((slot, len(rows), len(members)))
        for off in range(0, len(members), block_m):
            c_slot.append(slot)
            c_start.append(len(rows) + off)
            c_len.append(min(block_m, len(members) - off))
        rows.extend(members)
    return rows, tuple(groups), c_slot, c_start, c_len


def build_segments(token_slots: Sequence[int], device: torch.device | str = "cpu",
                   block_m: int | None = None) -> LoraSegments | None:
    """Group a step's tokens by adapter slot; None when no token uses an adapter.

    token_slots[i] is token i's slot in the stacked adapter tensors, or -1 for the base model.
    """
    by_slot = _by_slot(token_slots)
    if not by_slot:
        return None
    if block_m is None:
        # Long groups (prefill) run best in large tiles; short ones (decode) waste less in small ones.
        mean = sum(len(r) for r in by_slot.values()) / len(by_slot)
        block_m = LARGE_BLOCK_M if mean > LARGE_BLOCK_M else SMALL_BLOCK_M
    rows, groups, c_slot, c_start, c_len = _group(by_slot, block_m)
    packed = torch.tensor(rows + c_slot + c_start + c_len, dtype=torch.int32).to(device, non_blocking=True)
    n_rows, n_chunks = len(rows), len(c_slot)
    views = torch.split(packed, [n_rows, n_chunks, n_chunks, n_chunks])
    return LoraSegments(rows=views[0], chunk_slot=views[1], chunk_start=views[2], chunk_len=views[3],
                        groups=groups, block_m=block_m, num_tokens=len(token_slots))


def chunk_capacity(num_tokens: int, num_slots: int, block_m: int = SMALL_BLOCK_M) -> int:
    """Most chunks `num_tokens` tokens over at most `num_slots` slots can form."""
    return min(num_tokens, num_slots + num_tokens // block_m)


class StaticSegments:
    """Fixed-size segment buffers that CUDA graphs capture once and replay every decode step.

    `view(n)` gives the segments of an n-token batch with a fixed chunk grid (`chunk_capacity`);
    `fill(token_slots, n)` rewrites them for a step: chunks past the real ones get length 0, and the
    kernels then do no memory work for them. One pinned host buffer, one asynchronous copy per step.
    """

    def __init__(self, max_tokens: int, num_slots: int, device: torch.device):
        self.max_tokens, self.num_slots = max_tokens, num_slots
        self.max_chunks = chunk_capacity(max_tokens, num_slots)
        size = max_tokens + 3 * self.max_chunks
        self.device_buf = torch.zeros(size, dtype=torch.int32, device=device)
        self.host_buf = torch.zeros(size, dtype=torch.int32, pin_memory=device.type == "cuda")
        self.copied = torch.cuda.Event() if device.type == "cuda" else None

    def _parts(self, buf: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
        c, m = chunk_capacity(n, self.num_slots), self.max_chunks
        rows = buf[:self.max_tokens]
        chunks = buf[self.max_tokens:].view(3, m)
        return rows[:n], chunks[0, :c], chunks[1, :c], chunks[2, :c]

    def view(self, n: int) -> LoraSegments:
        rows, c_slot, c_start, c_len = self._parts(self.device_buf, n)
        return LoraSegments(rows=rows, chunk_slot=c_slot, chunk_start=c_start, chunk_len=c_len, groups=(),
                            block_m=SMALL_BLOCK_M, num_tokens=n)

    def fill(self, token_slots: Sequence[int], n: int) -> None:
        """Write the grouping of `token_slots` (padded to n tokens) into the buffers the graph reads."""
        rows, _, c_slot, c_start, c_len = _group(_by_slot(token_slots), SMALL_BLOCK_M)
        if self.copied is not None:
            self.copied.synchronize()  # the previous step's copy has left the host buffer
        h_rows, h_slot, h_start, h_len = self._parts(self.host_buf, n)
        k = len(c_slot)
        assert k <= len(h_slot) and len(token_slots) <= n, "more chunks than the captured grid holds"
        h_rows[:len(rows)] = torch.tensor(rows, dtype=torch.int32)
        h_slot[:k] = torch.tensor(c_slot, dtype=torch.int32)
        h_start[:k] = torch.tensor(c_start, dtype=torch.int32)
        h_len[:k] = torch.tensor(c_len, dtype=torch.int32)
        h_len[k:] = 0
        self.device_buf.copy_(self.host_buf, non_blocking=True)
        if self.copied is not None:
            self.copied.record()


def lora_batched_ref(y: torch.Tensor, x: torch.Tensor, seg: LoraSegments, a: torch.Tensor, b: torch.Tensor,
                     scaling: torch.Tensor, rescale: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-torch batched LoRA, in place on y [N, N_out]; returns y. Math in fp32, one matmul pair per slot."""
    for slot, start, count in seg.groups:
        rows = seg.rows[start:start + count].long()
        t = x[rows].float() @ a[slot].float().T  # [n, R]
        out = y[rows].float() + (t @ b[slot].float().T) * scaling[slot].float()  # [n, N_out]
        if rescale is not None:
            out = out * rescale[slot].float()
        y[rows] = out.to(y.dtype)
    return y


def add_lora(y: torch.Tensor, x: torch.Tensor, seg: LoraSegments, a: torch.Tensor, b: torch.Tensor,
             scaling: torch.Tensor, rescale: torch.Tensor | None = None) -> torch.Tensor:
    """y [N, N_out] += per-token LoRA (then * rescale per slot, if given); Triton on CUDA, else the reference.

    x [N, K] in y's dtype; a [S, R, K], b [S, N_out, R] in x's dtype; scaling [S] and rescale [S, N_out] fp32.
    """
    if use_triton(y, x, a, b):
        from engine.kernels.lora_batched_triton import lora_batched_triton

        return lora_batched_triton(y, x, seg, a, b, scaling, rescale)
    return lora_batched_ref(y, x, seg, a, b, scaling, rescale)
