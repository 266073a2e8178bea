"""How a (context, continuation) text pair becomes token ids: one rule for every backend.

The continuation's tokens are those of `encode(context + continuation)` past the tokens of
`encode(context)`: scoring a continuation is log p(tokens(context + continuation)) minus
log p(context tokens). Encoding the continuation on its own would be wrong for SentencePiece
tokenizers (" Paris" alone gains a word-start piece it never has after a context). As in
lm-evaluation-harness, trailing whitespace of the context moves to the continuation first.
When a token straddles the boundary (whole does not start with the context's ids), the
boundary is the longest common prefix and the straddling token belongs to the continuation.

Both backends score the same ids: the server-backed one sends them as token-id prompts.
"""
from __future__ import annotations

from typing import Callable, Sequence

from training.eval.errors import EvalError
from training.eval.items import ScoreRequest

Encoder = Callable[[str], Sequence[int]]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def split_pair(encode: Encoder, context: str, continuation: str) -> ScoreRequest:
    """Token ids of `context` and `continuation` by the rule above (`encode` adds BOS as the model wants)."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    context = stripped
    ctx = list(encode(context))
    whole = list(encode(context + continuation))
    n = len(ctx) if whole[:len(ctx)] == ctx else common_prefix(ctx, whole)
    if n == 0:
        raise EvalError(f"the context {context[:40]!r} encodes to no tokens and the tokenizer adds no BOS: "
                        "nothing to condition the first continuation token on")
    if n == len(whole):
        raise EvalError(f"the continuation {continuation!r} encodes to no tokens after its context")
    return ScoreRequest(tuple(whole[:n]), tuple(whole[n:]))


def fit(request: ScoreRequest, max_length: int) -> ScoreRequest:
    """Drop context tokens from the left until context + continuation fit in `max_length` tokens."""
    total = len(request.context) + len(request.continuation)
    if total <= max_length:
        return request
    keep = max_length - len(request.continuation)
    if keep < 1:
        raise EvalError(f"a continuation of {len(request.continuation)} tokens does not fit the model's "
                        f"{max_length} tokens of context")
    return ScoreRequest(request.context[-keep:], request.continuation)
