import numpy as np
import pytest

from fedcore import TensorView, encode_tensors, iter_tensors
from gateway import FedAvgAccumulator, fedavg


def updates(rng, n):
    return [
        ({"w": rng.normal(size=(4, 3)), "b": rng.normal(size=3)}, int(rng.integers(1, 50)))
        for _ in range(n)
    ]


def test_fedavg_is_the_sample_weighted_mean(rng):
    pairs = updates(rng, 6)
    total = sum(n for _, n in pairs)
    expected = sum(p["w"] * n for p, n in pairs) / total
    np.testing.assert_allclose(fedavg(pairs)["w"], expected, rtol=1e-5)


def test_fedavg_of_identical_updates_is_that_update(rng):
    p = {"w": rng.normal(size=(2, 2)).astype(np.float32)}
    np.testing.assert_allclose(fedavg([(p, 3), (p, 9)])["w"], p["w"], rtol=1e-6)


def test_fedavg_needs_updates():
    with pytest.raises(ValueError):
        fedavg([])
    with pytest.raises(ValueError):
        FedAvgAccumulator({"w": (2,)}).result()


def test_streaming_accumulator_matches_fedavg(rng):
    pairs = updates(rng, 7)
    acc = FedAvgAccumulator({"w": (4, 3), "b": (3,)})
    for params, n in pairs:
        acc.add_params(params, n)
    ref = fedavg(pairs)
    for name in ref:
        np.testing.assert_allclose(acc.result()[name], ref[name], rtol=1e-5, atol=1e-6)
    assert acc.count == 7 and acc.total_samples == sum(n for _, n in pairs)


def test_accumulator_dequantizes_int8_payloads(rng):
    pairs = updates(rng, 5)
    acc = FedAvgAccumulator({"w": (4, 3), "b": (3,)})
    for params, n in pairs:
        payload = encode_tensors(params, "int8")
        acc.add(list(iter_tensors(payload, max_elements=100)), n)
    ref = fedavg(pairs)
    peak = max(np.abs(p["w"]).max() for p, _ in pairs)
    np.testing.assert_allclose(acc.result()["w"], ref["w"], atol=peak / 127)


def test_the_streaming_mean_does_not_depend_on_the_order_updates_arrive_in():
    """Thread scheduling and the network reorder updates; the global model (named by the
    hash of its float32 bytes) must not change with them."""
    rng = np.random.default_rng(3)
    shapes = {"w": (40, 30), "b": (30,)}
    updates = []
    for _ in range(24):
        views = []
        for name, shape in shapes.items():
            q = rng.integers(-127, 128, size=int(np.prod(shape)), dtype=np.int8)
            views.append(TensorView(name, shape, q, float(np.float32(rng.uniform(1e-4, 1e-2)))))
        updates.append((views, int(rng.integers(5, 400))))
    results = set()
    for order in range(20):
        acc = FedAvgAccumulator(shapes)
        for i in np.random.default_rng(order).permutation(len(updates)):
            acc.add(*updates[i])
        out = acc.result()
        assert all(v.dtype == np.float32 for v in out.values())
        results.add(b"".join(out[k].tobytes() for k in sorted(out)))
    assert len(results) == 1
