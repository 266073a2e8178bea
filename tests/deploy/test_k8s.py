"""Kubernetes manifests: valid against the API schemas, and consistent with the server and each other."""
from __future__ import annotations

import pytest
import yaml

from deploy_tools import K8S_DIR, REPO, SERVER_PORT

KUBERNETES_VERSION = "1.30"  # oldest release the manifests target


def _documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    return docs


def _one(kind: str) -> dict:
    found = [doc for _, doc in _documents() if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _container(workload: dict) -> dict:
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return container


def _config() -> dict:
    return _one("ConfigMap")["data"]


def test_manifests_parse_and_match_the_api_schema() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (dev extra)")
    docs = _documents()
    kinds = {doc["kind"] for _, doc in docs}
    assert {"Deployment", "Service", "ConfigMap", "Job", "PersistentVolumeClaim"} <= kinds
    for name, doc in docs:
        if doc["kind"] == "Kustomization":
            continue
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)  # raises naming the bad field


def test_kustomization_lists_every_server_manifest() -> None:
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert all((K8S_DIR / name).exists() for name in listed)
    # The Job is created on demand (generateName), everything else is applied together.
    assert listed == {p.name for p in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml", "train-job.yaml"}


def test_port_and_probe_paths_match_the_server() -> None:
    config = _config()
    container = _container(_one("Deployment"))
    port = int(config["EMBER_PORT"])
    assert port == SERVER_PORT
    assert config["EMBER_HOST"] == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": port}

    def probe(kind: str) -> tuple[str, int]:
        get = container[kind]["httpGet"]
        return get["path"], ports.get(get["port"], get["port"])

    assert probe("readinessProbe") == ("/health", port)
    assert probe("livenessProbe") == ("/live", port)
    assert probe("startupProbe") == ("/live", port)
    annotations = _one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/metrics" and int(annotations["prometheus.io/port"]) == port

    service = _one("Service")
    (service_port,) = service["spec"]["ports"]
    assert service_port["port"] == port and ports[service_port["targetPort"]] == port
    pod_labels = _one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


def test_shutdown_budget_covers_prestop_and_drain() -> None:
    deployment = _one("Deployment")
    container = _container(deployment)
    pod = deployment["spec"]["template"]["spec"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pause = float(command[1])
    drain = float(_config()["EMBER_DRAIN_TIMEOUT"])
    assert pause > 0, "without a pause, requests keep arriving after the server stops admitting"
    assert pod["terminationGracePeriodSeconds"] >= pause + drain + 5
    assert pod["enableServiceLinks"] is False, "a Service named ember would inject EMBER_PORT=tcp://..."


def test_gpu_non_root_and_settings_from_the_configmap() -> None:
    deployment = _one("Deployment")
    container = _container(deployment)
    pod = deployment["spec"]["template"]["spec"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert {"configMapRef": {"name": _one("ConfigMap")["metadata"]["name"]}} in container["envFrom"]
    assert all(key.startswith("EMBER_") for key in _config())
    # The API key comes from a Secret, never from the ConfigMap.
    assert not any("KEY" in key for key in _config())
    (api_key,) = [e for e in container["env"] if e["name"] == "EMBER_API_KEY"]
    assert "secretKeyRef" in api_key["valueFrom"]


def test_training_job_writes_a_volume_the_server_reads() -> None:
    job = _one("Job")
    deployment = _one("Deployment")
    spec = job["spec"]["template"]["spec"]
    assert spec["restartPolicy"] == "Never"
    container = _container(job)
    assert container["command"][0] == "ember" and container["command"][1] in ("train", "finetune")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    args = container["args"]
    out = args[args.index("--out") + 1]
    for arg in args:  # files baked into the image from the repository
        if arg.startswith("/opt/ember/configs/"):
            assert (REPO / "configs" / arg.removeprefix("/opt/ember/configs/")).exists(), arg

    def claims(pod: dict, container: dict, writable: bool) -> dict[str, str]:
        by_volume = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                     if "persistentVolumeClaim" in v}
        return {m["mountPath"]: by_volume[m["name"]] for m in container["volumeMounts"]
                if m["name"] in by_volume and (not writable or not m.get("readOnly"))}

    job_mounts = claims(spec, container, writable=True)
    mount = next(path for path in job_mounts if out.startswith(path + "/"))
    server_mounts = claims(deployment["spec"]["template"]["spec"], _container(deployment), writable=False)
    assert server_mounts.get(mount) == job_mounts[mount]
    claim_names = {doc["metadata"]["name"] for _, doc in _documents() if doc["kind"] == "PersistentVolumeClaim"}
    assert set(job_mounts.values()) <= claim_names
