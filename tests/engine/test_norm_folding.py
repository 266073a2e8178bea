"""RMSNorm folding (engine/norm_folding.py): the folded model computes the unfused model's function."""
import copy

import pytest
import torch

from engine.config import ModelConfig
from engine.kernels.testing import assert_close_rel
from engine.model import Transformer
from engine.norm_folding import FoldedDecoderLayer, can_fold, fold_norm_weights, fold_norms
from engine.quant import quantize_model


def _model(seed, **overrides):
    cfg = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128)
    model = Transformer(ModelConfig(**{**cfg, **overrides}))
    model.init_weights(seed)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # norms that are not all ones, and a residual stream of growing scale
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 2:
                p.mul_(6.0)
    return model.eval()


def test_folded_model_computes_the_same_logits():
    model = _model(1)
    folded = fold_norms(copy.deepcopy(model))
    assert all(isinstance(layer, FoldedDecoderLayer) for layer in folded.model.layers)
    assert fold_norms(folded) is folded  # idempotent
    ids = torch.randint(0, 96, (3, 21))
    with torch.no_grad():
        want, got = model(ids), folded(ids)
    assert_close_rel(got, want, 1e-4)
    assert not torch.equal(got, want)  # really another computation, not the same modules


def test_folded_bf16_logits_within_bf16_tolerance():
    model = _model(2).to(torch.bfloat16)
    folded = fold_norms(copy.deepcopy(model))
    ids = torch.randint(0, 96, (2, 17))
    with torch.no_grad():
        ref = _model(2)(ids)  # fp32: both bf16 models are judged against it
        base, got = model(ids).float(), folded(ids).float()
    err_base = (base - ref).abs().max() / ref.abs().max()
    err_folded = (got - ref).abs().max() / ref.abs().max()
    assert err_folded < 3e-2
    assert err_folded < 3 * err_base + 1e-3  # folding rounds elsewhere, not more


def test_fold_applies_only_to_dense_bias_free_linear_layers():
    assert can_fold(_model(3))
    assert not can_fold(_model(3, attention_bias=True))
    assert not can_fold(_model(3, num_local_experts=2, num_experts_per_tok=1))
    quantized = _model(3)
    quantize_model(quantized, 8)
    assert not can_fold(quantized)  # its norms weigh other than 1: nothing can absorb them
    with pytest.raises(ValueError, match="dense, bias-free"):
        fold_norms(quantized)
    with pytest.raises(ValueError, match="not yet quantized"):
        fold_norm_weights(quantized)
    with pytest.raises(ValueError, match="dense"):
        fold_norm_weights(_model(3, num_local_experts=2, num_experts_per_tok=1))


def test_norm_weights_folded_before_quantizing_keep_the_function():
    model = _model(4)
    moved = fold_norm_weights(copy.deepcopy(model))
    assert all((layer.input_layernorm.weight == 1).all() and (layer.post_attention_layernorm.weight == 1).all()
               for layer in moved.model.layers)
    ids = torch.randint(0, 96, (2, 19))
    with torch.no_grad():
        assert_close_rel(moved(ids), model(ids), 1e-5)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_layers_fold_behind_unit_norms(bits):
    """Quantized after fold_norm_weights: served folded (no norm kernels, residual adds in the
    matmul epilogue), the logits are the unfolded quantized model's."""
    model = fold_norm_weights(_model(5, hidden_size=128, intermediate_size=256))
    quantize_model(model, bits, group_size=64)
    assert can_fold(model)
    folded = fold_norms(copy.deepcopy(model))
    assert all(isinstance(layer, FoldedDecoderLayer) for layer in folded.model.layers)
    ids = torch.randint(0, 96, (2, 23))
    with torch.no_grad():
        want, got = model(ids), folded(ids)
    assert_close_rel(got, want, 1e-4)
    assert not torch.equal(got, want)
    with torch.no_grad():  # one norm that is not all ones any more: that layer cannot fold
        model.model.layers[1].post_attention_layernorm.weight[3] = 1.5
    assert not can_fold(model)
