"""AI2's question format (ARC, OpenBookQA): {question: {stem, choices: [{text, label}]}, answerKey}."""
from __future__ import annotations

from pathlib import Path

from training.eval.items import ChoiceItem
from training.eval.readers import Row, read_jsonl


def _item(row: Row, question_format: bool) -> ChoiceItem:
    stem = row.field("question.stem")
    choices = row.field("question.choices", list)
    if not choices:
        raise row.error("'question.choices' is empty")
    texts, labels = [], []
    for i, choice in enumerate(choices):
        if not isinstance(choice, dict) or not isinstance(choice.get("text"), str) or "label" not in choice:
            raise row.error(f"question.choices[{i}] needs a 'text' string and a 'label'")
        texts.append(choice["text"])
        labels.append(str(choice["label"]).strip())
    key = str(row.field("answerKey", (str, int))).strip()
    if key not in labels:
        raise row.error(f"answer key {key!r} is not one of the choice labels {', '.join(labels)}")
    context = f"Question: {stem}\nAnswer:" if question_format else stem
    return ChoiceItem(context=context, choices=tuple(texts), gold=labels.index(key), source=row.source)


def load_arc(path: str | Path) -> list[ChoiceItem]:
    """ARC: "Question: {stem}\\nAnswer:" followed by " {choice}" (lm-evaluation-harness's arc_easy/challenge)."""
    return [_item(row, True) for row in read_jsonl(path)]


def load_openbookqa(path: str | Path) -> list[ChoiceItem]:
    """OpenBookQA: the bare question stem followed by " {choice}" (lm-evaluation-harness's openbookqa)."""
    return [_item(row, False) for row in read_jsonl(path)]


def arc_train_file(path: str | Path) -> Path | None:
    """Few-shot examples for an ARC split: the sibling train file ("ARC-Easy-Dev" -> "ARC-Easy-Train")."""
    path = Path(path)
    for split in ("-Dev", "-Test", "-Valid"):
        if split in path.name:
            train = path.with_name(path.name.replace(split, "-Train"))
            return train if train.is_file() else None
    return None
