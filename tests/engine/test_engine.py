"""The engine against the reference path: paged KV cache, chunked prefill, prefix caching, preemption."""
import random

import pytest
import torch

from _engine_fixtures import build_tiny_checkpoint, make_engine, run_to_completion
from engine.errors import ContextLengthError, InvalidRequestError
from engine.generate import generate_reference
from engine.outputs import RequestOutputAccumulator
from engine.sampling import SamplingParams

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def engine(model_dir):
    # 64 blocks of 16 tokens: far less than 64 requests need at once, so preemption must happen.
    return make_engine(model_dir, kv_cache_tokens=64 * 16, max_num_batched_tokens=512, max_num_seqs=64)


def test_64_concurrent_greedy_requests_equal_the_reference(engine):
    rng = random.Random(1234)
    shared = [[rng.randrange(3, 512) for _ in range(rng.randint(60, 200))] for _ in range(3)]
    prompts = []
    for i in range(64):
        own = [rng.randrange(3, 512) for _ in range(rng.randint(1, 300))]
        if i % 2:  # half the prompts start with one of three long shared prefixes
            own = (shared[i % 3] + own)[:300]
        prompts.append((own, rng.randint(1, 32)))
    before = engine.stats()
    for i, (prompt, max_tokens) in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=max_tokens, **GREEDY))
    results = run_to_completion(engine)
    stats = engine.stats()
    assert stats.num_preemptions > before.num_preemptions
    assert stats.prefix_cache_hits > before.prefix_cache_hits
    assert stats.kv_blocks_used == 0 and stats.num_running == stats.num_waiting == 0
    for i, (prompt, max_tokens) in enumerate(prompts):
        want = generate_reference(engine.model, prompt, max_tokens, ignore_eos=True)
        out = results[f"r{i}"].outputs[0]
        assert out.token_ids == want, f"request {i} (prompt {len(prompt)} tokens) diverged"
        assert out.finish_reason == "length" and results[f"r{i}"].finished


def test_prefix_cache_computes_only_the_uncached_tail(engine):
    rng = random.Random(7)
    prefix = [rng.randrange(3, 512) for _ in range(200)]
    first, second = prefix + [11, 12, 13], prefix + [21, 22, 23, 24, 25]
    engine.add_request("p1", first, SamplingParams(max_tokens=8, **GREEDY))
    run_to_completion(engine)
    before = engine.stats()
    engine.add_request("p2", second, SamplingParams(max_tokens=8, **GREEDY))
    out = run_to_completion(engine)["p2"]
    after = engine.stats()
    cached = 200 // 16 * 16  # the full blocks of the shared prefix
    assert after.prefix_cache_hits - before.prefix_cache_hits == cached
    assert out.metrics.num_cached_tokens == cached
    # computed: the uncached prompt tail, then one token per decode step after the first
    assert after.tokens_computed_total - before.tokens_computed_total == len(second) - cached + 7
    assert out.outputs[0].token_ids == generate_reference(engine.model, second, 8, ignore_eos=True)


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(engine):
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=24, ignore_eos=True)
    prompt = [5, 77, 300, 42, 9, 123]
    engine.add_request("alone", prompt, params)
    alone = run_to_completion(engine)["alone"].outputs[0].token_ids
    rng = random.Random(3)
    for i in range(6):
        other = [rng.randrange(3, 512) for _ in range(rng.randint(1, 120))]
        seed = None if i % 2 else 99 + i
        engine.add_request(f"other{i}", other, SamplingParams(temperature=1.0, seed=seed, max_tokens=30))
    engine.add_request("batched", prompt, params)
    results = run_to_completion(engine)
    assert results["batched"].outputs[0].token_ids == alone
    engine.add_request("other-seed", prompt, SamplingParams(**{**params.__dict__, "seed": 4321}))
    assert run_to_completion(engine)["other-seed"].outputs[0].token_ids != alone


def test_stop_string_split_across_tokens(engine):
    tok = engine.tokenizer
    prompt = tok.encode("the cat sat on")
    engine.add_request("free", prompt, SamplingParams(max_tokens=40, **GREEDY))
    free = run_to_completion(engine)["free"].outputs[0]
    # per-token text pieces, to pick a stop string straddling a token boundary at its first occurrence
    from engine.detokenizer import IncrementalDetokenizer

    detok = IncrementalDetokenizer(tok, prompt)
    pieces = [detok.add(t) for t in free.token_ids]
    assert "".join(pieces) == free.text
    stop, offset = None, 0
    for a, b in zip(pieces, pieces[1:]):
        offset += len(a)
        candidate = a[-2:] + b[:2]  # ends of two neighbouring tokens
        if a and b and free.text.find(candidate) == offset - len(a[-2:]):
            stop = candidate
            break
    assert stop is not None, "no usable token boundary in the generated text"
    cut = free.text.find(stop)

    engine.add_request("stopped", prompt, SamplingParams(max_tokens=40, stop=[stop], **GREEDY))
    deltas = []
    while engine.has_unfinished():
        for out in engine.step():
            deltas.append(out.outputs[0])
    assert "".join(d.text for d in deltas) == free.text[:cut]
    assert deltas[-1].finish_reason == "stop" and deltas[-1].stop_reason == stop
    assert engine.stats().kv_blocks_used == 0

    engine.add_request("kept", prompt, SamplingParams(max_tokens=40, stop=[stop], include_stop_str_in_output=True,
                                                      **GREEDY))
    assert run_to_completion(engine)["kept"].outputs[0].text == free.text[:cut + len(stop)]


def test_abort_frees_every_block(engine):
    baseline = engine.scheduler.kv.num_free_blocks
    assert baseline == engine.scheduler.kv.num_blocks
    rng = random.Random(5)
    for i in range(4):
        engine.add_request(f"a{i}", [rng.randrange(3, 512) for _ in range(150)],
                           SamplingParams(max_tokens=100, n=2 if i == 0 else 1, **GREEDY))
    for _ in range(4):
        engine.step()
    assert engine.scheduler.kv.num_free_blocks < baseline
    finals = [engine.abort_request(f"a{i}") for i in range(4)]
    assert all(f is not None and f.finished and f.outputs[0].finish_reason == "abort" for f in finals)
    assert engine.scheduler.kv.num_free_blocks == baseline
    assert not engine.has_unfinished() and engine.abort_request("a0") is None


def test_too_long_and_invalid_requests_are_refused(engine):
    with pytest.raises(ContextLengthError, match="context"):
        engine.add_request("long", [5] * 600, SamplingParams())
    with pytest.raises(ContextLengthError, match="max_tokens"):
        engine.add_request("long2", [5] * 500, SamplingParams(max_tokens=100))
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        engine.add_request("oov", [5, 100000], SamplingParams())
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request("empty", [], SamplingParams())
    assert not engine.has_unfinished()
    engine.add_request("dup", [5], SamplingParams(max_tokens=1))
    with pytest.raises(InvalidRequestError, match="in use"):
        engine.add_request("dup", [5], SamplingParams(max_tokens=1))
    run_to_completion(engine)
    # max_tokens=None fills the context
    engine.add_request("fill", [5] * 500, SamplingParams(max_tokens=None, **GREEDY))
    out = run_to_completion(engine)["fill"].outputs[0]
    assert len(out.token_ids) == 12 and out.finish_reason == "length"


def test_n_choices_share_the_prompt_blocks(engine):
    prompt = list(range(10, 10 + 40))
    engine.add_request("n3", prompt, SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True))
    acc = RequestOutputAccumulator()
    for out in engine.step():  # the prompt: choice 0 computes it, the others fork from it
        acc.add(out)
    kv = engine.scheduler.kv
    tables = [kv.block_table(r) for r in ("n3", "n3#1", "n3#2")]
    assert tables[1] == tables[2] == tables[0][:2] and kv.pool.ref_counts[tables[0][0]] == 3
    result = acc.add(run_to_completion(engine)["n3"])
    assert [o.index for o in result.outputs] == [0, 1, 2]
    assert [len(o.token_ids) for o in result.outputs] == [10, 10, 10], result.outputs
    assert len({tuple(o.token_ids) for o in result.outputs}) > 1
    assert result.metrics.num_generation_tokens == 30


def test_logprobs_and_prompt_logprobs_match_a_full_forward(engine):
    prompt = [5, 77, 300, 42, 9, 123, 7]
    engine.add_request("lp", prompt, SamplingParams(max_tokens=3, logprobs=3, prompt_logprobs=2, **GREEDY))
    out = run_to_completion(engine)["lp"]
    choice = out.outputs[0]
    seq = prompt + choice.token_ids
    with torch.no_grad():
        lp = engine.model(torch.tensor([seq])).float().log_softmax(-1)[0]  # [T, V]
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for p in range(1, len(prompt)):
        entry = out.prompt_logprobs[p]
        assert entry.token.token_id == prompt[p]
        assert entry.token.logprob == pytest.approx(lp[p - 1, prompt[p]].item(), abs=1e-4)
        assert [t.token_id for t in entry.top] == lp[p - 1].topk(2).indices.tolist()
    assert len(choice.logprobs) == 3
    for j, entry in enumerate(choice.logprobs):
        row = lp[len(prompt) - 1 + j]
        assert entry.token.token_id == choice.token_ids[j] == row.argmax().item()
        assert entry.token.logprob == pytest.approx(row.max().item(), abs=1e-4)
        assert [t.token_id for t in entry.top] == row.topk(3).indices.tolist()
        assert entry.token.token == engine.outputs.piece(entry.token.token_id)


def test_scoring_only_request_returns_prompt_logprobs(engine):
    engine.add_request("score", [5, 6, 7, 8], SamplingParams(max_tokens=0, prompt_logprobs=0))
    out = run_to_completion(engine)["score"]
    assert out.finished and out.outputs[0].token_ids == [] and out.outputs[0].finish_reason == "length"
    assert [e.token.token_id for e in out.prompt_logprobs[1:]] == [6, 7, 8]


def test_a_failing_step_fails_only_its_requests(engine, monkeypatch):
    from engine.engine import StepError

    engine.add_request("doomed", [5, 6, 7], SamplingParams(max_tokens=5))
    real = engine.runner.execute
    monkeypatch.setattr(engine.runner, "execute", lambda plan: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(StepError) as err:
        engine.step()
    assert err.value.request_ids == ["doomed"] and not engine.has_unfinished()
    assert engine.scheduler.kv.num_free_blocks == engine.scheduler.kv.num_blocks
    monkeypatch.setattr(engine.runner, "execute", real)
    engine.add_request("fine", [5, 6, 7], SamplingParams(max_tokens=5, **GREEDY))
    assert len(run_to_completion(engine)["fine"].outputs[0].token_ids) == 5


def test_an_urgent_request_preempts_and_the_preempted_one_resumes_exactly(model_dir):
    eng = make_engine(model_dir, kv_cache_tokens=64 * 16, max_num_batched_tokens=512, max_num_seqs=1)
    rng = random.Random(7)
    slow, urgent = [rng.randrange(3, 512) for _ in range(40)], [rng.randrange(3, 512) for _ in range(30)]
    acc: dict = {}
    finished: list[str] = []

    def step():
        for out in eng.step():
            acc.setdefault(out.request_id, RequestOutputAccumulator()).add(out)
            if out.finished:
                finished.append(out.request_id)

    eng.add_request("background", slow, SamplingParams(max_tokens=24, **GREEDY), priority=5)
    for _ in range(4):  # the background request is decoding in the only sequence slot
        step()
    eng.add_request("urgent", urgent, SamplingParams(max_tokens=6, **GREEDY), priority=0)
    while eng.has_unfinished():
        step()
    assert finished == ["urgent", "background"]  # the urgent request took the slot at once
    assert eng.stats().num_preemptions == 1
    # Both outputs equal uninterrupted greedy runs: the preempted request resumed where it stopped.
    for rid, prompt, n in [("urgent", urgent, 6), ("background", slow, 24)]:
        assert acc[rid].result.outputs[0].token_ids == generate_reference(eng.model, prompt, n, ignore_eos=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_engine_equals_the_reference(model_dir):
    gpu = make_engine(model_dir, device="cuda", dtype="float32", gpu_memory_utilization=0.2,
                      max_num_batched_tokens=128, max_num_seqs=16)
    assert gpu.runner.num_blocks * 16 >= gpu.max_model_len  # sized by measuring free memory
    rng = random.Random(99)
    prompts = [([rng.randrange(3, 512) for _ in range(rng.randint(1, 200))], rng.randint(1, 24)) for _ in range(24)]
    for i, (prompt, max_tokens) in enumerate(prompts):
        gpu.add_request(f"g{i}", prompt, SamplingParams(max_tokens=max_tokens, **GREEDY))
    results = run_to_completion(gpu)
    for i, (prompt, max_tokens) in enumerate(prompts):
        want = generate_reference(gpu.model, prompt, max_tokens, ignore_eos=True)
        assert results[f"g{i}"].outputs[0].token_ids == want, f"request {i} diverged"
