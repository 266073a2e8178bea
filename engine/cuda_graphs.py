"""CUDA graphs for decode steps: one graph per batch-size bucket, replayed with padded inputs.

A decode step (every sequence brings one token) launches the same few hundred small kernels
each time; captured once into a CUDA graph, a step costs one launch. Graphs are captured for
buckets 1, 2, 4, 8, 16, 24, 32, ... up to max_num_seqs; a batch of n sequences runs in the
smallest bucket >= n, its extra rows padded so that they do no harm: token 0 at position 0,
cache slot -1 (nothing written) and context length 0 (the attention kernel returns zeros).

Inputs live in static device buffers the graphs were captured on. Each step the host packs
ids, positions, slots and context lengths into one pinned array and the block tables into a
second, and copies both to the device (two transfers, no other launches before the replay). A step
planned before its tokens reached the host (overlapped decode, engine/overlap.py) then copies them
from the previous step's sampled-token tensor into the ids row: same stream, so after the transfer
and after the previous replay has read the buffer.
Logits come out of the graph as float32 rows of one buffer shared by all buckets; sampling runs
outside it. Prefill and mixed steps run eagerly. Capture takes a warm-up forward and a capture
forward per graph (longer the first time Triton compiles): see docs/performance.md.

With adapters, each bucket also gets adapter graphs running the batched-LoRA kernels, one per
chunk-grid size (4, 8, 16, ... up to the most chunks the bucket's rows can form over the slots:
`chunk_buckets`); a step replays the smallest that holds its real chunks, so a step with one
adapter launches a grid for 4 chunks, not 36. That is about log2 of the bucket's chunk capacity in
adapter graphs per bucket: 26 for the defaults (64 sequences, 8 slots) and 36 for 32 slots, against
11 plain ones. Capture time grows in proportion (each graph is a warm-up and a capture forward);
graph memory hardly, as every graph shares one memory pool and only one runs at a time.
"""
from __future__ import annotations

import bisect
import contextlib
import logging
import time
from typing import Any, Sequence

import numpy as np
import torch

from engine.attention import FusedRopePagedAttention, KVCache, PagedAttentionMetadata
from engine.runner import ModelInput
from engine.scheduler import ScheduledSeq, SchedulerOutput

logger = logging.getLogger(__name__)

MAX_CAPTURED_BATCH = 512  # larger decode batches run eagerly (launch overhead is small next to their work)
WARMUP_CONTEXT = 256  # context each row attends over while kernels autotune before capture

# Rows of the packed per-sequence array.
IDS, POSITIONS, SLOTS, CONTEXT_LENS = range(4)


def graph_batch_sizes(max_num_seqs: int, cap: int = MAX_CAPTURED_BATCH) -> list[int]:
    """Buckets to capture: 1, 2, 4, 8, then every multiple of 8, and the largest batch itself."""
    top = min(max_num_seqs, cap)
    sizes = {s for s in (1, 2, 4) if s < top} | set(range(8, top + 1, 8)) | {top}
    return sorted(sizes)


def bucket_for(n: int, sizes: Sequence[int]) -> int | None:
    """The smallest captured batch size that holds n rows, None when n exceeds them all."""
    i = bisect.bisect_left(sizes, n)
    return sizes[i] if i < len(sizes) else None


def is_decode(plan: SchedulerOutput) -> bool:
    """One query token per sequence, every row sampled, no prompt log-probs: what a decode graph computes."""
    return bool(plan.seqs) and all(len(s.token_ids) == 1 and s.sample and not s.prompt_logprobs
                                   for s in plan.seqs)


def pack_decode(seqs: Sequence[ScheduledSeq], block_size: int, bucket: int, vec: np.ndarray,
                tables: np.ndarray) -> int:
    """Write a decode batch, padded to `bucket` rows, into host arrays; returns the block-table width.

    vec: int32 [4, >= bucket] (ids, positions, slots, context lengths by row); every row past the batch
    becomes padding, past the bucket too. The whole array goes to the device, so an earlier, larger
    step must leave nothing there: a step planned ahead packs placeholder ids and only its own rows
    get their real ids on the device, so a larger graph replayed on the leftover inputs (as a
    benchmark does) would embed an earlier step's placeholders.
    tables: flat int32 buffer; its first bucket * width entries become the [bucket, width] table.
    """
    n = len(seqs)
    width = max(len(s.block_ids) for s in seqs)
    vec[IDS, :n] = [s.token_ids[0] for s in seqs]
    vec[POSITIONS, :n] = [s.start_pos for s in seqs]
    vec[SLOTS, :n] = [s.block_ids[s.start_pos // block_size] * block_size + s.start_pos % block_size for s in seqs]
    vec[CONTEXT_LENS, :n] = [s.start_pos + 1 for s in seqs]
    vec[IDS:CONTEXT_LENS + 1, n:] = 0
    vec[SLOTS, n:] = -1
    table = tables[:bucket * width].reshape(bucket, width)
    for i, s in enumerate(seqs):
        table[i, :len(s.block_ids)] = s.block_ids
    table[n:] = 0
    return width


class DecodeGraphs:
    """Captured decode forwards per bucket, their static inputs and outputs."""

    def __init__(self, model: torch.nn.Module, kv_cache: KVCache, cos_sin_cache: torch.Tensor, max_num_seqs: int,
                 max_model_len: int, adapters: Any = None):
        self.model = model
        self.adapters = adapters  # AdapterRegistry: its batched-LoRA kernels are captured too
        self.kv_cache = kv_cache
        self.cos_sin_cache = cos_sin_cache
        self.block_size = kv_cache.block_size
        self.head_dim = model.config.head_dim
        self.sizes = graph_batch_sizes(max_num_seqs)
        self.max_batch = self.sizes[-1]
        self.max_blocks = -(-max_model_len // self.block_size)
        dev = cos_sin_cache.device
        # Static device inputs: every captured graph reads (a prefix of) these.
        self.vec = torch.zeros(4, self.max_batch, dtype=torch.int32, device=dev)
        self.vec[SLOTS] = -1
        self.tables = torch.zeros(self.max_batch, self.max_blocks, dtype=torch.int32, device=dev)
        self.cu_seqlens = torch.arange(self.max_batch + 1, dtype=torch.int32, device=dev)
        self.rows = torch.arange(self.max_batch, device=dev)
        # One output buffer for every bucket (a graph writes its first rows), not one per graph.
        self.logits = torch.empty(self.max_batch, model.config.vocab_size, dtype=torch.float32, device=dev)
        # Host staging (pinned, so the copies are asynchronous) and numpy views to fill it fast.
        self.host_vec = torch.zeros(4, self.max_batch, dtype=torch.int32).pin_memory()
        self.host_tables = torch.zeros(self.max_batch * self.max_blocks, dtype=torch.int32).pin_memory()
        self.np_vec, self.np_tables = self.host_vec.numpy(), self.host_tables.numpy()
        self._views: dict[int, tuple] = {}  # n rows -> (ids, positions, logits rows, metadata) views
        self.copied = torch.cuda.Event()  # the staging buffers may be rewritten once this has passed
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # The same with the batched-LoRA kernels, by (batch size, chunk-grid size).
        self.adapter_graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.chunk_sizes: dict[int, list[int]] = {}  # chunk grids captured per batch size
        if adapters is not None:
            adapters.enable_graphs(self.max_batch)
            self.chunk_sizes = {bs: adapters.graph_chunk_sizes(bs) for bs in self.sizes}
        self.capture_seconds = 0.0

    # -- capture --------------------------------------------------------------------------------
    def _metadata(self, bs: int) -> PagedAttentionMetadata:
        return PagedAttentionMetadata(slot_mapping=self.vec[SLOTS, :bs], block_tables=self.tables[:bs],
                                      context_lens=self.vec[CONTEXT_LENS, :bs], cu_seqlens_q=self.cu_seqlens[:bs + 1],
                                      max_seqlen_q=1, max_context_len=None)

    def _forward(self, bs: int, chunks: int | None = None) -> None:
        """The captured computation: decode forward of the first bs static rows into self.logits[:bs] (float32);
        with the batched-LoRA kernels over a grid of `chunks` chunks unless that is None."""
        positions = self.vec[POSITIONS, :bs]
        attn = FusedRopePagedAttention(self.kv_cache, self._metadata(bs), self.head_dim, self.cos_sin_cache,
                                       positions)
        lora = contextlib.nullcontext()
        if chunks is not None:
            lora = self.adapters.context.use(self.adapters.graph_batch(bs, chunks))
        with lora:
            hidden = self.model.hidden_states(self.vec[IDS, :bs].view(1, bs), positions.view(1, bs), attn=attn)
        self.logits[:bs].copy_(self.model.compute_logits(hidden[0]))

    @torch.inference_mode()
    def capture(self) -> float:
        """Warm up and capture every bucket, largest first (the smaller ones reuse its memory pool)."""
        start = time.perf_counter()
        # Warm-up rows attend over real blocks (so autotuning times real work) but write nothing.
        ctx = min(WARMUP_CONTEXT, self.max_blocks * self.block_size)
        self.vec[CONTEXT_LENS] = ctx
        self.tables.copy_(torch.arange(self.max_blocks, dtype=torch.int32).remainder(self.kv_cache.num_blocks))
        pool = None
        # With adapters, more graphs per size run the batched-LoRA kernels (one per chunk grid, largest
        # first); steps without adapter tokens replay the plain one.
        for bs in reversed(self.sizes):
            for chunks in [None] + sorted(self.chunk_sizes.get(bs, ()), reverse=True):
                self._forward(bs, chunks)  # compiles and autotunes the kernels outside the capture
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._forward(bs, chunks)
                pool = graph.pool()
                if chunks is None:
                    self.graphs[bs] = graph
                else:
                    self.adapter_graphs[(bs, chunks)] = graph
        self.vec[CONTEXT_LENS] = 0
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - start
        logger.info("CUDA graphs: captured %d decode batch sizes (1..%d), %d adapter graphs, in %.1f s",
                    len(self.sizes), self.max_batch, len(self.adapter_graphs), self.capture_seconds)
        return self.capture_seconds

    # -- per step -------------------------------------------------------------------------------
    def fits(self, plan: SchedulerOutput) -> bool:
        return len(plan.seqs) <= self.max_batch and is_decode(plan)

    def prepare(self, plan: SchedulerOutput, input_ids: torch.Tensor | None = None) -> ModelInput:
        """Pack the decode batch into the static buffers (two host-to-device copies, no sync).

        input_ids: int64 [n] on the device, replacing the plan's token ids (not known on the host yet).
        """
        n = len(plan.seqs)
        bs = bucket_for(n, self.sizes)
        self.copied.synchronize()  # the previous step's copies have left the staging buffers
        width = pack_decode(plan.seqs, self.block_size, bs, self.np_vec, self.np_tables)
        ids, positions, rows, metadata = self._step_views(n, bs)
        self.vec.copy_(self.host_vec, non_blocking=True)
        if input_ids is not None:  # after the packed row's copy on this stream, so it wins
            ids.copy_(input_ids.view(1, n))
        self.tables[:bs, :width].copy_(self.host_tables[:bs * width].view(bs, width), non_blocking=True)
        self.copied.record()
        lora = None
        if self.adapters is not None and any(s.adapter is not None for s in plan.seqs):
            # Into the buffers the graphs read; the smallest chunk grid holding the step's chunks runs it.
            chunks = self.adapters.prepare_graph_step([s.adapter for s in plan.seqs], bs)
            lora = self.adapters.graph_batch(bs, bucket_for(chunks, self.chunk_sizes[bs]))
        return ModelInput(
            input_ids=ids,
            positions=positions,
            metadata=metadata,
            logits_indices=rows,
            sample_rows={s.request_id: i for i, s in enumerate(plan.seqs)},
            prompt_rows={},
            lora=lora,
            graph_batch=bs,
        )

    def _step_views(self, n: int, bs: int) -> tuple:
        """Views of the static buffers for an n-row step in bucket bs, made once (each tensor view
        costs microseconds of host time, and a batch-1 step has about a millisecond in all)."""
        views = self._views.get(n)
        if views is None:
            views = self._views[n] = (self.vec[IDS, :n].view(1, n), self.vec[POSITIONS, :n].view(1, n),
                                      self.rows[:n], self._metadata(bs))
        return views

    def replay(self, inp: ModelInput) -> torch.Tensor:
        """Run the captured step; float32 logits [n, V], a view valid until the next replay."""
        self.graph_for(inp).replay()
        return self.logits[: inp.logits_indices.shape[0]]

    def graph_for(self, inp: ModelInput) -> torch.cuda.CUDAGraph:
        """The captured graph that runs a prepared step (its adapter grid is the LoraBatch's chunk count)."""
        if inp.lora is None:
            return self.graphs[inp.graph_batch]
        return self.adapter_graphs[(inp.graph_batch, inp.lora.segments.num_chunks)]
