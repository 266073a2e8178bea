"""LoRA/DoRA wrapper, injection, merge/unmerge, adapter files and their errors, `ember merge`."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ember_cli.main import main as ember
from engine.adapter_io import AdapterError, load_adapter, read_adapter, save_adapter
from engine.checkpoint import load_model
from engine.lora import (LoraConfig, LoraLinear, adapters_disabled, delta_weight, dora_scale, inject_adapters,
                         lora_delta, lora_modules, lora_scaling, mark_only_adapters_trainable, merge_adapters)
from finetune_fixtures import tiny_base


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_base(tmp_path_factory.mktemp("base"))


def _ids(seed=0, vocab=512):
    return torch.randint(0, vocab, (2, 13), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if ".lora_A" in name or ".lora_B" in name:
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        elif "magnitude" in name:
            p.mul_(1 + 0.3 * torch.rand(p.shape, generator=g))


def _adapted(base, use_dora, seed=0, targets=("q_proj", "v_proj", "down_proj")):
    model, _ = load_model(base, dtype="float32")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), use_dora=use_dora)
    inject_adapters(model, config)
    _randomize(model, seed)
    return model, config


def test_scaling_and_delta_functions():
    assert lora_scaling(16, 32) == 2.0
    assert lora_scaling(16, 32, use_rslora=True) == 8.0
    a, b, x = torch.randn(4, 10), torch.randn(6, 4), torch.randn(3, 10)
    assert torch.allclose(lora_delta(x, a, b, 0.5), x @ (0.5 * b @ a).T, atol=1e-5)
    assert torch.allclose(delta_weight(a, b, 0.5), 0.5 * b @ a)


def test_fresh_adapter_is_identity_and_only_adapters_train(base):
    model, _ = load_model(base, dtype="float32")
    ids = _ids()
    with torch.no_grad():
        want = model(ids)
    paths = inject_adapters(model, LoraConfig(r=4, lora_alpha=8, use_dora=True))
    assert len(paths) == 7 * 2  # seven projections in each of two layers
    trainable = mark_only_adapters_trainable(model)
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".lora_" not in n)
    with torch.no_grad():
        assert torch.allclose(model(ids), want, atol=1e-5)  # B = 0 and m = ||W||: the base model


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_unmerge_roundtrip(base, use_dora):
    model, _ = _adapted(base, use_dora)
    ids = _ids(1)
    with torch.no_grad():
        adapted = model(ids)
        for _, m in lora_modules(model):
            m.merge()
        merged = model(ids)
        for _, m in lora_modules(model):
            m.unmerge()
        back = model(ids)
    assert torch.allclose(merged, adapted, atol=1e-4)
    assert torch.allclose(back, adapted, atol=1e-4)


def test_dora_scale_is_the_merged_row_factor(base):
    model, _ = _adapted(base, use_dora=True)
    _, m = next(iter(lora_modules(model)))
    w, a, b = m.base_layer.weight, m.lora_A.weight, m.lora_B.weight
    factor = dora_scale(w, a, b, m.scaling, m.lora_magnitude_vector)
    with torch.no_grad():
        assert torch.allclose(m.merged_weight(), factor[:, None] * (w + delta_weight(a, b, m.scaling)), atol=1e-6)
    with pytest.raises(ValueError, match="already has adapters"):
        inject_adapters(model, LoraConfig(target_modules="all-linear"))


def test_adapters_disabled_gives_base_logits(base):
    plain, _ = load_model(base, dtype="float32")
    model, _ = _adapted(base, use_dora=True)
    ids = _ids(2)
    with torch.no_grad():
        with adapters_disabled(model):
            off = model(ids)
        on = model(ids)
        want = plain(ids)
    assert torch.allclose(off, want, atol=1e-6)
    assert (on - want).abs().max() > 1e-2


def test_no_matching_target_names_the_layers(base):
    model, _ = load_model(base, dtype="float32")
    with pytest.raises(ValueError, match="q_proj"):
        inject_adapters(model, LoraConfig(target_modules=["query_key_value"]))


def test_regex_targets_and_rank_pattern(base):
    model, _ = load_model(base, dtype="float32")
    config = LoraConfig(r=4, target_modules=r"model\.layers\.1\..*_proj", rank_pattern={"down_proj": 2})
    paths = inject_adapters(model, config)
    assert paths and all(p.startswith("model.layers.1.") for p in paths)
    ranks = {p: m.r for p, m in lora_modules(model)}
    assert ranks["model.layers.1.mlp.down_proj"] == 2 and ranks["model.layers.1.self_attn.q_proj"] == 4


@pytest.mark.parametrize("use_dora", [False, True])
def test_save_load_roundtrip_and_peft_keys(base, tmp_path, use_dora):
    model, config = _adapted(base, use_dora)
    save_adapter(model, config, tmp_path, base_model_name_or_path=str(base))
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert ("base_model.model.model.layers.1.mlp.down_proj.lora_magnitude_vector" in keys) == use_dora
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["bias"] == "none"
    assert cfg["use_dora"] == use_dora and cfg["r"] == 4 and cfg["base_model_name_or_path"] == str(base)
    fresh, _ = load_model(base, dtype="float32")
    load_adapter(fresh, tmp_path)
    ids = _ids(3)
    with torch.no_grad():
        assert torch.allclose(fresh(ids), model(ids), atol=1e-6)


@pytest.mark.parametrize("use_dora", [False, True])
def test_ember_merge_checkpoint_matches_adapter_logits(base, tmp_path, use_dora):
    model, config = _adapted(base, use_dora, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                      "up_proj", "down_proj"))
    save_adapter(model, config, tmp_path / "adapter")
    assert ember(["merge", "--base", str(base), "--adapter", str(tmp_path / "adapter"),
                  "--out", str(tmp_path / "merged")]) == 0
    merged, _ = load_model(tmp_path / "merged", dtype="float32")
    assert not any(isinstance(m, LoraLinear) for m in merged.modules())
    assert (tmp_path / "merged" / "tokenizer.model").is_file()
    ids = _ids(4)
    with torch.no_grad():
        assert (merged(ids) - model(ids)).abs().max().item() < 1e-4


def test_merge_adapters_replaces_wrappers(base):
    model, _ = _adapted(base, use_dora=True)
    ids = _ids(5)
    with torch.no_grad():
        want = model(ids)
        merge_adapters(model)
        got = model(ids)
    assert not list(lora_modules(model))
    assert set(model.state_dict()) == set(load_model(base)[0].state_dict())
    assert torch.allclose(got, want, atol=1e-4)


# ---- bad adapters: each error names the file and what is wrong --------------------------------------------

@pytest.fixture
def saved(base, tmp_path):
    model, config = _adapted(base, use_dora=False)
    return save_adapter(model, config, tmp_path / "adapter")


def _edit_tensors(saved, fn):
    path = saved / "adapter_model.safetensors"
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path))


def _edit_config(saved, **changes):
    path = saved / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def _load_error(base, saved) -> str:
    model, _ = load_model(base, dtype="float32")
    with pytest.raises(AdapterError) as info:
        load_adapter(model, saved)
    assert not list(lora_modules(model))  # nothing half-loaded
    return str(info.value)


def test_error_wrong_shape(base, saved):
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    _edit_tensors(saved, lambda t: t.__setitem__(key, torch.zeros(4, 32)))
    msg = _load_error(base, saved)
    assert "adapter_model.safetensors" in msg and "q_proj" in msg and "different base" in msg


def test_error_rank_mismatch(base, saved):
    _edit_config(saved, r=8)
    msg = _load_error(base, saved)
    assert "rank 4" in msg and "r=8" in msg


def test_error_module_not_in_targets(base, saved):
    _edit_config(saved, target_modules=["q_proj"])
    assert "not in target_modules" in _load_error(base, saved)


def test_error_unknown_module(base, saved):
    def add(t):
        t["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 64)
        t["base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight"] = torch.zeros(64, 4)
    _edit_tensors(saved, add)
    assert "model.layers.9.self_attn.q_proj" in _load_error(base, saved)


def test_error_missing_magnitude_for_dora(base, saved):
    _edit_config(saved, use_dora=True)
    assert "lora_magnitude_vector" in _load_error(base, saved)


def test_error_missing_config_and_pickle_weights(base, saved):
    (saved / "adapter_config.json").unlink()
    assert "adapter_config.json" in _load_error(base, saved)


def test_error_pickle_only(base, saved):
    (saved / "adapter_model.safetensors").rename(saved / "adapter_model.bin")
    msg = _load_error(base, saved)
    assert "adapter_model.bin" in msg and "never unpickles" in msg


def test_error_corrupt_safetensors(base, saved):
    (saved / "adapter_model.safetensors").write_bytes(b"\x00\x01garbage")
    assert "not a readable safetensors file" in _load_error(base, saved)


def test_error_unsupported_peft_features(base, saved):
    _edit_config(saved, modules_to_save=["lm_head"])
    assert "modules_to_save" in _load_error(base, saved)


def test_read_adapter_alone_reports_rank(saved):
    adapter = read_adapter(saved)
    assert adapter.rank("model.layers.0.self_attn.q_proj") == 4
    assert set(adapter.tensors["model.layers.0.self_attn.q_proj"]) == {"lora_A.weight", "lora_B.weight"}
