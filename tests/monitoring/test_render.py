"""monitoring.render without a real Prometheus: template substitution, units, layout, the
per-panel summary, and the command line's errors (exit code 2, one line, no traceback). The
rendering of the committed dashboards against a real Prometheus is in test_dashboards.py."""

from __future__ import annotations

import json
import math
import re
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
from PIL import Image

from fedcore.mosquitto import free_port
from monitoring import render
from monitoring._templating import (
    TemplateError,
    dashboard_variables,
    format_duration,
    intervals,
    parse_duration,
    substitute,
)

ROOT = Path(__file__).resolve().parents[2]
FLEET = ROOT / "monitoring" / "dashboards" / "fleet-overview.json"
END = 1_800_000_000.0


# ---------------------------------------------------------------------------- templating
def test_substitute_replaces_every_variable_form():
    values = {"job": "gw", "instance": ".+", "__rate_interval": "1m"}
    expr = 'rate(x{job="$job", instance=~"${instance}", a="${job:regex}", b="[[job]]"}[$__rate_interval])'
    assert substitute(expr, values) == 'rate(x{job="gw", instance=~".+", a="gw", b="gw"}[1m])'
    with pytest.raises(TemplateError) as caught:
        substitute('up{job="$jobs"}', values)
    assert caught.value.name == "jobs"


def test_durations_and_grafana_intervals():
    assert parse_duration("1h30m") == 5400 and parse_duration("250ms") == 0.25
    for bad in ("", "15", "m", "1h 2m", "-5m"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    assert [format_duration(s) for s in (60, 90, 3600, 21600, 0.5)] == [
        "1m",
        "1m30s",
        "1h",
        "6h",
        "500ms",
    ]
    # Grafana: step never below the scrape interval, rate window at least 4 scrapes
    assert intervals(900) == {
        "__interval": "15s",
        "__interval_ms": "15000",
        "__rate_interval": "1m",
        "__range": "15m",
        "__range_s": "900",
        "__range_ms": "900000",
    }
    six_hours = intervals(6 * 3600)
    assert six_hours["__interval"] == "1m12s" and six_hours["__rate_interval"] == "1m27s"
    assert intervals(60, scrape_s=1)["__rate_interval"] == "4s"


def test_variables_come_from_the_saved_dashboard():
    board = json.loads(FLEET.read_text())
    assert dashboard_variables(board) == {
        "job": "fedledger-gateway",
        "instance": ".*",  # "All": the variable's allValue
        "agent_job": "fedledger-agent",
    }
    multi = {
        "templating": {"list": [{"name": "i", "type": "query", "current": {"value": ["a", "b"]}}]}
    }
    assert dashboard_variables(multi) == {"i": "(a|b)"}


# ---------------------------------------------------------------------------- units, legends
def test_values_are_printed_in_grafana_units():
    assert render.format_value(None, "s") == "No data"
    assert render.format_value(3, "none") == "3"
    assert render.format_value(0.8766, "percentunit") == "87.7%"
    assert render.format_value(0.0205, "s") == "20.5 ms"
    assert render.format_value(90, "s") == "1.5 min"
    assert render.format_value(57 << 20, "bytes") == "57 MiB"
    assert render.format_value(1500, "Bps") == "1.5 kB/s"
    assert render.format_value(0.25, "reqps") == "0.25 req/s"
    assert render.format_value(math.nan, "s") == "NaN"
    assert render.format_value(2, "widgets") == "2 widgets"


def test_legends_follow_legend_format():
    labels = {"__name__": "up", "instance": "gw:9100", "job": "g"}
    assert render.legend_for("online {{instance}}", labels) == "online gw:9100"
    assert render.legend_for("{{ missing }}x", labels) == "x"
    assert render.legend_for("", labels) == 'up{instance="gw:9100", job="g"}'
    assert render.legend_for("__auto", {"version": "1"}) == '{version="1"}'


# ---------------------------------------------------------------------------- rendering
class FakePrometheus:
    """Answers ``query_range`` from a table of expression -> series count; refuses "bad"."""

    def __init__(self, counts: dict[str, int]):
        self.counts = counts
        self.asked: list[str] = []

    def query_range(self, expr, *, start, end, step):
        self.asked.append(expr)
        if "bad" in expr:
            raise render.QueryError(expr, "parse error: unexpected identifier")
        times = [start + i * step for i in range(int((end - start) // step) + 1)]
        return [
            {
                "metric": {"instance": f"i{n}"},
                "values": [[t, "NaN" if expr == "nan" else str(n + t % 7)] for t in times],
            }
            for n in range(self.counts.get(expr, 0))
        ]


def panel(kind: str, title: str, grid: tuple[int, int, int, int], *exprs: str, **extra) -> dict:
    x, y, w, h = grid
    return {
        "type": kind,
        "title": title,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "targets": [{"expr": e, "legendFormat": "{{instance}}", "refId": "A"} for e in exprs],
        **extra,
    }


def test_render_lays_out_every_panel_type_and_reports_each(tmp_path):
    board = {
        "title": "test board",
        "templating": {"list": [{"name": "job", "type": "query", "current": {"value": "gw"}}]},
        "panels": [
            panel("stat", "one", (0, 0, 12, 4), 'a{job="$job"}'),
            panel("gauge", "two", (12, 0, 12, 4), "b", fieldConfig={"defaults": {"unit": "s"}}),
            panel("timeseries", "lines", (0, 4, 12, 8), "c[$__rate_interval]"),
            panel("timeseries", "empty", (12, 4, 6, 8), "nothing"),
            panel("timeseries", "quantile of nothing", (18, 4, 6, 8), "nan"),
            panel("table", "table", (0, 12, 8, 6), "d"),
            panel("bargauge", "refused", (8, 12, 16, 6), "bad"),
            {
                "type": "row",
                "title": "more",
                "collapsed": True,
                "gridPos": {"x": 0, "y": 18, "w": 24, "h": 1},
                "panels": [panel("timeseries", "inside", (0, 19, 24, 8), "e")],
            },
            panel("text", "after the row", (0, 19, 24, 3)),
        ],
    }
    fake = FakePrometheus({'a{job="gw"}': 1, "b": 2, "c[1m]": 3, "d": 12, "e": 1, "nan": 2})
    rendering = render.render_dashboard(
        board, fake, tmp_path / "out" / "board.png", range_s=900, end=END
    )
    summary = [
        (p.title, p.type, p.series, p.has_data, p.error is not None) for p in rendering.panels
    ]
    assert summary == [
        ("one", "stat", 1, True, False),
        ("two", "gauge", 2, True, False),
        ("lines", "timeseries", 3, True, False),
        ("empty", "timeseries", 0, False, False),
        ("quantile of nothing", "timeseries", 2, False, False),  # series, but only NaN
        ("table", "table", 12, True, False),
        ("refused", "bargauge", 0, False, True),
        ("more", "row", 0, False, False),
        ("inside", "timeseries", 1, True, False),
        ("after the row", "text", 0, False, False),
    ]
    assert rendering.panels[2].points == 3 * 61  # 15 minutes in 15 s steps, both ends
    assert "parse error" in rendering.panels[6].error
    assert 'a{job="gw"}' in fake.asked and "c[1m]" in fake.asked
    # the collapsed row is drawn open: "after the row" moves down by the row's 8 units
    height = render.HEADER_PX + (19 + 8 + 3) * render.ROW_PX + render.GAP_PX
    assert rendering.size == (1440, height)
    with Image.open(rendering.path) as image:
        assert image.format == "PNG" and image.size == (1440, height)


# ---------------------------------------------------------------------------- command line
class PrometheusAPI(BaseHTTPRequestHandler):
    """Just enough of /api/v1/query_range: one series per query, HTTP 400 (as for bad
    PromQL) for the agent training time query."""

    def do_POST(self):
        form = urllib.parse.parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode())
        expr, start = form["query"][0], float(form["start"][0])
        if "training_seconds" in expr:
            status, body = 400, {"status": "error", "errorType": "bad_data", "error": "nope"}
        else:
            series = [{"metric": {"instance": "gw"}, "values": [[start, "1"], [start + 60, "2"]]}]
            status = 200
            body = {"status": "success", "data": {"resultType": "matrix", "result": series}}
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args):
        pass


@pytest.fixture
def api():
    server = ThreadingHTTPServer(("127.0.0.1", 0), PrometheusAPI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_command_line_renders_and_lists_the_panels(api, tmp_path, capsys):
    out = tmp_path / "fleet.png"
    argv = ["--prometheus", api, "--dashboard", str(FLEET), "--out", str(out), "--range", "15m"]
    assert render.main([*argv, "--var", "job=other", "--end", "2026-11-25T00:21:00Z"]) == 0
    printed = capsys.readouterr().out
    assert f"{out} (1440x" in printed
    with pytest.raises(SystemExit) as exited:  # argparse: usage and one error line
        render.main([*argv, "--end", "yesterday"])
    assert exited.value.code == 2
    assert "expected unix seconds or ISO 8601" in capsys.readouterr().err
    assert len(re.findall(r"^  (stat|timeseries) ", printed, re.M)) == 12
    assert re.search(r"^  timeseries +1 series +Agent resident memory$", printed, re.M)
    # a query Prometheus refuses is drawn on its panel and listed, the rest still renders
    assert re.search(r"^  timeseries +error +Agent training time \(p90\): nope", printed, re.M)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        ("{not json", "not JSON"),
        ('{"title": "x"}', "no 'panels' list"),
        ('{"panels": [{"title": "p", "gridPos": {"x": 0}}]}', "'gridPos' needs integers"),
    ],
)
def test_a_bad_dashboard_file_is_one_message_and_exit_code_2(
    api, tmp_path, capsys, content, message
):
    board = tmp_path / "board.json"
    if content is not None:
        board.write_text(content)
    argv = ["--prometheus", api, "--dashboard", str(board), "--out", str(tmp_path / "x.png")]
    assert render.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {board}: ") and message in err
    assert "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("url", ["http://127.0.0.1:{port}", "127.0.0.1:9090", "ftp://x"])
def test_an_unreachable_prometheus_is_one_message_and_exit_code_2(tmp_path, capsys, url):
    url = url.format(port=free_port())  # nothing listens there
    argv = ["--prometheus", url, "--dashboard", str(FLEET), "--out", str(tmp_path / "x.png")]
    assert render.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Prometheus at ") and err.count("\n") == 1
    assert "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


def test_something_that_is_not_prometheus_is_reported_as_such(tmp_path, capsys):
    class NotFound(BaseHTTPRequestHandler):
        def do_POST(self):
            self.send_error(404)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        argv = ["--prometheus", url, "--dashboard", str(FLEET), "--out", str(tmp_path / "x.png")]
        assert render.main(argv) == 2
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert "HTTP 404" in capsys.readouterr().err
