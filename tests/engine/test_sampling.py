"""SamplingParams validation and the batched sampler's processors, draws and logprobs."""
import math

import pytest
import torch

from engine.errors import InvalidRequestError
from engine.output_processor import held_back
from engine.sampler import Sampler, SamplingRow, prompt_logprobs
from engine.sampling import SamplingParams

V = 32


def row(params=None, prompt=(1, 2), output=(), stop_ids=frozenset({0}), generator=None):
    return SamplingRow(params or SamplingParams(), list(prompt), list(output), stop_ids, generator)


def fresh_logits(m, seed):
    return torch.randn(m, V, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("field,value", [
    ("n", 0), ("max_tokens", -1), ("temperature", -0.5), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2),
    ("min_p", 1.5), ("presence_penalty", 3.0), ("frequency_penalty", -2.5), ("repetition_penalty", 0.0),
    ("logprobs", 21), ("prompt_logprobs", -1), ("stop", [""]),
])
def test_invalid_params_name_the_field(field, value):
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**{field: value})
    assert err.value.param == field


def test_params_normalise():
    p = SamplingParams(stop="###", top_k=-1, logit_bias={"5": 2})
    assert p.stop == ["###"] and p.top_k == 0 and p.logit_bias == {5: 2.0}
    with pytest.raises(InvalidRequestError, match="min_tokens"):
        SamplingParams(max_tokens=2, min_tokens=3)


def test_greedy_and_degenerate_truncations_pick_the_argmax():
    logits = fresh_logits(4, 0)
    rows = [row(SamplingParams(temperature=0)), row(SamplingParams(top_k=1)),
            row(SamplingParams(top_p=1e-6)), row(SamplingParams(min_p=1.0))]
    out = Sampler("cpu").__call__(logits, rows)
    assert out.token_ids == logits.argmax(-1).tolist()


def test_top_k_and_top_p_keep_only_allowed_tokens():
    logits = fresh_logits(1, 1).expand(400, V).contiguous()
    sampler = Sampler("cpu", seed=3)
    top3 = set(logits[0].topk(3).indices.tolist())
    got = sampler(logits, [row(SamplingParams(top_k=3))] * 400).token_ids
    assert set(got) <= top3 and len(set(got)) > 1
    probs = logits[0].softmax(-1)
    order = probs.argsort(descending=True)
    nucleus = set(order[: int((probs[order].cumsum(0) < 0.6).sum()) + 1].tolist())
    got = sampler(logits, [row(SamplingParams(top_p=0.6))] * 400).token_ids
    assert set(got) <= nucleus


def test_exponential_race_follows_the_distribution():
    logits = torch.tensor([[0.0, math.log(3.0), -1e9, math.log(6.0)]]).expand(6000, 4).contiguous()
    sampler = Sampler("cpu", seed=0)
    rows = [SamplingRow(SamplingParams(), [1], [], frozenset(), None)] * 6000
    got = torch.tensor(sampler(logits, rows).token_ids)
    freq = torch.bincount(got, minlength=4).float() / 6000
    assert freq[2] == 0
    assert torch.allclose(freq, torch.tensor([0.1, 0.3, 0.0, 0.6]), atol=0.03)


def test_seeded_rows_do_not_depend_on_their_neighbours():
    sampler = Sampler("cpu")
    target = fresh_logits(1, 5)
    gen = sampler.make_generator(42)
    seq_alone = [sampler(target, [row(generator=gen)]).token_ids[0] for _ in range(20)]
    gen = sampler.make_generator(42)
    seq_batched = []
    for step in range(20):
        others = fresh_logits(3, 100 + step)
        batch = torch.cat([others[:2], target, others[2:]])
        rows = [row(), row(generator=sampler.make_generator(step)), row(generator=gen), row()]
        seq_batched.append(sampler(batch, rows).token_ids[2])
    assert seq_alone == seq_batched


def test_logit_bias_and_min_tokens():
    logits = torch.zeros(2, V)
    logits[:, 0] = 10.0  # token 0 is the stop token and the favourite
    rows = [row(SamplingParams(temperature=0, min_tokens=2), output=[5]),
            row(SamplingParams(temperature=0, logit_bias={7: 20.0}))]
    out = Sampler("cpu")(logits, rows)
    assert out.token_ids[0] != 0 and out.token_ids[1] == 7
    rows[0] = row(SamplingParams(temperature=0, min_tokens=2), output=[5, 6])
    assert Sampler("cpu")(logits, rows).token_ids[0] == 0


def test_penalties_match_their_definitions():
    logits = fresh_logits(3, 7)
    prompt, output = [1, 2], [2, 3, 3]
    rows = [row(SamplingParams(temperature=0, repetition_penalty=2.0), prompt, output),
            row(SamplingParams(temperature=0, frequency_penalty=0.5), prompt, output),
            row(SamplingParams(temperature=0, presence_penalty=1.5), prompt, output)]
    processed = logits.clone()
    Sampler._apply_penalties(processed, rows)
    want = logits.clone()
    for t in (1, 2, 3):
        want[0, t] = want[0, t] / 2 if want[0, t] > 0 else want[0, t] * 2
    want[1, 2] -= 0.5
    want[1, 3] -= 1.0
    want[2, 2] -= 1.5
    want[2, 3] -= 1.5
    assert torch.allclose(processed, want)


def test_logprobs_are_raw_and_ranked():
    logits = fresh_logits(2, 9)
    rows = [row(SamplingParams(temperature=0, logprobs=3, presence_penalty=2.0), output=[int(logits[0].argmax())]),
            row(SamplingParams(temperature=0))]
    out = Sampler("cpu")(logits, rows)
    lp = logits.log_softmax(-1)
    first = out.logprobs[0]
    assert out.logprobs[1] is None
    assert first.logprob == pytest.approx(lp[0, out.token_ids[0]].item(), abs=1e-5)
    assert first.top_ids == lp[0].topk(3).indices.tolist()
    assert first.top_logprobs == pytest.approx(lp[0].topk(3).values.tolist(), abs=1e-5)
    scored = prompt_logprobs(logits, [4, 5], 0)
    assert [s.logprob for s in scored] == pytest.approx([lp[0, 4].item(), lp[1, 5].item()], abs=1e-5)
    assert scored[0].top_ids == []


def test_held_back_text_is_a_possible_stop_start():
    assert held_back("hello wor", ["world"]) == 3
    assert held_back("hello", ["world"]) == 0
    assert held_back("abc#", ["##", "c#x"]) == 2
    assert held_back("x", ["x"]) == 0  # a whole stop string is matched, not held
