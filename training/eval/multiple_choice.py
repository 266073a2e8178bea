"""Multiple choice by log-likelihood: accuracy and length-normalised accuracy.

`acc` picks the choice with the highest summed log-probability; `acc_norm` divides it by the
UTF-8 byte length of the choice text first (lm-evaluation-harness's normalisation), which removes
the bias towards short answers. Ties go to the first choice.
"""
from __future__ import annotations

from typing import Sequence

from training.eval.backend import LanguageModel, Progress, memo_encoder
from training.eval.items import ChoiceItem, ScoreRequest
from training.eval.metrics import argmax, mean_stderr
from training.eval.pairs import fit, split_pair
from training.eval.report import MetricValue


def choice_requests(items: Sequence[ChoiceItem], lm: LanguageModel) -> list[ScoreRequest]:
    """One request per (item, choice), in item order then choice order."""
    encode = memo_encoder(lm)
    requests = []
    for item in items:
        for choice in item.choices:
            req = split_pair(encode, item.context, item.delimiter + choice)
            requests.append(fit(req, lm.max_length) if lm.max_length else req)
    return requests


def run_multiple_choice(items: Sequence[ChoiceItem], lm: LanguageModel,
                        progress: Progress = None) -> tuple[list[MetricValue], list[dict]]:
    """Score every choice of every item (all requests handed to the backend at once, so it can batch)."""
    scores = lm.loglikelihoods(choice_requests(items, lm), progress)
    acc, acc_norm, samples = [], [], []
    k = 0
    for item in items:
        mine = scores[k:k + len(item.choices)]
        k += len(item.choices)
        lls = [s.logprob for s in mine]
        pred = argmax(lls)
        pred_norm = argmax([ll / max(1, len(c.encode("utf-8"))) for ll, c in zip(lls, item.choices)])
        acc.append(float(pred == item.gold))
        acc_norm.append(float(pred_norm == item.gold))
        samples.append({"source": item.source, "group": item.group, "gold": item.gold, "loglikelihoods": lls,
                        "greedy": [s.greedy for s in mine], "pred": pred, "pred_norm": pred_norm,
                        "acc": acc[-1], "acc_norm": acc_norm[-1]})
    return [MetricValue("acc", *mean_stderr(acc), len(acc)),
            MetricValue("acc_norm", *mean_stderr(acc_norm), len(acc_norm))], samples
