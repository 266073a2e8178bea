"""What each stage of the pipeline removed, in documents and characters."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

EXAMPLES_PER_REASON = 3  # sources ("path:line") kept per removal reason, to look at what a filter caught


@dataclass
class StageStats:
    """Counts for one stage: what came in, what went out, and removals by reason.

    Characters can leave without documents leaving (cleaning trims text), so chars removed is
    chars_in - chars_out, while the per-reason counts cover whole documents only.
    """

    name: str
    docs_in: int = 0
    chars_in: int = 0
    docs_out: int = 0
    chars_out: int = 0
    removed: dict[str, list[int]] = field(default_factory=dict)  # reason -> [documents, chars]
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> first few sources

    def keep(self, chars_in: int, chars_out: int | None = None) -> None:
        """Count a document that passes this stage (with its length before and after it)."""
        self.docs_in += 1
        self.chars_in += chars_in
        self.docs_out += 1
        self.chars_out += chars_in if chars_out is None else chars_out

    def drop(self, reason: str, chars: int, source: str) -> None:
        """Count a document this stage removes, under `reason`."""
        self.docs_in += 1
        self.chars_in += chars
        entry = self.removed.setdefault(reason, [0, 0])
        entry[0] += 1
        entry[1] += chars
        examples = self.examples.setdefault(reason, [])
        if len(examples) < EXAMPLES_PER_REASON:
            examples.append(source)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the manifest."""
        return {
            "stage": self.name,
            "docs_in": self.docs_in,
            "docs_out": self.docs_out,
            "chars_in": self.chars_in,
            "chars_out": self.chars_out,
            "removed": {
                reason: {"docs": d, "chars": c, "examples": self.examples[reason]}
                for reason, (d, c) in sorted(self.removed.items())
            },
        }


def format_table(stages: list[dict[str, Any]]) -> str:
    """A fixed-width table of stage dicts (as `StageStats.to_dict` makes), one row per stage and reason."""
    header = f"{'stage':<18}{'docs in':>12}{'docs removed':>14}{'chars in':>15}{'chars removed':>15}{'%':>7}"
    rows = [header, "-" * len(header)]
    for s in stages:
        docs_removed = s["docs_in"] - s["docs_out"]
        chars_removed = s["chars_in"] - s["chars_out"]
        rows.append(
            f"{s['stage']:<18}{s['docs_in']:>12,}{docs_removed:>14,}{s['chars_in']:>15,}{chars_removed:>15,}"
            f"{_pct(chars_removed, s['chars_in']):>7}"
        )
        for reason, r in s["removed"].items():
            rows.append(f"{'  ' + reason:<18}{'':>12}{r['docs']:>14,}{'':>15}{r['chars']:>15,}{_pct(r['chars'], s['chars_in']):>7}")
    if stages:
        last = stages[-1]
        rows.append(f"{'kept':<18}{last['docs_out']:>12,}{'':>14}{last['chars_out']:>15,}")
    return "\n".join(rows)


def _pct(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f}" if whole else "-"
