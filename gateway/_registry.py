"""The devices a gateway accepts updates from, and the keys they sign with.

A device signs either with an Ed25519 key listed here, or with the key of a certificate
from the organisation CA (``{"certificate_sha256": hex}``: the fingerprint of the certificate
it was admitted with). Certificate devices are vouched for by the CA, so their entry only
says they belong to the fleet; a device with no ``public_key`` may not sign with Ed25519.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import Field, model_validator

from fedcore import (
    IDENTIFIER,
    ConfigError,
    StrictModel,
    atomic_write_bytes,
    canonical_json,
    load_public_key,
    validate_config,
)

_SHA256_HEX = r"^[0-9a-f]{64}$"


class RegistryEntry(StrictModel):
    """One device of ``registry.json``: the key it signs with, the certificate it was
    admitted with, or both."""

    public_key: str | None = Field(
        None,
        description="The device's Ed25519 public key (base64 of its 32 raw bytes,"
        " `fedledger pki signing-key`): updates signed with it are the device's.",
    )
    certificate_sha256: Annotated[str, Field(pattern=_SHA256_HEX)] | None = Field(
        None,
        description="SHA-256 (hex) of the DER certificate the device was admitted with (what"
        " the ledger registers): it signs with the key of a certificate from the organisation"
        " CA (the gateway's `ca`), a rotated one included.",
    )

    @model_validator(mode="after")
    def _one_at_least(self):
        if self.public_key is None and self.certificate_sha256 is None:
            raise ValueError('expected {"public_key": base64} and/or {"certificate_sha256": hex}')
        return self


class RegistryFile(StrictModel):
    """What ``registry.json`` holds; :meth:`DeviceRegistry.load` reads it through this model,
    so its errors name the file and the key like those of the TOML files."""

    devices: dict[
        Annotated[str, Field(pattern=IDENTIFIER.pattern, title="device id")], RegistryEntry
    ] = Field(
        description="The devices the gateway accepts updates from, each under the `device`"
        " of its `agent.toml`; `fedledger device add` adds one to a site."
    )


class DeviceRegistry:
    """Device id -> Ed25519 public key; a JSON file ``{"devices": {id: {"public_key": b64}}}``.

    ``certificates`` (device id -> SHA-256 hex of its DER certificate) admits devices that
    sign with their certificate key.
    """

    def __init__(
        self,
        keys: Mapping[str, str],
        *,
        certificates: Mapping[str, str] | None = None,
        source: str = "<memory>",
    ):
        self._keys: dict[str, Ed25519PublicKey] = {}
        self._b64: dict[str, str] = {}
        self._certificates: dict[str, str] = {}
        for device, fingerprint in (certificates or {}).items():
            key = f"devices.{device}.certificate_sha256"
            if not isinstance(device, str) or not IDENTIFIER.fullmatch(device):
                raise ConfigError("device id is not a valid identifier", file=source, key=key)
            if (
                not isinstance(fingerprint, str)
                or len(fingerprint) != 64
                or not set(fingerprint) <= set("0123456789abcdef")
            ):
                raise ConfigError("expected a SHA-256 hex digest", file=source, key=key)
            self._certificates[device] = fingerprint
        for device, b64 in keys.items():
            key = f"devices.{device}.public_key"
            if not isinstance(device, str) or not IDENTIFIER.fullmatch(device):
                raise ConfigError("device id is not a valid identifier", file=source, key=key)
            try:
                self._keys[device] = load_public_key(b64)
            except (ValueError, TypeError) as exc:
                raise ConfigError(str(exc), file=source, key=key) from None
            self._b64[device] = b64

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> DeviceRegistry:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError("file not found", file=str(path)) from None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ConfigError(f"not a readable JSON file: {exc}", file=str(path)) from None
        devices = validate_config(data, RegistryFile, file=str(path)).devices
        keys = {d: e.public_key for d, e in devices.items() if e.public_key is not None}
        certificates = {
            d: e.certificate_sha256 for d, e in devices.items() if e.certificate_sha256 is not None
        }
        return cls(keys, certificates=certificates, source=str(path))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the registry atomically: a gateway reading it sees the old file or the new."""
        body: dict[str, dict[str, str]] = {}
        for device, b64 in self._b64.items():
            body.setdefault(device, {})["public_key"] = b64
        for device, fingerprint in self._certificates.items():
            body.setdefault(device, {})["certificate_sha256"] = fingerprint
        atomic_write_bytes(path, canonical_json({"devices": body}) + b"\n")

    def with_device(
        self,
        device: str,
        *,
        public_key: str | None = None,
        certificate_sha256: str | None = None,
    ) -> DeviceRegistry:
        """A new registry with ``device`` added (an Ed25519 key, a certificate, or both);
        a device already listed is a :class:`ConfigError`, never replaced."""
        if device in self:
            raise ConfigError(f"device {device} is already registered", key=f"devices.{device}")
        if public_key is None and certificate_sha256 is None:
            raise ValueError("give public_key or certificate_sha256")
        keys = dict(self._b64)
        certificates = dict(self._certificates)
        if public_key is not None:
            keys[device] = public_key
        if certificate_sha256 is not None:
            certificates[device] = certificate_sha256
        return DeviceRegistry(keys, certificates=certificates)

    def fingerprint(self, device: str) -> str:
        """What the ledger's registry records: SHA-256 of the device's raw public key, or of
        the certificate it was admitted with when it has no Ed25519 key."""
        if device not in self._b64:
            return self._certificates[device]
        return hashlib.sha256(base64.b64decode(self._b64[device])).hexdigest()

    def public_key(self, device: str) -> Ed25519PublicKey | None:
        return self._keys.get(device)

    def __contains__(self, device: object) -> bool:
        return device in self._keys or device in self._certificates

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._keys.keys() | self._certificates.keys()))

    def __len__(self) -> int:
        return len(self._keys.keys() | self._certificates.keys())
