"""Pretraining: build everything from a TrainConfig, run the loop, evaluate, checkpoint, export.

    pretrain(cfg, resume=True)

runs the same way on one CPU, one GPU or N processes under torchrun. Data order is a pure function of
the data position (windows consumed so far): step s of a global batch of G windows reads positions
[s*G, (s+1)*G), rank r of W its slice of G/W of them, split into micro-batches. Resuming restores the
position with the model, optimizer, schedule and RNG, so a resumed run repeats the losses of an
uninterrupted one exactly (deterministic CPU mode) whatever the process count.

Outputs under `cfg.out_dir`: config.yaml, metrics.jsonl, tb/, checkpoints/step_*/ (training state),
final/ (the model in the Hugging Face layout, `checkpoint.export_dtype`), loss_curve.png.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from engine.model import Transformer
from training.checkpointing import atomic_dir, latest_checkpoint, load_checkpoint, model_from_state, save_checkpoint
from training.config import TrainConfig, save_config
from training.data.token_shards import TokenShards, WindowSampler
from training.distributed import (DistInfo, all_reduce_sum, resolve_strategy, setup_distributed,
                                  teardown_distributed, unwrap_model, wrap_model)
from training.dropout import add_dropout
from training.flops import flops_per_token, mfu, peak_tflops
from training.logging import MetricLogger
from training.optim import build_optimizer
from training.schedule import build_scheduler
from training.trainer import Batch, Precision, Trainer, resolve_precision

EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class PretrainResult:
    """What a call of `pretrain` did: the steps it ran and where the results are."""

    out_dir: Path
    start_step: int
    final_step: int
    losses: list[float] = field(default_factory=list)  # one per step run in this call
    val_loss: float | None = None
    final_model: Path | None = None


def windows_per_step(cfg: TrainConfig, world: int) -> int:
    """G: windows in one optimizer step over all ranks."""
    return cfg.data.micro_batch_size * cfg.train.grad_accum_steps * world


def micro_batches(sampler: WindowSampler, position: int, cfg: TrainConfig, info: DistInfo) -> list[Batch]:
    """This rank's micro-batches of the step that starts at data position `position`."""
    mbs, accum = cfg.data.micro_batch_size, cfg.train.grad_accum_steps
    start = position + info.rank * mbs * accum
    out = []
    for m in range(accum):
        x, y = sampler.batch(start + m * mbs, mbs)
        out.append({"input_ids": torch.from_numpy(x), "labels": torch.from_numpy(y)})
    return out


def open_val_sampler(cfg: TrainConfig) -> WindowSampler | None:
    """Validation windows in file order: the `val` split of data.val (or of data.train), if it has tokens."""
    folder = cfg.data.val or cfg.data.train
    for split in ("val", "train") if cfg.data.val else ("val",):
        try:
            shards = TokenShards(folder, split)
        except (ValueError, FileNotFoundError):
            continue
        if shards.num_tokens > cfg.data.seq_len:
            return shards.sampler(cfg.data.seq_len, shuffle=False)
    return None


@torch.no_grad()
def evaluate(model: torch.nn.Module, sampler: WindowSampler, cfg: TrainConfig, info: DistInfo,
             precision: Precision) -> float:
    """Mean validation cross-entropy over the first `eval.batches` micro-batches (split across ranks)."""
    mbs = cfg.data.micro_batch_size
    n = max(1, min(cfg.eval.batches, len(sampler) // mbs))
    mbs = min(mbs, len(sampler))
    totals = torch.zeros(2, device=info.device, dtype=torch.float64)  # [loss sum, targets]
    was_training = model.training
    model.eval()
    for i in range(info.rank, n, info.world_size):
        x, y = sampler.batch(i * mbs, mbs)
        x, y = torch.from_numpy(x).to(info.device), torch.from_numpy(y).to(info.device)
        with precision.autocast():
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
        totals += torch.stack([loss.double(), torch.tensor(y.numel(), device=info.device, dtype=torch.float64)])
    model.train(was_training)
    all_reduce_sum(totals)
    return float(totals[0] / totals[1].clamp(min=1))


def sample_texts(model: torch.nn.Module, cfg: TrainConfig, precision: Precision, tokenizer) -> list[str]:
    """One seeded continuation of every `eval.prompts` entry (every rank runs it: FSDP needs them all)."""
    from engine.generate import generate_reference

    plain = unwrap_model(model)
    was_training = plain.training
    plain.eval()
    texts = []
    for i, prompt in enumerate(cfg.eval.prompts):
        ids = tokenizer.encode(prompt, add_bos=True)
        with precision.autocast():
            out = generate_reference(plain, ids, cfg.eval.max_new_tokens, temperature=cfg.eval.temperature,
                                     top_p=0.95, seed=cfg.seed + i, eos_ids=sorted(tokenizer.eos_ids),
                                     max_len=cfg.data.seq_len)
        texts.append(tokenizer.decode(ids + out))  # decoding together keeps the space at the seam
    plain.train(was_training)
    return texts


def _load_tokenizer(cfg: TrainConfig):
    if not cfg.data.tokenizer:
        return None
    from engine.tokenizer import Tokenizer

    return Tokenizer.from_dir(cfg.data.tokenizer)


def build_model(cfg: TrainConfig, info: DistInfo) -> Transformer:
    """The model of the config on this rank's device, initialised from `cfg.seed` (same on every rank)."""
    with torch.device(info.device):
        model = Transformer(cfg.model)
    model.init_weights(cfg.seed)
    model.gradient_checkpointing = cfg.train.gradient_checkpointing
    add_dropout(model, cfg.train.dropout)
    return model


def _set_determinism(cfg: TrainConfig, info: DistInfo) -> None:
    # Weights come from init_weights' own generator (same on every rank); the global generators drive
    # dropout, which must differ between ranks.
    torch.manual_seed(cfg.seed + info.rank)
    np.random.seed((cfg.seed + info.rank) % 2**32)
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


def export_model(model: torch.nn.Module, cfg: TrainConfig, out: Path, info: DistInfo) -> Path:
    """Write the model in the Hugging Face layout (export dtype, tokenizer files) to `out`, atomically."""
    from training.checkpointing import _full_model_state

    state = _full_model_state(model)
    if info.is_main:
        dtype = EXPORT_DTYPES[cfg.checkpoint.export_dtype]
        state = {k: v.detach().to("cpu", dtype) if v.is_floating_point() else v for k, v in state.items()}
        from engine.checkpoint import save_model

        with atomic_dir(out) as tmp:
            save_model(model_from_state(state, cfg.model), cfg.model, tmp, tokenizer_dir=cfg.data.tokenizer)
            save_config(cfg, tmp / "train_config.yaml")
    return out


def pretrain(cfg: TrainConfig, *, resume: bool = False, stop_at: int | None = None) -> PretrainResult:
    """Train `cfg` to `train.max_steps` (or until step `stop_at`, checkpointing there); see the module doc."""
    info = setup_distributed(cfg.train.device)
    try:
        return _run(cfg, info, resume, stop_at)
    finally:
        teardown_distributed()


@dataclass
class TrainingParts:
    """The live objects of a run: the (wrapped) model and what updates it."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    trainer: Trainer
    precision: Precision
    strategy: str


def build_training(cfg: TrainConfig, info: DistInfo) -> TrainingParts:
    """Model (compiled and wrapped for data parallelism as configured), AdamW, schedule and step runner."""
    strategy = resolve_strategy(cfg.parallel.strategy, info)
    precision = resolve_precision(cfg.train.precision, info.device)
    fsdp_dtype = precision.autocast_dtype if strategy == "fsdp" else None
    if fsdp_dtype is not None:  # FSDP casts parameters itself; autocast on top would only add casts
        precision = resolve_precision(precision.name, info.device, use_autocast=False)
    model = build_model(cfg, info)
    if cfg.train.compile:
        model = torch.compile(model)
    model = wrap_model(model, strategy, info, param_dtype=fsdp_dtype)
    optimizer = build_optimizer(unwrap_model(model), cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.schedule, cfg.train.max_steps)
    trainer = Trainer(model, optimizer, scheduler, precision=precision, max_grad_norm=cfg.train.max_grad_norm,
                      max_bad_steps=cfg.train.max_bad_steps)
    return TrainingParts(model, optimizer, scheduler, trainer, precision, strategy)


class _LogWindow:
    """Losses and wall time since the last log line, for averaged loss and tokens/s."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.losses: list[float] = []
        self.steps = 0
        self.t0 = time.perf_counter()

    def add(self, loss: float, skipped: bool) -> None:
        self.steps += 1
        if not skipped:
            self.losses.append(loss)

    def mean_loss(self) -> float:
        return sum(self.losses) / len(self.losses) if self.losses else float("nan")

    def tokens_per_s(self, tokens_per_step: int) -> float:
        return tokens_per_step * self.steps / max(time.perf_counter() - self.t0, 1e-9)

    @contextlib.contextmanager
    def paused(self):
        """Leave the time spent inside (evaluation, checkpoints) out of tokens/s."""
        start = time.perf_counter()
        yield
        self.t0 += time.perf_counter() - start


def _run(cfg: TrainConfig, info: DistInfo, resume: bool, stop_at: int | None) -> PretrainResult:
    _set_determinism(cfg, info)
    out = Path(cfg.out_dir)
    ckpt_root = out / "checkpoints"
    sampler = TokenShards(cfg.data.train, "train").sampler(cfg.data.seq_len, seed=cfg.seed)
    if sampler.shards.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"the data's tokenizer has {sampler.shards.vocab_size} tokens but model.vocab_size is "
                         f"{cfg.model.vocab_size}")
    val_sampler = open_val_sampler(cfg)
    tokenizer = _load_tokenizer(cfg)
    parts = build_training(cfg, info)
    model, trainer, precision = parts.model, parts.trainer, parts.precision

    step, position, found = 0, 0, latest_checkpoint(ckpt_root) if resume else None
    if found is not None:
        saved = load_checkpoint(found, model=model, optimizer=parts.optimizer, scheduler=parts.scheduler)
        step, position = saved["step"], saved["state"]["data_position"]
        trainer.load_state_dict(saved["state"].get("trainer", {}))
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    logger = MetricLogger(out, enabled=info.is_main, tensorboard=cfg.log.tensorboard, progress=cfg.log.progress,
                          total_steps=cfg.train.max_steps, start_step=step)
    if found is not None:
        logger.print(f"resumed from {found} at step {step}")
    G = windows_per_step(cfg, info.world_size)
    logger.print(f"{cfg.name}: {cfg.model.num_parameters() / 1e6:.2f}M parameters, {info.world_size} process(es) "
                 f"on {info.device.type}, {parts.strategy}, {precision.name}; {G} x {cfg.data.seq_len} tokens a "
                 f"step; {len(sampler)} windows an epoch")

    tokens_per_step = G * cfg.data.seq_len
    peak = cfg.train.peak_tflops or peak_tflops(info.device)
    result = PretrainResult(out_dir=out, start_step=step, final_step=step)
    window = _LogWindow()
    last_saved = step
    end = min(cfg.train.max_steps, stop_at) if stop_at is not None else cfg.train.max_steps

    def checkpoint() -> None:
        nonlocal last_saved
        with window.paused():
            save_checkpoint(ckpt_root, step, model=model, config=cfg.model, optimizer=parts.optimizer,
                            scheduler=parts.scheduler, tokenizer_dir=cfg.data.tokenizer,
                            keep_last=cfg.checkpoint.keep_last,
                            state={"data_position": position, "trainer": trainer.state_dict(),
                                   "config": cfg.to_dict()})
        last_saved = step

    while step < end:
        res = trainer.step(micro_batches(sampler, position, cfg, info))
        position += G
        step += 1
        result.losses.append(res.loss)
        window.add(res.loss, res.skipped)
        if res.skipped:
            logger.print(f"step {step}: update skipped (loss {res.loss}, grad norm {res.grad_norm}); "
                         f"{trainer.bad_steps} bad step(s) in a row")
        logger.progress(step, loss=res.loss, lr=res.lr)
        if step % cfg.log.every == 0 or step == end:
            tps = window.tokens_per_s(tokens_per_step)
            logger.log(step, {"loss": window.mean_loss(), "lr": res.lr, "grad_norm": res.grad_norm,
                              "tokens_per_s": tps, "mfu": mfu(tps, cfg.model, cfg.data.seq_len, peak, info.world_size),
                              "epoch": position / max(len(sampler), 1), "tokens": step * tokens_per_step})
            window.reset()
        if val_sampler is not None and cfg.eval.every and step % cfg.eval.every == 0 and step != cfg.train.max_steps:
            with window.paused():
                _eval_and_sample(model, val_sampler, cfg, info, precision, tokenizer, logger, step)
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
            checkpoint()

    result.final_step = step
    if step != last_saved:
        checkpoint()
    if step >= cfg.train.max_steps:
        if val_sampler is not None:
            result.val_loss = _eval_and_sample(model, val_sampler, cfg, info, precision, tokenizer, logger, step)
        result.final_model = export_model(model, cfg, out / "final", info)
        if info.is_main:
            from training.plot import plot_loss_curve

            plot_loss_curve(out / "metrics.jsonl", out / "loss_curve.png", title=cfg.name)
            logger.print(f"final model: {result.final_model}")
    logger.close()
    return result


def _eval_and_sample(model, val_sampler, cfg, info, precision, tokenizer, logger, step) -> float:
    val_loss = evaluate(model, val_sampler, cfg, info, precision)
    logger.log(step, {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))})
    if tokenizer is not None and cfg.eval.prompts and cfg.eval.max_new_tokens:
        for text in sample_texts(model, cfg, precision, tokenizer):
            logger.text(step, "sample", text.replace("\n", " / "))
    return val_loss
