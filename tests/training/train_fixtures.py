"""Helpers for the training tests: byte-level token shards of the bundled corpus and a tiny config."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.config import ModelConfig
from training.config import TrainConfig
from training.data.shard_writer import ShardWriter, write_manifest
from training.data.token_shards import FORMAT, VERSION

CORPUS = Path(__file__).resolve().parents[2] / "engine" / "assets" / "tiny_corpus.txt"
BOS, EOS, VOCAB = 256, 257, 258


def corpus_documents() -> list[str]:
    """The bundled corpus cut at blank lines."""
    return [d.strip() for d in CORPUS.read_text(encoding="utf-8").split("\n\n") if d.strip()]


def write_byte_shards(out_dir: Path, val_docs: int = 2) -> Path:
    """Token shards in the prepare-data layout: UTF-8 bytes as ids, BOS 256, EOS 257; the last docs are val."""
    out_dir.mkdir(parents=True, exist_ok=True)
    docs = corpus_documents()
    splits = {"train": docs[:-val_docs], "val": docs[-val_docs:]}
    entries = {}
    for split, texts in splits.items():
        writer = ShardWriter(out_dir, split, np.dtype(np.uint16), shard_tokens=2000)  # several shards
        for text in texts:
            writer.add(np.array([BOS, *text.encode("utf-8"), EOS], dtype=np.uint16))
        entries[split] = writer.close()
    write_manifest(out_dir, {"format": FORMAT, "version": VERSION, "dtype": "uint16", "vocab_size": VOCAB,
                             "bos_id": BOS, "eos_id": EOS, "splits": entries})
    return out_dir


def tiny_config(data_dir: Path, out_dir: Path, **sections) -> TrainConfig:
    """A 2-layer, 64-wide model on the byte shards: deterministic fp32 CPU training, no logging extras."""
    model = ModelConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        bos_token_id=BOS, eos_token_id=EOS)
    raw = {
        "name": "tiny", "seed": 7, "out_dir": str(out_dir),
        "data": {"train": str(data_dir), "seq_len": 32, "micro_batch_size": 4},
        "optim": {"lr": 3e-3, "weight_decay": 0.1},
        "schedule": {"warmup_steps": 4, "decay": "cosine", "min_lr_ratio": 0.1},
        "train": {"max_steps": 30, "grad_accum_steps": 2, "precision": "fp32", "device": "cpu",
                  "deterministic": True},
        "eval": {"every": 0, "batches": 4, "prompts": []},
        "checkpoint": {"every": 0, "keep_last": 2, "export_dtype": "float32"},
        "log": {"every": 5, "tensorboard": False, "progress": False},
    }
    for key, values in sections.items():
        raw.setdefault(key, {}).update(values)
    return TrainConfig(model=model, **{k: v for k, v in _sections(raw).items()})


def _sections(raw: dict) -> dict:
    from training.config import SECTIONS, _build

    return {k: (_build(SECTIONS[k], v, k) if k in SECTIONS else v) for k, v in raw.items()}
