"""Reading task files with line numbers, so every problem names the file and the line."""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.eval.errors import DataError


@dataclass(frozen=True)
class Row:
    """One record of a data file and where it came from."""

    path: Path
    line: int
    data: Any

    @property
    def source(self) -> str:
        return f"{self.path}:{self.line}"

    def error(self, message: str) -> DataError:
        return DataError(self.path, message, self.line)

    def field(self, dotted: str, kind: type | tuple[type, ...] = str) -> Any:
        """The value at a dotted path ("question.stem"), checked to be of `kind`."""
        value = self.data
        for part in dotted.split("."):
            if not isinstance(value, dict) or part not in value:
                raise self.error(f"missing field {dotted!r}")
            value = value[part]
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise self.error(f"field {dotted!r} must be a {names}, got {type(value).__name__}")
        return value


def _lines(text: str) -> list[str]:
    # Only "\n" ends a line: str.splitlines would also cut at U+2028 and friends inside JSON strings.
    return [line.rstrip("\r") for line in text.split("\n")]


def _open_text(path: Path) -> str:
    if not path.is_file():
        raise DataError(path, "no such file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(path, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def read_jsonl(path: str | Path) -> list[Row]:
    """The JSON objects of a JSON-lines file (blank lines skipped); an empty file is an error."""
    path = Path(path)
    rows = []
    for lineno, line in enumerate(_lines(_open_text(path)), 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(path, f"not valid JSON ({exc.msg}, column {exc.colno})", lineno) from None
        if not isinstance(data, dict):
            raise DataError(path, f"expected a JSON object, got {type(data).__name__}", lineno)
        rows.append(Row(path, lineno, data))
    if not rows:
        raise DataError(path, "the file is empty (no JSON lines)")
    return rows


def read_csv(path: str | Path, num_fields: int) -> list[Row]:
    """Headerless CSV records of exactly `num_fields` fields; `line` is where each record starts."""
    path = Path(path)
    text = _open_text(path)
    rows = []
    reader = csv.reader(io.StringIO(text, newline=""))
    start = 1
    try:
        for record in reader:
            line, start = start, reader.line_num + 1  # a quoted field may span several lines
            if not record or not any(f.strip() for f in record):
                continue
            if len(record) != num_fields:
                raise DataError(path, f"expected {num_fields} comma-separated fields, got {len(record)}", line)
            rows.append(Row(path, line, record))
    except csv.Error as exc:
        raise DataError(path, f"not valid CSV ({exc})", start) from None
    if not rows:
        raise DataError(path, "the file is empty (no CSV records)")
    return rows


def read_lines(path: str | Path) -> list[tuple[int, str]]:
    """(line number, stripped text) of the non-blank lines of a text file."""
    path = Path(path)
    return [(i, line.strip()) for i, line in enumerate(_lines(_open_text(path)), 1) if line.strip()]


def read_text(path: str | Path) -> str:
    """A whole UTF-8 text file; an empty one is an error."""
    path = Path(path)
    text = _open_text(path)
    if not text.strip():
        raise DataError(path, "the file is empty")
    return text
