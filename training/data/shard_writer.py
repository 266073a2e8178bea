"""Writing token shards and the manifest of a prepared folder."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from training.data.errors import DataError
from training.data.token_shards import MANIFEST


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in 16 bits, else uint32."""
    if vocab_size < 1:
        raise DataError(f"tokenizer vocab_size must be >= 1, got {vocab_size}")
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def prepare_output_dir(out_dir: str | Path, overwrite: bool) -> Path:
    """Create `out_dir`; refuse one that already holds prepared data unless `overwrite`, then clear it."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"output path {out} exists and is not a folder")
    old = [p for p in out.glob("*") if p.name == MANIFEST or p.suffix == ".bin"] if out.is_dir() else []
    if old and not overwrite:
        raise DataError(f"{out} already holds prepared data ({MANIFEST} or .bin shards); pass overwrite to replace it")
    # The manifest goes first: an interrupted run must not leave one that points at half-written shards.
    for path in sorted(old, key=lambda p: p.name != MANIFEST):
        path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


class ShardWriter:
    """Appends documents' tokens to `<split>_NNNNN.bin` files of at most `shard_tokens` tokens.

    A document never straddles two shards (a shard closes before it would overflow, and a
    document longer than the limit gets a shard of its own), so per-shard document counts are exact.
    """

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self._shards: list[dict[str, Any]] = []
        self._file = None

    def add(self, tokens: np.ndarray) -> None:
        """Append one document's tokens (BOS ... EOS, already in the shard dtype)."""
        current = self._shards[-1] if self._file is not None else None
        if current is None or (current["num_tokens"] and current["num_tokens"] + len(tokens) > self.shard_tokens):
            self._open_next()
            current = self._shards[-1]
        self._file.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        current["num_tokens"] += len(tokens)
        current["num_documents"] += 1

    def close(self) -> dict[str, Any]:
        """Flush to disk and return the split's manifest entry (shards, token and document totals)."""
        self._close_file()
        return {
            "num_tokens": sum(s["num_tokens"] for s in self._shards),
            "num_documents": sum(s["num_documents"] for s in self._shards),
            "shards": list(self._shards),
        }

    def discard(self) -> None:
        """Close and delete every shard written so far (after a failed run)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        for shard in self._shards:
            (self.out_dir / shard["file"]).unlink(missing_ok=True)
        self._shards = []

    def _open_next(self) -> None:
        self._close_file()
        name = f"{self.split}_{len(self._shards):05d}.bin"
        self._file = open(self.out_dir / name, "wb")
        self._shards.append({"file": name, "num_tokens": 0, "num_documents": 0})

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> Path:
    """Write manifest.json atomically (temporary file, fsync, rename): it is the folder's completion mark."""
    path = out_dir / MANIFEST
    tmp = out_dir / (MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=2, sort_keys=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path
