"""docker-compose.yml: valid against the Compose specification, and everything it mounts exists."""
from __future__ import annotations

import re
import subprocess

import pytest
import yaml

from deploy_tools import COMPOSE_FILE, PROMETHEUS_CONFIG, REPO, SERVER_PORT, need_compose

PROFILES = ("gpu", "cpu", "train")


def _compose(*args: str) -> subprocess.CompletedProcess:
    # The bundled binary itself, not the wrapper script: its exit code is the verdict.
    return subprocess.run([need_compose(), "-f", str(COMPOSE_FILE), *args], capture_output=True,
                          text=True, timeout=60, cwd=REPO)


def _resolved(profile: str) -> dict:
    result = _compose("--profile", profile, "config", "--format", "yaml")
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


@pytest.mark.parametrize("profile", [None, *PROFILES])
def test_compose_file_validates(profile: str | None) -> None:
    args = ("--profile", profile) if profile else ()
    result = _compose(*args, "config", "-q")
    assert result.returncode == 0, result.stderr


def test_validator_rejects_an_unknown_key(tmp_path) -> None:
    # Proof that the check above can fail: a misspelt key must be refused.
    broken = COMPOSE_FILE.read_text().replace("stop_grace_period:", "stop_grace_periood:", 1)
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(broken)
    result = subprocess.run([need_compose(), "-f", str(bad), "config", "-q"], capture_output=True, text=True,
                            timeout=60, cwd=REPO)
    assert result.returncode != 0
    assert "stop_grace_periood" in result.stderr


@pytest.mark.parametrize("profile", PROFILES)
def test_every_bind_mount_and_build_context_exists(profile: str) -> None:
    config = _resolved(profile)
    for name, service in config["services"].items():
        for volume in service.get("volumes", []):
            if volume["type"] == "bind":
                source = REPO / volume["source"]
                assert source.exists(), f"{name} mounts {volume['source']}, which is not in the repository"
        build = service.get("build")
        if build:
            context = REPO / build["context"]
            assert (context / build.get("dockerfile", "Dockerfile")).exists(), name


def test_profiles_pick_one_server_variant_each() -> None:
    gpu, cpu, train = (_resolved(p)["services"] for p in PROFILES)
    assert "ember" in gpu and "ember-cpu" not in gpu
    assert "ember-cpu" in cpu and "ember" not in cpu
    assert {"train", "finetune"} <= train.keys()
    for services in (gpu, cpu, train):  # monitoring comes with every profile
        assert {"prometheus", "grafana"} <= services.keys()


def _gpu_devices(service: dict) -> list[dict]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def test_gpu_services_reserve_a_gpu_and_cpu_service_does_not() -> None:
    gpu = _resolved("gpu")["services"]["ember"]
    assert any("gpu" in d["capabilities"] and d.get("driver") == "nvidia" for d in _gpu_devices(gpu))
    assert gpu["build"]["args"]["VARIANT"] == "gpu"
    cpu = _resolved("cpu")["services"]["ember-cpu"]
    assert not _gpu_devices(cpu)
    assert cpu["build"]["args"]["VARIANT"] == "cpu"
    # Prometheus scrapes ember:8000; the CPU variant answers to that name too.
    assert "ember" in cpu["networks"]["default"]["aliases"]


def test_server_settings_match_the_image_and_prometheus() -> None:
    for profile, name in (("gpu", "ember"), ("cpu", "ember-cpu")):
        service = _resolved(profile)["services"][name]
        env = service["environment"]
        assert env["EMBER_HOST"] == "0.0.0.0"
        assert int(env["EMBER_PORT"]) == SERVER_PORT
        assert [p["target"] for p in service["ports"]] == [SERVER_PORT]
        assert all(p["host_ip"] == "127.0.0.1" for p in service["ports"]), "publish on loopback by default"
        # Docker's SIGKILL must come after the server's own drain timeout.
        grace = _seconds(service["stop_grace_period"])
        assert grace > float(env["EMBER_DRAIN_TIMEOUT"])
        assert service.get("init") is True
    assert f"ember:{SERVER_PORT}" in PROMETHEUS_CONFIG.read_text()


def _output_path(command: list[str]) -> str:
    """Where a training command writes: --out DIR, or out_dir=DIR inside a shell script."""
    if "--out" in command:
        return command[command.index("--out") + 1]
    match = re.search(r"\bout_dir=(\S+)", " ".join(command))
    assert match, f"no output in {command}"
    return match.group(1)


def test_training_writes_where_the_server_reads() -> None:
    services = _resolved("train")["services"]
    server = _resolved("gpu")["services"]["ember"]
    server_volumes = {v["source"]: v["target"] for v in server["volumes"] if v["type"] == "volume"}
    for job in ("train", "finetune"):
        spec = services[job]
        out = _output_path(spec["command"])
        writable = [v for v in spec["volumes"] if v["type"] == "volume" and not v.get("read_only")]
        mount = next((v for v in writable if out.startswith(v["target"] + "/")), None)
        assert mount, f"{job} writes {out}, which is on no writable volume"
        assert server_volumes.get(mount["source"]) == mount["target"], \
            f"the server does not mount volume {mount['source']} at {mount['target']}"


def test_training_config_named_by_default_is_in_the_repository() -> None:
    script = " ".join(_resolved("train")["services"]["train"]["command"])
    config = re.search(r"--config /opt/ember/configs/(\S+)", script).group(1)
    assert (REPO / "configs" / config).exists(), f"configs/{config} (copied into the image) does not exist"


def _seconds(value) -> float:
    """Compose renders durations as Go strings (45s, 1m30s) or as nanoseconds."""
    if isinstance(value, (int, float)):
        return value / 1e9
    total, number = 0.0, ""
    for ch in str(value):
        if ch.isdigit() or ch == ".":
            number += ch
        else:
            total += float(number) * {"h": 3600, "m": 60, "s": 1}[ch]
            number = ""
    return total
