"""The task spec: one file that a gateway and its agents share.

It fixes the model (so both sides interpret the same tensors), the local training recipe,
the update codec and the round policy. Its hash is recorded on the ledger with every round.
"""

from __future__ import annotations

import os
from typing import Annotated, Literal

from pydantic import Field, model_validator

from ._canonical import canonical_json, sha256_hex
from ._config import StrictModel, load_config
from ._errors import ConfigError
from ._limits import MAX_ROUND
from ._model import ModelSpec
from ._privacy import DPSection

#: The aggregation rules differential privacy composes with: a (clipped, noised) sum.
DP_RULES = ("fedavg", "fedprox")

Identifier = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]


class ModelSection(StrictModel):
    kind: Literal["logreg", "mlp", "cnn1d"]
    #: Input width; for cnn1d ``window * channels`` (a window flattened row-major).
    n_features: Annotated[int, Field(ge=1)]
    n_classes: Annotated[int, Field(ge=2)]
    #: Hidden units of the mlp (unused by the other kinds).
    hidden: Annotated[int, Field(ge=1)] = 16
    #: One value per feature (for cnn1d also: one per channel).
    feature_mean: list[float] = Field(default_factory=list)
    feature_scale: list[float] = Field(default_factory=list)
    init_seed: int = 0
    #: cnn1d only: time steps per window, signal channels, convolution filters and their
    #: length in time steps (filters default to 8, kernel to 5).
    window: Annotated[int, Field(ge=1)] | None = None
    channels: Annotated[int, Field(ge=1)] | None = None
    filters: Annotated[int, Field(ge=1, le=1024)] | None = None
    kernel: Annotated[int, Field(ge=1)] | None = None

    def spec(self) -> ModelSpec:
        return ModelSpec.from_dict(self.model_dump())


class TrainingSection(StrictModel):
    epochs: Annotated[int, Field(ge=1, le=1000)] = 5
    batch_size: Annotated[int, Field(ge=1)] = 16
    lr: Annotated[float, Field(gt=0, le=10)] = 0.1
    #: FedProx's proximal coefficient (0: plain local SGD, as FedAvg).
    prox_mu: Annotated[float, Field(ge=0, le=100)] = 0.0
    #: Quantization-aware training: forward passes on int8 fake-quantized weights (one scale
    #: per output unit or filter), so the model keeps its accuracy when run as int8.
    qat: bool = False


class AsynchronousSection(StrictModel):
    """Buffered asynchronous rounds (FedBuff, Nguyen et al., 2022): a new global model every
    ``buffer`` accepted updates, whatever model each was trained from.

    Devices never wait for each other, so a slow or vanished device stalls nothing; the
    price is staleness, which the weight ``(1 + s) ** -staleness_exponent`` damps (s: how
    many models the gateway produced between the update's base and the one it is applied
    to), and which ``max_staleness`` bounds.
    """

    #: Accepted updates per new global model (FedBuff's K).
    buffer: Annotated[int, Field(ge=1)] = 5
    #: Versions an update's base may lag behind the model it is applied to; more is refused
    #: (``too_stale``).
    max_staleness: Annotated[int, Field(ge=0)] = 10
    #: ``a`` in the staleness weight ``(1 + s) ** -a``; 0 weighs stale updates like fresh ones.
    staleness_exponent: Annotated[float, Field(ge=0, le=10)] = 0.5


class ColumnsSection(StrictModel):
    """How a table with a header row (``.csv``) maps to the model, so a device reads its own
    CSV as the task owner read the held-out one: features by name, in this order, whatever
    the column order of the file; labels by name, class ``i`` being ``classes[i]``."""

    #: The label column.
    label: Annotated[str, Field(min_length=1)]
    #: The feature columns, in the model's input order.
    features: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
    #: The label values, one per class: ``classes[i]`` is class ``i``.
    classes: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=2)]

    @model_validator(mode="after")
    def _distinct(self):
        for name in ("features", "classes"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ValueError(f"{name} lists a value twice")
        if self.label in self.features:
            raise ValueError(f"the label column {self.label!r} is also a feature")
        return self


class TaskSpec(StrictModel):
    id: Identifier
    rounds: Annotated[int, Field(ge=1, le=MAX_ROUND + 1)] = 10
    codec: Literal["f32", "int8", "int8-channel", "int4", "topk-f32", "topk-int8"] = "int8"
    #: Updates needed to close a round at its deadline; fewer and the deadline is extended.
    #: Unset: a majority of the registered fleet, so one device's update never becomes the
    #: global model on its own. Set explicitly, it may not exceed the fleet.
    quorum: Annotated[int, Field(ge=1)] | None = None
    #: Seconds a round stays open waiting for every registered device.
    round_timeout: Annotated[float, Field(gt=0)] = 30.0
    model: ModelSection
    training: TrainingSection = TrainingSection()
    #: How the gateway combines a round's updates (``gateway.AGGREGATION_RULES``); the rule is
    #: recorded with the task and every round on the ledger.
    aggregation: Literal[
        "fedavg", "fedprox", "median", "trimmed_mean", "krum", "multi_krum", "bulyan",
        "geometric_median", "centered_clip",
    ] = "fedavg"  # fmt: skip
    #: The rule's options, e.g. ``{beta = 0.2}`` for trimmed_mean, ``{f = 3}`` for krum,
    #: ``{clip_factor = 1.0}`` to clip every update to the median norm (any rule).
    aggregation_options: dict[str, float | int | bool] = Field(default_factory=dict)
    #: The server's step with the aggregated update (Reddi et al., 2021): ``sgd`` with
    #: ``server_lr = 1`` is plain FedAvg; ``fedadam``, ``fedyogi`` and ``fedadagrad`` keep
    #: moment estimates across rounds (stored by the gateway with each round).
    server_optimizer: Literal["sgd", "fedadam", "fedyogi", "fedadagrad"] = "sgd"
    #: The server learning rate; unset: 1 for sgd, 0.1 for the adaptive optimizers.
    server_lr: Annotated[float, Field(gt=0, le=100)] | None = None
    #: Present: buffered asynchronous rounds, each round one model version (``rounds`` of
    #: them); absent: synchronous rounds closed by everyone, or by the deadline with a quorum.
    asynchronous: AsynchronousSection | None = None
    #: Present: the agents' and the gateway's ``.csv`` data have a header row and are read by
    #: column name, labels mapped to classes (``fedledger init`` writes it).
    columns: ColumnsSection | None = None
    #: Present: client-level differential privacy (DP-FedAvg): clipped updates, Gaussian
    #: noise on their sum, optional Poisson sampling of devices, a budget (docs/privacy.md).
    dp: DPSection | None = None

    @model_validator(mode="after")
    def _dp_composes(self):
        if self.dp is None:
            return self
        if self.aggregation not in DP_RULES or self.aggregation_options:
            raise ValueError(
                f"dp needs aggregation {' or '.join(DP_RULES)} without aggregation_options:"
                " robust rules look at individual updates, so the noise on their sum would"
                " not bound what the model reveals"
            )
        if self.asynchronous is not None:
            raise ValueError("dp runs synchronous rounds; remove [asynchronous]")
        return self

    @model_validator(mode="after")
    def _columns_fit_model(self):
        c, m = self.columns, self.model
        if c is not None and len(c.features) != m.n_features:
            raise ValueError(f"columns.features names {len(c.features)} of {m.n_features} features")
        if c is not None and len(c.classes) != m.n_classes:
            raise ValueError(f"columns.classes names {len(c.classes)} of {m.n_classes} classes")
        return self

    def aggregation_label(self) -> str:
        """How the ledger names this task's aggregation: the rule, plus the server optimizer
        when it is not plain SGD."""
        if self.server_optimizer == "sgd" and self.server_lr in (None, 1.0):
            return self.aggregation
        return f"{self.aggregation}_{self.server_optimizer}"

    def model_spec(self) -> ModelSpec:
        return self.model.spec()

    def quorum_of(self, fleet: int) -> int:
        """The quorum for a fleet of ``fleet`` registered devices: the task's, else a
        majority of them."""
        if self.quorum is not None:
            return self.quorum
        return fleet // 2 + 1

    def spec_hash(self) -> str:
        # An absent section is left out, so synchronous tasks keep the hash they had.
        absent = {
            name
            for name in ("asynchronous", "columns", "dp", "quorum")
            if getattr(self, name) is None
        }
        exclude = absent or None
        return sha256_hex(canonical_json(self.model_dump(mode="json", exclude=exclude)))


def load_task(path: str | os.PathLike[str]) -> TaskSpec:
    task = load_config(path, TaskSpec)
    try:
        task.model_spec()
    except ValueError as exc:
        raise ConfigError(str(exc), file=str(path), key=_model_key(str(exc))) from None
    return task


def _model_key(message: str) -> str:
    """The ``model.<key>`` a spec error is about: spec errors start with the key's name."""
    for name in sorted(ModelSection.model_fields, key=len, reverse=True):
        if message.startswith(name):
            return f"model.{name}"
    return "model"


def ledger_privacy(task: TaskSpec) -> dict:
    """What ``CreateTask`` records as the task's privacy terms."""
    return {
        "dp": None if task.dp is None else task.dp.ledger_terms(),
        "secure_aggregation": False,
    }
