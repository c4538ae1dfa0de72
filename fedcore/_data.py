"""Local data sources. Data never leaves the device: only counts and digests do.

Tables (``.npz``, ``.csv``) are read whole. Sensor signals are streamed: a
:class:`SignalWindower` cuts sliding windows from chunks as they come, keeping only what a
later window still needs, so a recording longer than a device's memory can still be windowed.
"""

from __future__ import annotations

import csv
import itertools
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from ._errors import ConfigError


def load_local_data(
    path: str | os.PathLike[str],
    *,
    n_classes: int | None = None,
    columns: Columns | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Read ``.npz`` (arrays ``x``, ``y``) or ``.csv``: with ``columns`` (a task's
    ``[columns]``) a CSV with a header row read by column name (:func:`read_csv_table`),
    without it one with the label in the last column.

    ``n_classes`` (the task's): a label outside ``0..n_classes - 1`` is refused here, with
    the row it is on, rather than failing somewhere inside training."""
    path = Path(path)
    if path.suffix == ".csv" and columns is not None:
        table = read_csv_table(
            path, label=columns.label, features=columns.features, classes=columns.classes
        )
        return table.x, table.y
    header = 0
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                if "x" not in data or "y" not in data:
                    raise ConfigError("expected arrays 'x' and 'y'", file=str(path))
                x, y = data["x"], data["y"]
        elif path.suffix == ".csv":
            header = _header_rows(path)
            table = np.loadtxt(path, delimiter=",", ndmin=2, skiprows=header)
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
    y = np.asarray(y, dtype=np.int64)
    if n_classes is not None:
        # A CSV row is named by its line (the header is line 1), an array row by its index.
        check_labels(y, n_classes, file=str(path), row=_row_namer(path.suffix, header))
    return x, y


def _row_namer(suffix: str, header: int):
    if suffix == ".csv":
        return lambda i: f"row {i + 1 + header}"
    return lambda i: f"y[{i}]"


def check_labels(
    y: np.ndarray,
    n_classes: int,
    *,
    file: str | None = None,
    row=lambda i: f"row {i}",
) -> None:
    """Refuse labels outside ``0..n_classes - 1``, naming the first one and its row."""
    bad = np.flatnonzero((y < 0) | (y >= n_classes))
    if len(bad):
        i = int(bad[0])
        raise ConfigError(
            f"{row(i)}: label {int(y[i])} is outside the task's {n_classes} classes"
            f" (0..{n_classes - 1}); {len(bad)} row(s) like it",
            file=file,
        )


class Columns(Protocol):
    label: str
    features: Sequence[str]
    classes: Sequence[str]


@dataclass(frozen=True)
class CsvTable:
    """A CSV table read by :func:`read_csv_table`: ``x`` (float32), ``y`` (class indices),
    the feature columns in ``x``'s order and the label values, ``classes[i]`` being class i."""

    x: np.ndarray
    y: np.ndarray
    features: tuple[str, ...]
    classes: tuple[str, ...]


#: Cell values that mean "no value": refused rather than guessed.
_MISSING = {"", "na", "n/a", "nan", "null", "none", "?", "-"}


def read_csv_table(
    path: str | os.PathLike[str],
    *,
    label: str,
    features: Sequence[str] | None = None,
    classes: Sequence[str] | None = None,
) -> CsvTable:
    """Read a CSV whose first row names the columns.

    ``features`` (default: every column but ``label``, in file order) are read by name, so
    the columns may come in any order and extra ones are ignored. Labels are names:
    ``classes`` given, each label must be one of them (class ``i`` is ``classes[i]``);
    unset, the classes are found here: whole numbers ``0..max`` when every label is one,
    else the distinct label strings in sorted order. A missing or non-numeric feature, a
    missing or unknown label, a row of the wrong width: each is refused as one
    :class:`ConfigError` naming the file, the row (the file's line: the header is row 1)
    and the column.
    """
    path = Path(path)
    file = str(path)
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            rows = list(csv.reader(handle))
    except FileNotFoundError:
        raise ConfigError("file not found", file=file) from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"cannot read CSV: {exc}", file=file) from None
    if not rows:
        raise ConfigError("empty file: expected a header row naming the columns", file=file)
    header = [name.strip() for name in rows[0]]
    if len(set(header)) != len(header):
        twice = sorted({n for n in header if header.count(n) > 1})
        raise ConfigError(f"row 1: column {twice[0]!r} is named twice", file=file)
    if label not in header:
        raise ConfigError(
            f"row 1: no label column {label!r} (columns: {', '.join(header)})", file=file
        )
    if features is None:
        features = [name for name in header if name != label]
    missing = [name for name in features if name not in header]
    if missing:
        raise ConfigError(
            f"row 1: no column {missing[0]!r}, which the task reads as a feature"
            f" ({len(missing)} missing)",
            file=file,
        )
    if not features:
        raise ConfigError("row 1: no feature columns besides the label", file=file)
    index = [header.index(name) for name in features]
    label_index = header.index(label)
    x = np.empty((max(len(rows) - 1, 0), len(features)), dtype=np.float32)
    labels: list[str] = []
    lines: list[int] = []
    n = 0
    for line, row in enumerate(rows[1:], start=2):
        if not row or (len(row) == 1 and not row[0].strip()):
            continue  # a blank line
        if len(row) != len(header):
            raise ConfigError(f"row {line}: {len(row)} values for {len(header)} columns", file=file)
        for j, (name, col) in enumerate(zip(features, index, strict=True)):
            x[n, j] = _number(row[col], file=file, line=line, column=name)
        value = row[label_index].strip()
        if value.lower() in _MISSING:
            raise ConfigError(f"row {line}, column {label!r}: missing label", file=file)
        labels.append(value)
        lines.append(line)
        n += 1
    if n == 0:
        raise ConfigError("no data rows after the header", file=file)
    x = x[:n]
    if classes is None:
        classes = _find_classes(labels)
        if len(classes) < 2:
            raise ConfigError(
                f"column {label!r}: only one class ({classes[0]!r}); a task needs two or more",
                file=file,
            )
    classes = tuple(classes)
    lookup = {name: i for i, name in enumerate(classes)}
    y = np.empty(n, dtype=np.int64)
    for k, value in enumerate(labels):
        i = lookup.get(value, lookup.get(_whole(value)))
        if i is None:
            shown = ", ".join(classes[:10]) + (", ..." if len(classes) > 10 else "")
            raise ConfigError(
                f"row {lines[k]}, column {label!r}: label {value!r} is not one of the"
                f" task's {len(classes)} classes ({shown})",
                file=file,
            )
        y[k] = i
    return CsvTable(x, y, tuple(features), classes)


def _number(text: str, *, file: str, line: int, column: str) -> float:
    value = text.strip()
    if value.lower() in _MISSING:
        raise ConfigError(f"row {line}, column {column!r}: missing value", file=file)
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(
            f"row {line}, column {column!r}: {value[:40]!r} is not a number", file=file
        ) from None
    if not math.isfinite(number):
        raise ConfigError(f"row {line}, column {column!r}: {value!r} is not finite", file=file)
    return number


def _whole(value: str) -> str:
    """``value`` as a whole number's digits (``"1.0"`` -> ``"1"``), or ``value`` itself."""
    try:
        number = float(value)
    except ValueError:
        return value
    return str(int(number)) if math.isfinite(number) and number.is_integer() else value


def _find_classes(labels: list[str]) -> tuple[str, ...]:
    whole = {_whole(v) for v in labels}
    if all(v.isdigit() for v in whole):
        return tuple(str(i) for i in range(max(int(v) for v in whole) + 1))
    return tuple(sorted(set(labels)))


def _header_rows(path: Path) -> int:
    with path.open(encoding="utf-8") as handle:
        first = handle.readline()
    try:
        [float(v) for v in first.strip().split(",")]
    except ValueError:
        return 1
    return 0


# ---------------------------------------------------------------- signal streams

#: How a window is labelled from its per-time-step labels: ``last``, the label at the window's
#: final step (what a device classifying a live stream reports for "now"; the default), or
#: ``majority``, its most frequent label (ties go to the smallest label).
LABEL_RULES = ("last", "majority")
#: Rows a signal file is read in at a time: memory stays bounded by this, not the file.
SIGNAL_CHUNK_ROWS = 4096


def window_signal(
    signal: np.ndarray,
    labels: np.ndarray,
    *,
    window: int,
    stride: int,
    label: str = "last",
) -> tuple[np.ndarray, np.ndarray]:
    """Sliding windows of a whole ``(T, channels)`` signal with per-step ``labels``.

    Window ``i`` covers steps ``[i * stride, i * stride + window)``; a tail shorter than a
    window is dropped. Returns ``x`` of shape ``(n, window * channels)`` (each window
    flattened row-major, as cnn1d models read it) and ``y`` (n,). The reference that
    :class:`SignalWindower` matches chunk by chunk.
    """
    channels = _channel_count(signal)
    windower = SignalWindower(window=window, stride=stride, channels=channels, label=label)
    return windower.feed(signal, labels)


class SignalWindower:
    """Cut a signal fed in chunks of any size into the windows :func:`window_signal` cuts
    from the whole signal, in bounded memory.

    Between chunks it keeps only the last ``window - 1`` steps (a fixed carry buffer, the
    part of the stream a later window can still need), so an endless stream is windowed in
    ``O(window + chunk)`` memory. Windows are cut from a strided view of carry + chunk: no
    Python loop over time steps.
    """

    def __init__(self, *, window: int, stride: int, channels: int, label: str = "last") -> None:
        if window < 1 or stride < 1 or channels < 1:
            raise ValueError("window, stride and channels must be >= 1")
        self.window, self.stride, self.channels = window, stride, channels
        self.label = _check_rule(label)
        self._carry = np.zeros((window - 1, channels), dtype=np.float32)
        self._carry_labels = np.zeros(window - 1, dtype=np.int64)
        self._kept = 0  # steps held in the carry buffer
        self.steps = 0  # steps fed so far

    def feed(self, signal: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Windows completed by this chunk: ``x`` (n, window * channels), ``y`` (n,)."""
        signal = np.asarray(signal, dtype=np.float32)
        if signal.ndim == 1 and self.channels == 1:
            signal = signal[:, None]
        labels = np.asarray(labels).reshape(-1)
        if signal.ndim != 2 or signal.shape[1] != self.channels:
            raise ValueError(f"expected a signal of shape (T, {self.channels}), got {signal.shape}")
        if len(labels) != len(signal):
            raise ValueError(f"{len(signal)} signal steps but {len(labels)} labels")
        if not np.all(np.isfinite(signal)):
            raise ValueError("the signal holds NaN or Inf")
        if labels.size and not (np.all(np.mod(labels, 1) == 0) and labels.min() >= 0):
            raise ValueError("labels must be non-negative integers")
        labels = labels.astype(np.int64)
        k = self._kept
        steps = np.concatenate([self._carry[:k], signal])
        step_labels = np.concatenate([self._carry_labels[:k], labels])
        first = self.steps - k  # stream index of steps[0]
        self.steps += len(signal)
        # Window starts s = j * stride with first <= s and s + window <= self.steps.
        lowest = -(-first // self.stride) * self.stride
        starts = np.arange(lowest, self.steps - self.window + 1, self.stride) - first
        keep = min(self.window - 1, len(steps))
        if keep:
            self._carry[:keep] = steps[len(steps) - keep :]
            self._carry_labels[:keep] = step_labels[len(steps) - keep :]
        self._kept = keep
        width = self.window * self.channels
        if len(starts) == 0:
            return np.zeros((0, width), np.float32), np.zeros(0, np.int64)
        views = np.lib.stride_tricks.sliding_window_view(steps, self.window, axis=0)
        # views: (positions, channels, window) -> windows (n, window, channels)
        x = views[starts].transpose(0, 2, 1).reshape(len(starts), width)
        label_views = np.lib.stride_tricks.sliding_window_view(step_labels, self.window)
        return np.ascontiguousarray(x), _window_labels(label_views[starts], self.label)


def _window_labels(windows: np.ndarray, rule: str) -> np.ndarray:
    if rule == "last":
        return windows[:, -1].copy()
    classes, codes = np.unique(windows, return_inverse=True)
    codes = codes.reshape(windows.shape)
    counts = (codes[:, :, None] == np.arange(len(classes))).sum(axis=1)
    return classes[np.argmax(counts, axis=1)]  # argmax: the first (smallest) of tied labels


def _check_rule(label: str) -> str:
    if label not in LABEL_RULES:
        raise ValueError(f"label rule {label!r} is not one of {LABEL_RULES}")
    return label


def _channel_count(signal: np.ndarray) -> int:
    shape = np.shape(signal)
    return 1 if len(shape) == 1 else int(shape[1])


def read_signal_chunks(
    path: str | os.PathLike[str],
    *,
    labels: str | os.PathLike[str] | None = None,
    chunk_rows: int = SIGNAL_CHUNK_ROWS,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Read a signal file as ``(signal, labels)`` chunks of at most ``chunk_rows`` steps.

    ``.csv``: one row per step, the channels then the label (an optional header row);
    ``.npy``: a ``(T, channels)`` array, with per-step labels in the ``labels`` ``.npy`` file.
    Neither is read whole: CSV rows are parsed a chunk at a time and ``.npy`` files are
    memory-mapped.
    """
    path = Path(path)
    if path.suffix == ".csv":
        if labels is not None:
            raise ConfigError("a .csv signal carries its labels in its last column", file=str(path))
        return _csv_chunks(path, chunk_rows)
    if path.suffix == ".npy":
        if labels is None:
            raise ConfigError("a .npy signal needs a labels .npy file", file=str(path))
        return _npy_chunks(path, Path(labels), chunk_rows)
    raise ConfigError("a signal must be a .csv or .npy file", file=str(path))


def _csv_chunks(path: Path, chunk_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    try:
        skip = _header_rows(path)
        with path.open(encoding="utf-8") as handle:
            for _ in range(skip):
                handle.readline()
            while True:
                lines = list(itertools.islice(handle, chunk_rows))
                if not lines:
                    return
                table = np.loadtxt(lines, delimiter=",", ndmin=2, dtype=np.float64)
                if table.shape[1] < 2:
                    raise ConfigError("need channel columns and a label column", file=str(path))
                yield table[:, :-1].astype(np.float32), table[:, -1]
    except FileNotFoundError:
        raise ConfigError("file not found", file=str(path)) from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read signal: {exc}", file=str(path)) from None


def _npy_chunks(
    path: Path, labels_path: Path, chunk_rows: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    arrays = []
    for file in (path, labels_path):
        try:
            arrays.append(np.load(file, mmap_mode="r", allow_pickle=False))
        except FileNotFoundError:
            raise ConfigError("file not found", file=str(file)) from None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read: {exc}", file=str(file)) from None
    signal, labels = arrays
    if signal.ndim not in (1, 2) or labels.ndim != 1 or len(labels) != len(signal):
        raise ConfigError(
            f"expected a (T, channels) signal and T labels, got {signal.shape} and {labels.shape}",
            file=str(path),
        )
    for start in range(0, len(signal), chunk_rows):
        yield (
            np.array(signal[start : start + chunk_rows]),
            np.array(labels[start : start + chunk_rows]),
        )


def load_signal_windows(
    path: str | os.PathLike[str],
    *,
    window: int,
    stride: int,
    channels: int,
    labels: str | os.PathLike[str] | None = None,
    label: str = "last",
    max_windows: int | None = None,
    chunk_rows: int = SIGNAL_CHUNK_ROWS,
) -> tuple[np.ndarray, np.ndarray]:
    """Training data from a signal file: its sliding windows (see :func:`window_signal`).

    The file is streamed (:func:`read_signal_chunks`). ``max_windows`` keeps only the most
    recent windows in a ring of that many, so a device's memory is bounded by its budget,
    not by how long it has been recording.
    """
    windower = SignalWindower(window=window, stride=stride, channels=channels, label=label)
    try:
        x, y = collect_windows(
            windower, read_signal_chunks(path, labels=labels, chunk_rows=chunk_rows),
            max_windows=max_windows,
        )  # fmt: skip
    except ValueError as exc:
        raise ConfigError(f"cannot window signal: {exc}", file=str(path)) from None
    if len(y) == 0:
        raise ConfigError(f"the signal is shorter than one window ({window} steps)", file=str(path))
    return x, y


def collect_windows(
    windower: SignalWindower,
    chunks: Iterable[tuple[np.ndarray, np.ndarray]],
    *,
    max_windows: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Feed ``chunks`` through ``windower``; all windows in order, or the last
    ``max_windows`` of them (held in a ring buffer of that size while streaming)."""
    width = windower.window * windower.channels
    if max_windows is None:
        parts = [windower.feed(s, lab) for s, lab in chunks]
        if not parts:
            return np.zeros((0, width), np.float32), np.zeros(0, np.int64)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    if max_windows < 1:
        raise ValueError("max_windows must be >= 1")
    ring_x = np.zeros((max_windows, width), np.float32)
    ring_y = np.zeros(max_windows, np.int64)
    total = 0  # windows seen; the next goes to slot total % max_windows
    for s, lab in chunks:
        x, y = windower.feed(s, lab)
        cut = len(y)
        x, y = x[-max_windows:], y[-max_windows:]
        slots = (total + cut - len(y) + np.arange(len(y))) % max_windows
        ring_x[slots], ring_y[slots] = x, y
        total += cut
    if total <= max_windows:
        return ring_x[:total], ring_y[:total]
    oldest_first = (total + np.arange(max_windows)) % max_windows
    return ring_x[oldest_first], ring_y[oldest_first]
