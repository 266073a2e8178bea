"""Exact and near-duplicate removal: planted copies go, distinct documents stay."""
from __future__ import annotations

from data_fixtures import edit_words, make_docs

from training.data import DataConfig, DedupConfig, Document
from training.data.dedup import dedup_key, shingles
from training.data.pipeline import _Stages, process_documents


def survivors(texts: list[str], config: DataConfig | None = None) -> tuple[list[int], dict]:
    """Indexes of the documents the filter + dedup stages keep, and the stage summaries."""
    config = config or DataConfig()
    stages = _Stages(config)
    processed = process_documents([Document(t, f"doc:{i}") for i, t in enumerate(texts)], config)
    kept = [i for i, p in enumerate(processed) if stages.route(p)]
    return kept, {s["stage"]: s for s in stages.to_list()}


def test_dedup_key_ignores_case_and_spacing_only():
    assert dedup_key("Hello  World\n") == dedup_key("hello world")
    assert dedup_key("Hello World") != dedup_key("Hello World!")


def test_shingles_are_word_ngrams():
    assert shingles("A b, c d", 3) == {b"a b c", b"b c d"}
    assert shingles("Just two", 5) == {b"just two"}
    assert shingles("...", 5) == set()


def test_distinct_documents_are_all_kept():
    docs = make_docs(60, seed=1)
    kept, stages = survivors(docs)
    assert kept == list(range(60))
    assert stages["near_dedup"]["removed"] == {}


def test_planted_exact_duplicates_are_removed():
    docs = make_docs(20, seed=2)
    planted = [docs[3], docs[7].upper(), "  " + docs[7].replace(" ", "   ") + "\n", docs[3]]
    kept, stages = survivors(docs + planted)
    assert kept == list(range(20))  # every first occurrence stays, every copy goes
    assert stages["exact_dedup"]["removed"]["duplicate"]["docs"] == 4
    assert stages["near_dedup"]["removed"] == {}


def test_planted_near_duplicates_are_removed():
    docs = make_docs(30, seed=3)
    near = [edit_words(docs[5], 1, seed=1), edit_words(docs[12], 2, seed=2), docs[20] + " One more closing line of text."]
    far = edit_words(docs[25], 60, seed=3)  # most words changed: a different document
    kept, stages = survivors(docs + near + [far])
    assert kept == list(range(30)) + [33]
    assert stages["near_dedup"]["removed"]["near_duplicate"]["docs"] == 3
    assert stages["exact_dedup"]["removed"] == {}


def test_threshold_and_switches():
    docs = make_docs(10, seed=4)
    variant = edit_words(docs[0], 12, seed=5)  # roughly 0.5 estimated Jaccard with docs[0]
    strict = DataConfig(dedup=DedupConfig(threshold=0.95))
    loose = DataConfig(dedup=DedupConfig(threshold=0.3))
    assert survivors(docs + [variant], strict)[0] == list(range(11))
    assert survivors(docs + [variant], loose)[0] == list(range(10))
    off = DataConfig(dedup=DedupConfig(exact=False, near=False))
    kept, stages = survivors(docs + [docs[0], variant], off)
    assert kept == list(range(12)) and set(stages) == {"clean", "filter"}
