"""Overlapped decode (engine/overlap.py): the same outputs as the synchronous engine, token for token.

The CPU tests force it on (`extra["overlap_decode"]`); there the forward runs inside the launch, so
they check the bookkeeping: rows of requests that end while a step is in flight, requests added or
aborted meanwhile, fallbacks, KV and prefix-cache accounting. The GPU test compares both modes with
CUDA graphs and eagerly on a bf16 model.
"""
import collections
import copy
import json
import random

import pytest
import torch

from _engine_fixtures import build_tiny_checkpoint, make_engine, run_to_completion
from engine.config import EngineConfig
from engine.engine import Engine, StepError
from engine.outputs import RequestOutputAccumulator
from engine.sampling import SamplingParams

GREEDY = dict(temperature=0.0)
BLOCK = 16


@pytest.fixture(autouse=True)
def _no_env_override(monkeypatch):
    monkeypatch.delenv("EMBER_OVERLAP_DECODE", raising=False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny checkpoint with an end-of-sequence id its greedy decoding often produces, so requests
    really end mid-way by EOS."""
    out = build_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))
    probe = make_engine(out)
    rng = random.Random(0)
    for i in range(8):
        probe.add_request(f"p{i}", [rng.randrange(6, 512) for _ in range(rng.randint(3, 40))],
                          SamplingParams(max_tokens=40, ignore_eos=True, **GREEDY))
    counts = collections.Counter(t for r in run_to_completion(probe).values() for t in r.outputs[0].token_ids)
    config = json.loads((out / "config.json").read_text())
    config["eos_token_id"] = [2, 5, counts.most_common(1)[0][0]]
    (out / "config.json").write_text(json.dumps(config))
    return out


def engine_for(model_dir, overlap: bool, **kw) -> Engine:
    kw.setdefault("kv_cache_tokens", 96 * BLOCK)
    kw.setdefault("max_num_batched_tokens", 256)
    kw.setdefault("max_num_seqs", 16)
    return make_engine(model_dir, extra={"overlap_decode": overlap}, **kw)


def drive(engine: Engine, script: dict[int, list[tuple]]) -> dict[str, list[tuple]]:
    """Step until idle, applying script[k] (("add", id, prompt, params) / ("abort", id)) before the k-th
    step() call; returns each request's choices as (token ids, finish reason, stop reason, text, logprobs)."""
    acc: dict[str, RequestOutputAccumulator] = {}
    calls = 0
    while engine.has_unfinished() or any(k >= calls for k in script):
        for action in script.get(calls, []):
            if action[0] == "add":
                engine.add_request(*action[1:])
            else:
                out = engine.abort_request(action[1])
                if out is not None:
                    acc.setdefault(out.request_id, RequestOutputAccumulator()).add(out)
        for out in engine.step():
            acc.setdefault(out.request_id, RequestOutputAccumulator()).add(out)
        calls += 1
    results = {}
    for rid, a in acc.items():
        results[rid] = [(o.token_ids, o.finish_reason, o.stop_reason, o.text, _logprobs(o.logprobs))
                        for o in a.result.outputs]
        assert a.result.finished, rid
    return results


def _logprobs(entries):
    if entries is None:
        return None
    return [(e.token.token_id, round(e.token.logprob, 4), [t.token_id for t in e.top]) for e in entries]


def prompt(rng, lo=3, hi=40):
    return [rng.randrange(6, 512) for _ in range(rng.randint(lo, hi))]


def mixed_script(stop_text: str) -> dict[int, list[tuple]]:
    rng = random.Random(42)
    first = [
        ("add", "eos", prompt(rng), SamplingParams(max_tokens=60, **GREEDY)),
        ("add", "long", prompt(rng, 30, 60), SamplingParams(max_tokens=12, ignore_eos=True, **GREEDY)),
        ("add", "short", prompt(rng), SamplingParams(max_tokens=2, ignore_eos=True, **GREEDY)),
        ("add", "stop", prompt(rng), SamplingParams(max_tokens=50, stop=[stop_text], ignore_eos=True, **GREEDY)),
        ("add", "seeded", prompt(rng), SamplingParams(max_tokens=25, temperature=0.9, top_p=0.95, top_k=50,
                                                      seed=7)),
        ("add", "choices", prompt(rng), SamplingParams(n=2, max_tokens=20, temperature=1.0, seed=11)),
        ("add", "bias", prompt(rng), SamplingParams(max_tokens=15, logit_bias={100: 4.0}, **GREEDY)),
        ("add", "min", prompt(rng), SamplingParams(max_tokens=18, min_tokens=5, **GREEDY)),
        ("add", "lp", prompt(rng), SamplingParams(max_tokens=6, logprobs=2, **GREEDY)),
        ("add", "pen", prompt(rng), SamplingParams(max_tokens=5, repetition_penalty=1.3, **GREEDY)),
        ("add", "victim", prompt(rng), SamplingParams(max_tokens=100, ignore_eos=True, **GREEDY)),
    ]
    return {0: first,
            9: [("add", "late", prompt(rng), SamplingParams(max_tokens=20, temperature=0.7, seed=3))],
            14: [("abort", "victim")],
            30: [("add", "later", prompt(rng), SamplingParams(max_tokens=30, ignore_eos=True, **GREEDY))]}


def stop_text_for(model_dir) -> str:
    """A piece of text the "stop" request of mixed_script would produce, so its stop string is hit."""
    eng = engine_for(model_dir, overlap=False)
    script = mixed_script("\x00")
    _, rid, ids, params = next(a for a in script[0] if a[1] == "stop")
    eng.add_request(rid, ids, SamplingParams(max_tokens=50, ignore_eos=True, **GREEDY))
    text = run_to_completion(eng)[rid].outputs[0].text
    start = next(i for i in range(8, len(text) - 3) if text[i:i + 3].isprintable() and "\ufffd" not in text[i:i + 3])
    return text[start:start + 3]


def test_mixed_workload_gives_the_synchronous_outputs(model_dir):
    script = mixed_script(stop_text_for(model_dir))
    sync, overlap = engine_for(model_dir, overlap=False), engine_for(model_dir, overlap=True)
    want, got = drive(sync, script), drive(overlap, script)
    assert got == want
    # The workload really has what it is meant to: EOS and a stop string mid-way, lengths, an abort.
    assert want["eos"][0][1] == "stop" and len(want["eos"][0][0]) < 60
    assert want["stop"][0][1] == "stop" and isinstance(want["stop"][0][2], str)
    assert want["victim"][0][1] == "abort" and want["short"][0][1] == "length"
    assert overlap.stats().overlapped_steps > 10 and sync.stats().overlapped_steps == 0
    for eng in (sync, overlap):
        stats = eng.stats()
        assert stats.kv_blocks_used == 0 and stats.num_running == stats.num_waiting == 0
        assert eng._in_flight is None and not eng.scheduler.requests


def test_counters_match_the_synchronous_engine(model_dir):
    rng = random.Random(5)
    requests = [(f"r{i}", prompt(rng), SamplingParams(max_tokens=rng.randint(1, 30), ignore_eos=i % 2 == 0,
                                                      **GREEDY)) for i in range(10)]
    stats = []
    for overlap in (False, True):
        eng = engine_for(model_dir, overlap)
        outs = drive(eng, {0: [("add", *r) for r in requests]})
        stats.append((outs, eng.stats()))
    (want, s0), (got, s1) = stats
    assert got == want
    assert s1.overlapped_steps > 0
    for name in ("tokens_computed_total", "num_steps", "generation_tokens_total", "prompt_tokens_total",
                 "prefix_cache_hits", "kv_blocks_used"):
        assert getattr(s1, name) == getattr(s0, name), name


def test_a_full_kv_pool_preempts_as_before(model_dir):
    """Steps ahead never preempt: when the pool has no slot left, the synchronous schedule decides."""
    rng = random.Random(8)
    script = {0: [("add", f"r{i}", prompt(rng, 20, 50), SamplingParams(max_tokens=rng.randint(30, 60),
                                                                       ignore_eos=True, **GREEDY))
                  for i in range(8)]}
    runs = []
    for overlap in (False, True):
        eng = engine_for(model_dir, overlap, kv_cache_tokens=24 * BLOCK, max_model_len=128)
        runs.append((drive(eng, script), eng.stats()))
    (want, s0), (got, s1) = runs
    assert got == want
    assert s0.num_preemptions > 0 and s1.num_preemptions == s0.num_preemptions
    assert s1.overlapped_steps > 0 and s1.kv_blocks_used == 0


def test_a_step_ahead_leaves_out_requests_at_their_length_and_falls_back_for_logprobs(model_dir):
    eng = engine_for(model_dir, overlap=True)
    eng.add_request("a", [7, 8, 9], SamplingParams(max_tokens=3, ignore_eos=True, **GREEDY))
    eng.add_request("b", [10, 11], SamplingParams(max_tokens=8, ignore_eos=True, **GREEDY))
    eng.step()  # prefill of both: nothing launched ahead
    assert eng._in_flight is None
    eng.step()  # decode 1 lands; decode 2 is in flight for both
    assert [s.request_id for s in eng._in_flight.plan.seqs] == ["a", "b"]
    eng.step()  # decode 2 ends "a" (3 tokens): the step after it runs "b" only
    assert [s.request_id for s in eng._in_flight.plan.seqs] == ["b"]
    run_to_completion(eng)
    eng.add_request("lp", [7, 8, 9], SamplingParams(max_tokens=6, logprobs=1, **GREEDY))
    before = eng.stats().overlapped_steps
    run_to_completion(eng)
    assert eng.stats().overlapped_steps == before


def test_min_tokens_and_penalties_read_the_latest_output(model_dir):
    """Requests whose next token depends on their output so far run synchronously while it does."""
    eos = json.loads((model_dir / "config.json").read_text())["eos_token_id"][-1]
    rng = random.Random(23)
    # EOS is always the best token for "min", except while min_tokens masks it (the first 6 outputs).
    eager_to_end = SamplingParams(max_tokens=30, min_tokens=6, logit_bias={eos: 100.0}, **GREEDY)
    plain = ("add", "plain", prompt(rng), SamplingParams(max_tokens=40, ignore_eos=True, **GREEDY))
    scripts = [{0: [("add", "min", prompt(rng), eager_to_end), plain]},
               {0: [("add", "freq", prompt(rng), SamplingParams(max_tokens=24, frequency_penalty=2.0, **GREEDY)),
                    ("add", "rep", prompt(rng), SamplingParams(max_tokens=16, repetition_penalty=1.5, seed=1)),
                    plain]}]
    for script in scripts:
        sync, overlap = engine_for(model_dir, overlap=False), engine_for(model_dir, overlap=True)
        want, got = drive(sync, script), drive(overlap, script)
        assert got == want
        assert overlap.stats().overlapped_steps > 10
    want_min = drive(engine_for(model_dir, overlap=False), scripts[0])["min"][0]
    assert len(want_min[0]) == 7 and want_min[0][-1] == eos and want_min[1] == "stop"


def test_a_request_added_during_a_step_in_flight_starts_at_the_next_schedule(model_dir):
    eng = engine_for(model_dir, overlap=True)
    eng.add_request("a", [7, 8, 9], SamplingParams(max_tokens=50, ignore_eos=True, **GREEDY))
    for _ in range(3):
        eng.step()
    assert eng._in_flight is not None
    eng.add_request("b", [10, 11], SamplingParams(max_tokens=5, ignore_eos=True, **GREEDY))
    assert [o.request_id for o in eng.step()] == ["a"]  # lands the step in flight, launches nothing ahead
    assert eng._in_flight is None
    assert sorted(o.request_id for o in eng.step()) == ["a", "b"]  # b's prefill with a's decode
    run_to_completion(eng)


def test_abort_in_flight_then_the_same_id_again(model_dir):
    """The row of an aborted request in the step in flight is ignored, even when its id is reused."""
    first, second = [20, 21, 22, 23], [40, 41, 42, 43, 44, 45]
    eng = engine_for(model_dir, overlap=True)
    eng.add_request("x", first, SamplingParams(max_tokens=40, ignore_eos=True, **GREEDY))
    for _ in range(4):
        eng.step()
    assert eng._in_flight is not None
    assert eng.abort_request("x").outputs[0].finish_reason == "abort"
    assert eng._in_flight is None and not eng.has_unfinished()  # nothing left to land
    stats = eng.stats()
    assert stats.kv_blocks_used == 0 and stats.num_steps == 4 and stats.tokens_computed_total == len(first) + 3
    # With another request in the step in flight it stays in flight; the new "y" must not take the
    # old one's row when it lands.
    eng.add_request("y", [30, 31, 32], SamplingParams(max_tokens=40, ignore_eos=True, **GREEDY))
    eng.add_request("z", [33, 34], SamplingParams(max_tokens=12, ignore_eos=True, **GREEDY))
    for _ in range(4):
        eng.step()
    assert [s.request_id for s in eng._in_flight.plan.seqs] == ["y", "z"]
    eng.abort_request("y")
    eng.add_request("y", second, SamplingParams(max_tokens=10, ignore_eos=True, **GREEDY))
    assert eng._in_flight is not None
    got = run_to_completion(eng)
    fresh = engine_for(model_dir, overlap=False)
    fresh.add_request("y", second, SamplingParams(max_tokens=10, ignore_eos=True, **GREEDY))
    fresh.add_request("z", [33, 34], SamplingParams(max_tokens=12, ignore_eos=True, **GREEDY))
    want = run_to_completion(fresh)
    assert got["y"].outputs[0].token_ids == want["y"].outputs[0].token_ids
    assert got["z"].outputs[0].token_ids == want["z"].outputs[0].token_ids[4:]  # its first 4 came before
    assert eng.stats().kv_blocks_used == 0


def _eos_prompt(model_dir, residue: int):
    """A prompt after which greedy decoding hits EOS with (prompt + output) % BLOCK == residue, so the
    row launched after the EOS token writes into the last slot of a block (residue 0) or opens a
    block of its own (residue 1)."""
    probe = engine_for(model_dir, overlap=False)
    rng = random.Random(residue)
    for attempt in range(200):
        ids = prompt(rng, 20, 60)
        probe.add_request(f"q{attempt}", ids, SamplingParams(max_tokens=60, **GREEDY))
        out = run_to_completion(probe)[f"q{attempt}"].outputs[0]
        ended_at = len(ids) + len(out.token_ids)
        if out.finish_reason == "stop" and len(out.token_ids) >= 3 and ended_at % BLOCK == residue:
            return ids, out.token_ids
    pytest.fail("no prompt found that ends by EOS at the wanted offset")


@pytest.mark.parametrize("residue", [0, 1])
def test_prefix_cache_after_a_request_ended_by_eos_in_flight(model_dir, residue):
    ids, out = _eos_prompt(model_dir, residue)
    follow = ids + out + [50, 51, 52]
    results = []
    for overlap in (False, True):
        eng = engine_for(model_dir, overlap)
        eng.add_request("a", ids, SamplingParams(max_tokens=60, **GREEDY))
        assert run_to_completion(eng)["a"].outputs[0].token_ids == out
        assert eng.stats().kv_blocks_used == 0
        assert overlap == (eng.stats().overlapped_steps > 0)
        eng.add_request("same", ids, SamplingParams(max_tokens=60, **GREEDY))
        eng.add_request("follow", follow, SamplingParams(max_tokens=12, ignore_eos=True, **GREEDY))
        res = run_to_completion(eng)
        results.append({rid: (r.outputs[0].token_ids, r.metrics.num_cached_tokens) for rid, r in res.items()})
        stats = eng.stats()
        assert stats.kv_blocks_used == 0
        results[-1]["counters"] = (stats.num_steps, stats.tokens_computed_total, stats.generation_tokens_total)
    assert results[1] == results[0]
    # Only blocks full of computed tokens are cached: the EOS token itself was never an input.
    assert results[1]["follow"][1] == (len(ids) + len(out) - 1) // BLOCK * BLOCK
    fresh = engine_for(model_dir, overlap=False, enable_prefix_caching=False)
    fresh.add_request("follow", follow, SamplingParams(max_tokens=12, ignore_eos=True, **GREEDY))
    fresh.add_request("same", ids, SamplingParams(max_tokens=60, **GREEDY))
    res = run_to_completion(fresh)
    assert results[1]["follow"][0] == res["follow"].outputs[0].token_ids
    assert results[1]["same"][0] == res["same"].outputs[0].token_ids == out


def test_a_failing_step_ahead_fails_only_its_requests(model_dir, monkeypatch):
    eng = engine_for(model_dir, overlap=True)
    read = eng._read

    def flaky(flight, keep):
        if flight.ahead and "doomed" in flight.request_ids:
            raise RuntimeError("device fell over")
        return read(flight, keep)

    monkeypatch.setattr(eng, "_read", flaky)
    eng.add_request("doomed", [5, 6, 7], SamplingParams(max_tokens=20, ignore_eos=True, **GREEDY))
    eng.add_request("bystander", [8, 9], SamplingParams(max_tokens=20, ignore_eos=True, **GREEDY))
    with pytest.raises(StepError) as err:
        for _ in range(5):
            eng.step()
    assert err.value.request_ids == ["doomed", "bystander"] and not eng.has_unfinished()
    assert eng._in_flight is None and eng.stats().kv_blocks_used == 0
    eng.add_request("fine", [5, 6, 7], SamplingParams(max_tokens=5, **GREEDY))
    assert len(run_to_completion(eng)["fine"].outputs[0].token_ids) == 5


def test_a_launch_ahead_that_raises_falls_back_to_synchronous_steps(model_dir, monkeypatch, caplog):
    script = {0: [("add", f"r{i}", [9 + i, 10, 11], SamplingParams(max_tokens=12, ignore_eos=True, **GREEDY))
                  for i in range(3)]}
    want = drive(engine_for(model_dir, overlap=False), script)
    eng = engine_for(model_dir, overlap=True)
    real = eng.runner.execute
    monkeypatch.setattr(eng.runner, "execute", lambda plan: real(plan))  # an override that knows no input_ids
    assert drive(eng, script) == want
    assert not eng.overlap and eng.stats().overlapped_steps == 0 and "overlapped decode is off" in caplog.text


def test_switches(model_dir, monkeypatch):
    assert not make_engine(model_dir).overlap  # off by default on a CPU
    assert engine_for(model_dir, overlap=True).overlap
    monkeypatch.setenv("EMBER_OVERLAP_DECODE", "0")
    assert not engine_for(model_dir, overlap=True).overlap
    monkeypatch.setenv("EMBER_OVERLAP_DECODE", "1")
    assert engine_for(model_dir, overlap=False).overlap


# -- the same comparison on a peaked random model, with CUDA graphs on a GPU ----------------------
def _random_model_engine(model, device: str, overlap: bool, eager: bool = False) -> Engine:
    config = EngineConfig(device=device, max_model_len=256, block_size=BLOCK, max_num_seqs=16,
                          max_num_batched_tokens=96, gpu_memory_utilization=0.3,
                          kv_cache_tokens=None if device == "cuda" else 4096,
                          extra={"overlap_decode": overlap, "enforce_eager": eager})
    return Engine(config, model=copy.deepcopy(model).to(device), tokenizer=None)


def compare_on_random_model(model, device: str, eager: bool = False) -> None:
    rng = random.Random(9)
    requests = [(f"r{i}", [rng.randrange(3, 128) for _ in range(rng.randint(1, 150))], rng.randint(1, 60))
                for i in range(20)]
    probe = _random_model_engine(model, device, overlap=False, eager=eager)
    for rid, ids, max_tokens in requests:
        probe.add_request(rid, ids, SamplingParams(max_tokens=max_tokens, ignore_eos=True, **GREEDY))
    free_running = {rid: r.outputs[0].token_ids for rid, r in run_to_completion(probe).items()}
    del probe
    first = []
    for i, (rid, ids, max_tokens) in enumerate(requests):
        out = free_running[rid]
        # Every third request stops on a token of its own output, as on EOS: it ends mid-way.
        stop = [out[len(out) // 2]] if i % 3 == 0 and len(out) > 2 else []
        params = SamplingParams(max_tokens=max_tokens, stop_token_ids=stop, ignore_eos=True, **GREEDY)
        if i % 5 == 4:  # seeded sampling (on peaked logits), through the sampler's device path
            params = SamplingParams(max_tokens=max_tokens, temperature=0.8, seed=i, ignore_eos=True)
        first.append(("add", rid, ids, params))
    script = {0: first[:12], 5: first[12:], 20: [("abort", "r1")]}
    results, engines = [], []
    for overlap in (False, True):
        eng = _random_model_engine(model, device, overlap, eager)
        results.append(drive(eng, script))
        engines.append(eng)
    assert results[1] == results[0]
    assert sum(r[0][1] == "stop" for r in results[0].values()) >= 3
    assert engines[1].stats().overlapped_steps > 20 and engines[0].stats().overlapped_steps == 0
    assert all(e.stats().kv_blocks_used == 0 for e in engines)
    assert (engines[1].runner.graphs is not None) == (device == "cuda" and not eager)


def test_random_model_on_the_cpu():
    from test_fused_path import peaked_model

    compare_on_random_model(peaked_model(3), "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("eager", [False, True], ids=["cuda-graphs", "eager"])
def test_gpu_overlapped_decode_gives_the_synchronous_tokens(eager):
    from test_fused_path import peaked_model

    compare_on_random_model(peaked_model(3).to(torch.bfloat16), "cuda", eager)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_overlapped_decode_at_64_requests():
    """64 requests at once through the CUDA graphs (buckets 16 to 64), leaving the batch at many
    different steps: the size of the benchmark runs, beyond the 16 of the test above. Afterwards the
    static inputs hold real ids only, and the largest graph replays on them as the benchmark's GPU
    timing does (an earlier step's placeholder ids left there would be an out-of-range embedding)."""
    from engine.cuda_graphs import IDS
    from test_fused_path import peaked_model

    model = peaked_model(5).to(torch.bfloat16)
    rng = random.Random(3)
    requests = [(f"q{i}", [rng.randrange(3, 128) for _ in range(rng.randint(64, 128))], rng.randint(8, 120))
                for i in range(64)]
    results = []
    for overlap in (False, True):
        config = EngineConfig(device="cuda", max_model_len=256, block_size=BLOCK, max_num_seqs=64,
                              max_num_batched_tokens=2048, gpu_memory_utilization=0.3,
                              extra={"overlap_decode": overlap})
        eng = Engine(config, model=copy.deepcopy(model).to("cuda"), tokenizer=None)
        for rid, ids, max_tokens in requests:
            eng.add_request(rid, ids, SamplingParams(max_tokens=max_tokens, ignore_eos=True, **GREEDY))
        results.append({rid: r.outputs[0].token_ids for rid, r in run_to_completion(eng).items()})
        assert (eng.stats().overlapped_steps > 50) == overlap
        assert eng.stats().kv_blocks_used == 0
        graphs = eng.runner.graphs
        ids = graphs.vec[IDS]
        assert bool(((ids >= 0) & (ids < model.config.vocab_size)).all()), ids.tolist()
        graphs.graphs[graphs.max_batch].replay()
        torch.cuda.synchronize()
    assert results[1] == results[0]
