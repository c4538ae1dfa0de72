"""The fedledger Grafana dashboards, as code (``grafana-foundation-sdk``, Grafana 11 build).

``python -m monitoring.dashboards --out monitoring/dashboards`` writes one JSON file per
dashboard, deterministically (sorted keys, fixed uids and panel ids), so the committed files
can be compared with a fresh generation (tests/monitoring/test_dashboards.py). Every query
uses only metrics the gateway and agent export (docs/architecture.md, "Metrics") and the
template variables ``$datasource``, ``$job``, ``$instance`` (and ``$agent_job`` on the
fleet overview).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    DynamicConfigValue,
    Threshold,
    ThresholdsMode,
    ValueMap,
    ValueMappingResult,
    VariableOption,
    VariableRefresh,
    VariableSort,
)

from fedcore import MAX_CLASS_RECALLS

#: The Prometheus job names the monitoring role (and the tests) scrape the components under.
GATEWAY_JOB = "fedledger-gateway"
AGENT_JOB = "fedledger-agent"

DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
#: Selector of the gateway series the template variables pick.
GW = 'job="$job", instance=~"$instance"'
AGENT = 'job="$agent_job"'
TAGS = ["fedledger"]

Panel = stat.Panel | timeseries.Panel


# ---------------------------------------------------------------------------- building blocks
def _query(expr: str, legend: str, ref: str) -> prometheus.Dataquery:
    return (
        prometheus.Dataquery()
        .expr(expr)
        .legend_format(legend)
        .ref_id(ref)
        .range()
        .datasource(DATASOURCE)
    )


def _targets(panel: Panel, queries: Iterable[tuple[str, str]]) -> Panel:
    """Add the queries. A count over a window (``increase``) is rounded: Prometheus
    extrapolates it to the window's edges, and "397.4 rounds closed" is not a count."""
    queries = list(queries)
    for i, (expr, legend) in enumerate(queries):
        if "increase(" in expr:
            expr = f"round({expr})"
        panel.with_target(_query(expr, legend, chr(ord("A") + i)))
    if queries and all("increase(" in expr for expr, _ in queries):
        panel.decimals(0)
    return panel


def _up_down(panel: stat.Panel) -> stat.Panel:
    """0 reads "down" in red, 1 "up" in green (a bare 0 in the default green reads as fine)."""
    return panel.thresholds(
        dash.ThresholdsConfig()
        .mode(ThresholdsMode.ABSOLUTE)
        .steps([Threshold(value=None, color="red"), Threshold(value=1, color="green")])
    ).mappings(
        [
            ValueMap(
                options={
                    "0": ValueMappingResult(text="down", color="red", index=0),
                    "1": ValueMappingResult(text="up", color="green", index=1),
                }
            )
        ]
    )


def stat_panel(
    title: str, description: str, *queries: tuple[str, str], unit: str = "none", w: int = 4
) -> stat.Panel:
    panel = (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .height(4)
        .span(w)
        .graph_mode(common.BigValueGraphMode.NONE)
        .color_mode(common.BigValueColorMode.VALUE)
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]))
    )
    return _targets(panel, queries)


def graph_panel(
    title: str,
    description: str,
    *queries: tuple[str, str],
    unit: str = "none",
    w: int = 12,
    minimum: float | None = 0,
    maximum: float | None = None,
) -> timeseries.Panel:
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .height(8)
        .span(w)
        .legend(
            common_builders.VizLegendOptions()
            .show_legend(True)
            .display_mode(common.LegendDisplayMode.LIST)
            .placement(common.LegendPlacement.BOTTOM)
        )
    )
    if minimum is not None:
        panel.min(minimum)
    if maximum is not None:
        panel.max(maximum)
    return _targets(panel, queries)


def _variables(agents: bool) -> list:
    variables = [
        dash.DatasourceVariable("datasource")
        .label("Data source")
        .type("prometheus")
        .current(VariableOption(selected=True, text="Prometheus", value="Prometheus")),
        dash.QueryVariable("job")
        .label("Gateway job")
        .datasource(DATASOURCE)
        .query("label_values(fedledger_gateway_build_info, job)")
        .refresh(VariableRefresh.ON_DASHBOARD_LOAD)
        .sort(VariableSort.ALPHABETICAL_ASC)
        .current(VariableOption(selected=True, text=GATEWAY_JOB, value=GATEWAY_JOB)),
        dash.QueryVariable("instance")
        .label("Gateway instance")
        .datasource(DATASOURCE)
        .query('label_values(fedledger_gateway_build_info{job="$job"}, instance)')
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(VariableSort.ALPHABETICAL_ASC)
        .include_all(True)
        .all_value(".*")
        .current(VariableOption(selected=True, text="All", value="$__all")),
    ]
    if agents:
        variables.append(
            dash.QueryVariable("agent_job")
            .label("Agent job")
            .datasource(DATASOURCE)
            .query("label_values(fedledger_agent_build_info, job)")
            .refresh(VariableRefresh.ON_DASHBOARD_LOAD)
            .sort(VariableSort.ALPHABETICAL_ASC)
            .current(VariableOption(selected=True, text=AGENT_JOB, value=AGENT_JOB))
        )
    return variables


def _dashboard(uid: str, title: str, description: str, panels: list, *, agents: bool = False):
    builder = (
        dash.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(TAGS)
        .timezone("browser")
        .time("now-6h", "now")
        .refresh("30s")
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .editable()
    )
    for variable in _variables(agents):
        builder.with_variable(variable)
    for panel_id, panel in enumerate(panels, start=1):
        if isinstance(panel, dash.Row):
            panel.id(panel_id)
            builder.with_row(panel)
        else:
            builder.with_panel(panel.id(panel_id))
    return builder.build()


def _rate(metric: str, selector: str = GW) -> str:
    return f"rate({metric}{{{selector}}}[$__rate_interval])"


def _quantile(q: float, metric: str, selector: str = GW, by: str = "le") -> str:
    return (
        f"histogram_quantile({q}, sum by ({by}) "
        f"(rate({metric}_bucket{{{selector}}}[$__rate_interval])))"
    )


# ---------------------------------------------------------------------------- the dashboards
def fleet_overview():
    g = "fedledger_gateway_"
    a = "fedledger_agent_"
    panels = [
        _up_down(
            stat_panel(
                "Gateway up",
                "Up while Prometheus scrapes the gateway, down (red) when it cannot.",
                (f"up{{{GW}}}", "{{instance}}"),
            )
        ),
        stat_panel(
            "Devices registered",
            "Devices in the gateway's registry.",
            (f"{g}devices_registered{{{GW}}}", "{{instance}}"),
        ),
        stat_panel(
            "Devices online",
            "Registered devices whose last presence said online.",
            (f"{g}devices_online{{{GW}}}", "{{instance}}"),
        ),
        stat_panel(
            "Devices offline",
            "Fraction of registered devices not online (alert FedledgerDevicesOffline above 30 %).",
            (f"1 - {g}devices_online{{{GW}}} / {g}devices_registered{{{GW}}}", "{{instance}}"),
            unit="percentunit",
        ),
        stat_panel(
            "Current round",
            "The open round (the round count once the final model is out).",
            (f"{g}current_round{{{GW}}}", "{{instance}}"),
        ),
        stat_panel(
            "Global model accuracy",
            "Accuracy of the last global model on held-out data.",
            (f"{g}global_model_accuracy_ratio{{{GW}}}", "{{instance}}"),
            unit="percentunit",
        ),
        graph_panel(
            "Devices online / registered",
            "Presence of the registered devices over time.",
            (f"{g}devices_registered{{{GW}}}", "registered {{instance}}"),
            (f"{g}devices_online{{{GW}}}", "online {{instance}}"),
        ),
        graph_panel(
            "Versions",
            "Processes per fedledger version (gateway and agents).",
            (f"count by (version) ({g}build_info{{{GW}}})", "gateway {{version}}"),
            (f"count by (version) ({a}build_info{{{AGENT}}})", "agents {{version}}"),
        ),
        graph_panel(
            "Agent training time (p90)",
            "90th percentile of one round's local training, per scraped agent.",
            (_quantile(0.9, f"{a}training_seconds", AGENT, "le, instance"), "{{instance}}"),
            unit="s",
        ),
        graph_panel(
            "Agent resident memory",
            "Resident memory of each scraped agent process.",
            (f"{a}resident_memory_bytes{{{AGENT}}}", "{{instance}}"),
            unit="bytes",
        ),
        graph_panel(
            "Agent upload rate",
            "Bytes of signed updates each scraped agent publishes.",
            (_rate(f"{a}update_sent_bytes_total", AGENT), "{{instance}}"),
            unit="Bps",
        ),
        graph_panel(
            "Rounds trained by agents",
            "Rounds the scraped agents trained and sent an update for, per hour.",
            (f"sum(increase({a}rounds_trained_total{{{AGENT}}}[1h]))", "rounds trained"),
        ),
    ]
    return _dashboard(
        "fedledger-fleet-overview",
        "fedledger / Fleet overview",
        "Gateway availability, device presence, versions and the scraped edge agents.",
        panels,
        agents=True,
    )


def round_progress():
    g = "fedledger_gateway_"
    panels = [
        stat_panel(
            "Current round", "The open round.", (f"{g}current_round{{{GW}}}", "{{instance}}"), w=6
        ),
        stat_panel(
            "Rounds closed (1h)",
            "Rounds closed in the last hour"
            " (alert FedledgerNoRoundCompleted after 30 minutes without one).",
            (f"increase({g}rounds_closed_total{{{GW}}}[1h])", "{{instance}}"),
            w=6,
        ),
        stat_panel(
            "Last round participants",
            "Devices whose updates went into the last closed round.",
            (f"{g}last_round_participants{{{GW}}}", "{{instance}}"),
            w=6,
        ),
        stat_panel(
            "Global model accuracy",
            "Accuracy of the last global model on held-out data.",
            (f"{g}global_model_accuracy_ratio{{{GW}}}", "{{instance}}"),
            unit="percentunit",
            w=6,
        ),
        graph_panel(
            "Round number",
            "The open round and the rounds this process closed.",
            (f"{g}current_round{{{GW}}}", "current {{instance}}"),
            (f"{g}rounds_closed_total{{{GW}}}", "closed {{instance}}"),
        ),
        graph_panel(
            "Round duration",
            "Time from opening a round to closing it.",
            (_quantile(0.5, f"{g}round_duration_seconds"), "p50"),
            (_quantile(0.9, f"{g}round_duration_seconds"), "p90"),
            (
                f"sum({_rate(f'{g}round_duration_seconds_sum')})"
                f" / sum({_rate(f'{g}round_duration_seconds_count')})",
                "mean",
            ),
            unit="s",
        ),
        graph_panel(
            "Aggregation time",
            "Time to compute a round's FedAvg result.",
            (_quantile(0.5, f"{g}aggregation_seconds"), "p50"),
            (_quantile(0.99, f"{g}aggregation_seconds"), "p99"),
            unit="s",
        ),
        graph_panel(
            "Participants and accuracy",
            "Participants of the last closed round (left axis); accuracy of the last global"
            " model (right axis, percent).",
            (f"{g}last_round_participants{{{GW}}}", "participants {{instance}}"),
            (f"{g}global_model_accuracy_ratio{{{GW}}}", "accuracy {{instance}}"),
        ).override_by_regexp(
            "accuracy.*",
            [
                DynamicConfigValue(id_val="custom.axisPlacement", value="right"),
                DynamicConfigValue(id_val="unit", value="percentunit"),
                DynamicConfigValue(id_val="max", value=1),
            ],
        ),
        graph_panel(
            "Clinical metrics",
            "Balanced accuracy, ROC AUC, and (two classes) sensitivity and specificity of the"
            " last global model on held-out data; each is in its round's ledger record.",
            (f"{g}global_model_balanced_accuracy_ratio{{{GW}}}", "balanced accuracy {{instance}}"),
            (f"{g}global_model_auc_ratio{{{GW}}}", "AUC {{instance}}"),
            (f"{g}global_model_sensitivity_ratio{{{GW}}}", "sensitivity {{instance}}"),
            (f"{g}global_model_specificity_ratio{{{GW}}}", "specificity {{instance}}"),
            maximum=1,
        ),
        graph_panel(
            "Recall per class",
            "Recall of each class of the last global model on held-out data (tasks of at most"
            f" {MAX_CLASS_RECALLS} classes): a class the model misses shows here while accuracy"
            " still looks good.",
            (f"{g}global_model_class_recall_ratio{{{GW}}}", "class {{class}} {{instance}}"),
            maximum=1,
        ),
        graph_panel(
            "Update throughput",
            "Messages received on update topics and updates accepted, per second.",
            (f"sum({_rate(f'{g}updates_received_total')})", "received"),
            (f"sum({_rate(f'{g}updates_accepted_total')})", "accepted"),
            unit="reqps",
            w=24,
        ),
        graph_panel(
            "Privacy spent",
            "Epsilon spent so far by a task with differential privacy (-1: the task has none);"
            " the task ends before a round that would exceed its budget (docs/privacy.md).",
            (f"{g}dp_epsilon{{{GW}}}", "epsilon {{instance}}"),
            w=24,
        ),
    ]
    return _dashboard(
        "fedledger-round-progress",
        "fedledger / Round progress",
        "Rounds opened and closed, their duration, aggregation time, participants, accuracy and"
        " the clinical metrics.",
        panels,
    )


#: Reasons that point at a misbehaving or hostile sender rather than a late or slow device.
SECURITY_REASONS = (
    "unknown_device|bad_signature|replayed|wrong_task|topic_mismatch|digest_mismatch|wrong_base"
)


def rejections():
    g = "fedledger_gateway_"
    rejected = f"{g}updates_rejected_total"
    security = f'{GW}, reason=~"{SECURITY_REASONS}"'
    panels = [
        stat_panel(
            "Rejection ratio",
            "Rejected / received over 10 minutes (alert FedledgerRejectionRatioHigh above 20 %).",
            (
                f"sum(rate({rejected}{{{GW}}}[10m]))"
                f" / sum(rate({g}updates_received_total{{{GW}}}[10m]))",
                "ratio",
            ),
            unit="percentunit",
            w=6,
        ),
        stat_panel(
            "Rejected (range)",
            "Messages rejected over the dashboard's time range.",
            (f"sum(increase({rejected}{{{GW}}}[$__range]))", "rejected"),
            w=6,
        ),
        stat_panel(
            "Security rejections (range)",
            "Rejections for reasons that point at a hostile sender"
            f" ({SECURITY_REASONS.replace('|', ', ')}).",
            (f"sum(increase({rejected}{{{security}}}[$__range]))", "security"),
            w=6,
        ),
        stat_panel(
            "Received (range)",
            "Messages received on update topics over the dashboard's time range.",
            (f"sum(increase({g}updates_received_total{{{GW}}}[$__range]))", "received"),
            w=6,
        ),
        graph_panel(
            "Rejections by reason",
            "Messages refused per second, by reason (docs/wire.md).",
            (f"sum by (reason) ({_rate(rejected)})", "{{reason}}"),
            unit="reqps",
        ),
        graph_panel(
            "Security events",
            "Rejections that point at an unknown device, a forged or replayed update.",
            (f"sum by (reason) ({_rate(rejected, security)})", "{{reason}}"),
            unit="reqps",
        ),
        graph_panel(
            "Rejection ratio",
            "Rejected / received messages.",
            (
                f"sum({_rate(rejected)}) / sum({_rate(f'{g}updates_received_total')})",
                "rejected / received",
            ),
            unit="percentunit",
            maximum=1,
        ),
        graph_panel(
            "Bytes received on update topics",
            "Bytes of messages received on update topics, accepted or not.",
            (f"sum({_rate(f'{g}update_received_bytes_total')})", "bytes/s"),
            unit="Bps",
        ),
    ]
    return _dashboard(
        "fedledger-rejections-security",
        "fedledger / Rejections and security events",
        "Updates the gateway refused, by reason, and the reasons that point at an attack.",
        panels,
    )


def ledger_health():
    g = "fedledger_gateway_"
    commit = f"{g}ledger_commit_seconds"
    failures = f"{g}ledger_commit_failures_total"
    panels = [
        stat_panel(
            "Commit failures (15m)",
            "Failed ledger appends in the last 15 minutes"
            " (alert FedledgerLedgerCommitFailures above 0).",
            (f"sum(increase({failures}{{{GW}}}[15m]))", "failures"),
            w=6,
        ),
        stat_panel(
            "Commit failures (total)",
            "Failed ledger appends since the gateway started.",
            (f"sum({failures}{{{GW}}})", "failures"),
            w=6,
        ),
        stat_panel(
            "Commits (total)",
            "Successful ledger appends since the gateway started.",
            (f"sum({commit}_count{{{GW}}})", "commits"),
            w=6,
        ),
        stat_panel(
            "Commit latency (p90)",
            "90th percentile of a successful append over 1 hour.",
            (f"histogram_quantile(0.9, sum by (le) (rate({commit}_bucket{{{GW}}}[1h])))", "p90"),
            unit="s",
            w=6,
        ),
        graph_panel(
            "Commit latency",
            "Time to append a round record to the ledger (successful appends only).",
            (_quantile(0.5, commit), "p50"),
            (_quantile(0.9, commit), "p90"),
            (_quantile(0.99, commit), "p99"),
            unit="s",
        ),
        graph_panel(
            "Commits and failures",
            "Successful and failed ledger appends per second.",
            (f"sum({_rate(f'{commit}_count')})", "commits"),
            (f"sum({_rate(failures)})", "failures"),
            unit="reqps",
        ),
        stat_panel(
            "Outbox depth",
            "Closed rounds waiting for the ledger (the outbox anchors them in order).",
            (f"sum({g}ledger_outbox_depth{{{GW}}})", "rounds"),
            w=8,
        ),
        stat_panel(
            "Oldest waiting",
            "How long the oldest round waiting for the ledger has waited.",
            (f"max({g}ledger_outbox_oldest_age_seconds{{{GW}}})", "age"),
            unit="s",
            w=8,
        ),
        stat_panel(
            "Refused round",
            "The round the contract refuses (-1: none); alert FedledgerLedgerRoundRefused.",
            (f"max({g}ledger_refused_round{{{GW}}})", "round"),
            w=8,
        ),
        graph_panel(
            "Rounds closed vs. commits (1h)",
            "Rounds closed and successful appends per hour: a gap means rounds not yet anchored.",
            (f"sum(increase({g}rounds_closed_total{{{GW}}}[1h]))", "rounds closed"),
            (f"sum(increase({commit}_count{{{GW}}}[1h]))", "commits"),
            w=24,
        ),
    ]
    return _dashboard(
        "fedledger-ledger-health",
        "fedledger / Ledger health",
        "Appends of round records to the ledger: latency, successes and failures.",
        panels,
    )


#: File name (without ``.json``) -> the function building that dashboard.
DASHBOARDS: dict[str, Callable[[], object]] = {
    "fleet-overview": fleet_overview,
    "round-progress": round_progress,
    "rejections-security": rejections,
    "ledger-health": ledger_health,
}


def render(name: str) -> str:
    """The JSON text of dashboard ``name``: sorted keys, two-space indent, final newline."""
    model = DASHBOARDS[name]()
    data = json.loads(json.dumps(model, cls=JSONEncoder))
    return json.dumps(data, sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def write(out: Path) -> list[Path]:
    """Write every dashboard to ``out/<name>.json``; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in DASHBOARDS:
        path = out / f"{name}.json"
        path.write_text(render(name), encoding="utf-8")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m monitoring.dashboards", description="Generate the Grafana dashboards."
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "dashboards")
    args = parser.parse_args(argv)
    for path in write(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
