"""Engine log-probabilities in the two OpenAI shapes: legacy completions and chat."""
from __future__ import annotations

from typing import Any, Sequence

from server.protocol.chat import ChatChoiceLogprobs, ChatLogprob, ChatTokenLogprob
from server.protocol.completions import CompletionLogprobs


def _top_dict(entry: Any) -> dict[str, float]:
    # Several ids can decode to the same text; the likeliest keeps the key.
    out: dict[str, float] = {}
    for lp in [entry.token, *entry.top]:
        if lp.token not in out or lp.logprob > out[lp.token]:
            out[lp.token] = lp.logprob
    return out


def prompt_offsets(tokenizer: Any, ids: Sequence[int]) -> list[int]:
    """Where each prompt token's text starts in the decoded prompt (special tokens take no room)."""
    from engine.detokenizer import IncrementalDetokenizer

    detok = IncrementalDetokenizer(tokenizer)
    offsets, length = [], 0
    for tok_id in ids:
        offsets.append(length)
        length += len(detok.add(tok_id))
    return offsets


class LegacyLogprobs:
    """Builds `CompletionLogprobs` pieces with text offsets that continue across stream chunks."""

    def __init__(self, offset: int = 0, with_top: bool = True):
        self.offset = offset
        self.with_top = with_top

    def build(self, entries: Sequence[Any | None], token_ids: Sequence[int], tokenizer: Any,
              offsets: Sequence[int] | None = None) -> CompletionLogprobs:
        """`entries[i]` is the engine's TokenLogprobs of token `token_ids[i]`, or None (first prompt token).

        Text offsets continue from `self.offset` by each token's length, unless `offsets` gives them.
        """
        out = CompletionLogprobs()
        for i, (entry, tok_id) in enumerate(zip(entries, token_ids)):
            if entry is None:
                text = tokenizer.decode([tok_id], skip_special_tokens=False)
                out.tokens.append(text)
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
            else:
                text = entry.token.token
                out.tokens.append(text)
                out.token_logprobs.append(entry.token.logprob)
                out.top_logprobs.append(_top_dict(entry) if self.with_top else None)
            out.text_offset.append(self.offset if offsets is None else offsets[i])
            self.offset += len(text)
        return out


def _chat_logprob(lp: Any) -> ChatLogprob:
    return ChatLogprob(token=lp.token, logprob=lp.logprob, bytes=list(lp.token.encode("utf-8")))


def chat_logprobs(entries: Sequence[Any], top: int) -> ChatChoiceLogprobs:
    """Chat's `logprobs.content`, with `top` alternatives per token."""
    content = []
    for entry in entries:
        lp = entry.token
        content.append(ChatTokenLogprob(token=lp.token, logprob=lp.logprob, bytes=list(lp.token.encode("utf-8")),
                                        top_logprobs=[_chat_logprob(t) for t in entry.top[:top]]))
    return ChatChoiceLogprobs(content=content)
