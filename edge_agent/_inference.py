"""On-device inference: serve predictions from an exported global model.

An ``.onnx`` file (see ``fedcore._export.export_onnx``) runs on ONNX Runtime's CPU provider; a
``.tflite`` file (``fedcore._export.export_tflite``) runs on LiteRT (``ai-edge-litert``) or, when
that is what a device has, on ``tflite_runtime``. The runtimes are optional (the ``inference``
extra) and imported only when a model of theirs is loaded.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np

BACKENDS = ("onnxruntime", "litert", "tflite_runtime")

# Where each TFLite runtime keeps its Interpreter, in order of preference. tflite-runtime
# 2.14 (its last release) was built against NumPy 1.x; LiteRT is its successor.
_TFLITE_INTERPRETERS = (
    ("litert", "ai_edge_litert.interpreter", "ai-edge-litert"),
    ("tflite_runtime", "tflite_runtime.interpreter", "tflite-runtime"),
)


class InferenceError(RuntimeError):
    """A model cannot be loaded or run (missing runtime, wrong input)."""


def _import_interpreter(backend: str | None):
    candidates = [c for c in _TFLITE_INTERPRETERS if backend in (None, c[0])]
    tried = []
    for name, module, package in candidates:
        try:
            return name, importlib.import_module(module).Interpreter
        except ImportError:
            tried.append(package)
    raise InferenceError(
        f"running a .tflite model needs {' or '.join(tried)} "
        "(pip install ai-edge-litert, or pip install 'fedledger[inference]')"
    )


class Predictor:
    """Serve ``logits(x)`` and ``predict(x)`` (class ids) from an exported model file.

    ``backend`` is chosen from the file suffix unless given: ``onnxruntime`` for ``.onnx``;
    ``litert`` (falling back to ``tflite_runtime``) for ``.tflite``.

    ``int8_compute`` (ONNX Runtime only): with True (the default) ONNX Runtime may fuse the
    int8 weights into integer matrix products that quantize activations on the fly (faster on
    ARM, within the quantization tolerance); with False it computes in float32 on the
    dequantized weights, which matches the NumPy reference to rounding.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        backend: str | None = None,
        num_threads: int | None = 1,
        int8_compute: bool = True,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise InferenceError(f"no model file at {self.path}")
        suffix = self.path.suffix.lower()
        if backend is None:
            if suffix == ".onnx":
                backend = "onnxruntime"
            elif suffix == ".tflite":
                backend = None  # LiteRT, else tflite_runtime
            else:
                raise InferenceError(f"cannot tell the model format of {self.path.name}")
        elif backend not in BACKENDS:
            raise InferenceError(f"backend {backend!r} is not one of {BACKENDS}")
        if backend == "onnxruntime":
            self._init_onnx(num_threads, int8_compute)
        else:
            self._init_tflite(backend, num_threads)

    # ------------------------------------------------------------ backends

    def _init_onnx(self, num_threads: int | None, int8_compute: bool) -> None:
        try:
            ort = importlib.import_module("onnxruntime")
        except ImportError as exc:
            raise InferenceError(
                "running an .onnx model needs onnxruntime "
                "(pip install onnxruntime, or pip install 'fedledger[inference]')"
            ) from exc
        options = ort.SessionOptions()
        if num_threads:
            options.intra_op_num_threads = num_threads
            options.inter_op_num_threads = 1
        if not int8_compute:
            # Keep fused int8-weight MatMuls computing in float32 (accuracy level 1).
            options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
        try:
            session = ort.InferenceSession(
                str(self.path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise InferenceError(f"cannot load {self.path}: {exc}") from exc
        (inp,) = session.get_inputs()
        self.backend = "onnxruntime"
        self.n_features = int(inp.shape[-1])
        self.n_classes = int(session.get_outputs()[0].shape[-1])
        self._session = session
        self._input_name = inp.name

    def _init_tflite(self, backend: str | None, num_threads: int | None) -> None:
        name, interpreter_cls = _import_interpreter(backend)
        try:
            interpreter = interpreter_cls(model_path=str(self.path), num_threads=num_threads)
            interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise InferenceError(f"cannot load {self.path}: {exc}") from exc
        (inp,) = interpreter.get_input_details()
        (out,) = interpreter.get_output_details()
        self.backend = name
        self.n_features = int(inp["shape"][-1])
        self.n_classes = int(out["shape"][-1])
        self._interpreter = interpreter
        self._input_index = inp["index"]
        self._output_index = out["index"]
        self._batch = int(inp["shape"][0])

    # ------------------------------------------------------------ serving

    def _as_batch(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == 1:
            x = x[None, :]
        elif x.ndim == 3:  # cnn1d windows (n, window, channels): the model reads them flat
            x = x.reshape(len(x), -1)
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise InferenceError(
                f"expected inputs of shape (n, {self.n_features}), got {np.shape(x)}"
            )
        return np.ascontiguousarray(x)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Logits (n, n_classes) for inputs ``x`` (n, n_features) or one row (n_features,);
        a cnn1d model also takes windows (n, window, channels)."""
        x = self._as_batch(x)
        if self.backend == "onnxruntime":
            return np.asarray(self._session.run(None, {self._input_name: x})[0])
        if len(x) == 0:
            return np.zeros((0, self.n_classes), dtype=np.float32)
        interpreter = self._interpreter
        if len(x) != self._batch:
            interpreter.resize_tensor_input(self._input_index, list(x.shape), strict=True)
            interpreter.allocate_tensors()
            self._batch = len(x)
        interpreter.set_tensor(self._input_index, x)
        interpreter.invoke()
        return interpreter.get_tensor(self._output_index).copy()

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class ids (n,) for inputs ``x``."""
        return np.argmax(self.logits(x), axis=1).astype(np.int64)

    def __repr__(self) -> str:
        return f"Predictor({str(self.path)!r}, backend={self.backend!r})"
