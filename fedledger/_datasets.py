"""Simulation data: real clinical data sets that ship inside dependencies, split the way
federated fleets see them (non-IID across devices)."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedcore import atomic_write_bytes, atomic_write_text, claim_folder

DATASETS = ("breast_cancer", "digits")


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int


#: The class a bundled two-class data set's model is to find (sensitivity is its recall):
#: scikit-learn's breast cancer data labels malignant 0 and benign 1.
POSITIVE_CLASS = {"breast_cancer": 0}


def load_dataset(
    name: str = "breast_cancer", *, test_fraction: float = 0.2, seed: int = 0
) -> Dataset:
    """Load a bundled data set and make a stratified train/held-out split."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; available: {', '.join(DATASETS)}")
    from sklearn import datasets

    x, y = getattr(datasets, f"load_{name}")(return_X_y=True)
    return split_dataset(name, x, y, test_fraction=test_fraction, seed=seed)


def split_dataset(
    name: str, x: np.ndarray, y: np.ndarray, *, test_fraction: float = 0.2, seed: int = 0
) -> Dataset:
    """A stratified train/held-out split of any (features, integer labels) table."""
    from sklearn.model_selection import train_test_split

    x_train, x_test, y_train, y_test = train_test_split(
        x.astype(np.float32),
        y.astype(np.int64),
        test_size=test_fraction,
        stratify=y,
        random_state=seed,
    )
    return Dataset(name, x_train, y_train, x_test, y_test, int(np.max(y)) + 1)


def iid_partition(n_samples: int, n_devices: int, *, seed: int) -> list[np.ndarray]:
    """Shuffle and deal the samples out evenly: every device sees the same label mix."""
    if not 1 <= n_devices <= n_samples:
        raise ValueError(f"{n_samples} samples cannot be split across {n_devices} devices")
    order = np.random.default_rng(seed).permutation(n_samples)
    return [np.sort(part) for part in np.array_split(order, n_devices)]


def dirichlet_partition(
    y: np.ndarray, n_devices: int, *, alpha: float, seed: int, min_samples: int = 8
) -> list[np.ndarray]:
    """Split sample indices across devices with label proportions ~ Dirichlet(alpha).

    Small ``alpha`` gives skewed, realistic per-site label mixes. Draws again (same seed
    stream) until every device holds at least ``min_samples``.
    """
    if n_devices < 1 or alpha <= 0:
        raise ValueError("n_devices >= 1 and alpha > 0 are required")
    if n_devices * min_samples > len(y):
        raise ValueError(f"{len(y)} samples cannot give {n_devices} devices {min_samples} each")
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(n_devices)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(y == c))
            shares = rng.dirichlet(np.full(n_devices, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for device, chunk in enumerate(np.split(idx, cuts)):
                parts[device].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_samples:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ValueError(f"no Dirichlet({alpha}) split gave every device {min_samples} samples")


def write_split(
    out: Path,
    dataset: Dataset,
    parts: list[np.ndarray],
    *,
    description: dict[str, object],
) -> dict[str, object]:
    """Write ``device-NN/data.npz`` per device, ``holdout.npz`` for the gateway, and a
    ``manifest.json`` (sample and label counts and the SHA-256 of every file).

    ``out`` must be missing, empty, or a split this function wrote (it carries the
    ``.fedledger-site`` marker; an older split there is replaced); anything else is refused."""
    out = claim_folder(out, kind="data-split", created_by="fedledger data split", fresh=True)
    devices = []
    for number, idx in enumerate(parts, start=1):
        home = out / f"device-{number:02d}"
        home.mkdir(exist_ok=True)
        path = home / "data.npz"
        y = dataset.y_train[idx]
        write_npz(path, x=dataset.x_train[idx], y=y)
        devices.append(
            {
                "device": home.name,
                "path": str(path.relative_to(out)),
                "samples": len(idx),
                "labels": np.bincount(y, minlength=dataset.n_classes).tolist(),
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            }
        )
    holdout = out / "holdout.npz"
    write_npz(holdout, x=dataset.x_test, y=dataset.y_test)
    manifest = {
        **description,
        "dataset": dataset.name,
        "classes": dataset.n_classes,
        "features": int(dataset.x_train.shape[1]),
        "holdout": {
            "path": holdout.name,
            "samples": len(dataset.y_test),
            "sha256": hashlib.sha256(holdout.read_bytes()).hexdigest(),
        },
        "devices": devices,
    }
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


def write_npz(path: Path, **arrays: np.ndarray) -> None:
    """``np.savez`` through a temp file and a rename: a reader never sees half an archive."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


# ---------------------------------------------------------------- synthetic sensor signals

#: The activity classes of :func:`synthetic_activity`, by label.
ACTIVITY_CLASSES = ("rest", "walk", "run", "tremor")
# (frequency in Hz, amplitude) of each class's oscillation; rest is noise around gravity.
_ACTIVITY_WAVES = ((0.0, 0.0), (1.8, 1.0), (3.0, 1.6), (8.0, 0.45))


def synthetic_activity(
    n_steps: int = 20_000,
    *,
    channels: int = 3,
    rate_hz: float = 50.0,
    segment_steps: tuple[int, int] = (150, 400),
    noise: float = 0.25,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic labelled accelerometer-like recording: ``(signal (T, channels)
    float32, per-step labels (T,))``.

    No sensor data set ships with the dependencies, so tests and demos of the cnn1d model
    and the windowed stream source use this generator. The recording is a run of segments of
    random length, each one activity of :data:`ACTIVITY_CLASSES`: a sinusoid of the class's
    frequency (with harmonics, a random phase per channel and a random 0.6-1.4x amplitude,
    so that walk and run overlap in amplitude and a model must use the rhythm) plus
    Gaussian noise, over a slowly drifting gravity offset on channel 0. Same seed, same
    signal.
    """
    if n_steps < 1 or channels < 1:
        raise ValueError("n_steps and channels must be >= 1")
    rng = np.random.default_rng(seed)
    signal = np.empty((n_steps, channels), dtype=np.float32)
    labels = np.empty(n_steps, dtype=np.int64)
    start = 0
    while start < n_steps:
        length = min(int(rng.integers(segment_steps[0], segment_steps[1] + 1)), n_steps - start)
        label = int(rng.integers(len(ACTIVITY_CLASSES)))
        freq, amplitude = _ACTIVITY_WAVES[label]
        t = (start + np.arange(length))[:, None] / rate_hz
        phase = rng.uniform(0.0, 2.0 * np.pi, size=channels)
        gain = amplitude * rng.uniform(0.6, 1.4) * rng.uniform(0.5, 1.0, size=channels)
        wave = np.sin(2 * np.pi * freq * t + phase) + 0.3 * np.sin(4 * np.pi * freq * t + phase)
        segment = gain * wave + rng.normal(0.0, noise, size=(length, channels))
        segment[:, 0] += 1.0 + 0.1 * np.sin(2 * np.pi * 0.05 * t[:, 0])  # gravity, drifting
        signal[start : start + length] = segment
        labels[start : start + length] = label
        start += length
    return signal, labels


def load_activity(
    *, window: int = 64, stride: int = 32, channels: int = 3, n_steps: int = 20_000, seed: int = 0
) -> Dataset:
    """Windows of :func:`synthetic_activity` recordings as a :class:`Dataset` (rows are
    windows flattened for cnn1d, labelled by their last step).

    The held-out windows come from a second recording (seed + 1, a quarter as long): windows
    of one recording overlap, so a random split would test on what was trained on.
    """
    from fedcore import window_signal

    def windows(steps: int, stream_seed: int) -> tuple[np.ndarray, np.ndarray]:
        signal, labels = synthetic_activity(steps, channels=channels, seed=stream_seed)
        return window_signal(signal, labels, window=window, stride=stride)

    x_train, y_train = windows(n_steps, seed)
    x_test, y_test = windows(max(n_steps // 4, window), seed + 1)
    return Dataset("activity", x_train, y_train, x_test, y_test, len(ACTIVITY_CLASSES))
