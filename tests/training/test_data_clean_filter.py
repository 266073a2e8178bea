"""Cleaning, filters and their settings."""
from __future__ import annotations

from pathlib import Path

import pytest

from training.data import CleanConfig, DataConfig, DataError, DedupConfig, FilterConfig
from training.data.clean import clean_text
from training.data.filters import duplicate_line_fraction, filter_reason, top_ngram_fraction, words

DEFAULT_YAML = Path(__file__).resolve().parents[2] / "configs" / "data" / "default.yaml"

PROSE = (
    "The old lighthouse keeper walked along the cliff every morning, and he counted the boats that "
    "came back to the harbour with their nets full of silver fish. His daughter liked to sit with him "
    "on the stone steps, where the wind smelled of salt and tar, and she asked about the storms of "
    "his youth. He told her that the sea is patient with those who respect it."
)


def test_clean_normalises_unicode():
    decomposed = "Cafe\u0301 \ufb01ne"  # e + combining acute; the "fi" ligature
    assert clean_text(decomposed, CleanConfig(normalization="NFC")) == "Caf\u00e9 \ufb01ne"
    assert clean_text(decomposed, CleanConfig(normalization="NFKC")) == "Caf\u00e9 fine"
    assert clean_text(decomposed, CleanConfig(normalization="none")) == decomposed


def test_clean_strips_control_characters_but_keeps_newline_and_tab():
    raw = "a\x00b\x07c\x1b[0m\td\ne\x7f\x85f\ufeffg"
    assert clean_text(raw, CleanConfig(collapse_whitespace=False)) == "abc[0m\td\ne\nfg"


def test_clean_collapses_whitespace_runs():
    raw = "  one   two\t\tthree\u00a0four \n\n\n\n five  \nsix\t"
    assert clean_text(raw, CleanConfig()) == "one two three four\n\n five\nsix"


def test_prose_passes_every_filter():
    assert filter_reason(PROSE, FilterConfig()) is None


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("Too short.", "too_short"),
        (PROSE * 6, "too_long"),
        ("\n".join(["the same line again and again"] * 8 + PROSE.split(", ")), "duplicate_lines"),
        ("buy cheap pills now " * 20, "top_2gram"),
        ("12 34 56 78 90 " * 12 + "the and", "low_alpha"),
        ("a b c d e f g h i j " * 6 + "the and to", "short_words"),
        (" ".join(["internationalisation"] * 3 + ["incomprehensibilities", "counterrevolutionaries"] * 30), "long_words"),
        (" ".join(f"word{i}x lorem ipsum dolor" for i in range(20)).replace("1", "q"), "few_stop_words"),
    ],
)
def test_each_filter_catches_what_it_should(text, reason):
    config = FilterConfig(max_chars=2000)
    if reason in ("low_alpha", "short_words", "long_words", "few_stop_words"):
        config.max_top_ngram_fraction = {}  # these texts repeat on purpose; isolate the heuristic under test
    assert filter_reason(text, config) == reason


def test_heuristics_skip_short_documents():
    short = "ha ha ha ha ha ha ha ha ha ha"
    assert filter_reason(short, FilterConfig(min_chars=1)) is None
    assert filter_reason(short, FilterConfig(min_chars=1, heuristics_min_words=5)) == "top_2gram"


def test_none_switches_a_filter_off():
    off = FilterConfig(min_chars=None, min_stop_words=None, min_alpha_fraction=None, min_mean_word_length=None)
    assert filter_reason("x", off) is None


def test_repetition_measures():
    assert duplicate_line_fraction("a\nb\na\na\n\n") == pytest.approx(0.5)
    assert duplicate_line_fraction("") == 0.0
    assert top_ngram_fraction(words("one two three four"), 2) == 0.0  # nothing repeats
    # "ha ha ha": the 2-gram occurrences overlap; coverage stays within the words, so 1.0, not 2 * 4 / 6.
    assert top_ngram_fraction(words("ha ha ha"), 2) == 1.0
    assert top_ngram_fraction(words("aa bb aa bb cc"), 2) == pytest.approx(8 / 10)


@pytest.mark.parametrize(
    "bad",
    [
        {"clean": {"normalization": "NFD"}},
        {"filter": {"min_chars": 100, "max_chars": 10}},
        {"filter": {"max_duplicate_line_fraction": 1.5}},
        {"filter": {"max_top_ngram_fraction": {0: 0.2}}},
        {"filter": {"min_mean_word_length": 12.0}},
        {"filter": {"min_stop_words": 9}},
        {"dedup": {"threshold": 0.0}},
        {"dedup": {"num_perm": 1}},
        {"dedup": {"shingle_words": 0}},
        {"val_fraction": 1.0},
        {"shard_tokens": 0},
        {"text_field": ""},
    ],
)
def test_invalid_settings_are_rejected(bad):
    with pytest.raises(DataError):
        DataConfig.from_dict(bad, source="test.yaml")


def test_unknown_keys_name_the_file_and_section(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("filter:\n  min_charz: 3\n")
    with pytest.raises(DataError, match=r"c.yaml: unknown key\(s\) min_charz in section 'filter'"):
        DataConfig.from_yaml(f)
    f.write_text("val_fractoin: 0.1\n")
    with pytest.raises(DataError, match=r"unknown key\(s\) val_fractoin in the top level"):
        DataConfig.from_yaml(f)


def test_yaml_overrides_and_default_file_matches_defaults(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("val_fraction: 0.2\nfilter:\n  min_chars: 5\n  max_top_ngram_fraction: {2: 0.5}\ndedup:\n  near: false\n")
    config = DataConfig.from_yaml(f)
    assert config.val_fraction == 0.2 and config.filter.min_chars == 5 and config.dedup.near is False
    assert config.filter.max_top_ngram_fraction == {2: 0.5}
    assert config.dedup == DedupConfig(near=False)
    # The shipped file documents the defaults: it must not drift from the dataclasses.
    assert DataConfig.from_yaml(DEFAULT_YAML) == DataConfig()
    # The manifest stores the config as plain data; it loads back to the same settings.
    assert DataConfig.from_dict(DataConfig().to_dict()) == DataConfig()
