"""Residual dropout as a transform on a built model (the model file has no dropout of its own).

Small data sets are memorised quickly by even small models; dropping random elements of each attention
and feed-forward branch output, and of the token embeddings, while training is the classic remedy
(GPT-2 and nanoGPT use it on the same three places). Forward hooks do it, active only in training mode,
so the exported model and inference are untouched. With gradient checkpointing, torch's checkpoint
restores the RNG state for the recomputation, so the recomputed masks match.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle


def add_dropout(model: nn.Module, p: float) -> list[RemovableHandle]:
    """Drop a fraction `p` of the embeddings and of every attention / feed-forward branch output.

    Returns the hook handles (call `.remove()` on them to take dropout off again).
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {p}")
    if p == 0.0:
        return []

    def hook(module: nn.Module, _inputs, output):
        return F.dropout(output, p, training=module.training)

    stack = model.model
    targets = [stack.embed_tokens]
    for layer in stack.layers:
        targets.append(layer.self_attn)
        targets.append(layer.block_sparse_moe if hasattr(layer, "block_sparse_moe") else layer.mlp)
    return [m.register_forward_hook(hook) for m in targets]
