"""Who signs: an MSP identity (MSP id + X.509 certificate) and a signer callable.

Mirrors the fabric-gateway clients: the *identity* says who the client is (it travels in
every message as the serialized ``msp.SerializedIdentity``, the "creator"), the *signer*
proves it. A signer is any callable ``digest -> signature``; the client hashes the exact
serialized bytes it sends (SHA-256 by default) and hands only the digest over, so a
software key, an HSM or an offline signing service can take its place.

Fabric verifies ECDSA signatures only in low-S form: a high-S signature (as valid in
plain ECDSA as its low-S twin) is refused by the peer with a misleading "access denied",
so :func:`ecdsa_signer` always normalizes ``s`` to the lower half of the curve order.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    Prehashed,
    decode_dss_signature,
    encode_dss_signature,
)
from fabric_protos.msp import identities_pb2

from fedcore import ConfigError

#: ``digest -> signature``: signs the digest of the exact bytes the client sends.
Signer = Callable[[bytes], bytes]
#: ``message -> digest``: what the client hands a :data:`Signer`.
Hash = Callable[[bytes], bytes]

#: Order of the NIST P-256 group; a low-S signature has ``s <= P256_ORDER // 2``.
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
P256_HALF_ORDER = P256_ORDER >> 1


def sha256(message: bytes) -> bytes:
    """The default :data:`Hash`: Fabric's ECDSA signatures are over SHA-256."""
    return hashlib.sha256(message).digest()


@dataclass(frozen=True, slots=True)
class Identity:
    """An MSP identity: the organisation's MSP id and the member's PEM certificate."""

    msp_id: str
    certificate: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.msp_id, str) or not self.msp_id.strip():
            raise ValueError("an identity needs a non-empty MSP id")
        if isinstance(self.certificate, str):
            object.__setattr__(self, "certificate", self.certificate.encode("ascii"))
        if not isinstance(self.certificate, bytes):
            raise TypeError("an identity's certificate is PEM bytes")
        try:
            x509.load_pem_x509_certificate(self.certificate)
        except ValueError as exc:
            raise ValueError(f"not a PEM X.509 certificate: {exc}") from None

    def creator(self) -> bytes:
        """The serialized ``msp.SerializedIdentity``: the same bytes in every message."""
        return identities_pb2.SerializedIdentity(
            mspid=self.msp_id, id_bytes=self.certificate
        ).SerializeToString()

    def x509_certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.certificate)


def load_identity(msp_id: str, cert_path: str | os.PathLike[str]) -> Identity:
    """Read a PEM certificate file into an :class:`Identity`."""
    data = read_pem_file(cert_path, "certificate")
    try:
        x509.load_pem_x509_certificate(data)
    except ValueError:
        raise ConfigError("not a PEM X.509 certificate", file=str(cert_path)) from None
    return Identity(msp_id, data)


def load_private_key(key_path: str | os.PathLike[str]) -> ec.EllipticCurvePrivateKey:
    """Read an unencrypted PEM EC P-256 private key (PKCS#8 or SEC1), as Fabric CAs issue."""
    data = read_pem_file(key_path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ConfigError("not an unencrypted PEM private key", file=str(key_path)) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ConfigError("private key is not an EC P-256 (secp256r1) key", file=str(key_path))
    return key


def load_signer(key_path: str | os.PathLike[str]) -> Signer:
    """:func:`ecdsa_signer` over the key in ``key_path``."""
    return ecdsa_signer(load_private_key(key_path))


def ecdsa_signer(private_key: ec.EllipticCurvePrivateKey) -> Signer:
    """A :data:`Signer` producing DER ECDSA P-256 signatures of a SHA-256 digest, low-S."""
    if not isinstance(private_key, ec.EllipticCurvePrivateKey) or not isinstance(
        private_key.curve, ec.SECP256R1
    ):
        raise TypeError("ecdsa_signer needs an EC P-256 (secp256r1) private key")
    algorithm = ec.ECDSA(Prehashed(hashes.SHA256()))

    def sign(digest: bytes) -> bytes:
        if not isinstance(digest, bytes) or len(digest) != 32:
            raise ValueError("the signer takes a 32-byte SHA-256 digest")
        r, s = decode_dss_signature(private_key.sign(digest, algorithm))
        return encode_dss_signature(r, to_low_s(s))

    return sign


def to_low_s(s: int) -> int:
    """``s`` or its twin ``n - s``, whichever is in the lower half of the P-256 order."""
    return P256_ORDER - s if s > P256_HALF_ORDER else s


def is_low_s(signature: bytes) -> bool:
    """Whether a DER ECDSA P-256 signature is in the low-S form Fabric accepts."""
    _, s = decode_dss_signature(signature)
    return s <= P256_HALF_ORDER


def check_key_pair(identity: Identity, private_key: ec.EllipticCurvePrivateKey) -> None:
    """Refuse a key that does not belong to the certificate.

    A peer reports a mismatched key as "access denied" and nothing more, so catch it here.
    """
    public = identity.x509_certificate().public_key()
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if public.public_bytes(*fmt) != private_key.public_key().public_bytes(*fmt):
        raise ValueError(
            f"the private key does not match the certificate of the {identity.msp_id} identity"
        )


def read_pem_file(path: str | os.PathLike[str], what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what} file not found", file=str(path)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what}: {exc.strerror}", file=str(path)) from None
