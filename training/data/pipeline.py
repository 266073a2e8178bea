"""`prepare_data`: raw text in, packed token shards out.

    read -> clean -> filter -> exact dedup -> near dedup -> split -> tokenize -> shards + manifest

Documents stream through in chunks: workers clean, filter and sketch a chunk in parallel, the
main process deduplicates it (the indexes live there) and assigns splits, workers tokenize the
survivors, and the main process appends them to the shards. Order is preserved at every step,
so the output does not depend on the number of workers and memory stays bounded by a chunk
(plus the dedup indexes).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.data.clean import clean_text
from training.data.config import DataConfig
from training.data.dedup import ExactDeduplicator, NearDeduplicator, dedup_key, minhash_signature
from training.data.encoding import TokenizerLoader, encode_document, resolve_tokenizer, special_ids
from training.data.errors import DataError
from training.data.filters import filter_reason
from training.data.readers import Document, iter_documents, list_input_files
from training.data.shard_writer import ShardWriter, prepare_output_dir, token_dtype, write_manifest
from training.data.summary import StageStats, format_table
from training.data.token_shards import FORMAT, VERSION

DOCS_PER_TASK = 256  # documents a worker handles per task: large enough to hide IPC cost
SPLITS = ("train", "val")


@dataclass(frozen=True)
class Processed:
    """A document after the per-document work: cleaned text, the filter verdict, its fingerprints."""

    source: str
    chars_in: int
    text: str  # cleaned; empty if cleaning left nothing
    reason: str | None  # the filter that rejects it, or None
    digest: bytes  # dedup_key of the cleaned text
    signature: Any  # MinHash of its shingles (None when near dedup is off or the document is rejected)


@dataclass(frozen=True)
class PrepareResult:
    """Where the shards went and the manifest that describes them."""

    out_dir: Path
    manifest: dict[str, Any]

    def summary_table(self) -> str:
        """What each stage removed, then the size of each split."""
        lines = [format_table(self.manifest["stages"]), ""]
        for name, split in self.manifest["splits"].items():
            lines.append(
                f"{name:<6}{split['num_documents']:>10,} docs {split['num_tokens']:>14,} tokens in {len(split['shards'])} shard(s)"
            )
        lines += [f"warning: {w}" for w in self.manifest["warnings"]]
        return "\n".join(lines)


def prepare_data(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    tokenizer: str | Path | TokenizerLoader,
    config: DataConfig | None = None,
    *,
    val_inputs: Sequence[str | Path] = (),
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = False,
) -> PrepareResult:
    """Turn text inputs into train/val token shards under `out_dir` and return the manifest.

    `tokenizer` is a tokenizer folder (loaded with Ember's Tokenizer) or a zero-argument loader.
    Without `val_inputs`, each document goes to the validation split with probability
    `config.val_fraction`, decided by a seeded hash of its normalised text: the same document
    always lands in the same split, whatever else is in the corpus or how many workers run.
    With `val_inputs`, those documents form the validation split (read first, so training
    documents that duplicate them are the ones removed) and `val_fraction` is not used.
    """
    config = config or DataConfig()
    if workers < 1:
        raise DataError(f"workers must be >= 1, got {workers}")
    list_input_files(inputs)  # fail on a missing or unsupported input before any work
    if val_inputs:
        list_input_files(val_inputs)
    loader, tokenizer_info = resolve_tokenizer(tokenizer)
    ids = special_ids(loader())
    dtype = token_dtype(ids.vocab_size)
    out = prepare_output_dir(out_dir, overwrite)

    stages = _Stages(config)
    writers = {name: ShardWriter(out, name, dtype, config.shard_tokens) for name in SPLITS}
    try:
        _run(_labelled(inputs, val_inputs, config), config, stages, writers, _Executor(workers, config, loader), progress)
    except BaseException:
        for writer in writers.values():  # leave no half-written shards behind
            writer.discard()
        raise
    splits = {name: writer.close() for name, writer in writers.items()}
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": dtype.name,
        "vocab_size": ids.vocab_size,
        "bos_id": ids.bos_id,
        "eos_id": ids.eos_id,
        "tokenizer": tokenizer_info,
        "splits": splits,
        "split": {"method": "val_inputs" if val_inputs else "hash", "val_fraction": config.val_fraction, "seed": config.seed},
        "inputs": [str(p) for p in inputs],
        "val_inputs": [str(p) for p in val_inputs],
        "config": config.to_dict(),
        "stages": stages.to_list(),
        "warnings": [],
    }
    manifest = json.loads(json.dumps(manifest))  # plain JSON types, so the returned manifest equals the file
    result = PrepareResult(out, manifest)
    if splits["train"]["num_documents"] == 0:
        for writer in writers.values():
            writer.discard()
        raise DataError("no training documents left after cleaning, filtering, deduplication and the split:\n" + result.summary_table())
    if splits["val"]["num_documents"] == 0 and (val_inputs or config.val_fraction > 0):
        why = "every validation document was filtered out" if val_inputs else "too few documents for val_fraction"
        manifest["warnings"].append(f"the validation split is empty ({why})")
    write_manifest(out, manifest)
    return result


def _run(stream, config: DataConfig, stages: _Stages, writers: dict[str, ShardWriter], executor: _Executor, progress: bool) -> None:
    """The streaming loop: per chunk, process in parallel, route through dedup, tokenize, write."""
    with executor:
        from tqdm import tqdm  # after the pool exists: tqdm starts a thread, and forking after threads is unsafe

        with tqdm(unit=" docs", desc="prepare-data", disable=not progress, dynamic_ncols=True) as bar:
            for chunk in _chunks(stream, executor.workers * DOCS_PER_TASK):
                processed = executor.process([doc for doc, _ in chunk])
                kept: list[tuple[str, str]] = []  # (text, split)
                for (_, label), p in zip(chunk, processed):
                    if stages.route(p):
                        kept.append((p.text, label or assign_split(p.digest, config)))
                for (_, split), doc_tokens in zip(kept, executor.encode([text for text, _ in kept])):
                    writers[split].add(doc_tokens)
                bar.update(len(chunk))
                bar.set_postfix(kept=stages.kept, refresh=False)


def assign_split(digest: bytes, config: DataConfig) -> str:
    """'val' for a seeded-hash share `val_fraction` of documents, else 'train'."""
    h = hashlib.sha256(config.seed.to_bytes(8, "little", signed=True) + digest).digest()
    return "val" if int.from_bytes(h[:8], "little") / 2.0**64 < config.val_fraction else "train"


def process_documents(docs: Iterable[Document], config: DataConfig) -> list[Processed]:
    """Clean, filter and fingerprint documents (the parallel half of the dedup-and-filter work)."""
    out = []
    for doc in docs:
        text = clean_text(doc.text, config.clean)
        reason = filter_reason(text, config.filter) if text else None
        signature = minhash_signature(text, config.dedup) if config.dedup.near and text and reason is None else None
        out.append(Processed(doc.source, len(doc.text), text, reason, dedup_key(text), signature))
    return out


class _Stages:
    """The per-stage counters and the dedup indexes; `route` sends one document through them."""

    def __init__(self, config: DataConfig) -> None:
        self.clean, self.filter = StageStats("clean"), StageStats("filter")
        self.exact = StageStats("exact_dedup") if config.dedup.exact else None
        self.near = StageStats("near_dedup") if config.dedup.near else None
        self._exact_index = ExactDeduplicator()
        self._near_index = NearDeduplicator(config.dedup) if config.dedup.near else None
        self.kept = 0

    def route(self, p: Processed) -> bool:
        """Count `p` at each stage it reaches; True if it survives them all."""
        if not p.text:
            self.clean.drop("empty", p.chars_in, p.source)
            return False
        n = len(p.text)
        self.clean.keep(p.chars_in, n)
        if p.reason:
            self.filter.drop(p.reason, n, p.source)
            return False
        self.filter.keep(n)
        if self.exact is not None:
            if self._exact_index.is_duplicate(p.digest):
                self.exact.drop("duplicate", n, p.source)
                return False
            self.exact.keep(n)
        if self.near is not None:
            if self._near_index.is_duplicate(p.signature):
                self.near.drop("near_duplicate", n, p.source)
                return False
            self.near.keep(n)
        self.kept += 1
        return True

    def to_list(self) -> list[dict[str, Any]]:
        return [s.to_dict() for s in (self.clean, self.filter, self.exact, self.near) if s is not None]


def _labelled(inputs, val_inputs, config: DataConfig) -> Iterator[tuple[Document, str | None]]:
    """Documents tagged with a forced split ('val' / 'train') or None (decided by hash)."""
    def read(paths):
        return iter_documents(paths, config.text_field, config.doc_separator)

    if val_inputs:
        yield from ((doc, "val") for doc in read(val_inputs))
        yield from ((doc, "train") for doc in read(inputs))
    else:
        yield from ((doc, None) for doc in read(inputs))


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


class _Worker:
    """What one process needs for the parallel steps; the tokenizer is built on first use."""

    def __init__(self, config: DataConfig, loader: TokenizerLoader) -> None:
        self.config, self._loader = config, loader
        self._tokenizer = None

    def process(self, docs: list[Document]) -> list[Processed]:
        return process_documents(docs, self.config)

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        if self._tokenizer is None:
            self._tokenizer = self._loader()
            self._ids = special_ids(self._tokenizer)
            self._dtype = token_dtype(self._ids.vocab_size)
        return [encode_document(self._tokenizer, self._ids, t, self._dtype) for t in texts]


# Pool processes can only run module-level functions, so each keeps its _Worker here (set once
# by the pool initializer; the main process never touches it).
_PROCESS_WORKER: _Worker | None = None


def _init_process(config: DataConfig, loader: TokenizerLoader) -> None:
    global _PROCESS_WORKER
    _PROCESS_WORKER = _Worker(config, loader)


def _process_task(docs: list[Document]) -> list[Processed]:
    return _PROCESS_WORKER.process(docs)


def _encode_task(texts: list[str]) -> list[np.ndarray]:
    return _PROCESS_WORKER.encode(texts)


class _Executor:
    """Runs the parallel steps in a process pool (workers > 1) or in this process, keeping order."""

    def __init__(self, workers: int, config: DataConfig, loader: TokenizerLoader) -> None:
        self.workers = workers
        self._local = _Worker(config, loader) if workers == 1 else None
        self._pool = None
        if workers > 1:
            self._pool = multiprocessing.get_context().Pool(workers, initializer=_init_process, initargs=(config, loader))

    def process(self, docs: list[Document]) -> list[Processed]:
        return self._local.process(docs) if self._pool is None else self._map(_process_task, docs)

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        return self._local.encode(texts) if self._pool is None else self._map(_encode_task, texts)

    def _map(self, task, items: list) -> list:
        if not items:
            return []
        size = -(-len(items) // self.workers)
        batches = [items[i:i + size] for i in range(0, len(items), size)]
        return [r for batch in self._pool.map(task, batches, chunksize=1) for r in batch]

    def __enter__(self) -> _Executor:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if self._pool is not None:
            if exc_type is None:
                self._pool.close()
            else:
                self._pool.terminate()
            self._pool.join()
