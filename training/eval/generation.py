"""Generation tasks: greedy completions scored by exact match (GSM8K) or BLEU / ROUGE."""
from __future__ import annotations

from typing import Sequence

from training.eval.backend import LanguageModel, Progress, memo_encoder
from training.eval.errors import EvalError
from training.eval.items import GenerationItem
from training.eval.metrics import (ROUGE_TYPES, corpus_bleu, extract_flexible, extract_strict, mean_stderr,
                                   rouge_scores)
from training.eval.report import MetricValue


def generate(items: Sequence[GenerationItem], lm: LanguageModel, max_tokens: int, stop: Sequence[str],
             progress: Progress = None) -> list[str]:
    """Greedy completions; prompts are cut from the left so prompt + max_tokens fit the model."""
    encode = memo_encoder(lm)
    prompts = []
    for item in items:
        ids = encode(item.context)
        if lm.max_length:
            room = lm.max_length + 1 - max_tokens  # max_length leaves one position for a generated token
            if room < 1:
                raise EvalError(f"max_tokens {max_tokens} leaves no room for a prompt in {lm.max_length + 1} tokens")
            ids = ids[-room:]
        prompts.append(ids)
    return lm.generate(prompts, max_tokens, stop, progress)


def exact_match_metrics(items: Sequence[GenerationItem],
                        outputs: Sequence[str]) -> tuple[list[MetricValue], list[dict]]:
    """GSM8K: the number after "#### " (strict) or the last number (flexible) equals the reference's."""
    strict, flexible, samples = [], [], []
    for item, out in zip(items, outputs):
        s, f = extract_strict(out), extract_flexible(out)
        strict.append(float(s == item.answer))
        flexible.append(float(f == item.answer))
        samples.append({"source": item.source, "answer": item.answer, "generation": out, "strict": s,
                        "flexible": f, "exact_match_strict": strict[-1], "exact_match_flexible": flexible[-1]})
    return [MetricValue("exact_match_strict", *mean_stderr(strict), len(strict)),
            MetricValue("exact_match_flexible", *mean_stderr(flexible), len(flexible))], samples


def text_metrics(items: Sequence[GenerationItem], outputs: Sequence[str]) -> tuple[list[MetricValue], list[dict]]:
    """Corpus BLEU (sacrebleu; no per-item stderr) and mean ROUGE-1/2/L F1 (rouge-score) with stderr."""
    outputs = [o.strip() for o in outputs]
    refs = [item.reference for item in items]
    rouge = rouge_scores(outputs, refs)
    metrics = [MetricValue("bleu", corpus_bleu(outputs, refs), None, len(items))]
    metrics += [MetricValue(name, *mean_stderr(rouge[name]), len(items)) for name in ROUGE_TYPES]
    samples = [{"source": item.source, "reference": item.reference, "generation": out,
                **{name: rouge[name][i] for name in ROUGE_TYPES}} for i, (item, out) in enumerate(zip(items, outputs))]
    return metrics, samples
