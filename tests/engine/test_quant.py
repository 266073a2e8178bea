"""Weight-only quantization as a model transform: QuantLinear, quantize_model, apply_quantization,
offline checkpoint conversion and `ember quantize`."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig
from engine.kernels.quant_matmul import dequantize_int4, dequantize_int8
from engine.quant import QuantLinear, apply_quantization, quantize_checkpoint, quantize_model


def _stack(bias=True):
    torch.manual_seed(torch.seed() % 2**31)
    return nn.Sequential(nn.Linear(64, 128, bias=bias), nn.SiLU(), nn.Linear(128, 64, bias=bias),
                         nn.Linear(64, 96))


@pytest.mark.parametrize("bits,group", [(8, None), (4, 32), (4, 64)])
def test_quant_linear_equals_dequantized_matmul(bits, group):
    lin = nn.Linear(128, 48)
    ql = QuantLinear.from_linear(lin, bits, group)
    x = torch.randn(5, 128)
    deq = dequantize_int8(ql.qweight, ql.scales) if bits == 8 else dequantize_int4(ql.qweight, ql.scales)
    torch.testing.assert_close(ql(x), F.linear(x, deq, lin.bias.detach()), rtol=1e-5, atol=1e-5)
    # Quantization error of the output is bounded by the weight error (half a step a weight).
    err = (ql(x) - lin(x)).abs().max()
    assert 0 < err < 0.1 * lin(x).abs().max()


def test_quantize_model_keeps_names_and_documented_keys():
    model = _stack()
    x = torch.randn(4, 64)
    before = model(x).detach()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    qcfg = quantize_model(model, 4, 32, modules_to_not_convert=["3"])
    assert qcfg == {"quant_method": "ember", "bits": 4, "group_size": 32, "symmetric": True,
                    "modules_to_not_convert": ["3"], "algorithm": "rtn", "norms_folded": False}
    assert isinstance(model[0], QuantLinear) and isinstance(model[2], QuantLinear)
    assert isinstance(model[3], nn.Linear)  # skipped by name
    keys = set(model.state_dict())
    assert {"0.qweight", "0.scales", "0.bias", "2.qweight", "2.scales", "3.weight"} <= keys
    assert not any(k in keys for k in ("0.weight", "2.weight"))
    assert names == ["0", "2", "3"]
    rel = (model(x) - before).abs().max() / before.abs().max()
    assert 0 < rel < 0.15


def test_layers_not_divisible_by_group_stay_dense_and_are_recorded():
    model = nn.Sequential(nn.Linear(96, 64), nn.Linear(64, 32))
    qcfg = quantize_model(model, 4, 64)
    assert isinstance(model[0], nn.Linear) and isinstance(model[1], QuantLinear)
    assert "0" in qcfg["modules_to_not_convert"]


def test_apply_quantization_on_meta_then_load_state_dict():
    src = _stack()
    qcfg = quantize_model(src, 8, None)
    with torch.device("meta"):
        dst = _stack()
    apply_quantization(dst, qcfg)
    assert isinstance(dst[0], QuantLinear) and dst[0].qweight.is_meta
    dst.load_state_dict(src.state_dict(), assign=True)
    x = torch.randn(3, 64)
    torch.testing.assert_close(dst(x), src(x))


def test_apply_quantization_rejects_unknown_configs():
    for bad in ({"quant_method": "gptq", "bits": 4}, {"bits": 3}, {"bits": 4, "group_size": 100},
                {"bits": 4, "group_size": 32, "overrides": {"2": {"bits": 5}}},
                {"bits": 4, "group_size": 32, "overrides": {"2": {"bits": 4, "group_size": 48}}},
                {"bits": 4, "group_size": 32, "overrides": {"2": 8}},
                {"bits": 4, "group_size": 32, "overrides": {"lm_hed": {"bits": 8}}}):
        with pytest.raises(ValueError, match="bits|group size|override|quant_method|match no linear"):
            apply_quantization(_stack(), bad)


def test_overrides_give_matching_layers_their_own_scheme():
    src = _stack()
    qcfg = quantize_model(src, 4, 32, modules_to_not_convert=(), overrides={"2": {"bits": 8}})
    assert qcfg["overrides"] == {"2": {"bits": 8, "group_size": None}}
    assert [(src[i].bits, src[i].group_size) for i in (0, 2, 3)] == [(4, 32), (8, None), (4, 32)]
    with torch.device("meta"):
        dst = _stack()
    assert apply_quantization(dst, qcfg) == ["0", "2", "3"]
    assert (dst[0].bits, dst[2].bits, tuple(dst[2].scales.shape)) == (4, 8, (64,))
    dst.load_state_dict(src.state_dict(), assign=True)
    x = torch.randn(3, 64)
    torch.testing.assert_close(dst(x), src(x))


def _tiny_checkpoint(tmp_path):
    from engine.checkpoint import save_model
    from engine.model import Transformer

    config = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = Transformer(config)
    model.init_weights(int(torch.randint(0, 2**31, ()).item()))
    with torch.no_grad():  # trained norms weigh other than 1
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape))
    save_model(model, config, tmp_path / "fp")
    return model.eval(), tmp_path / "fp"


@pytest.mark.parametrize("bits,group,tol,fold", [(8, None, 0.03, True), (4, 32, 0.25, True), (4, 32, 0.25, False)])
def test_quantized_checkpoint_round_trip(tmp_path, bits, group, tol, fold):
    from engine.checkpoint import load_model
    from engine.norm_folding import can_fold

    model, fp_dir = _tiny_checkpoint(tmp_path)
    out = quantize_checkpoint(fp_dir, tmp_path / "q", bits, group, fold_norms=fold)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["bits"] == bits and cfg["group_size"] == group and "lm_head" in cfg["modules_to_not_convert"]
    assert cfg["norms_folded"] is fold
    qmodel, _ = load_model(out)
    # Folded norm weights are 1 in the checkpoint, so the server can fold the quantized layers.
    assert can_fold(qmodel) is fold
    assert bool((qmodel.model.layers[0].input_layernorm.weight == 1).all()) is fold
    layer = qmodel.model.layers[1].mlp.down_proj
    assert isinstance(layer, QuantLinear) and layer.bits == bits
    assert isinstance(qmodel.lm_head, nn.Linear)
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        ref, got = model(ids), qmodel(ids)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert 0 < rel < tol


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_head_of_a_tied_model_gets_its_own_copy(tmp_path, bits):
    from engine.checkpoint import load_model, save_model
    from engine.model import Transformer

    config = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    model = Transformer(config)
    model.init_weights(3)
    save_model(model, config, tmp_path / "fp")
    out = quantize_checkpoint(tmp_path / "fp", tmp_path / "q", bits, 32, modules_to_not_convert=())
    saved = json.loads((out / "config.json").read_text())
    assert saved["tie_word_embeddings"] is False and saved["quantization_config"]["modules_to_not_convert"] == []
    qmodel, _ = load_model(out)
    assert isinstance(qmodel.lm_head, QuantLinear) and isinstance(qmodel.model.embed_tokens, nn.Embedding)
    assert torch.equal(qmodel.model.embed_tokens.weight, model.model.embed_tokens.weight)  # untouched
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        ref, got = model.eval()(ids), qmodel(ids)
    assert 0 < ((got - ref).norm() / ref.norm()).item() < (0.05 if bits == 8 else 0.3)


def test_cli_quantize(tmp_path):
    from ember_cli.main import main

    _, fp_dir = _tiny_checkpoint(tmp_path)
    assert main(["quantize", "--model", str(fp_dir), "--out", str(tmp_path / "q8"), "--bits", "8"]) == 0
    assert json.loads((tmp_path / "q8" / "config.json").read_text())["quantization_config"]["bits"] == 8
    assert main(["quantize", "--model", str(fp_dir), "--out", str(fp_dir), "--bits", "4"]) == 2


@pytest.mark.parametrize("overrides,skip", [({"v_proj": {"bits": 8}}, ("lm_head",)),
                                            ({}, ("lm_head", "up_proj"))])
def test_projections_served_as_one_matmul_must_share_a_scheme(tmp_path, overrides, skip):
    model, _ = _tiny_checkpoint(tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="one matmul"):
        quantize_model(model, 4, 32, modules_to_not_convert=skip, overrides=overrides)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())  # checked before any layer changed
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_cli_int4_layers_with_an_int8_head(tmp_path):
    from engine.checkpoint import load_model
    from ember_cli.main import main

    model, fp_dir = _tiny_checkpoint(tmp_path)
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(fp_dir), "--out", str(out), "--bits", "4", "--group-size", "32",
                 "--lm-head-bits", "8"]) == 0
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["bits"] == 4 and cfg["modules_to_not_convert"] == []
    assert cfg["overrides"] == {"lm_head": {"bits": 8, "group_size": None}}
    qmodel, _ = load_model(out)
    assert isinstance(qmodel.lm_head, QuantLinear) and qmodel.lm_head.bits == 8
    assert qmodel.model.layers[0].mlp.up_proj.bits == 4
    # The int8 head adds little error to the int4 layers': the logits stay within int4's tolerance
    # and the head's own rounding error is small beside a fully int4 model's.
    int4 = tmp_path / "q4"
    assert main(["quantize", "--model", str(fp_dir), "--out", str(int4), "--bits", "4", "--group-size", "32",
                 "--quantize-lm-head"]) == 0
    all4, _ = load_model(int4)
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        ref, mixed, full4 = model(ids), qmodel(ids), all4(ids)
        head8 = qmodel.lm_head(torch.randn(5, 64))
    mixed_err, full4_err = ((mixed - ref).norm() / ref.norm()).item(), ((full4 - ref).norm() / ref.norm()).item()
    assert 0 < mixed_err < full4_err < 0.3
    assert head8.shape == (5, 96)


def test_cpu_runner_prepares_int4_packs_at_start(tmp_path):
    from engine.checkpoint import load_model
    from engine.config import EngineConfig
    from engine.kernels import quant_matmul_cpu as qcpu
    from engine.runner import ModelRunner

    if not qcpu.cpu_kernels_available():
        pytest.skip("this torch has no packed CPU kernels")
    _, fp_dir = _tiny_checkpoint(tmp_path)
    out = quantize_checkpoint(fp_dir, tmp_path / "q", 4, 32)
    qmodel, _ = load_model(out)
    ModelRunner(qmodel, EngineConfig(model=str(out), kv_cache_tokens=512), 64)
    layers = [m for m in qmodel.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.qweight in qcpu._packs for m in layers)  # built before any request
    packs = {id(m): qcpu._packs[m.qweight][m.scales.dtype] for m in layers}
    with torch.no_grad():
        qmodel(torch.randint(0, 96, (1, 5)))
    assert all(qcpu._packs[m.qweight][m.scales.dtype] is packs[id(m)] for m in layers)  # used, not rebuilt
