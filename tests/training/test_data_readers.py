"""Reading inputs: text splitting modes, jsonl, gzip, folders, and clear errors for bad input."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from training.data import DataError, iter_documents
from training.data.readers import list_input_files, read_text

SHARED_STORIES = Path(__file__).resolve().parents[3] / "shared" / "data" / "tinystories"


def texts(paths, **kw) -> list[str]:
    return [d.text.strip() for d in iter_documents(paths, **kw)]


def test_auto_splits_on_endoftext_when_present(tmp_path):
    f = tmp_path / "stories.txt"
    f.write_text("One story.\nStill one.\n<|endoftext|>\n\nTwo<|endoftext|>Three\n\nthree goes on\n")
    assert texts([f]) == ["One story.\nStill one.", "Two", "Three\n\nthree goes on"]


def test_auto_falls_back_to_blank_lines(tmp_path):
    f = tmp_path / "paras.txt"
    f.write_text("a first\nparagraph\n\n\n  \nsecond one\n\nthird\n")
    docs = list(iter_documents([f]))
    assert [d.text.strip() for d in docs] == ["a first\nparagraph", "second one", "third"]
    assert [d.source for d in docs] == [f"{f}:1", f"{f}:6", f"{f}:8"]


def test_line_none_and_literal_marker_modes(tmp_path):
    f = tmp_path / "x.txt"
    f.write_text("alpha\nbeta\n----\n\ngamma\n")
    assert texts([f], doc_separator="line") == ["alpha", "beta", "----", "gamma"]
    assert texts([f], doc_separator="none") == ["alpha\nbeta\n----\n\ngamma"]
    assert texts([f], doc_separator="----") == ["alpha\nbeta", "gamma"]


def test_jsonl_with_configurable_field_and_crlf(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(b'{"body": "first doc"}\r\n\r\n{"body": "second\\ndoc", "id": 2}\r\n')
    docs = list(iter_documents([f], text_field="body"))
    assert [d.text for d in docs] == ["first doc", "second\ndoc"]
    assert docs[1].source == f"{f}:3"


def test_gzip_text_and_jsonl(tmp_path):
    with gzip.open(tmp_path / "a.txt.gz", "wt", encoding="utf-8") as fh:
        fh.write("zipped one\n\nzipped two\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.write(json.dumps({"text": "zipped json"}) + "\n")
    assert texts([tmp_path / "a.txt.gz", tmp_path / "b.jsonl.gz"]) == ["zipped one", "zipped two", "zipped json"]


def test_folder_is_read_recursively_in_sorted_order(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "sub" / "a.jsonl").write_text('{"text": "ay"}\n')
    with gzip.open(tmp_path / "sub" / "deeper" / "c.txt.gz", "wt") as fh:
        fh.write("sea")
    (tmp_path / "notes.csv").write_text("skipped")
    (tmp_path / ".hidden.txt").write_text("skipped too")
    assert texts([tmp_path]) == ["bee", "ay", "sea"]
    assert [p.name for p in list_input_files([tmp_path])] == ["b.txt", "a.jsonl", "c.txt.gz"]


def test_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        list(iter_documents([tmp_path / "nope.txt"]))


def test_empty_inputs_are_an_error(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(DataError, match="no documents found in .*empty.txt"):
        list(iter_documents([tmp_path / "empty.txt"]))
    (tmp_path / "void").mkdir()
    with pytest.raises(DataError, match="void: folder holds no"):
        list(iter_documents([tmp_path / "void"]))
    with pytest.raises(DataError, match="no input paths"):
        list(iter_documents([]))


def test_unsupported_file_type(tmp_path):
    (tmp_path / "table.csv").write_text("a,b")
    with pytest.raises(DataError, match="table.csv: unsupported input type"):
        list(iter_documents([tmp_path / "table.csv"]))


def test_jsonl_line_without_field_names_file_and_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "ok"}\n{"text": "ok"}\n{"content": "wrong key"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:3: no field 'text' \(fields: content\)"):
        list(iter_documents([f]))


def test_invalid_json_names_file_and_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "ok"}\n{"text": "unterminated}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: invalid JSON"):
        list(iter_documents([f]))


def test_non_object_and_non_string_field(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('["a list"]\n')
    with pytest.raises(DataError, match=r"d.jsonl:1: expected a JSON object, got list"):
        list(iter_documents([f]))
    f.write_text('{"text": 42}\n')
    with pytest.raises(DataError, match=r"d.jsonl:1: field 'text' is int"):
        list(iter_documents([f]))


def test_bad_utf8_and_corrupt_gzip_name_the_file(tmp_path):
    f = tmp_path / "bad.txt"
    f.write_bytes(b"fine line\n\xff\xfe broken\n")
    with pytest.raises(DataError, match=r"bad.txt:2: not valid UTF-8"):
        list(iter_documents([f]))
    g = tmp_path / "bad.txt.gz"
    g.write_bytes(b"definitely not gzip")
    with pytest.raises(DataError, match=r"bad.txt.gz.*corrupt gzip"):
        list(iter_documents([g]))


@pytest.mark.skipif(not SHARED_STORIES.is_dir(), reason="shared TinyStories samples not available")
def test_tinystories_sample_splits_into_stories():
    docs = list(read_text(SHARED_STORIES / "train_sample_2MiB_cased.txt"))
    # SOURCE.md: 2,316 markers, so 2,317 stories (the last one cut off).
    assert len(docs) == 2317
    assert docs[0].text.startswith("One day, a little girl named Lily found a needle")
    assert not any("<|endoftext|>" in d.text for d in docs)
