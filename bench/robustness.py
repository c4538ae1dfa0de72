"""Aggregation rules under attack: final accuracy of an in-process federated simulation.

No broker and no gateway process: each round, every honest device trains the global model
on its own Dirichlet(alpha=1.0) share of the training split with ``fedcore.train`` and sends
its delta; malicious devices send what their attack dictates; the rule under test
aggregates the deltas (``gateway`` aggregation registry) and the global model takes the
aggregated delta. Every device takes part in every round. Models: logistic regression on
``breast_cancer``, the MLP (32 hidden units) on ``digits`` (``sklearn.datasets``).

Attacks (the malicious devices are the same ones for every rule and attack at a given
fraction and seed; they report their true sample counts):

``sign_flip``       the device's honest delta, negated
``scale_x100``      the device's honest delta times 100
``gaussian_noise``  a fresh N(0, 1) draw per coordinate (far larger than honest deltas)
``label_flip``      honest training on flipped labels (class c -> C - 1 - c)
``constant``        one fixed N(0, 1) vector, the same from every attacker every round
``nan``             all NaN: must be dropped, never aggregated
``free_rider``      a zero delta (the global model sent back unchanged)

Rules: ``fedavg``; ``fedavg_clip`` (FedAvg with adaptive clipping at the median update
norm); ``median``; ``trimmed_mean`` (beta = f / n); ``krum``, ``multi_krum`` and ``bulyan``
(told f, the true number of attackers; the registry counts each dropped non-finite update
against f and lowers f to what the remaining updates allow; the row reports the f in force
in the last round). Multi-Krum averages m = n - f updates; ``multi_krum_refined`` is
Multi-Krum followed by 3 concentration steps (keep the m updates nearest to the mean of the
current choice). ``geometric_median`` (RFA, smoothed Weiszfeld) and ``centered_clip`` (3
iterations from the coordinate median, radius = the median distance) take no f;
``geometric_median_trimmed`` averages the n - f updates nearest to the geometric median,
then runs the same 3 concentration steps (a selection that, unlike Krum's, holds up to
f < n / 2).

Each rule's attacked accuracy is compared with the same rule, configured the same way
(same f), without attackers: ``loss_pp`` is clean minus attacked accuracy in percentage
points. ``loss_vs_fedavg_pp`` compares with clean FedAvg instead. The goals (issue 6):
with the best robust rule, a loss of at most 2 points at 30% attackers and 5 at 45%.
Per cell (data set x attack) the best robust rule is the one with the highest attacked
accuracy; ``goal_*_met`` judges its ``loss_pp``, ``goal_*_met_vs_fedavg_clean`` its loss
against clean FedAvg, and ``goal_*_met_single_rule`` asks whether one robust rule keeps
every cell within the limit against clean FedAvg. Every NaN or inf update is counted in
``nonfinite_dropped``; ``nonfinite_aggregated`` counts, checked here independently of the
gateway code, any that reached an aggregate (it must be 0).

Every loss is the mean over the ``repeats`` seeds; ``loss_pp_per_seed`` gives each seed's
own (its attacked run against its own clean run), and ``test_samples`` the size of each
test set: one test sample is 100 / test_samples points in one seed's accuracy.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import numpy as np

from fedcore import ModelSpec, accuracy, init_params, train
from fedledger import Dataset, dirichlet_partition, load_dataset
from gateway import aggregate

from ._timing import sig

ATTACKS = (
    "sign_flip",
    "scale_x100",
    "gaussian_noise",
    "label_flip",
    "constant",
    "nan",
    "free_rider",
)
DATASETS = ("breast_cancer", "digits")
RULES = (
    "fedavg",
    "fedavg_clip",
    "median",
    "trimmed_mean",
    "krum",
    "multi_krum",
    "multi_krum_refined",
    "bulyan",
    "geometric_median",
    "geometric_median_trimmed",
    "centered_clip",
)
ROBUST_RULES = RULES[1:]
GOALS_PP = {0.3: 2.0, 0.45: 5.0}
_MODELS = {"breast_cancer": "logreg", "digits": "mlp"}
_TRAIN = {  # local SGD per round: enough that clean FedAvg has all but converged by round 30
    "breast_cancer": {"epochs": 5, "batch_size": 16, "lr": 0.1},
    "digits": {"epochs": 5, "batch_size": 16, "lr": 0.1},
}


def _load(name: str, seed: int) -> Dataset:
    if name == "breast_cancer":
        return load_dataset("breast_cancer", seed=seed)
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x.astype(np.float32), y.astype(np.int64), test_size=0.2, stratify=y, random_state=seed
    )
    return Dataset("digits", x_train, y_train, x_test, y_test, 10)


@dataclass(frozen=True)
class _Setup:
    data: Dataset
    spec: ModelSpec
    parts: list[np.ndarray]
    train: dict


def _setup(name: str, devices: int, seed: int) -> _Setup:
    data = _load(name, seed)
    mean = data.x_train.mean(axis=0)
    scale = data.x_train.std(axis=0) + 1e-6
    spec = ModelSpec(
        kind=_MODELS[name],
        n_features=data.x_train.shape[1],
        n_classes=data.n_classes,
        hidden=32,
        feature_mean=tuple(float(v) for v in mean),
        feature_scale=tuple(float(v) for v in scale),
        init_seed=seed,
    )
    parts = dirichlet_partition(data.y_train, devices, alpha=1.0, seed=seed)
    return _Setup(data, spec, parts, _TRAIN[name])


def _rule_options(rule: str, f: int, devices: int) -> tuple[str, dict]:
    if rule == "fedavg":
        return "fedavg", {}
    if rule == "fedavg_clip":
        return "fedavg", {"clip_factor": 1.0}
    if rule == "median":
        return "median", {}
    if rule == "trimmed_mean":
        return "trimmed_mean", {"beta": f / devices}
    if rule in ("geometric_median", "centered_clip"):
        return rule, {}
    if rule == "multi_krum_refined":
        return "multi_krum", {"f": f, "refine": 3}
    if rule == "geometric_median_trimmed":
        return "geometric_median", {"f": f, "refine": 3}
    return rule, {"f": f}


def _simulate(
    setup: _Setup,
    rule: str,
    options: dict,
    attack: str | None,
    malicious: frozenset[int],
    rounds: int,
    seed: int,
) -> dict:
    spec, data = setup.spec, setup.data
    params = init_params(spec)
    rng = np.random.default_rng([seed, 7])
    constant = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
    dropped = leaked = skipped = diverged = 0
    in_force: dict = {}
    for r in range(rounds):
        pairs = []
        for device, idx in enumerate(setup.parts):
            x, y = data.x_train[idx], data.y_train[idx]
            bad = attack is not None and device in malicious
            if bad and attack == "nan":
                delta = {k: np.full(v.shape, np.nan, np.float32) for k, v in params.items()}
            elif bad and attack == "free_rider":
                delta = {k: np.zeros_like(v) for k, v in params.items()}
            elif bad and attack == "constant":
                delta = constant
            elif bad and attack == "gaussian_noise":
                delta = {
                    k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()
                }
            else:
                labels = (data.n_classes - 1 - y) if bad and attack == "label_flip" else y
                local = train(
                    spec, params, x, labels, seed=seed * 100_003 + r * 1009 + device, **setup.train
                )
                delta = {k: local[k] - params[k] for k in params}
                if bad and attack == "sign_flip":
                    delta = {k: -v for k, v in delta.items()}
                elif bad and attack == "scale_x100":
                    delta = {k: np.float32(100.0) * v for k, v in delta.items()}
            pairs.append((delta, len(idx)))
        try:
            result = aggregate(pairs, rule, **options)
        except ValueError:
            # Every update was non-finite (honest training on a model that an earlier
            # round already wrecked diverges): no aggregate, the model stays as it is.
            dropped += len(pairs)
            skipped += 1
            continue
        # Checked here independently of the gateway: which updates held NaN or inf, and
        # did any of them reach the aggregate?
        nonfinite = {
            i for i, (d, _) in enumerate(pairs) if not all(np.isfinite(v).all() for v in d.values())
        }
        leaked += len(nonfinite.intersection(result.used)) + len(nonfinite ^ set(result.dropped))
        dropped += len(result.dropped)
        params = {k: (params[k] + result.params[k]).astype(np.float32) for k in params}
        if not all(np.isfinite(v).all() for v in params.values()):
            diverged += 1
        in_force = dict(result.options)
    return {
        "accuracy": accuracy(spec, params, data.x_test, data.y_test),
        "dropped": dropped,
        "leaked": leaked,
        "skipped": skipped,
        "diverged": diverged,
        "f": in_force.get("f"),
    }


def run(
    *,
    datasets: tuple[str, ...] = DATASETS,
    fractions: tuple[float, ...] = (0.1, 0.3, 0.45),
    rounds: int = 30,
    devices: int = 20,
    seed: int = 0,
    repeats: int = 3,
    rules: tuple[str, ...] = RULES,
    attacks: tuple[str, ...] = ATTACKS,
) -> dict:
    """Every data set x rule x attack x fraction, plus each rule's clean run.

    Each cell is the mean over ``repeats`` simulations with seeds ``seed, seed + 1, ...``
    (each its own device split, initial model, attacker set and training order): one
    test sample is 0.9 points on breast_cancer, so a single run is too coarse for a
    2-point goal. BLAS is held to one thread: the matrices are tiny, and threads only add
    wake-up latency (and contend with each other on a busy machine).
    """
    from threadpoolctl import threadpool_limits

    if rounds < 1 or devices < 4 or repeats < 1:
        raise ValueError("rounds >= 1, devices >= 4 and repeats >= 1 are required")
    unknown = sorted(set(datasets) - set(DATASETS))
    if unknown or not datasets:
        raise ValueError(f"unknown data sets {unknown}; available: {', '.join(DATASETS)}")
    unknown = sorted(set(rules) - set(RULES)) + sorted(set(attacks) - set(ATTACKS))
    if unknown:
        raise ValueError(f"unknown rules or attacks: {unknown}")
    if not all(0.0 < fr < 0.5 for fr in fractions):
        raise ValueError("fractions must be in (0, 0.5)")
    # Attacks such as scaling x100 wreck an undefended model on purpose; the overflow
    # that follows in training is expected, not worth a warning.
    with threadpool_limits(limits=1, user_api="blas"), np.errstate(all="ignore"):
        return _Bench(datasets, fractions, rounds, devices, seed, repeats, rules, attacks).run()


_COLUMNS = [
    "dataset",
    "rule",
    "attack",
    "fraction",
    "attackers",
    "f",
    "accuracy",
    "clean_accuracy",
    "loss_pp",
    "loss_vs_fedavg_pp",
    "dropped",
    "rounds_without_aggregate",
    "loss_pp_per_seed",
]


class _Bench:
    def __init__(self, datasets, fractions, rounds, devices, seed, repeats, rules, attacks):
        self.datasets, self.fractions, self.rules, self.attacks = (
            datasets,
            fractions,
            rules,
            attacks,
        )
        self.rounds, self.devices, self.seed, self.repeats = rounds, devices, seed, repeats
        self.counts = {fr: max(1, round(fr * devices)) for fr in fractions}
        self.configs = {
            rule: {fr: _rule_options(rule, self.counts[fr], devices) for fr in fractions}
            for rule in rules
        }
        distinct_clean = {
            (c[0], tuple(sorted(c[1].items())))
            for per_fraction in self.configs.values()
            for c in per_fraction.values()
        } | {("fedavg", ())}
        cells = len(distinct_clean) + len(rules) * len(fractions) * len(attacks)
        self.total = len(datasets) * cells * repeats
        self.done = 0
        self.started = time.perf_counter()
        self.dropped = self.leaked = 0
        self.test_samples: dict[str, int] = {}

    def _progress(self, label: str) -> None:
        self.done += 1
        if self.done % 50 == 0 or self.done == self.total:
            elapsed = time.perf_counter() - self.started
            print(
                f"robustness: {self.done}/{self.total} runs ({label}), {elapsed:.0f} s",
                file=sys.stderr,
                flush=True,
            )

    def _mean_run(self, setups, rule, options, attack, attackers, label) -> dict:
        runs = []
        for i, setup in enumerate(setups):
            malicious: frozenset[int] = frozenset()
            if attack is not None:
                rng = np.random.default_rng([self.seed + i, attackers])
                malicious = frozenset(
                    int(d) for d in rng.choice(self.devices, attackers, replace=False)
                )
            runs.append(
                _simulate(setup, rule, options, attack, malicious, self.rounds, self.seed + i)
            )
            self._progress(label)
        self.dropped += sum(r["dropped"] for r in runs)
        self.leaked += sum(r["leaked"] for r in runs)
        return {
            "accuracy": float(np.mean([r["accuracy"] for r in runs])),
            "per_seed": [r["accuracy"] for r in runs],
            "dropped": sum(r["dropped"] for r in runs),
            "skipped": sum(r["skipped"] for r in runs),
            "f": runs[-1]["f"],
        }

    def run(self) -> dict:
        rows: list[list] = []
        clean_rows: list[list] = []
        for name in self.datasets:
            setups = [_setup(name, self.devices, self.seed + i) for i in range(self.repeats)]
            self.test_samples[name] = len(setups[0].data.y_test)
            clean: dict[tuple, dict] = {}

            def clean_run(rule, registry_rule, options, setups=setups, clean=clean) -> dict:
                key = (registry_rule, tuple(sorted(options.items())))
                if key not in clean:
                    out = self._mean_run(setups, registry_rule, options, None, 0, f"{rule} clean")
                    clean[key] = out
                    clean_rows.append([setups[0].data.name, rule, options, sig(out["accuracy"])])
                return clean[key]

            fedavg_clean = clean_run("fedavg", "fedavg", {})["accuracy"]
            for rule in self.rules:
                for fr in self.fractions:
                    attackers = self.counts[fr]
                    registry_rule, options = self.configs[rule][fr]
                    clean_out = clean_run(rule, registry_rule, options)
                    clean_acc = clean_out["accuracy"]
                    for attack in self.attacks:
                        label = f"{name} {rule} {attack} {fr}"
                        out = self._mean_run(
                            setups, registry_rule, options, attack, attackers, label
                        )
                        acc = out["accuracy"]
                        rows.append(
                            [
                                name,
                                rule,
                                attack,
                                fr,
                                attackers,
                                out["f"],
                                sig(acc),
                                sig(clean_acc),
                                round(100.0 * (clean_acc - acc), 2),
                                round(100.0 * (fedavg_clean - acc), 2),
                                out["dropped"],
                                out["skipped"],
                                [
                                    round(100.0 * (c - a), 2)
                                    for c, a in zip(
                                        clean_out["per_seed"], out["per_seed"], strict=True
                                    )
                                ],
                            ]
                        )
        result: dict = {
            "bench": "robustness",
            "datasets": ",".join(self.datasets),
            "devices": self.devices,
            "rounds": self.rounds,
            "repeats": self.repeats,
            "seed": self.seed,
            "runs": self.done,
            "nonfinite_dropped": self.dropped,
            "nonfinite_aggregated": self.leaked,
        }
        result.update(_summary(rows, self.fractions, self.rules, self.test_samples))
        result["elapsed_s"] = sig(time.perf_counter() - self.started, 3)
        result["models"] = {name: _MODELS[name] for name in self.datasets}
        result["test_samples"] = dict(self.test_samples)
        result["table"] = {"columns": _COLUMNS, "rows": rows}
        result["clean"] = {
            "columns": ["dataset", "rule", "options", "accuracy"],
            "rows": clean_rows,
        }
        return result


def _summary(rows: list[list], fractions, rules, test_samples=None) -> dict:
    """Goals and the best rules, from the table.

    Per cell (data set x attack), the best robust rule is the one with the highest
    attacked accuracy; its ``loss_pp`` (against its own clean run) is what the goal is
    judged on, and its loss against clean FedAvg is reported beside. One rule for every
    cell: the robust rule whose worst loss against clean FedAvg is smallest. The cell
    behind each worst loss is named, with the loss in test samples (per seed) beside.
    """
    col = {c: i for i, c in enumerate(_COLUMNS)}
    robust = [r for r in rules if r in ROBUST_RULES]
    out: dict = {}
    best_rows: list[list] = []
    worst_per_rule: dict = {}
    for fr in fractions:
        pct = f"{round(fr * 100)}pct"
        cells: dict[tuple, list[list]] = {}
        for row in rows:
            if row[col["fraction"]] == fr and row[col["rule"]] in robust:
                cells.setdefault((row[col["dataset"]], row[col["attack"]]), []).append(row)
        if not cells:
            continue
        best_losses = []
        for (dataset, attack), candidates in sorted(cells.items()):
            best = max(candidates, key=lambda r: (r[col["accuracy"]], -r[col["loss_pp"]]))
            best_losses.append((best[col["loss_pp"]], best[col["loss_vs_fedavg_pp"]]))
            best_rows.append(
                [
                    dataset,
                    attack,
                    fr,
                    best[col["rule"]],
                    best[col["accuracy"]],
                    best[col["loss_pp"]],
                    best[col["loss_vs_fedavg_pp"]],
                ]
            )
        worst = max(loss for loss, _ in best_losses)
        at = next(r for r in best_rows if r[2] == fr and r[5] == worst)
        out[f"worst_loss_cell_{pct}"] = {
            "dataset": at[0],
            "attack": at[1],
            "rule": at[3],
            "loss_pp": worst,
            "loss_test_samples": round(worst * test_samples[at[0]] / 100.0, 2)
            if test_samples and at[0] in test_samples
            else None,
        }
        worst_vs_fedavg = max(loss for _, loss in best_losses)
        out[f"worst_loss_pp_{pct}"] = worst
        out[f"worst_loss_vs_fedavg_pp_{pct}"] = worst_vs_fedavg
        per_rule = {}
        for rule in robust:
            mine = [r for group in cells.values() for r in group if r[col["rule"]] == rule]
            if mine:
                per_rule[rule] = {
                    "worst_loss_pp": max(r[col["loss_pp"]] for r in mine),
                    "worst_loss_vs_fedavg_pp": max(r[col["loss_vs_fedavg_pp"]] for r in mine),
                }
        single = min(per_rule, key=lambda r: per_rule[r]["worst_loss_vs_fedavg_pp"])
        out[f"single_best_rule_{pct}"] = single
        out[f"single_best_rule_worst_loss_pp_{pct}"] = per_rule[single]["worst_loss_pp"]
        out[f"single_best_rule_worst_loss_vs_fedavg_pp_{pct}"] = per_rule[single][
            "worst_loss_vs_fedavg_pp"
        ]
        worst_per_rule[pct] = per_rule
        goal = GOALS_PP.get(fr)
        if goal is not None:
            out[f"goal_{pct}_limit_pp"] = goal
            out[f"goal_{pct}_met"] = bool(worst <= goal)
            out[f"goal_{pct}_met_vs_fedavg_clean"] = bool(worst_vs_fedavg <= goal)
            out[f"goal_{pct}_met_single_rule"] = bool(
                per_rule[single]["worst_loss_vs_fedavg_pp"] <= goal
            )
    out["best_rule_per_cell"] = {
        "columns": [
            "dataset",
            "attack",
            "fraction",
            "rule",
            "accuracy",
            "loss_pp",
            "loss_vs_fedavg_pp",
        ],
        "rows": best_rows,
    }
    out["worst_loss_per_rule"] = worst_per_rule
    return out
