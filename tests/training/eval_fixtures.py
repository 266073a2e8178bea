"""Shared helpers of the evaluation tests: the committed fixture data and a word-level fake backend."""
from __future__ import annotations

from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "eval"


def copy_lines(src: Path, dst: Path, edit=None) -> Path:
    """Copy a fixture file, optionally passing each line (0-based index, text) through `edit`."""
    lines = src.read_text(encoding="utf-8").splitlines()
    if edit is not None:
        lines = [edit(i, line) for i, line in enumerate(lines)]
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("".join(line + "\n" for line in lines if line is not None), encoding="utf-8")
    return dst
