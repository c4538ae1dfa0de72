"""Identities and signatures (Ed25519 through ``cryptography``).

A signer is any callable ``message -> signature``: a software key here, an HSM or an
offline signer elsewhere. Verification always takes the expected public key explicitly.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Callable
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ._errors import ConfigError, SignatureError

Signer = Callable[[bytes], bytes]
SIGNATURE_BYTES = 64


def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def save_private_key(key: Ed25519PrivateKey, path: str | os.PathLike[str]) -> None:
    """Write ``key`` as PKCS#8 PEM, readable by its owner only (0600 from creation on)."""
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    os.chmod(path, 0o600)


def read_pem_private_key(path: str | os.PathLike[str], accepts, kind: str):
    """An unencrypted PEM private key for which ``accepts(key)`` holds; every failure is a
    ConfigError naming the file (unreadable, not PEM, or not a ``kind`` key)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read private key: {exc.strerror}", file=str(path)) from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ConfigError("not an unencrypted PEM private key", file=str(path)) from None
    if not accepts(key):
        raise ConfigError(f"private key is not an {kind} key", file=str(path))
    return key


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    return read_pem_private_key(path, lambda k: isinstance(k, Ed25519PrivateKey), "Ed25519")


def public_key_b64(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The raw 32-byte public key, base64: the form registries and configs hold."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def load_public_key(b64: str) -> Ed25519PublicKey:
    """Parse a base64 raw Ed25519 public key; raises ``ValueError`` when it is not one."""
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("public key is not base64") from None
    if len(raw) != 32:
        raise ValueError(f"public key has {len(raw)} bytes, expected 32")
    return Ed25519PublicKey.from_public_bytes(raw)


def signer_from_key(key: Ed25519PrivateKey) -> Signer:
    return key.sign


def verify_signature(public_key: Ed25519PublicKey, signature: bytes, message: bytes) -> None:
    """Raise :class:`SignatureError` unless ``signature`` is ``public_key``'s over ``message``."""
    try:
        public_key.verify(signature, message)
    except InvalidSignature:
        raise SignatureError("signature does not verify") from None
