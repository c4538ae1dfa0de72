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

The rules that need every update at once, on the same ``(N, M)`` matrix (adopted by a
``gateway`` ``UpdateMatrix`` without a copy, as the gateway fills one while updates
arrive), each beside the operation it must be compared with, measured in the same run:

``sort_axis0_s``
    ``np.sort(matrix, axis=0)``: what a sort-based coordinate-wise median or trimmed mean
    would do. Its result is also the reference the two rules are checked against.
``median_s``, ``trimmed_mean_s``
    The coordinate-wise median and the trimmed mean (beta 0.1), including unflattening
    the result into a params dict. Goal: at most 0.7x ``sort_axis0_s``.
``krum_distances_s``
    Multi-Krum's pairwise squared distances (``gateway`` ``pairwise_sq_distances``: one
    Gram matrix product plus O(N^2) work), beside ``matmul_s``, the bare BLAS product
    ``matrix @ matrix.T`` of the same shapes. Checked against float64 distances of a few
    row pairs computed directly.

Everything runs with BLAS held to one thread (``threadpoolctl``), as the FedAvg figures
do: the ratios compare like with like on one core.
"""

from __future__ import annotations

import numpy as np

from fedcore import encode_tensors, iter_tensors
from gateway import (
    FedAvgAccumulator,
    UpdateMatrix,
    coordinate_median,
    pairwise_sq_distances,
    trimmed_mean,
)

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


_TRIM_BETA = 0.1


def run(*, devices: int = 100, params: int = 1_000_000, repeats: int = 3) -> dict:
    """Time FedAvg of ``devices`` updates of ``params`` float32 values against the floor,
    and the robust rules against the sort and the matrix product they replace."""
    if devices < 1 or params < 1 or repeats < 1:
        raise ValueError("devices, params and repeats must be at least 1")
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        return _run(devices, params, repeats)


def _run(devices: int, params: int, repeats: int) -> dict:
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
    del reference

    robust = _robust_rules(matrix, counts, repeats)

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
        **robust,
        "repeats": repeats,
    }


def _robust_rules(matrix: np.ndarray, counts: list[int], repeats: int) -> dict:
    """Median, trimmed mean and Krum distances vs. np.sort and one matrix product."""
    n = len(matrix)
    updates = UpdateMatrix.from_rows(matrix, counts, {_NAME: (matrix.shape[1],)})

    sort_s, ordered = best_of(lambda: np.sort(matrix, axis=0), repeats)
    median_s, median = best_of(lambda: coordinate_median(updates)[_NAME], repeats)
    trimmed_s, trimmed = best_of(lambda: trimmed_mean(updates, beta=_TRIM_BETA)[_NAME], repeats)

    lo, hi = (n - 1) // 2, n // 2
    median_ref = 0.5 * (ordered[lo].astype(np.float64) + ordered[hi])
    k = int(np.floor(_TRIM_BETA * n + 1e-9))
    trimmed_ref = np.mean(ordered[k : n - k], axis=0, dtype=np.float64)
    del ordered

    matmul_s, _ = best_of(lambda: matrix @ matrix.T, repeats)
    dist_s, dist = best_of(lambda: pairwise_sq_distances(matrix), repeats)
    dist_error = 0.0
    for i in range(min(n, 5)) if n > 1 else ():
        j = (i + 1 + 7 * i % (n - 1)) % n  # another row, spread over the matrix
        exact = float(np.sum((matrix[i].astype(np.float64) - matrix[j]) ** 2))
        dist_error = max(dist_error, abs(dist[i, j] - exact) / max(exact, 1e-30))

    return {
        "sort_axis0_s": sig(sort_s),
        "median_s": sig(median_s),
        "trimmed_mean_s": sig(trimmed_s),
        "ratio_median_to_sort": sig(median_s / sort_s, 3),
        "ratio_trimmed_mean_to_sort": sig(trimmed_s / sort_s, 3),
        "max_abs_error_median": sig(_max_abs_error(median, median_ref), 3),
        "max_abs_error_trimmed_mean": sig(_max_abs_error(trimmed, trimmed_ref), 3),
        "matmul_s": sig(matmul_s),
        "krum_distances_s": sig(dist_s),
        "ratio_krum_distances_to_matmul": sig(dist_s / matmul_s, 3),
        "max_rel_error_krum_distances": sig(dist_error, 3),
    }
