"""Random-weight models of public Llama shapes for GPU benchmarks (no checkpoint, no download).

`random_model("1b")` builds Ember's Transformer on the meta device and materialises it straight on
the GPU in the target dtype (seconds even for 8B: nothing is initialised on the CPU);
`hf_twin(model, shape)` builds Hugging Face's LlamaForCausalLM holding the same weights.
"""
from __future__ import annotations

import contextlib

import torch

from engine.config import ModelConfig
from engine.model import Transformer, rope_inv_freq

_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

SHAPES: dict[str, dict] = {
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
               rope_theta=500000.0, rope_scaling={**_LLAMA3_ROPE, "factor": 32.0}),
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
               rope_theta=500000.0, rope_scaling={**_LLAMA3_ROPE, "factor": 8.0}),
    # For plumbing checks on the CPU (--smoke): the same code paths in seconds.
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
                 rope_theta=500000.0, rope_scaling={**_LLAMA3_ROPE, "factor": 32.0}),
}
NAMES = {"1b": "Llama-3.2-1B shape", "8b": "Llama-3.1-8B shape", "tiny": "tiny (smoke test)"}
COMMON = dict(max_position_embeddings=131072, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)


def shape_config(shape: str) -> ModelConfig:
    """Ember's ModelConfig of a named shape ("1b" or "8b")."""
    return ModelConfig(**COMMON, **SHAPES[shape])


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@torch.no_grad()
def random_model(shape: str, dtype: torch.dtype = torch.bfloat16, device: str = "cuda", seed: int = 0) -> Transformer:
    """Ember model of `shape` with N(0, 0.02) matrices and unit norms, built directly on `device`."""
    config = shape_config(shape)
    with _default_dtype(dtype), torch.device("meta"):
        model = Transformer(config)
    model.to_empty(device=device)
    if config.tie_word_embeddings:  # to_empty may hand the two names separate storage
        model.lm_head.weight = model.model.embed_tokens.weight
    gen = torch.Generator(device=device).manual_seed(seed)
    for p in model.parameters():
        if p.dim() == 2:
            p.normal_(0.0, config.initializer_range, generator=gen)
        else:
            p.fill_(1.0)
    model.inv_freq = rope_inv_freq(config).to(device)
    return model.eval()


@torch.no_grad()
def hf_twin(model: Transformer, shape: str):
    """transformers' LlamaForCausalLM with a copy of `model`'s weights (same dtype and device)."""
    import transformers

    p = next(model.parameters())
    cfg = transformers.LlamaConfig(**COMMON, **SHAPES[shape])
    with _default_dtype(p.dtype), torch.device(p.device):
        hf = transformers.LlamaForCausalLM(cfg)
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any("rotary" not in m for m in missing):
        raise RuntimeError(f"weights do not line up: missing {missing}, unexpected {unexpected}")
    hf.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    hf.generation_config.pad_token_id = 0
    return hf.eval()


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step reads of the weights: every tensor once, the input embedding table excepted
    (a step reads one row of it) unless it is also the output head."""
    seen, total = set(), 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.data_ptr() in seen or name == "inv_freq":
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    emb = model.model.embed_tokens.weight
    head = model.lm_head
    if not (isinstance(head, torch.nn.Linear) and emb.data_ptr() == head.weight.data_ptr()):  # not tied
        total -= emb.numel() * emb.element_size()
    return total


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    """KV-cache bytes of one token over all layers (keys and values)."""
    size = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * size
