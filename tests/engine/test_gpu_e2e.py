"""End to end on a GPU: the fast path (fused model, Triton kernels, CUDA graphs) against the torch path.

- tiny fp32 model: the Triton engine and the torch engine (EMBER_DISABLE_TRITON=1) give the same
  greedy tokens, dense and weight-only quantized;
- CUDA graphs against eager execution: identical tokens, over batches that hit several buckets;
- a larger bf16 model: the fast path's logits are as close to an fp32 reference as the torch path's;
- the KV pool takes what gpu_memory_utilization leaves after the weights and a warm-up forward.
"""
import copy
import gc
import random

import pytest
import torch

from engine.config import EngineConfig, ModelConfig
from engine.engine import Engine
from engine.model import Transformer, rope_inv_freq
from engine.quant import quantize_model
from engine.runner import ModelRunner
from engine.sampling import SamplingParams
from engine.scheduler import ScheduledSeq, SchedulerOutput
from test_fused_path import peaked_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _engine(model, **kw):
    kw = {"max_num_seqs": 16, "gpu_memory_utilization": 0.3, **kw}
    cfg = EngineConfig(device="cuda", max_model_len=256, block_size=16, max_num_batched_tokens=96, **kw)
    return Engine(cfg, model=model.cuda(), tokenizer=None)


def _requests(seed, n=24):
    rng = random.Random(seed)
    return [([rng.randrange(3, 128) for _ in range(rng.randint(1, 150))], rng.randint(1, 40)) for _ in range(n)]


def _greedy(engine, requests):
    for i, (prompt, max_tokens) in enumerate(requests):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    got: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.outputs[0].token_ids)
    return [got[f"r{i}"] for i in range(len(requests))]


def _count_replays(engine, monkeypatch):
    graphs = engine.runner.graphs
    seen: list[int] = []
    replay = graphs.replay

    def counting(inp):
        seen.append(inp.graph_batch)
        return replay(inp)

    monkeypatch.setattr(graphs, "replay", counting)
    return seen


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_triton_path_gives_the_torch_path_tokens(bits, monkeypatch):
    model = peaked_model(3)
    if bits:
        quantize_model(model, bits, group_size=32)
    requests = _requests(11)
    monkeypatch.setenv("EMBER_DISABLE_TRITON", "1")
    slow = _engine(copy.deepcopy(model))
    assert not slow.runner.use_kernels and slow.runner.graphs is None
    want = _greedy(slow, requests)
    del slow
    monkeypatch.delenv("EMBER_DISABLE_TRITON")
    fast = _engine(model)
    assert fast.runner.use_kernels and fast.runner.graphs is not None
    replays = _count_replays(fast, monkeypatch)
    got = _greedy(fast, requests)
    assert len(set(replays)) >= 3, f"decode steps should span several buckets, saw {sorted(set(replays))}"
    if bits is None:
        for i, (g, w) in enumerate(zip(got, want)):
            assert g == w, f"request {i} diverged"
    else:
        # The quantized kernels' fp32 dot runs in tf32 (the reference in full fp32): a rare late
        # near-tie may flip, but every request starts the same and almost all match in full.
        assert all(g[:4] == w[:4] for g, w in zip(got, want))
        assert sum(g == w for g, w in zip(got, want)) >= 0.9 * len(want)


def test_cuda_graphs_give_the_eager_tokens(monkeypatch):
    model = peaked_model(4)
    requests = _requests(12, n=40)
    eager = _engine(copy.deepcopy(model), extra={"enforce_eager": True})
    assert eager.runner.use_kernels and eager.runner.graphs is None
    want = _greedy(eager, requests)
    del eager
    graphed = _engine(model, max_num_seqs=24)
    runner = graphed.runner
    assert runner.graphs.sizes == [1, 2, 4, 8, 16, 24] and runner.cuda_graph_capture_s > 0
    replays = _count_replays(graphed, monkeypatch)
    assert _greedy(graphed, requests) == want
    assert {1, 24} <= set(replays) or len(set(replays)) >= 4, sorted(set(replays))


def test_kv_pool_fills_the_memory_budget():
    gc.collect()
    torch.cuda.empty_cache()
    model = _bf16_model().to("cuda", torch.bfloat16)
    free, total = torch.cuda.mem_get_info()
    util = (total - free + 4 * 2**30) / total  # leaves 4 GiB for activations and the KV pool
    # The pool cap (four full batches of 512 x 1024 tokens, 8 GiB) lies above the budget: the budget decides.
    cfg = EngineConfig(device="cuda", max_model_len=1024, max_num_seqs=512, max_num_batched_tokens=1024,
                       gpu_memory_utilization=util, extra={"enforce_eager": True})
    engine = Engine(cfg, model=model, tokenizer=None)
    kv = engine.runner.kv_cache.data
    assert 3 * 2**30 < kv.numel() * kv.element_size() <= 4 * 2**30
    free_after, _ = torch.cuda.mem_get_info()
    assert total - free_after <= util * total + 2**30


def _bf16_model():
    cfg = ModelConfig(vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                      num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=1024,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 256})
    model = Transformer(cfg)
    model.init_weights(7)
    return model.eval()


def _two_steps(runner: ModelRunner, prompts, nxt):
    """Prefill both prompts (logits of every row), then one decode step each: logits [rows, V]."""
    tables = [list(range(0, 8)), list(range(8, 16))]
    step1 = SchedulerOutput(seqs=tuple(ScheduledSeq(f"s{i}", tuple(p), 0, tuple(tables[i]), True, True)
                                       for i, p in enumerate(prompts)))
    step2 = SchedulerOutput(seqs=tuple(ScheduledSeq(f"s{i}", (nxt[i],), len(p), tuple(tables[i]), True, False)
                                       for i, p in enumerate(prompts)))
    first = runner.execute(step1).logits.clone()
    out2 = runner.execute(step2)
    second = out2.logits[[out2.sample_rows[f"s{i}"] for i in range(len(prompts))]].clone()
    return torch.cat([first, second])


@pytest.mark.parametrize("bits", [None, 4])
def test_bf16_logits_match_the_torch_path(bits, monkeypatch):
    """bf16 (and int4, whose unit norms let the fast path fold them: residual adds in the int4
    kernel's epilogue) against an fp32 reference, no further from it than the torch path."""
    base = _bf16_model()
    g = torch.Generator().manual_seed(8)
    prompts = [torch.randint(3, 4096, (n,), generator=g).tolist() for n in (100, 37)]
    nxt = [5, 6]
    if bits:  # the reference is the quantized model too, in fp32 (the torch references' matmuls)
        quantize_model(base, bits, group_size=128)
    # fp32 reference through the plain model (contiguous SDPA, no cache): all prompt rows, then the next token.
    monkeypatch.setenv("EMBER_DISABLE_TRITON", "1")
    ref_model = copy.deepcopy(base).cuda()
    with torch.no_grad():
        ref = [ref_model(torch.tensor([p + [t]], device="cuda"))[0].float() for p, t in zip(prompts, nxt)]
    ref = torch.cat([ref[0][:-1], ref[1][:-1], ref[0][-1:], ref[1][-1:]])
    del ref_model

    def runner(model):
        cfg = EngineConfig(device="cuda", max_model_len=256, block_size=16, kv_cache_tokens=16 * 32, max_num_seqs=4)
        model = model.to("cuda", torch.bfloat16)
        model.inv_freq = rope_inv_freq(model.config).cuda()  # kept in fp32, as load_model does
        return ModelRunner(model, cfg, max_model_len=256)

    torch_logits = _two_steps(runner(copy.deepcopy(base)), prompts, nxt)
    monkeypatch.delenv("EMBER_DISABLE_TRITON")
    fast = runner(base)
    assert fast.graphs is not None and fast.norms_folded  # the decode step replays a graph
    fast_logits = _two_steps(fast, prompts, nxt)

    scale = ref.abs().max().item()
    for reduce in (torch.amax, torch.mean):  # the worst logit and the typical one
        err_torch = reduce((torch_logits - ref).abs()).item() / scale
        err_fast = reduce((fast_logits - ref).abs()).item() / scale
        assert err_torch < 0.05, f"bf16 torch path is far from fp32: {err_torch:.3e}"
        assert err_fast <= 1.5 * err_torch + 1e-3, f"fast path error {err_fast:.3e} vs torch path {err_torch:.3e}"


@pytest.mark.parametrize("bits", [None, 4])
def test_programmatic_dependent_launch_changes_no_bit(bits, monkeypatch):
    """The kernels launched with programmatic dependent launch (each waits for its predecessor before
    it reads activations or writes anything) give the same logits, bit for bit, as launched normally:
    prefill eagerly, then a decode step from a CUDA graph."""
    from engine.kernels import _triton_util

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs compute capability 9.0 or newer")
    base = _bf16_model()
    if bits:
        quantize_model(base, bits, group_size=128)
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(3, 4096, (n,), generator=g).tolist() for n in (100, 37)]

    def logits(pdl: str):
        monkeypatch.setenv("EMBER_PDL", pdl)
        _triton_util._pdl_device.cache_clear()
        _triton_util._trigger_override.cache_clear()
        assert bool(_triton_util.pdl_launch(torch.device("cuda"))["PDL"]) is (pdl == "1")
        cfg = EngineConfig(device="cuda", max_model_len=256, block_size=16, kv_cache_tokens=16 * 32, max_num_seqs=4)
        model = copy.deepcopy(base).to("cuda", torch.bfloat16)
        model.inv_freq = rope_inv_freq(model.config).cuda()
        runner = ModelRunner(model, cfg, max_model_len=256)
        assert runner.graphs is not None
        return _two_steps(runner, prompts, [5, 6])

    try:
        normal = logits("0")
        overlapped = logits("1")
    finally:
        _triton_util._pdl_device.cache_clear()
        _triton_util._trigger_override.cache_clear()
    assert torch.equal(normal, overlapped)
