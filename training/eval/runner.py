"""`evaluate(task, model, options)`: load the task's data, build prompts, score, aggregate."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from training.eval.backend import LanguageModel
from training.eval.errors import EvalError
from training.eval.fewshot import SEED, apply_fewshot
from training.eval.generation import generate
from training.eval.multiple_choice import run_multiple_choice
from training.eval.perplexity import run_perplexity, windows
from training.eval.readers import read_text
from training.eval.registry import TaskSpec, get_task, resolve_data
from training.eval.report import EvalReport


@dataclass(frozen=True)
class EvalOptions:
    """How to run a task. None means the task's default."""

    data: str | None = None
    num_fewshot: int = 0
    fewshot_data: str | None = None
    limit: int | None = None
    seed: int = SEED
    max_tokens: int | None = None  # generation
    seq_len: int | None = None  # perplexity
    stride: int | None = None
    text_range: tuple[float, float] = (0.0, 1.0)
    progress: bool = True

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise EvalError(f"--limit must be at least 1, got {self.limit}")
        if self.num_fewshot < 0:
            raise EvalError(f"--num-fewshot must be >= 0, got {self.num_fewshot}")
        lo, hi = self.text_range
        if not 0.0 <= lo < hi <= 1.0:
            raise EvalError(f"--text-range must satisfy 0 <= start < end <= 1, got {lo} {hi}")


def _progress_bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    # disable=None hides the bar when stderr is not a terminal (logs, CI).
    return tqdm(total=total, desc=desc, unit="req", disable=None if enabled else True, leave=False)


def evaluate(task: str | TaskSpec, lm: LanguageModel, options: EvalOptions | None = None) -> EvalReport:
    """Run one task against a backend (LocalModel or ServerModel) and return its report."""
    spec = get_task(task) if isinstance(task, str) else task
    options = options or EvalOptions()
    path = resolve_data(spec, options.data)
    settings: dict[str, Any] = {"data": str(path), "backend": type(lm).__name__, **getattr(lm, "settings", {}),
                                "limit": options.limit}
    if spec.kind == "perplexity":
        metrics, samples = _perplexity(spec, lm, options, path, settings)
    elif spec.kind == "multiple_choice":
        items = _items(spec, options, path, settings)
        with _progress_bar(sum(len(i.choices) for i in items), spec.name, options.progress) as bar:
            metrics, samples = run_multiple_choice(items, lm, bar.update)
    else:
        items = _items(spec, options, path, settings)
        max_tokens = options.max_tokens or spec.max_tokens
        settings.update(max_tokens=max_tokens, stop=list(spec.stop))
        with _progress_bar(len(items), spec.name, options.progress) as bar:
            outputs = generate(items, lm, max_tokens, spec.stop, bar.update)
        metrics, samples = spec.score(items, outputs)
    date = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    return EvalReport(spec.name, lm.name, settings, date, metrics, samples)


def _items(spec: TaskSpec, options: EvalOptions, path, settings: dict) -> list:
    """The task's items, cut to --limit, with their full (few-shot) prompts."""
    items = spec.load(path)
    if options.limit is not None:
        items = items[:options.limit]
    return _with_fewshot(spec, items, options, path, settings)


def _with_fewshot(spec: TaskSpec, items: list, options: EvalOptions, path, settings: dict) -> list:
    k = options.num_fewshot
    settings.update(num_fewshot=k)
    pool = None
    if k:
        if options.fewshot_data is not None:
            pool = spec.load(options.fewshot_data)
            settings.update(fewshot_data=options.fewshot_data)
        elif spec.fewshot_pool is not None:
            pool = spec.fewshot_pool(path)
        if pool is None:
            pool = spec.load(path)  # the evaluated file itself; an item is never its own example
        settings.update(fewshot_sampler=spec.fewshot_sampler, seed=options.seed)
    return apply_fewshot(items, k, pool or [], spec.fewshot_sampler, options.seed)


def _perplexity(spec: TaskSpec, lm: LanguageModel, options: EvalOptions, path, settings: dict):
    text = read_text(path)
    lo, hi = options.text_range
    text = text[int(len(text) * lo):int(len(text) * hi)]
    if not text.strip():
        raise EvalError(f"{path}: the text range {lo}:{hi} is empty")
    # Default: the largest power of two the model takes, at most 2048 (the same for every backend).
    seq_len = options.seq_len or min(2048, 1 << ((lm.max_length or 2048).bit_length() - 1))
    if lm.max_length and seq_len > lm.max_length:
        raise EvalError(f"--seq-len {seq_len} exceeds the model's limit of {lm.max_length} tokens")
    stride = options.stride or max(1, seq_len // 2)
    settings.update(seq_len=seq_len, stride=stride, text_range=list(options.text_range))
    ids = lm.encode(text)
    total = len(windows(len(ids), seq_len, stride)[:options.limit])
    with _progress_bar(total, spec.name, options.progress) as bar:
        return run_perplexity(text, ids, lm, seq_len, stride, options.limit, bar.update)
