"""Export a global model for on-device inference: ONNX (int8 QDQ) and TFLite (int8 weights).

Both exports are built from the model's NumPy parameters with schema-level helpers only (the
``onnx`` package's graph helpers; the TFLite flatbuffer schema classes of the ``tflite``
package), so no PyTorch or TensorFlow is involved. Both are optional dependencies (the
``inference`` extra) and are imported only when an export is asked for.

Weights are quantized like the int8 codecs (``quantize_int8_channels`` per output channel, or
``quantize_int8`` per tensor): symmetric, zero point 0, ``q`` in [-127, 127], one scale per
output unit or cnn1d filter, as quantization-aware training (``fedcore._model.fake_quantize``)
simulates them. Biases stay float32. A cnn1d's convolution becomes an ONNX ``Conv`` and a
TFLite ``CONV_2D`` with a 1 x kernel filter, fed the same flat window rows as NumPy.
Input standardization (``feature_mean``/``feature_scale``) is kept as explicit
``Sub``/``Div`` so that the exported graph computes exactly :func:`predict_logits` on
:func:`dequantized_params`, which is the NumPy reference an exported model is checked against.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ._codec import quantize_int8, quantize_int8_channels
from ._files import UnsafePathError, atomic_write_bytes
from ._model import ModelSpec, feature_stats, model_hash

EXPORT_FORMATS = ("onnx", "tflite")
ONNX_OPSET = 13  # per-axis DequantizeLinear; runs on onnxruntime >= 1.6
ONNX_IR_VERSION = 7  # the IR of opset 13: loadable by old onnxruntime builds on devices
INPUT_NAME = "features"
OUTPUT_NAME = "logits"


def _layers(spec: ModelSpec) -> list[tuple[str, str, bool]]:
    """(weight, bias, relu after) for each layer, in order (a cnn1d's first is its
    convolution, followed by global average pooling)."""
    if spec.kind == "logreg":
        return [("w", "b", False)]
    return [("w1", "b1", True), ("w2", "b2", False)]


def _check_params(spec: ModelSpec, params: Mapping[str, np.ndarray]) -> None:
    expected = spec.shapes()
    if set(params) != set(expected):
        raise ValueError(
            f"parameters {sorted(params)} do not match {spec.kind}: {sorted(expected)}"
        )
    for name, shape in expected.items():
        if tuple(np.shape(params[name])) != shape:
            raise ValueError(f"{name} has shape {np.shape(params[name])}, expected {shape}")


def _quantize_weight(w: np.ndarray, per_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    """int8 ``q`` of ``w``'s shape and float32 scales (one per output column or filter, the
    last axis, or one)."""
    if per_channel:
        q, scales = quantize_int8_channels(w)
        return q, np.asarray(scales, dtype=np.float32).reshape(-1)
    q, scale = quantize_int8(w)
    return q, np.asarray([scale], dtype=np.float32)


def dequantized_params(
    spec: ModelSpec, params: Mapping[str, np.ndarray], *, per_channel: bool = True
) -> dict[str, np.ndarray]:
    """The parameters an exported model effectively computes with: int8-dequantized
    weights, float32 biases. ``predict_logits(spec, dequantized_params(...), x)`` is the
    reference for an exported model's output."""
    _check_params(spec, params)
    out: dict[str, np.ndarray] = {}
    for w_name, b_name, _ in _layers(spec):
        q, scales = _quantize_weight(np.asarray(params[w_name], dtype=np.float32), per_channel)
        out[w_name] = q.astype(np.float32) * scales  # broadcasts over the output axis
        out[b_name] = np.asarray(params[b_name], dtype=np.float32).copy()
    return out


def _metadata(spec: ModelSpec, params: Mapping[str, np.ndarray], per_channel: bool) -> dict:
    return {
        "fedledger.spec": json.dumps(spec.to_dict(), sort_keys=True),
        "fedledger.model_hash": model_hash(params),
        "fedledger.quantization": "int8-per-channel" if per_channel else "int8-per-tensor",
    }


def _require(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"exporting needs the {package!r} package (pip install 'fedledger[inference]')"
        ) from exc


# ---------------------------------------------------------------- ONNX


def build_onnx(spec: ModelSpec, params: Mapping[str, np.ndarray], *, per_channel: bool = True):
    """An ``onnx.ModelProto``: [Sub, Div,] then per layer DequantizeLinear(int8 weight) ->
    MatMul -> Add [-> Relu] (a cnn1d's convolution: see :func:`_onnx_conv`). Input
    ``features`` (N, F) float32 (cnn1d: flat windows), output ``logits`` (N, C)."""
    onnx = _require("onnx", "onnx")
    from onnx import TensorProto, helper, numpy_helper

    _check_params(spec, params)
    inits = []
    nodes = []
    current = INPUT_NAME
    stats = feature_stats(spec)
    if stats is not None:
        mean, scale = stats
        inits += [numpy_helper.from_array(mean, "feature_mean")]
        inits += [numpy_helper.from_array(scale, "feature_scale")]
        nodes.append(helper.make_node("Sub", [current, "feature_mean"], ["centered"]))
        nodes.append(helper.make_node("Div", ["centered", "feature_scale"], ["standardized"]))
        current = "standardized"
    layers = _layers(spec)
    for i, (w_name, b_name, relu) in enumerate(layers):
        q, scales = _quantize_weight(np.asarray(params[w_name], dtype=np.float32), per_channel)
        conv = spec.kind == "cnn1d" and i == 0
        if conv:
            q = np.ascontiguousarray(q.transpose(2, 1, 0))  # (kernel, ch, filters) -> ONNX's
        if not per_channel:
            scales = scales.reshape(())  # per-tensor: scalar scale and zero point
        zero = np.zeros(scales.shape, dtype=np.int8)
        inits += [
            numpy_helper.from_array(q, f"{w_name}_quantized"),
            numpy_helper.from_array(scales, f"{w_name}_scale"),
            numpy_helper.from_array(zero, f"{w_name}_zero_point"),
            numpy_helper.from_array(np.asarray(params[b_name], dtype=np.float32), b_name),
        ]
        dq_attrs = ({"axis": 0 if conv else 1}) if per_channel else {}
        nodes.append(
            helper.make_node(
                "DequantizeLinear",
                [f"{w_name}_quantized", f"{w_name}_scale", f"{w_name}_zero_point"],
                [w_name],
                **dq_attrs,
            )
        )
        if conv:
            nodes += _onnx_conv(spec, current, w_name, b_name, inits)
            current = "pooled"
            continue
        nodes.append(helper.make_node("MatMul", [current, w_name], [f"{w_name}_product"]))
        last = i == len(layers) - 1
        added = OUTPUT_NAME if last else f"{b_name}_preactivation"
        nodes.append(helper.make_node("Add", [f"{w_name}_product", b_name], [added]))
        current = added
        if relu:
            nodes.append(helper.make_node("Relu", [added], [f"{w_name}_activation"]))
            current = f"{w_name}_activation"
    graph = helper.make_graph(
        nodes,
        f"fedledger_{spec.kind}",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", spec.n_features])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", spec.n_classes])],
        initializer=inits,
    )
    model = helper.make_model(
        graph,
        producer_name="fedledger",
        opset_imports=[helper.make_operatorsetid("", ONNX_OPSET)],
    )
    model.ir_version = ONNX_IR_VERSION
    helper.set_model_props(model, _metadata(spec, params, per_channel))
    onnx.checker.check_model(model, full_check=True)
    return model


def _onnx_conv(spec: ModelSpec, current: str, w_name: str, b_name: str, inits: list) -> list:
    """A cnn1d's convolution block: flat windows (N, window x channels) -> Reshape (N, window,
    channels) -> Transpose (N, channels, window) -> Conv (int8 QDQ weights, bias) -> Relu ->
    ReduceMean over time -> (N, filters), the global average pool."""
    from onnx import helper, numpy_helper

    shape = np.asarray([-1, spec.window, spec.channels], dtype=np.int64)
    inits.append(numpy_helper.from_array(shape, "window_shape"))
    return [
        helper.make_node("Reshape", [current, "window_shape"], ["windows"]),
        helper.make_node("Transpose", ["windows"], ["windows_nct"], perm=[0, 2, 1]),
        helper.make_node(
            "Conv", ["windows_nct", w_name, b_name], ["conv"], kernel_shape=[spec.kernel]
        ),
        helper.make_node("Relu", ["conv"], ["conv_activation"]),
        helper.make_node("ReduceMean", ["conv_activation"], ["pooled"], axes=[2], keepdims=0),
    ]


def export_onnx(
    spec: ModelSpec,
    params: Mapping[str, np.ndarray],
    path: str | Path,
    *,
    per_channel: bool = True,
) -> Path:
    """Write the int8 QDQ ONNX model of ``spec``/``params`` to ``path`` (checked with
    ``onnx.checker``) and return the path."""
    onnx = _require("onnx", "onnx")
    model = build_onnx(spec, params, per_channel=per_channel)
    onnx.checker.check_model(model)
    return _write_export(Path(path), model.SerializeToString(), "onnx")


# ---------------------------------------------------------------- TFLite


def _tfl(name: str):
    # The ``tflite`` package star-imports its classes over its submodules' names, so the
    # builder functions are reached through the submodules themselves.
    _require("tflite", "tflite")
    return importlib.import_module(f"tflite.{name}")


def build_tflite(
    spec: ModelSpec, params: Mapping[str, np.ndarray], *, per_channel: bool = True
) -> bytes:
    """A TFLite flatbuffer: [SUB, DIV,] then per layer a hybrid FULLY_CONNECTED (int8
    weights, float32 activations, fused RELU for the hidden layer). Input ``features``
    (N, F) float32 (batch resizable), output ``logits`` (N, C).

    A cnn1d's convolution is RESHAPE to NHWC (N, 1, window, channels), a hybrid CONV_2D with
    a 1 x kernel filter (int8, one scale per filter, fused RELU), then MEAN over time."""
    flatbuffers = _require("flatbuffers", "flatbuffers")
    t_model, t_subgraph, t_tensor = _tfl("Model"), _tfl("SubGraph"), _tfl("Tensor")
    t_buffer, t_operator, t_opcode = _tfl("Buffer"), _tfl("Operator"), _tfl("OperatorCode")
    t_quant, t_fc = _tfl("QuantizationParameters"), _tfl("FullyConnectedOptions")
    t_meta, t_conv, t_reducer = _tfl("Metadata"), _tfl("Conv2DOptions"), _tfl("ReducerOptions")
    padding = _tfl("Padding").Padding
    builtin_op = _tfl("BuiltinOperator").BuiltinOperator
    builtin_options = _tfl("BuiltinOptions").BuiltinOptions
    tensor_type = _tfl("TensorType").TensorType
    activation = _tfl("ActivationFunctionType").ActivationFunctionType
    _check_params(spec, params)

    # Plain Python description first, serialized below (flatbuffers are built bottom-up).
    buffers: list[bytes] = [b""]  # buffer 0: the empty sentinel the schema requires
    tensors: list[dict] = []
    # (opcode, inputs, outputs, options: None, ("fc" | "conv", activation) or ("mean",))
    operators: list[tuple[int, list[int], list[int], tuple | None]] = []
    opcodes: list[int] = []

    def tensor(name, shape, ttype, data=None, signature=None, quant=None) -> int:
        buffer = 0
        if data is not None:
            buffers.append(np.ascontiguousarray(data).tobytes())
            buffer = len(buffers) - 1
        tensors.append(
            {"name": name, "shape": shape, "type": ttype, "buffer": buffer, "sig": signature}
            | {"quant": quant}
        )
        return len(tensors) - 1

    def operator(op: int, inputs: list[int], outputs: list[int], options=None) -> None:
        if op not in opcodes:
            opcodes.append(op)
        operators.append((opcodes.index(op), inputs, outputs, options))

    n, f, c = 1, spec.n_features, spec.n_classes
    current = tensor(INPUT_NAME, [n, f], tensor_type.FLOAT32, signature=[-1, f])
    graph_input = current
    stats = feature_stats(spec)
    if stats is not None:
        mean = tensor("feature_mean", [f], tensor_type.FLOAT32, stats[0])
        scale = tensor("feature_scale", [f], tensor_type.FLOAT32, stats[1])
        centered = tensor("centered", [n, f], tensor_type.FLOAT32, signature=[-1, f])
        standardized = tensor("standardized", [n, f], tensor_type.FLOAT32, signature=[-1, f])
        operator(builtin_op.SUB, [current, mean], [centered])
        operator(builtin_op.DIV, [centered, scale], [standardized])
        current = standardized
    layers = _layers(spec)
    for i, (w_name, b_name, relu) in enumerate(layers):
        q, scales = _quantize_weight(np.asarray(params[w_name], dtype=np.float32), per_channel)
        if spec.kind == "cnn1d" and i == 0:
            k, ch, m = q.shape
            positions = spec.window - k + 1
            shape = tensor(
                "window_shape", [4], tensor_type.INT32, np.int32([-1, 1, spec.window, ch])
            )
            nhwc = [1, spec.window, ch]
            windows = tensor("windows", [n, *nhwc], tensor_type.FLOAT32, signature=[-1, *nhwc])
            operator(builtin_op.RESHAPE, [current, shape], [windows])
            # CONV_2D filters are OHWI: (filters, 1, kernel, channels), per-channel on axis 0.
            ohwi = np.ascontiguousarray(q.transpose(2, 0, 1)[:, None, :, :])
            weight = tensor(
                f"{w_name}_int8", list(ohwi.shape), tensor_type.INT8, ohwi, quant=(scales, 0)
            )
            bias = tensor(b_name, [m], tensor_type.FLOAT32, np.float32(params[b_name]))
            out_hwc = [1, positions, m]
            conv = tensor("conv", [n, *out_hwc], tensor_type.FLOAT32, signature=[-1, *out_hwc])
            operator(builtin_op.CONV_2D, [windows, weight, bias], [conv], ("conv", activation.RELU))
            axes = tensor("pool_axes", [2], tensor_type.INT32, np.int32([1, 2]))
            pooled = tensor("pooled", [n, m], tensor_type.FLOAT32, signature=[-1, m])
            operator(builtin_op.MEAN, [conv, axes], [pooled], ("mean",))
            current = pooled
            continue
        width = q.shape[1]
        # TFLite keeps FULLY_CONNECTED weights as (out, in); per-channel along axis 0.
        weight = tensor(
            f"{w_name}_int8",
            [width, q.shape[0]],
            tensor_type.INT8,
            np.ascontiguousarray(q.T),
            quant=(scales, 0),
        )
        bias = tensor(b_name, [width], tensor_type.FLOAT32, np.float32(params[b_name]))
        last = i == len(layers) - 1
        out_name = OUTPUT_NAME if last else f"{w_name}_activation"
        out = tensor(out_name, [n, width], tensor_type.FLOAT32, signature=[-1, width])
        act = activation.RELU if relu else activation.NONE
        operator(builtin_op.FULLY_CONNECTED, [current, weight, bias], [out], ("fc", act))
        current = out
    graph_output = current
    assert tensors[graph_output]["shape"][1] == c

    b = flatbuffers.Builder(1024)

    def int_vector(start, values, prepend="PrependInt32"):
        start(b, len(values))
        for v in reversed(values):
            getattr(b, prepend)(v)
        return b.EndVector()

    def table_vector(start, offsets):
        start(b, len(offsets))
        for off in reversed(offsets):
            b.PrependUOffsetTRelative(off)
        return b.EndVector()

    buffer_offsets = []
    for data in buffers:
        data_off = b.CreateNumpyVector(np.frombuffer(data, dtype=np.uint8)) if data else None
        t_buffer.BufferStart(b)
        if data_off is not None:
            t_buffer.BufferAddData(b, data_off)
        buffer_offsets.append(t_buffer.BufferEnd(b))

    tensor_offsets = []
    for t in tensors:
        name = b.CreateString(t["name"])
        shape = int_vector(t_tensor.TensorStartShapeVector, t["shape"])
        sig = int_vector(t_tensor.TensorStartShapeSignatureVector, t["sig"]) if t["sig"] else None
        quant = None
        if t["quant"] is not None:
            scales, axis = t["quant"]
            scale_vec = b.CreateNumpyVector(np.asarray(scales, dtype=np.float32))
            zero_vec = b.CreateNumpyVector(np.zeros(len(scales), dtype=np.int64))
            t_quant.QuantizationParametersStart(b)
            t_quant.QuantizationParametersAddScale(b, scale_vec)
            t_quant.QuantizationParametersAddZeroPoint(b, zero_vec)
            t_quant.QuantizationParametersAddQuantizedDimension(b, axis)
            quant = t_quant.QuantizationParametersEnd(b)
        t_tensor.TensorStart(b)
        t_tensor.TensorAddShape(b, shape)
        if sig is not None:
            t_tensor.TensorAddShapeSignature(b, sig)
        t_tensor.TensorAddType(b, t["type"])
        t_tensor.TensorAddBuffer(b, t["buffer"])
        t_tensor.TensorAddName(b, name)
        if quant is not None:
            t_tensor.TensorAddQuantization(b, quant)
        tensor_offsets.append(t_tensor.TensorEnd(b))

    operator_offsets = []
    for opcode_index, inputs, outputs, option in operators:
        in_vec = int_vector(t_operator.OperatorStartInputsVector, inputs)
        out_vec = int_vector(t_operator.OperatorStartOutputsVector, outputs)
        options = options_type = None
        if option is not None and option[0] == "fc":
            t_fc.FullyConnectedOptionsStart(b)
            t_fc.FullyConnectedOptionsAddFusedActivationFunction(b, option[1])
            # Quantize each row's activations with its own range (better accuracy than one
            # symmetric range per batch).
            t_fc.FullyConnectedOptionsAddAsymmetricQuantizeInputs(b, True)
            options = t_fc.FullyConnectedOptionsEnd(b)
            options_type = builtin_options.FullyConnectedOptions
        elif option is not None and option[0] == "conv":
            t_conv.Conv2DOptionsStart(b)
            t_conv.Conv2DOptionsAddPadding(b, padding.VALID)
            t_conv.Conv2DOptionsAddStrideW(b, 1)
            t_conv.Conv2DOptionsAddStrideH(b, 1)
            t_conv.Conv2DOptionsAddDilationWFactor(b, 1)
            t_conv.Conv2DOptionsAddDilationHFactor(b, 1)
            t_conv.Conv2DOptionsAddFusedActivationFunction(b, option[1])
            options = t_conv.Conv2DOptionsEnd(b)
            options_type = builtin_options.Conv2DOptions
        elif option is not None and option[0] == "mean":
            t_reducer.ReducerOptionsStart(b)
            t_reducer.ReducerOptionsAddKeepDims(b, False)
            options = t_reducer.ReducerOptionsEnd(b)
            options_type = builtin_options.ReducerOptions
        t_operator.OperatorStart(b)
        t_operator.OperatorAddOpcodeIndex(b, opcode_index)
        t_operator.OperatorAddInputs(b, in_vec)
        t_operator.OperatorAddOutputs(b, out_vec)
        if options is not None:
            t_operator.OperatorAddBuiltinOptionsType(b, options_type)
            t_operator.OperatorAddBuiltinOptions(b, options)
        operator_offsets.append(t_operator.OperatorEnd(b))

    graph_name = b.CreateString("main")
    tensors_vec = table_vector(t_subgraph.SubGraphStartTensorsVector, tensor_offsets)
    inputs_vec = int_vector(t_subgraph.SubGraphStartInputsVector, [graph_input])
    outputs_vec = int_vector(t_subgraph.SubGraphStartOutputsVector, [graph_output])
    ops_vec = table_vector(t_subgraph.SubGraphStartOperatorsVector, operator_offsets)
    t_subgraph.SubGraphStart(b)
    t_subgraph.SubGraphAddTensors(b, tensors_vec)
    t_subgraph.SubGraphAddInputs(b, inputs_vec)
    t_subgraph.SubGraphAddOutputs(b, outputs_vec)
    t_subgraph.SubGraphAddOperators(b, ops_vec)
    t_subgraph.SubGraphAddName(b, graph_name)
    subgraph = t_subgraph.SubGraphEnd(b)

    opcode_offsets = []
    for op in opcodes:
        t_opcode.OperatorCodeStart(b)
        t_opcode.OperatorCodeAddDeprecatedBuiltinCode(b, min(op, 127))
        t_opcode.OperatorCodeAddBuiltinCode(b, op)
        t_opcode.OperatorCodeAddVersion(b, 1)
        opcode_offsets.append(t_opcode.OperatorCodeEnd(b))

    # Metadata entries (spec, model hash, quantization) point at extra buffers.
    metadata_offsets = []
    first_meta_buffer = len(buffer_offsets)
    for j, (key, value) in enumerate(_metadata(spec, params, per_channel).items()):
        data_off = b.CreateNumpyVector(np.frombuffer(value.encode(), dtype=np.uint8))
        t_buffer.BufferStart(b)
        t_buffer.BufferAddData(b, data_off)
        buffer_offsets.append(t_buffer.BufferEnd(b))
        key_off = b.CreateString(key)
        t_meta.MetadataStart(b)
        t_meta.MetadataAddName(b, key_off)
        t_meta.MetadataAddBuffer(b, first_meta_buffer + j)
        metadata_offsets.append(t_meta.MetadataEnd(b))

    description = b.CreateString(_TFLITE_DESCRIPTION)
    opcodes_vec = table_vector(t_model.ModelStartOperatorCodesVector, opcode_offsets)
    subgraphs_vec = table_vector(t_model.ModelStartSubgraphsVector, [subgraph])
    buffers_vec = table_vector(t_model.ModelStartBuffersVector, buffer_offsets)
    metadata_vec = table_vector(t_model.ModelStartMetadataVector, metadata_offsets)
    t_model.ModelStart(b)
    t_model.ModelAddVersion(b, 3)
    t_model.ModelAddOperatorCodes(b, opcodes_vec)
    t_model.ModelAddSubgraphs(b, subgraphs_vec)
    t_model.ModelAddDescription(b, description)
    t_model.ModelAddBuffers(b, buffers_vec)
    t_model.ModelAddMetadata(b, metadata_vec)
    b.Finish(t_model.ModelEnd(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def export_tflite(
    spec: ModelSpec,
    params: Mapping[str, np.ndarray],
    path: str | Path,
    *,
    per_channel: bool = True,
) -> Path:
    """Write the int8-weight TFLite flatbuffer of ``spec``/``params`` to ``path``."""
    data = build_tflite(spec, params, per_channel=per_channel)
    return _write_export(Path(path), data, "tflite")


_TFLITE_DESCRIPTION = b"fedledger int8 model"


def _made_here(data: bytes, fmt: str) -> bool:
    """Whether ``data`` is a model this module exported (ONNX producer ``fedledger``; TFLite
    description ``fedledger int8 model``): only such a file is ever replaced."""
    if fmt == "onnx":
        try:
            onnx = _require("onnx", "onnx")
            return onnx.load_model_from_string(data).producer_name == "fedledger"
        except Exception:  # any parse failure means: not ours
            return False
    return data[4:8] == b"TFL3" and _TFLITE_DESCRIPTION in data


def _write_export(path: Path, data: bytes, fmt: str) -> Path:
    if path.is_dir():
        raise UnsafePathError(path, "is a folder; name the model file to write")
    if path.exists() and not _made_here(path.read_bytes(), fmt):
        raise UnsafePathError(path, f"exists and is not a {fmt} model fedledger exported")
    atomic_write_bytes(path, data)
    return path


def export_model(
    spec: ModelSpec,
    params: Mapping[str, np.ndarray],
    path: str | Path,
    *,
    fmt: str,
    per_channel: bool = True,
) -> Path:
    """Export in ``fmt`` (one of :data:`EXPORT_FORMATS`)."""
    if fmt == "onnx":
        return export_onnx(spec, params, path, per_channel=per_channel)
    if fmt == "tflite":
        return export_tflite(spec, params, path, per_channel=per_channel)
    raise ValueError(f"export format {fmt!r} is not one of {EXPORT_FORMATS}")
