"""The compose training jobs' command lines, run outside a container against the real CLI.

The `finetune` service's resolved command is executed with its container paths mapped onto the
repository (the sample data) and a temporary folder (the adapters volume), one optimizer step long.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deploy_tools import COMPOSE_FILE, REPO, need_compose

pytestmark = pytest.mark.timeout(180)


def _service(name: str) -> dict:
    result = subprocess.run([need_compose(), "-f", str(COMPOSE_FILE), "--profile", "train", "config", "--format",
                             "yaml"], capture_output=True, text=True, timeout=60, cwd=REPO)
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

    command = [ember, "finetune", *map(host, service["command"]), "train.max_steps=1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=150, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    out = Path(host(service["command"][service["command"].index("--out") + 1]))
    assert out.parent == adapters  # the adapters volume, which the server mounts as its LoRA root
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert (out / "adapter_model.safetensors").stat().st_size > 0
