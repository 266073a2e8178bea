"""Serving many adapters in one forward: a wrapper around each target linear layer holding every resident
adapter's A, B (stacked by device slot) and applying each token's own adapter with the batched kernel.

The step's per-token slots reach the wrappers through a `LoraStepContext` the model runner owns and
sets around each forward (`with context.use(batch)`); every wrapper of the model holds the same
context object. Nothing lives in globals; outside a step (warm-up, reference runs) the wrappers are
the plain base layers.

DoRA is served exactly: for a token of a DoRA adapter the layer computes m/||W + sBA||_row * (Wx + sBAx) + b;
the per-row factor m/||W + sBA|| is computed once per adapter when its slot is filled and kept in a
[slots, out] table (1 for LoRA slots); base tokens never see it.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels.lora_batched import LoraSegments, add_lora
from engine.lora import is_linear


@dataclass(frozen=True)
class LoraBatch:
    """One step's adapter assignment: tokens grouped by slot, and whether any of those slots is DoRA."""

    segments: LoraSegments
    has_dora: bool


class LoraStepContext:
    """What the adapter wrappers read during a forward: the step's LoraBatch, or None (base model only)."""

    def __init__(self) -> None:
        self.batch: LoraBatch | None = None

    @contextlib.contextmanager
    def use(self, batch: LoraBatch | None) -> Iterator[None]:
        """Make `batch` the current step's adapters for the duration of the block."""
        self.batch = batch
        try:
            yield
        finally:
            self.batch = None


class ServingLoraLinear(nn.Module):
    """A frozen base linear layer plus slot-stacked adapters: A [S, R, K], B [S, N, R], scaling [S], rescale [S, N].

    Slots hold zeros until filled; a slot is only ever read for tokens the step assigns to it.
    """

    def __init__(self, base_layer: nn.Module, context: LoraStepContext, num_slots: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.base_layer = base_layer
        self.context = context
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        k, n = self.in_features, self.out_features
        self.register_buffer("lora_a", torch.zeros(num_slots, max_rank, k, dtype=dtype, device=device), persistent=False)
        self.register_buffer("lora_b", torch.zeros(num_slots, n, max_rank, dtype=dtype, device=device), persistent=False)
        self.register_buffer("scaling", torch.zeros(num_slots, dtype=torch.float32, device=device), persistent=False)
        self.register_buffer("rescale", torch.ones(num_slots, n, dtype=torch.float32, device=device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = self.context.batch
        if batch is None:
            return self.base_layer(x)
        flat = x.reshape(-1, x.shape[-1])  # [N, K]
        if not batch.has_dora:
            y = self.base_layer(flat)  # [N, out], bias included
            add_lora(y, flat, batch.segments, self.lora_a, self.lora_b, self.scaling)
        else:
            # DoRA rescales W x + s B A x, not the bias: add the bias after the kernel.
            bias = getattr(self.base_layer, "bias", None)
            if isinstance(self.base_layer, nn.Linear):
                y = F.linear(flat, self.base_layer.weight)
            else:
                y = self.base_layer(flat)
                y = y - bias if bias is not None else y
            add_lora(y, flat, batch.segments, self.lora_a, self.lora_b, self.scaling, self.rescale)
            if bias is not None:
                y = y + bias
        return y.view(*x.shape[:-1], self.out_features)

    @torch.no_grad()
    def fill_slot(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None, scaling: float,
                  rescale: torch.Tensor | None = None) -> None:
        """Copy one adapter's tensors into `slot` (rank zero-padded); a None pair leaves the layer unadapted."""
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        self.rescale[slot].fill_(1.0)
        if a is None:
            self.scaling[slot] = 0.0
            return
        r = a.shape[0]
        self.lora_a[slot, :r].copy_(a)
        self.lora_b[slot, :, :r].copy_(b)
        self.scaling[slot] = float(scaling)
        if rescale is not None:
            self.rescale[slot].copy_(rescale)

    def slot_bytes(self) -> int:
        """Device bytes of one slot in this layer."""
        return sum(t[0].numel() * t.element_size() for t in (self.lora_a, self.lora_b, self.scaling, self.rescale))

    def extra_repr(self) -> str:
        s, r, _ = self.lora_a.shape
        return f"slots={s}, max_rank={r}"


def serving_targets(model: nn.Module, leaf_names: tuple[str, ...]) -> list[str]:
    """Paths of the linear layers whose last name is one of `leaf_names` (e.g. q_proj), in model order."""
    return [path for path, mod in model.named_modules()
            if path and is_linear(mod) and path.rsplit(".", 1)[-1] in leaf_names]


def inject_serving_lora(model: nn.Module, paths: list[str], context: LoraStepContext, num_slots: int,
                        max_rank: int) -> dict[str, ServingLoraLinear]:
    """Wrap the layers at `paths` in ServingLoraLinear (in place); returns path -> wrapper."""
    param = next(model.parameters())
    wrappers = {}
    for path in paths:
        parent_path, _, leaf = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        wrapper = ServingLoraLinear(getattr(parent, leaf), context, num_slots, max_rank, param.dtype, param.device)
        setattr(parent, leaf, wrapper)
        wrappers[path] = wrapper
    return wrappers
