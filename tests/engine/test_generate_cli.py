"""`ember generate` and `ember new-tiny` as a user runs them."""
import json
import subprocess
import sys

import pytest

from engine.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    subprocess.run([sys.executable, "-m", "ember_cli.main", "new-tiny", "--out", str(out), "--seed", "3"],
                   check=True, capture_output=True)
    return out


def ember(*args):
    return subprocess.run([sys.executable, "-m", "ember_cli.main", *args], capture_output=True, text=True)


def test_generate_json_text_continues_the_prompt(tiny):
    r = ember("generate", "--model", str(tiny), "--prompt", "Once upon a time", "--max-tokens", "12",
              "--ignore-eos", "--json")
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout)
    assert len(row["output_ids"]) == 12
    tok = Tokenizer.from_dir(tiny)
    assert row["prompt_ids"] == tok.encode("Once upon a time")
    full = tok.decode(row["prompt_ids"] + row["output_ids"])
    assert full == tok.decode(row["prompt_ids"]) + row["text"]


def test_generate_prompt_ids_and_seeded_sampling(tiny):
    args = ("generate", "--model", str(tiny), "--prompt-ids", "1,20,30", "--max-tokens", "8",
            "--temperature", "1.0", "--seed", "5", "--ignore-eos", "--json")
    a, b = ember(*args), ember(*args)
    assert a.returncode == 0, a.stderr
    assert json.loads(a.stdout)["output_ids"] == json.loads(b.stdout)["output_ids"]


@pytest.mark.parametrize("ids, message", [("1,x", "comma-separated integers"), ("1,99999", "outside the vocabulary")])
def test_generate_bad_prompt_ids(tiny, ids, message):
    r = ember("generate", "--model", str(tiny), "--prompt-ids", ids)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr


def test_generate_missing_model_is_one_clear_line(tmp_path):
    r = ember("generate", "--model", str(tmp_path / "none"), "--prompt", "hi")
    assert r.returncode == 2
    assert "does not exist" in r.stderr and "Traceback" not in r.stderr
