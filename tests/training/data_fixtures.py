"""Helpers for the data pipeline tests: stand-in tokenizers and seeded synthetic prose."""
from __future__ import annotations

import random

STOP_WORDS = ("the", "and", "to", "of", "with", "that")
_SYLLABLES = ("ka", "lo", "mi", "ren", "tus", "vel", "dor", "pi", "sha", "gon", "bri", "el", "fa", "nu", "sto", "wex")


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255, BOS 256, EOS 257: decodes exactly, so round trips are checkable."""

    bos_id, eos_id, vocab_size = 256, 257, 258
    offset = 0

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = [b + self.offset for b in text.encode("utf-8")]
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids) -> str:
        return bytes(int(i) - self.offset for i in ids if i not in (self.bos_id, self.eos_id)).decode("utf-8")


class WideByteTokenizer(ByteTokenizer):
    """The same bytes shifted past 65535, with a vocabulary that needs uint32 shards."""

    offset = 70_000
    bos_id, eos_id, vocab_size = 70_256, 70_257, 70_258


def make_docs(n: int, seed: int = 0, sentences: int = 12) -> list[str]:
    """`n` distinct documents of seeded pseudo-prose (about 15 words a sentence) that pass the default filters."""
    rng = random.Random(seed)
    vocab = sorted({"".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))) for _ in range(3000)})
    docs = []
    for _ in range(n):
        out = []
        for _ in range(sentences):
            ws = [rng.choice(vocab) if rng.random() > 0.3 else rng.choice(STOP_WORDS) for _ in range(rng.randint(10, 20))]
            out.append(" ".join(ws).capitalize() + ".")
        docs.append(" ".join(out))
    return docs


def edit_words(text: str, count: int, seed: int = 0) -> str:
    """`text` with `count` words replaced: a near duplicate of it."""
    rng = random.Random(seed)
    words = text.split(" ")
    for i in rng.sample(range(len(words)), count):
        words[i] = "zzyzx"
    return " ".join(words)
