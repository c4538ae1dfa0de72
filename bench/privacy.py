"""Accuracy against privacy: DP-FedAvg on a fleet of at least 100 simulated devices with
Poisson sampling, beside the same run without DP, and the epsilon each noise level costs.

An in-process simulation (no MQTT) of what a ``[dp]`` task does, with the same parts the
fleet runs: each round the devices are drawn by :func:`fedcore.sampled_devices` (rate
``q``, a fixed seed); each sampled device trains with ``fedcore.train``, clips its delta
with :func:`fedcore.clip_update` and encodes it with the task's codec (int8); the server
decodes it and folds it into the gateway's own :class:`gateway._dp.DPAggregator` (clip
again, sum, Gaussian noise of std ``z * C``, divide by ``q * N``). Epsilon is the gateway's
accountant (:func:`fedcore.epsilon`, RDP) at ``delta``.

Limits measured in the same run: ``no_dp`` is the same sampled FedAvg without clipping or
noise (same split, devices, initial model and training seeds), so the noise and the clip
are the only differences; ``epsilon_without_amplification`` is what the same noise would
cost if every device took part in every round (no sampling).

Goal (issue 14): epsilon <= 8 at delta 1e-5 with at most 3 pp loss against ``no_dp``, with
>= 100 devices sampling 10-20% per round (``goal_met``, with the setting that meets it).
Accuracies are means over ``repeats`` seeds (each its own split and partition).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

import numpy as np

from fedcore import (
    DPRoundEvent,
    TensorView,
    accuracy,
    clip_update,
    decode_tensors,
    encode_tensors,
    epsilon,
    init_params,
    sampled_devices,
)

from .accuracy import RECIPES, Recipe, _prepare, local_delta

GOAL_EPSILON = 8.0
GOAL_DELTA = 1e-5
GOAL_LOSS_PP = 3.0


def _progress(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def _simulate(
    spec, recipe: Recipe, data, parts, *, rounds: int, rate: float, seed: int,
    noise: float | None, clip: float, codec: str,
) -> list[float]:  # fmt: skip
    """Accuracy after each round; ``noise=None``: FedAvg of the sampled devices (weight 1
    each, like DP-FedAvg), no clip, no noise."""
    from gateway import DPAggregator

    params = init_params(spec)
    devices = [f"device-{i:03d}" for i in range(len(parts))]
    index = {d: i for i, d in enumerate(devices)}
    sampling_seed = seed.to_bytes(8, "big") * 4
    rng = np.random.default_rng(seed)
    shapes = {k: v.shape for k, v in params.items()}
    curve = []
    for rnd in range(rounds):
        chosen = sampled_devices(sampling_seed, "privacy-bench", rnd, devices, rate)
        agg = DPAggregator(
            shapes,
            clip=clip if noise is not None else 1e30,
            noise_multiplier=noise or 0.0,
            denominator=rate * len(devices) if noise is not None else max(len(chosen), 1),
            rng=rng,
        )
        for device in chosen:
            idx = parts[index[device]]
            delta = local_delta(spec, params, data, idx, recipe, seed=seed, device=device, rnd=rnd)
            if noise is not None:
                delta, _ = clip_update(delta, clip)
            decoded = decode_tensors(encode_tensors(delta, codec))
            views = [
                TensorView(k, v.shape, v.astype(np.float32).ravel(), 1.0)
                for k, v in decoded.items()
            ]
            agg.add(views, len(idx))
        if chosen or noise is not None:
            step = agg.result()
            params = {k: (params[k] + step[k]).astype(np.float32) for k in params}
        curve.append(accuracy(spec, params, data.x_test, data.y_test))
    return curve


def run(
    *,
    dataset: str = "digits",
    devices: int = 300,
    rate: float = 0.1,
    rounds: int = 60,
    noise_multipliers: Sequence[float] = (0.7, 1.0, 1.3, 2.0),
    clip: float = 0.5,
    delta: float = GOAL_DELTA,
    repeats: int = 3,
    seed: int = 0,
    codec: str = "int8",
) -> dict:
    """Accuracy vs epsilon (see the module doc)."""
    if devices < 2 or rounds < 1 or repeats < 1 or not 0 < rate <= 1:
        raise ValueError("devices >= 2, rounds and repeats >= 1 and 0 < rate <= 1 are required")
    if dataset not in RECIPES:
        raise ValueError(f"unknown data set {dataset!r}; available: {', '.join(RECIPES)}")
    from threadpoolctl import threadpool_limits

    recipe = RECIPES[dataset]
    if dataset == "digits":
        recipe = Recipe("logreg", 16, 2, 16, 0.2, 1.0)  # a model a Pi Zero trains in a blink
    started = time.perf_counter()
    seeds = [seed + r for r in range(repeats)]
    curves: dict[str, list[list[float]]] = {"no_dp": []}
    with threadpool_limits(limits=1, user_api="blas"):
        prepared = [_prepare(dataset, recipe, devices, 1.0, s) for s in seeds]
        for s, (data, spec, parts) in zip(seeds, prepared, strict=True):
            for label, z in [("no_dp", None), *((f"z={z}", z) for z in noise_multipliers)]:
                curve = _simulate(
                    spec, recipe, data, parts, rounds=rounds, rate=rate, seed=s, noise=z,
                    clip=clip, codec=codec,
                )  # fmt: skip
                curves.setdefault(label, []).append(curve)
                _progress(f"[privacy] seed {s}: {label.replace('_', ' ')} {curve[-1]:.4f}")
    baseline = float(np.mean([c[-1] for c in curves["no_dp"]]))
    settings = []
    for z in noise_multipliers:
        final = float(np.mean([c[-1] for c in curves[f"z={z}"]]))
        events = [DPRoundEvent(z, rate)] * rounds
        eps = epsilon(events, delta)
        settings.append(
            {
                "noise_multiplier": z,
                "clip": clip,
                "accuracy": final,
                "loss_pp": round(100 * (baseline - final), 3) + 0.0,
                "epsilon": eps,
                "epsilon_without_amplification": epsilon(events, delta, amplified=False),
                "curve": [float(np.mean(col)) for col in zip(*curves[f"z={z}"], strict=True)],
            }
        )
    meeting = [s for s in settings if s["epsilon"] <= GOAL_EPSILON and s["loss_pp"] <= GOAL_LOSS_PP]
    return {
        "bench": "privacy",
        "dataset": dataset,
        "model": recipe.kind,
        "devices": devices,
        "sampling_rate": rate,
        "rounds": rounds,
        "delta": delta,
        "repeats": repeats,
        "codec": codec,
        "no_dp_accuracy": baseline,
        "no_dp_curve": [float(np.mean(col)) for col in zip(*curves["no_dp"], strict=True)],
        "settings": settings,
        "goal": f"epsilon <= {GOAL_EPSILON} at delta {GOAL_DELTA:g}, loss <= {GOAL_LOSS_PP} pp",
        "goal_met": bool(meeting) and delta <= GOAL_DELTA and devices >= 100,
        "meeting_goal": [s["noise_multiplier"] for s in meeting],
        "duration_s": round(time.perf_counter() - started, 1),
    }


def plot(result: dict, path) -> None:
    """Accuracy against epsilon, one point per noise level, and the no-DP line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    eps = [s["epsilon"] for s in result["settings"]]
    acc = [100 * s["accuracy"] for s in result["settings"]]
    ax.plot(eps, acc, marker="o", label="DP-FedAvg (sampled)")
    for s in result["settings"]:
        ax.annotate(f"z={s['noise_multiplier']}", (s["epsilon"], 100 * s["accuracy"]))
    ax.axhline(100 * result["no_dp_accuracy"], color="grey", linestyle="--", label="no DP")
    ax.axvline(GOAL_EPSILON, color="tab:red", linestyle=":", label=f"epsilon {GOAL_EPSILON}")
    ax.set_xscale("log")
    ax.set_xlabel(f"epsilon at delta {result['delta']:g} after {result['rounds']} rounds")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title(f"{result['dataset']}: {result['devices']} devices, q={result['sampling_rate']}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
