"""cnn1d updates (a 3-D kernel) through every codec and every aggregation rule: the gateway
is shape-agnostic, so they aggregate like any other model's."""

from __future__ import annotations

import numpy as np
import pytest

from fedcore import CODECS, ModelSpec, decode_tensors, encode_tensors, iter_tensors
from gateway import AGGREGATION_RULES, fedavg
from gateway._combine import RoundAggregator

SPEC = ModelSpec(kind="cnn1d", n_features=64 * 3, n_classes=4, window=64, channels=3)
SHAPES = SPEC.shapes()


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("rule", list(AGGREGATION_RULES))
def test_cnn1d_updates_aggregate_under_every_codec_and_rule(codec, rule):
    rng = np.random.default_rng(7)
    payloads = [
        (
            encode_tensors(
                {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()},
                codec,
                k_fraction=0.3,
            ),
            int(rng.integers(10, 50)),
        )
        for _ in range(7)
    ]
    aggregator = RoundAggregator(SHAPES, rule=rule, options={}, capacity=len(payloads))
    limit = sum(int(np.prod(s)) for s in SHAPES.values())
    for payload, samples in payloads:
        aggregator.add(list(iter_tensors(payload, max_elements=limit)), samples)
    result = aggregator.result()
    assert {k: v.shape for k, v in result.items()} == SHAPES
    assert all(np.all(np.isfinite(v)) for v in result.values())
    if rule in ("fedavg", "fedprox"):
        reference = fedavg([(decode_tensors(p), n) for p, n in payloads])
        for name in SHAPES:
            np.testing.assert_allclose(result[name], reference[name], rtol=1e-5, atol=1e-6)


def test_a_cnn1d_task_federates_with_qat(tmp_path, registry, gateway_key, device_keys):
    """Five agents, windows of the synthetic activity signals, int8-channel updates, QAT."""
    from fedcore import InMemoryBroker, TaskSpec, accuracy, fake_quantize
    from fedledger._datasets import load_activity

    from .fleet import Clock, make_agents, make_gateway, pump

    data = load_activity(seed=0)
    windows = data.x_train.reshape(len(data.x_train), 64, 3)
    task = TaskSpec.model_validate(
        {
            "id": "activity",
            "rounds": 8,
            "codec": "int8-channel",
            "model": {
                "kind": "cnn1d", "n_features": 192, "n_classes": 4, "window": 64, "channels": 3,
                "feature_mean": [float(v) for v in windows.mean(axis=(0, 1))],
                "feature_scale": [float(v) for v in windows.std(axis=(0, 1))],
            },
            "training": {"epochs": 10, "batch_size": 16, "lr": 0.3, "qat": True},
        }
    )  # fmt: skip
    broker = InMemoryBroker()
    gateway = make_gateway(tmp_path, task, registry, gateway_key, data, broker, Clock())
    agents = make_agents(task, device_keys, gateway_key, data, broker)
    gateway.connect()
    gateway.start()
    for _ in range(24):
        pump(gateway, agents)
    assert gateway.finished
    accuracies = [r.accuracy for r in gateway.results]
    print(f"cnn1d federation accuracy by round: {accuracies}")
    assert accuracies[-1] >= 0.75
    final = decode_tensors(gateway.store.get_model(gateway.final_model))
    assert {k: v.shape for k, v in final.items()} == SHAPES
    int8 = accuracy(task.model_spec(), fake_quantize(final), data.x_test, data.y_test)
    assert abs(int8 - accuracies[-1]) <= 0.01
