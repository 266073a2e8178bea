"""From a validated request body to the engine's SamplingParams, enforcing the server's limits.

Everything the engine could trip over is checked here with a 400 that names the parameter and
the limit: token ids outside the vocabulary, too many stop strings, n or logprobs past their caps,
a prompt plus max_tokens longer than the context.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.errors import InvalidRequestError
from engine.sampling import SamplingParams
from server.errors import APIError, bad_request, from_engine_error
from server.protocol.common import SamplingFields
from server.settings import ServerSettings


@dataclass(frozen=True)
class Limits:
    """What the served model and the settings allow one request."""

    max_model_len: int
    vocab_size: int
    max_prompt_tokens: int
    max_tokens_cap: int
    max_n: int
    max_logprobs: int
    max_stop: int
    max_stop_chars: int
    max_prompts: int
    max_piece_chars: int = 0  # the longest vocabulary entry; 0 = unknown

    @classmethod
    def build(cls, settings: ServerSettings, max_model_len: int, vocab_size: int,
              max_piece_chars: int = 0) -> "Limits":
        prompt_cap = min(settings.max_prompt_tokens or max_model_len, max_model_len)
        return cls(max_model_len=max_model_len, vocab_size=vocab_size, max_prompt_tokens=prompt_cap,
                   max_tokens_cap=settings.max_tokens_cap, max_n=settings.max_n,
                   max_logprobs=settings.max_logprobs, max_stop=settings.max_stop,
                   max_stop_chars=settings.max_stop_chars, max_prompts=settings.max_prompts,
                   max_piece_chars=max_piece_chars)


def max_piece_chars(tokenizer: object, vocab_size: int) -> int:
    """Length of the longest vocabulary entry: no token covers more characters of text than this."""
    try:
        return max(len(p) for p in tokenizer.convert_ids_to_tokens(range(vocab_size)))  # type: ignore[attr-defined]
    except Exception:  # an exotic tokenizer: skip the early check rather than fail start-up
        return 0


def check_text_size(chars: int, limits: Limits, param: str) -> None:
    """Refuse text that cannot fit before spending time tokenizing it.

    Each token covers at most `max_piece_chars` characters, so a text of `chars` characters has at
    least `chars / max_piece_chars` tokens.
    """
    if limits.max_piece_chars and chars > limits.max_prompt_tokens * limits.max_piece_chars:
        least = chars // limits.max_piece_chars
        raise APIError(400, f"This model's maximum prompt length is {limits.max_prompt_tokens} tokens; your "
                            f"prompt has at least {least} tokens ({chars} characters). Please shorten the prompt.",
                       param=param, code="context_length_exceeded")


def check_token_ids(ids: list[int], limits: Limits, param: str) -> None:
    for tok in ids:
        if not 0 <= tok < limits.vocab_size:
            raise bad_request(f"token id {tok} in '{param}' is outside the vocabulary (0..{limits.vocab_size - 1})",
                              param)


def check_prompt_length(n_tokens: int, limits: Limits, param: str) -> None:
    if n_tokens == 0:
        raise bad_request(f"'{param}' is empty after tokenization", param)
    if n_tokens > limits.max_prompt_tokens:
        raise APIError(400, f"This model's maximum prompt length is {limits.max_prompt_tokens} tokens "
                            f"(context {limits.max_model_len}); your prompt has {n_tokens} tokens. "
                            "Please shorten the prompt.", param=param, code="context_length_exceeded")


def resolve_max_tokens(requested: int | None, explicit: bool, default: int | None, longest_prompt: int,
                       limits: Limits, param: str, allow_zero: bool = False) -> int:
    """The number of tokens to generate, or a 400 that says which limit was hit."""
    room = limits.max_model_len - longest_prompt
    if requested is not None and requested > limits.max_tokens_cap:
        raise bad_request(f"'{param}' is {requested}; this server allows at most {limits.max_tokens_cap}", param)
    if requested == 0 and not allow_zero:
        raise bad_request(f"'{param}' must be at least 1", param)
    if requested is None or not explicit:
        cap = default if default is not None else limits.max_tokens_cap
        wanted = min(cap, limits.max_tokens_cap, room)
        if wanted < 1 and not (allow_zero and requested == 0):
            raise APIError(400, f"This model's maximum context length is {limits.max_model_len} tokens and the "
                                f"prompt has {longest_prompt}; no room is left to generate.", param=param,
                           code="context_length_exceeded")
        return max(wanted, 0)
    if longest_prompt + requested > limits.max_model_len:
        raise APIError(400, f"This model's maximum context length is {limits.max_model_len} tokens. However, you "
                            f"requested {longest_prompt + requested} tokens ({longest_prompt} in the prompt, "
                            f"{requested} for the completion). Please reduce the prompt or '{param}'.",
                       param=param, code="context_length_exceeded")
    return requested


def _stops(req: SamplingFields, limits: Limits) -> list[str]:
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) + len(req.stop_token_ids or []) > limits.max_stop:
        raise bad_request(f"at most {limits.max_stop} stop sequences (stop plus stop_token_ids) are allowed", "stop")
    for s in stop:
        if not s:
            raise bad_request("stop sequences must not be empty", "stop")
        if len(s) > limits.max_stop_chars:
            raise bad_request(f"a stop sequence may be at most {limits.max_stop_chars} characters", "stop")
    return stop


def _logit_bias(req: SamplingFields, limits: Limits) -> dict[int, float] | None:
    if not req.logit_bias:
        return None
    out: dict[int, float] = {}
    for key, value in req.logit_bias.items():
        try:
            tok = int(key)
        except ValueError:
            raise bad_request(f"logit_bias keys must be token ids, got {key!r}", "logit_bias") from None
        check_token_ids([tok], limits, "logit_bias")
        out[tok] = value
    return out


def sampling_params(req: SamplingFields, limits: Limits, max_tokens: int, logprobs: int | None,
                    prompt_logprobs: int | None = None) -> SamplingParams:
    """Build the engine's SamplingParams; its own validation errors become 400s."""
    if req.n > limits.max_n:
        raise bad_request(f"'n' is {req.n}; this server allows at most {limits.max_n}", "n")
    for name, value in (("logprobs", logprobs), ("prompt_logprobs", prompt_logprobs)):
        if value is not None and value > limits.max_logprobs:
            raise bad_request(f"at most {limits.max_logprobs} log-probabilities per token are allowed", name)
    if req.stream_options is not None and not req.stream:
        raise bad_request("'stream_options' is only allowed when 'stream' is true", "stream_options")
    stop_ids = list(req.stop_token_ids or [])
    check_token_ids(stop_ids, limits, "stop_token_ids")
    top_k = req.top_k or 0
    if top_k >= limits.vocab_size:  # keeping every token is top-k off
        top_k = 0
    try:
        return SamplingParams(
            n=req.n, max_tokens=max_tokens, min_tokens=req.min_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_k=top_k,
            min_p=req.min_p or 0.0, presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            logit_bias=_logit_bias(req, limits), seed=req.seed, stop=_stops(req, limits),
            stop_token_ids=stop_ids, include_stop_str_in_output=req.include_stop_str_in_output,
            ignore_eos=req.ignore_eos, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            skip_special_tokens=req.skip_special_tokens,
        )
    except InvalidRequestError as exc:
        raise from_engine_error(exc) from exc
