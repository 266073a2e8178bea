"""The runner's flat batch layout, and paged forwards (chunked, mixed with decode) against a plain forward."""
import torch

from engine.config import EngineConfig, ModelConfig
from engine.kv_cache import KVCacheManager
from engine.model import Transformer
from engine.runner import ModelRunner
from engine.scheduler import ScheduledSeq, SchedulerOutput


def tiny_model(seed=0):
    cfg = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = Transformer(cfg)
    model.init_weights(seed)
    return model.eval()


def seq(rid, tokens, start, blocks, sample=True, prompt_logprobs=False):
    return ScheduledSeq(rid, tuple(tokens), start, tuple(blocks), sample, prompt_logprobs)


def test_prepare_inputs_layout():
    runner = ModelRunner(tiny_model(), EngineConfig(block_size=4, kv_cache_tokens=64), max_model_len=64)
    plan = SchedulerOutput(seqs=(
        seq("a", [10, 11, 12], 0, [5], sample=False),  # a prefill chunk: no logits
        seq("b", [20], 6, [2, 7]),  # a decode at position 6: block 7, offset 2
        seq("c", [30, 31], 1, [3], prompt_logprobs=True),
    ))
    inp = runner.prepare_inputs(plan)
    assert inp.input_ids.tolist() == [[10, 11, 12, 20, 30, 31]]
    assert inp.positions.tolist() == [[0, 1, 2, 6, 1, 2]]
    assert inp.metadata.slot_mapping.tolist() == [20, 21, 22, 30, 13, 14]
    assert inp.metadata.block_tables.tolist() == [[5, 0], [2, 7], [3, 0]]
    assert inp.metadata.context_lens.tolist() == [3, 7, 3]
    assert inp.metadata.cu_seqlens_q.tolist() == [0, 3, 4, 6]
    assert inp.logits_indices.tolist() == [3, 4, 5]
    assert inp.sample_rows == {"b": 0, "c": 2} and inp.prompt_rows == {"c": (1, 1, 2)}


def test_chunked_paged_forward_equals_a_full_forward():
    torch.manual_seed(0)
    model = tiny_model(1)
    runner = ModelRunner(model, EngineConfig(block_size=4, kv_cache_tokens=128), max_model_len=64)
    kv = KVCacheManager(runner.num_blocks, 4)
    a = torch.randint(0, 128, (23,)).tolist()
    b = torch.randint(0, 128, (9,)).tolist()
    with torch.no_grad():
        want_a = model(torch.tensor([a]))[0]
        want_b = model(torch.tensor([b]))[0]
    # step 1: a's first 10 tokens, b's first 9 (b's prompt completes); step 2: a's next 13 and b's "decode"
    ta = kv.allocate("a", 10)
    tb = kv.allocate("b", 9)
    out1 = runner.execute(SchedulerOutput(seqs=(seq("a", a[:10], 0, ta, sample=False),
                                               seq("b", b, 0, tb, prompt_logprobs=True))))
    torch.testing.assert_close(out1.logits, want_b, atol=1e-4, rtol=1e-4)
    ta = kv.allocate("a", 23)
    tb = kv.allocate("b", 10)
    nxt = 5
    out2 = runner.execute(SchedulerOutput(seqs=(seq("a", a[10:], 10, ta), seq("b", [nxt], 9, tb))))
    with torch.no_grad():
        want_b_next = model(torch.tensor([b + [nxt]]))[0, -1]
    torch.testing.assert_close(out2.logits[out2.sample_rows["a"]], want_a[-1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out2.logits[out2.sample_rows["b"]], want_b_next, atol=1e-4, rtol=1e-4)


def test_cpu_kv_pool_defaults_to_four_contexts():
    runner = ModelRunner(tiny_model(), EngineConfig(block_size=16), max_model_len=4096)
    assert runner.num_blocks * 16 == 4 * 4096
    assert tuple(runner.kv_cache.layer(0)[0].shape) == (runner.num_blocks, 16, 2, 16)
