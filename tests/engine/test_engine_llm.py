"""Offline use: the LLM class and `ember generate --prompts-file`."""
import json

import pytest

from _engine_fixtures import build_tiny_checkpoint
from engine.generate import generate_reference
from engine.llm import LLM
from engine.sampling import SamplingParams


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(str(model_dir), device="cpu", max_model_len=256, kv_cache_tokens=2048)


def test_llm_generates_in_input_order(llm):
    tok = llm.tokenizer
    prompts = ["the cat sat on", [1, 40, 41, 42], "a", [1] + [77] * 60]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (9, 3, 12, 5)]
    results = llm.generate(prompts, params)
    assert [r.finished for r in results] == [True] * 4
    for prompt, p, r in zip(prompts, params, results):
        ids = tok.encode(prompt) if isinstance(prompt, str) else prompt
        assert r.prompt_token_ids == ids
        out = r.outputs[0]
        assert out.token_ids == generate_reference(llm.engine.model, ids, p.max_tokens, ignore_eos=True)
        assert out.num_tokens == p.max_tokens and out.finish_reason == "length"
        assert out.text.strip() == tok.decode(out.token_ids).strip()


def test_llm_refuses_the_whole_batch_on_one_bad_prompt(llm):
    from engine.errors import ContextLengthError

    with pytest.raises(ContextLengthError):
        llm.generate([[5, 6], [5] * 300], SamplingParams(max_tokens=4))
    assert not llm.engine.has_unfinished()


def test_cli_prompts_file(model_dir, tmp_path, capsys):
    from ember_cli.main import main

    lines = [{"prompt": "the cat sat on", "max_tokens": 6},
             {"prompt_ids": [1, 9, 8, 7], "max_tokens": 4, "ignore_eos": True},
             {"prompt_ids": [1, 9, 8, 7], "max_tokens": 5, "temperature": 0.7, "seed": 11, "stop": ["zzzz"]}]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    rc = main(["generate", "--model", str(model_dir), "--prompts-file", str(path), "--json",
               "--kv-cache-tokens", "8192", "--max-num-seqs", "2"])
    assert rc == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(rows) == 3 and rows[1]["prompt_ids"] == [1, 9, 8, 7]
    llm = LLM(str(model_dir), device="cpu", kv_cache_tokens=8192)
    want = llm.generate([lines[0]["prompt"], [1, 9, 8, 7], [1, 9, 8, 7]],
                        [SamplingParams(temperature=0, max_tokens=6), SamplingParams(temperature=0, max_tokens=4,
                                                                                      ignore_eos=True),
                         SamplingParams(temperature=0.7, seed=11, max_tokens=5, stop=["zzzz"])])
    for row, w in zip(rows, want):
        assert row["output_ids"] == w.outputs[0].token_ids and row["text"] == w.outputs[0].text

    path.write_text('{"prompt": "x", "temprature": 0.5}\n')
    assert main(["generate", "--model", str(model_dir), "--prompts-file", str(path)]) == 2
    assert "prompts.jsonl:1: unknown field(s) temprature" in capsys.readouterr().err
