"""The organisation CA with real cryptography: identities in certificates, keys 0600 and never
shown, idempotent operations, and a chain check that refuses what it must."""

from __future__ import annotations

import datetime as dt
import logging
import os
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedcore.pki import (
    PkiError,
    ca_cert_path,
    crl_path,
    init_ca,
    issue,
    load_crl,
    refresh_crl,
    revoke,
    verify_chain,
    write_private_key,
)

ORG = "Acme Health"


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def load(path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def attr(cert: x509.Certificate, oid) -> str:
    (value,) = cert.subject.get_attributes_for_oid(oid)
    return value.value


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def pki(tmp_path):
    init_ca(tmp_path / "pki", ORG)
    return tmp_path / "pki"


@pytest.fixture
def loose_umask():
    """A umask that would leave new files world-readable: 0600 must not depend on it."""
    old = os.umask(0)
    yield
    os.umask(old)


def test_init_creates_a_ca_once_and_then_reports_it(tmp_path, loose_umask):
    directory = tmp_path / "pki"
    first = init_ca(directory, ORG)
    assert first.created
    ca = load(first.cert)
    assert attr(ca, NameOID.ORGANIZATION_NAME) == ORG
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp256r1"
    assert mode(first.key) == 0o600
    assert load_crl(first.crl).get_revoked_certificate_by_serial_number(1) is None  # empty CRL
    files = {p: p.read_bytes() for p in directory.iterdir() if p.is_file()}

    again = init_ca(directory, ORG)
    assert not again.created
    assert again.fingerprint == first.fingerprint
    assert {p: p.read_bytes() for p in directory.iterdir() if p.is_file()} == files

    with pytest.raises(PkiError) as err:
        init_ca(directory, "Other Clinic")
    assert err.value.reason == "ca_mismatch"
    assert str(ca_cert_path(directory)) in str(err.value)
    assert ca_cert_path(directory).read_bytes() == files[ca_cert_path(directory)]


@pytest.mark.parametrize(
    ("kind", "usage"),
    [
        ("device", ExtendedKeyUsageOID.CLIENT_AUTH),
        ("gateway", ExtendedKeyUsageOID.CLIENT_AUTH),
        ("broker", ExtendedKeyUsageOID.SERVER_AUTH),
    ],
)
def test_issued_certificates_name_the_identity_and_its_use(pki, kind, usage, loose_umask):
    names = {"dns": ["localhost"], "ips": ["127.0.0.1"]} if kind == "broker" else {}
    issued = issue(pki, kind, f"{kind}-01", **names)
    assert issued.action == "issued" and issued.changed
    cert = load(issued.cert)
    assert attr(cert, NameOID.COMMON_NAME) == f"{kind}-01"
    assert attr(cert, NameOID.ORGANIZATIONAL_UNIT_NAME) == kind
    assert attr(cert, NameOID.ORGANIZATION_NAME) == ORG
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [usage]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.issuer == load(ca_cert_path(pki)).subject
    if kind == "broker":
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == ["localhost"]
        assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    # the key is the certificate's, EC P-256, and only its owner can read it
    assert mode(issued.key) == 0o600
    key = serialization.load_pem_private_key(issued.key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert key.public_key() == cert.public_key()
    assert verify_chain(issued.cert.read_bytes(), ca_cert_path(pki).read_bytes(), kind=kind) == (
        f"{kind}-01"
    )


def test_reissuing_a_valid_certificate_returns_it_unchanged(pki):
    first = issue(pki, "device", "dev-1")
    cert, key = first.cert.read_bytes(), first.key.read_bytes()
    again = issue(pki, "device", "dev-1")
    assert again.action == "existing" and not again.changed
    assert again.serial == first.serial and again.fingerprint == first.fingerprint
    assert first.cert.read_bytes() == cert and first.key.read_bytes() == key


def test_an_expired_certificate_is_renewed_on_reissue(pki):
    old = issue(pki, "device", "dev-1", days=30, now=now() - dt.timedelta(days=400))
    renewed = issue(pki, "device", "dev-1")
    assert renewed.action == "renewed"
    assert renewed.serial != old.serial
    verify_chain(renewed.cert.read_bytes(), ca_cert_path(pki).read_bytes())


def test_verify_chain_accepts_a_good_certificate(pki):
    issued = issue(pki, "device", "dev-1")
    ca = ca_cert_path(pki).read_bytes()
    assert verify_chain(issued.cert.read_bytes(), ca, load_crl(crl_path(pki))) == "dev-1"
    assert verify_chain(issued.cert.read_bytes().decode(), ca.decode(), kind="device") == "dev-1"


def test_verify_chain_refuses_a_certificate_of_another_ca(pki, tmp_path):
    # The forger copies everything public: same organisation, so the same CA subject name.
    init_ca(tmp_path / "forger", ORG)
    forged = issue(tmp_path / "forger", "device", "dev-1")
    assert load(forged.cert).issuer == load(ca_cert_path(pki)).subject
    with pytest.raises(PkiError, match="not carry a valid signature of this CA") as err:
        verify_chain(forged.cert.read_bytes(), ca_cert_path(pki).read_bytes())
    assert err.value.reason == "untrusted"

    init_ca(tmp_path / "other", "Other Clinic")
    other = issue(tmp_path / "other", "device", "dev-1")
    with pytest.raises(PkiError, match="not by this CA") as err:
        verify_chain(other.cert.read_bytes(), ca_cert_path(pki).read_bytes())
    assert err.value.reason == "untrusted"


def test_verify_chain_refuses_expired_and_not_yet_valid_certificates(pki):
    ca = ca_cert_path(pki).read_bytes()
    expired = issue(pki, "device", "old", days=30, now=now() - dt.timedelta(days=400))
    with pytest.raises(PkiError, match="expired") as err:
        verify_chain(expired.cert.read_bytes(), ca)
    assert err.value.reason == "expired"
    future = issue(pki, "device", "future", now=now() + dt.timedelta(days=10))
    with pytest.raises(PkiError) as err:
        verify_chain(future.cert.read_bytes(), ca)
    assert err.value.reason == "not_yet_valid"


def test_revoked_certificates_are_refused_and_revocation_is_idempotent(pki):
    issued = issue(pki, "device", "dev-1")
    issue(pki, "device", "dev-2")
    ca = ca_cert_path(pki).read_bytes()

    done = revoke(pki, "dev-1")
    assert done.revoked == (issued.serial,) and done.changed
    crl = load_crl(pki)  # a directory means its crl.pem
    with pytest.raises(PkiError, match="revoked") as err:
        verify_chain(issued.cert.read_bytes(), ca, crl)
    assert err.value.reason == "revoked"
    assert verify_chain((pki / "devices" / "dev-2.pem").read_bytes(), ca, crl) == "dev-2"

    before = crl_path(pki).read_bytes()
    again = revoke(pki, "dev-1")
    assert not again.changed and again.revoked == () and again.already == (issued.serial,)
    assert crl_path(pki).read_bytes() == before

    # Re-enabling a revoked identity is a decision, not a side effect of a re-run.
    with pytest.raises(PkiError, match="rotate") as err:
        issue(pki, "device", "dev-1")
    assert err.value.reason == "revoked"
    back = issue(pki, "device", "dev-1", rotate=True)
    assert verify_chain(back.cert.read_bytes(), ca, load_crl(pki)) == "dev-1"

    with pytest.raises(PkiError, match="no certificate was ever issued") as err:
        revoke(pki, "nobody")
    assert err.value.reason == "unknown"


def test_rotation_gives_a_new_key_and_certificate_that_verify(pki):
    first = issue(pki, "device", "dev-1")
    old_cert, old_key = first.cert.read_bytes(), first.key.read_bytes()
    rotated = issue(pki, "device", "dev-1", rotate=True)
    assert rotated.action == "rotated"
    assert rotated.cert == first.cert and rotated.key == first.key  # same place, new contents
    assert rotated.key.read_bytes() != old_key and rotated.serial != first.serial
    assert mode(rotated.key) == 0o600
    new_cert = load(rotated.cert)
    key = serialization.load_pem_private_key(rotated.key.read_bytes(), password=None)
    assert key.public_key() == new_cert.public_key()
    assert new_cert.public_key() != x509.load_pem_x509_certificate(old_cert).public_key()
    ca = ca_cert_path(pki).read_bytes()
    assert verify_chain(rotated.cert.read_bytes(), ca, load_crl(pki)) == "dev-1"
    # the old certificate stays valid until the rotation is finished...
    assert verify_chain(old_cert, ca, load_crl(pki)) == "dev-1"
    # ...by revoking what the rotation superseded, and only that
    done = revoke(pki, "dev-1", superseded_only=True)
    assert done.revoked == (first.serial,)
    with pytest.raises(PkiError, match="revoked"):
        verify_chain(old_cert, ca, load_crl(pki))
    assert verify_chain(rotated.cert.read_bytes(), ca, load_crl(pki)) == "dev-1"


def test_a_name_belongs_to_one_kind(pki):
    issue(pki, "device", "site-1")
    with pytest.raises(PkiError, match="already the name of a device") as err:
        issue(pki, "gateway", "site-1")
    assert err.value.reason == "name_taken"


def test_verify_chain_checks_the_kind(pki):
    issued = issue(pki, "device", "dev-1")
    with pytest.raises(PkiError, match="not a gateway") as err:
        verify_chain(issued.cert.read_bytes(), ca_cert_path(pki).read_bytes(), kind="gateway")
    assert err.value.reason == "wrong_kind"


def test_a_crl_must_be_the_cas_own_and_current(pki, tmp_path):
    issued = issue(pki, "device", "dev-1")
    ca = ca_cert_path(pki).read_bytes()
    init_ca(tmp_path / "other", ORG)  # same issuer name, another key
    with pytest.raises(PkiError) as err:
        verify_chain(issued.cert.read_bytes(), ca, load_crl(tmp_path / "other"))
    assert err.value.reason == "crl_invalid"
    stale = load_crl(pki)
    later = now() + dt.timedelta(days=40)  # past the 30-day CRL, within the certificate
    with pytest.raises(PkiError, match="refresh") as err:
        verify_chain(issued.cert.read_bytes(), ca, stale, now=later)
    assert err.value.reason == "crl_expired"
    refresh_crl(pki, crl_days=90)
    assert verify_chain(issued.cert.read_bytes(), ca, load_crl(pki), now=later) == "dev-1"


def test_errors_are_clear_and_name_the_files(tmp_path, pki):
    with pytest.raises(PkiError, match="pki init") as err:
        issue(tmp_path / "empty", "device", "dev-1")
    assert err.value.reason == "no_ca" and str(tmp_path / "empty") in str(err.value)
    assert not (tmp_path / "empty").exists()  # a mistyped path leaves nothing behind

    ca_cert_path(pki).write_text("garbage")
    with pytest.raises(PkiError) as err:
        issue(pki, "device", "dev-1")
    assert str(ca_cert_path(pki)) in str(err.value) and "not a PEM certificate" in str(err.value)

    (tmp_path / "bad.pem").write_text("junk")
    with pytest.raises(PkiError) as err:
        load_crl(tmp_path / "bad.pem")
    assert str(tmp_path / "bad.pem") in str(err.value)
    with pytest.raises(PkiError) as err:
        verify_chain(b"junk", b"junk")
    assert err.value.reason == "malformed"


@pytest.mark.parametrize(
    ("kind", "name", "options", "message"),
    [
        ("device", "a/b", {}, "not an identifier"),
        ("device", "+", {}, "not an identifier"),
        ("printer", "p-1", {}, "unknown certificate kind"),
        ("device", "dev-1", {"days": 0}, "at least 1"),
        ("device", "dev-1", {"dns": ["x.example"]}, "only broker certificates"),
        ("broker", "broker", {}, "needs the host names"),
        ("broker", "broker", {"ips": ["not-an-ip"]}, "not an IP address"),
    ],
)
def test_bad_arguments_are_refused(pki, kind, name, options, message):
    with pytest.raises(PkiError, match=message):
        issue(pki, kind, name, **options)


def test_private_keys_are_written_owner_only_whatever_the_umask(tmp_path, loose_umask):
    path = tmp_path / "k" / "key.pem"
    path.parent.mkdir()
    path.write_text("previous, world-readable")
    os.chmod(path, 0o644)
    write_private_key(ec.generate_private_key(ec.SECP256R1()), path)
    assert mode(path) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert [p.name for p in path.parent.iterdir()] == ["key.pem"]  # no temporary left behind


def test_nothing_shows_a_private_key(pki, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    results = [
        init_ca(pki, ORG),
        issue(pki, "device", "dev-1"),
        issue(pki, "device", "dev-1", rotate=True),
        issue(pki, "broker", "broker", ips=["127.0.0.1"]),
        revoke(pki, "dev-1", superseded_only=True),
        revoke(pki, "dev-1"),
    ]
    try:
        issue(pki, "device", "dev-1")
    except PkiError as exc:
        results.append(exc)
    keys = [p.read_bytes() for p in pki.rglob("*.key")]
    assert len(keys) == 3
    captured = capsys.readouterr()
    shown = [captured.out, captured.err, caplog.text]
    shown += [repr(r) for r in results]
    shown += [str(r.to_dict()) for r in results if hasattr(r, "to_dict")]
    shown.append((pki / "index.json").read_text())
    for text in shown:
        assert "PRIVATE KEY" not in text
        for key in keys:
            body = b"".join(key.splitlines()[1:-1]).decode()
            assert body[:40] not in text


def test_x25519_key_is_owner_only_idempotent_and_printed_public_only(pki, loose_umask):
    from typer.testing import CliRunner

    from fedcore import load_x25519_private_key, x25519_public_b64
    from fedcore.pki import x25519_key
    from fedledger.cli import app

    first = x25519_key(pki, "gateway")
    assert first.created and mode(first.key) == 0o600
    assert first.public.read_text().strip() == first.public_key
    assert x25519_public_b64(load_x25519_private_key(first.key)) == first.public_key
    before = first.key.read_bytes()
    again = x25519_key(pki, "gateway")
    assert not again.created and not again.changed
    assert again.public_key == first.public_key and first.key.read_bytes() == before
    done = CliRunner().invoke(app, ["pki", "x25519", "gateway", "--dir", str(pki), "--json"])
    assert done.exit_code == 0, done.output
    assert '"changed": false' in done.output and first.public_key in done.output
    assert "PRIVATE" not in done.output
    with pytest.raises(PkiError):
        x25519_key(pki, "not/a name")
