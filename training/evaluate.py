"""Held-out loss and perplexity of a checkpoint, with or without an adapter (`ember perplexity`)."""
from __future__ import annotations

import math
import os
from typing import Any, Sequence

import torch

from engine.adapter_io import load_adapter
from engine.checkpoint import load_model
from engine.tokenizer import Tokenizer
from training.distributed import resolve_device
from training.eval_ppl import stream_nll
from training.sft import mean_loss_metrics, sft_collate
from training.sft_data import DataFormatError, batches, load_sft_examples, read_text_range


def perplexity(model_dir: str | os.PathLike, data: str | os.PathLike, *, adapter_dir: str | None = None,
               fmt: str = "text", char_range: Sequence[float] = (0.0, 1.0), seq_len: int = 256,
               batch_size: int = 8, device: str = "auto") -> dict[str, Any]:
    """Mean next-token loss and perplexity (fp32) over `data`: text windows of seq_len, or instruction rows
    (assistant tokens only). The same windows are scored whatever the model, so runs compare exactly."""
    dev = resolve_device(device)
    model, _ = load_model(model_dir, dtype=torch.float32, device=dev)
    if adapter_dir:
        load_adapter(model, adapter_dir)
        model.to(dev)
    model.eval()
    head = {"model": str(model_dir), "adapter": adapter_dir, "data": str(data), "range": list(char_range),
            "seq_len": seq_len}
    tokenizer = Tokenizer.from_dir(model_dir)
    if fmt == "text":
        return {**head, **_text_metrics(model, tokenizer, data, char_range, seq_len, batch_size)}
    examples = load_sft_examples(data, tokenizer, seq_len + 1, fmt)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    collate = sft_collate(pad)
    micro = [{k: v.to(dev) for k, v in collate(b).items()}
             for b in batches(examples, batch_size, 0, 0, shuffle=False)]
    with torch.no_grad():
        metrics = mean_loss_metrics(model, micro)
    return {**head, "windows": len(examples), **metrics}


def _text_metrics(model, tokenizer, data, char_range, seq_len: int, batch_size: int) -> dict[str, Any]:
    """Back-to-back windows of seq_len inputs (+1 target) over the text slice, no BOS, as fine-tuning cuts it."""
    ids = tokenizer.encode(read_text_range(data, char_range), add_bos=False)
    if len(ids) < 2:
        raise DataFormatError(f"{data}: the text range holds fewer than two tokens")
    nll, count = stream_nll(model, ids, seq_len + 1, seq_len, batch_size)
    loss = nll / count
    return {"windows": -(-(len(ids) - 1) // seq_len), "loss": loss, "ppl": math.exp(min(loss, 50.0)),
            "targets": float(count)}
