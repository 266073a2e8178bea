"""Exact and near-duplicate detection.

Exact: sha256 of the text case-folded with whitespace collapsed, so copies differing only in
case or spacing count as one. Near: MinHash signatures of word n-gram shingles indexed in an
LSH table (datasketch); an LSH hit is confirmed by the signatures' estimated Jaccard similarity
before a document is dropped, which removes most of the banding's false positives. Both keep
the first occurrence in input order.
"""
from __future__ import annotations

import functools
import hashlib

from training.data.config import DedupConfig
from training.data.filters import words


def dedup_key(text: str) -> bytes:
    """sha256 digest of the normalised text (case-folded, whitespace runs collapsed)."""
    return hashlib.sha256(" ".join(text.casefold().split()).encode("utf-8")).digest()


def shingles(text: str, size: int) -> set[bytes]:
    """The set of lower-cased word `size`-grams; a shorter text is one shingle of all its words."""
    tokens = words(text)
    if len(tokens) <= size:
        return {" ".join(tokens).encode("utf-8")} if tokens else set()
    return {" ".join(tokens[i:i + size]).encode("utf-8") for i in range(len(tokens) - size + 1)}


def minhash_signature(text: str, config: DedupConfig):
    """A compact (picklable) MinHash of the text's shingles, or None for a text without words."""
    from datasketch import LeanMinHash

    grams = shingles(text, config.shingle_words)
    if not grams:
        return None
    sketch = _empty_minhash(config.num_perm, config.seed).copy()
    sketch.update_batch(list(grams))
    return LeanMinHash(sketch)


@functools.lru_cache(maxsize=4)
def _empty_minhash(num_perm: int, seed: int):
    # Drawing the permutations costs more than hashing a short document's shingles; copying
    # an empty sketch reuses them. Callers only copy it, never update it.
    from datasketch import MinHash

    return MinHash(num_perm=num_perm, seed=seed)


class ExactDeduplicator:
    """Remembers the digests seen; `is_duplicate` answers and records in one call."""

    def __init__(self) -> None:
        self._seen: set[bytes] = set()

    def is_duplicate(self, digest: bytes) -> bool:
        """True if `digest` was seen before; otherwise remember it and return False."""
        if digest in self._seen:
            return True
        self._seen.add(digest)
        return False


class NearDeduplicator:
    """MinHash LSH index of the documents kept so far; memory grows with num_perm per kept document."""

    def __init__(self, config: DedupConfig) -> None:
        from datasketch import MinHashLSH

        self._threshold = config.threshold
        self._lsh = MinHashLSH(threshold=config.threshold, num_perm=config.num_perm)
        self._signatures: list = []

    def is_duplicate(self, signature) -> bool:
        """True if a kept document is estimated at least `threshold` similar; otherwise index this one."""
        if signature is None:
            return False
        for key in self._lsh.query(signature):
            if signature.jaccard(self._signatures[key]) >= self._threshold:
                return True
        self._lsh.insert(len(self._signatures), signature)
        self._signatures.append(signature)
        return False
