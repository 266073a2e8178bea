"""Seeded tiny random-weight checkpoints with a working tokenizer, for tests and demos."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from engine.checkpoint import save_model
from engine.config import ModelConfig
from engine.model import Transformer
from engine.tokenizer import Tokenizer

ARCHES = ("llama", "mistral", "qwen2")


def make_tiny_checkpoint(out_dir: str | os.PathLike, arch: str = "llama", seed: int = 0,
                         vocab_size: int = 512, hidden_size: int = 64, num_layers: int = 2,
                         max_position_embeddings: int = 2048) -> Path:
    """Write a small random checkpoint (HF layout) plus a SentencePiece tokenizer trained on a bundled text."""
    if arch not in ARCHES:
        raise ValueError(f"--arch must be one of {', '.join(ARCHES)}, got {arch!r}")
    from training.tokenizer_train import train_tiny_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        train_tiny_tokenizer(tmp, vocab_size=vocab_size)
        tok = Tokenizer.from_dir(tmp)
        # Chat replies end with <|im_end|>; listing it as an EOS id makes generation stop there too.
        eos = [tok.eos_id] + [i for i in [tok.token_to_id("<|im_end|>")] if i is not None and i != tok.eos_id]
        config = ModelConfig(
            model_type=arch, vocab_size=tok.vocab_size, hidden_size=hidden_size,
            intermediate_size=hidden_size * 2 + hidden_size // 2, num_hidden_layers=num_layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_position_embeddings,
            rms_norm_eps=1e-5, tie_word_embeddings=(arch == "qwen2"), bos_token_id=tok.bos_id,
            eos_token_id=eos if len(eos) > 1 else eos[0], pad_token_id=tok.pad_id, torch_dtype="float32",
        )
        torch.manual_seed(seed)
        model = Transformer(config)
        model.init_weights(seed)
        save_model(model, config, out, tokenizer_dir=tmp)
    return out
