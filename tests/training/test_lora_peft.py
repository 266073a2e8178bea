"""LoRA and DoRA adapters move both ways between Ember and `peft` with the same logits and gradients (fp32)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from engine.adapter_io import load_adapter, save_adapter  # noqa: E402
from engine.checkpoint import load_model  # noqa: E402
from engine.lora import LoraConfig, inject_adapters, lora_modules, merge_adapters  # noqa: E402

SHAPE = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
CASES = {
    "lora": dict(use_dora=False, use_rslora=False),
    "dora": dict(use_dora=True, use_rslora=False),
    "lora-rslora": dict(use_dora=False, use_rslora=True),
}
TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**SHAPE)).float()
    with torch.no_grad():  # non-trivial norms so nothing hides behind ones
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.3)
    out = tmp_path_factory.mktemp("base")
    hf.save_pretrained(out, safe_serialization=True)
    return out


def _hf(base_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()


def _ids(seed=1):
    return torch.randint(0, SHAPE["vocab_size"], (2, 19), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _randomize(named_params):
    """Non-zero B and a perturbed magnitude, so a wrong formula changes the logits."""
    for name, p in named_params:
        if "lora_A" in name or "lora_B" in name:
            p.normal_(0, 0.2)
        elif "lora_magnitude_vector" in name:
            p.mul_(1 + 0.3 * torch.rand_like(p))


@pytest.mark.parametrize("case", sorted(CASES))
def test_ember_adapter_loads_in_peft(case, base_dir, tmp_path):
    model, _ = load_model(base_dir, dtype="float32")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, **CASES[case])
    inject_adapters(model, config)
    _randomize(model.named_parameters())
    save_adapter(model, config, tmp_path, base_model_name_or_path=str(base_dir))

    peft_model = peft.PeftModel.from_pretrained(_hf(base_dir), tmp_path).eval()
    ids = _ids()
    with torch.no_grad():
        want, got = peft_model(ids).logits, model(ids)
        base = _hf(base_dir)(ids).logits
    assert (want - base).abs().max() > 1e-2  # the adapter really changes the output
    assert (got - want).abs().max().item() < 1e-4


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_loads_in_ember(case, base_dir, tmp_path):
    torch.manual_seed(3)
    cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM", **CASES[case])
    peft_model = peft.get_peft_model(_hf(base_dir), cfg)
    _randomize(peft_model.named_parameters())
    peft_model.save_pretrained(tmp_path)
    peft_model.eval()

    model, _ = load_model(base_dir, dtype="float32")
    adapter = load_adapter(model, tmp_path)
    assert adapter.config.use_dora == CASES[case]["use_dora"]
    assert len(list(lora_modules(model))) == len(TARGETS) * SHAPE["num_hidden_layers"]
    ids = _ids(2)
    with torch.no_grad():
        assert (model(ids) - peft_model(ids).logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("case", ["lora", "dora"])
def test_training_gradients_match_peft(case, base_dir, tmp_path):
    """Same loss gradient on A, B and the magnitude: DoRA's weight norm must be detached as in peft."""
    torch.manual_seed(5)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM", **CASES[case])
    peft_model = peft.get_peft_model(_hf(base_dir), cfg)
    _randomize(peft_model.named_parameters())
    peft_model.save_pretrained(tmp_path)
    model, _ = load_model(base_dir, dtype="float32")
    load_adapter(model, tmp_path)
    model.train()
    peft_model.train()

    ids = _ids(3)
    peft_model(ids).logits.logsumexp(-1).mean().backward()
    model(ids).logsumexp(-1).mean().backward()
    ours = {n: p.grad for n, p in model.named_parameters() if ".lora_" in n}
    theirs = {n.replace("base_model.model.", "").replace(".default", "").replace("vector.weight", "vector"): p.grad
              for n, p in peft_model.named_parameters() if p.requires_grad}
    assert set(ours) == set(theirs)
    for name, grad in ours.items():
        assert torch.allclose(grad, theirs[name], atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("case", ["lora", "dora"])
def test_merge_matches_peft_merge_and_unload(case, base_dir, tmp_path):
    torch.manual_seed(7)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM", **CASES[case])
    peft_model = peft.get_peft_model(_hf(base_dir), cfg)
    _randomize(peft_model.named_parameters())
    peft_model.save_pretrained(tmp_path)
    merged_hf = peft_model.merge_and_unload().eval()

    model, _ = load_model(base_dir, dtype="float32")
    load_adapter(model, tmp_path)
    merge_adapters(model)
    assert not list(lora_modules(model))
    hf_sd = merged_hf.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.allclose(tensor, hf_sd[name], atol=1e-5), name
