"""Evaluation data: loaders and prompt formats, malformed files, few-shot prompts, token split, metrics."""
from __future__ import annotations

import json
import math

import pytest

from tests.training.eval_fixtures import FIXTURES, copy_lines
from training.eval import DataError, EvalError, EvalOptions, get_task, task_names
from training.eval.data_ai2 import load_arc, load_openbookqa
from training.eval.data_generation import load_gsm8k, load_prompt_reference
from training.eval.data_mmlu import load_mmlu, load_mmlu_dev
from training.eval.data_piqa import load_piqa
from training.eval.fewshot import apply_fewshot
from training.eval.metrics import (corpus_bleu, extract_flexible, extract_strict, mean_stderr, normalize_number,
                                   rouge_scores)
from training.eval.pairs import fit, split_pair
from training.eval.perplexity import windows
from training.eval.registry import resolve_data


# -- loaders and prompt formats -------------------------------------------------------------------
def test_arc_prompt_format_and_gold():
    items = load_arc(FIXTURES / "arc" / "ARC-Easy-Dev.jsonl")
    assert len(items) == 5
    first = items[0]
    assert first.context == "Question: Which of these is a source of light?\nAnswer:"
    assert first.choices == ("a candle flame", "a wooden spoon", "a glass of water", "a wool sock")
    assert first.gold == 0 and first.delimiter == " "
    assert items[2].gold == 2  # numeric labels 1-4
    assert len(items[3].choices) == 3 and len(items[4].choices) == 5
    assert first.source.endswith("ARC-Easy-Dev.jsonl:1")


def test_openbookqa_uses_the_bare_stem():
    items = load_openbookqa(FIXTURES / "openbookqa" / "test.jsonl")
    assert items[0].context == "A magnet will stick to"
    assert items[2].gold == 2  # answerKey " C" is stripped


def test_piqa_labels_from_the_side_file():
    items = load_piqa(FIXTURES / "piqa" / "valid.jsonl")
    assert [i.gold for i in items] == [0, 1, 0, 0]
    assert items[1].context == "Question: To dry wet shoes quickly,\nAnswer:"
    assert items[1].choices[1].startswith("stuff them")


def test_mmlu_prompt_header_and_multiline_records():
    items = load_mmlu(FIXTURES / "mmlu")
    assert len(items) == 4
    first = items[0]
    assert first.description == "The following are multiple choice questions (with answers) about astronomy.\n\n"
    assert first.context == ("Which planet is known for its prominent rings?\nA. Mars\nB. Saturn\nC. Mercury\n"
                             "D. Venus\nAnswer:")
    assert first.choices == ("A", "B", "C", "D") and first.gold == 1
    physics = items[2]
    assert physics.group == "high_school_physics"
    assert physics.context.startswith("Speed is distance divided by\nwhat quantity?\nA. Mass")
    assert items[3].source.endswith("high_school_physics_val.csv:3")  # the record after a two-line one


def test_generation_loaders():
    items = load_gsm8k(FIXTURES / "gsm8k" / "test.jsonl")
    assert [i.answer for i in items] == ["7", "60", "1000", "-3"]
    assert items[0].context.startswith("Question: Tom has 3 apples") and items[0].context.endswith("\nAnswer:")
    pairs = load_prompt_reference(FIXTURES / "text_generation" / "pairs.jsonl")
    assert pairs[1].reference == "sang in the tall green trees."


# -- malformed data: the file and the line are named ---------------------------------------------
def _arc_edit(line_no, change):
    def edit(i, line):
        if i != line_no:
            return line
        row = json.loads(line)
        change(row)
        return json.dumps(row)
    return edit


def test_missing_field_names_file_and_line(tmp_path):
    bad = copy_lines(FIXTURES / "arc" / "ARC-Easy-Dev.jsonl", tmp_path / "arc.jsonl",
                     _arc_edit(2, lambda row: row["question"].pop("stem")))
    with pytest.raises(DataError, match=rf"{bad}:3: missing field 'question.stem'"):
        load_arc(bad)


def test_answer_key_outside_the_choices(tmp_path):
    def set_key(row):
        row["answerKey"] = "E"
    bad = copy_lines(FIXTURES / "arc" / "ARC-Easy-Dev.jsonl", tmp_path / "arc.jsonl", _arc_edit(1, set_key))
    with pytest.raises(DataError, match=rf"{bad}:2: answer key 'E' is not one of the choice labels A, B, C, D"):
        load_arc(bad)


def test_piqa_label_outside_the_choices(tmp_path):
    data = copy_lines(FIXTURES / "piqa" / "valid.jsonl", tmp_path / "valid.jsonl")
    labels = copy_lines(FIXTURES / "piqa" / "valid-labels.lst", tmp_path / "valid-labels.lst",
                        lambda i, line: "2" if i == 3 else line)
    with pytest.raises(DataError, match=rf"{labels}:4: answer '2' is outside the choices"):
        load_piqa(data)


def test_piqa_label_count_mismatch(tmp_path):
    data = copy_lines(FIXTURES / "piqa" / "valid.jsonl", tmp_path / "valid.jsonl")
    labels = copy_lines(FIXTURES / "piqa" / "valid-labels.lst", tmp_path / "valid-labels.lst",
                        lambda i, line: None if i == 0 else line)
    with pytest.raises(DataError, match=rf"{labels}: 3 labels for 4 questions"):
        load_piqa(data)


def test_mmlu_bad_answer_letter_and_field_count(tmp_path):
    bad = copy_lines(FIXTURES / "mmlu" / "val" / "astronomy_val.csv", tmp_path / "val" / "astronomy_val.csv",
                     lambda i, line: line[:-1] + "E" if i == 1 else line)
    with pytest.raises(DataError, match=rf"{bad}:2: answer 'E' is not one of the choices A, B, C, D"):
        load_mmlu(bad)
    short = copy_lines(FIXTURES / "mmlu" / "val" / "astronomy_val.csv", tmp_path / "x" / "astronomy_val.csv",
                       lambda i, line: "Only a question,A,B" if i == 1 else line)
    with pytest.raises(DataError, match=rf"{short}:2: expected 6 comma-separated fields, got 3"):
        load_mmlu(short)


@pytest.mark.parametrize("loader", [load_arc, load_piqa, load_gsm8k, load_prompt_reference])
def test_empty_file(tmp_path, loader):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{empty}: the file is empty"):
        loader(empty)


def test_empty_csv_and_text(tmp_path):
    (tmp_path / "val").mkdir()
    empty = tmp_path / "val" / "anatomy_val.csv"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{empty}: the file is empty"):
        load_mmlu(empty)


def test_bad_json_and_gsm8k_without_final_answer(tmp_path):
    bad = copy_lines(FIXTURES / "gsm8k" / "test.jsonl", tmp_path / "g.jsonl",
                     lambda i, line: line[:-2] if i == 1 else line)
    with pytest.raises(DataError, match=rf"{bad}:2: not valid JSON"):
        load_gsm8k(bad)
    no_final = copy_lines(FIXTURES / "gsm8k" / "test.jsonl", tmp_path / "h.jsonl",
                          lambda i, line: line.replace("#### 60", "sixty") if i == 1 else line)
    with pytest.raises(DataError, match=rf"{no_final}:2: the answer has no final '#### <number>' line"):
        load_gsm8k(no_final)


def test_wrong_field_type(tmp_path):
    bad = copy_lines(FIXTURES / "text_generation" / "pairs.jsonl", tmp_path / "p.jsonl",
                     lambda i, line: '{"prompt": "x", "reference": 3}' if i == 2 else line)
    with pytest.raises(DataError, match=rf"{bad}:3: field 'reference' must be a str, got int"):
        load_prompt_reference(bad)


# -- few-shot prompts ---------------------------------------------------------------------------------
def test_mmlu_fewshot_first_n_from_the_subject_dev_split():
    items = load_mmlu(FIXTURES / "mmlu")
    shots = apply_fewshot(items, 2, load_mmlu_dev(FIXTURES / "mmlu"), "first_n")
    expected = ("The following are multiple choice questions (with answers) about astronomy.\n\n"
                "What is the closest star to Earth?\nA. Sirius\nB. The Sun\nC. Proxima Centauri\nD. Vega\nAnswer: B"
                "\n\n"
                "How many planets orbit the Sun?\nA. Seven\nB. Eight\nC. Nine\nD. Ten\nAnswer: B\n\n"
                + items[0].context)
    assert shots[0].context == expected
    assert "about high school physics.\n\nWhat is the SI unit of force?" in shots[2].context
    with pytest.raises(EvalError, match="4-shot needs 4 examples for astronomy, only 3"):
        apply_fewshot(items, 4, load_mmlu_dev(FIXTURES / "mmlu"), "first_n")


def test_random_fewshot_is_seeded_and_never_uses_the_item_itself():
    items = load_arc(FIXTURES / "arc" / "ARC-Easy-Dev.jsonl")
    a = apply_fewshot(items, 3, items, "random", seed=1)
    b = apply_fewshot(items, 3, items, "random", seed=1)
    assert [x.context for x in a] == [x.context for x in b]
    for item, shot in zip(items, a):
        assert shot.context.endswith(item.context)
        assert shot.context.count("Question:") == 4
        assert shot.context.count(item.context) == 1  # not among its own examples
    assert "Answer: a candle flame\n\n" in "".join(x.context for x in a[1:])  # examples carry their answer


def test_zero_shot_keeps_the_description():
    items = load_mmlu(FIXTURES / "mmlu")
    assert apply_fewshot(items, 0, [])[0].context == items[0].description + items[0].context


# -- the token split shared by both backends ---------------------------------------------------------
def _toy_encode(text):
    """A toy tokenizer that merges "ab" into one token, so a boundary can straddle a token."""
    ids, i = [1], 0  # BOS
    while i < len(text):
        if text.startswith("ab", i):
            ids.append(1000)
            i += 2
        else:
            ids.append(ord(text[i]))
            i += 1
    return ids


def test_split_pair_moves_trailing_space_and_handles_a_straddling_token():
    req = split_pair(_toy_encode, "Answer: ", "x")
    assert req.context == tuple(_toy_encode("Answer:")) and req.continuation == (ord(" "), ord("x"))
    req = split_pair(_toy_encode, "xa", "bc")  # "a|b" merges: the merged token belongs to the continuation
    assert req.context == (1, ord("x")) and req.continuation == (1000, ord("c"))
    assert req.context + req.continuation == tuple(_toy_encode("xabc"))


def test_split_pair_refuses_empty_sides():
    with pytest.raises(EvalError, match="encodes to no tokens"):
        split_pair(lambda t: [ord(c) for c in t], "", "x")


def test_fit_cuts_the_context_from_the_left():
    req = split_pair(_toy_encode, "hello there", " you")
    cut = fit(req, 6)
    assert cut.continuation == req.continuation and cut.context == req.context[-2:]
    with pytest.raises(EvalError, match="does not fit"):
        fit(req, 4)


# -- perplexity windows -------------------------------------------------------------------------------
@pytest.mark.parametrize("n,seq_len,stride", [(100, 16, 8), (100, 16, 15), (7, 16, 8), (33, 8, 3)])
def test_windows_score_every_token_once_within_seq_len(n, seq_len, stride):
    plan = windows(n, seq_len, stride)
    scored = [t for _, s, e in plan for t in range(s, e)]
    assert scored == list(range(1, n))
    assert all(e - c <= seq_len and c < s for c, s, e in plan)
    with pytest.raises(EvalError, match="stride"):
        windows(n, seq_len, seq_len)


@pytest.mark.parametrize("n,seq_len,stride", [(100, 16, 8), (100, 17, 16), (7, 16, 8), (33, 8, 3)])
def test_unfilled_last_window_keeps_its_stride_position(n, seq_len, stride):
    plan = windows(n, seq_len, stride, fill_last=False)
    assert [(s, e) for _, s, e in plan] == [(s, e) for _, s, e in windows(n, seq_len, stride)]
    assert [c for c, _, _ in plan] == [i * stride for i in range(len(plan))]


# -- metrics ------------------------------------------------------------------------------------------
def test_mean_stderr_is_the_sample_standard_error():
    mean, se = mean_stderr([1.0, 0.0, 1.0, 1.0])
    assert mean == 0.75 and se == pytest.approx(math.sqrt(0.25 / 4))
    assert mean_stderr([1.0]) == (1.0, None)


def test_gsm8k_extraction():
    assert extract_strict("so 3 + 4 = 7.\n#### 7") == "7"
    assert extract_strict("The answer is 7") is None
    assert extract_flexible("First 3 then 12, finally $1,000.") == "1000"
    assert extract_flexible("no numbers") is None
    assert normalize_number(" 18.00 ") == "18" and normalize_number("-3") == "-3"


def test_bleu_and_rouge_reward_overlap():
    refs = ["the cat sat on the mat", "a dog ran in the park"]
    assert corpus_bleu(refs, refs) == pytest.approx(100.0)
    assert corpus_bleu(["green tea", "blue sky"], refs) < 5.0
    same = rouge_scores(refs, refs)
    assert same["rouge1"] == [1.0, 1.0] and same["rougeL"] == [1.0, 1.0]
    assert rouge_scores(["the cat sat"], refs[:1])["rouge1"][0] == pytest.approx(2 * 0.5 * 1 / 1.5)


# -- registry -----------------------------------------------------------------------------------------
def test_registry_defaults_and_errors(monkeypatch):
    assert {"perplexity", "arc_easy", "arc_challenge", "mmlu", "piqa", "openbookqa", "gsm8k",
            "text_generation"} <= set(task_names())
    with pytest.raises(EvalError, match="unknown task 'hellaswagx'"):
        get_task("hellaswagx")
    monkeypatch.setenv("EMBER_DATA_DIR", str(FIXTURES))
    assert resolve_data(get_task("piqa"), None) == FIXTURES / "piqa" / "valid.jsonl"
    with pytest.raises(EvalError, match="task gsm8k has no default data: pass --data PATH"):
        resolve_data(get_task("gsm8k"), None)
    with pytest.raises(EvalError, match="--limit must be at least 1"):
        EvalOptions(limit=0)


def test_only_newlines_end_json_lines(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "one\u2028two", "reference": "x"}\n{"prompt": "three", "reference": "y"}\n',
                    encoding="utf-8")
    items = load_prompt_reference(path)
    assert [i.context for i in items] == ["one\u2028two", "three"]
    assert items[1].source.endswith("pairs.jsonl:2")
