"""A best-of-N wall-clock timer (``time.perf_counter``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def best_of(fn: Callable[[], T], repeats: int) -> tuple[float, T]:
    """Run ``fn`` ``repeats`` times; return the shortest wall time and the last result.

    The minimum is the figure least disturbed by the rest of the machine; a run's result
    is kept so that callers can check what the timed code computed.
    """
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    best = float("inf")
    result: T
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def sig(value: float, digits: int = 4) -> float:
    """``value`` rounded to ``digits`` significant digits (never to zero unless it is zero)."""
    return float(f"{value:.{digits}g}")
