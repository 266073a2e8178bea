"""Few-shot prompts: a description, k solved examples, then the question (lm-evaluation-harness layout).

Each example is `context + delimiter + target`, followed by a blank line. Examples come from a pool
(a train or dev split); "first_n" takes the first k of the item's group (MMLU: same subject, dev
order), "random" draws k with a seeded generator, in item order, never the item itself.
"""
from __future__ import annotations

import random
from dataclasses import replace
from typing import Sequence, TypeVar

from training.eval.errors import EvalError

SEED = 1234
T = TypeVar("T")  # ChoiceItem or GenerationItem


def apply_fewshot(items: Sequence[T], k: int, pool: Sequence[T], sampler: str = "random", seed: int = SEED) -> list[T]:
    """Items whose context is the full prompt: description + k examples + the item's own context."""
    if k < 0:
        raise EvalError(f"--num-fewshot must be >= 0, got {k}")
    if sampler not in ("random", "first_n"):
        raise ValueError(f"unknown few-shot sampler {sampler!r}")
    rng = random.Random(seed)
    groups: dict[str, list[T]] = {}
    for example in pool:
        groups.setdefault(example.group, []).append(example)
    out = []
    for item in items:
        shots: list[T] = []
        if k:
            candidates = groups.get(item.group, []) if sampler == "first_n" else list(pool)
            candidates = [c for c in candidates if c.source != item.source]
            if len(candidates) < k:
                where = f" for {item.group}" if sampler == "first_n" and item.group else ""
                raise EvalError(f"{k}-shot needs {k} examples{where}, only {len(candidates)} are available")
            shots = candidates[:k] if sampler == "first_n" else rng.sample(candidates, k)
        examples = "".join(f"{s.context}{s.delimiter}{s.target}\n\n" for s in shots)
        out.append(replace(item, context=item.description + examples + item.context, description=""))
    return out
