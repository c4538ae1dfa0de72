"""Model definitions shared by agents (training) and gateways (aggregation, evaluation).

Models are plain dicts of named float32 arrays so that codecs, aggregation rules and the
ledger's model hash all work on one representation. Training is NumPy only: nothing here
needs more than what a Raspberry Pi-class device carries.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np

from ._canonical import canonical_json, sha256_hex
from ._codec import encode_tensors

Params = dict[str, np.ndarray]
MODEL_KINDS = ("logreg", "mlp")


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

    def __post_init__(self) -> None:
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"model kind {self.kind!r} is not one of {MODEL_KINDS}")
        if self.n_features < 1 or self.n_classes < 2 or self.hidden < 1:
            raise ValueError("n_features >= 1, n_classes >= 2 and hidden >= 1 are required")
        for name in ("feature_mean", "feature_scale"):
            values = getattr(self, name)
            if values and len(values) != self.n_features:
                raise ValueError(f"{name} has {len(values)} values for {self.n_features} features")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> ModelSpec:
        values = dict(data)
        for name in ("feature_mean", "feature_scale"):
            values[name] = tuple(float(v) for v in values.get(name, ()))
        return cls(**values)

    def spec_hash(self) -> str:
        return sha256_hex(canonical_json(self.to_dict()))

    def shapes(self) -> dict[str, tuple[int, ...]]:
        f, c, h = self.n_features, self.n_classes, self.hidden
        if self.kind == "logreg":
            return {"w": (f, c), "b": (c,)}
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
            std = np.sqrt(2.0 / (shape[0] + shape[1]))
            params[name] = rng.normal(0.0, std, size=shape).astype(np.float32)
    return params


def model_payload(params: Mapping[str, np.ndarray]) -> bytes:
    """The float32 encoding a global model travels and is stored in."""
    return encode_tensors(params, "f32")


def model_hash(params: Mapping[str, np.ndarray]) -> str:
    """A global model's name: SHA-256 of its float32 payload."""
    return sha256_hex(model_payload(params))


def _standardize(spec: ModelSpec, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if spec.feature_mean:
        x = (x - np.asarray(spec.feature_mean, dtype=np.float32)) / np.asarray(
            spec.feature_scale, dtype=np.float32
        )
    return x


def _forward(spec: ModelSpec, params: Mapping[str, np.ndarray], x: np.ndarray):
    if spec.kind == "logreg":
        return x @ params["w"] + params["b"], None
    hidden = np.maximum(x @ params["w1"] + params["b1"], 0.0)
    return hidden @ params["w2"] + params["b2"], hidden


def predict_logits(spec: ModelSpec, params: Mapping[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    return _forward(spec, params, _standardize(spec, x))[0]


def accuracy(
    spec: ModelSpec, params: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray
) -> float:
    if len(y) == 0:
        return 0.0
    return float(np.mean(np.argmax(predict_logits(spec, params, x), axis=1) == y))


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
) -> Params:
    """Mini-batch SGD on softmax cross-entropy; returns new parameters, inputs untouched.

    ``prox_mu > 0`` adds FedProx's proximal term ``mu/2 * ||w - w_global||^2`` (Li et al.,
    2020), which keeps a device with skewed data from drifting far from the global model.
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
            logits, hidden = _forward(spec, p, xb)
            g = _softmax_grad(logits, yb).astype(np.float32)
            if spec.kind == "logreg":
                grads = {"w": xb.T @ g + l2 * p["w"], "b": g.sum(axis=0)}
            else:
                gh = (g @ p["w2"].T) * (hidden > 0)
                grads = {
                    "w2": hidden.T @ g + l2 * p["w2"],
                    "b2": g.sum(axis=0),
                    "w1": xb.T @ gh + l2 * p["w1"],
                    "b1": gh.sum(axis=0),
                }
            for name, grad in grads.items():
                if anchor is not None:
                    grad = grad + np.float32(prox_mu) * (p[name] - anchor[name])
                p[name] -= np.float32(lr) * grad.astype(np.float32)
    return p
