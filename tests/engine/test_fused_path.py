"""The runner's kernel path (fused model, RoPE fused into the KV write, Triton attention) against the torch path.

On the CPU the Triton kernels run under TRITON_INTERPRET=1; the dispatchers are pointed at them
for CPU tensors, which is what they pick on their own for CUDA tensors.
"""
import copy
import random

import pytest
import torch

from engine.config import EngineConfig, ModelConfig
from engine.engine import Engine
from engine.fusion import FusedAttention, FusedDecoderLayer, FusedMLP, fuse_model
from engine.kernels import _dispatch, activation, kv_write, paged_attention, quant_matmul, rmsnorm, rope
from engine.kernels.testing import require_backend
from engine.model import Transformer
from engine.norm_folding import FoldedDecoderLayer, fold_norm_weights
from engine.quant import quantize_model
from engine.sampling import SamplingParams


def peaked_model(seed=0, layers=2):
    """A tiny random model whose weights are scaled up, so greedy argmax has no near-ties."""
    cfg = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = Transformer(cfg)
    model.init_weights(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    return model.eval()


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_fused_model_computes_the_same_logits(bits):
    model = peaked_model(1)
    if bits:
        quantize_model(model, bits, group_size=32)
    fused = fuse_model(copy.deepcopy(model))
    layer = fused.model.layers[0]
    assert isinstance(layer, FusedDecoderLayer)
    assert isinstance(layer.self_attn, FusedAttention) and isinstance(layer.mlp, FusedMLP)
    assert fuse_model(fused) is fused and fused.model.layers[0] is layer  # idempotent
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, 128, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(fused(ids), model(ids), rtol=1e-5, atol=1e-5)


def _engine(model, **kw):
    cfg = EngineConfig(device="cpu", max_model_len=128, kv_cache_tokens=64 * 16, block_size=16,
                       max_num_batched_tokens=kw.pop("max_num_batched_tokens", 24), max_num_seqs=8, **kw)
    return Engine(cfg, model=model, tokenizer=None)


def _greedy_tokens(engine, prompts, max_tokens):
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    got: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.outputs[0].token_ids)
    return [got[f"r{i}"] for i in range(len(prompts))]


def _force_triton(monkeypatch):
    for module in (_dispatch, activation, kv_write, paged_attention, quant_matmul, rmsnorm, rope):
        monkeypatch.setattr(module, "use_triton", lambda *tensors: True)


@pytest.mark.parametrize("fold", ["1", "0"])
def test_kernel_path_gives_the_torch_path_tokens(monkeypatch, fold):
    require_backend("cpu")
    model = peaked_model(2)
    rng = random.Random(5)
    # Prompts longer than the 24-token step budget: chunked prefill mixed with decodes of the others.
    prompts = [[rng.randrange(3, 128) for _ in range(n)] for n in (5, 37, 18)]
    want = _greedy_tokens(_engine(copy.deepcopy(model)), prompts, 6)
    _force_triton(monkeypatch)
    monkeypatch.setenv("EMBER_FOLD_NORMS", fold)  # norms folded into the projections (the default), or kernels
    fast = _engine(model)
    assert fast.runner.use_kernels and fast.runner.graphs is None  # graphs need CUDA
    assert fast.runner.norms_folded == (fold == "1")
    assert isinstance(fast.model.model.layers[0], FoldedDecoderLayer if fold == "1" else FusedDecoderLayer)
    assert _greedy_tokens(fast, prompts, 6) == want


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_kernel_path_with_folded_norms_gives_the_torch_path_tokens(monkeypatch, bits):
    """Norms folded before quantizing (as `ember quantize` does): the runner folds the quantized
    layers (RMS scale in the RoPE and SwiGLU kernels, residual adds in the int8/int4 kernels'
    epilogue, under the interpreter) and decodes the torch path's greedy tokens."""
    require_backend("cpu")
    model = fold_norm_weights(peaked_model(3))
    quantize_model(model, bits, group_size=32)
    rng = random.Random(6)
    prompts = [[rng.randrange(3, 128) for _ in range(n)] for n in (5, 30)]
    want = _greedy_tokens(_engine(copy.deepcopy(model)), prompts, 5)
    _force_triton(monkeypatch)
    fast = _engine(model)
    assert fast.runner.use_kernels and fast.runner.norms_folded
    assert isinstance(fast.model.model.layers[0], FoldedDecoderLayer)
    assert _greedy_tokens(fast, prompts, 5) == want
