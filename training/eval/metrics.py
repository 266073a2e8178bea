"""Aggregate metrics: means with standard errors, GSM8K answer extraction, BLEU and ROUGE."""
from __future__ import annotations

import math
import re
from typing import Sequence


def mean_stderr(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and the standard error of the mean (sample standard deviation / sqrt(n)); None for n < 2."""
    n = len(values)
    if n == 0:
        raise ValueError("no values to average")
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first one on ties (so both backends break ties alike)."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


# -- GSM8K ---------------------------------------------------------------------------------------
_STRICT = re.compile(r"#### (-?[0-9.,]+)")
_NUMBER = re.compile(r"-?[$0-9.,]{2,}|-?[0-9]+")


def normalize_number(text: str) -> str:
    """'$1,234.' -> '1234': drop thousands separators, dollar signs and a trailing period."""
    text = text.strip().replace(",", "").replace("$", "")
    text = text.rstrip(".")
    if re.fullmatch(r"-?[0-9]+\.0+", text):  # "18.00" is "18"
        text = text.split(".")[0]
    return text


def gsm8k_reference(answer: str) -> str | None:
    """The final number of a GSM8K reference answer ("... #### 72"), or None."""
    if "####" not in answer:
        return None
    final = normalize_number(answer.rsplit("####", 1)[1])
    return final or None


def extract_strict(generation: str) -> str | None:
    """The number after the first "#### " in a generation (the format few-shot examples teach)."""
    m = _STRICT.search(generation)
    return normalize_number(m.group(1)) if m else None


def extract_flexible(generation: str) -> str | None:
    """The last number anywhere in a generation."""
    found = [m.group(0) for m in _NUMBER.finditer(generation)]
    found = [normalize_number(f) for f in found if any(c.isdigit() for c in f)]
    return found[-1] if found else None


# -- BLEU / ROUGE --------------------------------------------------------------------------------
def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """sacrebleu's corpus BLEU (0-100) with its default 13a tokenization, one reference per item."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, list[float]]:
    """Per-item ROUGE-1/2/L F-measures (rouge-score, Porter stemming)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    out: dict[str, list[float]] = {name: [] for name in ROUGE_TYPES}
    for hyp, ref in zip(hypotheses, references):
        scores = scorer.score(ref, hyp)
        for name in ROUGE_TYPES:
            out[name].append(float(scores[name].fmeasure))
    return out
