"""The cnn1d model: convolution against a naive reference, gradients against finite
differences, learning on the synthetic activity signals, spec and task validation, codecs."""

from __future__ import annotations

import numpy as np
import pytest

from fedcore import (
    CODECS,
    ConfigError,
    ModelSpec,
    accuracy,
    decode_tensors,
    encode_tensors,
    init_params,
    load_task,
    predict_logits,
    quantize_int8_channels,
    train,
)
from fedcore._model import _forward, _gradients, _softmax_grad
from fedledger._datasets import load_activity

SPEC = ModelSpec(
    kind="cnn1d", n_features=10 * 3, n_classes=3, window=10, channels=3, filters=4, kernel=3
)


def _conv_reference(spec: ModelSpec, params, x: np.ndarray) -> np.ndarray:
    """Loops over samples, positions and filters: slow and obviously right."""
    windows = x.reshape(len(x), spec.window, spec.channels)
    positions = spec.window - spec.kernel + 1
    pooled = np.zeros((len(x), spec.filters))
    for i in range(len(x)):
        for t in range(positions):
            for f in range(spec.filters):
                value = np.sum(windows[i, t : t + spec.kernel] * params["w1"][:, :, f])
                pooled[i, f] += max(value + params["b1"][f], 0.0) / positions
    return pooled @ params["w2"] + params["b2"]


def _random_params(spec: ModelSpec, rng) -> dict[str, np.ndarray]:
    return {k: rng.normal(size=s) for k, s in spec.shapes().items()}


def test_vectorised_convolution_matches_loops(rng):
    params = _random_params(SPEC, rng)
    x = rng.normal(size=(5, SPEC.n_features))
    logits, _ = _forward(SPEC, params, x)
    np.testing.assert_allclose(logits, _conv_reference(SPEC, params, x), rtol=1e-10)


def test_windows_may_come_three_dimensional(rng):
    params = init_params(SPEC)
    x = rng.normal(size=(4, SPEC.window, SPEC.channels)).astype(np.float32)
    np.testing.assert_array_equal(
        predict_logits(SPEC, params, x), predict_logits(SPEC, params, x.reshape(4, -1))
    )


def _loss(spec, params, x, y) -> float:
    logits, _ = _forward(spec, params, x)
    logits = logits - logits.max(axis=1, keepdims=True)
    log_prob = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float(-np.mean(log_prob[np.arange(len(y)), y]))


@pytest.mark.parametrize(
    "spec",
    [SPEC, ModelSpec(kind="mlp", n_features=6, n_classes=3, hidden=5)],
    ids=["cnn1d", "mlp"],
)
def test_gradients_match_finite_differences(spec, rng):
    """In float64: central differences of the mean cross-entropy, every parameter."""
    params = _random_params(spec, rng)
    x = rng.normal(size=(7, spec.n_features))
    y = rng.integers(0, spec.n_classes, size=7)
    logits, cache = _forward(spec, params, x)
    grads = _gradients(spec, params, x, _softmax_grad(logits, y), cache)
    eps = 1e-6
    for name, value in params.items():
        numeric = np.zeros_like(value)
        for idx in np.ndindex(value.shape):
            saved = value[idx]
            value[idx] = saved + eps
            up = _loss(spec, params, x, y)
            value[idx] = saved - eps
            down = _loss(spec, params, x, y)
            value[idx] = saved
            numeric[idx] = (up - down) / (2 * eps)
        np.testing.assert_allclose(grads[name], numeric, rtol=1e-5, atol=1e-8, err_msg=name)


@pytest.fixture(scope="module")
def activity():
    return load_activity(seed=0)


def _activity_spec(data, **more) -> ModelSpec:
    windows = data.x_train.reshape(len(data.x_train), 64, 3)
    return ModelSpec(
        kind="cnn1d",
        n_features=64 * 3,
        n_classes=data.n_classes,
        window=64,
        channels=3,
        # Per-channel statistics, repeated over the window by the model.
        feature_mean=tuple(float(v) for v in windows.mean(axis=(0, 1))),
        feature_scale=tuple(float(v) for v in windows.std(axis=(0, 1))),
        **more,
    )


def test_cnn1d_learns_the_activity_signals(activity):
    spec = _activity_spec(activity)
    params = init_params(spec)
    before = accuracy(spec, params, activity.x_test, activity.y_test)
    trained = train(
        spec, params, activity.x_train, activity.y_train, epochs=20, batch_size=16, lr=0.3, seed=0
    )
    after = accuracy(spec, trained, activity.x_test, activity.y_test)
    print(f"cnn1d on activity: {before:.3f} -> {after:.3f}")
    assert after >= 0.8 and after > before + 0.3


def test_per_channel_statistics_equal_repeated_ones(activity):
    spec = _activity_spec(activity)
    full = ModelSpec.from_dict(
        {
            **spec.to_dict(),
            "feature_mean": spec.feature_mean * 64,
            "feature_scale": spec.feature_scale * 64,
        }
    )
    params = init_params(spec)
    np.testing.assert_array_equal(
        predict_logits(spec, params, activity.x_test[:9]),
        predict_logits(full, params, activity.x_test[:9]),
    )


def test_spec_validation_names_the_field():
    base = {"kind": "cnn1d", "n_features": 12, "n_classes": 2, "window": 4, "channels": 3}
    assert ModelSpec(**base, kernel=3).shapes()["w1"] == (3, 3, 8)
    with pytest.raises(ValueError, match="^n_features 12 must be window x channels"):
        ModelSpec(**{**base, "channels": 2}, kernel=3)
    with pytest.raises(ValueError, match="^kernel 5 is longer than the window 4"):
        ModelSpec(**base, kernel=5)
    with pytest.raises(ValueError, match="^window >= 1 is required"):
        ModelSpec(kind="cnn1d", n_features=12, n_classes=2, channels=3, kernel=3)
    with pytest.raises(ValueError, match="^window only apply to kind 'cnn1d'"):
        ModelSpec(kind="logreg", n_features=12, n_classes=2, window=4)
    with pytest.raises(ValueError, match="^feature_mean has 2 values"):
        ModelSpec(**base, kernel=3, feature_mean=(0.0, 1.0), feature_scale=(1.0, 1.0))


def test_dicts_of_older_kinds_are_unchanged():
    """logreg and mlp specs hash exactly as before cnn1d (ledger records stay valid)."""
    spec = ModelSpec(kind="mlp", n_features=3, n_classes=2)
    assert set(spec.to_dict()) == {
        "kind", "n_features", "n_classes", "hidden", "feature_mean", "feature_scale", "init_seed",
    }  # fmt: skip
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    assert ModelSpec.from_dict(SPEC.to_dict()) == SPEC


@pytest.mark.parametrize(
    ("model", "key", "message"),
    [
        ("n_features = 12\nwindow = 6\nchannels = 3\n", "model.n_features", "window x channels"),
        ("n_features = 18\nwindow = 6\nchannels = 3\nkernel = 7\n", "model.kernel", "longer"),
        ("n_features = 18\nchannels = 3\n", "model.window", "required"),
        ("n_features = 18\nwindow = 6\nchannels = 3\nfilters = 0\n", "model.filters", "greater"),
    ],
)
def test_task_file_errors_name_the_key(tmp_path, model, key, message):
    path = tmp_path / "task.toml"
    path.write_text(f"id = 't'\n[model]\nkind = 'cnn1d'\nn_classes = 2\n{model}")
    with pytest.raises(ConfigError) as caught:
        load_task(path)
    assert caught.value.key == key
    assert message in str(caught.value)


def test_task_file_declares_a_cnn1d(tmp_path):
    path = tmp_path / "task.toml"
    path.write_text(
        "id = 't'\n[model]\nkind = 'cnn1d'\nn_classes = 4\nn_features = 192\nwindow = 64\n"
        "channels = 3\nfilters = 6\nkernel = 7\n[training]\nqat = true\n"
    )
    task = load_task(path)
    spec = task.model_spec()
    assert (spec.window, spec.channels, spec.filters, spec.kernel) == (64, 3, 6, 7)
    assert spec.shapes() == {"w1": (7, 3, 6), "b1": (6,), "w2": (6, 4), "b2": (4,)}
    assert task.training.qat is True


@pytest.mark.parametrize("codec", CODECS)
def test_every_codec_carries_cnn1d_tensors(codec, rng):
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in SPEC.shapes().items()}
    decoded = decode_tensors(encode_tensors(params, codec, k_fraction=0.5))
    assert {k: v.shape for k, v in decoded.items()} == SPEC.shapes()
    if not codec.startswith("topk"):
        for name, value in params.items():
            peak = float(np.max(np.abs(value)))
            tolerance = {"f32": 0.0, "int4": peak / 7}.get(codec, peak / 127)
            np.testing.assert_allclose(decoded[name], value, atol=tolerance * 0.51 + 1e-7)


def test_int8_channel_gives_each_filter_its_scale(rng):
    w1 = rng.normal(size=SPEC.shapes()["w1"]).astype(np.float32)
    w1[..., 0] *= 1e-3  # one filter of tiny weights beside normal ones
    q, scales = quantize_int8_channels(w1)
    assert scales.shape == (SPEC.filters,)
    decoded = decode_tensors(encode_tensors({"w1": w1}, "int8-channel"))["w1"]
    small = w1[..., 0]
    assert np.max(np.abs(decoded[..., 0] - small)) <= np.max(np.abs(small)) / 127 * 0.51
