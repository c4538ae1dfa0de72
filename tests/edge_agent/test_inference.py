"""Exported models (ONNX int8 QDQ, TFLite int8 weights) against the NumPy reference."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

pytest.importorskip("sklearn")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("tflite")
pytest.importorskip("ai_edge_litert")

from edge_agent._inference import InferenceError, Predictor  # noqa: E402
from fedcore import ModelSpec, accuracy, init_params, model_hash, predict_logits, train  # noqa: E402
from fedcore._export import (  # noqa: E402
    dequantized_params,
    export_model,
    export_onnx,
    export_tflite,
)
from fedledger._datasets import load_dataset  # noqa: E402

KINDS = ("logreg", "mlp")
# Runtimes that quantize activations on the fly (TFLite hybrid FULLY_CONNECTED, ONNX Runtime's
# fused int8 MatMul) stay within this fraction of the largest reference logit.
RELATIVE_TOLERANCE = 0.02


@pytest.fixture(scope="module")
def data():
    return load_dataset(seed=0)


@pytest.fixture(scope="module", params=KINDS)
def trained(request, data):
    x = data.x_train
    spec = ModelSpec(
        kind=request.param,
        n_features=x.shape[1],
        n_classes=data.n_classes,
        hidden=16,
        feature_mean=tuple(float(v) for v in x.mean(axis=0)),
        feature_scale=tuple(float(v) for v in x.std(axis=0) + 1e-6),
    )
    params = train(
        spec, init_params(spec), x, data.y_train, epochs=5, batch_size=32, lr=0.1, seed=0
    )
    return spec, params


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    spec, params = trained
    root = tmp_path_factory.mktemp(spec.kind)
    return (
        export_onnx(spec, params, root / "model.onnx"),
        export_tflite(spec, params, root / "model.tflite"),
    )


def _compare(name, got, ref, y, float_accuracy, *, atol, min_agree=0.99):
    diff = float(np.max(np.abs(got - ref)))
    agree = float(np.mean(np.argmax(got, axis=1) == np.argmax(ref, axis=1)))
    acc = float(np.mean(np.argmax(got, axis=1) == y))
    print(
        f"{name}: max|dlogit|={diff:.2e} agree={agree:.4f} acc={acc:.4f} float={float_accuracy:.4f}"
    )
    assert got.shape == ref.shape
    assert diff <= atol, f"{name}: logits differ by {diff}"
    assert agree >= min_agree
    assert abs(acc - float_accuracy) <= 0.01


@pytest.mark.parametrize(
    ("fmt", "options"),
    [
        ("onnx", {"int8_compute": False}),
        ("onnx", {"int8_compute": True}),
        ("tflite", {}),
    ],
    ids=["onnx-float", "onnx-int8", "tflite"],
)
def test_parity_with_numpy_reference(data, trained, exported, fmt, options):
    spec, params = trained
    x, y = data.x_test, data.y_test
    float_accuracy = accuracy(spec, params, x, y)
    ref = predict_logits(spec, dequantized_params(spec, params), x)
    # The int8 weights themselves cost no more than the accuracy budget.
    assert abs(accuracy(spec, dequantized_params(spec, params), x, y) - float_accuracy) <= 0.01
    predictor = Predictor(exported[0] if fmt == "onnx" else exported[1], **options)
    assert (predictor.n_features, predictor.n_classes) == (spec.n_features, spec.n_classes)
    got = predictor.logits(x)
    exact = fmt == "onnx" and not options["int8_compute"]
    atol = 1e-4 if exact else RELATIVE_TOLERANCE * float(np.max(np.abs(ref)))
    _compare(f"{spec.kind}/{fmt}/{options}", got, ref, y, float_accuracy, atol=atol)
    np.testing.assert_array_equal(predictor.predict(x), np.argmax(got, axis=1))


def test_onnx_and_litert_agree(data, exported):
    x = data.x_test
    onnx_logits = Predictor(exported[0]).logits(x)
    tflite_logits = Predictor(exported[1]).logits(x)
    scale = float(np.max(np.abs(onnx_logits)))
    assert np.max(np.abs(onnx_logits - tflite_logits)) <= 2 * RELATIVE_TOLERANCE * scale
    assert np.mean(onnx_logits.argmax(1) == tflite_logits.argmax(1)) >= 0.99


def test_per_tensor_export(data, trained, tmp_path):
    spec, params = trained
    x = data.x_test
    ref = predict_logits(spec, dequantized_params(spec, params, per_channel=False), x)
    onnx_path = export_model(spec, params, tmp_path / "m.onnx", fmt="onnx", per_channel=False)
    tfl_path = export_model(spec, params, tmp_path / "m.tflite", fmt="tflite", per_channel=False)
    np.testing.assert_allclose(
        Predictor(onnx_path, int8_compute=False).logits(x), ref, atol=1e-4, rtol=0
    )
    got = Predictor(tfl_path).logits(x)
    assert np.max(np.abs(got - ref)) <= RELATIVE_TOLERANCE * float(np.max(np.abs(ref)))


def test_onnx_graph_is_int8_qdq(trained, exported):
    spec, params = trained
    model = onnx.load(str(exported[0]))
    onnx.checker.check_model(model, full_check=True)
    ops = [node.op_type for node in model.graph.node]
    assert ops[:2] == ["Sub", "Div"]
    assert ops.count("DequantizeLinear") == (1 if spec.kind == "logreg" else 2)
    assert ("Relu" in ops) == (spec.kind == "mlp")
    weights = [t for t in model.graph.initializer if t.name.endswith("_quantized")]
    assert weights and all(t.data_type == onnx.TensorProto.INT8 for t in weights)
    props = {p.key: p.value for p in model.metadata_props}
    assert props["fedledger.model_hash"] == model_hash(params)
    assert ModelSpec.from_dict(json.loads(props["fedledger.spec"])) == spec


def test_single_row_and_empty_batches(data, exported):
    x = data.x_test
    for path in exported:
        predictor = Predictor(path)
        full = predictor.logits(x[:8])
        one = predictor.logits(x[3])
        assert one.shape == (1, predictor.n_classes)
        np.testing.assert_allclose(one[0], full[3], atol=1e-3 * max(1.0, np.abs(full).max()))
        assert predictor.predict(x[:0]).shape == (0,)
        with pytest.raises(InferenceError, match="expected inputs of shape"):
            predictor.logits(np.zeros((2, predictor.n_features + 1), np.float32))


def test_missing_runtime_is_named(exported, monkeypatch):
    monkeypatch.setitem(sys.modules, "tflite_runtime", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", None)
    with pytest.raises(InferenceError, match="tflite-runtime"):
        Predictor(exported[1], backend="tflite_runtime")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(InferenceError, match="needs onnxruntime"):
        Predictor(exported[0])


def test_bad_inputs(tmp_path, trained):
    spec, params = trained
    with pytest.raises(InferenceError, match="no model file"):
        Predictor(tmp_path / "absent.onnx")
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(InferenceError, match="cannot tell"):
        Predictor(tmp_path / "model.bin")
    with pytest.raises(ValueError, match="export format"):
        export_model(spec, params, tmp_path / "m.pt", fmt="torch")
    with pytest.raises(ValueError, match="do not match"):
        export_onnx(spec, {"w": np.zeros((1, 1), np.float32)}, tmp_path / "m.onnx")


# ---------------------------------------------------------------- cnn1d


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    """A cnn1d trained with QAT on the synthetic activity windows, exported both ways."""
    from fedledger._datasets import load_activity

    data = load_activity(seed=0)
    windows = data.x_train.reshape(len(data.x_train), 64, 3)
    spec = ModelSpec(
        kind="cnn1d",
        n_features=64 * 3,
        n_classes=data.n_classes,
        window=64,
        channels=3,
        feature_mean=tuple(float(v) for v in windows.mean(axis=(0, 1))),
        feature_scale=tuple(float(v) for v in windows.std(axis=(0, 1))),
    )
    params = train(
        spec, init_params(spec), data.x_train, data.y_train,
        epochs=20, batch_size=16, lr=0.3, seed=0, qat=True,
    )  # fmt: skip
    root = tmp_path_factory.mktemp("cnn1d")
    files = (
        export_onnx(spec, params, root / "model.onnx"),
        export_tflite(spec, params, root / "model.tflite"),
    )
    return data, spec, params, files


@pytest.mark.parametrize(
    ("fmt", "options"),
    [("onnx", {"int8_compute": False}), ("onnx", {"int8_compute": True}), ("tflite", {})],
    ids=["onnx-float", "onnx-int8", "tflite"],
)
@pytest.mark.parametrize("per_channel", [True, False], ids=["per-channel", "per-tensor"])
def test_cnn1d_parity_with_numpy_reference(cnn, tmp_path, fmt, options, per_channel):
    data, spec, params, files = cnn
    x, y = data.x_test, data.y_test
    float_accuracy = accuracy(spec, params, x, y)
    if per_channel:
        path = files[0] if fmt == "onnx" else files[1]
    else:
        path = export_model(spec, params, tmp_path / f"m.{fmt}", fmt=fmt, per_channel=False)
    ref = predict_logits(spec, dequantized_params(spec, params, per_channel=per_channel), x)
    predictor = Predictor(path, **options)
    assert (predictor.n_features, predictor.n_classes) == (spec.n_features, spec.n_classes)
    got = predictor.logits(x)
    exact = fmt == "onnx" and not options["int8_compute"]
    atol = 1e-4 if exact else RELATIVE_TOLERANCE * float(np.max(np.abs(ref)))
    # 155 held-out windows, some straddling two activities with near-tied logits: each one
    # that on-the-fly activation quantization flips costs 0.65% agreement.
    name = f"cnn1d/{fmt}/{options}/{per_channel}"
    _compare(name, got, ref, y, float_accuracy, atol=atol, min_agree=0.98)
    margin = np.diff(np.sort(ref, axis=1)[:, -2:], axis=1)[:, 0]
    clear = margin > 2 * atol  # where the tolerance cannot flip a prediction, none flips
    np.testing.assert_array_equal(got[clear].argmax(axis=1), ref[clear].argmax(axis=1))


def test_cnn1d_onnx_graph_is_an_int8_qdq_conv(cnn):
    _, spec, params, files = cnn
    model = onnx.load(str(files[0]))
    onnx.checker.check_model(model, full_check=True)
    ops = [node.op_type for node in model.graph.node]
    assert ops[:4] == ["Sub", "Div", "DequantizeLinear", "Reshape"]
    assert ops.count("DequantizeLinear") == 2 and "Conv" in ops and "ReduceMean" in ops
    weights = {t.name: t for t in model.graph.initializer if t.name.endswith("_quantized")}
    assert weights["w1_quantized"].dims == [spec.filters, spec.channels, spec.kernel]
    assert all(t.data_type == onnx.TensorProto.INT8 for t in weights.values())
    props = {p.key: p.value for p in model.metadata_props}
    assert ModelSpec.from_dict(json.loads(props["fedledger.spec"])) == spec


def test_cnn1d_single_rows_and_resized_batches(cnn):
    data, _, _, files = cnn
    x = data.x_test
    for path in files:
        predictor = Predictor(path)
        full = predictor.logits(x[:8])
        one = predictor.logits(x[5])
        np.testing.assert_allclose(one[0], full[5], atol=2e-2 * max(1.0, np.abs(full).max()))
        assert predictor.logits(x[:3]).shape == (3, predictor.n_classes)
        assert predictor.predict(x[:0]).shape == (0,)


def test_cnn1d_predictor_takes_windows_as_they_come(cnn):
    data, spec, _, files = cnn
    flat = data.x_test[:6]
    windows = flat.reshape(6, spec.window, spec.channels)
    for path in files:
        predictor = Predictor(path)
        np.testing.assert_array_equal(predictor.logits(windows), predictor.logits(flat))
