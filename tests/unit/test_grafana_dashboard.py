"""infra/grafana/postbus-dashboard.json uses only metric names the services define, so the dashboard
cannot silently rot when a metric is renamed or removed.

The defined names are read from the code itself: every ``prometheus_client`` Counter / Gauge /
Histogram / Summary constructed in services/ (found by parsing the modules, aliases included), with the
series names the client exposes for each type, plus the seed's ``gmp_*`` series the API renders as
text (services/api/gmp_metrics.py, read by rendering them)."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import yaml

from services.api import gmp_metrics

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "infra" / "grafana" / "postbus-dashboard.json"
PROM_TYPES = {"Counter", "Gauge", "Histogram", "Summary"}
BUILTIN = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}  # Prometheus's own per-target series
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
            "offset", "inf", "nan"}


def _exposed(kind: str, name: str) -> set[str]:
    """The series prometheus_client exposes for one metric."""
    if kind == "Counter":
        base = name[: -len("_total")] if name.endswith("_total") else name
        return {f"{base}_total", f"{base}_created"}
    if kind == "Histogram":
        return {f"{name}_bucket", f"{name}_sum", f"{name}_count", f"{name}_created"}
    if kind == "Summary":
        return {name, f"{name}_sum", f"{name}_count", f"{name}_created"}
    return {name}


def defined_metrics() -> set[str]:
    names: set[str] = set()
    for path in (REPO / "services").rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        aliases: dict[str, str] = {}  # local name -> prometheus_client type
        modules: set[str] = set()  # local names of the prometheus_client module
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "prometheus_client":
                for a in node.names:
                    if a.name in PROM_TYPES:
                        aliases[a.asname or a.name] = a.name
            elif isinstance(node, ast.Import):
                modules |= {a.asname or a.name for a in node.names if a.name == "prometheus_client"}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            f = node.func
            kind = None
            if isinstance(f, ast.Name):
                kind = aliases.get(f.id)
            elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id in modules:
                kind = f.attr if f.attr in PROM_TYPES else None
            first = node.args[0]
            if kind and isinstance(first, ast.Constant) and isinstance(first.value, str):
                names |= _exposed(kind, first.value)
    # the seed's series, rendered as text by the API (not prometheus_client objects)
    names |= set(re.findall(r"^# TYPE (\w+) ", gmp_metrics.render(None, []), re.M))
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (label matchers, strings, ranges, grouping
    clauses and function names removed)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\$\w+", " ", e)  # Grafana variables ($__rate_interval, $tenant)
    out = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\()?", e):
        if m.group(2) or m.group(1).lower() in KEYWORDS:
            continue  # a function call or a keyword
        out.add(m.group(1))
    return out


def dashboard_expressions() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out: list[tuple[str, str]] = []

    def walk(panels: list[dict]) -> None:
        for p in panels:
            for t in p.get("targets", []):
                out.append((p["title"], t["expr"]))
            walk(p.get("panels", []))

    walk(dash["panels"])
    for var in dash.get("templating", {}).get("list", []):
        q = var.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        if q:
            inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", q)
            out.append((f"variable {var['name']}", inner.group(1) if inner else q))
    return out


def test_the_parsers_see_real_names_and_flag_unknown_ones() -> None:
    defined = defined_metrics()
    # both sides of the check find what they must: names from several services and both sources
    assert {"gmp_sent_total", "gmp_pending_messages", "postbus_consumer_lag", "postbus_sender_smtp_seconds_bucket",
            "postbus_reporter_sync_calls_total", "postbus_metrics_deadletters_total",
            "postbus_api_request_seconds_bucket"} <= defined
    expr = ('histogram_quantile(0.95, sum by (le, stage) (rate(postbus_sender_stage_seconds_bucket'
            '{job="x",stage=~"a|b"}[$__rate_interval]))) / on (job) group_left sum(up) + postbus_gone_total')
    assert metric_names(expr) == {"postbus_sender_stage_seconds_bucket", "up", "postbus_gone_total"}
    assert "postbus_gone_total" not in defined


def test_every_metric_in_the_dashboard_is_defined_by_the_services() -> None:
    defined = defined_metrics() | BUILTIN
    exprs = dashboard_expressions()
    assert len(exprs) >= 20
    unknown = {}
    for title, expr in exprs:
        names = metric_names(expr)
        assert names, f"panel {title!r}: no metric in {expr!r}"
        missing = names - defined
        if missing:
            unknown[title] = sorted(missing)
    assert not unknown, f"metric names no service defines: {unknown}"


def test_the_dashboard_covers_what_operators_watch() -> None:
    used = set().union(*(metric_names(e) for _, e in dashboard_expressions()))
    for needed in ("gmp_sent_total", "gmp_errors_total", "gmp_deferred_total", "postbus_consumer_lag",
                   "postbus_sender_smtp_seconds_bucket", "postbus_reporter_sync_seconds_bucket",
                   "postbus_sender_retries_exhausted_total", "postbus_sender_deadletters_total",
                   "postbus_metrics_deadletters_total", "postbus_reporter_sync_calls_total"):
        assert needed in used, needed
    # per-tenant sends
    assert any("by (tenant_id)" in e and "gmp_sent_total" in e for _, e in dashboard_expressions())


def test_panels_use_the_provisioned_datasource_and_unique_ids() -> None:
    dash = json.loads(DASHBOARD.read_text())
    ds = yaml.safe_load((REPO / "infra/grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = ds["datasources"][0]["uid"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == uid, p["title"]
    prov = yaml.safe_load((REPO / "infra/grafana/provisioning/dashboards/postbus.yml").read_text())
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert any(m.startswith("./infra/grafana/postbus-dashboard.json:" + prov["providers"][0]["options"]["path"])
               for m in mounts)


def test_prometheus_reads_the_internal_token_from_a_file_never_a_literal() -> None:
    conf = yaml.safe_load((REPO / "infra/grafana/prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in conf["scrape_configs"]}
    for name in ("postbus-metrics", "postbus-sender", "postbus-reporter", "postbus-inbound"):
        auth = jobs[name]["authorization"]
        assert auth["type"] == "Bearer" and "credentials" not in auth
        assert auth["credentials_file"] == "/run/secrets/postbus_internal_token"
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    assert compose["secrets"]["postbus_internal_token"] == {"environment": "POSTBUS_INTERNAL_TOKEN"}
