"""Generation data: GSM8K-style {question, answer with "#### N"} and {prompt, reference} lines."""
from __future__ import annotations

from pathlib import Path

from training.eval.items import GenerationItem
from training.eval.metrics import gsm8k_reference
from training.eval.readers import read_jsonl


def load_gsm8k(path: str | Path) -> list[GenerationItem]:
    """"Question: {question}\\nAnswer:"; the reference is the whole worked answer, the metric its final number."""
    items = []
    for row in read_jsonl(path):
        question, answer = row.field("question"), row.field("answer")
        final = gsm8k_reference(answer)
        if final is None:
            raise row.error("the answer has no final '#### <number>' line")
        items.append(GenerationItem(context=f"Question: {question}\nAnswer:", reference=answer, answer=final,
                                    source=row.source))
    return items


def load_prompt_reference(path: str | Path) -> list[GenerationItem]:
    """The prompt as is; the generation is compared with the reference."""
    items = []
    for row in read_jsonl(path):
        prompt, reference = row.field("prompt"), row.field("reference")
        if not prompt:
            raise row.error("'prompt' is empty")
        items.append(GenerationItem(context=prompt, reference=reference, answer=reference, source=row.source))
    return items
