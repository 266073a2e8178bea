"""Tokenizer loading, encode/decode and special tokens, against transformers where it has an answer."""
from __future__ import annotations

import json
import shutil

import pytest

import tokenizer_fixtures as fx
from engine.errors import CheckpointError, InvalidRequestError
from engine.tokenizer import Tokenizer

TEXTS = [
    "Once upon a time, a fox counted the stars.",
    "Emoji 😀🎉 and a family 👩‍👩‍👧 in one line.",
    "日本語のテキストと中文混合 text, 한국어도.",
    "Accents: café, naïve, résumé, jalapeño, Zoë, façade, Ångström.",
    "Two  spaces,\ttabs,\n\nnew lines and digits 12345 3.14159",
    "Symbols <>&\"' ~`^ \\ and the replacement char is not here.",
]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    sp = fx.build_sentencepiece_dir(root / "sp")
    return {
        "sentencepiece": sp,
        "converted": fx.build_converted_dir(sp, root / "converted"),
        "byte_level": fx.build_byte_level_dir(root / "byte_level"),
    }


@pytest.fixture(scope="module")
def hf(dirs):
    from transformers import AutoTokenizer

    return {name: AutoTokenizer.from_pretrained(path) for name, path in dirs.items()}


@pytest.mark.parametrize("kind", ["sentencepiece", "converted", "byte_level"])
def test_round_trip_with_emoji_cjk_and_accents(dirs, kind):
    tok = Tokenizer.from_dir(dirs[kind])
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids[0] == tok.bos_id
        assert tok.decode(ids) == text
        assert tok.decode(tok.encode(text, add_bos=False)) == text


def test_sentencepiece_uses_byte_fallback_for_unseen_characters(dirs):
    tok = Tokenizer.from_dir(dirs["sentencepiece"])
    pieces = tok.convert_ids_to_tokens(tok.encode("日😀", add_bos=False))
    # 3 bytes for the CJK character, 4 for the emoji, after the word-boundary piece.
    assert pieces[-7:] == ["<0xE6>", "<0x97>", "<0xA5>", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    assert tok.id_to_piece(tok.encode("日", add_bos=False)[-1]) == "<0xA5>"
    # SentencePiece keeps a leading space that transformers' Metaspace conversion drops.
    assert tok.decode(tok.encode(" lead")) == " lead"


@pytest.mark.parametrize("kind", ["sentencepiece", "converted", "byte_level"])
def test_encode_and_decode_match_transformers(dirs, hf, kind):
    tok, ref = Tokenizer.from_dir(dirs[kind]), hf[kind]
    chat = "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nx <|im_end|> y"
    for text in TEXTS + [chat, "<s>Hi</s> yes", "<|begin_of_text|>a<|eot_id|>b"]:
        ids = tok.encode(text)
        assert ids == ref.encode(text), text
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
        assert tok.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)
    assert tok.vocab_size == len(ref)


def test_special_tokens_of_the_trained_sentencepiece_tokenizer(dirs):
    tok = Tokenizer.from_dir(dirs["sentencepiece"])
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert tok.eos_ids == {2}
    assert tok.add_bos_token is True
    im_start, im_end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    assert {im_start, im_end} <= tok.all_special_ids
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>", add_bos=False)
    assert ids[0] == im_start and ids[-1] == im_end
    assert tok.decode(ids) == "user\nHi"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nHi<|im_end|>"
    assert tok.encode("hi", add_bos=False, add_eos=True)[-1] == tok.eos_id
    assert tok.token_to_id("no-such-piece") is None


def test_byte_level_special_tokens_and_generation_config_eos(dirs):
    tok = Tokenizer.from_dir(dirs["byte_level"])
    eot = tok.token_to_id("<|eot_id|>")
    assert tok.bos_token == "<|begin_of_text|>" and tok.eos_token == "<|end_of_text|>"
    assert tok.eos_ids == {tok.eos_id, eot}
    assert tok.pad_id is None
    # No add_bos_token in the config: tokenizer.json's post-processor says BOS is added.
    assert tok.add_bos_token is True
    assert tok.encode("hello")[0] == tok.bos_id
    assert tok.model_max_length == 4096


def test_add_bos_token_false_is_followed(dirs, tmp_path):
    shutil.copytree(dirs["sentencepiece"], tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["add_bos_token"] = False
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.encode("hello")[0] != tok.bos_id
    assert tok.encode("hello", add_bos=True)[0] == tok.bos_id


def test_sentencepiece_without_config_falls_back_to_model_pieces(dirs, tmp_path):
    shutil.copy(dirs["sentencepiece"] / "tokenizer.model", tmp_path / "tokenizer.model")
    tok = Tokenizer.from_dir(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, None)
    assert tok.has_chat_template is False
    assert tok.decode(tok.encode("café 😀")) == "café 😀"


def test_added_token_beyond_the_sentencepiece_vocabulary(dirs, tmp_path):
    shutil.copytree(dirs["sentencepiece"], tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"]["512"] = {"content": "<tool>", "special": False}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.vocab_size == 513
    ids = tok.encode("a<tool>b", add_bos=False)
    assert 512 in ids
    assert tok.decode(ids) == "a<tool>b"  # not special: kept when skipping specials
    assert tok.id_to_piece(512) == "<tool>"


def test_bad_inputs_give_clear_errors(dirs, tmp_path):
    with pytest.raises(CheckpointError, match="no tokenizer.json or tokenizer.model"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    tok = Tokenizer.from_dir(dirs["sentencepiece"])
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        tok.id_to_piece(tok.vocab_size)
    with pytest.raises(InvalidRequestError, match="negative"):
        tok.decode([5, -1])
    # Padding rows of a larger embedding decode to nothing.
    hi = tok.encode("hi", add_bos=False)
    assert tok.decode(hi + [tok.vocab_size, tok.vocab_size + 7]) == "hi"
    with pytest.raises(InvalidRequestError, match="string"):
        tok.encode(["not", "a", "string"])


def test_encode_batch_equals_encode(dirs):
    for path in dirs.values():
        tok = Tokenizer.from_dir(path)
        assert tok.encode_batch(TEXTS, add_eos=True) == [tok.encode(t, add_eos=True) for t in TEXTS]
