"""Supervised fine-tuning: instruction data (or plain text) -> full, LoRA, DoRA or QLoRA training.

`run_sft(cfg)` is the entry point `ember finetune` wraps. The loss is next-token cross-entropy on the
labelled tokens only (assistant turns; every token for plain text). Packed sequences attend within
their own example (`SegmentCausalAttention`), so packing changes speed, not what is learned.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from engine.tokenizer import Tokenizer
from training.distributed import resolve_device
from training.finetune_config import FinetuneConfig
from training.finetune_loop import FinetuneJob, run_finetune
from training.finetune_model import load_for_finetuning
from training.sft_data import (IGNORE_INDEX, Example, collate, load_sft_examples, load_text_examples, pack)
from training.trainer import Batch, resolve_precision


class SegmentCausalAttention:
    """Attention backend for packed rows: causal, and only among tokens of the same example.

    segment_ids [B, T] numbers the examples of each row (-1 on padding; padding attends to padding).
    """

    def __init__(self, segment_ids: torch.Tensor):
        t = segment_ids.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=segment_ids.device).tril()
        same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, T, T]
        self.mask = (same & causal)[:, None]  # [B, 1, T, T]

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        groups = q.shape[2] // k.shape[2]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)
        return out.transpose(1, 2)


def sft_collate(pad_id: int):
    """A collate function; `segment_ids` is kept only for batches that hold packed rows."""
    def fn(examples: Sequence[Example]) -> Batch:
        batch = collate(examples, pad_id)
        if all(len(e.segments) <= 1 for e in examples):
            del batch["segment_ids"]
        return batch
    return fn


def token_logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Logits [B, T, V] of a collated batch (packed rows get per-example positions and attention)."""
    attn = SegmentCausalAttention(batch["segment_ids"]) if "segment_ids" in batch else None
    return model(batch["input_ids"], batch["positions"], attn)


def sft_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Summed cross-entropy (fp32) over the labelled positions."""
    logits = token_logits(model, batch)
    return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def count_targets(batch: Batch) -> int:
    return int((batch["labels"] != IGNORE_INDEX).sum())


def count_tokens(batch: Batch) -> int:
    return int(batch["input_ids"].numel())


def mean_loss_metrics(model: nn.Module, micro: list[Batch]) -> dict[str, float]:
    """Mean per-target loss and its perplexity over validation batches."""
    total, n = 0.0, 0
    for batch in micro:
        total += float(sft_loss(model, batch))
        n += count_targets(batch)
    loss = total / max(n, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "targets": float(n)}


def load_examples(cfg: FinetuneConfig, tokenizer: Tokenizer) -> tuple[list[Example], list[Example]]:
    """Training and validation examples as the data section says (text windows or instruction rows)."""
    d = cfg.data
    max_len = d.seq_len + 1  # one more token than the model sees: the last target
    if d.format == "text":
        train = load_text_examples(d.path, tokenizer, d.seq_len, d.range)
        val = load_text_examples(d.val_path, tokenizer, d.seq_len, d.val_range) if d.val_path else []
    else:
        train = load_sft_examples(d.path, tokenizer, max_len, d.format)
        val = load_sft_examples(d.val_path, tokenizer, max_len, d.format) if d.val_path else []
    if d.val_fraction and not d.val_path:
        cut = len(train) - max(1, int(len(train) * d.val_fraction))
        train, val = train[:cut], train[cut:]
    if d.max_examples is not None:
        train = train[: d.max_examples]
    if d.packing and d.format != "text":
        train, val = pack(train, max_len), pack(val, max_len)
    return train, val


def run_sft(cfg: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune `cfg.base` on `cfg.data` with `cfg.method`; writes the adapter or model to cfg.out_dir."""
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)
    tokenizer = Tokenizer.from_dir(cfg.base)
    train, val = load_examples(cfg, tokenizer)
    prepared = load_for_finetuning(cfg, device, precision.name)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else (min(tokenizer.eos_ids) if tokenizer.eos_ids else 0)
    job = FinetuneJob(cfg=cfg, prepared=prepared, precision=precision, train_set=train, val_set=val,
                      collate=sft_collate(pad_id), loss_fn=sft_loss, weight_fn=count_targets,
                      evaluate=mean_loss_metrics, count_tokens=count_tokens, kind="sft")
    return run_finetune(job)
