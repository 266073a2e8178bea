"""`ember prepare-data` with a real trained tokenizer."""
from __future__ import annotations

import json

import numpy as np
import pytest
from data_fixtures import make_docs

from ember_cli.main import main
from training.data import TokenShards

tokenizer_train = pytest.importorskip("training.tokenizer_train")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return tokenizer_train.train_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def test_prepare_data_command_writes_decodable_shards(tmp_path, tokenizer_dir, capsys):
    from engine.tokenizer import Tokenizer

    docs = make_docs(30, seed=20, sentences=3)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"story": d}) + "\n" for d in docs))
    (tmp_path / "c.yaml").write_text("filter:\n  min_chars: 10\ndedup:\n  threshold: 0.9\n")
    rc = main([
        "prepare-data", "--input", str(tmp_path / "d.jsonl"), "--tokenizer", str(tokenizer_dir),
        "--out", str(tmp_path / "out"), "--config", str(tmp_path / "c.yaml"), "--val-fraction", "0.2",
        "--text-field", "story", "--workers", "2", "--no-progress",
    ])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "near_dedup" in printed and "manifest.json" in printed
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["config"]["filter"]["min_chars"] == 10 and manifest["config"]["val_fraction"] == 0.2
    assert manifest["tokenizer"]["path"] == str(tokenizer_dir.resolve()) and len(manifest["tokenizer"]["sha256"]) == 64
    tok = Tokenizer.from_dir(tokenizer_dir)
    seen = []
    for split in ("train", "val"):
        shards = TokenShards(tmp_path / "out", split)
        stream = shards.get(0, shards.num_tokens)
        assert stream[0] == tok.bos_id and stream[-1] == tok.eos_id
        bounds = np.flatnonzero(stream == tok.eos_id)
        starts = np.concatenate([[0], bounds[:-1] + 1])
        seen += [tok.decode(stream[s + 1:e].tolist()) for s, e in zip(starts, bounds)]
    assert sorted(seen) == sorted(docs)


def test_prepare_data_command_reports_bad_input(tmp_path, tokenizer_dir, capsys):
    (tmp_path / "d.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n')
    rc = main(["prepare-data", "--input", str(tmp_path / "d.jsonl"), "--tokenizer", str(tokenizer_dir),
               "--out", str(tmp_path / "out"), "--workers", "1", "--no-progress"])
    assert rc == 2
    assert f"{tmp_path / 'd.jsonl'}:2: no field 'text'" in capsys.readouterr().err
    rc = main(["prepare-data", "--input", str(tmp_path / "gone.txt"), "--tokenizer", str(tokenizer_dir),
               "--out", str(tmp_path / "out2"), "--no-progress"])
    assert rc == 2 and "input not found" in capsys.readouterr().err
