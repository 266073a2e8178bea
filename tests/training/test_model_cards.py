"""The model-card writers in scripts/: the adapter card from a run folder, and where/when a model was built."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"
ADAPTER = ROOT / "models" / "ember-stories-shakespeare"


@pytest.fixture
def build_host(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import build_host as module

    return module


def test_built_on_cpu_names_cores_and_date(build_host):
    text = build_host.built_on("cpu")
    assert re.fullmatch(r"a \d+-core CPU, \d{4}-\d\d-\d\d", text), text


def test_built_on_override_keeps_the_date(build_host):
    text = build_host.built_on("auto", "one NVIDIA H200")
    assert re.fullmatch(r"one NVIDIA H200, \d{4}-\d\d-\d\d", text), text


@pytest.mark.skipif(not (ADAPTER / "finetune_summary.json").exists(), reason="bundled adapter not in this checkout")
def test_adapter_card_from_run_folder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("finetune_summary.json", "finetune_config.yaml", "adapter_config.json"):
        shutil.copy(ADAPTER / name, run / name)
    out = tmp_path / "README.md"
    subprocess.run([sys.executable, str(SCRIPTS / "write_adapter_card.py"), "--run", str(run),
                    "--base-ppl", str(ADAPTER / "ppl_base.json"), "--adapter-ppl", str(ADAPTER / "ppl_adapter.json"),
                    "--out", str(out), "--hardware", "one NVIDIA H200"], check=True, cwd=ROOT)
    card = out.read_text()
    base = json.loads((ADAPTER / "ppl_base.json").read_text())["ppl"]
    tuned = json.loads((ADAPTER / "ppl_adapter.json").read_text())["ppl"]
    assert "| base + adapter | " in card and f"{tuned:.2f} |" in card and f"{base:.2f} |" in card
    assert f"**{1 - tuned / base:.1%}**" in card
    assert re.search(r"Trained on one NVIDIA H200, \d{4}-\d\d-\d\d\.", card)


@pytest.mark.parametrize("card", ["ember-stories", "ember-stories-shakespeare"])
def test_bundled_cards_say_where_and_when_they_were_trained(card):
    path = ROOT / "models" / card / "README.md"
    if not path.exists():
        pytest.skip("bundled model not in this checkout")
    assert re.search(r"(one|a machine with \d+ x) NVIDIA \S+|\d+-core CPU", path.read_text())
    assert re.search(r"\d{4}-\d\d-\d\d", path.read_text())
