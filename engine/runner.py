"""SchedulerOutput -> flat batch tensors -> forward over the paged KV cache -> logits of the rows that matter.

Two separate halves, so a faster "execute" (CUDA graphs) can replace the plain one without touching
input preparation: `prepare_inputs` builds host tensors from block ids and token counts;
`execute_model` runs the model and keeps only the logits rows the sampler (or prompt log-probs) needs.

On CUDA (with Triton) the runner takes the fast path: the model's projections and norms are fused
(engine/fusion.py), RoPE is applied by the attention backend in the same kernel as the KV write,
and decode steps replay CUDA graphs (engine/cuda_graphs.py) unless `extra["enforce_eager"]` or
EMBER_ENFORCE_EAGER=1 asks for eager execution. Anywhere else the plain torch path runs.

A decode step planned before the previous step's tokens reached the host (engine/overlap.py) passes
those tokens as a device tensor, `execute(plan, input_ids)`; they replace the plan's placeholder ids.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from engine.attention import FusedRopePagedAttention, KVCache, PagedAttention, PagedAttentionMetadata
from engine.config import EngineConfig, env_switch
from engine.kernels import _dispatch
from engine.kernels.rope import build_cos_sin_cache
from engine.model import Transformer
from engine.scheduler import SchedulerOutput

logger = logging.getLogger(__name__)

CPU_DEFAULT_MIN_TOKENS = 8192
MAX_POOL_CONTEXTS = 4  # measured KV pools stop at this many times max_num_seqs full contexts


@dataclass(frozen=True)
class ModelInput:
    """One step's flat batch: all scheduled tokens in one row (batch 1)."""

    input_ids: torch.Tensor  # int64 [1, N]
    positions: torch.Tensor  # int64 [1, N]
    metadata: PagedAttentionMetadata
    logits_indices: torch.Tensor  # int64 [M]: token rows whose logits are computed
    sample_rows: dict[str, int]  # request id -> its row in the logits (last token of a finished prefill/decode)
    prompt_rows: dict[str, tuple[int, int, int]]  # request id -> (first logits row, start position, count)
    lora: Any = None  # LoraBatch: the tokens' adapter slots (None: base model only)
    graph_batch: int = 0  # > 0: a padded decode batch in the CUDA graphs' static buffers (engine/cuda_graphs.py)


@dataclass(frozen=True)
class ModelOutput:
    logits: torch.Tensor  # float32 [M, V]
    sample_rows: dict[str, int]
    prompt_rows: dict[str, tuple[int, int, int]]


class ModelRunner:
    """Owns the model and the KV cache tensors; turns scheduled token counts into logits."""

    def __init__(self, model: Transformer, config: EngineConfig, max_model_len: int, adapters: Any = None):
        self.model = model
        self.adapters = adapters  # AdapterRegistry when adapters are served
        self.config = config
        self.model_config = model.config
        self.max_model_len = max_model_len
        self.block_size = config.block_size
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        # Triton kernels on this device (CUDA, not disabled): fused model (norms folded into the
        # projections where the model allows and no adapters wrap them), RoPE fused into the KV write.
        self.use_kernels = _dispatch.use_triton(param)
        self.cos_sin_cache = None
        self.norms_folded = False
        if self.use_kernels:
            from engine.fusion import fuse_model
            from engine.norm_folding import can_fold, fold_norms, folding_enabled

            self.norms_folded = adapters is None and folding_enabled() and can_fold(model)
            if self.norms_folded:
                fold_norms(model)
            else:
                fuse_model(model)
            self.cos_sin_cache = build_cos_sin_cache(model.inv_freq.float(), max_model_len)
        if self.device.type == "cpu":  # int8 / int4 layers: the CPU kernels' packed weights, built now
            from engine.quant import prepare_cpu_layers

            start = time.perf_counter()
            if prepared := prepare_cpu_layers(model):
                logger.info("prepared %d quantized layers for the CPU kernels in %.1f s", prepared,
                            time.perf_counter() - start)
        if adapters is not None:  # wraps the (fused) projections; its slots are allocated before KV sizing
            adapters.attach()
        self.num_blocks = self._num_kv_blocks()
        mc = self.model_config
        self.kv_cache = KVCache(mc.num_hidden_layers, self.num_blocks, self.block_size, mc.num_key_value_heads,
                                mc.head_dim, self.dtype, self.device)
        self.graphs = None
        self.cuda_graph_capture_s = 0.0
        if self.use_kernels and self.device.type == "cuda":
            self._warm_up_prefill()
            if not self.enforce_eager:
                from engine.cuda_graphs import DecodeGraphs

                self.graphs = DecodeGraphs(model, self.kv_cache, self.cos_sin_cache, config.max_num_seqs,
                                           max_model_len, adapters=adapters)
                self.cuda_graph_capture_s = self.graphs.capture()

    @property
    def enforce_eager(self) -> bool:
        """Eager decode (no CUDA graphs), for debugging: extra["enforce_eager"] or EMBER_ENFORCE_EAGER=1."""
        env = env_switch("EMBER_ENFORCE_EAGER")
        return bool(self.config.extra.get("enforce_eager", False)) if env is None else env

    # -- KV sizing ------------------------------------------------------------------------------
    def _bytes_per_block(self) -> int:
        mc = self.model_config
        return KVCache.bytes_per_block(mc.num_hidden_layers, self.block_size, mc.num_key_value_heads, mc.head_dim,
                                       self.dtype)

    def _num_kv_blocks(self) -> int:
        """Configured size, or on CUDA what is left of gpu_memory_utilization after a warm-up at full batch."""
        if self.config.kv_cache_tokens is not None:
            return self.config.kv_cache_tokens // self.block_size
        if self.device.type != "cuda":
            tokens = max(4 * self.max_model_len, CPU_DEFAULT_MIN_TOKENS)
            return -(-tokens // self.block_size)
        return self._measure_cuda_blocks()

    @torch.inference_mode()
    def _measure_cuda_blocks(self) -> int:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        n = min(self.config.max_num_batched_tokens, self.max_model_len)
        ids = torch.zeros(1, n, dtype=torch.long, device=self.device)
        hidden = self.model.hidden_states(ids)  # causal SDPA over the largest step
        rows = min(self.config.max_num_seqs, n)
        self.model.compute_logits(hidden[0, :rows]).float()
        del hidden
        torch.cuda.synchronize(self.device)
        activations = torch.cuda.max_memory_allocated(self.device) - before
        # Return the warm-up's cached blocks first, so `used` is weights, context and other processes only.
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        used = total - free
        budget = total * self.config.gpu_memory_utilization - used - activations
        blocks = int(budget // self._bytes_per_block())
        if blocks <= 0:
            raise RuntimeError(f"no GPU memory left for the KV cache (budget {budget / 2**30:.2f} GiB); "
                               "raise gpu_memory_utilization or lower max_num_batched_tokens")
        # Small models would get millions of blocks; past a few full batches they only bloat the pool.
        blocks = min(blocks, -(-MAX_POOL_CONTEXTS * self.config.max_num_seqs * self.max_model_len // self.block_size))
        logger.info("KV cache: %d blocks of %d tokens (%.2f GiB)", blocks, self.block_size,
                    blocks * self._bytes_per_block() / 2**30)
        return blocks

    # -- per step -------------------------------------------------------------------------------
    @torch.inference_mode()
    def _warm_up_prefill(self) -> None:
        """One eager paged forward at the largest step, so kernels compile and autotune before the first request.

        A single sequence attends over the first blocks of the pool and writes nothing (slots -1).
        """
        start = time.perf_counter()
        n = min(self.config.max_num_batched_tokens, self.max_model_len)
        dev = self.device
        blocks = torch.arange(-(-n // self.block_size), dtype=torch.int32, device=dev) % self.num_blocks
        metadata = PagedAttentionMetadata(
            slot_mapping=torch.full((n,), -1, dtype=torch.long, device=dev), block_tables=blocks[None],
            context_lens=torch.tensor([n], dtype=torch.int32, device=dev),
            cu_seqlens_q=torch.tensor([0, n], dtype=torch.int32, device=dev), max_seqlen_q=n, max_context_len=n)
        positions = torch.arange(n, device=dev)[None]
        inp = ModelInput(input_ids=torch.zeros_like(positions), positions=positions, metadata=metadata,
                         logits_indices=torch.tensor([n - 1], device=dev), sample_rows={}, prompt_rows={})
        self.execute_model(inp)
        torch.cuda.synchronize(dev)
        logger.info("prefill warm-up (%d tokens) in %.1f s", n, time.perf_counter() - start)

    def prepare_inputs(self, plan: SchedulerOutput, input_ids: torch.Tensor | None = None) -> ModelInput:
        """Host-side flattening of the scheduled sequences into batch tensors.

        input_ids: int64 [N] on the device, the step's token ids when the plan's are not known on the host.
        """
        if self.graphs is not None and self.graphs.fits(plan):
            return self.graphs.prepare(plan, input_ids)  # padded into the graphs' static buffers
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        context_lens: list[int] = []
        cu = [0]
        logits_indices: list[int] = []
        sample_rows: dict[str, int] = {}
        prompt_rows: dict[str, tuple[int, int, int]] = {}
        # Block tables, zero padded: filled row by row in numpy (a nested list through torch.tensor
        # took 3x as long, ~3.7 ms a step at 256 sequences of 256 blocks on the development CPU).
        tables = np.zeros((len(plan.seqs), max(len(s.block_ids) for s in plan.seqs)), dtype=np.int32)
        for row, seq in enumerate(plan.seqs):
            n, start = len(seq.token_ids), seq.start_pos
            ids.extend(seq.token_ids)
            pos = range(start, start + n)
            positions.extend(pos)
            table = seq.block_ids
            if n == 1:
                slots.append(table[start // bs] * bs + start % bs)
            else:  # a prefill chunk: thousands of tokens, one vectorised pass rather than a Python loop
                p = np.arange(start, start + n)
                slots.extend((np.asarray(table, dtype=np.int64)[p // bs] * bs + p % bs).tolist())
            context_lens.append(start + n)
            tables[row, :len(table)] = table
            if seq.prompt_logprobs:  # every row; the last one doubles as the sampling row
                prompt_rows[seq.request_id] = (len(logits_indices), start, n)
                logits_indices.extend(range(cu[-1], cu[-1] + n))
                if seq.sample:
                    sample_rows[seq.request_id] = len(logits_indices) - 1
            elif seq.sample:
                sample_rows[seq.request_id] = len(logits_indices)
                logits_indices.append(cu[-1] + n - 1)
            cu.append(cu[-1] + n)
        dev = self.device
        metadata = PagedAttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long).to(dev, non_blocking=True),
            block_tables=torch.from_numpy(tables).to(dev, non_blocking=True),
            context_lens=torch.tensor(context_lens, dtype=torch.int32).to(dev, non_blocking=True),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32).to(dev, non_blocking=True),
            max_seqlen_q=max(len(s.token_ids) for s in plan.seqs),
            max_context_len=max(context_lens),
        )
        return ModelInput(
            input_ids=torch.tensor([ids], dtype=torch.long).to(dev, non_blocking=True) if input_ids is None
            else input_ids.view(1, -1),
            positions=torch.tensor([positions], dtype=torch.long).to(dev, non_blocking=True),
            metadata=metadata,
            logits_indices=torch.tensor(logits_indices, dtype=torch.long).to(dev, non_blocking=True),
            sample_rows=sample_rows,
            prompt_rows=prompt_rows,
            lora=self.adapters.prepare_step([s.adapter for s in plan.seqs], [len(s.token_ids) for s in plan.seqs])
            if self.adapters is not None else None,
        )

    @torch.inference_mode()
    def execute_model(self, inp: ModelInput) -> ModelOutput:
        """Forward the flat batch over the paged cache; logits only for the wanted rows."""
        if inp.graph_batch:
            return ModelOutput(logits=self.graphs.replay(inp), sample_rows=inp.sample_rows,
                               prompt_rows=inp.prompt_rows)
        if self.cos_sin_cache is not None:
            attn = FusedRopePagedAttention(self.kv_cache, inp.metadata, self.model_config.head_dim,
                                           self.cos_sin_cache, inp.positions[0])
        else:
            attn = PagedAttention(self.kv_cache, inp.metadata, self.model_config.head_dim)
        lora = self.adapters.context.use(inp.lora) if self.adapters is not None else contextlib.nullcontext()
        with lora:  # the adapter wrappers read the step's token slots from the context
            hidden = self.model.hidden_states(inp.input_ids, inp.positions, attn=attn)  # [1, N, d]
        logits = self.model.compute_logits(hidden[0, inp.logits_indices]).float()  # [M, V]
        return ModelOutput(logits=logits, sample_rows=inp.sample_rows, prompt_rows=inp.prompt_rows)

    def execute(self, plan: SchedulerOutput, input_ids: torch.Tensor | None = None) -> ModelOutput:
        """prepare_inputs then execute_model; nothing here waits for the device."""
        return self.execute_model(self.prepare_inputs(plan, input_ids))
