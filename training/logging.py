"""Run logging: console lines, a JSON-lines metrics file, TensorBoard scalars and a tqdm progress bar.

Only the main process logs; the others get a logger that drops everything, so call sites need no rank
checks. `metrics.jsonl` is the record the loss-curve plot reads back.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

FORMATS = {"loss": "{:.4f}", "val_loss": "{:.4f}", "val_ppl": "{:.2f}", "lr": "{:.2e}", "grad_norm": "{:.3f}",
           "tokens_per_s": "{:,.0f}", "mfu": "{:.1%}", "step_time_s": "{:.3f}"}


def _fmt(key: str, value: Any) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return FORMATS.get(key, "{:.4g}").format(value)
    return str(value)


class MetricLogger:
    """Logs metrics of a run to `out_dir` (metrics.jsonl, tb/) and the console.

    enabled: False on non-main ranks (every method becomes a no-op).
    """

    def __init__(self, out_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True,
                 progress: bool = True, total_steps: int | None = None, start_step: int = 0):
        self.enabled = enabled
        self._tb = None
        self._bar = None
        self._jsonl = None
        if not enabled:
            return
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out_dir / "tb"))
            except ImportError:  # tensorboard is an optional extra
                print("tensorboard is not installed; logging to the console and metrics.jsonl only", file=sys.stderr)
        if progress and total_steps:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                             file=sys.stderr)

    def log(self, step: int, metrics: dict[str, Any], *, console: bool = True) -> None:
        """Record metrics of `step` (floats go to TensorBoard; everything to metrics.jsonl)."""
        if not self.enabled:
            return
        record = {"step": step, **metrics}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, step)
        if console:
            self.print(f"step {step} " + " ".join(f"{k} {_fmt(k, v)}" for k, v in metrics.items()
                                                    if v is not None))

    def text(self, step: int, tag: str, text: str) -> None:
        """Log a piece of text (sample generations) to the console and TensorBoard."""
        if not self.enabled:
            return
        self.print(f"[{tag}] {text}")
        if self._tb is not None:
            self._tb.add_text(tag, text, step)

    def progress(self, step: int, **postfix: Any) -> None:
        """Move the progress bar to `step` and show a few values beside it."""
        if not self.enabled or self._bar is None:
            return
        self._bar.update(step - self._bar.n)
        if postfix:
            self._bar.set_postfix({k: _fmt(k, v) for k, v in postfix.items()}, refresh=False)

    def print(self, line: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()
