"""Training FLOPs per token and model FLOPs utilisation (MFU).

Convention (PaLM appendix B, as nanoGPT and torchtitan use it): a token costs 6 FLOPs per weight of
every matrix multiply (2 forward, 4 backward) plus 12 * layers * query width * sequence length for the
attention scores and their weighted sum, counted as if the mask were not causal. Embedding lookups are
free; a tied output head is a matmul and counts. Recomputation (gradient checkpointing) is not counted,
so MFU measures useful work.
"""
from __future__ import annotations

import torch

from engine.config import ModelConfig

# Dense bf16/fp16 tensor-core peaks per device from the vendors' datasheets (no sparsity), in TFLOP/s.
PEAK_TFLOPS = {
    "H200": 989.5, "H100": 989.5, "H800": 989.5, "GH200": 989.5,
    "A100": 312.0, "A800": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0, "4090": 165.2,
}


def matmul_params(config: ModelConfig) -> int:
    """Weights that take part in a matrix multiply for every token (MoE: the active experts only)."""
    d, v = config.hidden_size, config.vocab_size
    total = config.num_parameters() - v * d  # drop the embedding table (a lookup) ...
    if config.tie_word_embeddings:
        total += v * d  # ... but a tied head still multiplies
    if config.num_local_experts:
        expert = 3 * d * config.intermediate_size
        total -= config.num_hidden_layers * expert * (config.num_local_experts - config.num_experts_per_tok)
    return total


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token at this sequence length."""
    attn = 12 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq_len
    return 6.0 * matmul_params(config) + attn


def peak_tflops(device: torch.device) -> float | None:
    """The datasheet bf16 peak of a CUDA device, or None when unknown (CPU, unlisted GPUs)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


def mfu(tokens_per_second: float, config: ModelConfig, seq_len: int, peak: float | None,
        num_devices: int = 1) -> float | None:
    """Achieved FLOP rate over the peak of all devices, in [0, 1]; None when the peak is unknown."""
    if not peak:
        return None
    return tokens_per_second * flops_per_token(config, seq_len) / (peak * 1e12 * num_devices)
