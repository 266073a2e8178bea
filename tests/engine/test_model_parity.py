"""Logits parity with Hugging Face transformers, both ways, on tiny random configs in float32."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from engine.checkpoint import load_model, save_model  # noqa: E402

BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)

CASES = {
    "llama-gqa-untied": (transformers.LlamaConfig, dict(tie_word_embeddings=False)),
    "llama-mha-tied": (transformers.LlamaConfig, dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "llama-mqa": (transformers.LlamaConfig, dict(num_key_value_heads=1)),
    "llama3-rope-scaling": (transformers.LlamaConfig, dict(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32})),
    "llama-linear-rope": (transformers.LlamaConfig, dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "mistral": (transformers.MistralConfig, dict(sliding_window=None)),
    "qwen2-qkv-bias": (transformers.Qwen2Config, dict(tie_word_embeddings=True)),
    "mixtral-moe": (transformers.MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None)),
}


def _hf_model(cls, overrides, seed):
    torch.manual_seed(seed)
    cfg = cls(**{**BASE, **overrides})
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    # Random biases and norm weights, so a dropped bias or norm cannot hide behind zeros/ones.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0, 0.5)
    return model


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, BASE["vocab_size"], (2, 37), generator=g)


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_checkpoint_loads_with_same_logits(case, tmp_path):
    cls, overrides = CASES[case]
    hf = _hf_model(cls, overrides, seed=hash(case) % 1000)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ids = _inputs(1)
    with torch.no_grad():
        want = hf(ids).logits
        model, _ = load_model(tmp_path, dtype="float32")
        got = model(ids)
    assert (got - want).abs().max().item() < 1e-4


@pytest.mark.parametrize("case", sorted(CASES))
def test_ember_checkpoint_loads_in_transformers(case, tmp_path):
    cls, overrides = CASES[case]
    hf = _hf_model(cls, overrides, seed=7)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    model, config = load_model(tmp_path / "hf", dtype="float32")
    save_model(model, config, tmp_path / "ember")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ember", dtype=torch.float32).eval()
    ids = _inputs(2)
    with torch.no_grad():
        assert (back(ids).logits - model(ids)).abs().max().item() < 1e-4
        assert (back(ids).logits - hf(ids).logits).abs().max().item() < 1e-4
