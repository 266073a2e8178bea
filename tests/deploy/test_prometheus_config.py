"""Prometheus configuration and alert rules, checked by Prometheus's own promtool."""
from __future__ import annotations

import subprocess

import yaml

from deploy_tools import PROMETHEUS_CONFIG, REPO, SERVER_PORT, need_binary, rule_files
from promql_exprs import EXPOSED_NAMES, metric_names, rule_expressions

ALERTS_TEST = REPO / "tests" / "deploy" / "prometheus" / "alerts_test.yml"
PROMTOOL_PROVIDER = "the Debian package prometheus"


def _promtool(*args: str) -> subprocess.CompletedProcess:
    promtool = need_binary("promtool", PROMTOOL_PROVIDER)
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)


def test_promtool_check_config_passes() -> None:
    result = _promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    # The config loads the rules from rules/ (promtool counts what the glob found).
    assert f"SUCCESS: {len(rule_files())} rule files found" in result.stdout + result.stderr


def test_promtool_check_rules_passes() -> None:
    files = rule_files()
    assert files, "no rule files under deploy/prometheus/rules"
    result = _promtool("check", "rules", *map(str, files))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_fire_on_outages_and_stay_quiet_otherwise() -> None:
    result = _promtool("test", "rules", str(ALERTS_TEST))
    assert result.returncode == 0, result.stdout + result.stderr


def test_required_alerts_exist_with_severity_and_summary() -> None:
    alerts = {}
    for path in rule_files():
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    alerts[rule["alert"]] = rule
    required = {"EmberInstanceDown", "EmberHighErrorRate", "EmberHighTTFTP99", "EmberQueueGrowing",
                "EmberKVCacheNearFull"}
    assert required <= alerts.keys()
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert rule["annotations"].get("summary") and rule["annotations"].get("description"), name
        assert rule.get("for"), f"{name} has no `for`: one bad scrape would page someone"


def test_rules_use_only_metrics_the_server_exposes() -> None:
    for path in rule_files():
        for name, expr, _ in rule_expressions(path):
            unknown = metric_names(expr) - EXPOSED_NAMES
            assert not unknown, f"{path.name}: {name} refers to {sorted(unknown)}"


def test_scrape_config_targets_the_server_port_and_metrics_path() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    ember = jobs["ember"]
    assert ember.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in ember["static_configs"] for t in sc["targets"]]
    assert targets == [f"ember:{SERVER_PORT}"]
