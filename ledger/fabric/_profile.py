"""Connection profiles: where the peer is, who the client is, which chaincode it calls.

A profile is a TOML file; relative paths resolve from the file's folder::

    [peer]
    endpoint = "peer0.org1.example.com:7051"   # the peer's Gateway service (host:port)
    tls_ca = "peer-tls-ca.pem"                  # the CA that issued the peer's TLS certificate
    server_name_override = "peer0.org1.example.com"  # optional: name in the peer's certificate
    client_cert = "client-tls.pem"              # optional, with client_key: mutual TLS
    client_key = "client-tls.key"
    # tls = false                               # plain text, for a development network only

    [identity]
    msp_id = "Org1MSP"
    cert = "msp/signcerts/cert.pem"             # the member's X.509 certificate (PEM)
    key = "msp/keystore/key.pem"                # its EC P-256 private key (PEM, unencrypted)

    [chaincode]
    channel = "mychannel"
    name = "fedledger"

    [timeouts]                                  # optional, seconds per call
    evaluate = 5.0
    endorse = 15.0
    submit = 5.0
    commit_status = 60.0
    deliver = 300.0                             # reading blocks (ledger verify)
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated

import grpc
from pydantic import Field, field_validator, model_validator

from fedcore import ConfigError, StrictModel, load_config, resolve_path

from ._client import (
    DEFAULT_COMMIT_STATUS_TIMEOUT,
    DEFAULT_DELIVER_TIMEOUT,
    DEFAULT_ENDORSE_TIMEOUT,
    DEFAULT_EVALUATE_TIMEOUT,
    DEFAULT_SUBMIT_TIMEOUT,
    FabricClient,
)
from ._identity import check_key_pair, ecdsa_signer, load_identity, load_private_key, read_pem_file

#: Fabric blocks and transactions outgrow gRPC's 4 MiB default; peers allow 100 MiB.
MAX_MESSAGE_BYTES = 100 * 1024 * 1024
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)

_ENDPOINT = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):[0-9]{1,5}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,248}")

Timeout = Annotated[float, Field(gt=0, le=3600)]


class PeerSection(StrictModel):
    endpoint: str = Field(
        description="The peer's Gateway service, `host:port` (`[v6]:port` for an IPv6 address)."
    )
    tls: bool = Field(
        True,
        description="Talk TLS to the peer; `false` (plain text) suits a development network"
        " only, and allows none of the keys below.",
    )
    tls_ca: Path | None = Field(
        None,
        description="The CA certificate (PEM) that issued the peer's TLS certificate;"
        " required with TLS.",
    )
    server_name_override: str | None = Field(
        None,
        description="The host name the peer's TLS certificate names, when `endpoint`'s host"
        " differs (an address, a tunnel).",
    )
    client_cert: Path | None = Field(
        None,
        description="This client's TLS certificate (PEM), for a peer that asks for mutual TLS;"
        " goes with `client_key`.",
    )
    client_key: Path | None = Field(
        None, description="The private key (PEM, unencrypted) of `client_cert`."
    )

    @field_validator("tls_ca", "client_cert", "client_key", mode="before")
    @classmethod
    def _relative_to_file(cls, value, info):
        return None if value is None else resolve_path(value, info)

    @field_validator("endpoint")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if not _ENDPOINT.fullmatch(value) or not 0 < int(value.rsplit(":", 1)[1]) < 65536:
            raise ValueError(f"{value!r} is not host:port")
        return value

    @model_validator(mode="after")
    def _tls_settings(self) -> PeerSection:
        tls_files = ("tls_ca", "server_name_override", "client_cert", "client_key")
        if not self.tls:
            given = [name for name in tls_files if getattr(self, name) is not None]
            if given:
                raise ValueError(f"tls = false, yet {', '.join(given)} set")
        elif self.tls_ca is None:
            raise ValueError("tls_ca is required with TLS (or set tls = false explicitly)")
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("mutual TLS needs both client_cert and client_key")
        return self


class IdentitySection(StrictModel):
    msp_id: Annotated[str, Field(min_length=1, max_length=250)] = Field(
        description="The MSP id of the member's organisation on the channel, e.g. `Org1MSP`."
    )
    cert: Path = Field(
        description="The member's enrolment certificate (PEM, X.509); a gateway's carries the"
        " attribute `fedledger.role=gateway`."
    )
    key: Path = Field(
        description="The EC P-256 private key (PEM, unencrypted) of `cert`, which signs every"
        " proposal and transaction."
    )

    @field_validator("cert", "key", mode="before")
    @classmethod
    def _relative_to_file(cls, value, info):
        return resolve_path(value, info)


class ChaincodeSection(StrictModel):
    channel: str = Field(description="The channel the fedledger chaincode is deployed on.")
    name: str = Field(description="The name the fedledger chaincode was committed under.")

    @field_validator("channel", "name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.fullmatch(value):
            raise ValueError(f"{value!r} is not a channel or chaincode name")
        return value


class TimeoutsSection(StrictModel):
    evaluate: Timeout = Field(
        DEFAULT_EVALUATE_TIMEOUT, description="Seconds a read-only query (evaluate) may take."
    )
    endorse: Timeout = Field(
        DEFAULT_ENDORSE_TIMEOUT,
        description="Seconds the peers may take to endorse a transaction proposal.",
    )
    submit: Timeout = Field(
        DEFAULT_SUBMIT_TIMEOUT,
        description="Seconds handing an endorsed transaction to the orderer may take.",
    )
    commit_status: Timeout = Field(
        DEFAULT_COMMIT_STATUS_TIMEOUT,
        description="Seconds to wait for a submitted transaction to be committed in a block.",
    )
    deliver: Timeout = Field(
        DEFAULT_DELIVER_TIMEOUT,
        description="Seconds the whole stream of blocks may take when reading the chain"
        " (`fedledger ledger verify --fabric-profile`).",
    )


class ConnectionProfile(StrictModel):
    peer: PeerSection = Field(description="The peer the client connects to, and how.")
    identity: IdentitySection = Field(
        description="Who the client is on the channel: an enrolled member of an organisation."
    )
    chaincode: ChaincodeSection = Field(description="Which chaincode, on which channel, to call.")
    timeouts: TimeoutsSection = Field(
        TimeoutsSection(), description="How long each kind of call to the network may take."
    )


def load_profile(path: str | os.PathLike[str]) -> ConnectionProfile:
    return load_config(path, ConnectionProfile)


def open_channel(peer: PeerSection) -> grpc.Channel:
    """A gRPC channel to the peer: TLS unless the profile says ``tls = false``."""
    options = list(CHANNEL_OPTIONS)
    if not peer.tls:
        return grpc.insecure_channel(peer.endpoint, options=options)
    assert peer.tls_ca is not None  # the model guarantees it
    root = read_pem_file(peer.tls_ca, "TLS CA certificate")
    cert = key = None
    if peer.client_cert is not None and peer.client_key is not None:
        cert = read_pem_file(peer.client_cert, "TLS client certificate")
        key = read_pem_file(peer.client_key, "TLS client key")
    if peer.server_name_override:
        options.append(("grpc.ssl_target_name_override", peer.server_name_override))
        options.append(("grpc.default_authority", peer.server_name_override))
    credentials = grpc.ssl_channel_credentials(
        root_certificates=root, private_key=key, certificate_chain=cert
    )
    return grpc.secure_channel(peer.endpoint, credentials, options=options)


def connect(profile: ConnectionProfile | str | os.PathLike[str]) -> FabricClient:
    """A :class:`FabricClient` for ``profile`` (or the profile file at that path).

    The client owns the channel: close the client (or use it in ``with``) to close it.
    """
    if not isinstance(profile, ConnectionProfile):
        profile = load_profile(profile)
    who = profile.identity
    identity = load_identity(who.msp_id, who.cert)
    key = load_private_key(who.key)
    try:
        check_key_pair(identity, key)
    except ValueError as exc:
        raise ConfigError(str(exc), file=str(who.key)) from None
    channel = open_channel(profile.peer)
    client = FabricClient(
        channel,
        identity,
        ecdsa_signer(key),
        profile.chaincode.channel,
        profile.chaincode.name,
        evaluate_timeout=profile.timeouts.evaluate,
        endorse_timeout=profile.timeouts.endorse,
        submit_timeout=profile.timeouts.submit,
        commit_status_timeout=profile.timeouts.commit_status,
        deliver_timeout=profile.timeouts.deliver,
    )
    client._owns_channel = True
    return client
