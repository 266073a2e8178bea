"""Turns sampled tokens into RequestOutput deltas: detokenized text, stop strings, logprobs, timings.

Stop strings are matched on the detokenized text, so a stop string split over several tokens is
found. While a request streams, the end of its text that could still grow into a stop string is
held back, so text that a stop string later removes is never sent.
"""
from __future__ import annotations

from engine.detokenizer import IncrementalDetokenizer
from engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput, TokenLogprobs
from engine.request import Request, RequestStatus
from engine.sampler import RowLogprobs
from engine.tokenizer import Tokenizer


def held_back(text: str, stops: list[str]) -> int:
    """Length of the longest end of text that is the start of some stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


class _Choice:
    """Streaming state of one choice: full text so far and how much of it (and of its tokens) was sent."""

    def __init__(self, request: Request, tokenizer: Tokenizer | None):
        params = request.params
        self.request = request
        self.detok = (IncrementalDetokenizer(tokenizer, request.prompt_token_ids, params.skip_special_tokens)
                      if tokenizer is not None else None)
        self.text = ""
        self.sent_text = 0
        self.seen_tokens = 0
        self.sent_tokens = 0
        self.logprobs: list[TokenLogprobs] | None = [] if params.logprobs is not None else None
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None

    def add_tokens(self, new_ids: list[int], finished: bool) -> None:
        if self.detok is None:
            return
        before = len(self.text)
        for t in new_ids:
            self.text += self.detok.add(t)
        if finished:
            self.text += self.detok.finish()
        self._check_stop_strings(before)

    def _check_stop_strings(self, before: int) -> None:
        params = self.request.params
        if not params.stop or self.finish_reason == "stop" or self.request.num_output_tokens < params.min_tokens:
            return
        longest = max(len(s) for s in params.stop)
        start = max(self.sent_text, before - longest + 1, 0)
        found = [(i, s) for s in params.stop if (i := self.text.find(s, start)) >= 0]
        if not found:
            return
        i, stop = min(found)
        self.text = self.text[:i + len(stop) if params.include_stop_str_in_output else i]
        self.finish_reason, self.stop_reason = "stop", stop

    def delta(self) -> CompletionOutput:
        req = self.request
        end = len(self.text)
        if self.finish_reason is None and self.request.params.stop:
            end -= held_back(self.text, self.request.params.stop)
        text = self.text[self.sent_text:end]
        self.sent_text = max(self.sent_text, end)
        ids = req.token_ids[req.num_prompt_tokens + self.sent_tokens:]  # the new ones only, no full copy
        self.sent_tokens = req.num_output_tokens
        logprobs = None
        if self.logprobs is not None:
            logprobs, self.logprobs = self.logprobs, []
        return CompletionOutput(index=self.request.index, text=text, token_ids=ids, logprobs=logprobs,
                                finish_reason=self.finish_reason, stop_reason=self.stop_reason,
                                num_tokens=self.sent_tokens)


class _Group:
    """All choices of one user request."""

    def __init__(self, requests: list[Request], tokenizer: Tokenizer | None):
        self.requests = requests
        self.choices = {r.request_id: _Choice(r, tokenizer) for r in requests}
        first = requests[0]
        self.prompt_logprobs: list[TokenLogprobs | None] | None = (
            [None] * first.num_prompt_tokens if first.params.prompt_logprobs is not None else None)
        self.sent_prompt_logprobs = False

    @property
    def finished(self) -> bool:
        if len(self.requests) == 1:  # one choice (n = 1): read it directly
            return self.choices[self.requests[0].request_id].finish_reason is not None
        return all(c.finish_reason is not None for c in self.choices.values())

    def metrics(self) -> RequestMetrics:
        rs = self.requests
        if len(rs) == 1:  # the common case, once per request per step: no aggregation
            r = rs[0]
            return RequestMetrics(
                arrival_time=r.arrival_time, first_scheduled_time=r.first_scheduled_time,
                first_token_time=r.first_token_time, last_token_time=r.last_token_time,
                finished_time=r.finished_time if self.finished else None,
                num_prompt_tokens=r.num_prompt_tokens, num_generation_tokens=r.num_output_tokens,
                num_cached_tokens=r.num_cached_tokens or 0, num_preemptions=r.num_preemptions)

        def pick(fn, values):
            values = [v for v in values if v is not None]
            return fn(values) if values else None

        return RequestMetrics(
            arrival_time=rs[0].arrival_time,
            first_scheduled_time=pick(min, (r.first_scheduled_time for r in rs)),
            first_token_time=pick(min, (r.first_token_time for r in rs)),
            last_token_time=pick(max, (r.last_token_time for r in rs)),
            finished_time=pick(max, (r.finished_time for r in rs)) if self.finished else None,
            num_prompt_tokens=rs[0].num_prompt_tokens,
            num_generation_tokens=sum(r.num_output_tokens for r in rs),
            num_cached_tokens=rs[0].num_cached_tokens or 0,
            num_preemptions=sum(r.num_preemptions for r in rs),
        )


class OutputProcessor:
    """Per-request streaming state; `process` turns a step's token updates into RequestOutputs."""

    def __init__(self, tokenizer: Tokenizer | None):
        self.tokenizer = tokenizer
        self.groups: dict[str, _Group] = {}
        self._pieces: dict[int, str] = {}

    def add(self, group_id: str, requests: list[Request]) -> None:
        self.groups[group_id] = _Group(requests, self.tokenizer)

    def __contains__(self, group_id: str) -> bool:
        return group_id in self.groups

    def piece(self, token_id: int) -> str:
        """The text of one token as it reads inside a text (word-boundary space included)."""
        text = self._pieces.get(token_id)
        if text is None:
            if self.tokenizer is None:
                text = ""
            else:
                text = self.tokenizer.decode([token_id], skip_special_tokens=False)
                raw = self.tokenizer.id_to_piece(token_id)
                if raw.startswith("\u2581") and not text.startswith(" "):  # SentencePiece word boundary
                    text = " " + text
            self._pieces[token_id] = text
        return text

    def token_logprobs(self, row: RowLogprobs) -> TokenLogprobs:
        return TokenLogprobs(
            token=Logprob(row.token_id, row.logprob, self.piece(row.token_id)),
            top=[Logprob(t, lp, self.piece(t)) for t, lp in zip(row.top_ids, row.top_logprobs)],
        )

    def record_prompt_logprobs(self, group_id: str, start_pos: int, rows: list[RowLogprobs]) -> None:
        """rows[j] scores prompt token start_pos + j + 1 given everything before it."""
        group = self.groups.get(group_id)
        if group is None or group.prompt_logprobs is None or group.sent_prompt_logprobs:
            return
        for j, row in enumerate(rows):
            group.prompt_logprobs[start_pos + j + 1] = self.token_logprobs(row)

    def process(self, touched: list[Request], logprobs: dict[str, RowLogprobs]) -> tuple[list[RequestOutput], list[str]]:
        """Fold new tokens into text; returns outputs (one per request with news) and the ids of
        choices a stop string ended (their blocks are still to be freed by the caller)."""
        stopped: list[str] = []
        changed: dict[str, list[_Choice]] = {}
        for req in touched:
            group = self.groups.get(req.group_id)
            if group is None:
                continue
            choice = group.choices[req.request_id]
            new_ids = req.token_ids[req.num_prompt_tokens + choice.seen_tokens:]
            choice.seen_tokens += len(new_ids)
            row = logprobs.get(req.request_id)
            if choice.logprobs is not None and row is not None:
                choice.logprobs.append(self.token_logprobs(row))
            was_running = choice.finish_reason is None
            choice.add_tokens(new_ids, finished=req.is_finished)
            if choice.finish_reason is None and req.is_finished:
                choice.finish_reason, choice.stop_reason = req.status.finish_reason, req.stop_reason
            elif was_running and choice.finish_reason == "stop" and not req.is_finished:
                stopped.append(req.request_id)
            changed.setdefault(req.group_id, []).append(choice)
        outputs = [self._output(gid, choices) for gid, choices in changed.items()]
        return outputs, stopped

    def _output(self, group_id: str, choices: list[_Choice]) -> RequestOutput:
        group = self.groups[group_id]
        prompt_lp = None
        if group.prompt_logprobs is not None and not group.sent_prompt_logprobs:
            prompt_lp, group.sent_prompt_logprobs = group.prompt_logprobs, True
        out = RequestOutput(
            request_id=group_id,
            prompt_token_ids=group.requests[0].prompt_token_ids,
            prompt_logprobs=prompt_lp,
            outputs=[choices[0].delta()] if len(choices) == 1 else
            [c.delta() for c in sorted(choices, key=lambda c: c.request.index)],
            finished=group.finished,
            metrics=group.metrics(),
        )
        if out.finished:
            del self.groups[group_id]
        return out

    def abort(self, group_id: str) -> RequestOutput | None:
        """A final output for an aborted request (unfinished choices end with "abort"); drops its state."""
        group = self.groups.get(group_id)
        if group is None:
            return None
        open_choices = [c for c in group.choices.values() if c.finish_reason is None]
        for c in open_choices:
            c.finish_reason = RequestStatus.FINISHED_ABORTED.finish_reason
        return self._output(group_id, open_choices)
