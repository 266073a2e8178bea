"""In-process scoring: a checkpoint (plus an optional adapter) loaded here, scored by direct forwards.

Continuations that share a context (the choices of one question) are scored together: the context
runs once through the model with `SharedPrefixAttention` recording its keys and values, then all
continuations run as one batch attending to them. Requests with a context of their own (perplexity
windows) are batched as whole sequences. Only the positions that are scored go through the LM head.
Generation goes through the serving engine (continuous batching, greedy).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from training.eval.items import ContinuationScore, ScoreRequest
from training.eval.prefix_attention import SharedPrefixAttention

Progress = Callable[[int], Any] | None


def _chunks(seq: Sequence, size: int):
    for i in range(0, len(seq), size):
        yield seq[i:i + size]


class LocalModel:
    """A loaded model and its tokenizer, scored in this process. `name` labels the results."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, name: str, batch_size: int = 32):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        # One position is left free, as a server must leave room for a generated token: both
        # backends then cut over-long requests identically.
        self.max_length = int(model.config.max_position_embeddings) - 1
        self.adapter: str | None = None  # the adapter directory, when one is applied
        self._llm: Any = None

    @classmethod
    def load(cls, model_dir: str | Path, adapter_dir: str | Path | None = None, device: str = "auto",
             dtype: str | None = None, batch_size: int = 32) -> "LocalModel":
        """Load a checkpoint (fp32 on CPU by default, its own dtype on GPU) and inject an adapter if given."""
        from engine.adapter_io import load_adapter
        from engine.checkpoint import load_model
        from engine.tokenizer import Tokenizer

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype is None and device == "cpu":
            dtype = "float32"
        model, _ = load_model(model_dir, dtype=dtype, device=device)
        name = Path(model_dir).resolve().name
        if adapter_dir is not None:
            load_adapter(model, adapter_dir)
            model.to(device)
            name += f"+{Path(adapter_dir).resolve().name}"
        lm = cls(model, Tokenizer.from_dir(model_dir), name, batch_size)
        lm.adapter = str(adapter_dir) if adapter_dir is not None else None
        return lm

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with BOS if the checkpoint's tokenizer adds one."""
        return self.tokenizer.encode(text)

    @property
    def settings(self) -> dict[str, Any]:
        """What the results depend on besides the task: where and in which precision it ran."""
        out = {"device": str(self.device), "dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
               "batch_size": self.batch_size}
        return {**out, "adapter": self.adapter} if self.adapter else out

    # -- log-likelihoods ---------------------------------------------------------------------------
    @torch.inference_mode()
    def loglikelihoods(self, requests: Sequence[ScoreRequest], progress: Progress = None) -> list[ContinuationScore]:
        """Score every request; results in input order."""
        results: list[ContinuationScore | None] = [None] * len(requests)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(req.context, []).append(i)
        singles = []
        for context, idxs in groups.items():
            if len(idxs) == 1:
                singles.append(idxs[0])
                continue
            scores = self._score_shared(context, [requests[i].continuation for i in idxs])
            for i, score in zip(idxs, scores):
                results[i] = score
            if progress:
                progress(len(idxs))
        # Longest first, so rows of one batch have similar lengths (little padding).
        singles.sort(key=lambda i: -(len(requests[i].context) + len(requests[i].continuation)))
        for chunk in _chunks(singles, self.batch_size):
            rows = [requests[i].context + requests[i].continuation for i in chunk]
            starts = [len(requests[i].context) for i in chunk]
            for i, score in zip(chunk, self._score_rows(rows, starts, 0, None)):
                results[i] = score
            if progress:
                progress(len(chunk))
        return results  # type: ignore[return-value]

    def _score_shared(self, context: tuple[int, ...], continuations: list[tuple[int, ...]]) -> list[ContinuationScore]:
        """Run context[:-1] once, then each row = (last context token, *continuation) against its cache."""
        cache = SharedPrefixAttention()
        prefix = context[:-1]
        if prefix:
            ids = torch.tensor([prefix], dtype=torch.long, device=self.device)
            self.model.hidden_states(ids, attn=cache)
        cache.freeze()
        out: list[ContinuationScore] = []
        for chunk in _chunks(continuations, self.batch_size):
            rows = [context[-1:] + cont for cont in chunk]
            out += self._score_rows(rows, [1] * len(rows), len(prefix), cache)
        return out

    def _score_rows(self, rows: list[tuple[int, ...]], starts: list[int], first_pos: int,
                    attn: SharedPrefixAttention | None) -> list[ContinuationScore]:
        """Tokens rows[i][starts[i]:] scored given everything before them (rows right-padded)."""
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row)
        ids = ids.to(self.device)
        positions = (first_pos + torch.arange(width, device=self.device)).expand(len(rows), width)
        hidden = self.model.hidden_states(ids, positions, attn)  # [B,T,d]
        # Position t predicts token t+1: gather only the rows that predict scored tokens.
        b_idx = [i for i, (row, s) in enumerate(zip(rows, starts)) for _ in range(s, len(row))]
        t_idx = [t for row, s in zip(rows, starts) for t in range(s, len(row))]
        b = torch.tensor(b_idx, device=self.device)
        t = torch.tensor(t_idx, device=self.device)
        logp = torch.log_softmax(self.model.compute_logits(hidden[b, t - 1]).float(), dim=-1)  # [N,V]
        targets = ids[b, t]
        token_lp = logp.gather(-1, targets[:, None]).squeeze(-1).double().cpu()
        greedy = (logp.argmax(-1) == targets).cpu()
        out, k = [], 0
        for row, s in zip(rows, starts):
            n = len(row) - s
            out.append(ContinuationScore(float(token_lp[k:k + n].sum()), bool(greedy[k:k + n].all()), n))
            k += n
        return out

    # -- generation --------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], max_tokens: int, stop: Sequence[str],
                 progress: Progress = None) -> list[str]:
        """Greedy completions of token-id prompts through the serving engine, cut at the stop strings."""
        from engine.sampling import SamplingParams

        llm = self._engine()
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, stop=list(stop))
        texts: list[str] = []
        for chunk in _chunks(list(prompts), 64):
            texts += [out.outputs[0].text for out in llm.generate([list(p) for p in chunk], params)]
            if progress:
                progress(len(chunk))
        return texts

    def _engine(self) -> Any:
        if self._llm is None:
            from engine.config import EngineConfig
            from engine.engine import Engine
            from engine.llm import LLM

            config = EngineConfig(device=str(self.device), max_model_len=self.max_length + 1)
            self._llm = LLM(engine=Engine(config, model=self.model, tokenizer=self.tokenizer))
        return self._llm
