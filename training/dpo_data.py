"""Preference pairs for DPO: rows -> (prompt messages, chosen answer, rejected answer) -> token ids.

Accepted rows (JSON array or JSONL):
  {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}   (TRL's layout)
  {"instruction", "input"?, "chosen", "rejected"}                                   (Alpaca-style)
  {"conversations": [{from, value}...], "chosen": {from, value}, "rejected": {...}} (LLaMA-Factory ShareGPT)
Each answer is rendered as the assistant turn after the prompt with the checkpoint's chat template;
only that turn's tokens are labelled (earlier assistant turns in the prompt carry no loss).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from training.records import DataFormatError, read_records
from training.sft_data import (IGNORE_INDEX, SHAREGPT_ROLES, Example, _common_prefix, collate, truncate)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreferencePair:
    """Token ids of the same prompt followed by the chosen and by the rejected answer."""

    chosen: Example
    rejected: Example


def _answer(value: Any, loc: str, key: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("value", value.get("content")), str):
        return value.get("value", value.get("content"))
    if isinstance(value, list) and value and isinstance(value[-1], dict) and isinstance(value[-1].get("content"), str):
        return value[-1]["content"]  # TRL conversational layout: [{"role": "assistant", "content": ...}]
    raise DataFormatError(f"{loc}: field {key!r} must be a string, a {{from, value}} turn or a list of messages")


def _prompt_messages(record: dict[str, Any], loc: str) -> list[dict[str, str]]:
    if "prompt" in record:
        prompt = record["prompt"]
        if isinstance(prompt, str):
            return [{"role": "user", "content": prompt}]
        if isinstance(prompt, list) and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                            and m.get("role") in ("system", "user", "assistant") for m in prompt):
            return [{"role": m["role"], "content": m["content"]} for m in prompt]
        raise DataFormatError(f"{loc}: field 'prompt' must be a string or a list of {{role, content}} messages")
    if "instruction" in record:
        instruction, extra = record["instruction"], record.get("input") or ""
        if not isinstance(instruction, str) or not isinstance(extra, str):
            raise DataFormatError(f"{loc}: fields 'instruction' and 'input' must be strings")
        return [{"role": "user", "content": f"{instruction}\n\n{extra}" if extra.strip() else instruction}]
    if "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list) or not turns:
            raise DataFormatError(f"{loc}: 'conversations' must be a non-empty list")
        out = []
        for i, t in enumerate(turns):
            if not isinstance(t, dict) or t.get("from") not in SHAREGPT_ROLES or not isinstance(t.get("value"), str):
                raise DataFormatError(f"{loc}: conversations[{i}] must be {{from: human|gpt|system, value: str}}")
            out.append({"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]})
        return out
    raise DataFormatError(f"{loc}: a preference row needs 'prompt', 'instruction' or 'conversations' "
                          f"plus 'chosen' and 'rejected'; got keys {sorted(record)}")


def record_pair(record: dict[str, Any], loc: str) -> tuple[list[dict[str, str]], str, str]:
    """One row -> (prompt messages, chosen text, rejected text)."""
    for key in ("chosen", "rejected"):
        if key not in record:
            raise DataFormatError(f"{loc}: field {key!r} is missing")
    messages = _prompt_messages(record, loc)
    if messages[-1]["role"] == "assistant":
        raise DataFormatError(f"{loc}: the prompt ends with an assistant turn; it must end with the user's turn")
    return messages, _answer(record["chosen"], loc, "chosen"), _answer(record["rejected"], loc, "rejected")


def tokenize_answer(tokenizer, prompt: list[dict[str, str]], answer: str) -> Example:
    """Ids of prompt + answer; labels only on the answer's turn (end-of-turn token included)."""
    messages = prompt + [{"role": "assistant", "content": answer}]
    ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=False), add_bos=False)
    prefix = tokenizer.encode(tokenizer.apply_chat_template(prompt, add_generation_prompt=True), add_bos=False)
    start = _common_prefix(prefix, ids)
    labels = [IGNORE_INDEX] * start + list(ids[start:])
    return Example(tuple(ids), tuple(labels), (len(ids),))


def load_pairs(path: str | os.PathLike, tokenizer, max_len: int, limit: int | None = None) -> list[PreferencePair]:
    """Preference rows -> pairs, each side cut to max_len tokens; pairs where a side keeps no answer are dropped."""
    if not tokenizer.has_chat_template:
        raise DataFormatError(f"{path}: the base checkpoint's tokenizer has no chat template; DPO renders prompts "
                              "through it (add chat_template to tokenizer_config.json)")
    pairs, dropped = [], 0
    for loc, record in read_records(path):
        prompt, chosen, rejected = record_pair(record, loc)
        pair = PreferencePair(truncate(tokenize_answer(tokenizer, prompt, chosen), max_len),
                              truncate(tokenize_answer(tokenizer, prompt, rejected), max_len))
        if pair.chosen.num_targets == 0 or pair.rejected.num_targets == 0:
            dropped += 1
            continue
        pairs.append(pair)
        if limit is not None and len(pairs) >= limit:
            break
    if dropped:
        logger.warning("%s: dropped %d pair(s) whose prompt fills all %d tokens", path, dropped, max_len)
    if not pairs:
        raise DataFormatError(f"{path}: no usable preference pairs")
    return pairs


def collate_pairs(pairs: Sequence[PreferencePair], pad_id: int) -> dict[str, torch.Tensor]:
    """One batch of 2B rows: the B chosen sequences, then the B rejected ones (same padding)."""
    batch = collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    del batch["segment_ids"]  # pairs are never packed: plain causal attention
    return batch
