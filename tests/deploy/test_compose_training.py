"""The compose training jobs' command lines, run outside a container against the real CLI.

Each service's resolved command is executed with its container paths mapped onto the repository
and temporary folders (standing in for the volumes), a step or two long.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deploy_tools import COMPOSE_FILE, REPO, need_compose

pytestmark = pytest.mark.timeout(180)


def _service(name: str, env: dict[str, str] | None = None) -> dict:
    result = subprocess.run([need_compose(), "-f", str(COMPOSE_FILE), "--profile", "train", "config", "--format",
                             "yaml"], capture_output=True, text=True, timeout=60, cwd=REPO,
                            env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)["services"][name]


def _ember() -> str:
    ember = Path(sys.executable).parent / "ember"
    if not ember.exists():
        pytest.skip("the ember command is not installed in this environment")
    return str(ember)


def test_finetune_service_command_trains_an_adapter(tmp_path) -> None:
    ember = _ember()
    service = _service("finetune")
    assert service["entrypoint"] == ["ember", "finetune"]
    base = tmp_path / "base"
    subprocess.run([ember, "new-tiny", "--out", str(base)], check=True, capture_output=True, timeout=120)
    # Container paths -> host paths, from the service's own mounts.
    mounts = {v["target"]: v for v in service["volumes"]}
    data_dir = REPO / mounts["/data"]["source"]
    adapters = tmp_path / "adapters"
    mapping = {"/opt/ember/models/ember-stories": str(base), "/data": str(data_dir), "/adapters": str(adapters)}

    def host(arg: str) -> str:
        for prefix, target in mapping.items():
            if arg == prefix or arg.startswith(prefix + "/"):
                return target + arg[len(prefix):]
        return arg

    mapping["/opt/ember/configs"] = str(REPO / "configs")
    config_arg = service["command"][service["command"].index("--config") + 1]
    assert Path(host(config_arg)).exists(), f"{config_arg} is not in the repository's configs/"
    command = [ember, "finetune", *map(host, service["command"]), "train.max_steps=1", "schedule.warmup_steps=0"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=150, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    out = Path(host(service["command"][service["command"].index("--out") + 1]))
    assert out.parent == adapters  # the adapters volume, which the server mounts as its LoRA root
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert (out / "adapter_model.safetensors").stat().st_size > 0


def test_train_service_script_pretrains_a_servable_checkpoint(tmp_path) -> None:
    ember = _ember()
    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    shutil.copy(REPO / "engine" / "assets" / "tiny_corpus.txt", corpus_dir / "corpus.txt")
    # The tiny config and a two-step run instead of the bundled model's recipe.
    service = _service("train", {"EMBER_DATA_DIR": str(corpus_dir), "EMBER_TRAIN_CONFIG": "tiny.yaml",
                                 "EMBER_TRAIN_VOCAB": "512", "EMBER_TRAIN_SEQ_LEN": "128",
                                 "EMBER_TRAIN_NAME": "smoke",
                                 "EMBER_TRAIN_OVERRIDES": "train.max_steps=2 schedule.warmup_steps=1"})
    assert service["entrypoint"][0] == "/bin/sh"
    (script,) = service["command"]
    models = tmp_path / "models"
    mapping = {"/data": str(REPO / [v for v in service["volumes"] if v["target"] == "/data"][0]["source"]),
               "/models": str(models), "/tmp/ember-train": str(tmp_path / "scratch"),
               "/opt/ember/configs": str(REPO / "configs")}
    pattern = re.compile(r"(?<![\w/.])(" + "|".join(map(re.escape, mapping)) + r")(?=/)")
    host_script = pattern.sub(lambda m: mapping[m.group(1)], script)
    env = {**os.environ, "PATH": f"{Path(ember).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run([service["entrypoint"][0], *service["entrypoint"][1:], host_script],
                            capture_output=True, text=True, timeout=170, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    final = models / "smoke" / "final"  # what EMBER_MODEL=/models/smoke/final serves
    assert (final / "config.json").exists() and (final / "model.safetensors").exists()
    assert (final / "tokenizer.model").exists() or (final / "tokenizer.json").exists()
