"""One optimizer step over several micro-batches: accumulation, mixed precision, clipping, NaN/inf policy.

`Trainer.step(micro_batches)` is the whole inner loop; pretraining, SFT, LoRA and DPO differ only in the
batches they feed and the `loss_fn` they pass.

Loss normalisation: `loss_fn` returns a *sum* over the batch's targets and `weight_fn` counts those
targets. Each micro-batch's sum is divided by the target count of the whole step on all ranks, so the
gradient is the mean over every target of the step no matter how the targets are split across
micro-batches and processes (padding-heavy SFT batches included). DDP/FSDP average gradients over
ranks, so the local loss is multiplied by the world size to turn that average back into the sum.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from training.distributed import all_reduce_sum, grad_sync, world_size

IGNORE_INDEX = -100
Batch = dict[str, torch.Tensor]


class NonFiniteLossError(RuntimeError):
    """Too many consecutive optimizer steps had a NaN/inf loss or gradient norm."""


def causal_lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Summed next-token cross-entropy (fp32) over `labels != -100`; `labels` are already shifted."""
    logits = model(batch["input_ids"])  # [B, T, V]
    return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def count_targets(batch: Batch) -> int:
    """Number of positions that contribute to `causal_lm_loss`."""
    return int((batch["labels"] != IGNORE_INDEX).sum())


@dataclass
class Precision:
    """How the forward runs: an autocast dtype (None = fp32) and, for fp16, a gradient scaler."""

    name: str = "fp32"
    device_type: str = "cpu"
    autocast_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.autocast_dtype)


def resolve_precision(name: str, device: torch.device, use_autocast: bool = True) -> Precision:
    """Turn `auto|fp32|bf16|fp16` into a Precision for `device`.

    auto: bf16 on a CUDA device that supports it, fp32 elsewhere. fp16 gets a GradScaler (its narrow
    exponent range underflows small gradients otherwise). `use_autocast=False` keeps the name but no
    autocast, for FSDP's own mixed-precision policy.
    """
    if name == "auto":
        name = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"unknown precision {name!r}; use auto, fp32, bf16 or fp16")
    dtype = dtypes[name] if use_autocast else None
    scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None
    return Precision(name=name, device_type=device.type, autocast_dtype=dtype, scaler=scaler)


@dataclass
class StepResult:
    """What one optimizer step did. `loss` is the mean over all targets of the step on all ranks."""

    loss: float
    grad_norm: float
    lr: float
    targets: int  # targets (tokens with a label) in the step, all ranks
    skipped: bool  # True: the update was not applied (non-finite loss/gradient, or fp16 overflow)


class Trainer:
    """Owns the model, optimizer, scheduler and precision, and performs optimizer steps.

    model: the module to call (may be DDP-, FSDP- or compile-wrapped).
    loss_fn(model, batch) -> summed loss (a 0-dim tensor); weight_fn(batch) -> how many targets it sums.
    max_grad_norm: clip the global gradient norm to this (None or 0: measure only).
    max_bad_steps: raise NonFiniteLossError after this many consecutive non-finite steps.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, *,
                 precision: Precision | None = None, max_grad_norm: float | None = 1.0, max_bad_steps: int = 3,
                 loss_fn: Callable[[nn.Module, Batch], torch.Tensor] = causal_lm_loss,
                 weight_fn: Callable[[Batch], int] = count_targets):
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.precision = precision or Precision()
        self.max_grad_norm = max_grad_norm
        self.max_bad_steps = max_bad_steps
        self.loss_fn = loss_fn
        self.weight_fn = weight_fn
        self.bad_steps = 0  # consecutive non-finite steps
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.device = self.params[0].device if self.params else torch.device("cpu")

    def step(self, micro_batches: Sequence[Batch]) -> StepResult:
        """Forward/backward every micro-batch, then clip and update once (or skip a non-finite step)."""
        if not micro_batches:
            raise ValueError("a step needs at least one micro-batch")
        batches = [self._to_device(b) for b in micro_batches]
        weight = torch.tensor(float(sum(self.weight_fn(b) for b in batches)), device=self.device)
        total_weight = all_reduce_sum(weight).item()
        scale = world_size() / max(total_weight, 1.0)
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float32)
        scaler = self.precision.scaler
        for i, batch in enumerate(batches):
            with grad_sync(self.model, enabled=i == len(batches) - 1), self.precision.autocast():
                loss = self.loss_fn(self.model, batch)
            loss_sum += loss.detach().float()
            scaled = loss * scale
            (scaler.scale(scaled) if scaler else scaled).backward()
        mean_loss = all_reduce_sum(loss_sum).item() / max(total_weight, 1.0)
        lr = self.optimizer.param_groups[0]["lr"]
        if scaler:
            scaler.unscale_(self.optimizer)
        grad_norm = self._clip()
        finite = math.isfinite(mean_loss) and (math.isfinite(grad_norm) or scaler is not None)
        if finite:
            if scaler:  # the scaler skips the update itself when fp16 gradients overflowed
                scale_before = scaler.get_scale()
                scaler.step(self.optimizer)
                scaler.update()
                skipped = scaler.get_scale() < scale_before
            else:
                self.optimizer.step()
                skipped = False
            self.bad_steps = 0
        else:
            skipped = True
            self.bad_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        # The schedule follows the step count even for skipped steps: the data of the step was consumed.
        if self.scheduler is not None:
            self.scheduler.step()
        if self.bad_steps >= self.max_bad_steps:
            raise NonFiniteLossError(f"{self.bad_steps} consecutive steps had a non-finite loss or gradient "
                                     f"(last loss {mean_loss}, grad norm {grad_norm}); lower the learning rate, "
                                     "check the data, or resume from an earlier checkpoint")
        return StepResult(loss=mean_loss, grad_norm=grad_norm, lr=lr, targets=int(total_weight), skipped=skipped)

    def _clip(self) -> float:
        limit = self.max_grad_norm if self.max_grad_norm else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.params, limit, foreach=self.device.type == "cuda")
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor norm
            norm = norm.full_tensor()
        return float(norm)

    def _to_device(self, batch: Batch) -> Batch:
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()}

    def state_dict(self) -> dict[str, Any]:
        """JSON-safe loop state (the optimizer and scheduler are saved by the checkpoint code)."""
        state: dict[str, Any] = {"bad_steps": self.bad_steps}
        if self.precision.scaler is not None:
            state["scaler"] = {k: v for k, v in self.precision.scaler.state_dict().items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bad_steps = int(state.get("bad_steps", 0))
        if self.precision.scaler is not None and state.get("scaler"):
            self.precision.scaler.load_state_dict(state["scaler"])
