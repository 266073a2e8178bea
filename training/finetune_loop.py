"""The fine-tuning loop shared by SFT and DPO: step, log, evaluate, checkpoint, resume, export.

What differs between SFT and DPO (the examples, how they are batched, the loss, the validation
metrics) comes in a `FinetuneJob`; the optimizer step itself is `training.trainer.Trainer`.
Resuming: when `<out_dir>/checkpoints` holds a complete checkpoint, the run continues from it; the
data order is a function of (seed, epoch), so the resumed run sees the batches it would have seen.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from engine.adapter_io import save_adapter
from engine.checkpoint import copy_tokenizer_files, save_model
from training.adapter_checkpoint import load_adapter_checkpoint, save_adapter_checkpoint
from training.checkpointing import latest_checkpoint, load_checkpoint, save_checkpoint
from training.finetune_config import FinetuneConfig, save_finetune_config
from training.finetune_model import Prepared
from training.logging import MetricLogger
from training.optim import build_optimizer
from training.schedule import build_scheduler
from training.sft_data import batches
from training.trainer import Batch, Precision, Trainer

SUMMARY_FILE = "finetune_summary.json"


@dataclass
class FinetuneJob:
    """Everything the loop needs besides the config.

    collate: a micro-batch of examples -> tensors. loss_fn(model, batch) -> summed loss; weight_fn(batch)
    -> how many items that sum covers. evaluate(model, batches) -> validation metrics (a dict of floats).
    count_tokens(batch) -> tokens processed, for throughput.
    """

    cfg: FinetuneConfig
    prepared: Prepared
    precision: Precision
    train_set: Sequence[Any]
    val_set: Sequence[Any]
    collate: Callable[[Sequence[Any]], Batch]
    loss_fn: Callable[[nn.Module, Batch], torch.Tensor]
    weight_fn: Callable[[Batch], int]
    evaluate: Callable[[nn.Module, list[Batch]], dict[str, float]]
    count_tokens: Callable[[Batch], int]
    kind: str = "sft"


def total_steps(cfg: FinetuneConfig, num_examples: int) -> int:
    """train.max_steps, or ceil(epochs * micro-batches per epoch / accumulation) when epochs is set."""
    if cfg.epochs is None:
        return cfg.train.max_steps
    per_epoch = math.ceil(num_examples / cfg.data.micro_batch_size)
    return max(1, math.ceil(cfg.epochs * per_epoch / cfg.train.grad_accum_steps))


class MicroBatches:
    """The micro-batch stream: global index g -> (epoch, position) -> examples, reshuffled per epoch."""

    def __init__(self, examples: Sequence[Any], size: int, seed: int):
        self.examples, self.size, self.seed = examples, size, seed
        self.per_epoch = math.ceil(len(examples) / size)
        self._epoch, self._order = -1, []

    def __getitem__(self, index: int) -> list[Any]:
        epoch, pos = divmod(index, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, batches(self.examples, self.size, self.seed, epoch)
        return self._order[pos]


def run_finetune(job: FinetuneJob) -> dict[str, Any]:
    """Train, evaluate and export; returns (and writes) the run summary."""
    cfg, model = job.cfg, job.prepared.model
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_finetune_config(cfg, out / "finetune_config.yaml")
    steps = total_steps(cfg, len(job.train_set))
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.schedule, steps)
    trainer = Trainer(model, optimizer, scheduler, precision=job.precision, max_grad_norm=cfg.train.max_grad_norm,
                      max_bad_steps=cfg.train.max_bad_steps, loss_fn=job.loss_fn, weight_fn=job.weight_fn)
    start, state = _resume(job, optimizer, scheduler, trainer)
    logger = MetricLogger(out, tensorboard=cfg.log.tensorboard, progress=cfg.log.progress,
                          total_steps=steps, start_step=start)
    logger.print(f"{cfg.method} {job.kind}: {len(job.train_set)} training examples, {len(job.val_set)} validation, "
                 f"{steps} steps; trainable parameters {job.prepared.trainable_params:,} of "
                 f"{job.prepared.total_params:,}")
    if start == 0 and job.val_set:
        state["val_start"] = _validate(job)
        logger.log(0, {f"val_{k}": v for k, v in state["val_start"].items()})
    stream = MicroBatches(job.train_set, cfg.data.micro_batch_size, cfg.seed)
    accum = cfg.train.grad_accum_steps
    tokens, clock = 0, time.perf_counter()
    for step in range(start, steps):
        micro = [job.collate(stream[step * accum + k]) for k in range(accum)]
        result = trainer.step(micro)
        tokens += sum(job.count_tokens(b) for b in micro)
        done = step + 1
        logger.progress(done, loss=result.loss)
        if done % cfg.log.every == 0 or done == steps:
            elapsed = time.perf_counter() - clock
            logger.log(done, {"loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm,
                              "tokens_per_s": tokens / max(elapsed, 1e-9), "skipped": result.skipped})
            tokens, clock = 0, time.perf_counter()
        if cfg.eval.every and done % cfg.eval.every == 0 and done < steps and job.val_set:
            logger.log(done, {f"val_{k}": v for k, v in _validate(job).items()})
        state["last_loss"] = result.loss
        if cfg.checkpoint.every and done % cfg.checkpoint.every == 0 and done < steps:
            _save_checkpoint(job, done, optimizer, scheduler, {**state, "trainer": trainer.state_dict()})
    if job.val_set:
        state["val_end"] = _validate(job)
        logger.log(steps, {f"val_{k}": v for k, v in state["val_end"].items()})
    summary = _export(job, steps, state)
    logger.print(f"wrote {summary['output']}")
    logger.close()
    return summary


def _validate(job: FinetuneJob) -> dict[str, float]:
    model = job.prepared.model
    micro = [job.collate(b) for b in batches(job.val_set, job.cfg.data.micro_batch_size, 0, 0, shuffle=False)]
    if job.cfg.eval.batches:
        micro = micro[: job.cfg.eval.batches]
    device = next(p for p in model.parameters() if p.requires_grad).device
    micro = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in micro]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), job.precision.autocast():
            return job.evaluate(model, micro)
    finally:
        model.train(was_training)


def _checkpoint_root(cfg: FinetuneConfig) -> Path:
    return Path(cfg.out_dir) / "checkpoints"


def _save_checkpoint(job: FinetuneJob, step: int, optimizer, scheduler, state: dict[str, Any]) -> None:
    cfg, prepared = job.cfg, job.prepared
    if prepared.lora_config is not None:
        save_adapter_checkpoint(_checkpoint_root(cfg), step, model=prepared.model, lora_config=prepared.lora_config,
                                optimizer=optimizer, scheduler=scheduler, state=state,
                                base_model_name_or_path=cfg.base, keep_last=cfg.checkpoint.keep_last)
    else:
        save_checkpoint(_checkpoint_root(cfg), step, model=prepared.model, config=prepared.config,
                        optimizer=optimizer, scheduler=scheduler, state=state, tokenizer_dir=cfg.base,
                        keep_last=cfg.checkpoint.keep_last)


def _resume(job: FinetuneJob, optimizer, scheduler, trainer: Trainer) -> tuple[int, dict[str, Any]]:
    latest = latest_checkpoint(_checkpoint_root(job.cfg))
    if latest is None:
        return 0, {}
    model = job.prepared.model
    if job.prepared.lora_config is not None:
        saved = load_adapter_checkpoint(latest, model=model, optimizer=optimizer, scheduler=scheduler)
    else:
        saved = load_checkpoint(latest, model=model, optimizer=optimizer, scheduler=scheduler)
    state = dict(saved.get("state") or {})
    trainer.load_state_dict(state.pop("trainer", {}))
    print(f"resuming from {latest} (step {saved['step']})", flush=True)
    return int(saved["step"]), state


def _export(job: FinetuneJob, steps: int, state: dict[str, Any]) -> dict[str, Any]:
    cfg, prepared = job.cfg, job.prepared
    out = Path(cfg.out_dir)
    if prepared.lora_config is not None:
        save_adapter(prepared.model, prepared.lora_config, out, base_model_name_or_path=cfg.base)
    else:
        model = prepared.model.to(dtype=getattr(torch, cfg.checkpoint.export_dtype))
        save_model(model, prepared.config, out, tokenizer_dir=cfg.base)
    copy_tokenizer_files(cfg.base, out)
    summary = {
        "kind": job.kind, "method": cfg.method, "base": cfg.base, "data": cfg.data.path, "steps": steps,
        "trainable_params": prepared.trainable_params, "total_params": prepared.total_params,
        "train_examples": len(job.train_set), "val_examples": len(job.val_set),
        "final_train_loss": state.get("last_loss"), "val_start": state.get("val_start"),
        "val_end": state.get("val_end"), "output": str(out),
    }
    with open(out / SUMMARY_FILE, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    return summary
