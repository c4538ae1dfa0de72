"""Simulation data: real clinical data sets that ship inside dependencies, split the way
federated fleets see them (non-IID across devices)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DATASETS = ("breast_cancer",)


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int


def load_dataset(
    name: str = "breast_cancer", *, test_fraction: float = 0.2, seed: int = 0
) -> Dataset:
    """Load a bundled data set and make a stratified train/held-out split."""
    if name != "breast_cancer":
        raise ValueError(f"unknown data set {name!r}; available: {', '.join(DATASETS)}")
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    x, y = load_breast_cancer(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x.astype(np.float32),
        y.astype(np.int64),
        test_size=test_fraction,
        stratify=y,
        random_state=seed,
    )
    return Dataset(name, x_train, y_train, x_test, y_test, int(y.max()) + 1)


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
