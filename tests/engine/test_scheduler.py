"""Scheduler: token-count scheduling, chunked prefill, prefix hits, preemption, priority, forks (no torch)."""
from engine.kv_cache import KVCacheManager
from engine.request import Request, RequestStatus
from engine.sampling import SamplingParams
from engine.scheduler import Scheduler


def make_request(rid, prompt_len, max_tokens=4, priority=0, first_token=1000, **params):
    prompt = [first_token + i for i in range(prompt_len)]
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, **params), max_tokens, priority=priority)


def make_scheduler(num_blocks=64, block_size=4, max_num_seqs=8, budget=32, chunked=True, prefix=True):
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=prefix)
    return Scheduler(kv, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, enable_chunked_prefill=chunked)


def run_step(sched, token=7):
    out = sched.schedule()
    sampled = {s.request_id: token for s in out.seqs if s.sample}
    sampled.update({child: token for child, _ in out.forks})
    sched.update(out, sampled)
    return out


def counts(out):
    return {s.request_id: len(s.token_ids) for s in out.seqs}


def test_prefill_then_decode_by_token_counts():
    sched = make_scheduler()
    sched.add(make_request("a", 10, max_tokens=3))
    out = run_step(sched)
    assert counts(out) == {"a": 10} and out.seqs[0].sample and out.seqs[0].start_pos == 0
    assert len(out.seqs[0].block_ids) == 3
    out = run_step(sched)
    assert counts(out) == {"a": 1} and out.seqs[0].start_pos == 10 and out.seqs[0].token_ids == (7,)
    run_step(sched)
    assert not sched.has_unfinished()
    assert sched.kv.num_free_blocks == sched.kv.num_blocks


def test_chunked_prefill_splits_long_prompts_under_the_budget():
    sched = make_scheduler(budget=8)
    sched.add(make_request("a", 20))
    sched.add(make_request("b", 3))
    steps = [counts(run_step(sched)) for _ in range(3)]
    assert steps[0] == {"a": 8}
    assert steps[1] == {"a": 8}
    assert steps[2] == {"a": 4, "b": 3}  # a's last chunk samples; b fills the rest of the budget


def test_without_chunking_a_prompt_waits_for_a_whole_budget():
    sched = make_scheduler(budget=16, chunked=False)
    sched.add(make_request("a", 10))
    sched.add(make_request("b", 10, first_token=2000))
    assert counts(run_step(sched)) == {"a": 10}
    assert counts(run_step(sched)) == {"a": 1, "b": 10}


def test_sequence_cap_and_priority_then_fcfs():
    sched = make_scheduler(max_num_seqs=2)
    sched.add(make_request("late-urgent", 2, priority=-1))
    sched.add(make_request("first", 2))
    sched.add(make_request("second", 2))
    sched.requests["late-urgent"].arrival_seq = 10**9  # arrived last
    sched.waiting.sort(key=lambda r: r.sort_key)
    assert set(counts(run_step(sched))) == {"late-urgent", "first"}


def test_prefix_hit_skips_cached_blocks():
    sched = make_scheduler()
    sched.add(make_request("a", 13, max_tokens=1))
    run_step(sched)
    assert not sched.has_unfinished()
    sched.add(make_request("b", 13, max_tokens=1))
    out = run_step(sched)
    # 13 tokens: the 3 full blocks (12 tokens) come from the cache, the last token is computed
    assert out.seqs[0].start_pos == 12 and len(out.seqs[0].token_ids) == 1
    assert sched.stats.prefix_cache_hits == 12 and sched.stats.prefix_cache_queries == 26


def test_prompt_logprobs_requests_skip_the_prefix_cache():
    sched = make_scheduler()
    sched.add(make_request("a", 13, max_tokens=1))
    run_step(sched)
    sched.add(make_request("b", 13, max_tokens=1, prompt_logprobs=0))
    out = run_step(sched)
    assert out.seqs[0].start_pos == 0 and out.seqs[0].prompt_logprobs


def test_preemption_frees_newest_and_resumes_with_its_output():
    # 6 blocks of 4 tokens; two requests of 8 prompt tokens growing to 16 cannot both fit.
    sched = make_scheduler(num_blocks=6, block_size=4, prefix=False)
    sched.add(make_request("old", 8, max_tokens=8))
    sched.add(make_request("new", 8, max_tokens=8, first_token=2000))
    preempted = []
    for _ in range(40):
        if not sched.has_unfinished():
            break
        out = run_step(sched)
        preempted += out.preempted
        assert sched.kv.num_free_blocks >= 0
    assert preempted and preempted[0] == "new"
    assert sched.stats.num_preemptions == len(preempted)
    assert not sched.has_unfinished() and sched.kv.num_free_blocks == 6


def test_preempted_request_recomputes_prompt_and_output():
    sched = make_scheduler(num_blocks=6, block_size=4, prefix=False)
    old, new = make_request("old", 8, max_tokens=8), make_request("new", 8, max_tokens=8, first_token=2000)
    sched.add(old)
    sched.add(new)
    while "new" not in [rid for rid in run_step(sched).preempted]:
        pass
    assert new.status is RequestStatus.WAITING and new.num_computed_tokens == 0
    n_out = new.num_output_tokens
    assert n_out > 0
    while True:
        out = run_step(sched)
        if "new" in counts(out):
            break
    seq = next(s for s in out.seqs if s.request_id == "new")
    assert seq.start_pos == 0 and len(seq.token_ids) == 8 + n_out and seq.sample
    assert list(seq.token_ids) == new.prompt_token_ids + [7] * n_out


def test_finish_and_abort_release_blocks_in_any_state():
    sched = make_scheduler(max_num_seqs=1)
    sched.add(make_request("run", 6))
    sched.add(make_request("wait", 6))
    run_step(sched)
    assert sched.num_running == 1 and sched.num_waiting == 1
    sched.finish("run", RequestStatus.FINISHED_ABORTED)
    sched.finish("wait", RequestStatus.FINISHED_ABORTED)
    assert not sched.has_unfinished() and sched.kv.num_free_blocks == sched.kv.num_blocks
    assert sched.finish("unknown", RequestStatus.FINISHED_ABORTED) is None


def test_stop_tokens_respect_min_tokens():
    sched = make_scheduler()
    req = Request("a", [1, 2], SamplingParams(max_tokens=10, min_tokens=2, stop_token_ids=[7]), 10)
    sched.add(req)
    run_step(sched, token=7)
    run_step(sched, token=7)
    assert not req.is_finished
    run_step(sched, token=7)
    assert req.status is RequestStatus.FINISHED_STOPPED and req.stop_reason == 7 and req.num_output_tokens == 3


def test_siblings_fork_from_the_parent_prompt():
    sched = make_scheduler(block_size=4)
    params = SamplingParams(n=3, max_tokens=2)
    parent = Request("r", list(range(10)), params, 2, group_id="r", index=0)
    kids = [Request(f"r#{i}", list(range(10)), params, 2, group_id="r", index=i) for i in (1, 2)]
    sched.add(parent, kids)
    out = sched.schedule()
    assert counts(out) == {"r": 10} and [c for c, _ in out.forks] == ["r#1", "r#2"]
    shared = sched.kv.block_table("r")[:2]
    assert all(sched.kv.block_table(k.request_id) == shared for k in kids)
    sched.update(out, {"r": 5, "r#1": 6, "r#2": 7})
    assert [k.output_token_ids for k in kids] == [[6], [7]]
    out = sched.schedule()
    # each child recomputes the partial tail block (2 prompt tokens) plus its first token
    assert counts(out) == {"r": 1, "r#1": 3, "r#2": 3}
    sched.update(out, {"r": 1, "r#1": 1, "r#2": 1})
    assert not sched.has_unfinished() and sched.kv.num_free_blocks == sched.kv.num_blocks


def test_an_urgent_arrival_preempts_the_least_urgent_running_request_at_the_sequence_cap():
    sched = make_scheduler(max_num_seqs=2)
    sched.add(make_request("normal", 2, max_tokens=20))
    sched.add(make_request("background", 2, max_tokens=20, priority=5, first_token=2000))
    run_step(sched)
    assert {r.request_id for r in sched.running} == {"normal", "background"}
    sched.add(make_request("urgent", 2, max_tokens=20, priority=-1, first_token=3000))
    out = run_step(sched)
    assert out.preempted == ("background",)  # the least urgent goes, not the newest
    assert set(counts(out)) == {"normal", "urgent"}
    bg = sched.requests["background"]
    assert bg.status == RequestStatus.WAITING and bg.num_computed_tokens == 0 and bg.num_output_tokens == 1
    # Equal priorities never preempt each other: a second normal request waits its turn.
    sched.add(make_request("normal-2", 2, max_tokens=20, first_token=4000))
    out = run_step(sched)
    assert out.preempted == () and set(counts(out)) == {"normal", "urgent"}


def test_an_urgent_arrival_preempts_for_kv_blocks_only_when_that_makes_room():
    # 8 blocks of 4 tokens: two running requests hold 3 blocks each.
    sched = make_scheduler(num_blocks=8, max_num_seqs=4, budget=64, prefix=False)
    sched.add(make_request("a", 10, max_tokens=20, priority=1))
    sched.add(make_request("b", 10, max_tokens=20, priority=1, first_token=2000))
    run_step(sched)
    assert sched.kv.num_free_blocks == 2
    # A more urgent request too big to fit even if both were preempted: nobody is preempted.
    sched.add(make_request("huge", 40, max_tokens=1, priority=0, first_token=3000))
    out = run_step(sched)
    assert out.preempted == () and set(counts(out)) == {"a", "b"}
    sched.finish("huge", RequestStatus.FINISHED_ABORTED)
    # One that fits in the 2 free blocks starts without preempting anybody.
    sched.add(make_request("small", 8, max_tokens=1, priority=0, first_token=5000))
    out = run_step(sched)
    assert out.preempted == () and set(counts(out)) == {"a", "b", "small"}
    # One needing 3 blocks: the newest low-priority request goes (and is not re-admitted this step).
    sched.add(make_request("urgent", 12, max_tokens=2, priority=0, first_token=4000))
    out = run_step(sched)
    assert out.preempted == ("b",) and set(counts(out)) == {"a", "urgent"}
    while sched.has_unfinished():  # everyone finishes, the preempted request by recompute
        run_step(sched)
    assert sched.kv.num_free_blocks == sched.kv.num_blocks


def test_no_priority_preemption_for_a_request_waiting_on_an_adapter_slot():
    kv = KVCacheManager(64, 4, enable_prefix_caching=False)
    sched = Scheduler(kv, max_num_seqs=1, max_num_batched_tokens=32, adapter_fit=lambda active: len(active) <= 1)
    running = make_request("bg", 4, max_tokens=20, priority=5)
    running.adapter = ("a", 1)
    sched.add(running)
    run_step(sched)
    urgent = make_request("urgent", 4, max_tokens=2, priority=0, first_token=2000)
    urgent.adapter = ("b", 1)  # a second adapter: no slot while "bg" runs with "a"
    sched.add(urgent)
    out = run_step(sched)
    assert out.preempted == () and set(counts(out)) == {"bg"}
