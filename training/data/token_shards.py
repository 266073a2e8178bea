"""Reading prepared token shards: `TokenShards` (random access) and `WindowSampler` (training windows).

A prepared folder holds flat binary files of token ids (numpy memmaps, uint16 or uint32 as the
manifest says) per split, each document written as BOS ... EOS, and a manifest.json describing
them. `TokenShards` makes one split look like a single token stream; `WindowSampler` cuts that
stream into (input, target) windows of seq_len + 1 tokens in a seeded order.

Position semantics (for exact resume): a sampler hands out windows by *position*, an integer
counting windows from the start of training across epochs. `window(p)` is a pure function of
the data, seq_len, seed, shuffle and p: epoch = p // len(sampler), and the epoch's seeded plan
(a random shift of the window grid and a permutation of the windows) picks which one. Save the
next unread position with a checkpoint; resuming means continuing from that position. With data
parallelism, let step s of a global batch of G windows cover positions [s*G, (s+1)*G) and give
rank r of W the slice starting at s*G + r*G//W, so any world size reads the same windows.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from training.data.errors import DataError

MANIFEST = "manifest.json"
FORMAT = "ember-token-shards"
VERSION = 1


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The parsed manifest.json of a prepared folder, checked for format and version."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {directory}; prepare the data first (ember prepare-data)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON: {exc.msg}") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise DataError(f"{path}: not an {FORMAT} v{VERSION} manifest")
    return manifest


class TokenShards:
    """One split ("train" or "val") of a prepared folder as a flat, random-access token stream."""

    def __init__(self, directory: str | Path, split: str = "train") -> None:
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        splits = self.manifest["splits"]
        if split not in splits:
            raise DataError(f"{self.directory}: no split {split!r}; available: {', '.join(sorted(splits))}")
        self.split = split
        self.dtype = np.dtype(self.manifest["dtype"])
        self.vocab_size: int = self.manifest["vocab_size"]
        self.bos_id: int = self.manifest["bos_id"]
        self.eos_id: int = self.manifest["eos_id"]
        entry = splits[split]
        self.num_documents: int = entry["num_documents"]
        self._files = [self.directory / s["file"] for s in entry["shards"]]
        sizes = [s["num_tokens"] for s in entry["shards"]]
        for path, n in zip(self._files, sizes):
            self._check_file(path, n)
        # starts[i] is the stream offset of shard i; the last entry is the total.
        self._starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self._maps: list[np.memmap | None] = [None] * len(self._files)

    @property
    def num_tokens(self) -> int:
        """Tokens in this split, BOS and EOS included."""
        return int(self._starts[-1])

    def __len__(self) -> int:
        return self.num_tokens

    def get(self, offset: int, length: int) -> np.ndarray:
        """Tokens [offset, offset + length) of the stream as a new int64 array (shard borders are invisible)."""
        if offset < 0 or length < 0 or offset + length > self.num_tokens:
            raise IndexError(f"tokens [{offset}, {offset + length}) are outside [0, {self.num_tokens}) of split {self.split!r}")
        out = np.empty(length, dtype=np.int64)
        filled = 0
        shard = int(np.searchsorted(self._starts, offset, side="right")) - 1
        while filled < length:
            begin = offset + filled - int(self._starts[shard])
            take = min(length - filled, int(self._starts[shard + 1]) - offset - filled)
            out[filled:filled + take] = self._map(shard)[begin:begin + take]
            filled += take
            shard += 1
        return out

    def sampler(self, seq_len: int, seed: int = 0, shuffle: bool = True) -> WindowSampler:
        """A `WindowSampler` over this split."""
        return WindowSampler(self, seq_len, seed=seed, shuffle=shuffle)

    def _map(self, index: int) -> np.memmap:
        # Opened lazily so that a reader created before forking data-loader workers holds no mappings.
        if self._maps[index] is None:
            self._maps[index] = np.memmap(self._files[index], dtype=self.dtype, mode="r")
        return self._maps[index]

    def _check_file(self, path: Path, num_tokens: int) -> None:
        expected = num_tokens * self.dtype.itemsize
        if not path.is_file():
            raise DataError(f"{path}: shard listed in {MANIFEST} is missing; prepare the data again")
        if path.stat().st_size != expected:
            raise DataError(
                f"{path}: {path.stat().st_size} bytes, expected {expected} ({num_tokens} {self.dtype.name} tokens); "
                "the folder is incomplete or corrupt"
            )


class WindowSampler:
    """Seeded, resumable (input, target) windows of `seq_len` tokens over a `TokenShards` stream.

    Windows step by seq_len and are seq_len + 1 tokens long (the target is the input shifted by
    one), so consecutive windows of the grid share one token and every token is predicted once
    per epoch. With `shuffle`, each epoch shifts the grid by a seeded offset (documents are cut
    at different places in different epochs) and visits the windows in a seeded permutation;
    one window is held back to leave room for the shift. Without `shuffle` (validation) the grid
    starts at 0 and is read in order. See the module docstring for what a position means.
    """

    def __init__(self, shards: TokenShards, seq_len: int, seed: int = 0, shuffle: bool = True) -> None:
        if seq_len < 1:
            raise DataError(f"seq_len must be >= 1, got {seq_len}")
        if seed < 0:
            raise DataError(f"seed must be >= 0, got {seed}")
        if shards.num_tokens < seq_len + 1:
            raise DataError(
                f"split {shards.split!r} of {shards.directory} has {shards.num_tokens} tokens; "
                f"a window needs seq_len + 1 = {seq_len + 1}"
            )
        self.shards, self.seq_len, self.seed, self.shuffle = shards, seq_len, seed, shuffle
        grid = (shards.num_tokens - 1) // seq_len
        self._shifting = shuffle and grid >= 2
        self.windows_per_epoch = grid - 1 if self._shifting else grid
        # Largest shift that keeps the last window inside the stream.
        self._max_shift = shards.num_tokens - 1 - self.windows_per_epoch * seq_len
        self._plans: dict[int, tuple[int, np.ndarray | None]] = {}

    def __len__(self) -> int:
        return self.windows_per_epoch

    def window(self, position: int) -> tuple[np.ndarray, np.ndarray]:
        """(input, target) int64 arrays of seq_len tokens for window number `position` (>= 0)."""
        if position < 0:
            raise IndexError(f"position must be >= 0, got {position}")
        epoch, index = divmod(position, self.windows_per_epoch)
        shift, order = self._plan(epoch)
        k = int(order[index]) if order is not None else index
        tokens = self.shards.get(shift + k * self.seq_len, self.seq_len + 1)
        return tokens[:-1], tokens[1:]

    def batch(self, position: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Windows position .. position + batch_size - 1 stacked: inputs and targets of shape [batch_size, seq_len]."""
        pairs = [self.window(position + i) for i in range(batch_size)]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

    def iter(self, start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Windows from position `start` on, endlessly (epoch after epoch)."""
        position = start
        while True:
            yield self.window(position)
            position += 1

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return self.iter(0)

    def epoch_of(self, position: int) -> int:
        """The epoch that window number `position` belongs to."""
        return position // self.windows_per_epoch

    def _plan(self, epoch: int) -> tuple[int, np.ndarray | None]:
        if epoch not in self._plans:
            if len(self._plans) >= 2:  # readers move forward: keep the current and the next epoch
                self._plans.pop(min(self._plans))
            if self.shuffle:
                key = _mix64(_mix64(np.array([self.seed], dtype=np.uint64)) ^ np.uint64(epoch))
                shift = int(key[0] % np.uint64(self._max_shift + 1)) if self._shifting else 0
                # Sorting by a bijective hash of the window index gives a seeded permutation
                # defined by integer arithmetic alone, so it is the same on any numpy version.
                order = np.argsort(_mix64(np.arange(self.windows_per_epoch, dtype=np.uint64) ^ _mix64(key)))
                self._plans[epoch] = (shift, order)
            else:
                self._plans[epoch] = (0, None)
        return self._plans[epoch]


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic): a bijective integer hash."""
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))
