"""A throwaway PKI for the tests: EC P-256 CAs issuing member, peer and TLS certificates.

Member certificates carry their fedledger role the way Fabric CA writes enrolment
attributes, as the chaincode adapter reads it: a non-critical extension
(OID 1.2.3.4.5.6.7.8.1) holding ``{"attrs": {"fedledger.role": ...}}``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ledger.fabric import Identity, ecdsa_signer

ATTRS_OID = x509.ObjectIdentifier("1.2.3.4.5.6.7.8.1")
ROLE_ATTRIBUTE = "fedledger.role"


def _name(common_name: str, org: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass(frozen=True)
class Member:
    """A key and the certificate a CA issued for it."""

    msp_id: str
    key: ec.EllipticCurvePrivateKey = field(repr=False)
    cert_pem: bytes = field(repr=False)

    @property
    def identity(self) -> Identity:
        return Identity(self.msp_id, self.cert_pem)

    @property
    def signer(self):
        return ecdsa_signer(self.key)

    @property
    def key_pem(self) -> bytes:
        return key_pem(self.key)


class CertificateAuthority:
    def __init__(self, name: str, org: str):
        self.org = org
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        subject = _name(name, org)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(
        self,
        common_name: str,
        *,
        msp_id: str,
        role: str | None = None,
        dns: tuple[str, ...] = (),
        ips: tuple[str, ...] = (),
        usage: str = "member",
        key: ec.EllipticCurvePrivateKey | None = None,
    ) -> Member:
        key = key or ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name, self.org))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(hours=12))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        if role is not None:
            attrs = json.dumps({"attrs": {ROLE_ATTRIBUTE: role}}).encode()
            builder = builder.add_extension(
                x509.UnrecognizedExtension(ATTRS_OID, attrs), critical=False
            )
        if dns or ips:
            names = [x509.DNSName(d) for d in dns] + [
                x509.IPAddress(ipaddress.ip_address(i)) for i in ips
            ]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        if usage in ("server", "client"):
            oid = (
                ExtendedKeyUsageOID.SERVER_AUTH
                if usage == "server"
                else (ExtendedKeyUsageOID.CLIENT_AUTH)
            )
            builder = builder.add_extension(x509.ExtendedKeyUsage([oid]), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return Member(msp_id, key, cert.public_bytes(serialization.Encoding.PEM))
