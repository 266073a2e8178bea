"""Perplexity of a text with strided windows, token-level and per byte.

The text is encoded once (BOS first when the tokenizer adds one). Each window holds at most
`seq_len` tokens: `stride` new tokens scored, after up to `seq_len - stride` tokens of context
from the previous window, so every token after the first is scored exactly once. Each window is
a (context, continuation) request, so both backends score it alike. Bits per byte and byte
perplexity use the UTF-8 length of the text and compare across tokenizers.

The window plan and its scoring here serve `ember eval-ppl` and `ember perplexity` as well
(training/eval_ppl.py, training/evaluate.py), through `LocalModel` for a checkpoint in process.
"""
from __future__ import annotations

import math
import re
from typing import Sequence

from training.eval.backend import LanguageModel, Progress
from training.eval.errors import EvalError
from training.eval.items import ContinuationScore, ScoreRequest
from training.eval.report import MetricValue


def windows(n_tokens: int, seq_len: int, stride: int, fill_last: bool = True) -> list[tuple[int, int, int]]:
    """(context start, first scored token, end) per window; token 0 is never scored.

    Every window but the last starts `stride` tokens after the one before. The last one is filled
    back to `seq_len` tokens of context when `fill_last`; otherwise it keeps its place in that
    rhythm, as `ember eval-ppl` and `ember perplexity` score it (their published figures use it).
    """
    if n_tokens < 2:
        raise EvalError("the text holds fewer than two tokens: nothing to score")
    if not 0 < stride <= seq_len - 1:
        raise EvalError(f"stride must be in 1..seq_len-1 ({seq_len - 1}), got {stride}")
    out = []
    start, end = 1, min(seq_len, n_tokens)
    while start < n_tokens:
        context = max(0, end - seq_len) if fill_last else max(0, start - (seq_len - stride))
        out.append((context, start, end))
        start, end = end, min(end + stride, n_tokens)
    return out


def score_windows(ids: Sequence[int], plan: list[tuple[int, int, int]], lm: LanguageModel,
                  progress: Progress = None) -> list[ContinuationScore]:
    """Each window of `plan` scored by `lm` as a (context, continuation) request over `ids`."""
    ids = tuple(ids)
    return lm.loglikelihoods([ScoreRequest(ids[c:s], ids[s:e]) for c, s, e in plan], progress)


def run_perplexity(text: str, ids: list[int], lm: LanguageModel, seq_len: int, stride: int,
                   limit: int | None = None, progress: Progress = None) -> tuple[list[MetricValue], list[dict]]:
    """Score `ids` (= lm.encode(text)) window by window; at most `limit` windows."""
    plan = windows(len(ids), seq_len, stride)[:limit]
    scores = score_windows(ids, plan, lm, progress)
    nll = -sum(s.logprob for s in scores)
    tokens = sum(s.num_tokens for s in scores)
    # With --limit only part of the text is scored: count its bytes and words pro rata (exact otherwise).
    fraction = tokens / (len(ids) - 1)
    n_bytes = len(text.encode("utf-8")) * fraction
    n_words = len(re.findall(r"\S+", text)) * fraction
    metrics = [
        MetricValue("token_perplexity", math.exp(nll / tokens), None, tokens),
        MetricValue("byte_perplexity", math.exp(nll / n_bytes), None, tokens),
        MetricValue("bits_per_byte", nll / math.log(2) / n_bytes, None, tokens),
        MetricValue("word_perplexity", math.exp(nll / max(n_words, 1)), None, tokens),
    ]
    samples = [{"window": i, "start": s, "end": e, "context_tokens": s - c, "nll": -sc.logprob}
               for i, ((c, s, e), sc) in enumerate(zip(plan, scores))]
    return metrics, samples
