"""The devices a gateway accepts updates from, and the keys they sign with."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedcore import IDENTIFIER, ConfigError, canonical_json, load_public_key


class DeviceRegistry:
    """Device id -> Ed25519 public key; a JSON file ``{"devices": {id: {"public_key": b64}}}``."""

    def __init__(self, keys: Mapping[str, str], *, source: str = "<memory>"):
        self._keys: dict[str, Ed25519PublicKey] = {}
        self._b64: dict[str, str] = {}
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
        devices = data.get("devices") if isinstance(data, dict) else None
        if not isinstance(devices, dict):
            raise ConfigError("expected an object of devices", file=str(path), key="devices")
        keys = {}
        for device, entry in devices.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("public_key"), str):
                raise ConfigError(
                    'expected {"public_key": base64}', file=str(path), key=f"devices.{device}"
                )
            keys[device] = entry["public_key"]
        return cls(keys, source=str(path))

    def save(self, path: str | os.PathLike[str]) -> None:
        body = {"devices": {d: {"public_key": k} for d, k in sorted(self._b64.items())}}
        Path(path).write_bytes(canonical_json(body) + b"\n")

    def fingerprint(self, device: str) -> str:
        """SHA-256 of the device's raw public key: what the ledger's registry records."""
        return hashlib.sha256(base64.b64decode(self._b64[device])).hexdigest()

    def public_key(self, device: str) -> Ed25519PublicKey | None:
        return self._keys.get(device)

    def __contains__(self, device: object) -> bool:
        return device in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._keys))

    def __len__(self) -> int:
        return len(self._keys)
