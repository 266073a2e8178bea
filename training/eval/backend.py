"""What a scoring backend provides; `LocalModel` and `ServerModel` both fit it."""
from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

from training.eval.items import ContinuationScore, ScoreRequest

Progress = Callable[[int], Any] | None


class LanguageModel(Protocol):
    """A model that can tokenize, score continuations and generate greedily."""

    name: str

    @property
    def max_length(self) -> int | None:
        """Longest token sequence a request may hold (None: unknown, nothing is cut)."""
        ...

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, BOS included when the model's tokenizer adds one."""
        ...

    def loglikelihoods(self, requests: Sequence[ScoreRequest], progress: Progress = None) -> list[ContinuationScore]:
        ...

    def generate(self, prompts: Sequence[Sequence[int]], max_tokens: int, stop: Sequence[str],
                 progress: Progress = None) -> list[str]:
        ...


def memo_encoder(lm: LanguageModel) -> Callable[[str], list[int]]:
    """`lm.encode` with a cache: a question's context is encoded once for all its choices."""
    cache: dict[str, list[int]] = {}

    def encode(text: str) -> list[int]:
        if text not in cache:
            cache[text] = lm.encode(text)
        return cache[text]

    return encode
