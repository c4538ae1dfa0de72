"""Robust aggregation rules, clipping, the rule registry and the server optimizers."""

import numpy as np
import pytest

from fedcore import encode_tensors, iter_tensors
from gateway import _robust as robust
from gateway import fedavg
from gateway._robust import (
    UpdateMatrix,
    bulyan,
    centered_clip,
    centered_clip_rows,
    clip_pairs,
    clipped,
    concentrate,
    coordinate_median,
    drop_nonfinite,
    geometric_median,
    geometric_median_rows,
    krum,
    multi_krum,
    multi_krum_select,
    pairwise_sq_distances,
    trim_count,
    trimmed_mean,
    update_norm,
)
from gateway._strategies import (
    AGGREGATION_RULES,
    SERVER_OPTIMIZERS,
    ServerOptimizer,
    aggregate,
    server_step,
)

# f for the rules that take one; the rest take nothing.
RULE_OPTIONS = {
    "fedavg": {},
    "fedprox": {},
    "median": {},
    "trimmed_mean": {"beta": 0.25},
    "krum": {"f": 2},
    "multi_krum": {"f": 2},
    "bulyan": {"f": 1},
    "geometric_median": {},
    "centered_clip": {},
}


def scalars(values, samples=None):
    """One-coordinate updates: easy to reason about by hand."""
    samples = samples or [1] * len(values)
    return [
        ({"w": np.array([v], dtype=np.float32)}, n) for v, n in zip(values, samples, strict=True)
    ]


def w(params):
    return params["w"].tolist()


# ------------------------------------------------------------------ hand-made known answers
def test_median_odd_and_even_and_ignores_sample_counts():
    assert w(coordinate_median(scalars([10.0, 1.0, 2.0], [1, 1, 1000]))) == [2.0]
    assert w(coordinate_median(scalars([1.0, 100.0, 2.0, 3.0]))) == [2.5]


def test_median_is_coordinate_wise_and_keeps_shapes():
    pairs = [
        ({"w": np.array([[1.0, 9.0]]), "b": np.array([5.0])}, 3),
        ({"w": np.array([[2.0, 8.0]]), "b": np.array([-5.0])}, 3),
        ({"w": np.array([[3.0, 7.0]]), "b": np.array([0.0])}, 3),
    ]
    out = coordinate_median(pairs)
    assert out["w"].shape == (1, 2) and out["w"].dtype == np.float32
    assert out["w"].tolist() == [[2.0, 8.0]] and out["b"].tolist() == [0.0]


def test_trimmed_mean_drops_beta_each_side():
    values = [1.0, 2.0, 3.0, 4.0, 100.0]
    assert w(trimmed_mean(scalars(values), beta=0.2)) == [3.0]  # drops 1 and 100
    assert w(trimmed_mean(scalars(values), beta=0.0)) == [22.0]  # the plain mean
    assert trim_count(5, 0.2) == 1 and trim_count(10, 0.45) == 4 and trim_count(2, 0.49) == 0
    with pytest.raises(ValueError):
        trimmed_mean(scalars(values), beta=0.5)


@pytest.mark.parametrize("n", [3, 4, 7, 300])  # 300 rows: the partition path, not the sort
def test_coordinate_statistics_match_numpy_across_tiles(monkeypatch, rng, n):
    monkeypatch.setattr(robust, "_TILE_BYTES", 4096)  # many tiles, and a ragged last one
    rows = rng.normal(size=(n, 1001)).astype(np.float32)
    matrix = UpdateMatrix.from_rows(rows.copy(), [1] * n)
    np.testing.assert_allclose(
        coordinate_median(matrix)["w"], np.median(rows, axis=0), rtol=1e-6, atol=1e-6
    )
    k = trim_count(n, 0.2)
    expected = np.sort(rows, axis=0)[k : n - k].mean(axis=0)
    np.testing.assert_allclose(trimmed_mean(matrix, beta=0.2)["w"], expected, atol=1e-5)


def test_pairwise_distances_from_one_product(rng):
    rows = rng.normal(size=(6, 50)).astype(np.float32)
    dist = pairwise_sq_distances(rows)
    brute = ((rows[:, None, :].astype(np.float64) - rows[None, :, :]) ** 2).sum(axis=2)
    np.testing.assert_allclose(dist, brute, rtol=1e-4, atol=1e-4)
    assert (np.diag(dist) == 0).all() and (dist >= 0).all()


def test_krum_and_multi_krum_by_hand():
    # f=1, n=5: each score sums the n - f - 2 = 2 nearest squared distances.
    # 0: 1+4=5   1: 1+1=2   2: 1+4=5   10: 1+64=65   11: 1+81=82
    pairs = scalars([0.0, 1.0, 2.0, 10.0, 11.0], [1, 1, 2, 1, 1])
    assert w(krum(pairs, f=1)) == [1.0]
    # m=3: the three lowest scores {0, 1, 2}, weighted by samples: (0 + 1 + 2*2) / 4
    assert w(multi_krum(pairs, f=1, m=3)) == [1.25]
    result = aggregate(pairs, "multi_krum", f=1, m=3)
    assert result.used == (0, 1, 2)
    assert aggregate(pairs, "krum", f=1).used == (1,)


def test_bulyan_by_hand():
    # Recursive Krum (f=1) picks 3, 2, 4, 1, 5 (theta = n - 2f = 5); per coordinate the
    # beta = theta - 2f = 3 values closest to the median 3 are {2, 3, 4}: mean 3.
    pairs = scalars([1.0, 2.0, 3.0, 4.0, 5.0, 50.0, -50.0])
    assert w(bulyan(pairs, f=1)) == [3.0]
    assert aggregate(pairs, "bulyan", f=1).used == (0, 1, 2, 3, 4)
    with pytest.raises(ValueError, match="4f \\+ 3"):
        bulyan(pairs, f=2)


def test_fedprox_server_side_is_fedavg(rng):
    pairs = [({"w": rng.normal(size=4)}, int(rng.integers(1, 9))) for _ in range(5)]
    np.testing.assert_allclose(aggregate(pairs, "fedprox").params["w"], fedavg(pairs)["w"])


def test_matrix_and_streaming_paths_agree(rng):
    pairs = [
        ({"w": rng.normal(size=(3, 2)), "b": rng.normal(size=2)}, int(rng.integers(1, 50)))
        for _ in range(9)
    ]
    for rule, options in RULE_OPTIONS.items():
        for extra in ({}, {"clip_factor": 0.8}):
            a = aggregate(pairs, rule, **options, **extra)
            b = aggregate(UpdateMatrix.from_pairs(pairs), rule, **options, **extra)
            for name in a.params:
                np.testing.assert_allclose(a.params[name], b.params[name], rtol=1e-5, atol=1e-6)
            assert a.clipped == b.clipped


# --------------------------------------------------------------------- robustness properties
def honest_and_outliers(rng, honest=15, outliers=4, size=20, magnitude=1e6):
    centre = rng.normal(size=size)
    pairs = [({"w": centre + 0.01 * rng.normal(size=size)}, 10) for _ in range(honest)]
    pairs += [({"w": np.full(size, magnitude)}, 10) for _ in range(outliers)]
    order = rng.permutation(len(pairs))
    return [pairs[i] for i in order], centre


ROBUST = ["median", "trimmed_mean", "krum", "multi_krum", "bulyan", "geometric_median"]


@pytest.mark.parametrize("rule", [*ROBUST, "centered_clip"])
def test_robust_rules_ignore_a_minority_of_huge_outliers(rng, rule):
    pairs, centre = honest_and_outliers(rng)
    options = {"trimmed_mean": {"beta": 0.25}}.get(rule, {"f": 4} if "krum" in rule else {})
    if rule == "bulyan":
        options = {"f": 4}  # n = 19 = 4f + 3
    out = aggregate(pairs, rule, **options).params["w"]
    assert np.abs(out - centre).max() < 0.05
    assert np.abs(aggregate(pairs, "fedavg").params["w"] - centre).max() > 1e5


@pytest.mark.parametrize("rule", ["krum", "multi_krum", "bulyan", "geometric_median"])
def test_colluding_overflowing_updates_never_look_close(rng, rule):
    # 1e20 squared overflows float32: those distances must count as infinite, not NaN or 0.
    pairs, centre = honest_and_outliers(rng, magnitude=1e20)
    out = aggregate(pairs, rule, **({} if rule == "geometric_median" else {"f": 4}))
    assert np.abs(out.params["w"] - centre).max() < 0.05


def nonfinite_mixture(rng):
    pairs = [({"w": rng.normal(size=(2, 3)), "b": rng.normal(size=3)}, 5) for _ in range(9)]
    pairs[2] = ({"w": np.full((2, 3), np.nan), "b": np.zeros(3)}, 5)
    pairs[5] = ({"w": np.zeros((2, 3)), "b": np.array([0.0, np.inf, 0.0])}, 500)
    pairs[7] = ({"w": np.full((2, 3), 1e300), "b": np.zeros(3)}, 5)  # inf as float32
    return pairs


@pytest.mark.parametrize("rule", sorted(AGGREGATION_RULES))
@pytest.mark.parametrize("clip", [{}, {"clip_factor": 1.0}, {"clip_norm": 0.5}])
def test_every_rule_drops_nonfinite_updates(rng, rule, clip):
    pairs = nonfinite_mixture(rng)
    result = aggregate(pairs, rule, **RULE_OPTIONS[rule], **clip)
    assert result.dropped == (2, 5, 7)
    assert not set(result.dropped) & set(result.used)
    assert result.n_updates == 9
    assert all(np.isfinite(v).all() and v.dtype == np.float32 for v in result.params.values())
    finite = [p for i, p in enumerate(pairs) if i not in (2, 5, 7)]
    options = dict(RULE_OPTIONS[rule])
    if "f" in options:  # each dropped update counts as one of the f faulty ones
        options["f"] = max(0, options["f"] - 3)
        assert result.options["f"] == options["f"]
    clean = aggregate(finite, rule, **options, **clip).params
    for name in clean:  # the dropped updates had no influence at all
        np.testing.assert_allclose(result.params[name], clean[name], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "fn",
    [
        coordinate_median,
        lambda p: trimmed_mean(p, beta=0.2),
        lambda p: krum(p, f=1),
        lambda p: multi_krum(p, f=1, refine=3),
        geometric_median,
        lambda p: geometric_median(p, f=1, refine=2),
        centered_clip,
    ],
)
def test_pure_rules_drop_nonfinite_too(rng, fn):
    pairs = nonfinite_mixture(rng)
    assert all(np.isfinite(v).all() for v in fn(pairs).values())
    kept, dropped = drop_nonfinite(pairs)
    assert dropped == (2, 5, 7) and len(kept) == 6


def test_all_nonfinite_is_an_error():
    pairs = [({"w": np.array([np.nan])}, 1)] * 3
    for rule in AGGREGATION_RULES:
        with pytest.raises(ValueError, match="non-finite"):
            aggregate(pairs, rule, **RULE_OPTIONS[rule])


def test_update_matrix_dequantizes_and_refuses_nonfinite(rng):
    shapes = {"w": (4, 3), "b": (3,)}
    matrix = UpdateMatrix(shapes, capacity=3)
    params = [{"w": rng.normal(size=(4, 3)), "b": rng.normal(size=3)} for _ in range(2)]
    assert matrix.add(list(iter_tensors(encode_tensors(params[0], "int8"), max_elements=99)), 4)
    bad = {"w": np.full((4, 3), np.nan, dtype=np.float32), "b": np.zeros(3, np.float32)}
    assert not matrix.add_params(bad, 4)
    assert matrix.add_params(params[1], 6)
    assert len(matrix) == 2 and matrix.dropped == [1] and matrix.arrivals.tolist() == [0, 2]
    peak = np.abs(params[0]["w"]).max()
    np.testing.assert_allclose(
        matrix.unflatten(matrix.rows[0])["w"], params[0]["w"], atol=peak / 127
    )
    with pytest.raises(ValueError, match="at most"):
        matrix.add_params(params[0], 1)
        matrix.add_params(params[0], 1)


# ------------------------------------------------------------------------------- clipping
def test_clipping_bounds_every_norm(rng):
    pairs = [({"w": rng.normal(size=10) * s, "b": rng.normal(size=2)}, 3) for s in (1, 5, 50, 0)]
    for opts in (
        {"norm": 2.0},
        {"factor": 1.0},
        {"quantile": 0.25},
        {"factor": 2, "quantile": 0.5},
    ):
        out, which, threshold = clip_pairs(pairs, **opts)
        norms = [update_norm(p) for p, _ in pairs]
        assert all(update_norm(p) <= threshold * (1 + 1e-6) for p, _ in out)
        assert which == tuple(i for i, n in enumerate(norms) if n > threshold)
        for i in set(range(4)) - set(which):  # unclipped updates are untouched
            assert out[i][0] is pairs[i][0]
    _, _, threshold = clip_pairs(pairs, factor=1.0)
    assert threshold == pytest.approx(np.median([update_norm(p) for p, _ in pairs]))


def test_clipping_composes_with_any_rule(rng):
    pairs = [({"w": np.array([3.0, 4.0])}, 1), ({"w": np.array([0.3, 0.4])}, 1)]
    # the 5-norm update is clipped to norm 1 ([0.6, 0.8]); the small one passes through
    assert np.allclose(w(clipped(fedavg, norm=1.0)(pairs)), [0.45, 0.6])
    assert np.allclose(w(clipped(coordinate_median, norm=1.0)(pairs)), [0.45, 0.6])
    result = aggregate(pairs, "median", clip_norm=1.0)
    assert result.clipped == (0,) and result.clip_threshold == 1.0
    assert np.allclose(w(result.params), [0.45, 0.6])


def test_clipping_limits_what_a_scaled_attacker_can_do(rng):
    honest = [({"w": np.ones(4) + 0.1 * rng.normal(size=4)}, 10) for _ in range(8)]
    attacker = [({"w": -100.0 * np.ones(4)}, 10)]
    plain = aggregate(honest + attacker, "fedavg").params["w"]
    defended = aggregate(honest + attacker, "fedavg", clip_factor=1.0).params["w"]
    assert (plain < 0).all() and (defended > 0.6).all()


# ------------------------------------------------------------------------------- registry
def test_registry_names_and_references():
    assert set(AGGREGATION_RULES) == {
        "fedavg", "fedprox", "median", "trimmed_mean", "krum", "multi_krum", "bulyan",
        "geometric_median", "centered_clip",
    }  # fmt: skip
    for name, rule in AGGREGATION_RULES.items():
        assert rule.name == name and rule.reference
        assert rule.needs_all_updates == (name not in ("fedavg", "fedprox"))


@pytest.mark.parametrize(
    ("rule", "options", "message"),
    [
        ("median", {"beta": 0.1}, "no option beta"),
        ("trimmed_mean", {"beta": 0.5}, "beta"),
        ("krum", {"f": -1}, "f must be"),
        ("krum", {"f": 1.5}, "integer"),
        ("multi_krum", {"m": 0}, "m must be"),
        ("fedavg", {"clip_norm": 1.0, "clip_factor": 1.0}, "excludes"),
        ("fedavg", {"clip_quantile": 0.0}, "clip_quantile"),
        ("fedavg", {"clip_norm": float("nan")}, "clip_norm"),
        ("multi_krum", {"refine": -1}, "refine"),
        ("geometric_median", {"weighted": 1}, "weighted"),
        ("geometric_median", {"max_iter": 0}, "max_iter"),
        ("geometric_median", {"tol": 0.0}, "tol"),
        ("centered_clip", {"tau": 0.0}, "tau"),
        ("centered_clip", {"iterations": 0}, "iterations"),
        ("centered_clip", {"f": 1}, "no option f"),
    ],
)
def test_bad_options_are_refused(rule, options, message):
    with pytest.raises(ValueError, match=message):
        AGGREGATION_RULES[rule].resolve(options)


def test_unknown_rule_names_the_allowed_ones():
    with pytest.raises(ValueError, match="allowed: fedavg"):
        aggregate(scalars([1.0]), "mean")


def test_f_is_lowered_to_what_the_updates_allow():
    pairs = scalars([1.0, 2.0, 3.0, 4.0, 5.0])
    assert aggregate(pairs, "krum", f=4).options["f"] == 2  # n >= f + 3
    assert aggregate(pairs, "bulyan", f=4).options["f"] == 0  # n >= 4f + 3
    with pytest.raises(ValueError):
        krum(pairs, f=4)  # the pure function refuses rather than guesses


def test_dropped_updates_count_against_f():
    # 4 of the assumed f=5 faulty updates sent NaN: at most 1 faulty among the 8 left, so
    # Multi-Krum averages m = 8 - 1 = 7 updates rather than 8 - 5 = 3.
    pairs = scalars([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 100.0] + [float("nan")] * 4)
    result = aggregate(pairs, "multi_krum", f=5)
    assert result.options["f"] == 1 and result.options["m"] == 7
    assert result.used == (0, 1, 2, 3, 4, 5, 6) and result.dropped == (8, 9, 10, 11)
    assert w(result.params) == [4.0]


# ------------------------------------- geometric median, centered clipping, concentration
def test_geometric_median_by_hand():
    # In one dimension the geometric median is the median, whatever the outliers hold.
    assert w(geometric_median(scalars([1.0, 2.0, 3.0, 1e6, -50.0]))) == pytest.approx([2.0])
    # The Fermat point of a triangle with all angles < 120 degrees: for an equilateral
    # one, its centroid (where the coordinate-wise median is not).
    h = np.sqrt(3.0) / 2
    pairs = [({"w": np.array(p)}, 1) for p in ([0.0, 0.0], [1.0, 0.0], [0.5, h])]
    np.testing.assert_allclose(geometric_median(pairs)["w"], [0.5, h / 3], atol=1e-5)
    # Weighted by samples (RFA), the heavier point wins: 3 of 4 samples sit at 0.
    pairs = scalars([0.0, 10.0], [3, 1])
    assert abs(w(geometric_median(pairs, weighted=True))[0]) < 1e-4
    assert w(geometric_median(pairs)) == pytest.approx([5.0], abs=1e-4)  # anywhere in [0, 10]


def test_geometric_median_converges_and_reports_iterations(rng):
    rows = rng.normal(size=(9, 30)).astype(np.float32)
    z, iterations = geometric_median_rows(rows, tol=1e-9, max_iter=1000)
    assert iterations < 1000
    # First-order optimality: the unit vectors towards the rows sum to ~0.
    diff = rows - z
    units = diff / np.linalg.norm(diff, axis=1, keepdims=True)
    assert np.linalg.norm(units.sum(axis=0)) < 1e-3
    result = aggregate([({"w": r}, 1) for r in rows], "geometric_median", tol=1e-9)
    assert 1 <= result.options["iterations"] <= 100


@pytest.mark.parametrize("rule", ["geometric_median", "centered_clip", "multi_krum"])
def test_identical_updates_aggregate_to_themselves(rng, rule):
    update = {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": np.ones(2, np.float32)}
    options = {"f": 2, "refine": 3} if rule == "multi_krum" else {}
    out = aggregate([(update, n) for n in (1, 5, 9, 2, 7, 3)], rule, **options).params
    for name in update:
        np.testing.assert_allclose(out[name], update[name], rtol=1e-6, atol=1e-7)


def test_without_attackers_symmetric_updates_give_the_mean(rng):
    # Updates symmetric about a centre: the geometric median and centered clipping are the
    # mean, like FedAvg with equal sample counts.
    centre = rng.normal(size=8)
    offsets = rng.normal(size=(5, 8))
    pairs = [({"w": centre + s * o}, 4) for o in offsets for s in (1.0, -1.0)]
    mean = fedavg(pairs)["w"]
    np.testing.assert_allclose(geometric_median(pairs)["w"], mean, atol=1e-4)
    np.testing.assert_allclose(centered_clip(pairs)["w"], mean, atol=1e-5)
    # With a radius no update reaches, one step from any start is exactly the mean.
    rows = np.array([p["w"] for p, _ in pairs], dtype=np.float32)
    v, radii = centered_clip_rows(rows, start=np.zeros(8), tau=1e9, iterations=1)
    np.testing.assert_allclose(v, rows.astype(np.float64).mean(axis=0), rtol=1e-6)
    assert radii == [1e9]


@pytest.mark.parametrize("attackers", [1, 4, 9])
def test_geometric_median_breaks_down_only_at_half(rng, attackers):
    # Up to 9 of 20 updates anywhere at all: the aggregate stays near the honest ones, and
    # moving the attackers 1000 times farther away barely moves it.
    pairs, centre = honest_and_outliers(rng, honest=20 - attackers, outliers=attackers)
    far = [(p, n) if p["w"][0] < 1e5 else ({"w": p["w"] * 1e3}, n) for p, n in pairs]
    spread = 0.01 * np.sqrt(20)  # the honest updates' typical distance from their centre
    near_out, far_out = geometric_median(pairs)["w"], geometric_median(far)["w"]
    assert np.linalg.norm(near_out - centre) < 3 * spread
    assert np.linalg.norm(far_out - near_out) < 1e-3


def test_centered_clip_bounds_each_attackers_pull(rng):
    # Each iteration, a Byzantine update moves the centre by at most tau / n, however far
    # away it is: 4 attackers, 3 iterations, at most 12 tau / n from the honest-only answer.
    pairs, centre = honest_and_outliers(rng, honest=15, outliers=4, magnitude=1e6)
    tau = 0.05
    out = centered_clip(pairs, tau=tau, iterations=3)["w"]
    honest_only = centered_clip([p for p in pairs if p[0]["w"][0] < 1e5], tau=tau)["w"]
    assert np.linalg.norm(out - honest_only) <= 3 * 4 * tau / 15 + 1e-6
    assert np.linalg.norm(out - centre) < 0.1


def test_multi_krum_refine_drops_sign_flipped_updates(rng):
    # Honest updates share a direction and differ as much again; 6 of 20 send theirs
    # negated. Krum scores let some through; concentration steps drop most of them.
    chosen_plain = chosen_refined = 0
    for _ in range(10):
        deltas = np.ones(10) + rng.normal(size=(20, 10))
        deltas[14:] *= -1.0
        matrix = UpdateMatrix.from_rows(deltas.astype(np.float32), [1] * 20)
        plain = multi_krum_select(matrix, f=6)
        refined = concentrate(matrix, plain, 3)
        assert len(refined) == len(plain) == 14
        chosen_plain += int((plain >= 14).sum())
        chosen_refined += int((refined >= 14).sum())
    assert chosen_refined < chosen_plain / 2


def test_geometric_median_with_f_averages_around_it_past_krums_bound(rng):
    # 9 of 20 attackers agree closely with each other, the 11 honest updates far less: past
    # Krum's n >= 2f + 3, Multi-Krum picks the tight cluster; the geometric median (and the
    # n - f updates nearest to it) stay with the majority.
    centre = rng.normal(size=20)
    honest = [({"w": centre + 1.3 * rng.normal(size=20)}, 10) for _ in range(11)]
    bad = centre + 5.0
    attackers = [({"w": bad + 0.01 * rng.normal(size=20)}, 10) for _ in range(9)]
    pairs = honest + attackers
    fooled = aggregate(pairs, "multi_krum", f=9).params["w"]
    assert np.linalg.norm(fooled - bad) < np.linalg.norm(fooled - centre)
    result = aggregate(pairs, "geometric_median", f=9, refine=3)
    assert result.used == tuple(range(11)) and result.options["f"] == 9
    np.testing.assert_allclose(result.params["w"], fedavg(honest)["w"], rtol=1e-5, atol=1e-6)
    pure = geometric_median(pairs, f=9, refine=3)["w"]
    np.testing.assert_allclose(pure, result.params["w"], rtol=1e-6, atol=1e-7)
    # f = 0 and no steps: the weighted mean of everything
    np.testing.assert_allclose(
        geometric_median(pairs, f=0)["w"], fedavg(pairs)["w"], rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ValueError, match="f must be"):
        geometric_median(pairs, f=20)
    # dropouts lower f to what the remaining updates allow (at least one is averaged)
    assert aggregate(pairs[:3], "geometric_median", f=9).options["f"] == 2


def test_concentration_never_raises_the_spread(rng):
    rows = (rng.normal(size=(12, 5)) * rng.uniform(0.1, 3.0, size=(12, 1))).astype(np.float32)
    matrix = UpdateMatrix.from_rows(rows, [1] * 12)

    def spread(index):
        chosen = rows[index].astype(np.float64)
        return ((chosen - chosen.mean(axis=0)) ** 2).sum()

    start = multi_krum_select(matrix, f=3)
    previous = spread(start)
    for steps in range(1, 5):
        now = spread(concentrate(matrix, start, steps))
        assert now <= previous + 1e-9
        previous = now
    assert concentrate(matrix, start, 0).tolist() == sorted(start.tolist())
    plain = aggregate(UpdateMatrix.from_rows(rows.copy(), [1] * 12), "multi_krum", f=3)
    assert (
        plain.params["w"].tolist()
        == multi_krum(UpdateMatrix.from_rows(rows.copy(), [1] * 12), f=3, refine=0)["w"].tolist()
    )


# ----------------------------------------------------------------------- server optimizers
@pytest.mark.parametrize("kind", SERVER_OPTIMIZERS)
def test_server_optimizers_move_along_the_delta(kind):
    params = {"w": np.zeros(3, dtype=np.float32)}
    delta = {"w": np.array([1.0, -2.0, 0.0], dtype=np.float32)}
    opt = ServerOptimizer(kind, lr=0.1)
    for _ in range(3):
        new = opt.step(params, delta)
        assert new["w"][0] > params["w"][0] and new["w"][1] < params["w"][1]
        assert new["w"][2] == params["w"][2]
        params = new
    assert opt.state.rounds == 3


def test_server_step_is_pure_and_matches_the_paper():
    params = {"w": np.array([1.0], dtype=np.float32)}
    delta = {"w": np.array([0.5], dtype=np.float32)}
    new, state = server_step("fedadam", params, delta, lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    # g = -0.5; m = 0.1 g = -0.05; v = 0.99 tau^2 + 0.01 g^2; x = x - lr m / (sqrt(v) + tau)
    v = 0.99e-6 + 0.01 * 0.25
    assert new["w"][0] == pytest.approx(1.0 + 0.1 * 0.05 / (np.sqrt(v) + 1e-3), rel=1e-5)
    assert params["w"][0] == 1.0 and delta["w"][0] == 0.5
    assert state.m["w"][0] == pytest.approx(-0.05)
    _, adagrad = server_step("fedadagrad", params, delta, lr=0.1, tau=1e-3)
    assert adagrad.v["w"][0] == pytest.approx(1e-6 + 0.25)
    _, yogi = server_step("fedyogi", params, delta, lr=0.1, beta2=0.99, tau=1e-3)
    # v_old = tau^2 < g^2, so sign(v_old - g^2) = -1 and v grows by (1 - beta2) g^2
    assert yogi.v["w"][0] == pytest.approx(1e-6 + 0.01 * 0.25)
    sgd, _ = server_step("sgd", params, delta, lr=1.0)
    assert sgd["w"][0] == 1.5  # FedAvg's global + delta
    with pytest.raises(ValueError):
        server_step("adam", params, delta, lr=0.1)


# --------------------------------------------------------------------------- in the gateway
@pytest.mark.parametrize(
    ("rule", "options"),
    [
        ("geometric_median", {}),
        ("centered_clip", {"iterations": 2}),
        ("multi_krum", {"f": 1, "refine": 3}),
        ("geometric_median", {"f": 1, "refine": 2}),
    ],
)
def test_new_rules_run_a_task_in_the_gateway(
    tmp_path, task, registry, gateway_key, dataset, device_keys, rule, options
):
    from fedcore import InMemoryBroker
    from ledger import Identity

    from .fleet import Clock, make_agents, make_gateway, pump

    spec = task.model_validate(
        {**task.model_dump(), "aggregation": rule, "aggregation_options": options}
    )  # validated: the task spec names the rule
    broker = InMemoryBroker()
    gateway = make_gateway(tmp_path, spec, registry, gateway_key, dataset, broker, Clock())
    agents = make_agents(spec, device_keys, gateway_key, dataset, broker)
    gateway.connect()
    gateway.start()
    for _ in range(10):
        pump(gateway, agents)
    assert gateway.finished and gateway.results[-1].accuracy > 0.85
    admin = Identity(msp_id="org1", subject="admin", role="admin")
    last = gateway.ledger.evaluate("GetRound", spec.id, 2, identity=admin)
    assert last["aggregation"] == rule
    assert gateway.ledger.verify(replay=True, store=gateway.store).ok
