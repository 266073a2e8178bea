"""Token-level perplexity of a checkpoint on a text file, with a strided sliding window.

The file is encoded as one token stream (BOS first). Windows of `seq_len` tokens start every `stride`
tokens; each window scores only the tokens that the previous window did not, so every token after the
first is predicted exactly once, with at least `seq_len - stride` tokens of context (except at the
start). stride == seq_len gives disjoint chunks (fast, less context); a smaller stride is closer to
the model's true perplexity. Bits per byte (per UTF-8 byte of the text) are reported as well, since
they compare across tokenizers.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

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


def windows(n_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, scored) for each window: tokens [begin, end) are fed, the last `scored` are scored."""
    if not 0 < stride <= seq_len:
        raise ValueError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
    out, scored_until = [], 1  # token 0 has no prediction
    begin = 0
    while scored_until < n_tokens:
        end = min(begin + seq_len, n_tokens)
        out.append((begin, end, end - scored_until))
        scored_until = end
        begin += stride
    return out


@torch.no_grad()
def stream_nll(model: Transformer, ids: Sequence[int], seq_len: int, stride: int, batch_size: int = 8) -> tuple[float, int]:
    """(summed NLL in nats, tokens scored) of a token stream under `model`, windows batched by length."""
    device = next(model.parameters()).device
    stream = torch.tensor(list(ids), dtype=torch.long)
    plan = windows(len(stream), seq_len, stride)
    nll, count = 0.0, 0
    i = 0
    while i < len(plan):
        length = plan[i][1] - plan[i][0]
        group = [plan[i]]
        while len(group) < batch_size and i + len(group) < len(plan) and \
                plan[i + len(group)][1] - plan[i + len(group)][0] == length:
            group.append(plan[i + len(group)])
        i += len(group)
        x = torch.stack([stream[b:e] for b, e, _ in group]).to(device)  # [B, L]
        logits = model(x).float()  # [B, L, V]
        # Position t predicts token t+1; score the last `scored` targets of each window.
        logp = F.log_softmax(logits[:, :-1], dim=-1)
        target = x[:, 1:]
        tok_lp = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # [B, L-1]
        for row, (_, _, scored) in enumerate(group):
            nll -= float(tok_lp[row, tok_lp.shape[1] - scored:].double().sum())
            count += scored
    return nll, count


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
