"""A tiny checkpoint for engine tests: 2 layers, hidden 64, a 512-token SentencePiece vocabulary.

The weights are scaled up from the default init so logits are peaked: greedy argmax then has no
near-ties, and token-for-token comparisons between differently batched computations are stable.
"""
from __future__ import annotations

from pathlib import Path

import torch

from engine.checkpoint import load_model, save_model
from engine.config import EngineConfig
from engine.engine import Engine


def build_tiny_checkpoint(out: Path, seed: int = 0) -> Path:
    from training.tiny import make_tiny_checkpoint

    make_tiny_checkpoint(out, seed=seed)
    model, config = load_model(out)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    save_model(model, config, out, tokenizer_dir=out)
    return out


def make_engine(model_dir: Path, **kw) -> Engine:
    kw.setdefault("max_model_len", 512)
    kw.setdefault("device", "cpu")
    return Engine(EngineConfig(model=str(model_dir), **kw))


def run_to_completion(engine: Engine) -> dict:
    """Step until idle; returns request id -> cumulative RequestOutput."""
    from engine.outputs import RequestOutputAccumulator

    acc: dict = {}
    while engine.has_unfinished():
        for out in engine.step():
            acc.setdefault(out.request_id, RequestOutputAccumulator()).add(out)
    return {rid: a.result for rid, a in acc.items()}
