"""Agent configuration (TOML), validated at load."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator

from fedcore import BrokerSection, ServesMetrics, StrictModel, load_config, resolve_path


class SignalSection(StrictModel):
    """``agent.data`` is a sensor signal (one row per time step) that the agent cuts into
    sliding windows, streaming the file (``fedcore.load_signal_windows``)."""

    labels: Path | None = Field(
        None,
        description="Per-step labels (`.npy`) of a `.npy` signal; a `.csv` signal has its"
        " label in the last column.",
    )
    window: Annotated[int, Field(ge=1)] | None = Field(
        None,
        description="Time steps per window; unset: the task's cnn1d `window` (required for"
        " the other model kinds).",
    )
    stride: Annotated[int, Field(ge=1)] | None = Field(
        None,
        description="Time steps between the starts of consecutive windows; unset: half a window.",
    )
    label: Literal["last", "majority"] = Field(
        "last",
        description="A window's label: that of its last step (`last`) or its most frequent"
        " one (`majority`).",
    )
    max_windows: Annotated[int, Field(ge=1)] | None = Field(
        None,
        description="Keep only this many of the most recent windows, so memory does not grow"
        " with the recording; unset: all.",
    )

    @field_validator("labels", mode="before")
    @classmethod
    def _relative_to_file(cls, value, info):
        return None if value is None else resolve_path(value, info)


class AgentSection(ServesMetrics):
    device: str = Field(
        description="This device's id: its MQTT client id, its update topic and its entry in"
        " the gateway's registry."
    )
    key: Path = Field(
        description="The private key (PEM) the device signs its updates with: Ed25519, or the"
        " EC P-256 key of `certificate`."
    )
    certificate: Path | None = Field(
        None,
        description="The device's certificate from the organisation CA (PEM, CN = `device`):"
        " updates are then signed with its key (ECDSA) and carry it, so the gateway checks it"
        " against the CA.",
    )
    task: Path = Field(description="The task spec (`task.toml`) shared with the gateway.")
    data: Path = Field(
        description="Local data: `.npz` with arrays `x` and `y`, or `.csv` (label last, or by"
        " column name with the task's `[columns]`); with `[agent.signal]`, a sensor signal"
        " (`.csv`, or `.npy` plus labels) to cut into windows."
    )
    signal: SignalSection | None = Field(
        None,
        description="Present: `data` is a sensor signal, one row per time step, that the"
        " agent cuts into sliding windows while streaming the file.",
    )
    gateway_public_key: str = Field(
        description="The gateway's Ed25519 public key (base64): global models signed by"
        " anyone else are ignored."
    )
    gateway_encryption_key: str | None = Field(
        None,
        description="The gateway's X25519 public key (base64, `fedledger pki x25519`): when"
        " set, update payloads are sealed to it, so the broker never sees their contents.",
    )
    state: Path = Field(
        description="File where the agent keeps its update counter, last trained round and"
        " unacknowledged update across restarts."
    )
    exit_on_final: bool = Field(
        False, description="Exit once the gateway announces the task's final model."
    )
    device_class: Path | None = Field(
        None,
        description="The board's class (a file from `firmware_configs/`): codec, epochs,"
        " batch size, and the memory and model-size budget a task must fit.",
    )
    resend_seconds: Annotated[float, Field(gt=0)] = Field(
        30.0,
        description="Seconds between resends of this device's last update while the gateway"
        " still publishes that round's model: a copy it has is dropped, one it never got"
        " (lost with a broker that died) now counts.",
    )

    @field_validator("key", "certificate", "task", "data", "state", "device_class", mode="before")
    @classmethod
    def _relative_to_file(cls, value, info):
        return None if value is None else resolve_path(value, info)


class AgentConfig(StrictModel):
    agent: AgentSection = Field(
        description="The device: its identity and keys, its data, and the gateway it trusts."
    )
    broker: BrokerSection = Field(
        BrokerSection(), description="The MQTT broker the device reaches its gateway through."
    )


def load_agent_config(path: str | os.PathLike[str]) -> AgentConfig:
    return load_config(path, AgentConfig)
