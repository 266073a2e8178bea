"""prepare_data end to end with a byte-level stand-in tokenizer: shards, manifest, split, summary."""
from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
from data_fixtures import ByteTokenizer, WideByteTokenizer, edit_words, make_docs

from training.data import DataConfig, DataError, TokenShards, pipeline, prepare_data, read_manifest
from training.data.clean import clean_text


def split_documents(shards: TokenShards) -> list[np.ndarray]:
    """Cut a split's stream at BOS ... EOS, checking every document is wrapped exactly once."""
    stream = shards.get(0, shards.num_tokens)
    starts = np.flatnonzero(stream == shards.bos_id)
    ends = np.flatnonzero(stream == shards.eos_id)
    assert len(starts) == len(ends) == shards.num_documents
    assert starts[0] == 0 and ends[-1] == len(stream) - 1
    assert np.array_equal(starts[1:], ends[:-1] + 1)  # documents are packed back to back
    return [stream[s + 1:e] for s, e in zip(starts, ends)]


def decoded(out, split, tokenizer=None) -> list[str]:
    tokenizer = tokenizer or ByteTokenizer()
    return [tokenizer.decode(doc) for doc in split_documents(TokenShards(out, split))]


def write_corpus(path, docs: list[str]) -> None:
    path.write_text("\n<|endoftext|>\n".join(docs) + "\n", encoding="utf-8")


def test_shards_round_trip_to_the_cleaned_documents(tmp_path):
    docs = make_docs(40, seed=10)
    docs[4] = "  Caf\u0065\u0301   " + docs[4] + " \x07 \u00e9t\u00e9\n"  # needs cleaning; non-ASCII survives bytes
    write_corpus(tmp_path / "c.txt", docs)
    result = prepare_data([tmp_path / "c.txt"], tmp_path / "out", ByteTokenizer, DataConfig(val_fraction=0.25))
    train, val = decoded(tmp_path / "out", "train"), decoded(tmp_path / "out", "val")
    expected = [clean_text(d, DataConfig().clean) for d in docs]
    assert sorted(train + val) == sorted(expected)
    assert not set(train) & set(val)
    assert [d for d in expected if d in set(train)] == train  # input order kept within a split
    m = result.manifest
    assert m == read_manifest(tmp_path / "out")
    assert m["dtype"] == "uint16" and m["vocab_size"] == 258 and (m["bos_id"], m["eos_id"]) == (256, 257)
    assert m["splits"]["train"]["num_documents"] == len(train) and m["splits"]["val"]["num_documents"] == len(val)
    for name, docs_of_split in (("train", train), ("val", val)):
        tokens = sum(len(d.encode("utf-8")) + 2 for d in docs_of_split)
        assert m["splits"][name]["num_tokens"] == tokens == TokenShards(tmp_path / "out", name).num_tokens
    assert m["tokenizer"]["loader"].endswith("ByteTokenizer")


def test_large_vocab_uses_uint32(tmp_path):
    docs = make_docs(5, seed=11)
    write_corpus(tmp_path / "c.txt", docs)
    result = prepare_data([tmp_path / "c.txt"], tmp_path / "out", WideByteTokenizer, DataConfig(val_fraction=0.0))
    assert result.manifest["dtype"] == "uint32"
    shards = TokenShards(tmp_path / "out", "train")
    assert shards.get(0, 1)[0] == 70_256
    assert decoded(tmp_path / "out", "train", WideByteTokenizer()) == docs


def test_split_is_deterministic_and_seeded(tmp_path):
    docs = make_docs(120, seed=12, sentences=3)
    write_corpus(tmp_path / "c.txt", docs)

    def val_docs(seed: int, name: str) -> set[str]:
        prepare_data([tmp_path / "c.txt"], tmp_path / name, ByteTokenizer, DataConfig(val_fraction=0.25, seed=seed))
        return set(decoded(tmp_path / name, "val"))

    first, again, other = val_docs(0, "a"), val_docs(0, "b"), val_docs(1, "c")
    assert first == again
    assert first != other
    assert 15 <= len(first) <= 45  # about a quarter of 120
    # A document's split depends on its own text alone: reversing the corpus changes nothing.
    write_corpus(tmp_path / "c.txt", docs[::-1])
    assert val_docs(0, "d") == first


def test_workers_do_not_change_the_output(tmp_path):
    docs = make_docs(700, seed=13, sentences=2)
    docs += [docs[10], edit_words(docs[20] + " " + docs[21], 1)]
    write_corpus(tmp_path / "c.txt", docs)
    config = DataConfig(val_fraction=0.1)
    one = prepare_data([tmp_path / "c.txt"], tmp_path / "one", ByteTokenizer, config, workers=1)
    two = prepare_data([tmp_path / "c.txt"], tmp_path / "two", ByteTokenizer, config, workers=2)
    assert one.manifest["splits"] == two.manifest["splits"] and one.manifest["stages"] == two.manifest["stages"]
    for shard in one.manifest["splits"]["train"]["shards"] + one.manifest["splits"]["val"]["shards"]:
        assert (tmp_path / "one" / shard["file"]).read_bytes() == (tmp_path / "two" / shard["file"]).read_bytes()


def test_summary_counts_every_removal_by_reason(tmp_path):
    good = make_docs(10, seed=14)
    planted = [
        "\x00\x01\x02   ",  # nothing left after cleaning
        "Tiny.",  # too short
        "click here to win " * 20,  # top 2-gram repetition
        good[2].upper(),  # exact duplicate (case only)
        edit_words(good[5], 1),  # near duplicate
    ]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in good + planted))
    result = prepare_data([tmp_path / "d.jsonl"], tmp_path / "out", ByteTokenizer, DataConfig(val_fraction=0.0))
    stages = {s["stage"]: s for s in result.manifest["stages"]}
    assert stages["clean"]["docs_in"] == 15 and stages["clean"]["removed"]["empty"]["docs"] == 1
    assert {r: v["docs"] for r, v in stages["filter"]["removed"].items()} == {"too_short": 1, "top_2gram": 1}
    assert stages["filter"]["removed"]["too_short"]["chars"] == len("Tiny.")
    assert stages["exact_dedup"]["removed"]["duplicate"]["docs"] == 1
    assert stages["near_dedup"]["removed"]["near_duplicate"]["docs"] == 1
    assert stages["near_dedup"]["removed"]["near_duplicate"]["examples"] == [f"{tmp_path / 'd.jsonl'}:15"]
    assert stages["near_dedup"]["docs_out"] == 10 == result.manifest["splits"]["train"]["num_documents"]
    table = result.summary_table()
    for word in ("clean", "empty", "too_short", "top_2gram", "exact_dedup", "near_duplicate", "kept"):
        assert word in table


def test_mixed_folder_of_gzip_jsonl_and_text(tmp_path):
    docs = make_docs(6, seed=15)
    src = tmp_path / "src"
    (src / "nested").mkdir(parents=True)
    write_corpus(src / "a.txt", docs[:2])
    with gzip.open(src / "nested" / "b.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps({"body": d}) + "\n" for d in docs[2:4])
    with gzip.open(src / "nested" / "c.txt.gz", "wt", encoding="utf-8") as fh:
        fh.write("\n\n".join(docs[4:]))
    prepare_data([src], tmp_path / "out", ByteTokenizer, DataConfig(val_fraction=0.0, text_field="body"))
    assert decoded(tmp_path / "out", "train") == docs


def test_val_inputs_form_the_validation_split_and_win_over_train_copies(tmp_path):
    docs = make_docs(12, seed=16)
    write_corpus(tmp_path / "val.txt", docs[:3])
    write_corpus(tmp_path / "train.txt", docs[3:] + [docs[0], edit_words(docs[1], 1)])
    result = prepare_data([tmp_path / "train.txt"], tmp_path / "out", ByteTokenizer, val_inputs=[tmp_path / "val.txt"])
    assert decoded(tmp_path / "out", "val") == docs[:3]
    assert decoded(tmp_path / "out", "train") == docs[3:]
    assert result.manifest["split"]["method"] == "val_inputs"


def test_small_shards_keep_documents_whole(tmp_path):
    docs = make_docs(20, seed=17, sentences=2)
    write_corpus(tmp_path / "c.txt", docs)
    result = prepare_data([tmp_path / "c.txt"], tmp_path / "out", ByteTokenizer, DataConfig(val_fraction=0.0, shard_tokens=1000))
    shards = result.manifest["splits"]["train"]["shards"]
    assert len(shards) > 3 and all(s["num_tokens"] <= 1000 for s in shards)
    for s in shards:  # each shard file is whole documents on its own
        raw = np.fromfile(tmp_path / "out" / s["file"], dtype=np.uint16)
        assert raw[0] == 256 and raw[-1] == 257 and (raw == 256).sum() == s["num_documents"]
    assert decoded(tmp_path / "out", "train") == docs


def test_refuses_to_overwrite_and_cleans_up_after_a_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "DOCS_PER_TASK", 2)  # so shards are being written when the bad line comes
    write_corpus(tmp_path / "c.txt", make_docs(6, seed=18))
    prepare_data([tmp_path / "c.txt"], tmp_path / "out", ByteTokenizer)
    with pytest.raises(DataError, match="already holds prepared data"):
        prepare_data([tmp_path / "c.txt"], tmp_path / "out", ByteTokenizer)
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{oops\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
        prepare_data([tmp_path / "c.txt", tmp_path / "bad.jsonl"], tmp_path / "out", ByteTokenizer, overwrite=True)
    assert list((tmp_path / "out").iterdir()) == []  # no manifest, no half-written shards


def test_everything_filtered_out_is_an_error(tmp_path):
    (tmp_path / "c.txt").write_text("short\n\ntiny\n")
    with pytest.raises(DataError, match="no training documents left"):
        prepare_data([tmp_path / "c.txt"], tmp_path / "out", ByteTokenizer)


def test_missing_input_and_tokenizer_are_reported_before_work(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        prepare_data([tmp_path / "missing.txt"], tmp_path / "out", ByteTokenizer)
    write_corpus(tmp_path / "c.txt", make_docs(2))
    with pytest.raises(FileNotFoundError, match="tokenizer folder not found"):
        prepare_data([tmp_path / "c.txt"], tmp_path / "out", tmp_path / "no-tokenizer")
    assert not (tmp_path / "out").exists()
