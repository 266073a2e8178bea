"""The PromQL that Ember's Grafana dashboard and alert rules send to Prometheus.

Collects every expression (panel targets, template-variable queries, rule expressions), turns
Grafana's template variables into concrete values, and splits an alert condition into the vector
operands whose presence the alert depends on (`A > 2 and B > 0.01` -> `A`, `B`).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

# The server's metric contract: these names, and nothing else, may appear in dashboards and alerts.
GAUGES = {
    "ember_requests_running", "ember_requests_waiting", "ember_kv_cache_usage_ratio",
    "ember_lora_adapters_resident",
}
COUNTERS = {
    "ember_prompt_tokens_total", "ember_generation_tokens_total", "ember_request_success_total",
    "ember_requests_aborted_total", "ember_requests_failed_total", "ember_requests_rejected_total",
    "ember_preemptions_total", "ember_prefix_cache_queries_total", "ember_prefix_cache_hits_total",
    "ember_lora_evictions_total", "ember_http_requests_total",
}
HISTOGRAMS = {
    "ember_time_to_first_token_seconds", "ember_inter_token_latency_seconds",
    "ember_e2e_request_latency_seconds", "ember_request_queue_time_seconds",
    "ember_request_prompt_tokens", "ember_request_generation_tokens", "ember_lora_load_seconds",
}
EXPOSED_NAMES = GAUGES | COUNTERS | {f"{h}_{s}" for h in HISTOGRAMS for s in ("bucket", "sum", "count")}

_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?P<selector>.+?)\s*,\s*\w+\s*\)\s*$")
_GRAFANA_VAR = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")
_METRIC = re.compile(r"\b(ember_[a-z0-9_]+)\b")


def dashboard_queries(path: Path) -> list[tuple[str, str]]:
    """(where, expr) for every panel target and template-variable query of a dashboard file."""
    dashboard = json.loads(path.read_text())
    found: list[tuple[str, str]] = []

    def walk(panels: list[dict]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    found.append((f"panel {panel.get('title')!r} {target.get('refId')}", target["expr"]))
            walk(panel.get("panels", []))  # panels nested in collapsed rows

    walk(dashboard.get("panels", []))
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var.get("query")
        query = query.get("query", "") if isinstance(query, dict) else query or ""
        match = _LABEL_VALUES.match(query)
        found.append((f"variable ${var['name']}", match.group("selector") if match else query))
    return found


def rule_expressions(path: Path) -> list[tuple[str, str, bool]]:
    """(name, expr, is_alert) for every rule in a Prometheus rule file."""
    doc = yaml.safe_load(path.read_text())
    out = []
    for group in doc.get("groups", []):
        for rule in group.get("rules", []):
            name = rule.get("alert") or rule.get("record")
            out.append((name, rule["expr"].strip(), "alert" in rule))
    return out


def substitute(expr: str, rate_window: str = "1m", interval: str = "15s") -> str:
    """Replace Grafana's template variables with values Prometheus accepts.

    $__rate_interval / $__interval / $__range become concrete windows; user variables ($model,
    $instance) select everything, as the dashboard's "All" option does (allValue ".*").
    """
    builtins = {"__rate_interval": rate_window, "__interval": interval, "__range": "1h",
                "__range_s": "3600", "__interval_ms": "15000"}

    def repl(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        return builtins.get(name, ".*")

    return _GRAFANA_VAR.sub(repl, expr)


def metric_names(expr: str) -> set[str]:
    """The ember_* metric names an expression refers to."""
    return set(_METRIC.findall(expr))


_COMPARISONS = ("==", "!=", ">=", "<=", ">", "<")
_SET_KEYWORDS = ("and", "unless")
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def _split_top_level(expr: str) -> list[str]:
    """Split at comparison operators and `and`/`unless` outside brackets and strings."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(expr):
        ch = expr[i]
        if ch in "\"'`":  # skip a string literal (label values may contain operators)
            end = i + 1
            while end < len(expr) and expr[end] != ch:
                end += 2 if expr[end] == "\\" else 1
            i = end + 1
            continue
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif depth == 0:
            op = next((o for o in _COMPARISONS if expr.startswith(o, i)), None)
            if op is None:
                for word in _SET_KEYWORDS:
                    before = expr[i - 1] if i else " "
                    after = expr[i + len(word)] if i + len(word) < len(expr) else " "
                    if expr.startswith(word, i) and not (before.isalnum() or before == "_") \
                            and not (after.isalnum() or after == "_"):
                        op = word
                        break
            if op is not None:
                parts.append(expr[start:i])
                i += len(op)
                start = i
                continue
        i += 1
    parts.append(expr[start:])
    return parts


def condition_operands(expr: str) -> list[str]:
    """The vector operands of an alert condition, thresholds dropped.

    An alert fires only when its operands have data, so each must exist for the alert to be able
    to fire at all; the thresholds themselves are what keeps it quiet on a healthy server.
    """
    operands = []
    for part in _split_top_level(expr):
        part = re.sub(r"^\s*bool\b", "", part).strip()
        if part and not _NUMBER.match(part):
            operands.append(part)
    return operands
