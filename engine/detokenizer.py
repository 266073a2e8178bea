"""Incremental detokenization for streaming: token ids in, text deltas out.

Decoding one token alone is wrong in two ways: a character split over several byte-fallback or
byte-level tokens decodes to U+FFFD until its last byte arrives, and SentencePiece drops the
word-boundary space of whichever token comes first in what it decodes. So each step decodes a
short window twice, the already-emitted tokens of the window and the window plus the new token,
and emits the difference (the scheme vLLM uses). The window starts a few tokens back, so the
space of the new token is never the "first" one; text that ends in U+FFFD is held back until
the character completes, and so is an open run of byte-fallback tokens under a decoder that
decodes such runs as a whole. Decoding is otherwise local, so the deltas add up to
`decode(all ids)`.
"""
from __future__ import annotations

import weakref
from typing import Iterable, Sequence

from engine.tokenizer import Tokenizer

# Prompt tokens kept as left context: enough for any word-boundary or UTF-8 effect.
_CONTEXT = 5
# Ids before the window are dropped once this many pile up, so memory stays flat on long streams.
_TRIM_AT = 256
# A window's delta depends only on the tokenizer, its ids and the two flags, and in a stream the
# window is mostly (previous token, new token): the deltas are memoized per tokenizer (shared by
# every stream), which saves the two decode calls, ~8 us a token, on each repeated bigram. The
# cache is cleared when it reaches this many entries. Longer windows (a long run of tokens with no
# text yet) are decoded every time, so no key grows with the stream.
_CACHE_ENTRIES = 1 << 16
_CACHE_WINDOW = 16
_caches: "weakref.WeakKeyDictionary[Tokenizer, dict]" = weakref.WeakKeyDictionary()


def _delta_cache(tokenizer: Tokenizer) -> dict | None:
    try:
        return _caches.setdefault(tokenizer, {})
    except TypeError:  # an object that cannot be weakly referenced: no cache
        return None


class IncrementalDetokenizer:
    """Turns generated token ids, fed one at a time, into text deltas.

    `prompt_ids` give left context only (their text is not emitted): with them, a first token
    that starts a word comes out with its leading space, as it reads after the prompt. Without
    them, the concatenated deltas equal `tokenizer.decode(generated_ids)` at every step, except
    that an incomplete trailing UTF-8 character is held back; `finish()` releases it.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True):
        self._tok = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = [int(i) for i in list(prompt_ids)[-_CONTEXT:]]
        # _ids[_prefix:_read] were already emitted (the window's context); _ids[_read:] are pending.
        self._prefix = 0
        self._read = len(self._ids)
        self._parts: list[str] = []
        self._cache = _delta_cache(tokenizer)

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return "".join(self._parts)

    def add(self, token_id: int) -> str:
        """Feed one token id; return the text it completes (possibly "")."""
        self._ids.append(int(token_id))
        return self._emit(final=False)

    def add_many(self, token_ids: Iterable[int]) -> str:
        """Feed several ids; return their combined delta."""
        return "".join(self.add(t) for t in token_ids)

    def finish(self) -> str:
        """Release any held-back text (an incomplete character at the end of the stream shows as U+FFFD)."""
        return self._emit(final=True)

    def _byte_run_open(self) -> bool:
        grouped = self._tok.grouped_byte_ids
        if not grouped:
            return False
        skipped = self._tok.all_special_ids if self.skip_special_tokens else ()
        # Skipped special tokens vanish before decoding, so a byte run continues across them.
        for token_id in reversed(self._ids[self._read :]):
            if token_id not in skipped:
                return token_id in grouped
        return False

    def _emit(self, final: bool) -> str:
        if not final and self._byte_run_open():
            return ""  # the run of byte tokens is still open; its text may change
        skip = self.skip_special_tokens
        cache = self._cache if len(self._ids) - self._prefix <= _CACHE_WINDOW else None
        key = None if cache is None else (skip, final, self._read - self._prefix, tuple(self._ids[self._prefix :]))
        delta = None if cache is None else cache.get(key)
        if delta is None:
            delta = self._decode_delta(skip, final)
            if cache is not None:
                if len(cache) >= _CACHE_ENTRIES:
                    cache.clear()
                cache[key] = delta
        if not delta:
            # Nothing new yet (a skipped special token, or a character still missing bytes).
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        if self._prefix >= _TRIM_AT:
            del self._ids[: self._prefix]
            self._read -= self._prefix
            self._prefix = 0
        self._parts.append(delta)
        return delta

    def _decode_delta(self, skip: bool, final: bool) -> str:
        """The window's new text: decode it without and with the pending ids ("" while nothing
        is complete)."""
        decode = self._tok.decode
        before = decode(self._ids[self._prefix : self._read], skip_special_tokens=skip)
        after = decode(self._ids[self._prefix :], skip_special_tokens=skip)
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""
        return after[len(before) :]
