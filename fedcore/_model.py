"""Model definitions shared by agents (training) and gateways (aggregation, evaluation).

Models are plain dicts of named float32 arrays so that codecs, aggregation rules and the
ledger's model hash all work on one representation. Training is NumPy only: nothing here
needs more than what a Raspberry Pi-class device carries.

Kinds: ``logreg`` (one dense layer), ``mlp`` (dense, ReLU, dense) and ``cnn1d`` for windows of
sensor signals: Conv1D (``filters`` x ``kernel``, stride 1, no padding), ReLU, global average
pooling over time, dense. A cnn1d input row is a window flattened row-major from
``(window, channels)``, so every model takes ``(n, n_features)`` tables and data files, the
agent's checks and the exports stay kind-agnostic. Its convolution is an im2col over a strided
view: one matrix product per batch, no Python loop over samples or positions.

Quantization-aware training (``train(..., qat=True)``) runs every forward pass on weights
fake-quantized exactly as the int8 export quantizes them (symmetric, one scale per output
unit or filter) and passes gradients straight through to the float weights (the
straight-through estimator, Bengio et al. 2013; Jacob et al. 2018), so a model trained this
way loses no accuracy when it runs as int8 on a device.

:func:`clinical_metrics` is the one exception to "NumPy only": the gateway evaluates each
global model with scikit-learn (its extra installs it), imported on the first call, so a
device, which never evaluates, neither carries nor loads it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np

from ._canonical import canonical_json, sha256_hex
from ._codec import encode_tensors, quantize_int8_channels
from ._limits import MAX_CLASS_RECALLS

Params = dict[str, np.ndarray]
MODEL_KINDS = ("logreg", "mlp", "cnn1d")
#: The fields only a cnn1d model has; left out of other kinds' dicts (and hashes), which so
#: stay what they were before cnn1d existed.
CNN_FIELDS = ("window", "channels", "filters", "kernel")
_CNN_DEFAULTS = {"window": 0, "channels": 0, "filters": 8, "kernel": 5}


@dataclass(frozen=True)
class ModelSpec:
    """What agent and gateway must agree on to exchange a model.

    ``feature_mean``/``feature_scale`` standardize inputs inside the model: they come with
    the task (computed by its owner on reference data), so no device has to share
    statistics of its own data.
    """

    kind: str
    n_features: int
    n_classes: int
    hidden: int = 16
    feature_mean: tuple[float, ...] = field(default_factory=tuple)
    feature_scale: tuple[float, ...] = field(default_factory=tuple)
    init_seed: int = 0
    window: int = 0
    channels: int = 0
    filters: int = 8
    kernel: int = 5

    def __post_init__(self) -> None:
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"model kind {self.kind!r} is not one of {MODEL_KINDS}")
        if self.n_features < 1 or self.n_classes < 2 or self.hidden < 1:
            raise ValueError("n_features >= 1, n_classes >= 2 and hidden >= 1 are required")
        if self.kind == "cnn1d":
            self._check_cnn()
        else:
            extra = [k for k in CNN_FIELDS if getattr(self, k) != _CNN_DEFAULTS[k]]
            if extra:
                raise ValueError(f"{', '.join(extra)} only apply to kind 'cnn1d'")
        allowed = {self.n_features, self.channels} if self.kind == "cnn1d" else {self.n_features}
        for name in ("feature_mean", "feature_scale"):
            values = getattr(self, name)
            if values and len(values) not in allowed:
                raise ValueError(f"{name} has {len(values)} values for {self.n_features} features")

    def _check_cnn(self) -> None:
        for name in CNN_FIELDS:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} >= 1 is required for kind 'cnn1d'")
        if self.kernel > self.window:
            raise ValueError(f"kernel {self.kernel} is longer than the window {self.window}")
        if self.n_features != self.window * self.channels:
            raise ValueError(
                f"n_features {self.n_features} must be window x channels "
                f"({self.window} x {self.channels} = {self.window * self.channels})"
            )

    def to_dict(self) -> dict:
        data = asdict(self)
        if self.kind != "cnn1d":
            for name in CNN_FIELDS:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: Mapping) -> ModelSpec:
        values = {k: v for k, v in dict(data).items() if not (k in CNN_FIELDS and v is None)}
        for name in ("feature_mean", "feature_scale"):
            values[name] = tuple(float(v) for v in values.get(name, ()))
        return cls(**values)

    def spec_hash(self) -> str:
        return sha256_hex(canonical_json(self.to_dict()))

    def shapes(self) -> dict[str, tuple[int, ...]]:
        f, c, h = self.n_features, self.n_classes, self.hidden
        if self.kind == "logreg":
            return {"w": (f, c), "b": (c,)}
        if self.kind == "cnn1d":
            k, ch, m = self.kernel, self.channels, self.filters
            # Filters last: the per-channel int8 codec and QAT give each filter its own scale.
            return {"w1": (k, ch, m), "b1": (m,), "w2": (m, c), "b2": (c,)}
        return {"w1": (f, h), "b1": (h,), "w2": (h, c), "b2": (c,)}

    def n_params(self) -> int:
        return sum(int(np.prod(s)) for s in self.shapes().values())


def init_params(spec: ModelSpec) -> Params:
    rng = np.random.default_rng(spec.init_seed)
    params: Params = {}
    for name, shape in spec.shapes().items():
        if name.startswith("b"):
            params[name] = np.zeros(shape, dtype=np.float32)
        else:
            # Glorot: fan in is every axis but the last (a cnn1d kernel's taps x channels).
            std = np.sqrt(2.0 / (int(np.prod(shape[:-1])) + shape[-1]))
            params[name] = rng.normal(0.0, std, size=shape).astype(np.float32)
    return params


def model_payload(params: Mapping[str, np.ndarray]) -> bytes:
    """The float32 encoding a global model travels and is stored in."""
    return encode_tensors(params, "f32")


def model_hash(params: Mapping[str, np.ndarray]) -> str:
    """A global model's name: SHA-256 of its float32 payload."""
    return sha256_hex(model_payload(params))


def feature_stats(spec: ModelSpec) -> tuple[np.ndarray, np.ndarray] | None:
    """``(mean, scale)`` with one value per input feature, or None without standardization.

    Per-channel statistics of a cnn1d model are repeated over its window here, so the model,
    the exports and their parity tests all standardize with the same full-length vectors.
    """
    if not spec.feature_mean:
        return None
    mean = np.asarray(spec.feature_mean, dtype=np.float32)
    scale = np.asarray(spec.feature_scale, dtype=np.float32)
    if len(mean) != spec.n_features:
        mean, scale = np.tile(mean, spec.window), np.tile(scale, spec.window)
    return mean, scale


def _standardize(spec: ModelSpec, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 3:  # (n, window, channels) windows: flatten as the model expects
        x = x.reshape(len(x), -1)
    stats = feature_stats(spec)
    if stats is not None:
        x = (x - stats[0]) / stats[1]
    return x


def fake_quantize(params: Mapping[str, np.ndarray]) -> Params:
    """Weights rounded to int8 and back, one symmetric scale per output unit or filter (the
    last axis, as the int8-channel codec and the exports quantize); biases untouched.

    This is what a device computes with once the model runs as int8.
    """
    out: Params = {}
    for name, value in params.items():
        value = np.asarray(value, dtype=np.float32)
        if name.startswith("w"):
            q, scales = quantize_int8_channels(value)
            out[name] = q.astype(np.float32) * scales
        else:
            out[name] = value
    return out


def _im2col(spec: ModelSpec, x: np.ndarray) -> np.ndarray:
    """(n, window x channels) -> (n, positions, kernel x channels): every kernel-long
    stretch of every window as one row, in the layout of ``w1`` reshaped to 2-D.

    A strided view, copied once by the reshape; positions = window - kernel + 1.
    """
    windows = x.reshape(len(x), spec.window, spec.channels)
    view = np.lib.stride_tricks.sliding_window_view(windows, spec.kernel, axis=1)
    # view: (n, positions, channels, kernel) -> (n, positions, kernel, channels)
    return view.transpose(0, 1, 3, 2).reshape(len(x), -1, spec.kernel * spec.channels)


def _forward(spec: ModelSpec, params: Mapping[str, np.ndarray], x: np.ndarray):
    """Logits and what the backward pass needs (None, hidden activations, or the cnn1d's
    im2col rows with its ReLU outputs and pooled features)."""
    if spec.kind == "logreg":
        return x @ params["w"] + params["b"], None
    if spec.kind == "cnn1d":
        cols = _im2col(spec, x)
        w1 = params["w1"].reshape(-1, spec.filters)
        conv = np.maximum(cols @ w1 + params["b1"], 0.0)
        pooled = conv.mean(axis=1)
        return pooled @ params["w2"] + params["b2"], (cols, conv, pooled)
    hidden = np.maximum(x @ params["w1"] + params["b1"], 0.0)
    return hidden @ params["w2"] + params["b2"], hidden


def _gradients(
    spec: ModelSpec, params: Mapping[str, np.ndarray], x: np.ndarray, g: np.ndarray, cache
) -> Params:
    """Gradients of the mean loss given ``g``, its gradient with respect to the logits."""
    if spec.kind == "logreg":
        return {"w": x.T @ g, "b": g.sum(axis=0)}
    if spec.kind == "cnn1d":
        cols, conv, pooled = cache
        positions = conv.shape[1]
        gp = g @ params["w2"].T
        # The average pool spreads each pooled gradient evenly over the positions.
        gc = (gp[:, None, :] / np.float32(positions)) * (conv > 0)
        gw1 = cols.reshape(-1, cols.shape[-1]).T @ gc.reshape(-1, spec.filters)
        return {
            "w2": pooled.T @ g,
            "b2": g.sum(axis=0),
            "w1": gw1.reshape(params["w1"].shape),
            "b1": gc.sum(axis=(0, 1)),
        }
    gh = (g @ params["w2"].T) * (cache > 0)
    return {"w2": cache.T @ g, "b2": g.sum(axis=0), "w1": x.T @ gh, "b1": gh.sum(axis=0)}


def predict_logits(spec: ModelSpec, params: Mapping[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    return _forward(spec, params, _standardize(spec, x))[0]


def accuracy(
    spec: ModelSpec, params: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray
) -> float:
    if len(y) == 0:
        return 0.0
    return float(np.mean(np.argmax(predict_logits(spec, params, x), axis=1) == y))


def clinical_metrics(
    spec: ModelSpec,
    params: Mapping[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    *,
    positive: int = 1,
) -> dict[str, float]:
    """What a clinician weighs beside accuracy, which hides a rare class the model misses
    (95 % accuracy when 5 % of the patients are ill and none of them is found).

    - ``balanced_accuracy``: the mean recall over the classes present in ``y``;
    - ``auc``: ROC AUC; two classes: of class 1's probability; more: the macro mean of the
      one-vs-rest AUCs of the classes present (scikit-learn's ``multi_class="ovr"`` when all
      are);
    - ``sensitivity``, ``specificity`` (two classes only): recall of the ``positive`` class
      (the condition to find; the task's ``positive_class``), of the other; ``auc`` is then
      of the positive class's probability (the same number either way);
    - ``recall_<k>``: recall of class k, for every class of a task with at most
      :data:`~fedcore.MAX_CLASS_RECALLS` classes (above, none: a round record holds at most
      ``MAX_METRICS`` numbers, and balanced accuracy still averages them all).

    A metric ``y`` cannot define is left out, never guessed: the recall (sensitivity,
    specificity) of a class absent from ``y``, and the AUC while fewer than two classes are
    present. Empty data gives ``{}``. Keys are ledger metric names.
    """
    return evaluate_model(spec, params, x, y, positive=positive)[1]


def evaluate_model(
    spec: ModelSpec,
    params: Mapping[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    *,
    positive: int = 1,
) -> tuple[float, dict[str, float]]:
    """:func:`accuracy` and :func:`clinical_metrics` from one forward pass (what the gateway
    computes as each round closes)."""
    y = np.asarray(y, dtype=np.int64)
    if len(y) == 0:
        return 0.0, {}
    logits = predict_logits(spec, params, x).astype(np.float64)
    predicted = np.argmax(logits, axis=1)
    return float(np.mean(predicted == y)), _clinical(spec, logits, predicted, y, positive)


def _clinical(
    spec: ModelSpec, logits: np.ndarray, predicted: np.ndarray, y: np.ndarray, positive: int
) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    prob = np.exp(logits - logits.max(axis=1, keepdims=True))
    prob /= prob.sum(axis=1, keepdims=True)
    present = [int(k) for k in np.unique(y)]
    # Only classes present are measured, so no recall divides by zero.
    recall = {k: float(np.mean(predicted[y == k] == k)) for k in present}
    metrics = {"balanced_accuracy": float(np.mean(list(recall.values())))}
    if len(present) >= 2:
        if spec.n_classes == 2:
            metrics["auc"] = float(roc_auc_score(y, prob[:, 1]))
        else:
            metrics["auc"] = float(np.mean([roc_auc_score(y == k, prob[:, k]) for k in present]))
    if spec.n_classes == 2:
        for name, k in (("sensitivity", positive), ("specificity", 1 - positive)):
            if k in recall:
                metrics[name] = recall[k]
    if spec.n_classes <= MAX_CLASS_RECALLS:
        metrics.update((f"recall_{k}", r) for k, r in recall.items())
    return metrics


def _softmax_grad(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    logits = logits - logits.max(axis=1, keepdims=True)
    prob = np.exp(logits)
    prob /= prob.sum(axis=1, keepdims=True)
    prob[np.arange(len(y)), y] -= 1.0
    return prob / len(y)


def train(
    spec: ModelSpec,
    params: Mapping[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    l2: float = 1e-4,
    prox_mu: float = 0.0,
    qat: bool = False,
) -> Params:
    """Mini-batch SGD on softmax cross-entropy; returns new parameters, inputs untouched.

    ``prox_mu > 0`` adds FedProx's proximal term ``mu/2 * ||w - w_global||^2`` (Li et al.,
    2020), which keeps a device with skewed data from drifting far from the global model.

    ``qat`` computes forward and backward passes with :func:`fake_quantize`-d weights and
    applies the gradients to the float weights (straight-through estimator); the L2 and
    proximal terms act on the float weights. The float weights are returned: they are what
    the federation averages, and the int8 model is quantized from them at export.
    """
    x = _standardize(spec, x)
    y = np.asarray(y, dtype=np.int64)
    p = {k: np.array(v, dtype=np.float32, copy=True) for k, v in params.items()}
    anchor = {k: np.asarray(v, dtype=np.float32) for k, v in params.items()} if prox_mu else None
    rng = np.random.default_rng(seed)
    n = len(y)
    for _ in range(epochs):
        order = rng.permutation(n)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            xb, yb = x[idx], y[idx]
            used = fake_quantize(p) if qat else p
            logits, cache = _forward(spec, used, xb)
            g = _softmax_grad(logits, yb).astype(np.float32)
            grads = _gradients(spec, used, xb, g, cache)
            for name, grad in grads.items():
                if name.startswith("w"):
                    grad = grad + l2 * p[name]
                if anchor is not None:
                    grad = grad + np.float32(prox_mu) * (p[name] - anchor[name])
                p[name] -= np.float32(lr) * grad.astype(np.float32)
    return p
