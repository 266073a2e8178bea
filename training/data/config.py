"""Settings of the data pipeline: dataclasses validated on construction, loadable from YAML.

A YAML file mirrors the dataclasses: top-level keys of `DataConfig` plus the sections `clean`,
`filter` and `dedup` (see configs/data/default.yaml). Unknown keys are errors, so a typo never
silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.data.errors import DataError

NORMALIZATIONS = ("NFC", "NFKC", "none")
# Structural ways to cut a text file into documents; any other value is a literal marker.
SEPARATOR_MODES = ("auto", "blank", "line", "none")
# The marker TinyStories (and GPT-2 style dumps) put between documents; "auto" splits on it when present.
END_OF_TEXT = "<|endoftext|>"
# Gopher's stop words (Rae et al. 2021): English prose contains at least two of them.
DEFAULT_STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")


def _check_fraction(name: str, value: float | None, *, allow_one: bool = True) -> None:
    if value is None:
        return
    upper_ok = value <= 1.0 if allow_one else value < 1.0
    if not (0.0 <= value and upper_ok):
        bound = "1]" if allow_one else "1)"
        raise DataError(f"{name} must be in [0, {bound}, got {value}")


@dataclass
class CleanConfig:
    """How text is cleaned before anything else looks at it."""

    normalization: str = "NFC"  # unicode normal form: NFC, NFKC or none
    strip_control: bool = True  # drop control characters except newline and tab
    collapse_whitespace: bool = True  # runs of spaces/tabs -> one space; 3+ newlines -> one blank line

    def __post_init__(self) -> None:
        if self.normalization not in NORMALIZATIONS:
            raise DataError(f"clean.normalization must be one of {', '.join(NORMALIZATIONS)}, got {self.normalization!r}")


@dataclass
class FilterConfig:
    """Thresholds of the document filters; None switches a filter off.

    Repetition measures follow Gopher: the fraction of non-empty lines that repeat an earlier
    line, and for each n the fraction of word characters covered by the most frequent word n-gram.
    The quality heuristic asks for mostly alphabetic text, plausible word lengths and a few stop words.
    Repetition and quality are only judged on documents of at least `heuristics_min_words` words:
    on a two-line paragraph these statistics are noise (Gopher applies them to 50+ word documents).
    """

    min_chars: int | None = 32
    max_chars: int | None = 1_000_000
    heuristics_min_words: int = 50
    max_duplicate_line_fraction: float | None = 0.3
    max_top_ngram_fraction: dict[int, float] = field(default_factory=lambda: {2: 0.2, 3: 0.18, 4: 0.16})
    min_alpha_fraction: float | None = 0.7  # letters / non-whitespace characters
    min_mean_word_length: float | None = 3.0
    max_mean_word_length: float | None = 10.0
    min_stop_words: int | None = 2  # distinct stop words that must appear
    stop_words: tuple[str, ...] = DEFAULT_STOP_WORDS

    def __post_init__(self) -> None:
        for name in ("min_chars", "max_chars", "min_stop_words", "heuristics_min_words"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise DataError(f"filter.{name} must be a non-negative integer or null, got {value!r}")
        if self.min_chars is not None and self.max_chars is not None and self.max_chars < self.min_chars:
            raise DataError(f"filter.max_chars ({self.max_chars}) is below filter.min_chars ({self.min_chars})")
        _check_fraction("filter.max_duplicate_line_fraction", self.max_duplicate_line_fraction)
        _check_fraction("filter.min_alpha_fraction", self.min_alpha_fraction)
        self.max_top_ngram_fraction = {int(n): float(f) for n, f in (self.max_top_ngram_fraction or {}).items()}
        for n, frac in self.max_top_ngram_fraction.items():
            if n < 1:
                raise DataError(f"filter.max_top_ngram_fraction: n-gram size must be >= 1, got {n}")
            _check_fraction(f"filter.max_top_ngram_fraction[{n}]", frac)
        lo, hi = self.min_mean_word_length, self.max_mean_word_length
        if (lo is not None and lo < 0) or (hi is not None and hi < 0):
            raise DataError("filter.min_mean_word_length and filter.max_mean_word_length must be >= 0")
        if lo is not None and hi is not None and hi < lo:
            raise DataError(f"filter.max_mean_word_length ({hi}) is below filter.min_mean_word_length ({lo})")
        self.stop_words = tuple(w.lower() for w in self.stop_words)
        if self.min_stop_words and self.min_stop_words > len(set(self.stop_words)):
            raise DataError(
                f"filter.min_stop_words ({self.min_stop_words}) exceeds the {len(set(self.stop_words))} distinct stop words given"
            )


@dataclass
class DedupConfig:
    """Exact (sha256 of the normalised text) and near (MinHash LSH over word shingles) deduplication."""

    exact: bool = True
    near: bool = True
    threshold: float = 0.8  # estimated Jaccard similarity at or above which a document is a near duplicate
    num_perm: int = 128  # MinHash permutations: more is more precise and slower
    shingle_words: int = 5  # words per shingle
    seed: int = 1  # MinHash seed; changing it changes which borderline pairs are caught

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise DataError(f"dedup.threshold must be in (0, 1], got {self.threshold}")
        if self.num_perm < 2:
            raise DataError(f"dedup.num_perm must be >= 2, got {self.num_perm}")
        if self.shingle_words < 1:
            raise DataError(f"dedup.shingle_words must be >= 1, got {self.shingle_words}")


@dataclass
class DataConfig:
    """Everything `prepare_data` needs to know besides the inputs, the tokenizer and the output folder."""

    text_field: str = "text"  # the JSON key holding the text in .jsonl inputs
    doc_separator: str = "auto"  # auto | blank | line | none | a literal marker such as "<|endoftext|>"
    val_fraction: float = 0.01  # share of documents sent to the validation split
    seed: int = 0  # seeds the train/validation split
    shard_tokens: int = 100_000_000  # a shard is closed before it would pass this many tokens
    clean: CleanConfig = field(default_factory=CleanConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)

    def __post_init__(self) -> None:
        if not self.text_field:
            raise DataError("text_field must be a non-empty string")
        if not self.doc_separator:
            raise DataError(f"doc_separator must be one of {', '.join(SEPARATOR_MODES)} or a non-empty literal marker")
        _check_fraction("val_fraction", self.val_fraction, allow_one=False)
        if self.shard_tokens < 1:
            raise DataError(f"shard_tokens must be >= 1, got {self.shard_tokens}")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> DataConfig:
        """Build from nested plain data (as read from YAML); unknown keys raise DataError naming `source`."""
        if not isinstance(data, dict):
            raise DataError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
        sections = {"clean": CleanConfig, "filter": FilterConfig, "dedup": DedupConfig}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in sections:
                kwargs[key] = _build(sections[key], value or {}, source, section=key)
            else:
                kwargs[key] = value
        return _build(cls, kwargs, source)

    @classmethod
    def from_yaml(cls, path: str | Path) -> DataConfig:
        """Load a YAML file laid out like configs/data/default.yaml."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"data config not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise DataError(f"{path}: invalid YAML: {exc}") from exc
        return cls.from_dict(data or {}, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """Plain nested data, as written into the manifest."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> DataConfig:
        """A copy with top-level fields changed (and validated again)."""
        return dataclasses.replace(self, **changes)


def _build(cls: type, values: dict[str, Any], where: str, section: str = ""):
    place = f"section {section!r}" if section else "the top level"
    if not isinstance(values, dict):
        raise DataError(f"{where}: expected a mapping in {place}, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise DataError(f"{where}: unknown key(s) {', '.join(unknown)} in {place}; known: {', '.join(sorted(known))}")
    if "stop_words" in values and values["stop_words"] is not None:
        values = {**values, "stop_words": tuple(values["stop_words"])}
    try:
        return cls(**values)
    except (TypeError, DataError) as exc:
        raise DataError(f"{where}: {exc}") from exc
