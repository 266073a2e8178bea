"""PIQA: {goal, sol1, sol2} lines, labels (0 = sol1, 1 = sol2) inline as "label" or in `<name>-labels.lst`."""
from __future__ import annotations

from pathlib import Path

from training.eval.errors import DataError
from training.eval.items import ChoiceItem
from training.eval.readers import read_jsonl, read_lines


def labels_file(path: Path) -> Path:
    return path.with_name(f"{path.stem}-labels.lst")


def load_piqa(path: str | Path) -> list[ChoiceItem]:
    """"Question: {goal}\\nAnswer:" followed by " {sol1}" / " {sol2}" (lm-evaluation-harness's piqa)."""
    path = Path(path)
    rows = read_jsonl(path)
    inline = [row for row in rows if "label" in row.data]
    if inline and len(inline) != len(rows):
        missing = next(row for row in rows if "label" not in row.data)
        raise missing.error("missing field 'label' (other rows have one)")
    if inline:
        labels = [(row.path, row.line, str(row.data["label"]).strip()) for row in rows]
    else:
        lst = labels_file(path)
        if not lst.is_file():
            raise DataError(path, f"no labels: give each row a 'label' (0 or 1) or put them in {lst.name}")
        labels = [(lst, line, text) for line, text in read_lines(lst)]
        if len(labels) != len(rows):
            raise DataError(lst, f"{len(labels)} labels for {len(rows)} questions in {path.name}")
    items = []
    for row, (where, line, label) in zip(rows, labels):
        goal, sol1, sol2 = row.field("goal"), row.field("sol1"), row.field("sol2")
        if label not in ("0", "1"):
            raise DataError(where, f"answer {label!r} is outside the choices (0 = sol1, 1 = sol2)", line)
        items.append(ChoiceItem(context=f"Question: {goal}\nAnswer:", choices=(sol1, sol2), gold=int(label),
                                source=row.source))
    return items
