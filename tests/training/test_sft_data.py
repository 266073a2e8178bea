"""Instruction data: formats, chat-template rendering, assistant-only labels, packing, errors naming file:line."""
import json

import pytest
import torch

from engine.checkpoint import load_model
from engine.tokenizer import Tokenizer
from finetune_fixtures import tiny_base, write_alpaca, write_chat_jsonl
from training.records import DataFormatError, read_records
from training.sft import sft_collate, sft_loss
from training.sft_data import (IGNORE_INDEX, load_sft_examples, load_text_examples, pack, record_messages,
                               tokenize_conversation)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_base(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def tok(base):
    return Tokenizer.from_dir(base)


def _labelled_text(tok, example) -> str:
    return tok.decode([i for i, lab in zip(example.input_ids, example.labels) if lab != IGNORE_INDEX],
                      skip_special_tokens=False)


def test_prompt_tokens_carry_no_loss(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "Blue."}]
    ex = tokenize_conversation(tok, messages)
    assert ex.input_ids == tuple(tok.encode(tok.apply_chat_template(messages, add_generation_prompt=False),
                                            add_bos=False))
    prompt_len = len(tok.encode(tok.apply_chat_template(messages[:2], add_generation_prompt=True), add_bos=False))
    assert all(lab == IGNORE_INDEX for lab in ex.labels[:prompt_len])
    assert all(lab == tid for lab, tid in zip(ex.labels[prompt_len:], ex.input_ids[prompt_len:]))
    assert _labelled_text(tok, ex).strip() == "Blue.<|im_end|>"


def test_collated_labels_are_shifted_and_masked(tok):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
    ex = tokenize_conversation(tok, messages)
    batch = sft_collate(tok.pad_id)([ex])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    assert ids.tolist() == list(ex.input_ids[:-1]) and labels.shape == ids.shape
    targets = [int(t) for t in labels if t != IGNORE_INDEX]
    assert targets == [lab for lab in ex.labels[1:] if lab != IGNORE_INDEX]
    first = int((labels != IGNORE_INDEX).nonzero()[0])
    # The first target is predicted from the last prompt token (the generation prompt's newline).
    prompt = tok.encode(tok.apply_chat_template(messages[:1], add_generation_prompt=True), add_bos=False)
    assert first == len(prompt) - 1


def test_multi_turn_labels_every_assistant_turn_only(tok):
    messages = [{"role": "user", "content": "One?"}, {"role": "assistant", "content": "First answer."},
                {"role": "user", "content": "Two?"}, {"role": "assistant", "content": "Second answer."}]
    text = _labelled_text(tok, tokenize_conversation(tok, messages))
    assert "First answer." in text and "Second answer." in text
    assert "One?" not in text and "Two?" not in text and "user" not in text


def test_formats_detected(tmp_path):
    alpaca = record_messages({"instruction": "Add", "input": "2 and 3", "output": "5"}, "x:1")
    assert alpaca == [{"role": "user", "content": "Add\n\n2 and 3"}, {"role": "assistant", "content": "5"}]
    share = record_messages({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]},
                            "x:2")
    assert share[1] == {"role": "assistant", "content": "Yo"}
    history = record_messages({"instruction": "And 4?", "output": "9", "history": [["2+3?", "5"]]}, "x:3")
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]


def test_loads_alpaca_json_and_chat_jsonl(tok, tmp_path):
    alpaca = load_sft_examples(write_alpaca(tmp_path / "a.json", repeat=1), tok, 256)
    chat = load_sft_examples(write_chat_jsonl(tmp_path / "c.jsonl"), tok, 256)
    assert len(alpaca) == len(chat) == 6
    assert _labelled_text(tok, chat[0]).strip() == "Paris is the capital of France.<|im_end|>"


@pytest.mark.parametrize("content, fmt, where, needle", [
    ('[\n {"instruction": "a", "output": "b"},\n {"instruction": "c"}\n]', "json", ":3:", "unrecognised row"),
    ('[\n {"instruction": "a", "output": "b"},\n\n {"instruction": 5, "output": "x"}\n]', "json", ":4:",
     "'instruction' is a int"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
     '{"messages": [{"role": "robot", "content": "q"}]}\n', "jsonl", ":2:", "messages[0].role"),
    ('{"messages": [{"role": "user", "content": "q"}]}\n', "jsonl", ":1:", "no assistant turn"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n', "jsonl", ":2:", "not valid JSON"),
    ('[\n {"instruction": "a", "output": "b"}\n', "json", ":", "not closed"),
])
def test_malformed_rows_name_file_and_line(tok, tmp_path, content, fmt, where, needle):
    path = tmp_path / f"bad.{fmt}"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataFormatError) as info:
        load_sft_examples(path, tok, 128)
    msg = str(info.value)
    assert msg.startswith(str(path) + where) and needle in msg, msg


def test_json_array_records_know_their_lines(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"a": 1}, {"b": 2}, {"c": 3}], indent=2), encoding="utf-8")
    lines = [loc.rsplit(":", 1)[1] for loc, _ in read_records(path)]
    assert lines == ["2", "5", "8"]


def test_long_rows_are_cut_and_promptless_ones_dropped(tok, tmp_path):
    path = tmp_path / "long.jsonl"
    rows = [{"instruction": "word " * 200, "output": "short"}, {"instruction": "q", "output": "answer " * 200}]
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    examples = load_sft_examples(path, tok, 64)
    assert len(examples) == 1 and len(examples[0]) == 64 and examples[0].num_targets > 0


def test_packing_trains_exactly_like_separate_examples(base, tok, tmp_path):
    """Per-example positions and block-diagonal attention: the packed loss equals the unpacked loss."""
    examples = load_sft_examples(write_alpaca(tmp_path / "a.json", repeat=1), tok, 256)
    packed = pack(examples, 256)
    assert len(packed) < len(examples) and sum(len(p.segments) for p in packed) == len(examples)
    model, _ = load_model(base, dtype="float32")
    collate = sft_collate(tok.pad_id)
    with torch.no_grad():
        separate = sum(float(sft_loss(model, collate([e]))) for e in examples)
        together = float(sft_loss(model, collate(packed)))
    assert together == pytest.approx(separate, rel=1e-5)
    target_counts = sum(int((collate([e])["labels"] != IGNORE_INDEX).sum()) for e in examples)
    assert int((collate(packed)["labels"] != IGNORE_INDEX).sum()) == target_counts


def test_text_windows_cover_each_token_once(tok, tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("To be, or not to be, that is the question.\n" * 40, encoding="utf-8")
    windows = load_text_examples(path, tok, 32)
    ids = tok.encode(path.read_text(), add_bos=False)
    assert sum(len(w) - 1 for w in windows) == len(ids) - 1
    assert all(len(w) <= 33 for w in windows) and windows[0].input_ids == tuple(ids[:33])
    head = load_text_examples(path, tok, 32, (0.0, 0.5))
    tail = load_text_examples(path, tok, 32, (0.5, 1.0))
    assert 0 < len(head) < len(windows) and 0 < len(tail) < len(windows)
