"""The reference generation path: the KV cache must not change what greedy decoding produces."""
import torch

from engine.config import ModelConfig
from engine.generate import generate_reference, greedy_recompute
from engine.model import Transformer


def tiny_model(seed=0, **kw):
    cfg = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **kw)
    model = Transformer(cfg)
    model.init_weights(seed)
    # A wider init than the default makes the logits peaked enough that argmax ties cannot happen.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0) if p.dim() == 2 else None
    return model.eval()


def test_cached_greedy_equals_recompute():
    for seed in range(3):
        model = tiny_model(seed)
        g = torch.Generator().manual_seed(seed)
        prompt = torch.randint(0, 128, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).tolist()
        want = greedy_recompute(model, prompt, 30)
        got = generate_reference(model, prompt, 30, ignore_eos=True)
        assert got == want


def test_cached_greedy_equals_recompute_qwen2_tied():
    model = tiny_model(5, model_type="qwen2", tie_word_embeddings=True)
    prompt = [3, 17, 99, 4, 51]
    assert generate_reference(model, prompt, 25, ignore_eos=True) == greedy_recompute(model, prompt, 25)


def test_stops_at_eos_unless_ignored():
    model = tiny_model(1)
    prompt = [5, 6, 7]
    free = generate_reference(model, prompt, 20, ignore_eos=True)
    eos = free[4]
    stopped = generate_reference(model, prompt, 20, eos_ids=[eos])
    assert stopped == free[: free.index(eos) + 1]
    assert generate_reference(model, prompt, 20, eos_ids=[eos], ignore_eos=True) == free


def test_seeded_sampling_is_reproducible_and_differs_by_seed():
    model = tiny_model(2)
    a = generate_reference(model, [1, 2, 3], 20, temperature=1.0, seed=11, ignore_eos=True)
    b = generate_reference(model, [1, 2, 3], 20, temperature=1.0, seed=11, ignore_eos=True)
    c = generate_reference(model, [1, 2, 3], 20, temperature=1.0, seed=12, ignore_eos=True)
    assert a == b and a != c


def test_max_tokens_clipped_to_context():
    model = tiny_model(3)
    out = generate_reference(model, [i % 128 for i in range(250)], 50, ignore_eos=True)
    assert len(out) == 6
