"""The adapter registry of a serving engine: adapters by name, versions, device slots, request references.

- **Load** reads a PEFT-layout directory under the LoRA root (LoRA or DoRA, safetensors only), checks it
  against the served model (target modules, shapes, rank <= max_lora_rank) and keeps a host copy. Every
  load gets a fresh version number; the prefix cache is keyed by (name, version), so KV computed under
  one version is never reused under another.
- **Reload** (loading a name again) swaps atomically: requests admitted before keep the old version until
  they finish, new ones get the new one; the old version is freed when its last request ends.
- **Unload** removes the name at once (new requests are refused), waits for its in-flight requests,
  then frees its memory.
- **Device slots**: up to `max_loras` versions are resident in the stacked tensors of the serving
  wrappers; a step's adapters are made resident when it is prepared, evicting the least recently used
  unpinned version not in that step (its host copy stays, so it comes back without touching disk).
  The scheduler asks `fits()` before admitting a request, so a step never needs more slots than exist.

Threads: `load`/`unload` run on worker threads; `acquire`/`release`/`fits`/`prepare_step` run on the
engine's thread. One condition variable guards the tables; slot contents change only in `prepare_step`,
which runs inside the engine step, so a forward never sees a slot being rewritten.
"""
from __future__ import annotations

import itertools
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn

from engine.adapter_io import AdapterError, read_adapter
from engine.adapter_paths import AdapterNotFoundError, resolve_adapter_path
from engine.errors import InvalidRequestError
from engine.kernels.lora_batched import StaticSegments, build_segments, chunk_buckets, chunk_capacity
from engine.lora import DEFAULT_TARGETS, lora_scaling
from engine.lora_serving import LoraBatch, LoraStepContext, ServingLoraLinear, inject_serving_lora

logger = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}")
NORM_ROWS = 1024  # DoRA norms are computed this many weight rows at a time, to bound temporary memory

__all__ = ["AdapterNotFoundError", "AdapterRef", "AdapterRegistry", "AdapterServingConfig", "AdapterInfo"]


@dataclass
class AdapterServingConfig:
    """How a serving engine hosts adapters."""

    lora_root: str
    max_loras: int = 8  # device slots: distinct adapter versions one step can serve
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None  # adapters loaded at once (host copies); None: no limit
    target_modules: tuple[str, ...] = DEFAULT_TARGETS  # layer names that get adapter slots

    def __post_init__(self) -> None:
        if not self.lora_root or not os.path.isdir(self.lora_root):
            raise ValueError(f"lora_root {self.lora_root!r} is not a directory; adapters load from under it")
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be at least 1, got {self.max_loras}")
        if self.max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be at least 1, got {self.max_lora_rank}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < 1:
            raise ValueError(f"max_cpu_loras must be at least 1 (or None), got {self.max_cpu_loras}")
        self.target_modules = tuple(self.target_modules)


@dataclass(frozen=True)
class AdapterRef:
    """A request's hold on one adapter version; `name` and `version` are its prefix-cache identity."""

    name: str
    version: int


@dataclass(frozen=True)
class ModuleWeights:
    """One target's adapter, ready for a slot: A [r, K] and s·B [N, r] in the model dtype, DoRA factor [N] fp32."""

    a: torch.Tensor
    b: torch.Tensor  # the scaling s is folded in (in fp32, rounded once)
    rescale: torch.Tensor | None


@dataclass
class _Version:
    name: str
    version: int
    path: Path
    modules: dict[str, ModuleWeights] | None  # None once freed
    rank: int
    use_dora: bool
    pinned: bool
    created: int = field(default_factory=lambda: int(time.time()))
    refs: int = 0
    retired: bool = False  # replaced or unloaded: freed when refs drops to zero
    slot: int | None = None
    last_used: int = -1

    @property
    def key(self) -> tuple[str, int]:
        return (self.name, self.version)

    def nbytes(self) -> int:
        if self.modules is None:
            return 0
        return sum(t.numel() * t.element_size() for w in self.modules.values()
                   for t in (w.a, w.b, w.rescale) if t is not None)


@dataclass(frozen=True)
class AdapterInfo:
    """What the API lists about a loaded adapter."""

    name: str
    version: int
    path: str
    rank: int
    use_dora: bool
    pinned: bool
    on_device: bool
    created: int


class AdapterRegistry:
    """Adapters by name over one model; see the module docstring for the life cycle."""

    def __init__(self, model: nn.Module, config: AdapterServingConfig):
        self.config = config
        self.model = model
        self.context = LoraStepContext()
        self.layers: list[ServingLoraLinear] = []  # filled by attach()
        self.targets: dict[str, tuple[ServingLoraLinear, int]] = {}  # target path -> (wrapper, slice)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self._cond = threading.Condition()
        self._load_lock = threading.Lock()  # one load at a time: the name checks and the swap stay simple
        self._current: dict[str, _Version] = {}
        self._versions: dict[tuple[str, int], _Version] = {}
        self._slots: list[_Version | None] = [None] * config.max_loras
        self._pinned: frozenset[tuple[str, int]] = frozenset()
        self._version_counter = itertools.count(1)
        self._clock = itertools.count()
        self.evictions = 0

    def attach(self) -> None:
        """Wrap the model's target projections (fused ones too) and allocate the slots. The model runner
        calls it once, after any fusion and before the KV cache is sized; nothing loads before it."""
        if self.layers:
            return
        cfg = self.config
        self.layers = inject_serving_lora(self.model, cfg.target_modules, self.context, cfg.max_loras,
                                          cfg.max_lora_rank)
        if not self.layers:
            raise ValueError(f"the model has no linear layers named {', '.join(cfg.target_modules)}")
        self.targets = {path: (w, i) for w in self.layers for i, path in enumerate(w.slice_paths)}
        logger.info("LoRA serving: %d targets in %d layers, %d slots of rank <= %d (%.1f MiB on %s)",
                    len(self.targets), len(self.layers), cfg.max_loras, cfg.max_lora_rank,
                    self.device_bytes() / 2**20, self.device)

    # -- loading ------------------------------------------------------------------------------
    def load(self, name: str, lora_path: str, pinned: bool = False) -> AdapterInfo:
        """Read, check and publish an adapter (a reload if `name` is loaded). Blocking: call off the event loop.

        Raises InvalidRequestError (HTTP 400) or AdapterNotFoundError (404) naming the problem; on error
        nothing changes.
        """
        _check_name(name)
        if not self.layers:
            raise RuntimeError("the adapter registry is not attached to its model yet")
        path = resolve_adapter_path(self.config.lora_root, lora_path)
        with self._load_lock:
            self._check_capacity(name, pinned)
            modules, rank, use_dora = self._read(path, lora_path)
            with self._cond:
                self._check_capacity(name, pinned)
                version = _Version(name, next(self._version_counter), path, modules, rank, use_dora, pinned)
                old = self._current.get(name)
                self._current[name] = version
                self._versions[version.key] = version
                if pinned:
                    self._pinned = self._pinned | {version.key}
                if old is not None:
                    self._retire(old)
        logger.info("adapter %r version %d loaded from %s (rank %d%s%s)", name, version.version, path, rank,
                    ", DoRA" if use_dora else "", ", pinned" if pinned else "")
        return self._info(version)

    def _check_capacity(self, name: str, pinned: bool) -> None:
        cap = self.config.max_cpu_loras
        others = [n for n in self._current if n != name]
        if cap is not None and len(others) >= cap:
            raise InvalidRequestError(f"{len(others)} adapters are loaded, the most this server holds "
                                      f"(max_cpu_loras={cap}); unload one first", "lora_name")
        if pinned:
            pinned_others = sum(1 for n in others if self._current[n].pinned)
            if pinned_others + 1 >= self.config.max_loras:
                raise InvalidRequestError(f"pinning would leave no device slot for unpinned adapters "
                                          f"({pinned_others} pinned, max_loras={self.config.max_loras})", "pinned")

    def _read(self, path: Path, shown: str) -> tuple[dict[str, ModuleWeights], int, bool]:
        """Parse and validate the directory; the host copy of every adapted layer."""
        try:
            adapter = read_adapter(path, dtype=torch.float32)
        except AdapterError as exc:
            raise InvalidRequestError(str(exc).replace(str(path), shown), "lora_path") from None
        config = adapter.config
        modules: dict[str, ModuleWeights] = {}
        rank = 0
        for module_path, parts in adapter.tensors.items():
            layer, index = self.targets.get(module_path, (None, 0))
            if layer is None:
                raise InvalidRequestError(
                    f"adapter {shown!r} targets module {module_path!r}, which this server does not adapt "
                    f"(served targets: {', '.join(self.config.target_modules)})", "lora_path")
            if not config.matches(module_path):
                raise InvalidRequestError(f"adapter {shown!r}: module {module_path!r} is not in its own "
                                          f"target_modules {config.target_modules!r}", "lora_path")
            a, b = parts["lora_A.weight"], parts["lora_B.weight"]
            r = a.shape[0]
            if r > self.config.max_lora_rank:
                raise InvalidRequestError(f"adapter {shown!r} has rank {r} at {module_path}, above this server's "
                                          f"max_lora_rank {self.config.max_lora_rank}", "lora_path")
            out_features = layer.slice_sizes[index]
            if a.shape[1] != layer.in_features or b.shape[0] != out_features:
                raise InvalidRequestError(
                    f"adapter {shown!r}: {module_path} expects a layer {a.shape[1]} -> {b.shape[0]}, the served "
                    f"model's is {layer.in_features} -> {out_features} (trained on another base model?)",
                    "lora_path")
            _, alpha = config.rank_and_alpha(module_path)
            scaling = lora_scaling(r, alpha, config.use_rslora)
            rescale = (self._dora_factor(layer.slice_weight(index), a, b, scaling, parts["lora_magnitude_vector"])
                       if config.use_dora else None)
            modules[module_path] = ModuleWeights(self._host(a), self._host(b * scaling), rescale)
            rank = max(rank, r)
        return modules, rank, config.use_dora

    @torch.no_grad()
    def _dora_factor(self, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
                     magnitude: torch.Tensor) -> torch.Tensor:
        """m / ||W + s B A||_row [N] in fp32 for the base weight W [N, K], on its device, a block of rows at a time."""
        a_dev = a.to(weight.device)
        norms = []
        for lo in range(0, weight.shape[0], NORM_ROWS):
            rows = weight[lo:lo + NORM_ROWS].float() + scaling * (b[lo:lo + NORM_ROWS].to(weight.device) @ a_dev)
            norms.append(torch.linalg.norm(rows, dim=1))
        factor = magnitude.to(weight.device) / torch.cat(norms)
        return self._host(factor, torch.float32)

    def _host(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A host copy for slot fills; page-locked when the model is on CUDA (faster copies)."""
        out = t.detach().to("cpu", dtype or self.dtype).contiguous()
        return out.pin_memory() if self.device.type == "cuda" else out

    # -- unloading ----------------------------------------------------------------------------
    def unload(self, name: str, timeout: float | None = None) -> bool:
        """Stop serving `name` now; wait (up to `timeout` s) for its in-flight requests, then free its memory.

        Returns True when everything was freed, False if requests were still running at the timeout
        (their version is then freed when the last one ends). Unknown names raise AdapterNotFoundError.
        """
        with self._cond:
            version = self._current.pop(name, None)
            if version is None:
                raise AdapterNotFoundError(f"adapter {name!r} is not loaded", "lora_name")
            keys = [key for key in self._versions if key[0] == name]  # a reload meanwhile is not waited for
            self._retire(version)
            done = self._cond.wait_for(lambda: not any(key in self._versions for key in keys), timeout)
        logger.info("adapter %r unloaded%s", name, "" if done else " (freed when its last request ends)")
        return done

    def _retire(self, version: _Version) -> None:
        version.retired = True
        if version.refs == 0:
            self._free(version)

    def _free(self, version: _Version) -> None:
        """Drop a version's host copy and slot (caller holds the lock)."""
        version.modules = None
        if version.slot is not None:
            self._slots[version.slot] = None
            version.slot = None
        self._versions.pop(version.key, None)
        self._pinned = self._pinned - {version.key}
        self._cond.notify_all()

    # -- requests -----------------------------------------------------------------------------
    def acquire(self, name: str) -> AdapterRef:
        """Hold the current version of `name` for one request; InvalidRequestError if it is not loaded."""
        with self._cond:
            version = self._current.get(name) if isinstance(name, str) else None
            if version is None:
                raise InvalidRequestError(f"adapter {name!r} is not loaded", "model")
            version.refs += 1
            return AdapterRef(version.name, version.version)

    def release(self, ref: AdapterRef) -> None:
        """End a request's hold; a retired version with no holders left is freed."""
        with self._cond:
            version = self._versions.get((ref.name, ref.version))
            if version is None:
                return
            version.refs -= 1
            if version.refs <= 0 and version.retired:
                self._free(version)

    # -- steps --------------------------------------------------------------------------------
    def fits(self, identities: Iterable[tuple]) -> bool:
        """Whether a batch using these adapter versions fits in the device slots (pinned ones included)."""
        return len(set(identities) | self._pinned) <= self.config.max_loras

    def prepare_step(self, adapters: Sequence[tuple | None], num_tokens: Sequence[int]) -> LoraBatch | None:
        """Make the step's adapters resident and group its tokens by slot.

        adapters[i] is sequence i's (name, version) or None; num_tokens[i] its token count this step.
        """
        slot_of, has_dora = self._assign_slots(adapters)
        if not slot_of:
            return None
        token_slots: list[int] = []
        for key, n in zip(adapters, num_tokens):
            token_slots.extend([slot_of[key] if key is not None else -1] * n)
        return LoraBatch(build_segments(token_slots, self.device), has_dora, max(slot_of.values()) + 1)

    def _assign_slots(self, adapters: Sequence[tuple | None]) -> tuple[dict[tuple, int], bool]:
        needed = {key for key in adapters if key is not None}
        slot_of: dict[tuple, int] = {}
        with self._cond:
            for key in sorted(needed, key=repr):
                version = self._versions.get(key)
                if version is None or version.modules is None:
                    raise RuntimeError(f"adapter {key!r} is scheduled but no longer loaded")
                if version.slot is None:
                    self._make_resident(version, needed)
                version.last_used = next(self._clock)
                slot_of[key] = version.slot
            return slot_of, any(self._versions[key].use_dora for key in needed)

    # -- CUDA graphs (decode) -----------------------------------------------------------------
    def enable_graphs(self, max_batch: int) -> None:
        """Allocate the static segment buffers decode graphs capture (one token per sequence)."""
        self._static = StaticSegments(max_batch, self.config.max_loras, self.device)

    def graph_chunk_sizes(self, batch_size: int) -> list[int]:
        """Chunk grids to capture a `batch_size`-row decode graph at (see `chunk_buckets`)."""
        return chunk_buckets(batch_size, self.config.max_loras)

    def graph_batch(self, batch_size: int, chunks: int | None = None) -> LoraBatch:
        """The LoraBatch a decode graph of `batch_size` rows and a grid of `chunks` chunks (default: the most
        that many rows can form) is captured with. The DoRA form is always used (LoRA slots have a factor
        of 1), so one graph serves every mix of adapters. A grid smaller than the largest also serves only
        slots below its chunk count (the stacked shrink's slot limit; see prepare_graph_step)."""
        largest = chunk_capacity(batch_size, self.config.max_loras)  # the last of graph_chunk_sizes
        limit = chunks if chunks is not None and chunks < min(largest, self.config.max_loras) else None
        return LoraBatch(self._static.view(batch_size, chunks), has_dora=True, slot_limit=limit)

    def prepare_graph_step(self, adapters: Sequence[tuple | None], batch_size: int) -> int:
        """Make a decode step's adapters resident and write its grouping into the graphs' buffers; returns
        the chunk grid the step needs: at least its chunk count and its highest slot + 1 (graph_batch),
        at most the largest grid (which serves every slot). The smallest captured grid holding it runs it."""
        slot_of, _ = self._assign_slots(adapters)
        chunks = self._static.fill([slot_of[key] if key is not None else -1 for key in adapters], batch_size)
        need = max(chunks, max(slot_of.values(), default=-1) + 1)
        return min(need, chunk_capacity(batch_size, self.config.max_loras))  # the largest grid serves every slot

    def _make_resident(self, version: _Version, protected: set) -> None:
        slot = next((i for i, v in enumerate(self._slots) if v is None), None)
        if slot is None:
            victims = [v for v in self._slots if v is not None and not v.pinned and v.key not in protected]
            if not victims:
                raise RuntimeError("no free adapter slot: the step uses more adapters than max_loras")
            victim = min(victims, key=lambda v: v.last_used)
            slot, victim.slot = victim.slot, None
            self.evictions += 1
        for layer in self.layers:
            layer.fill_slot(slot, [version.modules.get(path) for path in layer.slice_paths])
        self._slots[slot] = version
        version.slot = slot

    # -- observability ------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self._current

    def adapters(self) -> list[AdapterInfo]:
        """The loaded adapters (current versions), by name."""
        with self._cond:
            return [self._info(v) for _, v in sorted(self._current.items())]

    def _info(self, v: _Version) -> AdapterInfo:
        return AdapterInfo(v.name, v.version, str(v.path), v.rank, v.use_dora, v.pinned, v.slot is not None,
                           v.created)

    def host_bytes(self, name: str | None = None) -> int:
        """Bytes of host copies held by every live version (retiring ones included), or by `name`'s only."""
        with self._cond:
            return sum(v.nbytes() for v in self._versions.values() if name is None or v.name == name)

    def device_bytes(self) -> int:
        """Bytes of the slot tensors (allocated once, at start-up)."""
        return sum(layer.slot_bytes() for layer in self.layers) * self.config.max_loras

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"lora_adapters_resident": len(self._current),
                    "lora_adapters_on_device": sum(v is not None for v in self._slots),
                    "lora_evictions": self.evictions}


def _check_name(name: object) -> None:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise InvalidRequestError(f"lora_name {name!r} is not a valid adapter name: use 1-128 letters, digits "
                                  "and . _ : / @ + - (starting with a letter or digit)", "lora_name")


def parse_lora_specs(specs: Iterable[str]) -> list[tuple[str, str]]:
    """`NAME=PATH` command-line entries as (name, path) pairs."""
    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora expects NAME=PATH, got {spec!r}")
        out.append((name.strip(), path.strip()))
    return out
