"""QLoRA's frozen base: the decoder's linear layers stored as 4-bit NF4 blocks (bitsandbytes Linear4bit).

Following Dettmers et al. (2023): weights in 64-value blocks of NormalFloat4, the per-block scales
themselves quantized to 8 bits (double quantization), matmuls in bf16 ("compute dtype"). Embeddings,
norms and the output head stay in the compute dtype, as in the paper's recipe. LoRA adapters are then
injected on top with `engine.lora.inject_adapters` and are the only trainable parameters.
bitsandbytes runs on the CPU too (slowly), so the same path is tested without a GPU.
"""
from __future__ import annotations

import torch
from torch import nn

from engine.checkpoint import parse_dtype
from training.finetune_config import QloraSection


def _skip(path: str) -> bool:
    return path == "lm_head" or path.endswith(".gate") and ".block_sparse_moe" in path  # keep head and routers


def quantize_base(model: nn.Module, cfg: QloraSection, device: torch.device | str = "cpu") -> list[str]:
    """Replace every nn.Linear of the decoder by a frozen bitsandbytes Linear4bit on `device` (in place).

    Everything else is cast to the compute dtype and moved to `device`. Returns the quantized paths.
    """
    import bitsandbytes as bnb  # heavy import; only QLoRA needs it

    compute = parse_dtype(cfg.compute_dtype)
    device = torch.device(device)
    done = []
    for path, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or isinstance(module, bnb.nn.Linear4bit) or _skip(path):
            continue
        q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                              compute_dtype=compute, compress_statistics=cfg.double_quant,
                              quant_type=cfg.quant_type, device="meta")
        q.weight = bnb.nn.Params4bit(module.weight.data.detach().to(torch.float32), requires_grad=False,
                                     compress_statistics=cfg.double_quant, quant_type=cfg.quant_type,
                                     blocksize=cfg.blocksize)
        if module.bias is not None:
            q.bias = nn.Parameter(module.bias.data.detach().to(compute), requires_grad=False)
        q = q.to(device)  # moving a Params4bit to a device is what quantizes it
        # bitsandbytes' CPU inference path repacks the weight in place into another layout (and fails for
        # widths that are not a multiple of the block); keep one layout so dequantizing stays valid.
        q.support_avx512bf16_for_cpu = False
        parent_path, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, leaf, q)
        done.append(path)
    # The remaining float tensors (embeddings, norms, head, rope buffer) in the compute dtype.
    for name, param in list(model.named_parameters()):
        if param.is_floating_point():
            param.data = param.data.to(device=device, dtype=compute)
    model.inv_freq = model.inv_freq.to(device)
    return done


def quantized_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (4-bit weights count as their packed bytes)."""
    tensors = list(model.parameters()) + list(model.buffers())
    seen, total = set(), 0
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total
