"""FedAvg of N updates of M float32 parameters, beside NumPy reading the same N x M once.

Three figures, each the best of ``repeats`` runs (``time.perf_counter``), all on one thread:

``floor_s``
    The read-once memory-bandwidth floor: the faster of two single-pass NumPy reductions
    over the whole ``(N, M)`` float32 matrix, ``matrix.sum(axis=0)`` (an unweighted column
    sum: the same access pattern as a mean, one read of every element, an ``M``-float
    accumulator) and ``np.maximum.reduce`` over the flat matrix (a pure SIMD read of every
    element with nothing written back). Both read each byte exactly once and write
    (almost) nothing, so no aggregation of the same data can be faster on one core. A
    multi-threaded BLAS ``ones @ matrix`` can be faster on a multi-core machine; it is left
    out because the aggregators measured here run on one thread.
``fedavg_f32_s``
    ``gateway.FedAvgAccumulator.add_params`` over the N float32 updates, then ``result()``.
``fedavg_int8_s``
    What the gateway does for arriving int8 updates: each update's payload (encoded once,
    untimed, with ``fedcore.encode_tensors(..., "int8")``) is walked with
    ``fedcore.iter_tensors`` and its views folded in with ``FedAvgAccumulator.add``; then
    ``result()``.

The results are checked against a float64 sample-weighted mean computed with
``np.average`` (independent of fedcore and gateway), column block by column block so that
no float64 copy of the whole matrix is ever held.
"""

from __future__ import annotations

import numpy as np

from fedcore import encode_tensors, iter_tensors
from gateway import FedAvgAccumulator

from ._timing import best_of, sig

_NAME = "w"
_SEED = 20240601
_UPDATE_SCALE = 0.01  # updates are model deltas: small, centred on zero


def _reference(matrix: np.ndarray, samples: np.ndarray) -> np.ndarray:
    """Sample-weighted mean of the rows in float64, in column blocks of <= 128 MB."""
    n, m = matrix.shape
    out = np.empty(m, dtype=np.float64)
    block = max(1, (1 << 24) // max(n, 1))
    weights = samples.astype(np.float64)
    for start in range(0, m, block):
        cols = matrix[:, start : start + block].astype(np.float64)
        out[start : start + block] = np.average(cols, axis=0, weights=weights)
    return out


def _max_abs_error(result: np.ndarray, reference: np.ndarray) -> float:
    return float(np.max(np.abs(result.astype(np.float64) - reference)))


def run(*, devices: int = 100, params: int = 1_000_000, repeats: int = 3) -> dict:
    """Time FedAvg of ``devices`` updates of ``params`` float32 values against the floor."""
    if devices < 1 or params < 1 or repeats < 1:
        raise ValueError("devices, params and repeats must be at least 1")
    rng = np.random.default_rng(_SEED)
    matrix = rng.standard_normal((devices, params), dtype=np.float32)
    matrix *= np.float32(_UPDATE_SCALE)
    samples = rng.integers(1, 1001, size=devices)
    counts = [int(n) for n in samples]
    shapes = {_NAME: (params,)}
    flat = matrix.reshape(-1)

    # (1) the floor: the faster of two honest single passes over the whole matrix.
    floors = {
        "sum(axis=0)": best_of(lambda: matrix.sum(axis=0), repeats)[0],
        "maximum.reduce": best_of(lambda: np.maximum.reduce(flat), repeats)[0],
    }
    floor_op = min(floors, key=floors.__getitem__)
    floor_s = floors[floor_op]

    # (2) the streaming accumulator over float32 updates.
    def fedavg_f32() -> np.ndarray:
        acc = FedAvgAccumulator(shapes)
        for row, n in zip(matrix, counts, strict=True):
            acc.add_params({_NAME: row}, n)
        return acc.result()[_NAME]

    f32_s, f32_result = best_of(fedavg_f32, repeats)

    # (3) the same accumulator fed int8 payload views, as the gateway does.
    payloads = [encode_tensors({_NAME: row}, "int8") for row in matrix]

    def fedavg_int8() -> np.ndarray:
        acc = FedAvgAccumulator(shapes)
        for payload, n in zip(payloads, counts, strict=True):
            acc.add(list(iter_tensors(payload, max_elements=params)), n)
        return acc.result()[_NAME]

    int8_s, int8_result = best_of(fedavg_int8, repeats)
    payloads.clear()  # 1/4 of the matrix again: free it before the reference

    reference = _reference(matrix, samples)
    error_f32 = _max_abs_error(f32_result, reference)
    error_int8 = _max_abs_error(int8_result, reference)

    return {
        "bench": "aggregate",
        "devices": devices,
        "params": params,
        "floor_s": sig(floor_s),
        "floor_op": floor_op,
        "floor_gb_per_s": sig(matrix.nbytes / floor_s / 1e9),
        "fedavg_f32_s": sig(f32_s),
        "fedavg_int8_s": sig(int8_s),
        "ratio_f32_to_floor": sig(f32_s / floor_s, 3),
        "ratio_int8_to_floor": sig(int8_s / floor_s, 3),
        "max_abs_error_f32": sig(error_f32, 3),
        "max_abs_error_int8": sig(error_int8, 3),
        "repeats": repeats,
    }
