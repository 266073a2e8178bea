"""MMLU: headerless CSVs (question, A, B, C, D, answer letter), one file per subject and split.

Prompt as in lm-evaluation-harness's default MMLU task: a subject header once, then
"{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:" scored with " A" .. " D"; few-shot
examples are the first k rows of the subject's dev file.
"""
from __future__ import annotations

import re
from pathlib import Path

from training.eval.errors import DataError
from training.eval.items import ChoiceItem
from training.eval.readers import Row, read_csv

LETTERS = ("A", "B", "C", "D")
_NAME = re.compile(r"(?P<subject>.+)_(?P<split>dev|val|test)\.csv$")


def subject_of(path: Path) -> str:
    m = _NAME.match(path.name)
    if m is None:
        raise DataError(path, "MMLU files are named <subject>_<dev|val|test>.csv")
    return m.group("subject")


def header(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def _item(row: Row, subject: str) -> ChoiceItem:
    question, *options, answer = row.data
    letter = answer.strip().upper()
    if letter not in LETTERS:
        raise row.error(f"answer {answer.strip()!r} is not one of the choices A, B, C, D")
    text = question.strip() + "".join(f"\n{k}. {v}" for k, v in zip(LETTERS, options)) + "\nAnswer:"
    return ChoiceItem(context=text, choices=LETTERS, gold=LETTERS.index(letter), source=row.source,
                      description=header(subject), group=subject)


def load_file(path: Path) -> list[ChoiceItem]:
    subject = subject_of(path)
    return [_item(row, subject) for row in read_csv(path, 6)]


def eval_files(path: str | Path) -> list[Path]:
    """The CSVs to evaluate: one file, a split folder (.../val), or the MMLU root (its val/ split)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(path, "no such file or directory")
    folder = path / "val" if (path / "val").is_dir() else path
    files = sorted(p for p in folder.glob("*.csv") if not p.name.endswith("_dev.csv"))
    if not files:
        raise DataError(folder, "no MMLU CSV files (<subject>_val.csv or <subject>_test.csv) in this folder")
    return files


def load_mmlu(path: str | Path) -> list[ChoiceItem]:
    return [item for f in eval_files(path) for item in load_file(f)]


def dev_file(eval_file: Path) -> Path | None:
    """The subject's dev CSV: in a sibling dev/ folder or beside the eval file."""
    name = f"{subject_of(eval_file)}_dev.csv"
    for candidate in (eval_file.parent.parent / "dev" / name, eval_file.parent / name):
        if candidate.is_file():
            return candidate
    return None


def load_mmlu_dev(path: str | Path) -> list[ChoiceItem]:
    """Dev rows of every evaluated subject (few-shot examples, taken first-n per subject)."""
    items: list[ChoiceItem] = []
    for f in eval_files(path):
        dev = dev_file(f)
        if dev is None:
            raise DataError(f, f"few-shot examples need {subject_of(f)}_dev.csv in ../dev/ or beside it")
        items += load_file(dev)
    return items
