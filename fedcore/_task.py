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
from .secagg import SecAggSection

#: The aggregation rules differential privacy composes with: a (clipped, noised) sum.
DP_RULES = ("fedavg", "fedprox")

Identifier = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]


class ModelSection(StrictModel):
    kind: Literal["logreg", "mlp", "cnn1d"] = Field(
        description="The model: multinomial logistic regression, a one-hidden-layer"
        " perceptron, or a 1-D convolutional network over windows of a sensor signal."
    )
    n_features: Annotated[int, Field(ge=1)] = Field(
        description="Input width: values per sample; for cnn1d `window * channels` (a window"
        " flattened row by row)."
    )
    n_classes: Annotated[int, Field(ge=2)] = Field(description="Output classes of the model.")
    hidden: Annotated[int, Field(ge=1)] = Field(
        16, description="Hidden units of the mlp (unused by the other kinds)."
    )
    feature_mean: list[float] = Field(
        default_factory=list,
        description="Inputs are standardized inside the model as `(x - mean) / scale`: one"
        " mean per feature (for cnn1d also: one per channel); empty: no standardization.",
    )
    feature_scale: list[float] = Field(
        default_factory=list,
        description="The scale of that standardization, as many values as `feature_mean`.",
    )
    init_seed: int = Field(
        0, description="Seeds the initial model, so every party derives the same round 0."
    )
    window: Annotated[int, Field(ge=1)] | None = Field(
        None, description="cnn1d only (required there): time steps per window."
    )
    channels: Annotated[int, Field(ge=1)] | None = Field(
        None, description="cnn1d only (required there): signal channels per time step."
    )
    filters: Annotated[int, Field(ge=1, le=1024)] | None = Field(
        None, description="cnn1d only: convolution filters; unset: 8."
    )
    kernel: Annotated[int, Field(ge=1)] | None = Field(
        None,
        description="cnn1d only: length of each convolution filter in time steps, at most"
        " `window`; unset: 5.",
    )

    def spec(self) -> ModelSpec:
        return ModelSpec.from_dict(self.model_dump())


class TrainingSection(StrictModel):
    epochs: Annotated[int, Field(ge=1, le=1000)] = Field(
        5,
        description="Passes over its local data a device makes per round (a device class's"
        " `local_epochs` takes precedence).",
    )
    batch_size: Annotated[int, Field(ge=1)] = Field(
        16,
        description="Samples per local SGD step (a device class's `batch_size` takes precedence).",
    )
    lr: Annotated[float, Field(gt=0, le=10)] = Field(
        0.1, description="Learning rate of local SGD on the devices."
    )
    prox_mu: Annotated[float, Field(ge=0, le=100)] = Field(
        0.0,
        description="FedProx's proximal coefficient, pulling local training towards the"
        " global model; 0: plain local SGD, as FedAvg.",
    )
    qat: bool = Field(
        False,
        description="Quantization-aware training: forward passes on int8 fake-quantized"
        " weights (one scale per output unit or filter), so the model keeps its accuracy"
        " when run as int8.",
    )


class AsynchronousSection(StrictModel):
    """Buffered asynchronous rounds (FedBuff, Nguyen et al., 2022): a new global model every
    ``buffer`` accepted updates, whatever model each was trained from.

    Devices never wait for each other, so a slow or vanished device stalls nothing; the
    price is staleness, which the weight ``(1 + s) ** -staleness_exponent`` damps (s: how
    many models the gateway produced between the update's base and the one it is applied
    to), and which ``max_staleness`` bounds.
    """

    buffer: Annotated[int, Field(ge=1)] = Field(
        5, description="Accepted updates per new global model (FedBuff's K)."
    )
    max_staleness: Annotated[int, Field(ge=0)] = Field(
        10,
        description="Model versions an update's base may lag behind the model it is applied"
        " to; more is refused (reason `too_stale`).",
    )
    staleness_exponent: Annotated[float, Field(ge=0, le=10)] = Field(
        0.5,
        description="`a` in the staleness weight `(1 + s) ** -a` (s: versions behind); 0"
        " weighs stale updates like fresh ones.",
    )


class ColumnsSection(StrictModel):
    """How a table with a header row (``.csv``) maps to the model, so a device reads its own
    CSV as the task owner read the held-out one: features by name, in this order, whatever
    the column order of the file; labels by name, class ``i`` being ``classes[i]``."""

    label: Annotated[str, Field(min_length=1)] = Field(
        description="Name of the label column in the header row."
    )
    features: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)] = Field(
        description="Names of the feature columns, in the model's input order (as many as"
        " `model.n_features`)."
    )
    classes: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=2)] = Field(
        description="The label values, one per class: `classes[i]` is class `i` (as many as"
        " `model.n_classes`)."
    )

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
    id: Identifier = Field(
        description="The task's id: part of its MQTT topics, and its name on the ledger."
    )
    rounds: Annotated[int, Field(ge=1, le=MAX_ROUND + 1)] = Field(
        10,
        description="Federated rounds to run (with `[asynchronous]`: global model versions"
        " to produce).",
    )
    codec: Literal["f32", "int8", "int8-channel", "int4", "topk-f32", "topk-int8"] = Field(
        "int8",
        description="How devices encode their updates: float32, int8 with one scale per"
        " tensor or per output channel, int4, or the top-k largest changes as float32 or int8"
        " (a device class's `codec` takes precedence).",
    )
    quorum: Annotated[int, Field(ge=1)] | None = Field(
        None,
        description="Updates needed to close a round at its deadline; with fewer, the"
        " deadline is extended by `round_timeout`. Unset: a majority of the registered"
        " devices, so one device's update never becomes the global model on its own; set, it"
        " may not exceed the registered devices.",
    )
    round_timeout: Annotated[float, Field(gt=0)] = Field(
        30.0,
        description="Seconds a round stays open waiting for every registered device before"
        " it closes with a quorum.",
    )
    model: ModelSection = Field(
        description="The model both sides build: its kind, its shape and its initial values."
    )
    training: TrainingSection = Field(
        TrainingSection(), description="The local training recipe every device follows."
    )
    aggregation: Literal[
        "fedavg", "fedprox", "median", "trimmed_mean", "krum", "multi_krum", "bulyan",
        "geometric_median", "centered_clip",
    ] = Field(
        "fedavg",
        description="How the gateway combines a round's updates (`gateway.AGGREGATION_RULES`);"
        " the rule is recorded with the task and every round on the ledger.",
    )  # fmt: skip
    aggregation_options: dict[str, float | int | bool] = Field(
        default_factory=dict,
        description="The rule's options as an inline table, e.g. `{beta = 0.2}` for"
        " trimmed_mean, `{f = 3}` for krum, `{clip_factor = 1.0}` to clip every update to the"
        " median norm (any rule).",
    )
    server_optimizer: Literal["sgd", "fedadam", "fedyogi", "fedadagrad"] = Field(
        "sgd",
        description="The server's step with the aggregated update (Reddi et al., 2021): `sgd`"
        " with `server_lr = 1` is plain FedAvg; the adaptive ones keep moment estimates"
        " across rounds, stored by the gateway with each round.",
    )
    server_lr: Annotated[float, Field(gt=0, le=100)] | None = Field(
        None,
        description="The server learning rate; unset: 1 for sgd, 0.1 for the adaptive optimizers.",
    )
    asynchronous: AsynchronousSection | None = Field(
        None,
        description="Present: buffered asynchronous rounds (FedBuff), a new global model every"
        " `buffer` accepted updates, each round one model version; absent: synchronous rounds"
        " closed by everyone, or by the deadline with a quorum.",
    )
    columns: ColumnsSection | None = Field(
        None,
        description="Present: the devices' and the gateway's `.csv` data have a header row"
        " and are read by column name, labels mapped to classes (`fedledger init` writes it).",
    )
    dp: DPSection | None = Field(
        None,
        description="Present: client-level differential privacy (DP-FedAvg): clipped updates,"
        " Gaussian noise on their sum, optional Poisson sampling of devices, and a budget"
        " (docs/privacy.md); needs fedavg or fedprox without options, and synchronous rounds.",
    )
    secagg: SecAggSection | None = Field(
        None,
        description="Present: secure aggregation (SecAgg+): devices mask their quantized"
        " updates so the gateway learns only their sum (docs/privacy.md); needs fedavg or"
        " fedprox without options and synchronous rounds, and composes with `[dp]`.",
    )
    positive_class: Annotated[int, Field(ge=0, le=1)] | None = Field(
        None,
        description="Two-class tasks: the class the model is to find (the condition, e.g."
        " malignant), whose recall is the round's sensitivity and the other's its specificity."
        " Unset: class 1.",
    )

    @model_validator(mode="after")
    def _positive_is_binary(self):
        if self.positive_class is not None and self.model.n_classes != 2:
            raise ValueError("positive_class is for two-class tasks only")
        return self

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
    def _secagg_composes(self):
        if self.secagg is None:
            return self
        if self.aggregation not in DP_RULES or self.aggregation_options:
            raise ValueError(
                f"secagg needs aggregation {' or '.join(DP_RULES)} without aggregation_options:"
                " the gateway sees only the sum, so rules that look at each update cannot run"
            )
        if self.asynchronous is not None:
            raise ValueError("secagg runs synchronous rounds; remove [asynchronous]")
        if self.secagg.clip is None and self.dp is None:
            raise ValueError("secagg needs a clip: set secagg.clip, or a [dp] section")
        clip = self.secagg.clip
        if clip is not None and self.dp is not None and clip != self.dp.clip:
            raise ValueError("secagg.clip and dp.clip differ; set one of them")
        return self

    @property
    def secagg_clip(self) -> float:
        """The L2 norm a secure aggregation task's devices clip to."""
        assert self.secagg is not None
        if self.secagg.clip is not None:
            return self.secagg.clip
        assert self.dp is not None
        return self.dp.clip

    @property
    def secagg_range(self) -> float:
        assert self.secagg is not None
        return self.secagg.range if self.secagg.range is not None else self.secagg_clip

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
            for name in ("asynchronous", "columns", "dp", "secagg", "quorum", "positive_class")
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
        "secure_aggregation": task.secagg is not None,
        **({} if task.secagg is None else {"secagg": task.secagg.ledger_terms()}),
    }
