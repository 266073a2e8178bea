"""The incremental detokenizer: its deltas add up to the full decode at every step."""
from __future__ import annotations

import os
import random

import pytest

import tokenizer_fixtures as fx
from engine.detokenizer import IncrementalDetokenizer
from engine.tokenizer import Tokenizer

KINDS = ["sentencepiece", "converted", "byte_level"]
TEXT = (
    "Once upon a time, 日本語の物語 😀👩‍👩‍👧 café naïve Zoë!\n\n"
    "  Two spaces, digits 2024, 中文 and more: ünïcödé ends here."
)


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.mktemp("detok")
    sp = fx.build_sentencepiece_dir(root / "sp")
    dirs = {"sentencepiece": sp, "converted": fx.build_converted_dir(sp, root / "cv"), "byte_level": fx.build_byte_level_dir(root / "bl")}
    return {name: Tokenizer.from_dir(path) for name, path in dirs.items()}


def stream_and_check(tok, ids, skip, prompt=()):
    """Feed ids one by one; at each step the text so far must be the full decode, or (while a
    character or a byte run is incomplete) a prefix of it. Returns the final text."""
    det = IncrementalDetokenizer(tok, prompt_ids=prompt, skip_special_tokens=skip)
    prompt_text = tok.decode(list(prompt), skip_special_tokens=skip)
    text = ""
    for k, token_id in enumerate(ids):
        text += det.add(token_id)
        full = tok.decode(list(prompt) + ids[: k + 1], skip_special_tokens=skip)
        assert full.startswith(prompt_text)
        full = full[len(prompt_text) :]
        assert full.startswith(text), (k, text, full)
        if not full.endswith("\ufffd") and not det._byte_run_open():
            assert text == full, (k, text, full)
    text += det.finish()
    assert text == full
    assert det.text == text
    return text


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("skip", [True, False])
def test_deltas_add_up_to_the_full_decode(toks, kind, skip):
    tok = toks[kind]
    ids = tok.encode(TEXT)
    assert stream_and_check(tok, ids, skip) == tok.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("kind", KINDS)
def test_multibyte_characters_wait_for_their_last_byte(toks, kind):
    tok = toks[kind]
    ids = tok.encode("a日😀", add_bos=False)
    det = IncrementalDetokenizer(tok)
    deltas = [det.add(i) for i in ids] + [det.finish()]
    assert "".join(deltas) == "a日😀"
    assert all("\ufffd" not in d for d in deltas)


@pytest.mark.parametrize("kind", KINDS)
def test_special_tokens_in_the_stream(toks, kind):
    tok = toks[kind]
    specials = sorted(tok.all_special_ids)
    ids = tok.encode("Hello there", add_bos=True) + [specials[-1]] + tok.encode(" and 日本 again", add_bos=False) + [specials[0]]
    assert stream_and_check(tok, ids, skip=True) == tok.decode(ids)
    assert stream_and_check(tok, ids, skip=False) == tok.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("kind", KINDS)
def test_prompt_context_keeps_the_word_boundary_space(toks, kind):
    tok = toks[kind]
    prompt = tok.encode("The fox said")
    full = tok.encode("The fox said hello to the owl 😀")
    assert full[: len(prompt)] == prompt
    text = stream_and_check(tok, full[len(prompt) :], skip=True, prompt=prompt)
    assert text == " hello to the owl 😀"


def test_finish_releases_an_incomplete_character(toks):
    tok = toks["sentencepiece"]
    ids = tok.encode("ok 日", add_bos=False)[:-1]  # drop the last byte of the character
    det = IncrementalDetokenizer(tok)
    assert det.add_many(ids) == "ok "
    assert det.finish() == "\ufffd" * len(tok.decode(ids)[3:])
    assert det.text == tok.decode(ids)


def prompt_text_is_final(tok, prompt, skip):
    # A prompt that ends inside a character (or an open byte run) has no stable text to extend.
    kept = [i for i in prompt if not (skip and i in tok.all_special_ids)]
    if kept and kept[-1] in tok.grouped_byte_ids:
        return False
    return not tok.decode(prompt, skip_special_tokens=skip).endswith("\ufffd")


@pytest.mark.parametrize("kind", KINDS)
def test_random_token_streams(toks, kind):
    # Arbitrary ids (stray bytes, specials, partial characters): still never out of step with decode.
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    tok = toks[kind]
    for _ in range(60):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 30))]
        prompt = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(0, 4))]
        for skip in (True, False):
            try:
                stream_and_check(tok, ids, skip)
                if prompt_text_is_final(tok, prompt, skip):
                    stream_and_check(tok, ids, skip, prompt=prompt)
            except AssertionError as exc:
                raise AssertionError(f"seed={seed} ids={ids} prompt={prompt} skip={skip}: {exc}") from exc


def test_long_stream_keeps_a_short_window(toks):
    tok = toks["byte_level"]
    ids = tok.encode("the fox and the owl " * 200, add_bos=False)
    det = IncrementalDetokenizer(tok)
    assert det.add_many(ids) + det.finish() == tok.decode(ids)
    assert len(det._ids) < 300


@pytest.mark.parametrize("kind", KINDS)
def test_memoized_deltas_repeat_the_decoded_ones(toks, kind, monkeypatch):
    """Deltas come from a per-tokenizer memo of (window ids, flags): a second stream of the same ids
    decodes nothing and gives the same deltas, also after the memo was cleared for being full."""
    import engine.detokenizer as detok_module

    tok = toks[kind]
    ids = tok.encode(TEXT)
    monkeypatch.setattr(detok_module, "_CACHE_WINDOW", 1 << 30)  # every window memoized here
    first = IncrementalDetokenizer(tok, prompt_ids=ids[:3])
    deltas = [first.add(t) for t in ids[3:]] + [first.finish()]
    calls = []
    decode = tok.decode
    monkeypatch.setattr(tok, "decode", lambda *a, **k: calls.append(1) or decode(*a, **k))
    second = IncrementalDetokenizer(tok, prompt_ids=ids[:3])
    assert [second.add(t) for t in ids[3:]] + [second.finish()] == deltas and not calls
    monkeypatch.setattr(detok_module, "_CACHE_ENTRIES", 4)  # cleared every few entries from here on
    detok_module._caches[tok].clear()
    third = IncrementalDetokenizer(tok, prompt_ids=ids[:3])
    assert [third.add(t) for t in ids[3:]] + [third.finish()] == deltas and calls
    assert len(detok_module._caches[tok]) <= 4


def test_long_windows_are_not_memoized(toks):
    """A long run of tokens without text (skipped special tokens) grows the window; such windows are
    decoded each time instead of becoming ever longer memo keys."""
    import engine.detokenizer as detok_module

    tok = toks["byte_level"]
    special = sorted(tok.all_special_ids)[0]
    ids = tok.encode("ab", add_bos=False)
    detok_module._caches[tok].clear()
    det = IncrementalDetokenizer(tok, skip_special_tokens=True)
    text = "".join(det.add(t) for t in [ids[0]] + [special] * 40 + ids[1:]) + det.finish()
    assert text == tok.decode(ids, skip_special_tokens=True)
    assert max(len(key[3]) for key in detok_module._caches[tok]) <= detok_module._CACHE_WINDOW
