"""Serving many adapters in one forward: a wrapper around each target linear layer holding every resident
adapter's A, B (stacked by device slot) and applying each token's own adapter with the batched kernel.

The step's per-token slots reach the wrappers through a `LoraStepContext` the model runner owns and
sets around each forward (`with context.use(batch)`); every wrapper of the model holds the same
context object. Nothing lives in globals; outside a step (warm-up, reference runs) the wrappers are
the plain base layers.

DoRA is served exactly: for a token of a DoRA adapter the layer computes m/||W + sBA||_row * (Wx + sBAx) + b;
the per-row factor m/||W + sBA|| is computed once per adapter when its slot is filled and kept in a
[slots, out] table (1 for LoRA slots); base tokens never see it.

The shrink (x A^T) of a small step rides on the base projection itself: a dense base layer's weight
is the first rows of one [out + slots x R, in] matrix whose remaining rows are every slot's A, so one
GEMM gives W x and the slots' x A^T together, and the expand reads each token's own slot's columns
(`add_lora_expand`). A step then launches one kernel for its adapters (the expand), not two, and
the shrink costs the A rows' bytes inside a GEMM that streams at full speed. Slots fill lowest
first and a step reads A only up to the highest slot it can use (`LoraBatch.slot_limit`; ~10 MB a
slot on a 1B model at rank 16 on all projections). Steps of more than STACKED_MAX_TOKENS tokens
(prefill) and quantized bases keep the separate shrink kernel, which computes only the slots in
use: on CUDA it runs on a side stream while the base projection runs on the main one, and the
expand joins them. EMBER_LORA_STACKED=0 turns the stacked shrink off, EMBER_LORA_OVERLAP=0 the
side stream (both for comparison).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import env_switch
from engine.fusion import PACKED_PROJECTIONS
from engine.kernels.lora_batched import LoraSegments, add_lora, add_lora_expand
from engine.lora import base_weight, is_linear


@dataclass(frozen=True)
class LoraBatch:
    """One step's adapter assignment: tokens grouped by slot, and whether any of those slots is DoRA.

    slot_limit: every token's slot is below it, so the stacked shrink reads only the A of slots
    [0, slot_limit) (None: all slots). Slots are filled lowest first, so a few resident adapters
    cost a few slots' bytes, not max_loras'.
    """

    segments: LoraSegments
    has_dora: bool
    slot_limit: int | None = None


class LoraStepContext:
    """What the adapter wrappers read during a forward: the step's LoraBatch, or None (base model only),
    and the side stream the shrinks run on (CUDA only)."""

    def __init__(self) -> None:
        self.batch: LoraBatch | None = None
        self.overlap = env_switch("EMBER_LORA_OVERLAP") is not False  # on unless switched off
        self.stacked = env_switch("EMBER_LORA_STACKED") is not False  # on unless switched off
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def side_stream(self, x: torch.Tensor) -> "torch.cuda.Stream | None":
        """The stream a shrink over x may run on beside the base projection; None: run in order."""
        if not (self.overlap and x.is_cuda):
            return None
        from engine.kernels._dispatch import use_triton

        if not use_triton(x):
            return None
        stream = self._streams.get(x.device)
        if stream is None:
            stream = self._streams[x.device] = torch.cuda.Stream(x.device)
        return stream

    @contextlib.contextmanager
    def use(self, batch: LoraBatch | None) -> Iterator[None]:
        """Make `batch` the current step's adapters for the duration of the block."""
        self.batch = batch
        try:
            yield
        finally:
            self.batch = None


STACKED_MAX_TOKENS = 512  # larger steps (prefill) compute only the slots in use, with the shrink kernel


class ServingLoraLinear(nn.Module):
    """A frozen base linear layer plus slot-stacked adapters: A [S, n*R, K], B [S, N, n*R], scaling [S], rescale [S, N].

    A packed layer (a fused q/k/v or gate/up projection) holds n slices, each an adapter target of
    its own (`slice_paths`): slice i's A sits in rank rows i*R..(i+1)*R and its B in output rows
    `slice_offsets[i]`.. and the same rank columns, so B is block-diagonal and one shrink and one
    expand serve every slice. Each slice's scaling is folded into its B; a filled slot has scaling 1.
    Slots hold zeros until filled; a slot is only ever read for tokens the step assigns to it.
    """

    def __init__(self, base_layer: nn.Module, context: LoraStepContext, num_slots: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device, slices: list[tuple[str, int]]):
        super().__init__()
        self.base_layer = base_layer
        self.context = context
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.slice_paths = [path for path, _ in slices]
        self.slice_sizes = [size for _, size in slices]
        self.slice_offsets = [sum(self.slice_sizes[:i]) for i in range(len(slices))]
        # The kernels read only B's diagonal blocks of a packed layer (the rest is zero).
        self.kernel_slices = tuple(self.slice_offsets) if len(slices) > 1 else None
        if sum(self.slice_sizes) != self.out_features:
            raise ValueError(f"slices {slices} do not add up to the layer's {self.out_features} outputs")
        self.max_rank = max_rank
        k, n, r = self.in_features, self.out_features, max_rank * len(slices)
        self.stacked: torch.Tensor | None = None
        weight = getattr(base_layer, "weight", None)
        if context.stacked and type(base_layer) is nn.Linear and weight.dtype == dtype and weight.device == device:
            # [W; A of slot 0; A of slot 1; ...]: the base layer's weight becomes a view of its first rows.
            stacked = torch.zeros(n + num_slots * r, k, dtype=dtype, device=device)
            stacked[:n].copy_(weight.detach())
            base_layer.weight = nn.Parameter(stacked[:n], requires_grad=False)
            self.stacked = stacked
            self.register_buffer("lora_a", stacked[n:].view(num_slots, r, k), persistent=False)
        else:
            self.register_buffer("lora_a", torch.zeros(num_slots, r, k, dtype=dtype, device=device), persistent=False)
        self.register_buffer("lora_b", torch.zeros(num_slots, n, r, dtype=dtype, device=device), persistent=False)
        self.register_buffer("scaling", torch.zeros(num_slots, dtype=torch.float32, device=device), persistent=False)
        self.register_buffer("rescale", torch.ones(num_slots, n, dtype=torch.float32, device=device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = self.context.batch
        if batch is None:
            return self.base_layer(x)
        flat = x.reshape(-1, x.shape[-1])  # [N, K]
        if self.stacked is not None and flat.shape[0] <= STACKED_MAX_TOKENS:
            return self._stacked_forward(flat, batch).view(*x.shape[:-1], self.out_features)
        if not batch.has_dora:
            y = self._base_plus_lora(flat, batch, self.base_layer, None)  # [N, out], bias included
        else:
            # DoRA rescales W x + s B A x, not the bias: add the bias after the kernel.
            bias = getattr(self.base_layer, "bias", None)
            y = self._base_plus_lora(flat, batch, self._base_without_bias, self.rescale)
            if bias is not None:
                y = y + bias
        return y.view(*x.shape[:-1], self.out_features)

    def _stacked_forward(self, flat: torch.Tensor, batch: LoraBatch) -> torch.Tensor:
        """One GEMM for W x and every slot's x A^T, then the expand on each token's own slot's columns."""
        stacked = self.stacked
        if batch.slot_limit is not None:  # only the slots the step can use
            stacked = stacked[:self.out_features + batch.slot_limit * self.lora_a.shape[1]]
        out = F.linear(flat, stacked)  # [N, out + slots x R]
        y, t = out[:, :self.out_features], out[:, self.out_features:]
        # DoRA rescales W x + s B A x, not the bias: the bias (if any) comes after the expand either way.
        add_lora_expand(y, t, batch.segments, self.lora_b, self.scaling, self.rescale if batch.has_dora else None,
                        self.kernel_slices)
        bias = self.base_layer.bias
        return y if bias is None else y + bias

    def _base_without_bias(self, flat: torch.Tensor) -> torch.Tensor:
        bias = getattr(self.base_layer, "bias", None)
        if isinstance(self.base_layer, nn.Linear):
            return F.linear(flat, self.base_layer.weight)
        y = self.base_layer(flat)
        return y - bias if bias is not None else y

    def _base_plus_lora(self, flat: torch.Tensor, batch: LoraBatch, base, rescale) -> torch.Tensor:
        """base(flat) plus each token's adapter update (then * rescale); the shrink beside the base on CUDA."""
        stream = self.context.side_stream(flat)
        if stream is None:
            y = base(flat)
            return add_lora(y, flat, batch.segments, self.lora_a, self.lora_b, self.scaling, rescale,
                            self.kernel_slices)
        from engine.kernels.lora_batched_triton import lora_expand_triton, lora_shrink_triton, shrink_partials

        main = torch.cuda.current_stream(flat.device)
        part = shrink_partials(flat, batch.segments, self.lora_a)  # owned by the main stream
        stream.wait_stream(main)  # x (and the step's segments) are ready
        with torch.cuda.stream(stream):
            lora_shrink_triton(flat, batch.segments, self.lora_a, part)
        y = base(flat)
        main.wait_stream(stream)
        return lora_expand_triton(y, part, batch.segments, self.lora_b, self.scaling, rescale, self.kernel_slices)

    @torch.no_grad()
    def fill_slot(self, slot: int, parts: list) -> None:
        """Copy one adapter into `slot`: parts[i] (a, s·b, rescale) for slice i, or None (slice unadapted)."""
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        self.rescale[slot].fill_(1.0)
        self.scaling[slot] = 0.0
        for i, part in enumerate(parts):
            if part is None:
                continue
            r, lo, off, size = part.a.shape[0], i * self.max_rank, self.slice_offsets[i], self.slice_sizes[i]
            self.lora_a[slot, lo:lo + r].copy_(part.a)
            self.lora_b[slot, off:off + size, lo:lo + r].copy_(part.b)  # s B: the scaling is folded in
            if part.rescale is not None:
                self.rescale[slot, off:off + size].copy_(part.rescale)
            self.scaling[slot] = 1.0

    def slice_weight(self, index: int) -> torch.Tensor:
        """The dense base weight rows [size, K] of slice `index` (dequantized if the base is quantized)."""
        off = self.slice_offsets[index]
        return base_weight(self.base_layer)[off:off + self.slice_sizes[index]]

    def slot_bytes(self) -> int:
        """Device bytes of one slot in this layer."""
        return sum(t[0].numel() * t.element_size() for t in (self.lora_a, self.lora_b, self.scaling, self.rescale))

    def extra_repr(self) -> str:
        return f"slots={self.lora_a.shape[0]}, max_rank={self.max_rank}, slices={len(self.slice_paths)}"


def _slices(parent: nn.Module, path: str, leaf: str, layer: nn.Module) -> list[tuple[str, int]]:
    """(adapter target path, output size) of each slice of the layer at `path`."""
    prefix = path[: -len(leaf)]
    if leaf == "qkv_proj":
        q, kv = parent.num_heads * parent.head_dim, parent.num_kv_heads * parent.head_dim
        sizes = [q, kv, kv]
    elif leaf == "gate_up_proj":
        sizes = [layer.out_features // 2] * 2
    else:
        return [(path, layer.out_features)]
    return [(prefix + name, size) for name, size in zip(PACKED_PROJECTIONS[leaf], sizes)]


def inject_serving_lora(model: nn.Module, targets: tuple[str, ...], context: LoraStepContext, num_slots: int,
                        max_rank: int) -> list[ServingLoraLinear]:
    """Wrap every linear layer named in `targets` (q_proj, ...; fused projections holding them too) in a
    ServingLoraLinear, in place; returns the wrappers in model order."""
    param = next(model.parameters())
    found = [(path, mod) for path, mod in model.named_modules() if path and is_linear(mod)
             and (path.rsplit(".", 1)[-1] in targets
                  or set(PACKED_PROJECTIONS.get(path.rsplit(".", 1)[-1], ())) & set(targets))]
    wrappers = []
    for path, layer in found:
        parent_path, _, leaf = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        wrapper = ServingLoraLinear(layer, context, num_slots, max_rank, param.dtype, param.device,
                                    _slices(parent, path, leaf, layer))
        setattr(parent, leaf, wrapper)
        wrappers.append(wrapper)
    return wrappers
