"""Token-level perplexity of a checkpoint on a text file, with a strided sliding window.

The file is encoded as one token stream (BOS first). Windows of `seq_len` tokens start every `stride`
tokens; each window scores only the tokens that the previous window did not, so every token after the
first is predicted exactly once, with at least `seq_len - stride` tokens of context (except at the
start). stride == seq_len - 1 gives back-to-back windows (fast, least context); a smaller stride is
closer to the model's true perplexity. Bits per byte (per UTF-8 byte of the text) are reported as
well, since they compare across tokenizers. The windows and their scoring are those of
training.eval.perplexity, the one implementation of windowed perplexity.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from engine.model import Transformer


@dataclass
class PerplexityResult:
    """Summed negative log-likelihood (nats) over `tokens` predicted tokens, and derived figures."""

    nll: float
    tokens: int
    bytes: int
    seq_len: int
    stride: int

    @property
    def loss(self) -> float:
        return self.nll / max(self.tokens, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / max(self.bytes, 1)

    def to_dict(self) -> dict:
        return {**asdict(self), "loss": self.loss, "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte}


def stream_nll(model: Transformer, ids: Sequence[int], seq_len: int, stride: int, batch_size: int = 8) -> tuple[float, int]:
    """(summed NLL in nats, tokens scored) of a token stream under `model`, in windows of `seq_len`.

    The last window keeps its stride position (training.eval.perplexity.windows with fill_last=False).
    """
    from training.eval.local import LocalModel
    from training.eval.perplexity import score_windows, windows

    plan = windows(len(ids), seq_len, stride, fill_last=False)
    scores = score_windows(ids, plan, LocalModel(model, None, "", batch_size))
    return -sum(s.logprob for s in scores), sum(s.num_tokens for s in scores)


def eval_perplexity(model_dir: str | Path, text_file: str | Path, *, seq_len: int | None = None,
                    stride: int | None = None, batch_size: int = 8, device: str = "auto",
                    dtype: str | None = None) -> PerplexityResult:
    """Perplexity of the checkpoint in `model_dir` on `text_file`.

    seq_len defaults to the model's max_position_embeddings (capped at 2048); stride to seq_len // 2.
    """
    from engine.checkpoint import load_model
    from engine.tokenizer import Tokenizer

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, config = load_model(model_dir, dtype=dtype or ("float32" if device == "cpu" else None), device=device)
    tokenizer = Tokenizer.from_dir(model_dir)
    text = Path(text_file).read_text(encoding="utf-8")
    if not text:
        raise ValueError(f"{text_file}: empty file")
    ids = tokenizer.encode(text, add_bos=True)
    seq_len = seq_len or min(config.max_position_embeddings, 2048)
    if seq_len > config.max_position_embeddings:
        raise ValueError(f"seq_len {seq_len} exceeds the model's max_position_embeddings {config.max_position_embeddings}")
    stride = stride or max(1, seq_len // 2)
    nll, count = stream_nll(model, ids, seq_len, stride, batch_size)
    return PerplexityResult(nll=nll, tokens=count, bytes=len(text.encode("utf-8")), seq_len=seq_len, stride=stride)
