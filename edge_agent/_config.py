"""Agent configuration (TOML), validated at load."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator

from fedcore import BrokerSection, StrictModel, load_config, resolve_path


class SignalSection(StrictModel):
    """``agent.data`` is a sensor signal (one row per time step) that the agent cuts into
    sliding windows, streaming the file (``fedcore.load_signal_windows``)."""

    #: Per-step labels (``.npy``) of a ``.npy`` signal; a ``.csv`` signal has its label last.
    labels: Path | None = None
    #: Steps per window; unset: the task's cnn1d window (required for other model kinds).
    window: Annotated[int, Field(ge=1)] | None = None
    #: Steps between the starts of consecutive windows; unset: half a window.
    stride: Annotated[int, Field(ge=1)] | None = None
    #: A window's label: its last step's (``last``) or its most frequent one (``majority``).
    label: Literal["last", "majority"] = "last"
    #: Keep only the most recent windows, so memory does not grow with the recording.
    max_windows: Annotated[int, Field(ge=1)] | None = None

    @field_validator("labels", mode="before")
    @classmethod
    def _relative_to_file(cls, value, info):
        return None if value is None else resolve_path(value, info)


class AgentSection(StrictModel):
    #: This device's id: its MQTT client id, update topic and registry entry.
    device: str
    #: The private key (PEM) the device signs its updates with: Ed25519, or the EC P-256 key
    #: of ``certificate``.
    key: Path
    #: The device's certificate from the organisation CA (PEM, CN = ``device``): updates are
    #: then signed with its key (ECDSA) and carry it, so the gateway checks it against the CA.
    certificate: Path | None = None
    #: The task spec shared with the gateway.
    task: Path
    #: Local data: ``.npz`` with arrays ``x`` and ``y``, or ``.csv`` with the label last; with
    #: ``[agent.signal]``, a sensor signal (``.csv``, or ``.npy`` plus labels) to window.
    data: Path
    signal: SignalSection | None = None
    #: The gateway's public key (base64): global models signed by anyone else are ignored.
    gateway_public_key: str
    #: The gateway's X25519 public key (base64, ``fedledger pki x25519``): when set, update
    #: payloads are sealed to it, so the broker never sees their contents.
    gateway_encryption_key: str | None = None
    #: Where the agent keeps its update counter and last trained round across restarts.
    state: Path
    #: Leave once the gateway announces the task's final model.
    exit_on_final: bool = False
    #: The board's class (a file from ``firmware_configs/``): codec, epochs, batch size and
    #: the memory and model-size budget a task must fit.
    device_class: Path | None = None
    #: Serve Prometheus metrics at ``http://metrics_host:metrics_port/metrics``; unset: not served.
    #: 0 picks a free port.
    metrics_port: Annotated[int, Field(ge=0, le=65535)] | None = None
    #: The address the metrics endpoint listens on; loopback unless a scraper needs more.
    metrics_host: str = "127.0.0.1"
    #: While the gateway still publishes the model of the round this device last sent an
    #: update for, send that update again this often (seconds): a copy the gateway has is
    #: dropped, one it never got (lost with a broker killed before it saved) now counts.
    resend_seconds: Annotated[float, Field(gt=0)] = 30.0

    @field_validator("key", "certificate", "task", "data", "state", "device_class", mode="before")
    @classmethod
    def _relative_to_file(cls, value, info):
        return None if value is None else resolve_path(value, info)


class AgentConfig(StrictModel):
    agent: AgentSection
    broker: BrokerSection = BrokerSection()


def load_agent_config(path: str | os.PathLike[str]) -> AgentConfig:
    return load_config(path, AgentConfig)
