"""Results: one row per (task, metric), printed as a table and written as JSON."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence


@dataclass(frozen=True)
class MetricValue:
    """One figure of a task: its value, the standard error of the mean (None where it has none), items."""

    metric: str
    value: float
    stderr: float | None
    n: int


@dataclass
class EvalReport:
    """Everything one task run produced: figures, per-item records, and how it was run."""

    task: str
    model: str
    settings: dict[str, Any]
    date: str
    metrics: list[MetricValue]
    samples: list[dict[str, Any]] = field(default_factory=list)

    def rows(self) -> list[dict[str, Any]]:
        return [{"task": self.task, "metric": m.metric, "value": m.value, "stderr": m.stderr, "n": m.n,
                 "model": self.model, "settings": self.settings, "date": self.date} for m in self.metrics]

    def value(self, metric: str) -> float:
        return next(m.value for m in self.metrics if m.metric == metric)


def _fmt(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.4f}" if abs(x) < 1e5 else f"{x:.4g}"


def format_table(reports: Sequence[EvalReport]) -> str:
    """A plain-text table: task, metric, value, stderr, n."""
    rows = [("task", "metric", "value", "stderr", "n")]
    for r in reports:
        rows += [(r.task, m.metric, _fmt(m.value), _fmt(m.stderr), str(m.n)) for m in r.metrics]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(reports: Sequence[EvalReport], path: str | Path) -> None:
    """{"results": [rows]}; each row carries task, metric, value, stderr, n, model, settings, date."""
    payload = {"results": [row for r in reports for row in r.rows()]}
    Path(path).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def write_samples(reports: Sequence[EvalReport], path: str | Path) -> None:
    """One JSON line per evaluated item (its task, source line, scores, prediction)."""
    with Path(path).open("w", encoding="utf-8") as f:
        for r in reports:
            for s in r.samples:
                f.write(json.dumps({"task": r.task, **s}) + "\n")
