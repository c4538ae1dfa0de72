"""End-to-end encryption of update payloads to the gateway's X25519 key.

The broker routes updates but must not read them: a device seals each payload with a fresh
ephemeral X25519 key, derives a one-time AES-256-GCM key and nonce from the shared secret
with HKDF-SHA256, and authenticates the update header as associated data, so a ciphertext
opens only under the header it was sealed with. A key and nonce are used exactly once
(the ephemeral key is new every frame), which is why the nonce can be derived rather than
drawn.
"""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ._errors import DecryptError
from ._signing import read_pem_private_key

#: The one sealing scheme an update header may name (field ``enc``).
ENC_X25519_AES256GCM = "x25519-hkdf-sha256-aes256gcm"
#: What sealing adds to a payload: the GCM tag (the ephemeral key travels in the header).
SEAL_OVERHEAD = 16
_INFO = b"fedledger v1 update payload"


def generate_x25519_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def x25519_public_b64(key: X25519PrivateKey | X25519PublicKey) -> str:
    """The raw 32-byte public key, base64: what an agent config names."""
    public = key.public_key() if isinstance(key, X25519PrivateKey) else key
    return base64.b64encode(_raw(public)).decode("ascii")


def load_x25519_public_key(b64: str) -> X25519PublicKey:
    """Parse a base64 raw X25519 public key; raises ``ValueError`` when it is not one."""
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("encryption key is not base64") from None
    if len(raw) != 32:
        raise ValueError(f"encryption key has {len(raw)} bytes, expected 32")
    return X25519PublicKey.from_public_bytes(raw)


def load_x25519_private_key(path: str | os.PathLike[str]) -> X25519PrivateKey:
    return read_pem_private_key(path, lambda k: isinstance(k, X25519PrivateKey), "X25519")


def _raw(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _key_and_nonce(shared: bytes, ephemeral: bytes, recipient: bytes) -> tuple[bytes, bytes]:
    # Both public keys in the salt: the derived key belongs to this one exchange.
    okm = HKDF(algorithm=hashes.SHA256(), length=44, salt=ephemeral + recipient, info=_INFO).derive(
        shared
    )
    return okm[:32], okm[32:]


def seal(
    plaintext: bytes, recipient: X25519PublicKey, aad: bytes, *, ephemeral: X25519PrivateKey
) -> bytes:
    """AES-256-GCM ciphertext (with its tag) of ``plaintext`` for ``recipient``.

    ``ephemeral`` must be a fresh key, used for this payload only; its public half travels
    with the ciphertext.
    """
    epk = _raw(ephemeral.public_key())
    key, nonce = _key_and_nonce(ephemeral.exchange(recipient), epk, _raw(recipient))
    return AESGCM(key).encrypt(nonce, plaintext, aad)


def open_sealed(ciphertext: bytes, epk: bytes, private_key: X25519PrivateKey, aad: bytes) -> bytes:
    """The plaintext, or :class:`DecryptError` (another recipient, or tampered bytes)."""
    try:
        peer = X25519PublicKey.from_public_bytes(epk)
        shared = private_key.exchange(peer)  # ValueError on a low-order (all-zero) result
    except ValueError:
        raise DecryptError("ephemeral key is not usable") from None
    key, nonce = _key_and_nonce(shared, epk, _raw(private_key.public_key()))
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, aad)
    except InvalidTag:
        raise DecryptError("ciphertext does not authenticate under this key") from None
