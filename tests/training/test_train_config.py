"""Training config loading and validation, the LR schedule, AdamW parameter groups, dropout."""
import math
from pathlib import Path

import pytest
import torch

from engine.config import ModelConfig
from engine.model import Transformer
from training.config import ConfigError, OptimSection, ScheduleSection, TrainConfig, apply_overrides, load_config
from training.dropout import add_dropout
from training.optim import build_optimizer
from training.schedule import build_scheduler, lr_ratio

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_bundled_config_loads_and_round_trips(path):
    if path.parent.name != "configs":
        pytest.skip("not a training config")
    cfg = load_config(path)
    again = TrainConfig.from_dict(cfg.to_dict())
    assert again == cfg


def test_presets_have_the_sizes_they_name():
    sizes = {name: load_config(ROOT / "configs" / f"{name}.yaml").model.num_parameters()
             for name in ("small", "medium", "large-13b", "large-70b", "ember-stories")}
    assert 0.3e9 < sizes["small"] < 0.4e9
    assert 6.5e9 < sizes["medium"] < 8e9
    assert 12e9 < sizes["large-13b"] < 14e9
    assert 65e9 < sizes["large-70b"] < 72e9
    assert sizes["ember-stories"] * 2 < 12.5e6  # bf16 bytes: the bundled model stays small


def test_overrides_nested_keys_lists_and_numbers():
    raw = {"model": {"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 96, "vocab_size": 99,
                     "num_hidden_layers": 1}, "optim": {"lr": 0.1}}
    out = apply_overrides(raw, ["optim.lr=1e-3", "optim.betas=[0.8,0.9]", "train.max_steps=7",
                                "eval.prompts=[Hi, There]", "data.val=null"])
    assert raw["optim"]["lr"] == 0.1  # the input is not modified
    cfg = TrainConfig.from_dict({**out, "schedule": {"warmup_steps": 1}})
    assert cfg.optim.lr == 1e-3 and cfg.optim.betas == (0.8, 0.9) and cfg.train.max_steps == 7
    assert cfg.eval.prompts == ["Hi", "There"] and cfg.data.val is None


@pytest.mark.parametrize("override,needle", [
    ("optim.lrr=1", "unknown key(s) lrr"),
    ("trian.max_steps=3", "unknown top-level key 'trian'"),
    ("model.hidden_sise=3", "unknown key(s) in model: hidden_sise"),
    ("train.precision=fp8", "train.precision must be one of"),
    ("optim.betas=[0.9]", "optim.betas must be two numbers"),
    ("schedule.warmup_steps=5000", "exceeds train.max_steps"),
    ("data.seq_len=9999", "exceeds model.max_position_embeddings"),
    ("model.num_key_value_heads=3", "multiple of"),
    ("train.dropout=1.5", "train.dropout must be in"),
    ("optim.lr=fast", "optim.lr must be a number"),
])
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=None) as err:
        load_config(ROOT / "configs" / "tiny.yaml", ["schedule.warmup_steps=1", override])
    assert needle in str(err.value)


def test_schedule_warmup_peak_cosine_floor():
    cfg = ScheduleSection(warmup_steps=10, decay="cosine", min_lr_ratio=0.1)
    ratios = [lr_ratio(s, cfg, 110) for s in range(110)]
    assert ratios[0] == pytest.approx(1 / 11) and ratios[9] == pytest.approx(10 / 11)
    assert ratios[10] == pytest.approx(1.0)
    assert ratios[-1] == pytest.approx(0.1)
    assert ratios[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 50 / 99)))
    assert all(a >= b for a, b in zip(ratios[10:], ratios[11:]))  # monotone decay
    lin = ScheduleSection(warmup_steps=0, decay="linear", min_lr_ratio=0.0)
    assert lr_ratio(0, lin, 11) == 1.0 and lr_ratio(5, lin, 11) == pytest.approx(0.5)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = build_scheduler(opt, cfg, 110)
    for _ in range(10):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(2.0)


def test_no_weight_decay_on_norms_biases_and_embeddings():
    cfg = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, attention_bias=True, tie_word_embeddings=True, max_position_embeddings=32)
    model = Transformer(cfg)
    model.model.layers[1].mlp.up_proj.weight.requires_grad_(False)  # frozen parameters are left out
    opt = build_optimizer(model, OptimSection(weight_decay=0.1))
    groups = {g["weight_decay"]: set(g["names"]) for g in opt.param_groups}
    decayed, plain = groups[0.1], groups[0.0]
    assert all(n.endswith(("proj.weight",)) for n in decayed)
    assert "model.layers.0.self_attn.q_proj.weight" in decayed
    assert {"model.embed_tokens.weight", "model.norm.weight", "model.layers.0.self_attn.q_proj.bias",
            "model.layers.0.input_layernorm.weight"} <= plain
    assert "model.layers.1.mlp.up_proj.weight" not in decayed | plain
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)  # tied head counted once
    assert sum(len(g["params"]) for g in opt.param_groups) == n_trainable


def test_dropout_only_while_training():
    cfg = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=32)
    model = Transformer(cfg)
    model.init_weights(0)
    ids = torch.randint(0, 50, (1, 12))
    with torch.no_grad():
        clean = model(ids)
        handles = add_dropout(model, 0.5)
        model.eval()
        assert torch.equal(model(ids), clean)  # inference is untouched
        model.train()
        assert not torch.allclose(model(ids), clean)
        for h in handles:
            h.remove()
        assert torch.equal(model(ids), clean)
