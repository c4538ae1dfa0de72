"""Aggregation rules: pure functions over ``(weights, n_samples)`` pairs, plus a streaming
accumulator that folds updates in as they arrive so memory stays O(model)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedcore import Params, TensorView


def fedavg(pairs: Sequence[tuple[Mapping[str, np.ndarray], int]]) -> Params:
    """Sample-weighted mean of parameter dicts (McMahan et al., 2017)."""
    if not pairs:
        raise ValueError("fedavg needs at least one update")
    total = float(sum(n for _, n in pairs))
    if total <= 0:
        raise ValueError("fedavg needs a positive total sample count")
    names = list(pairs[0][0])
    out: Params = {}
    for name in names:
        acc = np.zeros_like(pairs[0][0][name], dtype=np.float64)
        for weights, n in pairs:
            acc += np.asarray(weights[name], dtype=np.float64) * (n / total)
        out[name] = acc.astype(np.float32)
    return out


def _axpy(x: np.ndarray, y: np.ndarray, a: float) -> None:
    """``y += a * x`` in place for flat float64 arrays, in one pass where BLAS is there."""
    if _daxpy is not None:
        out = _daxpy(x, y, a=a)
        if out is y or np.shares_memory(out, y):
            return
        y[...] = out
        return
    y += a * x


try:  # SciPy ships with the gateway (scikit-learn needs it); a device never aggregates.
    from scipy.linalg.blas import daxpy as _daxpy
except ImportError:  # pragma: no cover - exercised only without SciPy
    _daxpy = None


class FedAvgAccumulator:
    """Streaming weighted mean: each update is dequantized straight into one buffer.

    ``add`` takes the payload's tensor views (int8 or float32) and folds them in with one
    multiply-add per tensor (BLAS ``daxpy``: one pass over the update); nothing per update
    is kept.

    The sums are float64 and rounded to float32 once, in :meth:`result`, so the order the
    updates arrived in (thread scheduling, the network) does not change the global model:
    two orders differ in float64 by a few units in the last place, far below float32's
    resolution, and round to the same float32 unless a sum falls within that distance of a
    float32 rounding boundary, which is rare. Summed in float32, the order changed every
    model.
    """

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]):
        self._shapes = dict(shapes)
        self._sums = {
            name: np.zeros(int(np.prod(s)), dtype=np.float64) for name, s in shapes.items()
        }
        self._scratch = {
            name: np.empty(int(np.prod(s)), dtype=np.float64) for name, s in shapes.items()
        }
        self.total_samples = 0
        self.count = 0

    def add(self, views: Sequence[TensorView], n_samples: int) -> None:
        for view in views:
            data = view.data.reshape(-1)
            coef = float(view.scale) * n_samples
            if data.dtype != np.float64:
                # Widen into the scratch buffer first (int8 and float32 payloads).
                scratch = self._scratch[view.name]
                np.copyto(scratch, data, casting="unsafe")
                data = scratch
            _axpy(data, self._sums[view.name], coef)
        self.total_samples += n_samples
        self.count += 1

    def add_params(self, params: Mapping[str, np.ndarray], n_samples: int) -> None:
        self.add(
            [
                TensorView(k, v.shape, np.asarray(v, np.float32).ravel(), 1.0)
                for k, v in params.items()
            ],
            n_samples,
        )

    def result(self) -> Params:
        if self.total_samples <= 0:
            raise ValueError("no updates were accumulated")
        scale = 1.0 / self.total_samples
        return {
            name: (total * scale).astype(np.float32).reshape(self._shapes[name])
            for name, total in self._sums.items()
        }
