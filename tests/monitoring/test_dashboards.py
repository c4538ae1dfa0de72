"""The generated dashboards: committed JSON equals a fresh generation, and every panel query
(and every alert rule) runs against a real Prometheus scraping a gateway and an agent, and
names only metrics the project exports."""

from __future__ import annotations

import json
import re
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from edge_agent import AgentMetrics
from fedcore import InMemoryBroker, presence_topic, update_topic
from gateway import GatewayMetrics
from tests.gateway.fleet import Clock, make_agents, make_gateway
from tests.integration.test_prometheus import Prometheus, values

# grafana-foundation-sdk needs Python 3.11+ (the dev extra installs it there only).
pytest.importorskip("grafana_foundation_sdk")
from monitoring import dashboards, render
from monitoring._templating import substitute

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "monitoring" / "dashboards"
ALERTS = ROOT / "monitoring" / "alerts.yml"
WAIT_S = 20.0

#: What Grafana would put in place of each template variable when the test runs a query.
VARIABLES = {
    "__rate_interval": "1m",
    "__range": "1h",
    "agent_job": dashboards.AGENT_JOB,
    "instance": ".+",
    "job": dashboards.GATEWAY_JOB,
}


def committed() -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(COMMITTED.glob("*.json"))}


def panels(board: dict) -> list[dict]:
    found = []
    for panel in board["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))  # inside rows
    return found


def panel_queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, PromQL) for every target of every panel."""
    return [
        (name, panel["title"], target["expr"])
        for name, board in committed().items()
        for panel in panels(board)
        for target in panel.get("targets", [])
    ]


def promql(expr: str) -> str:
    """``expr`` as Grafana would send it (monitoring.render substitutes the same way)."""
    expr = substitute(expr, VARIABLES)
    assert "$" not in expr, expr
    return expr


# ---------------------------------------------------------------------------- generation
def test_regenerating_gives_exactly_the_committed_json(tmp_path):
    written = dashboards.write(tmp_path)
    assert sorted(p.name for p in written) == sorted(p.name for p in COMMITTED.glob("*.json"))
    for path in written:
        assert path.read_bytes() == (COMMITTED / path.name).read_bytes(), (
            f"{path.name} is stale: run 'python -m monitoring.dashboards --out monitoring/dashboards'"
        )
    # deterministic: a second run is byte-identical, keys sorted
    for name in dashboards.DASHBOARDS:
        text = dashboards.render(name)
        assert text == dashboards.render(name)
        assert text == json.dumps(json.loads(text), sort_keys=True, indent=2) + "\n"


def test_the_four_dashboards_have_stable_ids_and_template_variables():
    boards = committed()
    assert set(boards) == {
        "fleet-overview",
        "round-progress",
        "rejections-security",
        "ledger-health",
    }
    uids = {board["uid"] for board in boards.values()}
    assert len(uids) == 4 and all(uid.startswith("fedledger-") for uid in uids)
    for name, board in boards.items():
        assert board["schemaVersion"] >= 39, name  # Grafana 11
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert {"datasource", "job", "instance"} <= set(variables), name
        ids = [panel["id"] for panel in panels(board)]
        assert ids == list(range(1, len(ids) + 1)), name
        for panel in panels(board):
            assert panel["targets"], (name, panel["title"])
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == "${datasource}"
                assert '$job"' in target["expr"] or "$agent_job" in target["expr"], target
    assert "agent_job" in {v["name"] for v in boards["fleet-overview"]["templating"]["list"]}


# ---------------------------------------------------------------------------- metric names
_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "offset", "bool"}
_KEYWORDS |= {"group_left", "group_right", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers left once strings, label
    matchers, ranges, grouping clauses and function calls are taken out."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"(?<![A-Za-z0-9_:])\d[\d.]*(?:ms|[smhdwy])?", " ", expr)  # numbers, 30m
    names = set()
    for match in re.finditer(r"(?<![A-Za-z0-9_:])[A-Za-z_:][A-Za-z0-9_:]*(?!\s*\()", expr):
        word = match.group(0)
        if word.lower() in _KEYWORDS:
            continue
        end = match.end()
        if re.match(r"[A-Za-z0-9_:]", expr[end : end + 1] or " "):
            continue  # a function name cut short by the lookahead
        names.add(word)
    return names


def exported_names() -> set[str]:
    """Every series name a fresh GatewayMetrics / AgentMetrics registry can expose, plus up."""
    names = {"up"}
    for make in (GatewayMetrics, AgentMetrics):
        registry = CollectorRegistry()
        make(registry=registry)
        for family in registry.collect():
            if family.type == "counter":
                names.add(family.name + "_total")
            elif family.type == "histogram":
                names |= {family.name + s for s in ("_bucket", "_sum", "_count")}
            else:
                names.add(family.name)
    return names


def alert_exprs() -> list[str]:
    """The `expr:` of each alert in alerts.yml (inline or a `|` block)."""
    exprs, current, indent = [], None, 0
    for line in ALERTS.read_text().splitlines():
        stripped = line.strip()
        if current is not None:
            if stripped and len(line) - len(line.lstrip()) > indent:
                current.append(stripped)
                continue
            exprs.append(" ".join(current))
            current = None
        if stripped.startswith("expr:"):
            rest = stripped[len("expr:") :].strip()
            if rest == "|":
                current, indent = [], len(line) - len(line.lstrip())
            else:
                exprs.append(rest)
    return exprs


def test_metric_name_parser():
    assert metric_names(
        'histogram_quantile(0.9, sum by (le, instance) (rate(a_bucket{job="x"}[1m])))'
    ) == {"a_bucket"}
    assert metric_names("1 - b / c > 0.3 and on (job) d offset 30m") == {"b", "c", "d"}
    assert metric_names('count by (version) (up{job="$job"})') == {"up"}


def test_panels_and_alerts_name_only_exported_metrics():
    exported = exported_names()
    assert "fedledger_gateway_rounds_closed_total" in exported
    assert "fedledger_agent_training_seconds_bucket" in exported
    for board, title, expr in panel_queries():
        names = metric_names(expr)
        assert names, (board, title, expr)
        assert names <= exported, (board, title, names - exported)
        assert set(re.findall(r"fedledger_[a-z0-9_]+", expr)) <= exported, (board, title)
    exprs = alert_exprs()
    assert len(exprs) == 6
    for expr in exprs:
        names = metric_names(expr)
        assert names and names <= exported, (expr, names - exported)
    for board in committed().values():  # the variables' label_values() queries
        for variable in board["templating"]["list"]:
            query = variable.get("query")
            if isinstance(query, str) and query.startswith("label_values("):
                assert set(re.findall(r"fedledger_[a-z0-9_]+", query)) <= exported
    # every gateway metric family is on some dashboard
    text = "\n".join(expr for _, _, expr in panel_queries())
    families = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in exported}
    missing = {f for f in families if f.startswith("fedledger_gateway_") and f not in text}
    assert not missing, missing


# ---------------------------------------------------------------------------- live Prometheus
@pytest.fixture
def live(tmp_path, task, registry, gateway_key, dataset, device_keys):
    """A gateway (in-memory transport, fake round clock) and one agent serving metrics,
    scraped by a real Prometheus that also loads monitoring/alerts.yml; three rounds closed."""
    broker = InMemoryBroker()
    clock = Clock()
    gateway_metrics = GatewayMetrics(registry=CollectorRegistry(), version="9.9.9")
    gateway = make_gateway(
        tmp_path, task, registry, gateway_key, dataset, broker, clock, metrics=gateway_metrics
    )
    agents = make_agents(task, device_keys, gateway_key, dataset, broker)
    agent_metrics = AgentMetrics(registry=CollectorRegistry(), version="9.9.9")
    agents[0].metrics = agent_metrics
    agent_metrics.bind(agents[0])
    try:
        targets = {
            dashboards.GATEWAY_JOB: gateway_metrics.serve(0),
            dashboards.AGENT_JOB: agent_metrics.serve(0),
        }
        prom = Prometheus(tmp_path / "prometheus", targets)
        prom.config.write_text(prom.config.read_text() + f"rule_files:\n  - {ALERTS}\n")
        with prom:
            gateway.connect()
            outsider = broker.transport()
            for device in list(device_keys)[:3]:
                outsider.publish(presence_topic(task.id, device), b"online", retain=True)
            gateway.step(0)
            gateway.start()
            end = time.monotonic() + WAIT_S
            prom.wait_for(
                f'up{{job="{dashboards.GATEWAY_JOB}"}}', lambda r: values(r) == [1], end=end
            )
            prom.wait_for(
                f'up{{job="{dashboards.AGENT_JOB}"}}', lambda r: values(r) == [1], end=end
            )
            for i in range(task.rounds):
                if i == 1:  # something for the rejection panels
                    outsider.publish(update_topic(task.id, "dev-0"), b"garbage")
                    outsider.publish(update_topic(task.id, "not-registered"), b"garbage")
                for agent in agents:
                    agent.step(0)
                clock.now += 2.0 + i
                gateway.step(0)
                time.sleep(1.2)  # at least one scrape between rounds: rates are not all zero
            assert gateway.finished
            done = task.rounds
            prom.wait_for(
                "fedledger_gateway_rounds_closed_total", lambda r: values(r) == [done], end=end
            )
            prom.wait_for(
                "fedledger_agent_rounds_trained_total", lambda r: values(r) == [done], end=end
            )
            time.sleep(1.5)  # one more scrape at the final values
            yield prom
    finally:
        agent_metrics.close()
        gateway.close()


def query(prom: Prometheus, promql: str) -> dict:
    url = prom.url("/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:  # 400: the expression does not parse
        return json.load(exc)


def test_panels_and_alerts_run_against_a_live_gateway(live, tmp_path):
    """One live setup (about 10 s) for the three checks."""
    check_every_panel_query_returns_series(live)
    check_every_alert_rule_loads_and_its_expression_runs(live)
    check_every_dashboard_renders_to_png(live, tmp_path / "png")


def check_every_panel_query_returns_series(live: Prometheus) -> None:
    queries = panel_queries()
    assert len(queries) > 30
    empty = []
    for board, title, expr in queries:
        body = query(live, promql(expr))
        assert body["status"] == "success", (board, title, expr, body)
        if not body["data"]["result"]:
            empty.append((board, title, promql(expr)))
    assert not empty, "panels without series:\n" + "\n".join(map(str, empty))
    # the values the panels show match what the gateway did
    result = query(live, 'fedledger_gateway_devices_online{job="fedledger-gateway"}')
    assert values(result["data"]["result"]) == [3]


def check_every_alert_rule_loads_and_its_expression_runs(live: Prometheus) -> None:
    with urllib.request.urlopen(live.url("/api/v1/rules"), timeout=5) as response:
        body = json.load(response)
    rules = [r for group in body["data"]["groups"] for r in group["rules"]]
    assert sorted(r["name"] for r in rules) == sorted(
        [
            "FedledgerDevicesOffline",
            "FedledgerGatewayDown",
            "FedledgerLedgerCommitFailures",
            "FedledgerLedgerRoundRefused",
            "FedledgerNoRoundCompleted",
            "FedledgerRejectionRatioHigh",
        ]
    )
    for rule in rules:
        assert rule["type"] == "alerting" and rule["health"] in ("ok", "unknown"), rule
        assert rule["labels"]["severity"] in ("critical", "warning"), rule
        assert query(live, rule["query"])["status"] == "success", rule


def check_every_dashboard_renders_to_png(live: Prometheus, out: Path) -> None:
    """monitoring.render draws each dashboard from the same Prometheus, with the variables
    saved in the dashboards, and every panel gets numbers (not only NaN): the panels the query
    check above requires to return data."""
    from PIL import Image

    client = render.PrometheusClient(live.url(""))
    for path in sorted(COMMITTED.glob("*.json")):
        board = render.load_dashboard(path)
        png = out / f"{path.stem}.png"
        # the gateway has run for about 10 s: a minute covers it; Prometheus scrapes every 1 s
        rendering = render.render_dashboard(board, client, png, range_s=60, scrape_s=1)
        bottom = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in board["panels"])
        expected = (1440, render.HEADER_PX + bottom * render.ROW_PX + render.GAP_PX)
        assert rendering.path == png and rendering.size == expected
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(png) as image:
            assert image.format == "PNG" and image.size == expected
            image.load()  # decodes: the file is whole
        summaries = rendering.panels
        shown = [(p["title"], p["type"]) for p in panels(board)]
        assert [(s.title, s.type) for s in summaries] == shown, path.name
        assert all(s.error is None for s in summaries), (path.name, summaries)
        without = [s.title for s in summaries if not s.has_data]
        assert not without, f"{path.name}: panels without numbers: {without}"


def _panel(board: dict, title: str) -> dict:
    (found,) = [p for p in panels(board) if p["title"] == title]
    return found


def test_gateway_up_reads_down_in_red_and_up_in_green():
    up = _panel(committed()["fleet-overview"], "Gateway up")
    defaults = up["fieldConfig"]["defaults"]
    steps = defaults["thresholds"]["steps"]
    assert steps[0]["color"] == "red" and steps[0]["value"] is None  # 0 is red, not green
    assert steps[1] == {"color": "green", "value": 1}
    (mapping,) = defaults["mappings"]
    assert mapping["options"]["0"]["text"] == "down" and mapping["options"]["1"]["text"] == "up"


def test_counts_over_a_window_are_whole_numbers():
    """increase() extrapolates ("Rounds closed (1h) 397.4"): every such query is rounded, and
    a panel of counts shows no decimals."""
    seen = 0
    for board in committed().values():
        for panel in panels(board):
            exprs = [t["expr"] for t in panel["targets"]]
            for expr in exprs:
                if "increase(" in expr:
                    seen += 1
                    assert expr.startswith("round("), (panel["title"], expr)
            if exprs and all("increase(" in e for e in exprs):
                assert panel["fieldConfig"]["defaults"]["decimals"] == 0, panel["title"]
    assert seen >= 8


def test_participants_and_accuracy_do_not_share_an_axis():
    panel = _panel(committed()["round-progress"], "Participants and accuracy")
    (override,) = panel["fieldConfig"]["overrides"]
    assert override["matcher"] == {"id": "byRegexp", "options": "accuracy.*"}
    props = {p["id"]: p["value"] for p in override["properties"]}
    assert props["custom.axisPlacement"] == "right" and props["unit"] == "percentunit"


def test_round_duration_buckets_resolve_sub_second_rounds():
    """A 90 ms round must not be reported as p50 500 ms: buckets below one second."""
    from gateway._metrics import _ROUND_BUCKETS

    assert min(_ROUND_BUCKETS) <= 0.05 and 0.1 in _ROUND_BUCKETS and 0.5 in _ROUND_BUCKETS
