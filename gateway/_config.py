"""Gateway configuration (TOML), validated at load."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator, model_validator

from fedcore import (
    DEFAULT_MAX_MESSAGE_BYTES,
    BrokerSection,
    StrictModel,
    load_config,
    resolve_path,
)


class GatewaySection(StrictModel):
    #: The gateway's name: its MQTT client id and its subject on the ledger.
    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$")] = "gateway"
    #: The organisation (Fabric MSP id) the gateway and its devices belong to.
    org: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")] = "org1"
    #: Ed25519 private key (PEM) that signs global models and ledger blocks.
    key: Path
    #: The task spec shared with the agents.
    task: Path
    #: Registered devices and their public keys (JSON).
    registry: Path
    #: SQLite file of accepted updates, models and rounds.
    store: Path
    #: SQLite file of the embedded ledger.
    ledger: Path
    #: A Fabric connection profile (TOML): anchor rounds on a Fabric network instead of the
    #: embedded ledger. Devices and the task are then registered by an operator.
    fabric_profile: Path | None = None
    #: The organisation CA certificate (PEM): devices may sign with the key of a certificate
    #: it issued (CN = device id); without it only Ed25519 keys from the registry count.
    ca: Path | None = None
    #: The CA's revocation list (PEM), re-read when the file changes; needs ``ca``.
    crl: Path | None = None
    #: X25519 private key (PEM, ``fedledger pki x25519``) that opens payloads devices seal to
    #: this gateway.
    encryption_key: Path | None = None
    #: Refuse updates whose payload is not sealed (``not_encrypted``); needs ``encryption_key``.
    require_encryption: bool = False
    #: The secret seed (hex, ``fedledger pki dp-seed``) that draws a DP task's sampled
    #: devices; its SHA-256 is the task's ``dp.seed_sha256``. Revealed on the ledger at the end.
    dp_seed: Path | None = None
    #: Held-out data (``.npz`` with ``x`` and ``y``) to evaluate each new global model.
    evaluation: Path | None = None
    max_message_bytes: Annotated[int, Field(ge=1024, le=256 << 20)] = DEFAULT_MAX_MESSAGE_BYTES
    #: Wait up to this many seconds for every registered device to come online before round 0.
    start_wait: Annotated[float, Field(ge=0)] = 10.0
    #: Serve Prometheus metrics at ``http://metrics_host:metrics_port/metrics``; unset: not served.
    #: 0 picks a free port.
    metrics_port: Annotated[int, Field(ge=0, le=65535)] | None = None
    #: The address the metrics endpoint listens on; loopback unless a scraper needs more.
    metrics_host: str = "127.0.0.1"

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
    gateway: GatewaySection
    broker: BrokerSection = BrokerSection()


def load_gateway_config(path: str | os.PathLike[str]) -> GatewayConfig:
    return load_config(path, GatewayConfig)
