"""Render a Grafana dashboard to a PNG without a Grafana server.

    python -m monitoring.render --prometheus http://127.0.0.1:9090 \\
        --dashboard monitoring/dashboards/fleet-overview.json --out fleet.png --range 15m

No Grafana can run where the project is built and tested (none is packaged), yet a picture of
a dashboard is what a reviewer or an incident report wants. This reads the dashboard JSON,
runs each panel's queries through Prometheus's ``/api/v1/query_range`` (template variables
replaced as Grafana would, :mod:`monitoring._templating`) and draws the panels on Grafana's
24-column grid with matplotlib: time series as lines with their legends, stat and gauge
panels as the last value, anything else as a small table. It is a faithful sketch, not
Grafana: no thresholds beyond the panel's own, no overrides, no transformations.

:func:`render_dashboard` returns what each panel got (title, series count, error), which is
what the tests assert on. Errors: :class:`RenderError` and its two subclasses, drawn here::

    RenderError              the root
    ├── DashboardError       the file is missing, not JSON, or not a dashboard (carries path)
    └── PrometheusError      Prometheus cannot be reached or is not a Prometheus (carries url)

A query Prometheus refuses (400, bad PromQL) does not stop the rendering: the panel shows the
error and its summary carries it.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import textwrap
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from monitoring._templating import (
    DEFAULT_SCRAPE_S,
    TemplateError,
    dashboard_variables,
    format_duration,
    intervals,
    parse_duration,
    substitute,
)

# ---------------------------------------------------------------------------- errors


class RenderError(Exception):
    """Root of the renderer's errors: the message is meant for the person running it."""


class DashboardError(RenderError):
    """The dashboard file is missing, is not JSON, or is not a Grafana dashboard."""

    def __init__(self, path: Path | str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


class PrometheusError(RenderError):
    """Prometheus cannot be reached, or what answered is not a Prometheus query API."""

    def __init__(self, url: str, reason: str):
        super().__init__(f"Prometheus at {url}: {reason}")
        self.url = url
        self.reason = reason


class QueryError(RenderError):
    """Prometheus refused one query (bad PromQL, a timeout): reported on the panel only."""

    def __init__(self, expr: str, reason: str):
        super().__init__(f"{reason} (query: {expr})")
        self.expr = expr
        self.reason = reason


# ---------------------------------------------------------------------------- Prometheus


class RangeQuerier(Protocol):
    """What the renderer needs from Prometheus (tests pass an in-memory fake)."""

    def query_range(
        self, expr: str, *, start: float, end: float, step: float
    ) -> list[dict[str, Any]]:
        """The ``matrix`` result of ``expr``: ``[{"metric": {...}, "values": [[t, "v"]]}]``."""
        ...


class PrometheusClient:
    """``/api/v1/query_range`` over HTTP, with errors sorted into unreachable (abort) and
    refused query (one panel)."""

    def __init__(self, url: str, *, timeout: float = 10.0):
        self.url = url.rstrip("/")
        self.timeout = timeout
        if urllib.parse.urlsplit(self.url).scheme not in ("http", "https"):
            raise PrometheusError(url, "not an http:// or https:// URL")

    def query_range(
        self, expr: str, *, start: float, end: float, step: float
    ) -> list[dict[str, Any]]:
        form = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"}
        request = urllib.request.Request(
            self.url + "/api/v1/query_range",
            data=urllib.parse.urlencode(form).encode(),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body = self._json(response.read())
        except urllib.error.HTTPError as exc:
            with exc:  # the error holds the response (and its socket) open
                raw = exc.read()
            body = self._json(raw, f"HTTP {exc.code} {exc.reason}")
            raise QueryError(expr, str(body.get("error", f"HTTP {exc.code}"))) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise PrometheusError(self.url, f"cannot connect ({reason})") from None
        if body.get("status") != "success":
            raise QueryError(expr, str(body.get("error", "query failed")))
        data = body.get("data") or {}
        if data.get("resultType") != "matrix":
            raise QueryError(expr, f"expected a matrix, got {data.get('resultType')!r}")
        return data.get("result") or []

    def _json(self, raw: bytes, status: str = "HTTP 200") -> dict[str, Any]:
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict) or "status" not in body:
            raise PrometheusError(self.url, f"{status} without a Prometheus API answer")
        return body


# ---------------------------------------------------------------------------- dashboard


def load_dashboard(path: Path | str) -> dict[str, Any]:
    """The dashboard in ``path``: a Grafana JSON model (or an export wrapping it in
    ``{"dashboard": ...}``) whose panels all have a ``gridPos``."""
    path = Path(path)
    try:
        board = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DashboardError(path, "no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DashboardError(path, f"cannot read: {exc}") from None
    except ValueError as exc:
        raise DashboardError(path, f"not JSON: {exc}") from None
    if isinstance(board, dict) and isinstance(board.get("dashboard"), dict):
        board = board["dashboard"]
    if not isinstance(board, dict) or not isinstance(board.get("panels"), list):
        raise DashboardError(path, "not a Grafana dashboard (no 'panels' list)")
    for i, panel in enumerate(_all_panels(board)):
        grid = panel.get("gridPos") if isinstance(panel, dict) else None
        if not isinstance(grid, dict) or not all(
            isinstance(grid.get(k), int) for k in ("x", "y", "w", "h")
        ):
            title = panel.get("title", "?") if isinstance(panel, dict) else "?"
            raise DashboardError(
                path, f"panel {i} ({title!r}): 'gridPos' needs integers x, y, w, h"
            )
    return board


def _all_panels(board: Mapping[str, Any]) -> list[Any]:
    found: list[Any] = []
    for panel in board["panels"]:
        found.append(panel)
        if isinstance(panel, dict):
            found.extend(panel.get("panels") or [])  # inside collapsed rows
    return found


def default_range(board: Mapping[str, Any]) -> float:
    """Seconds in the dashboard's own relative time range (``now-6h`` to ``now``), else 1 h."""
    window = board.get("time") or {}
    start, end = str(window.get("from", "")), str(window.get("to", "now"))
    if start.startswith("now-") and end == "now":
        try:
            return parse_duration(start[4:])
        except ValueError:
            pass
    return 3600.0


# ---------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Series:
    """One series a panel draws: its legend and samples (unix seconds, value)."""

    legend: str
    labels: Mapping[str, str]
    times: tuple[float, ...]
    values: tuple[float, ...]

    def last(self) -> float | None:
        """The last value that is a number (Grafana's ``lastNotNull``)."""
        for value in reversed(self.values):
            if not math.isnan(value):
                return value
        return None


@dataclass(frozen=True)
class PanelSummary:
    """What one panel got: its title and type, how many series its queries returned and how
    many samples of those are numbers (a quantile of no observations is a series of NaN), and
    the error of a query Prometheus refused (the panel then shows it)."""

    title: str
    type: str
    series: int
    points: int = 0
    error: str | None = None

    @property
    def has_data(self) -> bool:
        return self.points > 0


@dataclass(frozen=True)
class Rendering:
    """The PNG written and what each panel showed, in the dashboard's panel order."""

    path: Path
    size: tuple[int, int]
    panels: tuple[PanelSummary, ...] = field(default_factory=tuple)


def legend_for(fmt: str | None, labels: Mapping[str, str]) -> str:
    """A series' legend: ``legendFormat`` with ``{{label}}`` replaced, or Grafana's default
    ``name{label="value", ...}`` when there is no format."""
    if fmt and fmt != "__auto":
        return re.sub(r"\{\{\s*([\w.]+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt)
    name = labels.get("__name__", "")
    rest = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()) if k != "__name__")
    return f"{name}{{{rest}}}" if rest or not name else name


# ---------------------------------------------------------------------------- units


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if abs(value) >= 1e15 or (value and abs(value) < 1e-4):
        return f"{value:.2e}"
    if value == int(value):
        return str(int(value))
    if abs(value) >= 100:
        return f"{value:.1f}".rstrip("0").rstrip(".")
    if abs(value) >= 1:
        return f"{value:.2f}".rstrip("0").rstrip(".")
    return f"{value:.3g}"


def _scaled(value: float, steps: Sequence[tuple[float, str]]) -> str:
    for size, suffix in reversed(steps):
        if abs(value) >= size:
            return f"{_number(value / size)} {suffix}"
    return f"{_number(value / steps[0][0])} {steps[0][1]}"


_IEC = [(1, "B"), (1024, "KiB"), (1024**2, "MiB"), (1024**3, "GiB"), (1024**4, "TiB")]
_SI = [(1, "B"), (1e3, "kB"), (1e6, "MB"), (1e9, "GB"), (1e12, "TB")]
_TIME = [(1e-6, "µs"), (1e-3, "ms"), (1, "s"), (60, "min"), (3600, "hour"), (86400, "day")]
_SHORT = [(1, ""), (1e3, "K"), (1e6, "Mil"), (1e9, "Bil"), (1e12, "Tri")]
#: Grafana's byte units: "bytes" and "binBps" are IEC (KiB), "decbytes" and "Bps" SI (kB).
_BYTES = {"bytes": (_IEC, False), "decbytes": (_SI, False), "Bps": (_SI, True)}
_BYTES["binBps"] = (_IEC, True)
_RATES = {"reqps": "req/s", "ops": "ops/s", "rps": "reads/s", "wps": "writes/s"}


def format_value(value: float | None, unit: str | None = None) -> str:
    """``value`` as Grafana would print it in ``unit`` (the common units; others appended)."""
    if value is None:
        return "No data"
    if math.isnan(value) or math.isinf(value):
        return _number(value)
    unit = unit or "none"
    if unit in ("percentunit", "percent"):
        percent = value * 100 if unit == "percentunit" else value
        return f"{percent:.1f}".rstrip("0").rstrip(".") + "%"
    if unit in ("s", "ms", "µs", "us", "ns"):
        factor = {"s": 1, "ms": 1e-3, "µs": 1e-6, "us": 1e-6, "ns": 1e-9}[unit]
        return "0 s" if value == 0 else _scaled(value * factor, _TIME)
    if unit in _BYTES:
        steps, per_second = _BYTES[unit]
        text = "0 B" if value == 0 else _scaled(value, steps)
        return text + "/s" if per_second else text
    if unit in _RATES:
        return f"{_number(value)} {_RATES[unit]}"
    if unit == "short":
        return _scaled(value, _SHORT).rstrip()
    if unit == "none" or not unit:
        return _number(value)
    return f"{_number(value)} {unit}"


# ---------------------------------------------------------------------------- rendering

#: Grafana's dark theme and its classic palette.
THEME = {
    "background": "#111217",
    "panel": "#181b1f",
    "border": "#2c3235",
    "text": "#ccccdc",
    "muted": "#8e8e9a",
    "grid": "#2c3235",
    "error": "#f2495c",
}
PALETTE = (
    "#73bf69",
    "#f2cc0c",
    "#8ab8ff",
    "#ff780a",
    "#f2495c",
    "#5794f2",
    "#b877d9",
    "#705da0",
    "#37872d",
    "#fade2a",
)
GRID_COLUMNS = 24
ROW_PX = 30  # Grafana: one gridPos unit of height is 30 px
GAP_PX = 8
HEADER_PX = 56
DPI = 100


def _pt(px: float) -> float:
    return px * 72 / DPI


@dataclass
class _Placed:
    panel: dict[str, Any]
    x: int
    y: int
    w: int
    h: int


def _place(board: Mapping[str, Any]) -> list[_Placed]:
    """Panels with their grid positions; a collapsed row's panels are shown expanded below
    it and what follows moves down, as when one clicks the row open in Grafana."""

    def inner(panel: Mapping[str, Any]) -> list[dict[str, Any]]:
        return (panel.get("panels") or []) if panel.get("type") == "row" else []

    opened = []  # (y of a collapsed row, grid units its panels take once open)
    for panel in board["panels"]:
        if inner(panel):
            top = panel["gridPos"]["y"] + 1
            bottom = max(max(c["gridPos"]["y"], top) + c["gridPos"]["h"] for c in inner(panel))
            opened.append((top - 1, bottom - top))

    placed: list[_Placed] = []  # in the dashboard's order, a row's panels right after it
    for panel in board["panels"]:
        grid = panel["gridPos"]
        shift = sum(units for row_y, units in opened if row_y < grid["y"])
        placed.append(_Placed(panel, grid["x"], grid["y"] + shift, grid["w"], grid["h"]))
        for child in inner(panel):
            g = child["gridPos"]
            y = max(g["y"], grid["y"] + 1) + shift
            placed.append(_Placed(child, g["x"], y, g["w"], g["h"]))
    return placed


def render_dashboard(
    board: Mapping[str, Any],
    prometheus: RangeQuerier,
    out: Path | str,
    *,
    range_s: float | None = None,
    end: float | None = None,
    variables: Mapping[str, str] | None = None,
    scrape_s: float = DEFAULT_SCRAPE_S,
    width_px: int = 1440,
) -> Rendering:
    """Draw ``board`` (from :func:`load_dashboard`) over the ``range_s`` seconds before
    ``end`` (default: now; ``range_s`` default: the dashboard's range) into the PNG ``out``.

    ``variables`` override the template variables' saved values (``{"job": "..."}``);
    ``scrape_s`` is the scrape interval ``$__rate_interval`` is derived from, as in Grafana's
    data source settings. Raises :class:`PrometheusError` if Prometheus cannot be reached.
    """
    try:  # the Agg canvas directly: no pyplot, no global backend switch
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise RenderError("matplotlib is needed: pip install 'fedledger[demo]'") from None

    range_s = default_range(board) if range_s is None else range_s
    end = time.time() if end is None else end
    start = end - range_s
    values = {**dashboard_variables(board), **(variables or {})}
    builtins = intervals(range_s, scrape_s=scrape_s)
    values.update(builtins)
    step = parse_duration(builtins["__interval"])

    placed = _place(board)
    bottom = max((p.y + p.h for p in placed), default=1)
    height_px = HEADER_PX + bottom * ROW_PX + GAP_PX
    figure = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)
    FigureCanvasAgg(figure)
    figure.patch.set_facecolor(THEME["background"])
    canvas = _Canvas(figure, width_px, height_px)

    stamp = datetime.fromtimestamp(end, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    shown = ", ".join(f"{k}={v}" for k, v in sorted(values.items()) if not k.startswith("__"))
    canvas.text(GAP_PX, 10, str(board.get("title", "dashboard")), size=15, weight="bold")
    canvas.text(
        GAP_PX,
        34,
        f"last {format_duration(range_s)} to {stamp}   step {builtins['__interval']}, "
        f"rate interval {builtins['__rate_interval']}   {shown}",
        size=9,
        color=THEME["muted"],
    )

    summaries = []
    column_px = (width_px - GAP_PX) / GRID_COLUMNS
    for item in placed:
        panel = item.panel
        box = (
            GAP_PX + item.x * column_px,
            HEADER_PX + item.y * ROW_PX,
            item.w * column_px - GAP_PX,
            item.h * ROW_PX - GAP_PX,
        )
        kind = str(panel.get("type", "?"))
        title = str(panel.get("title", ""))
        if kind == "row":
            canvas.row(box, title)
            summaries.append(PanelSummary(title, kind, 0))
            continue
        series, error = _query_panel(panel, prometheus, values, start, end, step)
        unit = ((panel.get("fieldConfig") or {}).get("defaults") or {}).get("unit")
        canvas.frame(box, title)
        content = (panel.get("options") or {}).get("content")
        if kind == "text" and isinstance(content, str):
            canvas.note(box, content, color=THEME["text"])
        elif error is not None:
            canvas.note(box, error, color=THEME["error"])
        elif not series:
            canvas.note(box, "No data")
        elif kind == "timeseries" or kind == "graph":
            defaults = (panel.get("fieldConfig") or {}).get("defaults") or {}
            canvas.lines(
                box, series, unit, start, end, step, defaults.get("min"), defaults.get("max")
            )
        elif kind in ("stat", "gauge", "singlestat", "bargauge"):
            thresholds = ((panel.get("fieldConfig") or {}).get("defaults") or {}).get("thresholds")
            canvas.stat(box, series, unit, thresholds)
        else:
            canvas.table(box, series, unit)
        points = sum(math.isfinite(v) for s in series for v in s.values)
        summaries.append(PanelSummary(title, kind, len(series), points, error))

    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(out, dpi=DPI, facecolor=figure.get_facecolor(), format="png")
    except OSError as exc:
        raise RenderError(f"cannot write {out}: {exc}") from None
    return Rendering(out, (width_px, height_px), tuple(summaries))


def _query_panel(
    panel: Mapping[str, Any],
    prometheus: RangeQuerier,
    values: Mapping[str, str],
    start: float,
    end: float,
    step: float,
) -> tuple[list[Series], str | None]:
    series: list[Series] = []
    for target in panel.get("targets") or []:
        expr = target.get("expr")
        if not expr or target.get("hide"):
            continue
        try:
            result = prometheus.query_range(
                substitute(expr, values), start=start, end=end, step=step
            )
        except (QueryError, TemplateError) as exc:
            return series, str(exc)
        for item in result:
            labels = item.get("metric") or {}
            samples = item.get("values") or []
            series.append(
                Series(
                    legend_for(target.get("legendFormat"), labels),
                    labels,
                    tuple(float(t) for t, _ in samples),
                    tuple(float(v) for _, v in samples),
                )
            )
    return series, None


def _threshold_color(value: float, thresholds: Mapping[str, Any] | None) -> str:
    color = PALETTE[0]
    steps = (thresholds or {}).get("steps") or []
    for step in steps:
        limit = step.get("value")
        if limit is None or value >= float(limit):
            color = _grafana_color(step.get("color", color))
    return color


def _grafana_color(name: str) -> str:
    named = {"green": "#73bf69", "red": "#f2495c", "yellow": "#fade2a", "orange": "#ff9830"}
    named |= {"blue": "#5794f2", "purple": "#b877d9", "text": THEME["text"]}
    return named.get(name, name)


class _Canvas:
    """Drawing in pixels from the top left, as Grafana lays out its grid."""

    def __init__(self, figure: Any, width: int, height: int):
        self.figure = figure
        self.width = width
        self.height = height

    def _fx(self, x: float) -> float:
        return x / self.width

    def _fy(self, y: float) -> float:
        return 1 - y / self.height

    def text(self, x: float, y: float, text: str, *, size: float, **style: Any) -> Any:
        style.setdefault("color", THEME["text"])
        style.setdefault("va", "top")
        return self.figure.text(self._fx(x), self._fy(y), text, fontsize=size, **style)

    def axes(self, box: tuple[float, float, float, float]) -> Any:
        x, y, w, h = box
        rect = [self._fx(x), self._fy(y + h), w / self.width, h / self.height]
        return self.figure.add_axes(rect)

    def frame(self, box: tuple[float, float, float, float], title: str) -> None:
        from matplotlib.patches import FancyBboxPatch

        x, y, w, h = box
        patch = FancyBboxPatch(
            (self._fx(x), self._fy(y + h)),
            w / self.width,
            h / self.height,
            boxstyle="round,pad=0,rounding_size=0.002",
            transform=self.figure.transFigure,
            facecolor=THEME["panel"],
            edgecolor=THEME["border"],
            linewidth=1,
            zorder=-1,  # under the panel's axes
        )
        self.figure.patches.append(patch)
        label = self.text(x + 8, y + 7, title, size=_pt(13), weight="bold")
        label.set_clip_on(False)
        _fit(label, w - 16)

    def row(self, box: tuple[float, float, float, float], title: str) -> None:
        """A row's title and rule; collapsed rows are drawn open (see :func:`_place`)."""
        x, y, w, h = box
        self.text(x, y + 4, "▾ " + title, size=_pt(15), weight="bold")
        self.figure.add_artist(_hline(self, x, x + w, y + h + 2, THEME["border"], 1))

    def note(self, box: tuple[float, float, float, float], text: str, **style: Any) -> None:
        x, y, w, h = box
        style.setdefault("color", THEME["muted"])
        lines = textwrap.wrap(text, max(8, int((w - 16) // 7))) or [""]
        fits = max(1, int((h - 36) // 17))
        if len(lines) > fits:
            lines = [*lines[: fits - 1], lines[fits - 1][:-1] + "…"]
        self.text(
            x + w / 2,
            y + 14 + h / 2,
            "\n".join(lines),
            size=_pt(13),
            ha="center",
            va="center",
            multialignment="center",
            **style,
        )

    def lines(
        self,
        box: tuple[float, float, float, float],
        series: Sequence[Series],
        unit: str | None,
        start: float,
        end: float,
        step: float,
        minimum: float | None,
        maximum: float | None,
    ) -> None:
        import matplotlib.dates as mdates
        from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator

        x, y, w, h = box
        entries = [(s.legend or " ", PALETTE[i % len(PALETTE)]) for i, s in enumerate(series)]
        legend_rows = self._legend_rows(entries, w - 16)
        legend_h = 16 * min(len(legend_rows), 3) + 4
        left, top, bottom = 64, 30, 20 + legend_h
        ax = self.axes((x + left, y + top, w - left - 28, h - top - bottom))
        ax.set_facecolor(THEME["panel"])
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.grid(True, color=THEME["grid"], linewidth=0.6)
        ax.tick_params(colors=THEME["muted"], labelsize=_pt(11), length=0, pad=4)
        low, high = math.inf, -math.inf
        for s, (_, color) in zip(series, entries, strict=True):
            times, vals = _with_gaps(s.times, s.values, step)
            when = [datetime.fromtimestamp(t, tz=timezone.utc) for t in times]
            ax.plot(when, vals, color=color, linewidth=1.2)
            alone = _isolated(vals)  # a line needs two samples: draw these as points
            if alone:
                ax.plot(
                    [when[i] for i in alone], [vals[i] for i in alone], "o", color=color, ms=2.5
                )
            finite = [v for v in vals if math.isfinite(v)]
            if finite:
                low, high = min(low, *finite), max(high, *finite)
        ax.set_xlim(
            datetime.fromtimestamp(start, tz=timezone.utc),
            datetime.fromtimestamp(end, tz=timezone.utc),
        )
        span = end - start
        fmt = "%H:%M:%S" if span <= 3600 else "%H:%M" if span <= 2 * 86400 else "%m-%d"
        locator = mdates.AutoDateLocator(
            tz=timezone.utc, minticks=4, maxticks=max(4, int(w // 100))
        )
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(mdates.DateFormatter(fmt, tz=timezone.utc))
        if not math.isfinite(low):
            low, high = 0.0, 1.0
        lo = float(minimum) if minimum is not None else low
        hi = float(maximum) if maximum is not None else high
        if hi <= lo:
            hi = lo + (abs(lo) or 1.0)
        # round ticks (in KiB, MiB... for binary units), the axis ending on one unless the
        # panel sets its own min / max; a little headroom so a line on the top is not cut
        scale = _tick_scale(unit, max(abs(lo), abs(hi)))
        locator = MaxNLocator(max(2, int((h - top - bottom) // 28)), steps=[1, 2, 2.5, 5, 10])
        ticks = [t * scale for t in locator.tick_values(lo / scale, hi / scale)]
        if minimum is None:
            lo = max([t for t in ticks if t <= lo], default=lo)
        if maximum is None:
            hi = min([t for t in ticks if t >= hi], default=hi)
        ax.set_ylim(lo, hi + (0 if maximum is not None else (hi - lo) * 0.015))
        ax.yaxis.set_major_locator(FixedLocator([t for t in ticks if lo <= t <= hi]))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: format_value(v, unit)))
        self._legend(legend_rows, x + 10, y + h - legend_h + 2, w - 20, len(entries))

    def _legend_rows(
        self, entries: Sequence[tuple[str, str]], width: float
    ) -> list[list[tuple[str, str]]]:
        rows: list[list[tuple[str, str]]] = [[]]
        used = 0.0
        for label, color in entries:
            need = 22 + 6.2 * len(label) + 14
            if rows[-1] and used + need > width:
                rows.append([])
                used = 0.0
            rows[-1].append((label, color))
            used += need
        return rows

    def _legend(
        self, rows: list[list[tuple[str, str]]], x: float, y: float, width: float, total: int
    ) -> None:
        """Up to three rows of entries; the last one says how many more there are."""
        shown = 0
        for r, row in enumerate(rows[:3]):
            cx = x
            for i, (label, color) in enumerate(row):
                if r == 2 and len(rows) > 3 and i == len(row) - 1:
                    label, color = f"+{total - shown} more", THEME["muted"]
                self.figure.add_artist(_hline(self, cx, cx + 14, y + r * 16 + 6, color, 3))
                _fit(self.text(cx + 18, y + r * 16, label, size=_pt(11)), x + width - cx - 18)
                cx += 22 + 6.2 * len(label) + 14
                shown += 1

    def stat(
        self,
        box: tuple[float, float, float, float],
        series: Sequence[Series],
        unit: str | None,
        thresholds: Mapping[str, Any] | None,
    ) -> None:
        x, y, w, h = box
        shown = list(series[:6])
        cell = w / len(shown)
        top = y + 28
        body = h - 28 - 6
        for i, s in enumerate(shown):
            value = s.last()
            text = format_value(value, unit)
            color = THEME["muted"] if value is None else _threshold_color(value, thresholds)
            named = len(shown) > 1 and bool(s.legend)
            size_px = min(body * (0.55 if named else 0.7), (cell - 24) / (0.72 * max(len(text), 1)))
            cx = x + cell * i + cell / 2
            cy = top + body / 2 - (8 if named else 0)
            self.text(
                cx,
                cy,
                text,
                size=_pt(size_px),
                color=color,
                weight="bold",
                ha="center",
                va="center",
            )
            if named:
                label = self.text(
                    cx,
                    top + body - 4,
                    s.legend,
                    size=_pt(11),
                    ha="center",
                    va="bottom",
                    color=THEME["muted"],
                )
                _fit(label, cell - 8)
        if len(series) > len(shown):
            self.text(
                x + w - 8,
                y + 8,
                f"+{len(series) - len(shown)}",
                size=_pt(11),
                ha="right",
                color=THEME["muted"],
            )

    def table(
        self, box: tuple[float, float, float, float], series: Sequence[Series], unit: str | None
    ) -> None:
        x, y, w, h = box
        fits = max(1, int((h - 36) // 18))
        rows = list(series[: fits if len(series) <= fits else fits - 1])
        for i, s in enumerate(rows):
            ry = y + 32 + i * 18
            label = self.text(x + 10, ry, s.legend or "(no labels)", size=_pt(11))
            _fit(label, w * 0.7)
            self.text(
                x + w - 10,
                ry,
                format_value(s.last(), unit),
                size=_pt(11),
                ha="right",
                weight="bold",
            )
        if len(series) > len(rows):
            self.text(
                x + 10,
                y + 32 + len(rows) * 18,
                f"+{len(series) - len(rows)} more",
                size=_pt(11),
                color=THEME["muted"],
            )


def _hline(canvas: _Canvas, x0: float, x1: float, y: float, color: str, width: float) -> Any:
    """A horizontal line in the canvas's pixels (row rules, legend swatches)."""
    from matplotlib.lines import Line2D

    return Line2D(
        [canvas._fx(x0), canvas._fx(x1)],
        [canvas._fy(y), canvas._fy(y)],
        transform=canvas.figure.transFigure,
        color=color,
        linewidth=width,
    )


def _fit(label: Any, width_px: float) -> None:
    """Shorten a text artist with an ellipsis until it is at most ``width_px`` wide."""
    text = label.get_text()
    renderer = label.figure.canvas.get_renderer()
    while len(text) > 1 and label.get_window_extent(renderer).width > width_px:
        text = text[:-2] + "…"
        label.set_text(text)


def _tick_scale(unit: str | None, largest: float) -> float:
    """The power of 1024 axis ticks of a binary unit are round in (1 for other units)."""
    if unit not in ("bytes", "binBps") or largest < 1024:
        return 1.0
    return float(1024 ** min(4, int(math.log(largest, 1024))))


def _isolated(values: Sequence[float]) -> list[int]:
    """Indexes of numbers with no number on either side."""

    def number(i: int) -> bool:
        return 0 <= i < len(values) and math.isfinite(values[i])

    return [i for i in range(len(values)) if number(i) and not number(i - 1) and not number(i + 1)]


def _with_gaps(
    times: Sequence[float], values: Sequence[float], step: float
) -> tuple[list[float], list[float]]:
    """Samples with a NaN where Prometheus skipped steps, so the line breaks as in Grafana."""
    out_t: list[float] = []
    out_v: list[float] = []
    for t, v in zip(times, values, strict=True):
        if out_t and t - out_t[-1] > 1.5 * step:
            out_t.append(out_t[-1] + step)
            out_v.append(math.nan)
        out_t.append(t)
        out_v.append(v)
    return out_t, out_v


# ---------------------------------------------------------------------------- command line


def _time(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected unix seconds or ISO 8601 (2026-11-25T00:21:00Z), got {text!r}"
        ) from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


def _variable(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not re.fullmatch(r"\w+", name):
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def _duration(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m monitoring.render",
        description="Render a Grafana dashboard JSON to a PNG with data from Prometheus.",
    )
    parser.add_argument("--prometheus", required=True, help="base URL, http://host:9090")
    parser.add_argument("--dashboard", required=True, type=Path, help="dashboard JSON file")
    parser.add_argument("--out", required=True, type=Path, help="PNG to write")
    parser.add_argument(
        "--range",
        type=_duration,
        default=None,
        help="time range, e.g. 15m (default: the dashboard's)",
    )
    parser.add_argument(
        "--end",
        type=_time,
        default=None,
        help="end of the range, unix seconds or ISO 8601, UTC unless given (default: now)",
    )
    parser.add_argument(
        "--var",
        type=_variable,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="template variable value (default: the value saved in the dashboard)",
    )
    parser.add_argument(
        "--scrape-interval",
        type=_duration,
        default=DEFAULT_SCRAPE_S,
        help="Prometheus scrape interval, for $__rate_interval (default 15s)",
    )
    parser.add_argument("--width", type=int, default=1440, help="image width in pixels")
    args = parser.parse_args(argv)
    try:
        board = load_dashboard(args.dashboard)
        rendering = render_dashboard(
            board,
            PrometheusClient(args.prometheus),
            args.out,
            range_s=args.range,
            end=args.end,
            variables=dict(args.var),
            scrape_s=args.scrape_interval,
            width_px=args.width,
        )
    except RenderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    width, height = rendering.size
    print(f"{rendering.path} ({width}x{height})")
    for panel in rendering.panels:
        if panel.type == "row":
            continue
        if panel.error:
            state = "error"
        elif panel.has_data:
            state = f"{panel.series} series"
        else:
            state = "no data" if not panel.series else f"{panel.series} series, all NaN"
        line = f"  {panel.type:<10} {state:<10} {panel.title}"
        print(f"{line}: {panel.error}" if panel.error else line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
