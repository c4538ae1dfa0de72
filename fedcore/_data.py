"""Local data sources. Data never leaves the device: only counts and digests do."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ._errors import ConfigError


def load_local_data(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Read ``.npz`` (arrays ``x``, ``y``) or ``.csv`` (label in the last column)."""
    path = Path(path)
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                if "x" not in data or "y" not in data:
                    raise ConfigError("expected arrays 'x' and 'y'", file=str(path))
                x, y = data["x"], data["y"]
        elif path.suffix == ".csv":
            table = np.loadtxt(path, delimiter=",", ndmin=2, skiprows=_header_rows(path))
            x, y = table[:, :-1], table[:, -1]
        else:
            raise ConfigError("data must be a .npz or .csv file", file=str(path))
    except FileNotFoundError:
        raise ConfigError("file not found", file=str(path)) from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read data: {exc}", file=str(path)) from None
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or len(x) != len(y) or len(y) == 0:
        raise ConfigError("x must be 2-D with one label per row, and not empty", file=str(path))
    if not np.all(np.isfinite(x)):
        raise ConfigError("features hold NaN or Inf", file=str(path))
    if not np.all(np.equal(np.mod(y, 1), 0)):
        raise ConfigError("labels must be integers", file=str(path))
    return x, np.asarray(y, dtype=np.int64)


def _header_rows(path: Path) -> int:
    with path.open(encoding="utf-8") as handle:
        first = handle.readline()
    try:
        [float(v) for v in first.strip().split(",")]
    except ValueError:
        return 1
    return 0
