"""Document filters: length, repetition and a simple language/quality heuristic.

`filter_reason` returns the name of the first filter a document fails, or None to keep it.
The names are what the summary counts under the filter stage.
"""
from __future__ import annotations

import re
from collections import Counter

from training.data.config import FilterConfig

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """Lower-cased word tokens (runs of letters, digits and underscores)."""
    return _WORD.findall(text.lower())


def duplicate_line_fraction(text: str) -> float:
    """Fraction of non-empty lines that repeat an earlier line of the document."""
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    if not lines:
        return 0.0
    return (len(lines) - len(set(lines))) / len(lines)


def top_ngram_fraction(tokens: list[str], n: int) -> float:
    """Fraction of word characters covered by occurrences of the most frequent word n-gram.

    Occurrences may overlap ("ha ha ha"), so coverage is counted per word position rather
    than by multiplying the count, which keeps the value within [0, 1]. An n-gram seen only
    once is not repetition, so a document without repeats scores 0.
    """
    if len(tokens) < n:
        return 0.0
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    top, count = Counter(grams).most_common(1)[0]
    if count < 2:
        return 0.0
    covered = [False] * len(tokens)
    for i, gram in enumerate(grams):
        if gram == top:
            covered[i:i + n] = [True] * n
    total = sum(len(w) for w in tokens)
    return sum(len(w) for w, c in zip(tokens, covered) if c) / total


def alpha_fraction(text: str) -> float:
    """Letters among non-whitespace characters."""
    chars = [c for c in text if not c.isspace()]
    if not chars:
        return 0.0
    return sum(c.isalpha() for c in chars) / len(chars)


def filter_reason(text: str, config: FilterConfig) -> str | None:
    """The first filter `text` fails (see FilterConfig for the measures), or None if it passes all."""
    n = len(text)
    if config.min_chars is not None and n < config.min_chars:
        return "too_short"
    if config.max_chars is not None and n > config.max_chars:
        return "too_long"
    tokens = words(text)
    if len(tokens) < config.heuristics_min_words:
        return None
    if config.max_duplicate_line_fraction is not None and duplicate_line_fraction(text) > config.max_duplicate_line_fraction:
        return "duplicate_lines"
    for size, limit in sorted(config.max_top_ngram_fraction.items()):
        if top_ngram_fraction(tokens, size) > limit:
            return f"top_{size}gram"
    if config.min_alpha_fraction is not None and alpha_fraction(text) < config.min_alpha_fraction:
        return "low_alpha"
    mean_len = sum(len(w) for w in tokens) / len(tokens) if tokens else 0.0
    if config.min_mean_word_length is not None and mean_len < config.min_mean_word_length:
        return "short_words"
    if config.max_mean_word_length is not None and mean_len > config.max_mean_word_length:
        return "long_words"
    if config.min_stop_words and len(set(tokens) & set(config.stop_words)) < config.min_stop_words:
        return "few_stop_words"
    return None
