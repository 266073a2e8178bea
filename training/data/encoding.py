"""The tokenizer side of the pipeline: loading, fingerprinting, and encoding one document.

Any object with `encode(text, add_bos=False) -> list[int]`, `bos_id`, `vocab_size` and either
`eos_id` or `eos_ids` works; the pipeline normally loads Ember's `engine.tokenizer.Tokenizer`
from a folder. Workers receive a zero-argument *loader* rather than a tokenizer object so that
each process builds its own.
"""
from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.data.errors import DataError

TokenizerLoader = Callable[[], Any]
# Files that define a tokenizer in the checkpoint layout; only these enter the fingerprint.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


@dataclass(frozen=True)
class SpecialIds:
    """The ids the shards need from a tokenizer."""

    bos_id: int
    eos_id: int
    vocab_size: int


def load_ember_tokenizer(path: str) -> Any:
    """Ember's tokenizer from a folder (imported here so the data package loads without it)."""
    from engine.tokenizer import Tokenizer

    return Tokenizer.from_dir(path)


def resolve_tokenizer(source: str | Path | TokenizerLoader) -> tuple[TokenizerLoader, dict[str, Any]]:
    """A loader plus what the manifest records about it: folder path and sha256 of its tokenizer files."""
    if callable(source):
        name = getattr(source, "__qualname__", type(source).__qualname__)
        return source, {"path": None, "sha256": None, "loader": f"{getattr(source, '__module__', '?')}.{name}"}
    path = Path(source)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {path}")
    return functools.partial(load_ember_tokenizer, str(path)), {"path": str(path.resolve()), "sha256": tokenizer_hash(path)}


def tokenizer_hash(path: Path) -> str:
    """sha256 over the names and bytes of the folder's tokenizer files (all files if none is known)."""
    files = [path / n for n in TOKENIZER_FILES if (path / n).is_file()] or sorted(p for p in path.iterdir() if p.is_file())
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode("utf-8") + b"\0")
        digest.update(f.read_bytes())
    return digest.hexdigest()


def special_ids(tokenizer: Any) -> SpecialIds:
    """BOS, EOS and vocabulary size of a tokenizer, with a clear error when one is missing."""
    eos = getattr(tokenizer, "eos_id", None)
    if eos is None:
        eos_ids = getattr(tokenizer, "eos_ids", None) or []
        eos = min(eos_ids, default=None)
    bos = getattr(tokenizer, "bos_id", None)
    vocab = getattr(tokenizer, "vocab_size", None)
    if bos is None or eos is None or vocab is None:
        raise DataError("the tokenizer needs a BOS id, an EOS id and a vocab size to mark document boundaries")
    return SpecialIds(int(bos), int(eos), int(vocab))


def encode_document(tokenizer: Any, ids: SpecialIds, text: str, dtype: np.dtype) -> np.ndarray:
    """BOS + encode(text) + EOS in the shard dtype; ids outside the vocabulary are an error, not a wrap-around."""
    body = np.asarray(tokenizer.encode(text, add_bos=False), dtype=np.int64)
    bad = body[(body < 0) | (body >= ids.vocab_size)]
    if bad.size:
        raise DataError(f"tokenizer produced id {int(bad[0])} outside its vocabulary of {ids.vocab_size}")
    out = np.empty(body.size + 2, dtype=dtype)
    out[0], out[-1] = ids.bos_id, ids.eos_id
    out[1:-1] = body
    return out
