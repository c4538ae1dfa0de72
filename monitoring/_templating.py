"""Grafana's template variables in panel queries, replaced the way Grafana would before it
sends a query to Prometheus.

Shared by :mod:`monitoring.render` (which runs the queries itself, without Grafana) and the
dashboard tests (which run every panel query against a real Prometheus), so both see the
same PromQL. Only what the fedledger dashboards use is covered: ``$name``, ``${name}``,
``${name:format}`` (the format is ignored), ``[[name]]``, and the built-in intervals
``$__interval``, ``$__interval_ms``, ``$__rate_interval``, ``$__range``, ``$__range_s``,
``$__range_ms``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w|y)")
_UNIT_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}

#: Grafana's assumption when a Prometheus data source sets no scrape interval.
DEFAULT_SCRAPE_S = 15.0
#: Points per series Grafana asks for on a panel about 1000 pixels wide.
DEFAULT_MAX_POINTS = 300


class TemplateError(ValueError):
    """A query names a template variable nobody gave a value for."""

    def __init__(self, expr: str, name: str):
        super().__init__(f"no value for template variable ${name} in {expr!r}")
        self.expr = expr
        self.name = name


def parse_duration(text: str) -> float:
    """Seconds in a Prometheus duration (``90s``, ``15m``, ``1h30m``); ``ValueError`` if not one."""
    text = text.strip()
    matches = list(_DURATION.finditer(text))
    if not text or "".join(m.group(0) for m in matches) != text:
        raise ValueError(f"not a duration: {text!r} (examples: 30s, 15m, 1h, 1h30m)")
    return sum(float(m.group(1)) * _UNIT_S[m.group(2)] for m in matches)


def format_duration(seconds: float) -> str:
    """The shortest Prometheus duration for ``seconds`` (whole milliseconds): 60 -> ``1m``."""
    ms = max(1, round(seconds * 1000))
    parts = []
    for unit in ("w", "d", "h", "m", "s", "ms"):
        size = round(_UNIT_S[unit] * 1000)
        if ms >= size:
            parts.append(f"{ms // size}{unit}")
            ms %= size
    return "".join(parts)


def intervals(
    range_s: float,
    *,
    scrape_s: float = DEFAULT_SCRAPE_S,
    max_points: int = DEFAULT_MAX_POINTS,
) -> dict[str, str]:
    """The built-in variables for a query over the last ``range_s`` seconds.

    As Grafana: ``$__interval`` is the range over the points a panel can show, never below
    the scrape interval; ``$__rate_interval`` is ``max($__interval + scrape, 4 * scrape)``,
    so a ``rate()`` window always holds enough samples.
    """
    step = max(scrape_s, math.ceil(range_s / max_points))
    rate = max(step + scrape_s, 4 * scrape_s)
    return {
        "__interval": format_duration(step),
        "__interval_ms": str(round(step * 1000)),
        "__rate_interval": format_duration(rate),
        "__range": format_duration(range_s),
        "__range_s": str(round(range_s)),
        "__range_ms": str(round(range_s * 1000)),
    }


def dashboard_variables(board: Mapping) -> dict[str, str]:
    """Each template variable's current value as saved in the dashboard JSON.

    "All" becomes the variable's ``allValue`` (``.*`` when it has none), a multi-value
    selection the regex alternation Grafana would send; data source variables are skipped
    (the renderer talks to one Prometheus).
    """
    found: dict[str, str] = {}
    for variable in board.get("templating", {}).get("list", []):
        name, kind = variable.get("name"), variable.get("type")
        if not name or kind == "datasource":
            continue
        value = (variable.get("current") or {}).get("value")
        if value is None and kind in ("constant", "textbox"):
            value = variable.get("query")
        if isinstance(value, list):
            value = value[0] if len(value) == 1 else "(" + "|".join(map(str, value)) + ")"
        if value == "$__all":
            value = variable.get("allValue") or ".*"
        if value is not None:
            found[name] = str(value)
    return found


def substitute(expr: str, values: Mapping[str, str]) -> str:
    """``expr`` with every template variable replaced from ``values`` (names without ``$``).

    Raises :class:`TemplateError` for a variable missing from ``values``, so no ``$`` ever
    reaches Prometheus.
    """

    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2) or match.group(3)
        if name not in values:
            raise TemplateError(expr, name)
        return values[name]

    return _VARIABLE.sub(one, expr)
