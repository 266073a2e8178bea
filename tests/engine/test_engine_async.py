"""AsyncEngine: concurrent streams, validation before the first output, cancellation, failing steps."""
import asyncio
import contextlib

import pytest

from _engine_fixtures import build_tiny_checkpoint, make_engine
from engine.async_engine import AsyncEngine
from engine.errors import ContextLengthError, EmberError
from engine.generate import generate_reference
from engine.sampling import SamplingParams

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return make_engine(build_tiny_checkpoint(tmp_path_factory.mktemp("tiny")), kv_cache_tokens=64 * 16)


def run(engine, coro_fn):
    async def main():
        aeng = AsyncEngine.from_engine(engine)
        await aeng.start()
        try:
            return await coro_fn(aeng)
        finally:
            await aeng.shutdown()

    return asyncio.run(main())


async def collect(stream):
    outs = [out async for out in stream]
    return outs


def test_concurrent_streams_equal_the_reference(engine):
    prompts = [[5 + i, 60, 7 * i + 3, 99] * (i + 1) for i in range(6)]

    async def body(aeng):
        streams = [collect(aeng.generate(p, SamplingParams(max_tokens=12, **GREEDY), request_id=f"s{i}"))
                   for i, p in enumerate(prompts)]
        return await asyncio.gather(*streams)

    results = run(engine, body)
    for prompt, outs in zip(prompts, results):
        assert outs[-1].finished and all(not o.finished for o in outs[:-1])
        tokens = [t for o in outs for t in o.outputs[0].token_ids]
        assert tokens == generate_reference(engine.model, prompt, 12, ignore_eos=True)
        assert len(outs) == 12  # one output per token: streaming, not batched at the end
        assert outs[-1].metrics.first_token_time <= outs[-1].metrics.last_token_time
    assert not engine.has_unfinished()


def test_validation_errors_raise_before_the_first_output(engine):
    async def body(aeng):
        with pytest.raises(ContextLengthError):
            await aeng.generate([5] * 1000, SamplingParams()).__anext__()
        assert aeng.num_unfinished == 0

    run(engine, body)


def test_cancelling_the_consumer_aborts_and_frees_blocks(engine):
    kv = engine.scheduler.kv

    async def body(aeng):
        first = asyncio.Event()

        async def consume():
            async for _ in aeng.generate(list(range(5, 105)), SamplingParams(max_tokens=300, **GREEDY)):
                first.set()

        task = asyncio.create_task(consume())
        await first.wait()
        assert kv.num_free_blocks < kv.num_blocks
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await aeng.barrier()
        assert kv.num_free_blocks == kv.num_blocks and aeng.num_unfinished == 0
        assert not engine.has_unfinished()

        # closing the iterator early aborts too
        async with contextlib.aclosing(aeng.generate([5, 6, 7], SamplingParams(max_tokens=300, **GREEDY))) as it:
            async for _ in it:
                break
        await aeng.barrier()
        assert kv.num_free_blocks == kv.num_blocks and not engine.has_unfinished()

    run(engine, body)


def test_abort_from_outside_ends_the_stream(engine):
    async def body(aeng):
        outs = []
        async for out in aeng.generate([5, 6, 7], SamplingParams(max_tokens=300, **GREEDY), request_id="x"):
            outs.append(out)
            if len(outs) == 2:
                aeng.abort("x")
        return outs

    outs = run(engine, body)
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
    assert not engine.has_unfinished()


def test_a_failing_step_fails_its_requests_and_the_loop_goes_on(engine, monkeypatch):
    real = engine.runner.execute

    def flaky(plan):
        if any(s.request_id == "doomed" for s in plan.seqs):
            raise RuntimeError("device fell over")
        return real(plan)

    monkeypatch.setattr(engine.runner, "execute", flaky)

    async def body(aeng):
        with pytest.raises(EmberError, match="device fell over"):
            await collect(aeng.generate([5, 6], SamplingParams(max_tokens=4), request_id="doomed"))
        outs = await collect(aeng.generate([5, 6], SamplingParams(max_tokens=4, **GREEDY), request_id="fine"))
        return outs

    outs = run(engine, body)
    assert outs[-1].finished and sum(len(o.outputs[0].token_ids) for o in outs) == 4
    assert engine.scheduler.kv.num_free_blocks == engine.scheduler.kv.num_blocks
