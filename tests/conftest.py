"""Shared fixtures: keys, a small task, data, and a real Mosquitto on a free loopback port."""

from __future__ import annotations

import numpy as np
import pytest

from fedcore import TaskSpec, generate_key, public_key_b64, signer_from_key
from fedcore.mosquitto import MosquittoBroker, find_mosquitto
from fedledger._datasets import load_dataset


@pytest.fixture(scope="session")
def dataset():
    return load_dataset(seed=0)


@pytest.fixture(scope="session")
def task(dataset) -> TaskSpec:
    mean = dataset.x_test.mean(axis=0)
    scale = dataset.x_test.std(axis=0) + 1e-6
    return TaskSpec.model_validate(
        {
            "id": "test-task",
            "rounds": 3,
            "round_timeout": 20.0,
            "model": {
                "kind": "logreg",
                "n_features": 30,
                "n_classes": 2,
                "feature_mean": [float(v) for v in mean],
                "feature_scale": [float(v) for v in scale],
            },
            "training": {"epochs": 2, "batch_size": 16, "lr": 0.1},
        }
    )


@pytest.fixture
def gateway_key():
    return generate_key()


@pytest.fixture
def device_keys():
    return {f"dev-{i}": generate_key() for i in range(5)}


@pytest.fixture
def registry(device_keys):
    from gateway import DeviceRegistry

    return DeviceRegistry({d: public_key_b64(k) for d, k in device_keys.items()})


@pytest.fixture
def signer(gateway_key):
    return signer_from_key(gateway_key)


@pytest.fixture(scope="session")
def mosquitto():
    """A real broker for the whole session; each test uses its own task id or client ids."""
    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed: run the tests through 'make test'")
    with MosquittoBroker() as broker:
        yield broker


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
