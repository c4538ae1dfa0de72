"""The organisation's certificate authority: one directory, EC P-256, plain files.

Ansible and operators drive it through ``fedledger pki``; every operation is idempotent, so a
playbook can run it again and again and only a real change writes anything. The directory::

    <dir>/ca.pem                 the CA certificate: give it to every device, gateway and broker
    <dir>/ca.key                 the CA private key (0600): it never leaves this machine
    <dir>/crl.pem                the revocation list, signed by the CA (empty after init)
    <dir>/index.json             every certificate ever issued: serial, name, kind, revocation
    <dir>/<kind>s/<name>.pem     the current certificate of a device, gateway or broker
    <dir>/<kind>s/<name>.key     its private key (0600)
    <dir>/x25519/<name>.key      a gateway's X25519 key (0600): devices seal payloads to it
    <dir>/x25519/<name>.pub      its public half, base64 raw: the agents' gateway_encryption_key

A certificate's subject is ``CN=<name>, OU=<kind>, O=<org>``. The broker takes the CN as the
MQTT user name (``use_identity_as_username``), so a name belongs to one kind only: a device and
a gateway sharing a name would share ACL rights.

Private keys are written 0600 from creation on and are never returned, printed or logged;
what the functions return names their files.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import fcntl
import ipaddress
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedcore import (
    IDENTIFIER,
    FedledgerError,
    atomic_write_bytes,
    check_folder,
    read_marker,
    write_marker,
)

__all__ = [
    "CA_DAYS",
    "CLOCK_SKEW",
    "CRL_DAYS",
    "LEAF_DAYS",
    "REASONS",
    "CaInfo",
    "CertificateAuthority",
    "Issued",
    "Kind",
    "PkiError",
    "Revoked",
    "SealingKey",
    "build_leaf",
    "ca_cert_path",
    "certificate_paths",
    "crl_path",
    "init_ca",
    "issue",
    "load_ca",
    "load_crl",
    "refresh_crl",
    "revoke",
    "verify_chain",
    "write_private_key",
    "x25519_key",
]

Kind = Literal["device", "gateway", "broker"]
KINDS: tuple[Kind, ...] = ("device", "gateway", "broker")

CA_DAYS = 3650
LEAF_DAYS = 365
CRL_DAYS = 30
#: Certificates start this long before "now", so a device whose clock lags accepts them.
CLOCK_SKEW = dt.timedelta(minutes=5)

#: The reasons :class:`PkiError` carries; the gateway can count rejections by them.
REASONS = frozenset(
    {
        "invalid",  # a bad argument (name, kind, validity, org)
        "no_ca",  # the directory holds no CA yet
        "ca_mismatch",  # init with another organisation than the existing CA's
        "unreadable",  # a file is missing, unreadable or not what it should be
        "name_taken",  # the name belongs to a certificate of another kind
        "unknown",  # no certificate was ever issued under that name
        "malformed",  # not a PEM certificate, or no usable common name
        "untrusted",  # not issued by this CA
        "not_yet_valid",
        "expired",
        "wrong_kind",  # the OU or extended key usage is not the expected kind's
        "revoked",
        "crl_invalid",  # the CRL is not signed by this CA
        "crl_expired",  # the CRL is past its next update: refresh it
    }
)


class PkiError(FedledgerError):
    """A certificate operation failed or a certificate is not acceptable.

    ``reason`` is one of :data:`REASONS`; ``file`` names the file at fault when there is one.
    """

    def __init__(self, message: str, *, reason: str = "invalid", file: str | None = None):
        assert reason in REASONS, reason
        self.reason = reason
        self.file = file
        super().__init__(f"{file}: {message}" if file else message)


# ---------------------------------------------------------------- results


@dataclass(frozen=True)
class CaInfo:
    """The CA of a directory, as ``init_ca`` found or created it."""

    directory: Path
    org: str
    cert: Path
    key: Path
    crl: Path
    not_after: dt.datetime
    fingerprint: str  # SHA-256 of the DER certificate, hex
    created: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "directory": str(self.directory),
            "org": self.org,
            "cert": str(self.cert),
            "key": str(self.key),
            "crl": str(self.crl),
            "not_after": self.not_after.isoformat(),
            "fingerprint_sha256": self.fingerprint,
            "created": self.created,
            "changed": self.created,
        }


@dataclass(frozen=True)
class Issued:
    """A certificate and where its key is; ``action`` says what ``issue`` did.

    ``issued``: a first certificate; ``existing``: the valid one was kept, nothing written;
    ``renewed``: the old one was unusable (expired, other CA, lost key, changed names) and was
    replaced; ``rotated``: a new key and certificate on request, the old ones stay valid until
    they expire or are revoked (``revoke(..., superseded_only=True)``).
    """

    name: str
    kind: Kind
    org: str
    cert: Path
    key: Path
    serial: int
    not_after: dt.datetime
    fingerprint: str
    action: Literal["issued", "existing", "renewed", "rotated"]
    dns: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return self.action != "existing"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "org": self.org,
            "cert": str(self.cert),
            "key": str(self.key),
            "serial": f"{self.serial:x}",
            "not_after": self.not_after.isoformat(),
            "fingerprint_sha256": self.fingerprint,
            "dns": list(self.dns),
            "ips": list(self.ips),
            "action": self.action,
            "changed": self.changed,
        }


@dataclass(frozen=True)
class Revoked:
    """What ``revoke`` did: the serials it revoked now, and those revoked before."""

    name: str
    crl: Path
    revoked: tuple[int, ...]
    already: tuple[int, ...]
    crl_written: bool = field(default=False)

    @property
    def changed(self) -> bool:
        return bool(self.revoked) or self.crl_written

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "crl": str(self.crl),
            "revoked": [f"{s:x}" for s in self.revoked],
            "already_revoked": [f"{s:x}" for s in self.already],
            "changed": self.changed,
        }


# ---------------------------------------------------------------- files


def ca_cert_path(directory: str | os.PathLike[str]) -> Path:
    return Path(directory) / "ca.pem"


def crl_path(directory: str | os.PathLike[str]) -> Path:
    return Path(directory) / "crl.pem"


def certificate_paths(directory: str | os.PathLike[str], kind: str, name: str) -> tuple[Path, Path]:
    """``(certificate, private key)`` of ``name``: where ``issue`` writes them."""
    _check_kind(kind)
    _check_name(name)
    folder = Path(directory) / f"{kind}s"
    return folder / f"{name}.pem", folder / f"{name}.key"


def write_private_key(key: ec.EllipticCurvePrivateKey, path: str | os.PathLike[str]) -> None:
    """Write ``key`` as unencrypted PKCS#8 PEM, 0600 from creation on, replacing atomically.

    The bytes go to a new 0600 file beside ``path`` that then replaces it, so no reader ever
    sees a half-written key or a moment of wider permissions, whatever the umask.
    """
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_atomic(Path(path), pem, mode=0o600)


def _write_atomic(path: Path, data: bytes, *, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write_bytes(path, data, mode=mode)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise PkiError(f"{what} not found", reason="unreadable", file=str(path)) from None
    except OSError as exc:
        raise PkiError(
            f"cannot read {what}: {exc.strerror}", reason="unreadable", file=str(path)
        ) from None


def _load_cert_file(path: Path, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(_read(path, what))
    except ValueError:
        raise PkiError(
            f"{what} is not a PEM certificate", reason="unreadable", file=str(path)
        ) from None


def _load_key_file(path: Path, what: str) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(_read(path, what), password=None)
    except (ValueError, TypeError):
        raise PkiError(
            f"{what} is not an unencrypted PEM private key", reason="unreadable", file=str(path)
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{what} is not an EC key", reason="unreadable", file=str(path))
    return key


@contextlib.contextmanager
def _locked(directory: Path, *, create: bool = False) -> Iterator[None]:
    """One writer at a time, so parallel Ansible tasks on one host cannot lose an index entry.

    Only ``init_ca`` creates the directory: a typo in a path must not leave one behind.
    """
    if create:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    elif not directory.is_dir():
        raise PkiError(
            "no certificate authority here: run 'fedledger pki init' first",
            reason="no_ca",
            file=str(directory),
        )
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


# ---------------------------------------------------------------- index


def _index_path(directory: Path) -> Path:
    return directory / "index.json"


def _load_index(directory: Path) -> dict[str, Any]:
    path = _index_path(directory)
    if not path.exists():
        return {"version": 1, "crl_number": 0, "certificates": []}
    try:
        index = json.loads(_read(path, "certificate index"))
    except (ValueError, UnicodeDecodeError):
        raise PkiError(
            "certificate index is not JSON", reason="unreadable", file=str(path)
        ) from None
    if not isinstance(index, dict) or not isinstance(index.get("certificates"), list):
        raise PkiError(
            'certificate index lacks a "certificates" list', reason="unreadable", file=str(path)
        )
    return index


def _save_index(directory: Path, index: dict[str, Any]) -> None:
    body = json.dumps(index, indent=1, sort_keys=True) + "\n"
    _write_atomic(_index_path(directory), body.encode(), mode=0o644)


def _entries(index: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [e for e in index["certificates"] if e.get("name") == name]


# ---------------------------------------------------------------- CA


def _now(now: dt.datetime | None) -> dt.datetime:
    if now is None:
        return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    if now.tzinfo is None:
        raise PkiError("now must be timezone-aware")
    return now.astimezone(dt.timezone.utc)


def _check_days(days: int, option: str = "days") -> None:
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise PkiError(f"{option} must be a whole number of days, at least 1 (got {days!r})")


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise PkiError(f"unknown certificate kind {kind!r}: expected one of {', '.join(KINDS)}")


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not IDENTIFIER.fullmatch(name):
        raise PkiError(
            f"name {name!r} is not an identifier: letters, digits, '_', '.', '-', at most 64,"
            " starting with a letter or digit"
        )


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """A CA signs certificates and CRLs only; a leaf signs (TLS handshakes, updates) only."""
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def _spki(key: ec.EllipticCurvePublicKey | Any) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _attribute(name: x509.Name, oid: x509.ObjectIdentifier) -> str | None:
    values = name.get_attributes_for_oid(oid)
    if len(values) != 1 or not isinstance(values[0].value, str):
        return None
    return values[0].value


@dataclass(frozen=True)
class CertificateAuthority:
    directory: Path
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    org: str


def load_ca(directory: Path) -> CertificateAuthority:
    cert_path, key_path = ca_cert_path(directory), directory / "ca.key"
    if not cert_path.exists() and not key_path.exists():
        raise PkiError(
            "no certificate authority here: run 'fedledger pki init' first",
            reason="no_ca",
            file=str(directory),
        )
    cert = _load_cert_file(cert_path, "CA certificate")
    key = _load_key_file(key_path, "CA private key")
    if _spki(cert.public_key()) != _spki(key.public_key()):
        raise PkiError(
            f"the CA private key does not belong to {cert_path}",
            reason="unreadable",
            file=str(key_path),
        )
    org = _attribute(cert.subject, NameOID.ORGANIZATION_NAME)
    if org is None:
        raise PkiError(
            "CA certificate has no organisation (O)", reason="unreadable", file=str(cert_path)
        )
    return CertificateAuthority(directory, cert, key, org)


def _ca_info(ca: CertificateAuthority, *, created: bool) -> CaInfo:
    return CaInfo(
        directory=ca.directory,
        org=ca.org,
        cert=ca_cert_path(ca.directory),
        key=ca.directory / "ca.key",
        crl=crl_path(ca.directory),
        not_after=ca.cert.not_valid_after_utc,
        fingerprint=_fingerprint(ca.cert),
        created=created,
    )


def init_ca(
    directory: str | os.PathLike[str],
    org: str,
    *,
    days: int = CA_DAYS,
    crl_days: int = CRL_DAYS,
    now: dt.datetime | None = None,
) -> CaInfo:
    """Create the organisation's CA in ``directory``, or report the one already there.

    An existing CA is never overwritten (every certificate it issued would be orphaned); asking
    for another organisation than the existing CA's is an error. A new CA comes with an empty
    CRL, so a broker can be configured with ``crlfile`` from the start.
    """
    directory = Path(directory)
    if not isinstance(org, str) or not org.strip() or len(org) > 64 or not org.isprintable():
        raise PkiError(f"organisation {org!r} must be 1 to 64 printable characters")
    _check_days(days)
    _check_days(crl_days, "crl_days")
    when = _now(now)
    existing = ca_cert_path(directory).exists() or (directory / "ca.key").exists()
    if not existing:
        # A new CA goes only into a new or empty folder, or one fedledger made for a CA: its
        # index, CRL and key files must never land over a user's files of the same names.
        check_folder(directory, kind="pki")
    with _locked(directory, create=True):
        if not existing and read_marker(directory) is None:
            write_marker(directory, kind="pki", created_by="fedledger pki init")
        if ca_cert_path(directory).exists() or (directory / "ca.key").exists():
            ca = load_ca(directory)
            if ca.org != org:
                raise PkiError(
                    f"the existing CA belongs to organisation {ca.org!r}, not {org!r};"
                    " it is kept (use another directory for another organisation)",
                    reason="ca_mismatch",
                    file=str(ca_cert_path(directory)),
                )
            if not crl_path(directory).exists():
                _write_crl(ca, _load_index(directory), crl_days=crl_days, now=when)
            return _ca_info(ca, created=False)

        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
                x509.NameAttribute(NameOID.COMMON_NAME, f"{org} fedledger CA"[:64]),
            ]
        )
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(when - CLOCK_SKEW)
            .not_valid_after(when + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        # Key first: a crash in between leaves a key without a certificate, which the next
        # init reports instead of silently replacing.
        write_private_key(key, directory / "ca.key")
        _write_atomic(
            ca_cert_path(directory), cert.public_bytes(serialization.Encoding.PEM), mode=0o644
        )
        ca = CertificateAuthority(directory, cert, key, org)
        _write_crl(ca, _load_index(directory), crl_days=crl_days, now=when)
        return _ca_info(ca, created=True)


# ---------------------------------------------------------------- issue


def _normalise_ips(ips: Iterable[str]) -> tuple[str, ...]:
    out = []
    for ip in ips:
        try:
            out.append(str(ipaddress.ip_address(ip)))
        except ValueError:
            raise PkiError(f"{ip!r} is not an IP address") from None
    return tuple(sorted(set(out)))


def _normalise_dns(names: Iterable[str]) -> tuple[str, ...]:
    out = []
    for name in names:
        label = name.strip().lower().rstrip(".")
        if not label or any(c.isspace() for c in label) or len(label) > 253:
            raise PkiError(f"{name!r} is not a DNS name")
        out.append(label)
    return tuple(sorted(set(out)))


def _sans(cert: x509.Certificate) -> tuple[tuple[str, ...], tuple[str, ...]]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return (), ()
    dns = tuple(sorted(san.get_values_for_type(x509.DNSName)))
    ips = tuple(sorted(str(ip) for ip in san.get_values_for_type(x509.IPAddress)))
    return dns, ips


def _current_state(
    ca: CertificateAuthority,
    index: dict[str, Any],
    cert_path: Path,
    key_path: Path,
    *,
    kind: str,
    dns: tuple[str, ...],
    ips: tuple[str, ...],
    now: dt.datetime,
) -> tuple[str, x509.Certificate | None]:
    """``absent``, ``valid``, ``revoked`` or ``unusable``, with the certificate when loadable."""
    if not cert_path.exists() and not key_path.exists():
        return "absent", None
    try:
        cert = _load_cert_file(cert_path, "certificate")
        key = _load_key_file(key_path, "private key")
    except PkiError:
        return "unusable", None
    entry = next(
        (e for e in index["certificates"] if e.get("serial") == f"{cert.serial_number:x}"), None
    )
    if entry is not None and entry.get("revoked"):
        return "revoked", cert
    if entry is None or _spki(cert.public_key()) != _spki(key.public_key()):
        return "unusable", cert
    try:
        verify_chain(cert.public_bytes(serialization.Encoding.PEM), ca.cert, kind=kind, now=now)
    except PkiError:
        return "unusable", cert
    if kind == "broker" and _sans(cert) != (dns, ips):
        return "unusable", cert
    return "valid", cert


def issue(
    directory: str | os.PathLike[str],
    kind: Kind,
    name: str,
    *,
    days: int = LEAF_DAYS,
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
    rotate: bool = False,
    now: dt.datetime | None = None,
) -> Issued:
    """Issue ``name`` a certificate of ``kind`` (``device``, ``gateway`` or ``broker``).

    Device and gateway certificates are for TLS clients (clientAuth), a broker certificate for a
    TLS server (serverAuth) and must name its host in ``dns`` and/or ``ips``. A valid existing
    certificate is returned unchanged; ``rotate=True`` always makes a new key and certificate.
    A revoked name is refused unless ``rotate=True``: re-enabling an identity is a decision.
    ``now`` backdates or postdates the validity (tests, and signing for a clock-less device).
    """
    _check_kind(kind)
    _check_name(name)
    _check_days(days)
    dns_names, ip_names = _normalise_dns(dns), _normalise_ips(ips)
    if kind == "broker" and not dns_names and not ip_names:
        raise PkiError("a broker certificate needs the host names clients connect to (dns, ips)")
    if kind != "broker" and (dns_names or ip_names):
        raise PkiError("only broker certificates carry DNS names or IP addresses")
    directory = Path(directory)
    when = _now(now)
    cert_path, key_path = certificate_paths(directory, kind, name)
    with _locked(directory):
        ca = load_ca(directory)
        if when >= ca.cert.not_valid_after_utc:
            raise PkiError(
                f"the CA expired on {ca.cert.not_valid_after_utc.isoformat()}: it issues nothing",
                reason="expired",
                file=str(ca_cert_path(directory)),
            )
        index = _load_index(directory)
        owners = {e.get("kind") for e in _entries(index, name)} - {kind}
        if owners:
            raise PkiError(
                f"{name!r} is already the name of a {sorted(owners)[0]} certificate: names are"
                " MQTT user names and must be unique across kinds",
                reason="name_taken",
                file=str(_index_path(directory)),
            )
        state, existing = _current_state(
            ca, index, cert_path, key_path, kind=kind, dns=dns_names, ips=ip_names, now=when
        )
        if state == "valid" and not rotate:
            assert existing is not None
            return _issued(ca, existing, name, kind, cert_path, key_path, "existing")
        if state == "revoked" and not rotate:
            raise PkiError(
                f"the certificate of {kind} {name!r} is revoked; issue with rotate (--rotate)"
                " to give it a new identity",
                reason="revoked",
                file=str(cert_path),
            )
        key = ec.generate_private_key(ec.SECP256R1())
        cert = build_leaf(ca, key, kind, name, days=days, dns=dns_names, ips=ip_names, now=when)
        # Index first: a crash later leaves a serial on record that may never have been used
        # (harmless, and revocable), never a certificate in use that the index does not know.
        index["certificates"].append(
            {
                "serial": f"{cert.serial_number:x}",
                "name": name,
                "kind": kind,
                "not_before": cert.not_valid_before_utc.isoformat(),
                "not_after": cert.not_valid_after_utc.isoformat(),
                "fingerprint_sha256": _fingerprint(cert),
                "revoked": None,
            }
        )
        _save_index(directory, index)
        write_private_key(key, key_path)
        _write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
        action: Literal["issued", "renewed", "rotated"]
        action = "issued" if state == "absent" else "rotated" if rotate else "renewed"
        return _issued(ca, cert, name, kind, cert_path, key_path, action)


def build_leaf(
    ca: CertificateAuthority,
    key: ec.EllipticCurvePrivateKey,
    kind: str,
    name: str,
    *,
    days: int,
    dns: tuple[str, ...],
    ips: tuple[str, ...],
    now: dt.datetime,
) -> x509.Certificate:
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ca.org),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, kind),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    usage = ExtendedKeyUsageOID.SERVER_AUTH if kind == "broker" else ExtendedKeyUsageOID.CLIENT_AUTH
    not_after = min(now + dt.timedelta(days=days), ca.cert.not_valid_after_utc)
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
    )
    if dns or ips:
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca.key, hashes.SHA256())


def _issued(
    ca: CertificateAuthority,
    cert: x509.Certificate,
    name: str,
    kind: Kind,
    cert_path: Path,
    key_path: Path,
    action: Literal["issued", "existing", "renewed", "rotated"],
) -> Issued:
    dns, ips = _sans(cert)
    return Issued(
        name=name,
        kind=kind,
        org=ca.org,
        cert=cert_path,
        key=key_path,
        serial=cert.serial_number,
        not_after=cert.not_valid_after_utc,
        fingerprint=_fingerprint(cert),
        action=action,
        dns=dns,
        ips=ips,
    )


# ---------------------------------------------------------------- payload encryption keys


@dataclass(frozen=True)
class SealingKey:
    """A gateway's X25519 key pair for end-to-end payload encryption (``x25519_key``)."""

    name: str
    key: Path
    public: Path
    public_key: str  # base64 raw 32 bytes
    created: bool

    @property
    def changed(self) -> bool:
        return self.created

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "key": str(self.key),
            "public": str(self.public),
            "public_key": self.public_key,
            "created": self.created,
            "changed": self.changed,
        }


def x25519_key(directory: str | os.PathLike[str], name: str) -> SealingKey:
    """Create ``name``'s X25519 key pair, or report the one already there.

    Not a certificate: devices learn the public key from their config, which the operator
    distributes like the CA certificate. An existing key is never replaced (payloads in
    flight would no longer open); delete the files to replace it on purpose.
    """
    _check_name(name)
    directory = Path(directory)
    key_path = directory / "x25519" / f"{name}.key"
    pub_path = directory / "x25519" / f"{name}.pub"
    with _locked(directory):
        created = not key_path.exists()
        if created:
            key = X25519PrivateKey.generate()
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            _write_atomic(key_path, pem, mode=0o600)
        else:
            try:
                loaded = serialization.load_pem_private_key(
                    _read(key_path, "X25519 key"), password=None
                )
            except (ValueError, TypeError):
                loaded = None
            if not isinstance(loaded, X25519PrivateKey):
                raise PkiError(
                    "not an unencrypted PEM X25519 key", reason="unreadable", file=str(key_path)
                )
            key = loaded
        public = base64.b64encode(key.public_key().public_bytes_raw()).decode("ascii")
        if not pub_path.exists() or pub_path.read_text(encoding="ascii").strip() != public:
            _write_atomic(pub_path, (public + "\n").encode("ascii"), mode=0o644)
        return SealingKey(name, key_path, pub_path, public, created)


# ---------------------------------------------------------------- revoke and CRL


def revoke(
    directory: str | os.PathLike[str],
    name: str,
    *,
    superseded_only: bool = False,
    crl_days: int = CRL_DAYS,
    now: dt.datetime | None = None,
) -> Revoked:
    """Revoke every certificate ever issued to ``name`` and rewrite the CRL.

    ``superseded_only=True`` keeps the current certificate and revokes the ones a rotation
    replaced: the end of a key rotation. Revoking what is already revoked changes nothing and
    writes nothing (the CRL is only rewritten when missing).
    """
    _check_name(name)
    _check_days(crl_days, "crl_days")
    directory = Path(directory)
    when = _now(now)
    with _locked(directory):
        ca = load_ca(directory)
        index = _load_index(directory)
        entries = _entries(index, name)
        if not entries:
            raise PkiError(
                f"no certificate was ever issued to {name!r}",
                reason="unknown",
                file=str(_index_path(directory)),
            )
        keep: str | None = None
        if superseded_only:
            cert_path, _ = certificate_paths(directory, entries[-1]["kind"], name)
            if cert_path.exists():
                keep = f"{_load_cert_file(cert_path, 'certificate').serial_number:x}"
        revoked, already = [], []
        for entry in entries:
            serial = int(entry["serial"], 16)
            if entry.get("revoked"):
                already.append(serial)
            elif entry["serial"] != keep:
                reason = "superseded" if superseded_only else "cessation_of_operation"
                entry["revoked"] = {"at": when.isoformat(), "reason": reason}
                revoked.append(serial)
        written = False
        if revoked:
            _save_index(directory, index)
        if revoked or not crl_path(directory).exists():
            _write_crl(ca, index, crl_days=crl_days, now=when)
            written = True
        return Revoked(name, crl_path(directory), tuple(revoked), tuple(already), written)


def refresh_crl(
    directory: str | os.PathLike[str], *, crl_days: int = CRL_DAYS, now: dt.datetime | None = None
) -> Path:
    """Re-sign the CRL with a new validity window.

    Run it well before ``next_update`` (a timer, or Ansible): OpenSSL, and so Mosquitto and
    :func:`verify_chain`, refuse every client once the CRL has expired.
    """
    _check_days(crl_days, "crl_days")
    directory = Path(directory)
    with _locked(directory):
        ca = load_ca(directory)
        _write_crl(ca, _load_index(directory), crl_days=crl_days, now=_now(now))
    return crl_path(directory)


_CRL_REASONS = {
    "superseded": x509.ReasonFlags.superseded,
    "cessation_of_operation": x509.ReasonFlags.cessation_of_operation,
    "key_compromise": x509.ReasonFlags.key_compromise,
}


def _write_crl(
    ca: CertificateAuthority, index: dict[str, Any], *, crl_days: int, now: dt.datetime
) -> None:
    number = int(index.get("crl_number", 0)) + 1
    index["crl_number"] = number
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now - CLOCK_SKEW)
        .next_update(now + dt.timedelta(days=crl_days))
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
    )
    for entry in index["certificates"]:
        if not entry.get("revoked"):
            continue
        revoked = (
            x509.RevokedCertificateBuilder()
            .serial_number(int(entry["serial"], 16))
            .revocation_date(dt.datetime.fromisoformat(entry["revoked"]["at"]))
        )
        reason = _CRL_REASONS.get(entry["revoked"].get("reason", ""))
        if reason is not None:
            revoked = revoked.add_extension(x509.CRLReason(reason), critical=False)
        builder = builder.add_revoked_certificate(revoked.build())
    crl = builder.sign(ca.key, hashes.SHA256())
    _save_index(ca.directory, index)
    _write_atomic(crl_path(ca.directory), crl.public_bytes(serialization.Encoding.PEM), mode=0o644)


def load_crl(path: str | os.PathLike[str]) -> x509.CertificateRevocationList:
    """Parse a PEM CRL (``crl.pem`` of a PKI directory, or a copy a gateway holds)."""
    path = Path(path)
    if path.is_dir():
        path = crl_path(path)
    try:
        return x509.load_pem_x509_crl(_read(path, "revocation list"))
    except ValueError:
        raise PkiError("not a PEM revocation list", reason="unreadable", file=str(path)) from None


# ---------------------------------------------------------------- verify


def _as_cert(value: bytes | str | x509.Certificate, what: str) -> x509.Certificate:
    if isinstance(value, x509.Certificate):
        return value
    data = value.encode() if isinstance(value, str) else value
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise PkiError(f"{what} is not a PEM certificate", reason="malformed") from None


def verify_chain(
    cert_pem: bytes | str | x509.Certificate,
    ca_pem: bytes | str | x509.Certificate,
    crl: x509.CertificateRevocationList | None = None,
    *,
    kind: Kind | None = None,
    now: dt.datetime | None = None,
) -> str:
    """The certificate's common name (the device or gateway id), if the CA vouches for it now.

    Raises :class:`PkiError` with ``reason`` ``malformed``, ``untrusted`` (another CA, or a bad
    signature), ``not_yet_valid``, ``expired`` (the certificate or the CA), ``wrong_kind`` (with
    ``kind``: the OU and extended key usage must match), ``crl_invalid``, ``crl_expired`` or
    ``revoked``. The CRL must be the CA's own and current: a stale CRL cannot clear anyone.
    """
    cert = _as_cert(cert_pem, "certificate")
    ca = _as_cert(ca_pem, "CA certificate")
    when = _now(now)
    cn = _attribute(cert.subject, NameOID.COMMON_NAME)
    if cn is None or not IDENTIFIER.fullmatch(cn):
        raise PkiError("certificate has no valid common name (CN)", reason="malformed")
    who = f"certificate of {cn!r} (serial {cert.serial_number:x})"
    try:
        constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise PkiError("the given CA certificate is not a CA", reason="untrusted")
    if cert.issuer != ca.subject:
        raise PkiError(
            f"{who} was issued by {cert.issuer.rfc4514_string()!r}, not by this CA"
            f" ({ca.subject.rfc4514_string()!r})",
            reason="untrusted",
        )
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise PkiError(
            f"{who} does not carry a valid signature of this CA", reason="untrusted"
        ) from None
    for subject, c in ((who, cert), ("the CA certificate", ca)):
        if when < c.not_valid_before_utc:
            raise PkiError(
                f"{subject} is not valid before {c.not_valid_before_utc.isoformat()}",
                reason="not_yet_valid",
            )
        if when > c.not_valid_after_utc:
            raise PkiError(
                f"{subject} expired on {c.not_valid_after_utc.isoformat()}", reason="expired"
            )
    if kind is not None:
        _check_kind(kind)
        ou = _attribute(cert.subject, NameOID.ORGANIZATIONAL_UNIT_NAME)
        want = (
            ExtendedKeyUsageOID.SERVER_AUTH if kind == "broker" else ExtendedKeyUsageOID.CLIENT_AUTH
        )
        try:
            usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            usages = x509.ExtendedKeyUsage([])
        if ou != kind or want not in usages:
            raise PkiError(
                f"{who} is a {ou or 'unknown'} certificate, not a {kind}", reason="wrong_kind"
            )
    if crl is not None:
        if crl.issuer != ca.subject or not crl.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
            raise PkiError("the revocation list is not signed by this CA", reason="crl_invalid")
        next_update = crl.next_update_utc
        if next_update is not None and when > next_update:
            raise PkiError(
                f"the revocation list expired on {next_update.isoformat()}: refresh it"
                " ('fedledger pki crl')",
                reason="crl_expired",
            )
        if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
            raise PkiError(f"{who} is revoked", reason="revoked")
    return cn
