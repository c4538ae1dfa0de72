"""Gateway configuration (TOML), validated at load."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator, model_validator

from fedcore import (
    DEFAULT_MAX_MESSAGE_BYTES,
    BrokerSection,
    ServesMetrics,
    StrictModel,
    load_config,
    resolve_path,
)


class GatewaySection(ServesMetrics):
    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$")] = Field(
        "gateway",
        description="The gateway's name: its MQTT client id and its subject on the ledger.",
    )
    org: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")] = Field(
        "org1",
        description="The organisation (Fabric MSP id) the gateway and its devices belong to.",
    )
    key: Path = Field(
        description="Ed25519 private key (PEM) that signs global models and ledger blocks."
    )
    task: Path = Field(description="The task spec (`task.toml`) shared with the devices.")
    registry: Path = Field(
        description="The devices admitted and the keys they sign with (`registry.json`)."
    )
    store: Path = Field(
        description="SQLite file of accepted updates, models and rounds (created if missing;"
        " one gateway per store)."
    )
    ledger: Path = Field(description="SQLite file of the embedded ledger (created if missing).")
    fabric_profile: Path | None = Field(
        None,
        description="A Fabric connection profile (TOML): anchor rounds on a Fabric network"
        " instead of the embedded ledger; devices and the task are then registered by an"
        " operator.",
    )
    ca: Path | None = Field(
        None,
        description="The organisation CA certificate (PEM): devices may sign with the key of a"
        " certificate it issued (CN = device id); without it only Ed25519 keys from the"
        " registry count.",
    )
    crl: Path | None = Field(
        None,
        description="The CA's revocation list (PEM), read again whenever the file changes;"
        " needs `ca`.",
    )
    encryption_key: Path | None = Field(
        None,
        description="X25519 private key (PEM, `fedledger pki x25519`) that opens the payloads"
        " devices seal to this gateway.",
    )
    require_encryption: bool = Field(
        False,
        description="Refuse updates whose payload is not sealed (reason `not_encrypted`);"
        " needs `encryption_key`.",
    )
    dp_seed: Path | None = Field(
        None,
        description="The secret seed (hex, `fedledger pki dp-seed`) that draws a DP task's"
        " sampled devices; its SHA-256 is the task's `dp.seed_sha256`, and it is revealed on"
        " the ledger when the task ends.",
    )
    evaluation: Path | None = Field(
        None,
        description="Held-out data (`.npz` with `x` and `y`, or `.csv`) on which each new"
        " global model's accuracy is measured.",
    )
    max_message_bytes: Annotated[int, Field(ge=1024, le=256 << 20)] = Field(
        DEFAULT_MAX_MESSAGE_BYTES,
        description="Largest update message accepted, in bytes; a larger one is refused"
        " before it is decoded (give the broker the same limit).",
    )
    start_wait: Annotated[float, Field(ge=0)] = Field(
        10.0,
        description="Seconds to wait for every registered device to come online before"
        " round 0 opens.",
    )

    @field_validator(
        "key",
        "task",
        "registry",
        "store",
        "ledger",
        "evaluation",
        "fabric_profile",
        "ca",
        "crl",
        "encryption_key",
        "dp_seed",
        mode="before",
    )
    @classmethod
    def _relative_to_file(cls, value, info):
        return None if value is None else resolve_path(value, info)

    @model_validator(mode="after")
    def _needs(self):
        if self.crl is not None and self.ca is None:
            raise ValueError("crl needs ca (the CA that signed it)")
        if self.require_encryption and self.encryption_key is None:
            raise ValueError("require_encryption needs encryption_key")
        return self


class GatewayConfig(StrictModel):
    gateway: GatewaySection = Field(
        description="The gateway: its identity, its keys, and the files it reads and keeps."
    )
    broker: BrokerSection = Field(
        BrokerSection(), description="The MQTT broker the gateway and its devices meet at."
    )


def load_gateway_config(path: str | os.PathLike[str]) -> GatewayConfig:
    return load_config(path, GatewayConfig)
