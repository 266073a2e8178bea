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


def chunk_buckets(num_tokens: int, num_slots: int, smallest: int = 4) -> list[int]:
    """Chunk-grid sizes to capture for an n-token decode graph: powers of two from `smallest`, then the capacity.

    A step runs in the smallest bucket holding its real chunks, so the kernels' grids follow the work
    (one adapter over 64 tokens: 4 chunks) rather than the worst case (36 for 32 slots).
    """
    cap = chunk_capacity(num_tokens, num_slots)
    sizes, size = [], smallest
    while size < cap:
        sizes.append(size)
        size *= 2
    return sizes + [cap]


class StaticSegments:
    """Fixed-size segment buffers that CUDA graphs capture once and replay every decode step.

    `view(n, chunks)` gives the segments of an n-token batch with a fixed grid of `chunks` chunks
    (default `chunk_capacity`; decode graphs are captured at several, see `chunk_buckets`);
    `fill(token_slots, n)` rewrites them for a step and returns its real chunk count: every view
    reads a prefix of the same chunk arrays, and chunks past the real ones get length 0 (the kernels
    return at once for them). One pinned host buffer, one asynchronous copy per step.
    """

    def __init__(self, max_tokens: int, num_slots: int, device: torch.device):
        self.max_tokens, self.num_slots = max_tokens, num_slots
        self.max_chunks = chunk_capacity(max_tokens, num_slots)
        size = max_tokens + 3 * self.max_chunks
        self.device_buf = torch.zeros(size, dtype=torch.int32, device=device)
        self.host_buf = torch.zeros(size, dtype=torch.int32, pin_memory=device.type == "cuda")
        self.host_np = self.host_buf.numpy()  # filled through numpy: no tensor built per list
        self.copied = torch.cuda.Event() if device.type == "cuda" else None

    def view(self, n: int, chunks: int | None = None) -> LoraSegments:
        c = chunk_capacity(n, self.num_slots) if chunks is None else chunks
        assert c <= self.max_chunks and n <= self.max_tokens, "larger than the buffers"
        chunk_rows = self.device_buf[self.max_tokens:].view(3, self.max_chunks)
        return LoraSegments(rows=self.device_buf[:n], chunk_slot=chunk_rows[0, :c], chunk_start=chunk_rows[1, :c],
                            chunk_len=chunk_rows[2, :c], groups=(), block_m=SMALL_BLOCK_M, num_tokens=n)

    def fill(self, token_slots: Sequence[int], n: int) -> int:
        """Write the grouping of `token_slots` (padded to n tokens) into the buffers the graphs read; returns
        the step's real chunk count (run it in a graph whose chunk grid holds at least that many)."""
        rows, _, c_slot, c_start, c_len = _group(_by_slot(token_slots), SMALL_BLOCK_M)
        k = len(c_slot)
        assert k <= chunk_capacity(n, self.num_slots) and len(token_slots) <= n, "more chunks than a grid holds"
        if self.copied is not None:
            self.copied.synchronize()  # the previous step's copy has left the host buffer
        host = self.host_np
        host[:len(rows)] = rows
        chunk_rows = host[self.max_tokens:].reshape(3, self.max_chunks)
        chunk_rows[0, :k], chunk_rows[1, :k], chunk_rows[2, :k] = c_slot, c_start, c_len
        chunk_rows[2, k:] = 0
        self.device_buf.copy_(self.host_buf, non_blocking=True)
        if self.copied is not None:
            self.copied.record()
        return k


def slice_spans(n_out: int, r: int, slices: Sequence[int] | None) -> list[tuple[int, int, int, int]]:
    """(first output row, end row, first rank column, end rank column) of each diagonal block of B."""
    starts = list(slices) if slices else [0]
    ends = starts[1:] + [n_out]
    rank = r // len(starts)
    return [(lo, hi, i * rank, (i + 1) * rank) for i, (lo, hi) in enumerate(zip(starts, ends))]


def _groups(seg: LoraSegments):
    """(slot, start in rows, count) of each group; static (CUDA-graph) segments keep no host copy: their
    non-empty chunks then."""
    return seg.groups or [
        (s, st, n) for s, st, n in zip(*(t.tolist() for t in (seg.chunk_slot, seg.chunk_start, seg.chunk_len))) if n]


def _expand_rows(y, rows, slot, t, b, scaling, rescale, spans) -> None:
    """y[rows] += scaling[slot] * t B[slot]^T over B's diagonal blocks (then * rescale[slot]); t [n, R] fp32."""
    out = y[rows].float()  # [n, N_out]
    for lo, hi, r_lo, r_hi in spans:
        out[:, lo:hi] += (t[:, r_lo:r_hi] @ b[slot, lo:hi, r_lo:r_hi].float().T) * scaling[slot].float()
    if rescale is not None:
        out = out * rescale[slot].float()
    y[rows] = out.to(y.dtype)


def lora_batched_ref(y: torch.Tensor, x: torch.Tensor, seg: LoraSegments, a: torch.Tensor, b: torch.Tensor,
                     scaling: torch.Tensor, rescale: torch.Tensor | None = None,
                     slices: Sequence[int] | None = None) -> torch.Tensor:
    """Pure-torch batched LoRA, in place on y [N, N_out]; returns y. Math in fp32, one matmul pair per slot
    (and per slice of a packed layer)."""
    spans = slice_spans(y.shape[1], a.shape[1], slices)
    for slot, start, count in _groups(seg):
        rows = seg.rows[start:start + count].long()
        _expand_rows(y, rows, slot, x[rows].float() @ a[slot].float().T, b, scaling, rescale, spans)
    return y


def lora_expand_ref(y: torch.Tensor, t: torch.Tensor, seg: LoraSegments, b: torch.Tensor, scaling: torch.Tensor,
                    rescale: torch.Tensor | None = None, slices: Sequence[int] | None = None) -> torch.Tensor:
    """The expand alone, in place on y [N, N_out]: t [N, S x R] holds every slot's x A^T per token (row i,
    columns s x R .. (s + 1) x R: token i's x A[s]^T); each token takes its own slot's columns."""
    r = b.shape[2]
    spans = slice_spans(y.shape[1], r, slices)
    for slot, start, count in _groups(seg):
        rows = seg.rows[start:start + count].long()
        _expand_rows(y, rows, slot, t[rows, slot * r:(slot + 1) * r].float(), b, scaling, rescale, spans)
    return y


def add_lora(y: torch.Tensor, x: torch.Tensor, seg: LoraSegments, a: torch.Tensor, b: torch.Tensor,
             scaling: torch.Tensor, rescale: torch.Tensor | None = None,
             slices: Sequence[int] | None = None) -> torch.Tensor:
    """y [N, N_out] += per-token LoRA (then * rescale per slot, if given); Triton on CUDA, else the reference.

    x [N, K] in y's dtype; a [S, R, K], b [S, N_out, R] in x's dtype; scaling [S] and rescale [S, N_out] fp32.
    slices: a packed layer's output offsets (0, ...; at most 3): slice i owns output rows slices[i].. and
    rank columns i*R/len .. (i+1)*R/len, and B is used only in those diagonal blocks (the rest is not read).
    """
    if use_triton(y, x, a, b):
        from engine.kernels.lora_batched_triton import lora_batched_triton

        return lora_batched_triton(y, x, seg, a, b, scaling, rescale, slices)
    return lora_batched_ref(y, x, seg, a, b, scaling, rescale, slices)


def add_lora_expand(y: torch.Tensor, t: torch.Tensor, seg: LoraSegments, b: torch.Tensor, scaling: torch.Tensor,
                    rescale: torch.Tensor | None = None, slices: Sequence[int] | None = None) -> torch.Tensor:
    """y += per-token s * t B^T (then * rescale) where t [N, S x R] already holds x A^T for every slot (computed
    with the base projection, see lora_serving.py); Triton on CUDA, else lora_expand_ref."""
    if use_triton(y, t, b):
        from engine.kernels.lora_batched_triton import lora_expand_triton

        return lora_expand_triton(y, t, seg, b, scaling, rescale, slices)
    return lora_expand_ref(y, t, seg, b, scaling, rescale, slices)
