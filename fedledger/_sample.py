"""Sample CSV files shaped like a hospital's export, for trying a site without real data:
a header row, named columns and a label column of names (the breast-cancer diagnostic data
set bundled with scikit-learn)."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from fedcore import atomic_write_text, fresh_folder

SAMPLE_KIND = "sample-csv"
LABEL = "diagnosis"


def write_sample_csv(
    out: str | os.PathLike[str], *, devices: int, holdout: float, seed: int
) -> dict[str, Any]:
    """``holdout.csv`` for the gateway and ``device-N.csv`` for each device (an IID split),
    in a folder fedledger owns (missing, empty, or an earlier sample: replaced whole)."""
    from sklearn.datasets import load_breast_cancer

    from ._datasets import iid_partition, split_dataset

    bunch = load_breast_cancer()
    names = [str(n).replace(" ", "_") for n in bunch.feature_names]
    # scikit-learn's target 0 is malignant, 1 benign.
    classes = np.array(["malignant", "benign"])
    data = split_dataset(
        "breast_cancer", bunch.data, bunch.target, test_fraction=holdout, seed=seed
    )
    parts = iid_partition(len(data.y_train), devices, seed=seed)
    with fresh_folder(out, kind=SAMPLE_KIND, created_by="fedledger data sample-csv") as folder:
        _write(folder / "holdout.csv", names, data.x_test, classes[data.y_test])
        files = []
        for i, idx in enumerate(parts, start=1):
            path = folder / f"device-{i}.csv"
            _write(path, names, data.x_train[idx], classes[data.y_train[idx]])
            files.append({"path": str(path), "rows": len(idx)})
    return {
        "folder": str(Path(folder)),
        "holdout": str(Path(folder) / "holdout.csv"),
        "holdout_rows": len(data.y_test),
        "label": LABEL,
        "devices": files,
        "changed": True,
    }


def _write(path: Path, names: list[str], x: np.ndarray, labels: np.ndarray) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*names, LABEL])
    for row, label in zip(x, labels, strict=True):
        writer.writerow([*(f"{v:.6g}" for v in row), label])
    atomic_write_text(path, buffer.getvalue())
