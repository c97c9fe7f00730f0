"""The alert rules and the Grafana dashboard (conf/monitoring/) stay in step with edgeproxy/metrics.py.

Every metric a rule or a panel queries must be one edgeproxy exports (names taken from a live
``Metrics()``, rendered as Prometheus does: counters ``_total``, histograms ``_bucket/_sum/_count``),
and every label it matches or groups by must be one of those metrics' labels. promtool, when
installed (Debian: ``apt-get install prometheus``), also checks the rules and runs them on
synthetic series.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from edgeproxy.telemetry.metrics import Counter, Gauge, Histogram, Metrics

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "conf" / "monitoring" / "prometheus-rules.yaml"
DASHBOARD = ROOT / "conf" / "monitoring" / "grafana-dashboard.json"

# Added by Prometheus itself: the scrape health series and the target labels on every series.
PROMETHEUS_SERIES = {"up": frozenset({"job", "instance"})}
TARGET_LABELS = frozenset({"job", "instance"})

ALERTS = {
    "EdgeproxyHighErrorRate",
    "EdgeproxyHighLatencyP99",
    "EdgeproxyHighTTFBP99",
    "EdgeproxyNoHealthyPath",
    "EdgeproxyReloadFailed",
    "EdgeproxyRetryBudgetExhausted",
    "EdgeproxyKeyDisabled",
    "EdgeproxyKeysExhausted",
    "EdgeproxyAdmissionRefusing",
    "EdgeproxyHighPriorityWaiting",
    "EdgeproxyLogDropped",
    "EdgeproxyDown",
}


def exported_series() -> dict[str, frozenset[str]]:
    """Series name -> label names, for everything ``Metrics()`` exports."""
    out: dict[str, frozenset[str]] = dict(PROMETHEUS_SERIES)
    for metric in vars(Metrics()).values():
        if isinstance(metric, Histogram):
            labels = frozenset(metric.labelnames)
            out[f"{metric.name}_bucket"] = labels | {"le"}
            out[f"{metric.name}_sum"] = labels
            out[f"{metric.name}_count"] = labels
        elif isinstance(metric, Gauge):
            out[metric.name] = frozenset(metric.labelnames)
        elif isinstance(metric, Counter):
            out[f"{metric.name}_total"] = frozenset(metric.labelnames)
    return out


# -- a small PromQL reader: enough for names and labels, not a parser ----------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_RANGE = re.compile(r"\[[^\]]*\]")
_SELECTOR = re.compile(r"(?<![\w:])([A-Za-z_:][\w:]*)?\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)\s*(?:\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*')")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_IDENT = re.compile(r"(?<![\w.:$])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()")
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan", "Inf", "NaN"})
_LEGEND = re.compile(r"\{\{\s*([A-Za-z_]\w*)\s*\}\}")


def read_promql(expr: str) -> tuple[set[str], list[tuple[str | None, set[str]]], set[str]]:
    """(metric names, [(selector's metric name, labels it matches)], labels grouped by)."""
    expr = _RANGE.sub(" ", expr)  # [5m], [$__rate_interval]
    selectors = [(m[1], set(_MATCHER.findall(m[2]))) for m in _SELECTOR.finditer(expr)]
    bare = _SELECTOR.sub(lambda m: f" {m[1] or ''} ", _STRING.sub('""', expr))
    grouped = {label.strip() for m in _GROUPING.finditer(bare) for label in m[1].split(",") if label.strip()}
    bare = _GROUPING.sub(" ", bare)
    names = {name for name in _IDENT.findall(bare) if name not in _KEYWORDS}
    return names, selectors, grouped


def check_expr(
    expr: str, series: dict[str, frozenset[str]], where: str, extra_labels: set[str] | None = None
) -> set[str]:
    """The problems in one expression (empty when it only uses what edgeproxy exports)."""
    names, selectors, grouped = read_promql(expr)
    problems = {f"{where}: unknown metric {name!r}" for name in names - series.keys()}
    if not names:
        problems.add(f"{where}: no metric found in {expr!r}")
    for name, labels in selectors:
        if name is None:
            problems.add(f"{where}: selector without a metric name in {expr!r}")
        elif name in series:
            problems |= {f"{where}: {name} has no label {x!r}" for x in labels - series[name] - TARGET_LABELS}
    known = set().union(TARGET_LABELS, *(series.get(n, ()) for n in names))
    problems |= {f"{where}: no metric here has label {x!r}" for x in (grouped | (extra_labels or set())) - known}
    return problems


def test_promql_reader() -> None:
    names, selectors, grouped = read_promql(
        'histogram_quantile(0.99, sum by (upstream, le) (rate(edgeproxy_ttfb_seconds_bucket{upstream=~"$u"}'
        "[$__rate_interval]))) > 2 and time() - edgeproxy_start_time_seconds offset 15m > 1e3"
    )
    assert names == {"edgeproxy_ttfb_seconds_bucket", "edgeproxy_start_time_seconds"}
    assert selectors == [("edgeproxy_ttfb_seconds_bucket", {"upstream"})]
    assert grouped == {"upstream", "le"}
    series = exported_series()
    assert not check_expr('sum by (line) (rate(edgeproxy_attempts_total{outcome="ok"}[5m]))', series, "x")
    assert check_expr("rate(edgeproxy_attempts[5m])", series, "x")  # counters end in _total
    assert check_expr('edgeproxy_attempts_total{reason="x"}', series, "x")  # no such label
    assert check_expr("sum by (reason) (edgeproxy_attempts_total)", series, "x")


# -- Prometheus rules ------------------------------------------------------------------------------


def load_rules() -> list[dict]:
    doc = yaml.safe_load(RULES.read_text())
    assert set(doc) == {"groups"}
    groups = doc["groups"]
    assert [g["name"] for g in groups] == ["edgeproxy"]
    return groups[0]["rules"]


def test_rules_structure() -> None:
    rules = load_rules()
    assert {r["alert"] for r in rules} == ALERTS
    assert len(rules) == len(ALERTS)
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert isinstance(rule["expr"], str) and rule["expr"].strip(), rule["alert"]
        assert re.fullmatch(r"(\d+[smhdwy])+", str(rule["for"])), rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert set(rule["annotations"]) >= {"summary", "description"}, rule["alert"]
        for text in rule["annotations"].values():
            assert len(text.strip()) > 20, rule["alert"]
    by_name = {r["alert"]: r for r in rules}
    assert by_name["EdgeproxyRetryBudgetExhausted"]["labels"]["severity"] == "warning"
    assert 'status=~"5.."' in by_name["EdgeproxyHighErrorRate"]["expr"]  # 499 (client left) is not an error
    # Admission's 503s and its 429s (keys short) page apart: the 429s are the key pools' alert,
    # which would be blind on an upstream with admission without them.
    assert 'reason!="rate_limited"' in by_name["EdgeproxyAdmissionRefusing"]["expr"]
    assert 'reason="rate_limited"' in by_name["EdgeproxyKeysExhausted"]["expr"]
    assert 'priority="high"' in by_name["EdgeproxyHighPriorityWaiting"]["expr"]


def test_rules_use_exported_metrics() -> None:
    series = exported_series()
    problems: set[str] = set()
    used: set[str] = set()
    for rule in load_rules():
        # Annotation templates may only name labels the alert's series carry.
        templated = {x for text in rule["annotations"].values() for x in re.findall(r"\$labels\.(\w+)", text)}
        problems |= check_expr(rule["expr"], series, rule["alert"], templated)
        used |= read_promql(rule["expr"])[0]
    assert not problems, sorted(problems)
    assert {
        "edgeproxy_requests_total",
        "edgeproxy_path_up",
        "up",
        "edgeproxy_admission_refused_total",
        "edgeproxy_admission_wait_seconds_bucket",
    } <= used


promtool = shutil.which("promtool") or "promtool"
needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool not installed (Debian: apt-get install prometheus)"
)


@needs_promtool
def test_promtool_check_rules() -> None:
    run = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


def series(name: str, labels: dict[str, str], values: str) -> dict[str, str]:
    inner = ", ".join(f'{k}="{v}"' for k, v in {"job": "edgeproxy", "instance": "h:8788", **labels}.items())
    return {"series": f"{name}{{{inner}}}", "values": values}


def alert(severity: str, **labels: str) -> dict:
    return {"exp_labels": {"job": "edgeproxy", "instance": "h:8788", "severity": severity, **labels}}


@needs_promtool
def test_promtool_alerts_fire(tmp_path: Path) -> None:
    """The rules on synthetic series: each fires when it should (after its `for`), and not otherwise.

    Annotations are stripped first: promtool compares them whole, and their wording is not the point.
    """
    doc = yaml.safe_load(RULES.read_text())
    for rule in doc["groups"][0]["rules"]:
        rule.pop("annotations")
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(doc))
    req, dur, ttfb = (
        "edgeproxy_requests_total",
        "edgeproxy_request_duration_seconds_bucket",
        "edgeproxy_ttfb_seconds_bucket",
    )
    slow = [series(dur, {"upstream": "openai", "le": le}, v) for le, v in (("1.0", "0x30"), ("2.5", "0x30"))]
    slow += [series(dur, {"upstream": "openai", "le": le}, "0+60x30") for le in ("5.0", "+Inf")]
    fast = [series(dur, {"upstream": "anthropic", "le": le}, "0+60x30") for le in ("1.0", "2.5", "5.0", "+Inf")]
    ttfb_series = [{**s, "series": s["series"].replace(dur, ttfb)} for s in slow + fast]
    refused, wait = "edgeproxy_admission_refused_total", "edgeproxy_admission_wait_seconds_bucket"

    def waits(upstream: str, priority: str, below: str) -> list[dict[str, str]]:
        """60 waits a minute, each between the bucket before ``below`` and ``below``."""
        bounds = ("0.001", "0.5", "1.0", "2.0", "30.0", "+Inf")
        at = bounds.index(below)
        return [
            series(wait, {"upstream": upstream, "priority": priority, "le": le}, "0+60x30" if i >= at else "0x30")
            for i, le in enumerate(bounds)
        ]

    tests = [
        {  # 10% 5xx on openai; 10% 499 on anthropic is not an error
            "interval": "1m",
            "input_series": [
                series(req, {"upstream": "openai", "status": "200"}, "0+90x20"),
                series(req, {"upstream": "openai", "status": "502"}, "0+10x20"),
                series(req, {"upstream": "anthropic", "status": "200"}, "0+90x20"),
                series(req, {"upstream": "anthropic", "status": "499"}, "0+10x20"),
                series(req, {"upstream": "gemini", "status": "200"}, "0+99x20"),
                series(req, {"upstream": "gemini", "status": "503"}, "0+1x20"),  # 1%: fine
            ],
            "alert_rule_test": [
                {"eval_time": "3m", "alertname": "EdgeproxyHighErrorRate", "exp_alerts": []},  # still pending
                {
                    "eval_time": "10m",
                    "alertname": "EdgeproxyHighErrorRate",
                    "exp_alerts": [alert("critical", upstream="openai")],
                },
            ],
        },
        {  # openai's requests all take 2.5-5 s, anthropic's under 1 s
            "interval": "1m",
            "input_series": slow + fast + ttfb_series,
            "alert_rule_test": [
                {"eval_time": "8m", "alertname": "EdgeproxyHighLatencyP99", "exp_alerts": []},
                {
                    "eval_time": "15m",
                    "alertname": "EdgeproxyHighLatencyP99",
                    "exp_alerts": [alert("warning", upstream="openai")],
                },
                {
                    "eval_time": "15m",
                    "alertname": "EdgeproxyHighTTFBP99",
                    "exp_alerts": [alert("warning", upstream="openai")],
                },
            ],
        },
        {  # every path of openai down from 2m; anthropic keeps one of two
            "interval": "1m",
            "input_series": [
                series(
                    "edgeproxy_path_up",
                    {"upstream": "openai", "endpoint": "https://a/v1", "line": "direct"},
                    "1 1 0x10",
                ),
                series(
                    "edgeproxy_path_up", {"upstream": "openai", "endpoint": "https://a/v1", "line": "isp2"}, "1 1 0x10"
                ),
                series(
                    "edgeproxy_path_up", {"upstream": "anthropic", "endpoint": "https://b", "line": "direct"}, "0x12"
                ),
                series("edgeproxy_path_up", {"upstream": "anthropic", "endpoint": "https://b", "line": "isp2"}, "1x12"),
            ],
            "alert_rule_test": [
                {"eval_time": "2m", "alertname": "EdgeproxyNoHealthyPath", "exp_alerts": []},
                {
                    "eval_time": "4m",
                    "alertname": "EdgeproxyNoHealthyPath",
                    "exp_alerts": [alert("critical", upstream="openai")],
                },
            ],
        },
        {  # the first failure ever (the series appears at 1), and a counter exported at 0 from start
            "interval": "1m",
            "input_series": [
                series("edgeproxy_reloads_total", {"result": "failed"}, "_x10 1x30"),
                series("edgeproxy_reloads_total", {"result": "failed", "instance": "h2:8788"}, "0x10 1x30"),
            ],
            "alert_rule_test": [
                {"eval_time": "5m", "alertname": "EdgeproxyReloadFailed", "exp_alerts": []},
                {
                    "eval_time": "12m",
                    "alertname": "EdgeproxyReloadFailed",
                    "exp_alerts": [
                        alert("warning", result="failed"),
                        alert("warning", result="failed", instance="h2:8788"),
                    ],
                },
                {"eval_time": "30m", "alertname": "EdgeproxyReloadFailed", "exp_alerts": []},  # 15m later
            ],
        },
        {  # admission: openai refuses 5% with 503 (full, timeout); anthropic 5% with 429 (keys short:
            # the counter appears at the first refusal); gemini 0.5% with 503: fine
            "interval": "1m",
            "input_series": [
                series(req, {"upstream": "openai", "status": "200"}, "0+95x20"),
                series(req, {"upstream": "openai", "status": "503"}, "0+5x20"),
                series(refused, {"upstream": "openai", "priority": "low", "reason": "queue_full"}, "0+3x20"),
                series(refused, {"upstream": "openai", "priority": "normal", "reason": "timeout"}, "0+2x20"),
                series(req, {"upstream": "anthropic", "status": "200"}, "0+95x20"),
                series(req, {"upstream": "anthropic", "status": "429"}, "0+5x20"),
                series(
                    refused, {"upstream": "anthropic", "priority": "normal", "reason": "rate_limited"}, "_x2 10+5x18"
                ),
                series(req, {"upstream": "gemini", "status": "200"}, "0+199x20"),
                series(req, {"upstream": "gemini", "status": "503"}, "0+1x20"),
                series(refused, {"upstream": "gemini", "priority": "low", "reason": "shed"}, "0+1x20"),
                # the key pools' counter, flat: it must not hide the admission queue's 429s
                series("edgeproxy_keys_exhausted_total", {"upstream": "anthropic"}, "4x20"),
                series("edgeproxy_keys_exhausted_total", {"upstream": "gemini"}, "4x20"),
            ],
            "alert_rule_test": [
                {"eval_time": "5m", "alertname": "EdgeproxyAdmissionRefusing", "exp_alerts": []},  # still pending
                {
                    "eval_time": "15m",
                    "alertname": "EdgeproxyAdmissionRefusing",
                    "exp_alerts": [alert("warning", upstream="openai")],
                },
                {"eval_time": "5m", "alertname": "EdgeproxyKeysExhausted", "exp_alerts": []},
                {
                    "eval_time": "15m",
                    "alertname": "EdgeproxyKeysExhausted",
                    "exp_alerts": [alert("warning", upstream="anthropic")],
                },
            ],
        },
        {  # high-priority waits: openai's take 1-2 s; anthropic's are at once; openai's low wait long
            "interval": "1m",
            "input_series": waits("openai", "high", "2.0")
            + waits("openai", "low", "30.0")
            + waits("anthropic", "high", "0.001")
            + waits("anthropic", "normal", "30.0"),
            "alert_rule_test": [
                {"eval_time": "8m", "alertname": "EdgeproxyHighPriorityWaiting", "exp_alerts": []},  # pending
                {
                    "eval_time": "15m",
                    "alertname": "EdgeproxyHighPriorityWaiting",
                    "exp_alerts": [alert("warning", upstream="openai")],
                },
            ],
        },
        {
            "interval": "1m",
            "input_series": [
                series("edgeproxy_retry_budget_exhausted_total", {"upstream": "openai"}, "0+3x20"),
                series("edgeproxy_retry_budget_exhausted_total", {"upstream": "anthropic"}, "5x20"),
                series("up", {}, "1 1 0x10"),
            ],
            "alert_rule_test": [
                {
                    "eval_time": "10m",
                    "alertname": "EdgeproxyRetryBudgetExhausted",
                    "exp_alerts": [alert("warning", upstream="openai")],
                },
                {"eval_time": "2m", "alertname": "EdgeproxyDown", "exp_alerts": []},
                {"eval_time": "4m", "alertname": "EdgeproxyDown", "exp_alerts": [alert("critical")]},
            ],
        },
    ]
    unit = tmp_path / "test.yaml"
    unit.write_text(yaml.safe_dump({"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": tests}))
    run = subprocess.run([promtool, "test", "rules", str(unit)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


# -- Grafana dashboard -----------------------------------------------------------------------------


def all_panels(panels: list[dict]) -> list[dict]:
    out = []
    for panel in panels:
        out.append(panel)
        out.extend(all_panels(panel.get("panels", [])))  # collapsed rows hold their panels
    return out


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_dashboard_structure() -> None:
    dash = load_dashboard()
    assert dash["schemaVersion"] == 39
    assert dash["uid"] and dash["title"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    upstream = variables["upstream"]
    assert re.fullmatch(r"label_values\(edgeproxy_requests_total(\{[^}]*\})?, upstream\)", upstream["definition"])
    panels = all_panels(dash["panels"])
    ids = [p["id"] for p in panels]
    titles = [p["title"] for p in panels]
    assert len(ids) == len(set(ids)), ids
    assert len(titles) == len(set(titles)), titles
    assert "Lines' RTT over time (SRTT per path)" in titles
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        g = panel["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert panel["targets"] and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], panel["title"]


def test_dashboard_uses_exported_metrics() -> None:
    dash = load_dashboard()
    series = exported_series()
    problems: set[str] = set()
    used: set[str] = set()
    for panel in all_panels(dash["panels"]):
        for target in panel.get("targets", []):
            legend = set(_LEGEND.findall(target.get("legendFormat", "")))
            problems |= check_expr(target["expr"], series, panel["title"], legend)
            used |= read_promql(target["expr"])[0]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((.*), *(\w+)\)", var["definition"])
            assert m, var["name"]
            assert var["query"]["query"] == var["definition"], var["name"]
            problems |= check_expr(m[1], series, f"${var['name']}", {m[2]})
    assert not problems, sorted(problems)
    # The panels the dashboard is for: traffic, latency, lines, failover, admission, reloads.
    wanted = {
        "edgeproxy_requests_total",
        "edgeproxy_request_duration_seconds_bucket",
        "edgeproxy_ttfb_seconds_bucket",
        "edgeproxy_path_rtt_seconds",
        "edgeproxy_path_up",
        "edgeproxy_attempts_total",
        "edgeproxy_failovers_total",
        "edgeproxy_rescues_total",
        "edgeproxy_ejections_total",
        "edgeproxy_active_streams",
        "edgeproxy_bytes_total",
        "edgeproxy_reloads_total",
        "edgeproxy_config_generation",
        "edgeproxy_admission_inflight",
        "edgeproxy_admission_queue_depth",
        "edgeproxy_admission_wait_seconds_bucket",
        "edgeproxy_admission_refused_total",
    }
    assert wanted <= used, sorted(wanted - used)
