"""Quantization-aware training: the fake quantizer is the export's, gradients pass straight
through to the float weights, and the int8 model keeps the float model's accuracy."""

from __future__ import annotations

import numpy as np
import pytest

from fedcore import ModelSpec, accuracy, fake_quantize, init_params, train
from fedcore._export import dequantized_params
from fedcore._model import _forward, _gradients, _softmax_grad, _standardize
from fedledger._datasets import load_activity, load_dataset

SPECS = {
    "logreg": ModelSpec(kind="logreg", n_features=6, n_classes=3),
    "mlp": ModelSpec(kind="mlp", n_features=6, n_classes=3, hidden=5),
    "cnn1d": ModelSpec(
        kind="cnn1d", n_features=12, n_classes=3, window=6, channels=2, filters=4, kernel=3
    ),
}


@pytest.mark.parametrize("kind", SPECS)
def test_fake_quantization_is_what_the_export_computes_with(kind, rng):
    spec = SPECS[kind]
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in spec.shapes().items()}
    fake = fake_quantize(params)
    exported = dequantized_params(spec, params, per_channel=True)
    for name in params:
        np.testing.assert_array_equal(fake[name], exported[name], err_msg=name)
    # One scale per output unit or filter: at most 255 levels per column, biases untouched.
    for name, value in fake.items():
        if name.startswith("w"):
            columns = value.reshape(-1, value.shape[-1])
            assert all(len(np.unique(c)) <= 255 for c in columns.T)
        else:
            np.testing.assert_array_equal(value, params[name])
    again = fake_quantize(fake)
    for name in fake:
        np.testing.assert_allclose(again[name], fake[name], rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", SPECS)
def test_gradients_pass_straight_through_to_float_weights(kind, rng):
    """One QAT step: gradients taken at the quantized weights, applied to the float ones."""
    spec = SPECS[kind]
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in spec.shapes().items()}
    x = rng.normal(size=(8, spec.n_features)).astype(np.float32)
    y = rng.integers(0, spec.n_classes, size=8)
    got = train(spec, params, x, y, epochs=1, batch_size=8, lr=0.1, seed=0, l2=0.0, qat=True)
    order = np.random.default_rng(0).permutation(8)
    xb, yb = _standardize(spec, x)[order], y[order]
    fake = fake_quantize(params)
    logits, cache = _forward(spec, fake, xb)
    grads = _gradients(spec, fake, xb, _softmax_grad(logits, yb).astype(np.float32), cache)
    for name, value in params.items():
        np.testing.assert_allclose(got[name], value - 0.1 * grads[name], rtol=1e-5, atol=1e-6)
    plain = train(spec, params, x, y, epochs=1, batch_size=8, lr=0.1, seed=0, l2=0.0)
    assert any(not np.allclose(plain[k], got[k], rtol=0, atol=1e-7) for k in params)


def _spec_for(kind: str, data) -> ModelSpec:
    x = data.x_train
    if kind == "cnn1d":
        windows = x.reshape(len(x), 64, 3)
        mean, scale = windows.mean(axis=(0, 1)), windows.std(axis=(0, 1))
        shape = {"window": 64, "channels": 3}
    else:
        mean, scale, shape = x.mean(axis=0), x.std(axis=0) + 1e-6, {}
    return ModelSpec(
        kind=kind,
        n_features=x.shape[1],
        n_classes=data.n_classes,
        feature_mean=tuple(float(v) for v in mean),
        feature_scale=tuple(float(v) for v in scale),
        **shape,
    )


@pytest.mark.parametrize(
    ("dataset", "kind", "epochs", "lr"),
    [
        ("breast_cancer", "logreg", 10, 0.1),
        ("breast_cancer", "mlp", 10, 0.1),
        ("digits", "mlp", 10, 0.1),
        ("activity", "cnn1d", 20, 0.3),
    ],
)
def test_int8_model_keeps_the_float_accuracy(dataset, kind, epochs, lr):
    data = load_activity(seed=0) if dataset == "activity" else load_dataset(dataset, seed=0)
    spec = _spec_for(kind, data)
    figures = {}
    for qat in (False, True):
        params = train(
            spec, init_params(spec), data.x_train, data.y_train,
            epochs=epochs, batch_size=16, lr=lr, seed=0, qat=qat,
        )  # fmt: skip
        float_acc = accuracy(spec, params, data.x_test, data.y_test)
        int8_acc = accuracy(spec, fake_quantize(params), data.x_test, data.y_test)
        figures[qat] = (float_acc, int8_acc)
    print(f"{dataset}/{kind} (float, int8): plain {figures[False]}, qat {figures[True]}")
    float_acc, int8_acc = figures[True]
    assert abs(float_acc - int8_acc) <= 0.01
    assert int8_acc >= figures[False][0] - 0.02  # QAT costs the float recipe nothing real
