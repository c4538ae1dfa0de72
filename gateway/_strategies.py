"""Named aggregation strategies a task spec can choose, and the server optimizers.

``AGGREGATION_RULES`` maps each rule name to an :class:`AggregationRule`: the pure function
it runs, the options it takes (with defaults) and its reference. Calling a rule returns an
:class:`Aggregate`: the aggregated delta plus what a round record needs to say about it
(which updates were dropped as non-finite, which were used, which were clipped, the
options in force).

Every rule takes the norm-clipping options ``clip_norm`` (fixed threshold),
``clip_factor`` (threshold = factor x this round's median update norm) and
``clip_quantile`` (threshold = that quantile of the norms, times ``clip_factor`` if given),
so clipping composes with any rule. Clipping happens after non-finite updates are dropped
and before the rule sees the updates.

``f`` (Krum, Multi-Krum, Bulyan) is the number of Byzantine updates the task assumes among
those offered. Each non-finite update dropped is one of them, so the rule runs with
``f - dropped``; when dropouts leave too few updates even for that, the registry lowers it
to what the rule can compute (Krum family: n >= f + 3; Bulyan: n >= 4f + 3). The f in
force is recorded in ``Aggregate.options``; the pure functions in ``_robust`` take f as
given and refuse what they cannot compute.

FedAvg and FedProx over pairs stay streaming (O(model) memory beyond the inputs); every
other rule flattens the finite updates into one ``UpdateMatrix``. A gateway that fills an
``UpdateMatrix`` as updates arrive can pass it in directly.

Rules aggregate deltas; a server optimizer then applies the aggregated delta to the global
model: plain ``sgd`` with lr 1 is FedAvg's ``global + delta``, and FedAdagrad, FedAdam and
FedYogi (Reddi et al., 2021) keep moment estimates across rounds.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from fedcore import Params

from ._aggregate import fedavg
from ._robust import (
    Pair,
    UpdateMatrix,
    bulyan_select,
    centered_clip_rows,
    clip_factors,
    clip_threshold,
    closest_to_median_mean,
    concentrate,
    drop_nonfinite,
    geometric_median_rows,
    geometric_median_select,
    krum_scores,
    max_bulyan_f,
    max_krum_f,
    middle_mean,
    pairwise_sq_distances,
    trim_count,
    update_norm,
    weighted_rows_mean,
)

log = logging.getLogger(__name__)

CLIP_OPTIONS: Mapping[str, None] = MappingProxyType(
    {"clip_norm": None, "clip_factor": None, "clip_quantile": None}
)


@dataclass(frozen=True)
class Aggregate:
    """One aggregation's outcome: the delta and what the round record should say.

    Indices are positions in the input sequence (arrival order for an ``UpdateMatrix``).
    """

    params: Params
    rule: str
    options: Mapping[str, Any]
    n_updates: int
    used: tuple[int, ...]
    dropped: tuple[int, ...]
    clipped: tuple[int, ...] = ()
    clip_threshold: float | None = None


# A core takes the finite (and clipped) update matrix and the resolved options and returns
# the aggregated flat vector, the rows it used, and the options actually in force.
_Core = Callable[[UpdateMatrix, dict], tuple[np.ndarray, np.ndarray, dict]]


@dataclass(frozen=True)
class AggregationRule:
    """A named rule: ``rule(updates, **options) -> Aggregate``."""

    name: str
    reference: str
    defaults: Mapping[str, Any]
    needs_all_updates: bool
    core: _Core = field(repr=False)

    def resolve(self, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Defaults merged with ``options``, validated; unknown names are refused."""
        given = dict(options or {})
        allowed = {**self.defaults, **CLIP_OPTIONS}
        unknown = sorted(set(given) - set(allowed))
        if unknown:
            raise ValueError(
                f"rule {self.name!r} has no option {', '.join(unknown)}; "
                f"allowed: {', '.join(sorted(allowed))}"
            )
        resolved = {**allowed, **given}
        _validate(self.name, resolved)
        return resolved

    def __call__(self, updates: Sequence[Pair] | UpdateMatrix, **options: Any) -> Aggregate:
        """Aggregate ``updates``; an ``UpdateMatrix`` passed in is consumed (clipping
        scales its rows in place)."""
        opts = self.resolve(options)
        clip = {k: opts[k] for k in CLIP_OPTIONS}
        clipping = any(v is not None for v in clip.values())
        if not self.needs_all_updates and not isinstance(updates, UpdateMatrix):
            return _streaming_fedavg(self.name, updates, opts, clipping)
        if isinstance(updates, UpdateMatrix):
            matrix = updates
            n_updates = matrix.offered
        else:
            if not updates:
                raise ValueError("no updates to aggregate")
            matrix = UpdateMatrix.from_pairs(updates)
            n_updates = len(updates)
        if len(matrix) == 0:
            raise ValueError("every update was non-finite: nothing to aggregate")
        clipped: tuple[int, ...] = ()
        threshold = None
        if clipping:
            norms = matrix.row_norms()
            threshold = clip_threshold(
                norms, norm=clip["clip_norm"], factor=clip["clip_factor"],
                quantile=clip["clip_quantile"],
            )  # fmt: skip
            factors = clip_factors(norms, threshold)
            matrix.scale_rows(factors)
            clipped = tuple(int(a) for a in matrix.arrivals[factors < 1.0])
        vector, used_rows, in_force = self.core(matrix, opts)
        arrivals = matrix.arrivals
        return Aggregate(
            params=matrix.unflatten(vector),
            rule=self.name,
            options=MappingProxyType(in_force),
            n_updates=n_updates,
            used=tuple(int(arrivals[i]) for i in np.sort(used_rows)),
            dropped=tuple(matrix.dropped),
            clipped=clipped,
            clip_threshold=threshold,
        )


def _validate(name: str, opts: Mapping[str, Any]) -> None:
    def number(key: str, low: float, high: float, *, low_open: bool, high_open: bool) -> None:
        value = opts.get(key)
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"rule {name!r}: {key} must be a number, got {value!r}")
        ok_low = value > low if low_open else value >= low
        ok_high = value < high if high_open else value <= high
        if not (ok_low and ok_high and math.isfinite(value)):
            lo = "(" if low_open else "["
            hi = ")" if high_open else "]"
            raise ValueError(f"rule {name!r}: {key} must be in {lo}{low}, {high}{hi}, got {value}")

    for key in ("f", "m", "iterations", "max_iter", "refine"):
        value = opts.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"rule {name!r}: {key} must be an integer, got {value!r}")
    for key in ("f", "refine"):
        if opts.get(key) is not None and opts[key] < 0:
            raise ValueError(f"rule {name!r}: {key} must be >= 0, got {opts[key]}")
    for key in ("m", "iterations", "max_iter"):
        if opts.get(key) is not None and opts[key] < 1:
            raise ValueError(f"rule {name!r}: {key} must be >= 1, got {opts[key]}")
    value = opts.get("weighted")
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"rule {name!r}: weighted must be true or false, got {value!r}")
    number("beta", 0.0, 0.5, low_open=False, high_open=True)
    number("tau", 0.0, math.inf, low_open=True, high_open=True)
    number("tol", 0.0, 1.0, low_open=True, high_open=True)
    number("clip_norm", 0.0, math.inf, low_open=True, high_open=True)
    number("clip_factor", 0.0, math.inf, low_open=True, high_open=True)
    number("clip_quantile", 0.0, 1.0, low_open=True, high_open=False)
    if opts.get("clip_norm") is not None and (
        opts.get("clip_factor") is not None or opts.get("clip_quantile") is not None
    ):
        raise ValueError(f"rule {name!r}: clip_norm excludes clip_factor and clip_quantile")


def _streaming_fedavg(name: str, pairs: Sequence[Pair], opts: dict, clipping: bool) -> Aggregate:
    """FedAvg over pairs without ever stacking them: O(model) memory beyond the inputs."""
    if not pairs:
        raise ValueError("no updates to aggregate")
    kept, dropped = drop_nonfinite(pairs)
    dropped_set = set(dropped)
    finite_idx = [i for i in range(len(pairs)) if i not in dropped_set]
    if not kept:
        raise ValueError("every update was non-finite: nothing to aggregate")
    clipped: tuple[int, ...] = ()
    threshold = None
    if not clipping:
        params = fedavg(kept)
    else:
        norms = np.array([update_norm(w) for w, _ in kept])
        threshold = clip_threshold(
            norms, norm=opts["clip_norm"], factor=opts["clip_factor"],
            quantile=opts["clip_quantile"],
        )  # fmt: skip
        factors = clip_factors(norms, threshold)
        clipped = tuple(i for i, s in zip(finite_idx, factors, strict=True) if s < 1.0)
        total = float(sum(n for _, n in kept))
        if total <= 0:
            raise ValueError("fedavg needs a positive total sample count")
        params = {}
        for tensor in kept[0][0]:
            acc = np.zeros(np.shape(kept[0][0][tensor]), dtype=np.float64)
            for (weights, n), s in zip(kept, factors, strict=True):
                acc += np.asarray(weights[tensor], dtype=np.float64) * (n * s / total)
            params[tensor] = acc.astype(np.float32)
    return Aggregate(
        params=params,
        rule=name,
        options=MappingProxyType(dict(opts)),
        n_updates=len(pairs),
        used=tuple(finite_idx),
        dropped=dropped,
        clipped=clipped,
        clip_threshold=threshold,
    )


# ----------------------------------------------------------------------------- rule cores
def _all_rows(matrix: UpdateMatrix) -> np.ndarray:
    return np.arange(len(matrix))


def _fedavg_core(matrix: UpdateMatrix, opts: dict):
    return weighted_rows_mean(matrix, _all_rows(matrix)), _all_rows(matrix), dict(opts)


def _median_core(matrix: UpdateMatrix, opts: dict):
    n = len(matrix)
    return middle_mean(matrix.rows, (n - 1) // 2, n // 2), _all_rows(matrix), dict(opts)


def _trimmed_core(matrix: UpdateMatrix, opts: dict):
    n = len(matrix)
    k = trim_count(n, opts["beta"])
    return middle_mean(matrix.rows, k, n - 1 - k), _all_rows(matrix), {**opts, "trimmed": k}


def _effective_f(rule: str, matrix: UpdateMatrix, f: int, limit: int) -> int:
    """The assumed Byzantine count among the finite updates that remain.

    A non-finite update is a faulty one, so each dropped update is one of the ``f``: at
    most ``f - dropped`` faulty updates remain. Dropouts and drops can also leave fewer
    updates than the rule needs for that ``f``; it is then lowered to ``limit``.
    """
    remaining = max(0, f - len(matrix.dropped))
    if remaining > limit:
        log.info("%s: f=%d is more than %d updates allow; using f=%d", rule, f, len(matrix), limit)
        return limit
    return remaining


def _multi_krum_core(matrix: UpdateMatrix, opts: dict, *, single: bool = False):
    n = len(matrix)
    f = _effective_f("krum", matrix, opts["f"], max_krum_f(n))
    m = 1 if single else (n - f if opts.get("m") is None else min(opts["m"], n))
    scores = krum_scores(pairwise_sq_distances(matrix.rows), f)
    chosen = np.sort(np.argsort(scores, kind="stable")[:m])
    if not single:
        chosen = concentrate(matrix, chosen, opts["refine"])
    vector = matrix.rows[chosen[0]].copy() if single else weighted_rows_mean(matrix, chosen)
    in_force = {**opts, "f": f} if single else {**opts, "f": f, "m": m}
    return vector, chosen, in_force


def _bulyan_core(matrix: UpdateMatrix, opts: dict):
    n = len(matrix)
    f = _effective_f("bulyan", matrix, opts["f"], max_bulyan_f(n))
    chosen = np.sort(bulyan_select(pairwise_sq_distances(matrix.rows), f))
    vector = closest_to_median_mean(matrix.rows[chosen], len(chosen) - 2 * f)
    return vector, chosen, {**opts, "f": f}


def _geometric_median_core(matrix: UpdateMatrix, opts: dict):
    samples = matrix.samples if opts["weighted"] else None
    vector, iterations = geometric_median_rows(
        matrix.rows, samples, max_iter=opts["max_iter"], tol=opts["tol"]
    )
    in_force = {**opts, "iterations": iterations}
    if opts["f"] is None:
        return vector.astype(np.float32), _all_rows(matrix), in_force
    f = _effective_f("geometric_median", matrix, opts["f"], len(matrix) - 1)
    chosen = geometric_median_select(matrix, vector, f=f, refine=opts["refine"])
    return weighted_rows_mean(matrix, chosen), chosen, {**in_force, "f": f}


def _centered_clip_core(matrix: UpdateMatrix, opts: dict):
    samples = matrix.samples if opts["weighted"] else None
    vector, radii = centered_clip_rows(
        matrix.rows, samples, tau=opts["tau"], iterations=opts["iterations"]
    )
    return vector.astype(np.float32), _all_rows(matrix), {**opts, "radius": radii[-1]}


_FEDAVG_REF = "McMahan et al., 2017, Communication-Efficient Learning of Deep Networks from Decentralized Data (AISTATS)"  # noqa: E501


def _rule(name, reference, defaults, needs_all, core) -> AggregationRule:
    return AggregationRule(name, reference, MappingProxyType(defaults), needs_all, core)


#: Every aggregation rule a task can name. ``fedprox`` is FedAvg: FedProx (Li et al., 2020)
#: changes only the devices' local objective (a proximal term mu/2 ||w - w_global||^2); its
#: server step is the sample-weighted mean.
AGGREGATION_RULES: Mapping[str, AggregationRule] = MappingProxyType(
    {
        "fedavg": _rule("fedavg", _FEDAVG_REF, {}, False, _fedavg_core),
        "fedprox": _rule(
            "fedprox",
            "Li et al., 2020, Federated Optimization in Heterogeneous Networks (MLSys); "
            "server side = FedAvg",
            {},
            False,
            _fedavg_core,
        ),
        "median": _rule(
            "median",
            "Yin et al., 2018, Byzantine-Robust Distributed Learning: Towards Optimal "
            "Statistical Rates (ICML): coordinate-wise median",
            {},
            True,
            _median_core,
        ),
        "trimmed_mean": _rule(
            "trimmed_mean",
            "Yin et al., 2018 (ICML): coordinate-wise trimmed mean",
            {"beta": 0.1},
            True,
            _trimmed_core,
        ),
        "krum": _rule(
            "krum",
            "Blanchard et al., 2017, Machine Learning with Adversaries (NeurIPS): Krum",
            {"f": 1},
            True,
            lambda matrix, opts: _multi_krum_core(matrix, opts, single=True),
        ),
        "multi_krum": _rule(
            "multi_krum",
            "Blanchard et al., 2017 (NeurIPS): Multi-Krum; refine: concentration steps "
            "(Rousseeuw and Van Driessen, 1999)",
            {"f": 1, "m": None, "refine": 0},
            True,
            _multi_krum_core,
        ),
        "bulyan": _rule(
            "bulyan",
            "El Mhamdi et al., 2018, The Hidden Vulnerability of Distributed Learning in "
            "Byzantium (ICML)",
            {"f": 1},
            True,
            _bulyan_core,
        ),
        "geometric_median": _rule(
            "geometric_median",
            "Pillutla, Kakade and Harchaoui, 2022, Robust Aggregation for Federated Learning "
            "(IEEE TSP): RFA, geometric median by smoothed Weiszfeld; with f: the mean of "
            "the n - f updates nearest to it",
            {"weighted": False, "max_iter": 100, "tol": 1e-6, "f": None, "refine": 0},
            True,
            _geometric_median_core,
        ),
        "centered_clip": _rule(
            "centered_clip",
            "Karimireddy, He and Jaggi, 2021, Learning from History for Byzantine Robust "
            "Optimization (ICML): centered clipping, centred on the coordinate-wise median",
            {"tau": None, "iterations": 3, "weighted": False},
            True,
            _centered_clip_core,
        ),
    }
)


def aggregate(
    updates: Sequence[Pair] | UpdateMatrix, rule: str = "fedavg", **options: Any
) -> Aggregate:
    """Aggregate with the rule named ``rule`` (a key of ``AGGREGATION_RULES``)."""
    try:
        chosen = AGGREGATION_RULES[rule]
    except KeyError:
        raise ValueError(
            f"unknown aggregation rule {rule!r}; allowed: {', '.join(AGGREGATION_RULES)}"
        ) from None
    return chosen(updates, **options)


# ------------------------------------------------------------------------ server optimizers
#: Server optimizers (Reddi et al., 2021, "Adaptive Federated Optimization", ICLR, Alg. 2).
#: ``sgd`` with lr 1 is FedAvg's (and FedProx's) server step: ``global + delta``.
SERVER_OPTIMIZERS: tuple[str, ...] = ("fedadagrad", "fedadam", "fedyogi", "sgd")


@dataclass(frozen=True)
class ServerOptimizerState:
    """First and second moment estimates of the pseudo-gradient, and rounds taken."""

    m: Params
    v: Params
    rounds: int = 0


def initial_server_state(params: Mapping[str, np.ndarray], *, tau: float) -> ServerOptimizerState:
    """m = 0 and v = tau^2 (Reddi et al. start from v_{-1} >= tau^2)."""
    return ServerOptimizerState(
        m={k: np.zeros(np.shape(v), dtype=np.float32) for k, v in params.items()},
        v={k: np.full(np.shape(v), tau * tau, dtype=np.float32) for k, v in params.items()},
    )


def server_step(
    kind: str,
    params: Mapping[str, np.ndarray],
    delta: Mapping[str, np.ndarray],
    state: ServerOptimizerState | None = None,
    *,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.99,
    tau: float = 1e-3,
) -> tuple[Params, ServerOptimizerState]:
    """One server step; pure: returns the new global model and state, inputs untouched.

    The pseudo-gradient is ``g = -delta`` (the aggregated update points downhill).
    ``m = beta1 m + (1 - beta1) g``, and ``v`` is
    ``v + g^2`` (FedAdagrad), ``beta2 v + (1 - beta2) g^2`` (FedAdam) or
    ``v - (1 - beta2) g^2 sign(v - g^2)`` (FedYogi); then
    ``x = x - lr m / (sqrt(v) + tau)``. ``sgd`` is ``x = x - lr g``. No bias correction, as
    in the paper.
    """
    if kind not in SERVER_OPTIMIZERS:
        raise ValueError(f"unknown server optimizer {kind!r}; allowed: {SERVER_OPTIMIZERS}")
    if state is None:
        state = initial_server_state(params, tau=tau)
    new_params: Params = {}
    new_m: Params = {}
    new_v: Params = {}
    for name, x in params.items():
        x = np.asarray(x, dtype=np.float32)
        g = -np.asarray(delta[name], dtype=np.float32)
        if kind == "sgd":
            new_params[name] = (x - np.float32(lr) * g).astype(np.float32)
            new_m[name], new_v[name] = state.m[name], state.v[name]
            continue
        m = np.float32(beta1) * state.m[name] + np.float32(1 - beta1) * g
        g2 = g * g
        v_old = state.v[name]
        if kind == "fedadagrad":
            v = v_old + g2
        elif kind == "fedadam":
            v = np.float32(beta2) * v_old + np.float32(1 - beta2) * g2
        else:  # fedyogi
            v = v_old - np.float32(1 - beta2) * g2 * np.sign(v_old - g2)
        new_params[name] = (x - np.float32(lr) * m / (np.sqrt(v) + np.float32(tau))).astype(
            np.float32
        )
        new_m[name], new_v[name] = m.astype(np.float32), v.astype(np.float32)
    return new_params, ServerOptimizerState(new_m, new_v, state.rounds + 1)


class ServerOptimizer:
    """Holds a server optimizer's state across rounds; the arithmetic is ``server_step``.

    ``lr`` defaults to 1.0 for ``sgd`` (FedAvg) and 0.1 for the adaptive optimizers.
    """

    def __init__(
        self,
        kind: str = "sgd",
        *,
        lr: float | None = None,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
    ):
        if kind not in SERVER_OPTIMIZERS:
            raise ValueError(f"unknown server optimizer {kind!r}; allowed: {SERVER_OPTIMIZERS}")
        if not (0 <= beta1 < 1 and 0 <= beta2 < 1 and tau > 0):
            raise ValueError("0 <= beta1, beta2 < 1 and tau > 0 are required")
        self.kind = kind
        self.lr = (1.0 if kind == "sgd" else 0.1) if lr is None else lr
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        self.beta1, self.beta2, self.tau = beta1, beta2, tau
        self.state: ServerOptimizerState | None = None

    def step(self, params: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> Params:
        """Apply an aggregated delta; returns the new global model."""
        new_params, self.state = server_step(
            self.kind, params, delta, self.state,
            lr=self.lr, beta1=self.beta1, beta2=self.beta2, tau=self.tau,
        )  # fmt: skip
        return new_params
