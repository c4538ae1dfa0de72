"""Device classes: what a kind of board can afford, one TOML file each in
``firmware_configs/``.

A device class fixes the budgets an agent on that board lives within (memory, cores, the
largest model it may hold) and how it trains and talks (local epochs, batch size, update
codec). An agent refuses a task whose model does not fit its class before it downloads or
trains anything: a Pi Zero 2 W that swaps or is killed by the OOM killer mid-round helps no
one, and a clear refusal names the limit to raise or the model to shrink.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import Field, ValidationInfo, field_validator

from ._codec import CodecName
from ._config import StrictModel, load_config
from ._errors import ConfigError
from ._model import ModelSpec
from ._task import Identifier, TaskSpec

_MIB = 1 << 20


class DeviceBudgetError(ConfigError):
    """A task does not fit a device class; ``key`` names the limit exceeded.

    Carries the device class, the limit's name, what the task needs and what the class
    allows, so a caller can report or count refusals without parsing the message.
    """

    def __init__(self, message: str, *, device_class: str, limit: str, needed: int, allowed: int):
        self.device_class = device_class
        self.limit = limit
        self.needed = needed
        self.allowed = allowed
        super().__init__(message, key=limit)


class DeviceClass(StrictModel):
    """One kind of board. Field order matters: later checks read earlier fields."""

    name: Identifier = Field(
        description="The class's id; must equal the file's name without `.toml`."
    )
    description: str = Field("", description="The board, in words, for people.")
    memory_mb: Annotated[int, Field(ge=64)] = Field(
        description="RAM the board has in total, in MiB, for the operating system and"
        " everything else."
    )
    memory_budget_mb: Annotated[int, Field(ge=16)] = Field(
        description="Peak resident memory the agent may use during a training round, in MiB"
        " (at most `memory_mb`; provisioning makes it the service's `MemoryMax`)."
    )
    cpu_cores: Annotated[int, Field(ge=1, le=1024)] = Field(
        description="CPU cores the agent may keep busy (provisioning makes it the service's"
        " `CPUQuota`)."
    )
    max_model_params: Annotated[int, Field(ge=1)] = Field(
        description="Largest model the agent accepts, in parameters; a task over it is"
        " refused before anything is downloaded."
    )
    max_model_bytes: Annotated[int, Field(ge=1)] = Field(
        description="Largest float32 model payload the agent accepts, in bytes: what it"
        " downloads and holds (at most `memory_budget_mb`)."
    )
    codec: CodecName = Field(
        description="The update codec devices of this class send with (instead of the"
        " task's `codec`)."
    )
    topk_fraction: Annotated[float, Field(gt=0, le=1)] | None = Field(
        default=None,
        validate_default=True,
        description="Share of each tensor's values a `topk-*` codec keeps; required for"
        " those codecs, refused with the others.",
    )
    local_epochs: Annotated[int, Field(ge=1, le=1000)] = Field(
        description="Passes over the local data per round (instead of the task's"
        " `training.epochs`)."
    )
    batch_size: Annotated[int, Field(ge=1, le=65536)] = Field(
        description="Samples per local SGD step (instead of the task's `training.batch_size`)."
    )

    @field_validator("memory_budget_mb")
    @classmethod
    def _budget_within_memory(cls, value: int, info: ValidationInfo) -> int:
        total = info.data.get("memory_mb")
        if total is not None and value > total:
            raise ValueError(f"{value} MiB is more than the board's memory_mb ({total} MiB)")
        return value

    @field_validator("max_model_bytes")
    @classmethod
    def _model_within_budget(cls, value: int, info: ValidationInfo) -> int:
        budget = info.data.get("memory_budget_mb")
        if budget is not None and value > budget * _MIB:
            raise ValueError(
                f"{value} bytes do not fit memory_budget_mb ({budget} MiB = {budget * _MIB} bytes)"
            )
        return value

    @field_validator("topk_fraction")
    @classmethod
    def _fraction_matches_codec(cls, value: float | None, info: ValidationInfo) -> float | None:
        codec = info.data.get("codec")
        if codec is None:
            return value  # the codec itself is invalid; that error is reported
        if codec.startswith("topk-") and value is None:
            raise ValueError(f"required with codec {codec!r} (share of values kept, 0 < f <= 1)")
        if not codec.startswith("topk-") and value is not None:
            raise ValueError(f"only used by topk-* codecs, not by {codec!r}; remove it")
        return value


def load_device_class(path: str | os.PathLike[str]) -> DeviceClass:
    """Read and validate one ``firmware_configs/<name>.toml``."""
    device_class = load_config(path, DeviceClass)
    stem = Path(path).stem
    if device_class.name != stem:
        raise ConfigError(
            f"{device_class.name!r} differs from the file name {stem!r}", file=str(path), key="name"
        )
    return device_class


def f32_model_bytes(spec: ModelSpec) -> int:
    """Size of the model's float32 payload (what a global model travels as), computed from
    its shapes without building it; equals ``len(model_payload(params))``."""
    size = 2  # u16 tensor count
    for name, shape in spec.shapes().items():
        elements = 1
        for dim in shape:
            elements *= dim
        size += 1 + len(name) + 2 + 4 * len(shape) + 4 * elements
    return size


def check_task_fits(device_class: DeviceClass, task: TaskSpec) -> None:
    """Raise :class:`DeviceBudgetError` if ``task``'s model exceeds ``device_class``."""
    spec = task.model_spec()
    params = spec.n_params()
    if params > device_class.max_model_params:
        raise DeviceBudgetError(
            f"the {spec.kind} model of task {task.id!r} has {params:,} parameters; device "
            f"class {device_class.name!r} allows at most {device_class.max_model_params:,}",
            device_class=device_class.name,
            limit="max_model_params",
            needed=params,
            allowed=device_class.max_model_params,
        )
    model_bytes = f32_model_bytes(spec)
    if model_bytes > device_class.max_model_bytes:
        raise DeviceBudgetError(
            f"the {spec.kind} model of task {task.id!r} takes {model_bytes:,} bytes as float32; "
            f"device class {device_class.name!r} allows at most "
            f"{device_class.max_model_bytes:,} bytes",
            device_class=device_class.name,
            limit="max_model_bytes",
            needed=model_bytes,
            allowed=device_class.max_model_bytes,
        )
