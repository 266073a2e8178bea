"""The plain data every stage hands on: task items in, scoring requests to a backend, scores back."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChoiceItem:
    """One multiple-choice question.

    The model scores `context + delimiter + choice` for every choice; `gold` indexes the right one.
    `description` is a header written once before any few-shot examples (MMLU's subject line);
    `source` is "file:line", for error messages and per-item logs.
    """

    context: str
    choices: tuple[str, ...]
    gold: int
    source: str
    description: str = ""
    delimiter: str = " "
    group: str = ""  # a sub-set name (MMLU subject), kept in per-item logs

    @property
    def target(self) -> str:
        """The right answer as a few-shot example shows it."""
        return self.choices[self.gold]


@dataclass(frozen=True)
class GenerationItem:
    """One generation prompt with its reference; `answer` is what the metric compares (the final
    number for GSM8K, the whole reference otherwise)."""

    context: str
    reference: str
    answer: str
    source: str
    description: str = ""
    delimiter: str = " "
    group: str = ""

    @property
    def target(self) -> str:
        return self.reference


@dataclass(frozen=True)
class ScoreRequest:
    """Score `continuation` given `context` (token ids; the context holds at least one token)."""

    context: tuple[int, ...]
    continuation: tuple[int, ...]


@dataclass(frozen=True)
class ContinuationScore:
    """Summed log-probability (nats) of a continuation, and whether greedy decoding would produce it."""

    logprob: float
    greedy: bool
    num_tokens: int
