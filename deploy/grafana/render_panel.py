"""Draw one panel of the Ember Grafana dashboard from a live Prometheus, as a PNG.

For documentation where no Grafana runs: the panel's own PromQL (from deploy/grafana/dashboards)
is sent to Prometheus's range-query API and plotted with matplotlib. The figure says that it is a
matplotlib drawing of real Prometheus data, not a Grafana screenshot.

    python deploy/grafana/render_panel.py --prometheus http://127.0.0.1:9090 \
        --panel "Time to first token" --minutes 10 --out docs/img/panel-ttft.png
"""
from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import httpx

DASHBOARD = Path(__file__).resolve().parent / "dashboards" / "ember.json"
UNIT_LABELS = {"s": "seconds", "reqps": "requests/s", "percentunit": "fraction", "ops": "per second",
               "none": ""}


def find_panel(dashboard: dict, title: str) -> dict:
    """The panel with this title (rows' nested panels included)."""
    for panel in dashboard["panels"]:
        for candidate in [panel, *panel.get("panels", [])]:
            if candidate.get("title") == title:
                return candidate
    titles = [p["title"] for p in dashboard["panels"] if p.get("type") != "row"]
    raise SystemExit(f"no panel titled {title!r}; panels: {', '.join(titles)}")


def concrete(expr: str, rate_window: str) -> str:
    """Grafana variables to values: windows for the built-ins, "everything" for $model/$instance."""
    builtins = {"__rate_interval": rate_window, "__interval": rate_window}
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: builtins.get(m.group(1) or m.group(2), ".*"), expr)


def legend(template: str, labels: dict) -> str:
    """Grafana's {{label}} legend format."""
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template or "")
    return text.strip() or json.dumps(labels)


def query_range(prometheus: str, expr: str, start: float, end: float, step: float) -> list[dict]:
    """Matrix result of a range query; raises with Prometheus's error text."""
    response = httpx.get(f"{prometheus}/api/v1/query_range", timeout=30,
                         params={"query": expr, "start": start, "end": end, "step": step})
    body = response.json()
    if body.get("status") != "success":
        raise SystemExit(f"Prometheus rejected {expr!r}: {body.get('error')}")
    return body["data"]["result"]


def render(prometheus: str, title: str, minutes: float, out: Path, rate_window: str = "1m") -> int:
    """Plot the panel's series over the last `minutes`; returns how many series were drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    from datetime import datetime

    panel = find_panel(json.loads(DASHBOARD.read_text()), title)
    end = time.time()
    start = end - minutes * 60
    step = max(1.0, minutes * 60 / 400)
    fig, ax = plt.subplots(figsize=(9, 3.6), dpi=110)
    drawn = 0
    for target in panel["targets"]:
        for series in query_range(prometheus, concrete(target["expr"], rate_window), start, end, step):
            points = [(datetime.fromtimestamp(t), float(v)) for t, v in series["values"] if v not in ("NaN", "+Inf")]
            if points:
                ax.plot(*zip(*points), label=legend(target.get("legendFormat", ""), series["metric"]), linewidth=1.4)
                drawn += 1
    unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
    ax.set_ylabel(UNIT_LABELS.get(unit, unit))
    ax.set_title(f"Ember dashboard panel: {title}")
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M"))
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(loc="upper left", fontsize=8)
    fig.text(0.01, 0.01, "Drawn with matplotlib from real Prometheus data (panel queries of "
             "deploy/grafana/dashboards/ember.json); not a Grafana screenshot.", fontsize=7, color="gray")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return drawn


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090")
    parser.add_argument("--panel", required=True, help="panel title, as in the dashboard")
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--rate-window", default="1m", help="value for $__rate_interval")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    drawn = render(args.prometheus, args.panel, args.minutes, args.out, args.rate_window)
    print(f"{args.out}: {drawn} series")
    return 0 if drawn else 1


if __name__ == "__main__":
    raise SystemExit(main())
