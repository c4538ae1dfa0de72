"""Updates signed with the key of the device's certificate (ECDSA P-256), and the gateway's
trust in the organisation CA that issued it.

A device with a PKI certificate (``fedledger pki issue device``) signs with that certificate's
EC key and puts the certificate in each frame, so the CA, not a per-device registry entry,
vouches for the key: a rotated certificate is accepted without touching the registry, and the
device id (the certificate's CN) stays the identity. Signatures are the fixed 64-byte
``r || s`` form (not DER), so the frame's signature field keeps its one length for both
algorithms.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from ._errors import CertificateError, ConfigError, SignatureError
from ._signing import Signer, read_pem_private_key

# cryptography.x509 is imported where certificates are parsed: an agent without a
# certificate then never loads it (about 1.5 MB of a device's memory).
if TYPE_CHECKING:
    from cryptography import x509

log = logging.getLogger(__name__)

#: The signature algorithms an update header may name (field ``alg``).
ALG_ED25519 = "ed25519"
ALG_ECDSA_P256 = "ecdsa-p256-sha256"
SIGNING_ALGS = (ALG_ED25519, ALG_ECDSA_P256)
#: A DER certificate larger than this is refused before parsing (ours are about 550 bytes).
MAX_CERTIFICATE_BYTES = 1200
_HALF = 32


def load_ec_private_key(path: str | os.PathLike[str]) -> ec.EllipticCurvePrivateKey:
    """The P-256 key of a PKI certificate (``<name>.key`` written by ``fedledger pki issue``)."""
    return read_pem_private_key(
        path,
        lambda k: isinstance(k, ec.EllipticCurvePrivateKey) and isinstance(k.curve, ec.SECP256R1),
        "EC P-256",
    )


def load_certificate(path: str | os.PathLike[str]) -> x509.Certificate:
    from cryptography import x509

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read certificate: {exc.strerror}", file=str(path)) from None
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise ConfigError("not a PEM certificate", file=str(path)) from None


def certificate_der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def certificate_fingerprint(cert: x509.Certificate | bytes) -> str:
    """SHA-256 of the DER certificate, hex: what the ledger records for a certificate."""
    der = cert if isinstance(cert, bytes) else certificate_der(cert)
    return hashlib.sha256(der).hexdigest()


def certificate_signer(key: ec.EllipticCurvePrivateKey) -> Signer:
    """ECDSA P-256 over SHA-256, returned as ``r || s`` (64 bytes)."""

    def sign(message: bytes) -> bytes:
        r, s = decode_dss_signature(key.sign(message, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(_HALF, "big") + s.to_bytes(_HALF, "big")

    return sign


def check_key_matches(key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> bool:
    """A device configured with someone else's certificate would only produce rejections."""
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    mine = key.public_key().public_bytes(serialization.Encoding.DER, spki)
    return mine == cert.public_key().public_bytes(serialization.Encoding.DER, spki)


def verify_ecdsa(public_key: ec.EllipticCurvePublicKey, signature: bytes, message: bytes) -> None:
    """Raise :class:`SignatureError` unless ``signature`` (``r || s``) verifies."""
    if len(signature) != 2 * _HALF:
        raise SignatureError("ECDSA signature is not 64 bytes")
    r = int.from_bytes(signature[:_HALF], "big")
    s = int.from_bytes(signature[_HALF:], "big")
    try:
        public_key.verify(encode_dss_signature(r, s), message, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        raise SignatureError("signature does not verify") from None


class CertificateTrust:
    """The organisation CA (and its CRL) a gateway checks device certificates against.

    The CRL file is re-read whenever its modification time or size changes (checked at
    most once a second), so ``fedledger pki revoke`` takes effect without a restart. A CRL
    file that stops parsing or is not signed by the CA is logged and the last good one stays
    in force; a CRL past its next update is still applied (it lists at least what it lists)
    with a warning, rather than locking the whole fleet out.
    """

    def __init__(
        self,
        ca: x509.Certificate,
        *,
        crl_path: str | os.PathLike[str] | None = None,
        clock: Callable[[], float] = time.time,
    ):
        from cryptography import x509

        try:
            constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            constraints = None
        if constraints is None or not constraints.ca:
            raise ConfigError("the trusted certificate is not a CA certificate")
        self.ca = ca
        self.crl_path = None if crl_path is None else Path(crl_path)
        self._clock = clock
        self._crl: x509.CertificateRevocationList | None = None
        self._crl_stamp: tuple[int, int] | None = None
        self._checked_at = float("-inf")
        self._warned_stale = False
        #: Certificates whose CA signature already verified, by DER fingerprint.
        self._verified: dict[str, x509.Certificate] = {}
        if self.crl_path is not None:
            self.refresh(force=True)
            if self._crl is None:
                raise ConfigError("not a PEM revocation list of this CA", file=str(self.crl_path))

    @classmethod
    def load(
        cls,
        ca_path: str | os.PathLike[str],
        crl_path: str | os.PathLike[str] | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> CertificateTrust:
        return cls(load_certificate(ca_path), crl_path=crl_path, clock=clock)

    def refresh(self, *, force: bool = False) -> None:
        """Re-read the CRL file if it changed since the last read."""
        from cryptography import x509

        if self.crl_path is None:
            return
        now = time.monotonic()
        if not force and now - self._checked_at < 1.0:
            return
        self._checked_at = now
        try:
            st = self.crl_path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp == self._crl_stamp:
                return
            crl = x509.load_pem_x509_crl(self.crl_path.read_bytes())
        except (OSError, ValueError) as exc:
            log.error("cannot read the revocation list %s: %s", self.crl_path, exc)
            return
        if crl.issuer != self.ca.subject or not crl.is_signature_valid(self.ca.public_key()):  # type: ignore[arg-type]
            log.error("the revocation list %s is not signed by the CA; ignored", self.crl_path)
            return
        self._crl, self._crl_stamp, self._warned_stale = crl, stamp, False
        log.info("revocation list %s loaded: %d revoked", self.crl_path, len(crl))

    def verify(self, der: bytes, device: str) -> x509.Certificate:
        """The certificate, if the CA vouches for it as ``device``'s right now.

        Raises :class:`CertificateError` with reason ``bad_certificate`` (unparsable, another
        CA, a bad CA signature, outside its validity, a CA or non-signing certificate, not a
        P-256 key), ``subject_mismatch`` (its CN is not ``device``) or ``certificate_revoked``.
        """
        from cryptography.x509.oid import NameOID

        if len(der) > MAX_CERTIFICATE_BYTES:
            raise CertificateError("bad_certificate", f"certificate is {len(der)} bytes")
        fingerprint = hashlib.sha256(der).hexdigest()
        cert = self._verified.get(fingerprint)
        if cert is None:
            cert = self._check_issued(der)
            if len(self._verified) >= 4096:
                self._verified.clear()
            self._verified[fingerprint] = cert
        when = self._clock()
        for what, c in (("certificate", cert), ("CA certificate", self.ca)):
            if when < c.not_valid_before_utc.timestamp():
                raise CertificateError("bad_certificate", f"{what} is not valid yet")
            if when > c.not_valid_after_utc.timestamp():
                raise CertificateError("bad_certificate", f"{what} has expired")
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if len(names) != 1 or names[0].value != device:
            raise CertificateError("subject_mismatch", "certificate subject is not the sender")
        self.refresh()
        crl = self._crl
        if crl is not None:
            next_update = crl.next_update_utc
            if (
                next_update is not None
                and when > next_update.timestamp()
                and not self._warned_stale
            ):
                self._warned_stale = True
                log.warning("the revocation list expired; refresh it ('fedledger pki crl')")
            if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
                raise CertificateError("certificate_revoked", "certificate serial is revoked")
        return cert

    def _check_issued(self, der: bytes) -> x509.Certificate:
        """What does not change with time: the CA signature, constraints and key type."""
        from cryptography import x509
        from cryptography.x509.oid import NameOID

        try:
            cert = x509.load_der_x509_certificate(der)
            # Parsing is lazy: touch every part used below while errors are still caught.
            issuer, extensions, key = cert.issuer, cert.extensions, cert.public_key()
            _ = cert.subject, cert.not_valid_before_utc, cert.not_valid_after_utc
        except Exception:  # the DER parser raises many types; each means "bad"
            raise CertificateError("bad_certificate", "not a usable DER certificate") from None
        if issuer != self.ca.subject:
            raise CertificateError("bad_certificate", "not issued by the trusted CA")
        try:
            cert.verify_directly_issued_by(self.ca)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            raise CertificateError("bad_certificate", "no valid signature of the CA") from None
        for ext_type, check in (
            (x509.BasicConstraints, lambda v: not v.ca),
            (x509.KeyUsage, lambda v: v.digital_signature),
        ):
            try:
                value = extensions.get_extension_for_class(ext_type).value
            except x509.ExtensionNotFound:
                continue
            if not check(value):
                raise CertificateError("bad_certificate", f"{ext_type.__name__} forbids signing")
        ous = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
        if any(ou.value != "device" for ou in ous):
            raise CertificateError("bad_certificate", "not a device certificate")
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(
            key.curve, ec.SECP256R1
        ):
            raise CertificateError("bad_certificate", "certificate key is not EC P-256")
        return cert
