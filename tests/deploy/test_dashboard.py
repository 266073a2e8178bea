"""The Grafana dashboard and its provisioning: what it shows, and that it refers to real metrics."""
from __future__ import annotations

import json

import pytest
import yaml

from deploy_tools import DEPLOY, REPO, dashboard_files
from promql_exprs import EXPOSED_NAMES, dashboard_queries, metric_names

PROVISIONING = DEPLOY / "grafana" / "provisioning"


@pytest.fixture(scope="module")
def dashboard() -> dict:
    (path,) = dashboard_files()
    return json.loads(path.read_text())


def _panels(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def test_queries_use_only_metrics_the_server_exposes() -> None:
    for path in dashboard_files():
        queries = dashboard_queries(path)
        assert queries
        for where, expr in queries:
            unknown = metric_names(expr) - EXPOSED_NAMES
            assert not unknown, f"{where} refers to {sorted(unknown)}"


def test_dashboard_covers_what_operators_need(dashboard) -> None:
    exprs = " ".join(expr for _, expr in dashboard_queries(dashboard_files()[0]))
    needed = {
        "request rate": "ember_request_success_total",
        "TTFT percentiles": "ember_time_to_first_token_seconds_bucket",
        "inter-token latency percentiles": "ember_inter_token_latency_seconds_bucket",
        "end-to-end latency percentiles": "ember_e2e_request_latency_seconds_bucket",
        "tokens in": "ember_prompt_tokens_total",
        "tokens out": "ember_generation_tokens_total",
        "running": "ember_requests_running",
        "waiting": "ember_requests_waiting",
        "KV usage": "ember_kv_cache_usage_ratio",
        "preemptions": "ember_preemptions_total",
        "prefix-cache hits": "ember_prefix_cache_hits_total",
        "adapters": "ember_lora_adapters_resident",
    }
    missing = [what for what, metric in needed.items() if metric not in exprs]
    assert not missing
    for quantile in ("0.5", "0.9", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (le) (rate(ember_time_to_first_token_seconds_bucket" in exprs
    assert "sum by (adapter)" in exprs, "no per-adapter traffic panel"


def test_panels_are_laid_out_without_overlap(dashboard) -> None:
    panels = _panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps another panel"
                cells.add((x, y))


def test_every_panel_uses_the_provisioned_datasource(dashboard) -> None:
    provisioned = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())
    (datasource,) = provisioned["datasources"]
    for panel in _panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
        assert panel.get("description"), f"{panel['title']} has no description"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == datasource["uid"]
    assert datasource["url"] == "http://prometheus:9090"


def test_template_variables_select_everything_by_default(dashboard) -> None:
    # The live test evaluates queries with every $variable set to ".*", as "All" does.
    for var in dashboard["templating"]["list"]:
        assert var["includeAll"] and var["allValue"] == ".*"
        assert var["current"]["value"] == ["$__all"]


def test_dashboard_provider_path_is_where_compose_mounts_the_dashboards() -> None:
    provider = yaml.safe_load((PROVISIONING / "dashboards" / "ember.yml").read_text())["providers"][0]
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in mounts
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in mounts
