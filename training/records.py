"""Read JSON / JSONL data files record by record, keeping the line each record starts on for errors.

A `.json` file holds one array of objects (as Alpaca and LLaMA-Factory data sets ship); anything else
is JSON Lines (one object a line, blank lines skipped). Every problem raises DataFormatError whose
message starts with `FILE:LINE:`, so a malformed row in a 50,000-line file is found at once.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator


class DataFormatError(ValueError):
    """A data file or row that cannot be used; the message names the file and line."""


def where(path: Path, line: int) -> str:
    return f"{path}:{line}"


def read_records(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (location "FILE:LINE", record) for every object in a JSON array or JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: data file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataFormatError(f"{path}: not UTF-8 text ({exc})") from exc
    stripped = text.lstrip()
    if path.suffix == ".json" or stripped.startswith("["):
        yield from _json_array(path, text)
    else:
        yield from _json_lines(path, text)


def _json_lines(path: Path, text: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataFormatError(f"{where(path, number)}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
        if not isinstance(record, dict):
            raise DataFormatError(f"{where(path, number)}: expected a JSON object, got {type(record).__name__}")
        yield where(path, number), record


def _json_array(path: Path, text: str) -> Iterator[tuple[str, dict[str, Any]]]:
    # Decode element by element so each record's line is known (json.load would only give the records).
    decoder = json.JSONDecoder()
    pos = _skip_ws(text, 0)
    if pos >= len(text) or text[pos] != "[":
        raise DataFormatError(f"{where(path, _line(text, pos))}: a .json data file must hold one array of objects")
    pos = _skip_ws(text, pos + 1)
    line, line_pos = 1, 0
    first = True
    while pos < len(text) and text[pos] != "]":
        if not first:
            if text[pos] != ",":
                raise DataFormatError(f"{where(path, _line(text, pos))}: expected ',' or ']' between records")
            pos = _skip_ws(text, pos + 1)
        first = False
        line += text.count("\n", line_pos, pos)
        line_pos = pos
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise DataFormatError(f"{where(path, exc.lineno)}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
        if not isinstance(record, dict):
            raise DataFormatError(f"{where(path, line)}: expected a JSON object, got {type(record).__name__}")
        yield where(path, line), record
        pos = _skip_ws(text, end)
    if pos >= len(text):
        raise DataFormatError(f"{where(path, _line(text, pos))}: the array is not closed with ']'")


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1
