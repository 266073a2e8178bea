"""Tokenizer training: the files it writes, determinism, round trips, loading in transformers, the CLI."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from ember_cli.main import main
from engine.tokenizer import Tokenizer
from training.tokenizer_train import TINY_CORPUS, train_tiny_tokenizer, train_tokenizer

SAMPLE = "Zoë ordered 3 crêpes at the café. 日本 😀 and a\ttab.\nSecond line, with  two spaces."


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tiny"), vocab_size=512)


def test_bundled_corpus_is_small_plain_prose():
    text = TINY_CORPUS.read_text(encoding="utf-8")
    assert 4_000 <= len(text.encode("utf-8")) <= 8_192
    assert any(c.isdigit() for c in text) and any(ord(c) > 127 for c in text)


def test_files_and_special_tokens(tiny_dir):
    assert {p.name for p in tiny_dir.iterdir()} == {"tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"}
    config = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["pad_token"], config["unk_token"]) == ("<s>", "</s>", "<pad>", "<unk>")
    assert config["add_bos_token"] is True and config["model_max_length"] == 2048
    assert "<|im_start|>" in config["chat_template"]
    tok = Tokenizer.from_dir(tiny_dir)
    assert tok.vocab_size == 512
    ids = [tok.token_to_id(t) for t in ("<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>")]
    assert ids == [0, 1, 2, 3, 4, 5]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    # Chat-role tokens are single pieces, also inside text.
    assert tok.encode("<|im_start|>user", add_bos=False)[0] == 4


def test_round_trip_with_byte_fallback(tiny_dir):
    tok = Tokenizer.from_dir(tiny_dir)
    assert tok.decode(tok.encode(SAMPLE)) == SAMPLE
    assert tok.unk_id not in tok.encode(SAMPLE)  # unseen characters become bytes, never <unk>


def test_training_is_deterministic(tmp_path):
    texts = [TINY_CORPUS.read_text(encoding="utf-8"), SAMPLE]
    a = train_tokenizer(texts, tmp_path / "a", 400)
    b = train_tokenizer(texts, tmp_path / "b", 400)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_max_sentences_and_gzip_input(tmp_path):
    lines = TINY_CORPUS.read_text(encoding="utf-8").splitlines()
    gz = tmp_path / "corpus.txt.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines))
    a = train_tokenizer([gz], tmp_path / "a", 400, max_sentences=20)
    b = train_tokenizer([gz], tmp_path / "b", 400, max_sentences=20)
    assert (a / "tokenizer.model").read_bytes() == (b / "tokenizer.model").read_bytes()
    full = train_tokenizer([gz], tmp_path / "full", 400)
    assert (a / "tokenizer.model").read_bytes() != (full / "tokenizer.model").read_bytes()


def test_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="Vocabulary size"):
        train_tokenizer(["just a few words"], tmp_path / "x", 5000)
    with pytest.raises(ValueError, match="no text"):
        train_tokenizer(["", "  \n"], tmp_path / "y", 300)


def test_transformers_loads_the_trained_tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_dir)
    tok = Tokenizer.from_dir(tiny_dir)
    assert hf.encode(SAMPLE) == tok.encode(SAMPLE)
    assert hf.decode(tok.encode(SAMPLE), skip_special_tokens=True) == SAMPLE
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == tok.apply_chat_template(messages)


def test_cli(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TINY_CORPUS.read_text(encoding="utf-8"), encoding="utf-8")
    out = tmp_path / "tok"
    rc = main(["train-tokenizer", "--input", str(corpus), str(corpus), "--out", str(out), "--vocab-size", "400", "--max-sentences", "50"])
    assert rc == 0
    assert "400 tokens" in capsys.readouterr().out
    assert Tokenizer.from_dir(out).vocab_size == 400
    assert main(["train-tokenizer", "--input", str(tmp_path / "missing.txt"), "--out", str(out)]) == 2
    assert "missing.txt" in capsys.readouterr().err


def test_inputs_accept_paths_and_texts(tmp_path):
    f = Path(tmp_path / "one.txt")
    f.write_text("The small boat left the harbour.\n", encoding="utf-8")
    out = train_tokenizer([f, TINY_CORPUS.read_text(encoding="utf-8")], tmp_path / "tok", 400)
    assert Tokenizer.from_dir(out).vocab_size == 400


def test_overlong_lines_are_cut_not_dropped(tmp_path):
    # One 60k-character line without newlines (a whole document): SentencePiece alone would skip it.
    line = " ".join(["Zoë sang softly"] * 4000)
    tok = Tokenizer.from_dir(train_tokenizer([line], tmp_path / "tok", 300))
    assert tok.token_to_id("\u2581softly") is not None
