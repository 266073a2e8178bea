"""Train a SentencePiece BPE tokenizer and write it in the Hugging Face checkpoint layout.

The result is `tokenizer.model` + `tokenizer_config.json` (special tokens, `add_bos_token`, a
ChatML chat template) + `special_tokens_map.json`: Ember's `Tokenizer.from_dir` loads it, and so
does transformers' `AutoTokenizer` (as a LlamaTokenizer). The model settings follow Llama's:
byte fallback (no unknown characters), digits split one by one, no text normalisation and no
whitespace collapsing, so decode(encode(text)) == text for any text.
"""
from __future__ import annotations

import gzip
import io
import json
import random
from pathlib import Path
from typing import Iterable, Iterator

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHAT_TOKENS = (IM_START, IM_END)

# ChatML, opened with BOS so a conversation starts the way every pretraining document does.
CHATML_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Longest line (in characters) handed to SentencePiece; longer ones are cut at a space.
_MAX_LINE = 8192

TINY_CORPUS = Path(__file__).resolve().parent.parent / "engine" / "assets" / "tiny_corpus.txt"


def train_tokenizer(
    inputs: Iterable[str | Path],
    out_dir: str | Path,
    vocab_size: int = 8000,
    *,
    max_sentences: int | None = None,
    model_max_length: int = 2048,
    character_coverage: float = 0.9995,
    chat_template: str = CHATML_TEMPLATE,
    seed: int = 0,
) -> Path:
    """Train a BPE tokenizer on `inputs` and write it to `out_dir`; return `out_dir`.

    `inputs` items are `Path`s (text files, one or more sentences a line; `.gz` read
    transparently) or `str`s (text itself). With `max_sentences`, a seeded reservoir sample of
    that many lines is used. The same inputs and settings give the same files, byte for byte.
    """
    import sentencepiece as spm

    sentences = _sample(_lines(inputs), max_sentences, seed)
    if not sentences:
        raise ValueError("no text to train the tokenizer on (all inputs are empty)")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            character_coverage=character_coverage,
            byte_fallback=True,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            remove_extra_whitespaces=False,
            normalization_rule_name="identity",
            max_sentence_length=4 * _MAX_LINE,  # in bytes; a character is at most 4
            unk_id=0, bos_id=1, eos_id=2, pad_id=3,
            unk_piece=UNK, bos_piece=BOS, eos_piece=EOS, pad_piece=PAD,
            user_defined_symbols=list(CHAT_TOKENS),
            num_threads=1,  # one thread keeps piece order independent of scheduling
            minloglevel=2,
        )
    except RuntimeError as exc:  # e.g. "Vocabulary size too high (N). Please set it to a value <= M."
        raise ValueError(f"tokenizer training failed: {exc}") from exc

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(model.getvalue())
    _write_json(out / "tokenizer_config.json", tokenizer_config(chat_template, model_max_length))
    _write_json(out / "special_tokens_map.json", special_tokens_map())
    return out


def train_tiny_tokenizer(out_dir: str | Path, vocab_size: int = 512) -> Path:
    """A small tokenizer trained on the bundled `engine/assets/tiny_corpus.txt` (for tiny test models)."""
    return train_tokenizer([TINY_CORPUS], out_dir, vocab_size, character_coverage=1.0)


def tokenizer_config(chat_template: str, model_max_length: int) -> dict:
    """tokenizer_config.json for a tokenizer trained here (ids fixed by `train_tokenizer`)."""
    specials = [UNK, BOS, EOS, PAD, IM_START, IM_END]
    return {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        "clean_up_tokenization_spaces": False,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "pad_token": PAD,
        "additional_special_tokens": list(CHAT_TOKENS),
        "added_tokens_decoder": {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
            for i, t in enumerate(specials)
        },
        "model_max_length": model_max_length,
        "chat_template": chat_template,
    }


def special_tokens_map() -> dict:
    """special_tokens_map.json, which older transformers releases read."""
    return {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD, "additional_special_tokens": list(CHAT_TOKENS)}


def _lines(inputs: Iterable[str | Path]) -> Iterator[str]:
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    for item in inputs:
        if isinstance(item, Path):
            opener = gzip.open if item.suffix == ".gz" else open
            with opener(item, "rt", encoding="utf-8", errors="replace") as f:
                yield from _nonempty(line.rstrip("\r\n") for line in f)
        else:
            yield from _nonempty(str(item).splitlines())


def _nonempty(lines: Iterable[str]) -> Iterator[str]:
    for line in lines:
        if line.strip():
            yield from _chunks(line)


def _chunks(line: str, limit: int = _MAX_LINE) -> Iterator[str]:
    # SentencePiece silently skips over-long sentences; cut them at spaces instead.
    while len(line) > limit:
        cut = line.rfind(" ", 0, limit)
        cut = cut if cut > 0 else limit
        yield line[:cut]
        line = line[cut:]
    yield line


def _sample(lines: Iterator[str], limit: int | None, seed: int) -> list[str]:
    if limit is None:
        return list(lines)
    if limit <= 0:
        raise ValueError("max_sentences must be positive")
    # Reservoir sampling: one pass, `limit` lines in memory, the same sample for the same seed.
    rng = random.Random(seed)
    sample: list[str] = []
    for n, line in enumerate(lines):
        if n < limit:
            sample.append(line)
        else:
            j = rng.randrange(n + 1)
            if j < limit:
                sample[j] = line
    return sample


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
