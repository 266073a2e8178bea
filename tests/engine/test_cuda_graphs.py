"""CUDA-graph bucketing and padding: the host-side logic, which needs no GPU."""
import types

import numpy as np
import pytest
import torch

from engine.attention import KVCache
from engine.cuda_graphs import (CONTEXT_LENS, IDS, POSITIONS, SLOTS, DecodeGraphs, bucket_for, graph_batch_sizes,
                                is_decode, pack_decode)
from engine.scheduler import UNKNOWN_TOKEN, ScheduledSeq, SchedulerOutput


def seq(rid, tokens, start, blocks, sample=True, prompt_logprobs=False):
    return ScheduledSeq(rid, tuple(tokens), start, tuple(blocks), sample, prompt_logprobs)


@pytest.mark.parametrize("max_seqs,expected", [
    (1, [1]),
    (3, [1, 2, 3]),
    (8, [1, 2, 4, 8]),
    (20, [1, 2, 4, 8, 16, 20]),
    (64, [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]),
])
def test_batch_sizes(max_seqs, expected):
    assert graph_batch_sizes(max_seqs) == expected


def test_batch_sizes_are_capped():
    sizes = graph_batch_sizes(1000, cap=96)
    assert sizes[-1] == 96 and len(sizes) == 3 + 96 // 8


def test_bucket_is_the_smallest_that_fits():
    sizes = graph_batch_sizes(20)
    assert [bucket_for(n, sizes) for n in (1, 2, 3, 5, 8, 9, 16, 17, 20)] == [1, 2, 4, 8, 8, 16, 16, 20, 20]
    assert bucket_for(21, sizes) is None


def test_only_pure_decode_steps_are_graphed():
    decode = seq("a", [7], 5, [1])
    assert is_decode(SchedulerOutput(seqs=(decode, seq("b", [9], 0, [2]))))
    assert not is_decode(SchedulerOutput())
    assert not is_decode(SchedulerOutput(seqs=(decode, seq("b", [9, 10], 0, [2]))))  # a prefill chunk
    assert not is_decode(SchedulerOutput(seqs=(decode, seq("b", [9], 3, [2], sample=False))))
    assert not is_decode(SchedulerOutput(seqs=(decode, seq("b", [9], 3, [2], prompt_logprobs=True))))


def test_pack_pads_rows_so_they_write_and_read_nothing():
    vec = np.full((4, 8), 99, dtype=np.int32)  # stale values from an earlier, larger step
    tables = np.full(8 * 6, 77, dtype=np.int32)
    seqs = [seq("a", [11], 5, [3]), seq("b", [12], 20, [4, 9]), seq("c", [13], 35, [1, 2, 6])]
    width = pack_decode(seqs, block_size=16, bucket=4, vec=vec, tables=tables)
    assert width == 3
    assert vec[IDS, :4].tolist() == [11, 12, 13, 0]
    assert vec[POSITIONS, :4].tolist() == [5, 20, 35, 0]
    assert vec[SLOTS, :4].tolist() == [3 * 16 + 5, 9 * 16 + 4, 6 * 16 + 3, -1]
    assert vec[CONTEXT_LENS, :4].tolist() == [6, 21, 36, 0]
    assert tables[:12].reshape(4, 3).tolist() == [[3, 77, 77], [4, 9, 77], [1, 2, 6], [0, 0, 0]]
    # Stale table entries past a row's blocks lie beyond its context, so they are never read; rows past
    # the bucket are padding too, so a larger graph replayed on these inputs reads nothing stale.
    assert vec[IDS, 4:].tolist() == [0] * 4 and vec[SLOTS, 4:].tolist() == [-1] * 4
    assert vec[POSITIONS, 4:].tolist() == vec[CONTEXT_LENS, 4:].tolist() == [0] * 4


class _NoEvent:
    """torch.cuda.Event's stand-in on the CPU: host and device are one, nothing to wait for."""

    def record(self):
        pass

    def synchronize(self):
        pass


def cpu_decode_graphs(monkeypatch, max_num_seqs: int, vocab: int = 128) -> DecodeGraphs:
    """DecodeGraphs' buffers and per-step preparation on the CPU (no capture): pinning and events are stubbed."""
    monkeypatch.setattr(torch.cuda, "Event", _NoEvent)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)
    config = types.SimpleNamespace(head_dim=8, vocab_size=vocab)
    kv = KVCache(1, 64, 16, 1, 8, torch.float32, "cpu")
    return DecodeGraphs(types.SimpleNamespace(config=config), kv, torch.zeros(8, 8), max_num_seqs, 256)


def test_steps_planned_ahead_leave_only_real_ids_in_the_static_inputs(monkeypatch):
    """A step planned before its tokens reached the host carries placeholder ids that its device tokens
    replace in the first n rows. Rows past a smaller later bucket must not keep an earlier step's
    placeholders: any graph replayed on the leftover inputs (a benchmark timing the largest one) would
    embed them, an out-of-range index on the GPU."""
    graphs = cpu_decode_graphs(monkeypatch, max_num_seqs=64)
    for n in (64, 48, 13):
        plan = SchedulerOutput(seqs=tuple(seq(f"r{i}", [UNKNOWN_TOKEN], 5, [i]) for i in range(n)))
        tokens = torch.arange(n, dtype=torch.long) + 7
        inp = graphs.prepare(plan, tokens)
        assert inp.graph_batch == bucket_for(n, graphs.sizes)
        assert inp.input_ids.tolist() == [tokens.tolist()]
        ids = graphs.vec[IDS]
        assert bool(((ids >= 0) & (ids < 128)).all()), ids.tolist()
        assert graphs.vec[SLOTS, n:].tolist() == [-1] * (64 - n)
        assert graphs.vec[CONTEXT_LENS, n:].tolist() == [0] * (64 - n)
