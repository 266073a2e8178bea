"""Reading raw inputs into documents: .txt and .jsonl files, optionally gzip'd, and folders of them.

A text file holds many documents; `doc_separator` says how to cut it:
  auto   split on "<|endoftext|>" when the file contains it (TinyStories), else on blank lines
  blank  one or more blank lines end a document
  line   every non-blank line is a document
  none   the whole file is one document
  other  a literal marker (within one line) ends a document, e.g. "<|endoftext|>" or "----"
A .jsonl file holds one JSON object per line; `text_field` names the key with the text.
Every document carries its source as "path:line" (the line it starts on), so later stages and
error messages can point at it.
"""
from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from training.data.config import END_OF_TEXT, SEPARATOR_MODES
from training.data.errors import DataError

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
_SCAN_CHUNK = 1 << 20


@dataclass(frozen=True)
class Document:
    """One document's raw text and where it came from ("path:line")."""

    text: str
    source: str


def input_kind(path: Path) -> str | None:
    """'text', 'jsonl' or None (unsupported) from the file name; a trailing .gz is looked through."""
    name = path.name.lower()
    name = name.removesuffix(".gz")
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return None


def list_input_files(paths: Iterable[str | Path]) -> list[Path]:
    """The files to read, in a fixed order: as given, folders expanded recursively in sorted order.

    Inside folders, files of unsupported types and hidden files are skipped; a file named
    explicitly must be of a supported type.
    """
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise FileNotFoundError(f"input not found: {path}")
        if path.is_dir():
            found = [
                p for p in sorted(path.rglob("*"))
                if p.is_file() and input_kind(p) and not any(part.startswith(".") for part in p.relative_to(path).parts)
            ]
            if not found:
                raise DataError(f"{path}: folder holds no {_supported()} files")
            files.extend(found)
        elif input_kind(path) is None:
            raise DataError(f"{path}: unsupported input type; expected {_supported()}")
        else:
            files.append(path)
    if not files:
        raise DataError("no input paths given")
    return files


def iter_documents(paths: Iterable[str | Path], text_field: str = "text", doc_separator: str = "auto") -> Iterator[Document]:
    """Yield every document of the inputs in order; raise DataError if there is none at all."""
    files = list_input_files(paths)
    count = 0
    for path in files:
        if input_kind(path) == "jsonl":
            docs = read_jsonl(path, text_field)
        else:
            docs = read_text(path, doc_separator)
        for doc in docs:
            count += 1
            yield doc
    if count == 0:
        raise DataError(f"no documents found in {', '.join(str(p) for p in files)} (all empty?)")


def read_jsonl(path: Path, text_field: str) -> Iterator[Document]:
    """One document per non-blank line: the string under `text_field` of that line's JSON object."""
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: invalid JSON: {exc.msg} (column {exc.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        if text_field not in record:
            fields = ", ".join(sorted(record)) or "none"
            raise DataError(f"{where}: no field {text_field!r} (fields: {fields}); set the text field to use")
        text = record[text_field]
        if not isinstance(text, str):
            raise DataError(f"{where}: field {text_field!r} is {type(text).__name__}, expected a string")
        yield Document(text, where)


def read_text(path: Path, doc_separator: str = "auto") -> Iterator[Document]:
    """Cut a text file into documents as `doc_separator` says (see the module docstring)."""
    mode = doc_separator
    if mode == "auto":
        mode = END_OF_TEXT if _contains(path, END_OF_TEXT) else "blank"
    if mode == "none":
        yield from _whole(path)
    elif mode == "line":
        for lineno, line in _lines(path):
            if line.strip():
                yield Document(line.rstrip("\n"), f"{path}:{lineno}")
    elif mode == "blank":
        yield from _split_blank(path)
    else:
        yield from _split_marker(path, mode)


def _whole(path: Path) -> Iterator[Document]:
    text = "".join(line for _, line in _lines(path))
    if text.strip():
        yield Document(text, f"{path}:1")


def _split_blank(path: Path) -> Iterator[Document]:
    buf: list[str] = []
    start = 1
    for lineno, line in _lines(path):
        if line.strip():
            if not buf:
                start = lineno
            buf.append(line)
        elif buf:
            yield Document("".join(buf), f"{path}:{start}")
            buf = []
    if buf:
        yield Document("".join(buf), f"{path}:{start}")


def _split_marker(path: Path, marker: str) -> Iterator[Document]:
    buf: list[str] = []
    start, has_text = 1, False
    for lineno, line in _lines(path):
        # A marker may sit mid-line: what precedes it closes the current document and what
        # follows it opens the next one, so split each line on the marker.
        for i, piece in enumerate(line.split(marker)):
            if i > 0:
                if has_text:
                    yield Document("".join(buf), f"{path}:{start}")
                buf, has_text = [], False
            if not has_text and piece.strip():
                start, has_text = lineno, True
            buf.append(piece)
    if has_text:
        yield Document("".join(buf), f"{path}:{start}")


def _open(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, decoded line with its '\\n') pairs; bad UTF-8 or a bad gzip stream name the file and line."""
    lineno = 0
    try:
        with _open(path) as fh:
            for lineno, raw in enumerate(fh, start=1):
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte {exc.start} of the line)") from None
                if line.endswith("\r\n"):
                    line = line[:-2] + "\n"
                yield lineno, line
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataError(f"{path}:{lineno + 1}: corrupt gzip data ({exc})") from None


def _contains(path: Path, marker: str) -> bool:
    """Whether the file's bytes contain `marker`, scanning in chunks (a marker may straddle two)."""
    needle = marker.encode("utf-8")
    tail = b""
    try:
        with _open(path) as fh:
            while chunk := fh.read(_SCAN_CHUNK):
                if needle in tail + chunk:
                    return True
                tail = chunk[-(len(needle) - 1):] if len(needle) > 1 else b""
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: corrupt gzip data ({exc})") from None
    return False


def _supported() -> str:
    return "/".join(TEXT_SUFFIXES + JSONL_SUFFIXES) + " (optionally .gz)"


__all__ = ["SEPARATOR_MODES", "Document", "input_kind", "iter_documents", "list_input_files", "read_jsonl", "read_text"]
