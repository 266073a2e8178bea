"""Supervised fine-tuning data: instruction records -> chat-template text -> token ids with a loss mask.

Accepted rows (JSON array or JSONL; the format is detected per row unless `fmt` says otherwise):
  alpaca:   {"instruction", "input"?, "output", "system"?, "history"?: [[user, assistant], ...]}
  chat:     {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
  sharegpt: {"conversations": [{"from": "human"|"gpt"|"system", "value": str}, ...]}
  text:     a plain-text file (any suffix but .json/.jsonl), cut into windows; every token is a target.

Conversations are rendered with the checkpoint's chat template. Only assistant turns carry loss:
every other token gets label -100. The boundaries are found by rendering the conversation up to each
assistant turn (with the generation prompt) and up to its end, and tokenizing those prefixes; the
tokens of the whole conversation come from one `encode`, so training sees the same ids as serving.
"""
from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from training.records import DataFormatError, read_records

IGNORE_INDEX = -100
FORMATS = ("auto", "alpaca", "chat", "sharegpt", "text")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
CHAT_ROLES = ("system", "user", "assistant")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    """One training sequence: token ids and, per token, its label (the id itself, or -100 for no loss).

    Labels are not shifted: position t's label is the token at t. `collate` shifts them.
    `segments` holds the lengths of the examples packed into this one (one entry when unpacked).
    """

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    segments: tuple[int, ...] = ()

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_targets(self) -> int:
        return sum(1 for x in self.labels[1:] if x != IGNORE_INDEX)


# ---------------------------------------------------------------------------------------------------------
# Rows -> messages
# ---------------------------------------------------------------------------------------------------------

def detect_format(record: dict[str, Any], loc: str) -> str:
    if "messages" in record:
        return "chat"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    raise DataFormatError(f"{loc}: unrecognised row with keys {sorted(record)}; expected Alpaca "
                          "{instruction, input, output}, chat {messages: [...]} or ShareGPT {conversations: [...]}")


def _text(record: dict[str, Any], key: str, loc: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        kind = "missing" if value is None else f"a {type(value).__name__}, not a string"
        raise DataFormatError(f"{loc}: field {key!r} is {kind}")
    return value


def alpaca_messages(record: dict[str, Any], loc: str) -> list[dict[str, str]]:
    """Alpaca row -> messages: the instruction and input (a blank line between) as the user turn."""
    instruction = _text(record, "instruction", loc)
    extra = _text(record, "input", loc, required=False)
    output = _text(record, "output", loc)
    if not output.strip():
        raise DataFormatError(f"{loc}: field 'output' is empty; there is nothing to learn from this row")
    messages = []
    system = _text(record, "system", loc, required=False)
    if system:
        messages.append({"role": "system", "content": system})
    history = record.get("history") or []
    if not isinstance(history, list):
        raise DataFormatError(f"{loc}: field 'history' must be a list of [user, assistant] pairs")
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise DataFormatError(f"{loc}: history[{i}] must be a [user, assistant] pair of strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    return messages


def chat_messages(record: dict[str, Any], loc: str) -> list[dict[str, str]]:
    """Validate an OpenAI-style `messages` list."""
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataFormatError(f"{loc}: 'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataFormatError(f"{loc}: messages[{i}] must be an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if role not in CHAT_ROLES:
            raise DataFormatError(f"{loc}: messages[{i}].role is {role!r}; use one of {', '.join(CHAT_ROLES)}")
        if not isinstance(content, str):
            raise DataFormatError(f"{loc}: messages[{i}].content must be a string")
        out.append({"role": role, "content": content})
    _check_has_assistant(out, loc)
    return out


def sharegpt_messages(record: dict[str, Any], loc: str) -> list[dict[str, str]]:
    """ShareGPT `conversations` ({from, value}) -> messages."""
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataFormatError(f"{loc}: 'conversations' must be a non-empty list")
    out = []
    for i, t in enumerate(turns):
        who = t.get("from") if isinstance(t, dict) else None
        if who not in SHAREGPT_ROLES or not isinstance(t.get("value"), str):
            raise DataFormatError(f"{loc}: conversations[{i}] must be {{from: human|gpt|system, value: str}}")
        out.append({"role": SHAREGPT_ROLES[who], "content": t["value"]})
    if record.get("system"):
        out.insert(0, {"role": "system", "content": _text(record, "system", loc)})
    _check_has_assistant(out, loc)
    return out


def _check_has_assistant(messages: list[dict[str, str]], loc: str) -> None:
    if not any(m["role"] == "assistant" for m in messages):
        raise DataFormatError(f"{loc}: the conversation has no assistant turn; there is nothing to learn from it")


TO_MESSAGES = {"alpaca": alpaca_messages, "chat": chat_messages, "sharegpt": sharegpt_messages}


def record_messages(record: dict[str, Any], loc: str, fmt: str = "auto") -> list[dict[str, str]]:
    """One row of any supported format -> a validated list of messages."""
    kind = detect_format(record, loc) if fmt == "auto" else fmt
    if kind not in TO_MESSAGES:
        raise DataFormatError(f"{loc}: format {fmt!r} is not a row format ({', '.join(TO_MESSAGES)})")
    return TO_MESSAGES[kind](record, loc)


# ---------------------------------------------------------------------------------------------------------
# Messages -> token ids and labels
# ---------------------------------------------------------------------------------------------------------

def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_conversation(tokenizer, messages: list[dict[str, str]]) -> Example:
    """Ids of the whole rendered conversation; labels keep only the assistant turns' tokens.

    An assistant turn spans from the end of the prompt rendered with the generation prompt to the end
    of the conversation rendered through that turn, so it includes the template's end-of-turn token.
    """
    ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=False), add_bos=False)
    labels = [IGNORE_INDEX] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.encode(tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True),
                                  add_bos=False) if i else []
        upto = tokenizer.encode(tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False),
                                add_bos=False)
        # Common prefixes, not raw lengths: a tokenizer may merge across a boundary; then the merged
        # token is counted as part of the answer rather than shifting every later label.
        start, end = _common_prefix(prompt, ids), _common_prefix(upto, ids)
        labels[start:end] = ids[start:end]
    return Example(tuple(ids), tuple(labels), (len(ids),))


def load_sft_examples(path: str | os.PathLike, tokenizer, max_len: int, fmt: str = "auto",
                      limit: int | None = None) -> list[Example]:
    """Rows of an instruction file -> Examples of at most max_len tokens (longer ones are cut at the end).

    Rows whose answer starts beyond max_len are dropped (logged), since they would carry no loss.
    """
    if fmt not in FORMATS or fmt == "text":
        raise DataFormatError(f"{path}: format {fmt!r} is not an instruction format; use one of "
                              f"{', '.join(f for f in FORMATS if f != 'text')}")
    if not tokenizer.has_chat_template:
        raise DataFormatError(f"{path}: the base checkpoint's tokenizer has no chat template; add chat_template to "
                              "its tokenizer_config.json, or train on plain text with data.format=text")
    examples, dropped = [], 0
    for loc, record in read_records(path):
        example = tokenize_conversation(tokenizer, record_messages(record, loc, fmt))
        example = truncate(example, max_len)
        if example.num_targets == 0:
            dropped += 1
            continue
        examples.append(example)
        if limit is not None and len(examples) >= limit:
            break
    if dropped:
        logger.warning("%s: dropped %d row(s) whose answer starts after %d tokens", path, dropped, max_len)
    if not examples:
        raise DataFormatError(f"{path}: no usable rows (empty file, or every answer starts after {max_len} tokens)")
    return examples


def truncate(example: Example, max_len: int) -> Example:
    if len(example) <= max_len:
        return example
    return Example(example.input_ids[:max_len], example.labels[:max_len], (max_len,))


# ---------------------------------------------------------------------------------------------------------
# Plain text (continued pre-training, style adapters)
# ---------------------------------------------------------------------------------------------------------

def read_text_range(path: str | os.PathLike, char_range: Sequence[float] = (0.0, 1.0)) -> str:
    """The slice [start, end) of a text file, given as fractions of its characters (e.g. (0.9, 1.0))."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: data file not found")
    lo, hi = float(char_range[0]), float(char_range[1])
    if not 0.0 <= lo < hi <= 1.0:
        raise DataFormatError(f"{path}: text range must satisfy 0 <= start < end <= 1, got [{lo}, {hi}]")
    text = path.read_text(encoding="utf-8", errors="replace")
    return text[int(len(text) * lo): int(len(text) * hi)]


def load_text_examples(path: str | os.PathLike, tokenizer, window: int,
                       char_range: Sequence[float] = (0.0, 1.0)) -> list[Example]:
    """Tokenize a text slice once and cut it into consecutive windows of `window` tokens (+1 for the target).

    Windows overlap by one token so every token but the first is predicted exactly once.
    """
    ids = tokenizer.encode(read_text_range(path, char_range), add_bos=False)
    if len(ids) < 2:
        raise DataFormatError(f"{path}: the text range holds fewer than two tokens")
    examples = []
    for start in range(0, len(ids) - 1, window):
        chunk = tuple(ids[start: start + window + 1])
        if len(chunk) >= 2:
            examples.append(Example(chunk, chunk, (len(chunk),)))
    return examples


# ---------------------------------------------------------------------------------------------------------
# Packing and batching
# ---------------------------------------------------------------------------------------------------------

def pack(examples: Iterable[Example], max_len: int) -> list[Example]:
    """Concatenate examples (in order) into sequences of at most max_len tokens, first-fit.

    `segments` records the boundaries, so `collate` restarts positions and masks attention per example:
    a packed sequence trains exactly like its examples one by one.
    """
    packed: list[Example] = []
    ids: list[int] = []
    labels: list[int] = []
    segments: list[int] = []
    for ex in examples:
        if ids and len(ids) + len(ex) > max_len:
            packed.append(Example(tuple(ids), tuple(labels), tuple(segments)))
            ids, labels, segments = [], [], []
        ids += ex.input_ids
        labels += ex.labels
        segments.append(len(ex))
    if ids:
        packed.append(Example(tuple(ids), tuple(labels), tuple(segments)))
    return packed


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids/positions/segment_ids [B, T-1] and labels shifted by one [B, T-1].

    positions restart at 0 for each packed example; segment_ids (-1 on padding) let the attention keep
    each example to itself. A label at position t is the token at t+1 unless that token opens a new
    example (it is not predictable from the previous one) or is padding.
    """
    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(examples), width), dtype=torch.long)
    segment_ids = torch.full((len(examples), width), -1, dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex)
        ids[row, :n] = torch.tensor(ex.input_ids)
        lab = torch.tensor(ex.labels)
        start = 0
        for seg, length in enumerate(ex.segments or (n,)):
            positions[row, start: start + length] = torch.arange(length)
            segment_ids[row, start: start + length] = seg
            lab[start] = IGNORE_INDEX  # the first token of an example has no predecessor in it
            start += length
        labels[row, :n] = lab
    return {"input_ids": ids[:, :-1], "labels": labels[:, 1:], "positions": positions[:, :-1],
            "segment_ids": segment_ids[:, :-1]}


def batches(examples: Sequence[Example], micro_batch_size: int, seed: int, epoch: int,
            shuffle: bool = True) -> list[list[Example]]:
    """Micro-batches of one epoch, shuffled with (seed, epoch) so a resumed run sees the same order."""
    order = list(range(len(examples)))
    if shuffle:
        random.Random(seed * 100_003 + epoch).shuffle(order)
    return [[examples[i] for i in order[j: j + micro_batch_size]] for j in range(0, len(order), micro_batch_size)]
