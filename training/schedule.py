"""Learning-rate schedule: linear warm-up, then cosine (or linear, or constant) decay to a floor.

The schedule is a pure function of the step (`lr_ratio`), wrapped in a LambdaLR so optimizers and
checkpoints treat it like any torch scheduler. Its state is just the step count, which is JSON-safe.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR

from training.config import ScheduleSection


@dataclass
class WarmupDecay:
    """Multiplier of the peak rate at optimizer step `step` (0-based), for `total_steps` steps in all."""

    warmup_steps: int
    total_steps: int
    decay: str = "cosine"
    min_lr_ratio: float = 0.1

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            # (step+1)/(warmup+1): the very first update already moves, and the peak is reached right after warm-up.
            return (step + 1) / (self.warmup_steps + 1)
        if self.decay == "constant":
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps - 1)
        progress = min(1.0, (step - self.warmup_steps) / span)
        if self.decay == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            shape = 1.0 - progress
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape


def lr_ratio(step: int, cfg: ScheduleSection, total_steps: int) -> float:
    """The multiplier of the peak learning rate at `step` (for plots and tests)."""
    return WarmupDecay(cfg.warmup_steps, total_steps, cfg.decay, cfg.min_lr_ratio)(step)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleSection, total_steps: int) -> LambdaLR:
    """A LambdaLR that follows `WarmupDecay`; call `.step()` once per optimizer step."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    fn = WarmupDecay(min(cfg.warmup_steps, total_steps), total_steps, cfg.decay, cfg.min_lr_ratio)
    return LambdaLR(optimizer, fn)
