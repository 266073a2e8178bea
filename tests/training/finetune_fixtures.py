"""Helpers for the fine-tuning tests: a tiny ChatML checkpoint and small instruction / preference files."""
from __future__ import annotations

import json
from pathlib import Path

from training.tiny import make_tiny_checkpoint

QUESTIONS = ["What is the capital of France?", "Name a primary colour.", "How many legs has a cat?",
             "Spell the word 'house'.", "What comes after Monday?", "Is ice cold?"]
ANSWERS = ["Paris is the capital of France.", "Red is a primary colour.", "A cat has four legs.",
           "h-o-u-s-e", "Tuesday comes after Monday.", "Yes, ice is cold."]


def tiny_base(out: Path, seed: int = 0) -> Path:
    """A 2-layer, 64-wide random Llama with a SentencePiece tokenizer and a ChatML chat template."""
    return make_tiny_checkpoint(out, seed=seed, vocab_size=512, hidden_size=64, num_layers=2)


def write_alpaca(path: Path, repeat: int = 4) -> Path:
    rows = [{"instruction": q, "input": "", "output": a} for q, a in zip(QUESTIONS, ANSWERS)] * repeat
    path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return path


def write_chat_jsonl(path: Path) -> Path:
    lines = []
    for q, a in zip(QUESTIONS, ANSWERS):
        lines.append(json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": q},
                                              {"role": "assistant", "content": a}]}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_preferences(path: Path, repeat: int = 3) -> Path:
    """Chosen: the right answer; rejected: a rude one, as in the preference sets the docs point to."""
    rows = [{"prompt": q, "chosen": a, "rejected": "Figure it out yourself, it is obvious."}
            for q, a in zip(QUESTIONS, ANSWERS)] * repeat
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path
