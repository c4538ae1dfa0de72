"""Agent configuration (TOML), validated at load."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator

from fedcore import BrokerSection, StrictModel, load_config, resolve_path


class AgentSection(StrictModel):
    #: This device's id: its MQTT client id, update topic and registry entry.
    device: str
    #: Ed25519 private key (PEM) the device signs its updates with.
    key: Path
    #: The task spec shared with the gateway.
    task: Path
    #: Local data: ``.npz`` with arrays ``x`` and ``y``, or ``.csv`` with the label last.
    data: Path
    #: The gateway's public key (base64): global models signed by anyone else are ignored.
    gateway_public_key: str
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

    @field_validator("key", "task", "data", "state", "device_class", mode="before")
    @classmethod
    def _relative_to_file(cls, value, info):
        return None if value is None else resolve_path(value, info)


class AgentConfig(StrictModel):
    agent: AgentSection
    broker: BrokerSection = BrokerSection()


def load_agent_config(path: str | os.PathLike[str]) -> AgentConfig:
    return load_config(path, AgentConfig)
