"""Loss curve of a run as a PNG, read from its metrics.jsonl (matplotlib, no display needed)."""
from __future__ import annotations

import json
import math
from pathlib import Path


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl file; a torn last line (a killed run) is ignored.

    A resumed run appends steps it had already logged before the crash; the later record of a step wins.
    """
    by_key: dict[tuple[int, bool], dict] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            by_key[(int(rec["step"]), "val_loss" in rec)] = rec
    return [by_key[k] for k in sorted(by_key)]


def plot_loss_curve(metrics_file: str | Path, out_png: str | Path, title: str = "") -> Path:
    """Training loss per step (and validation loss where measured), log-scaled steps off; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_file)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and math.isfinite(r["loss"])]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out_png)
    fig.savefig(out)
    plt.close(fig)
    return out
