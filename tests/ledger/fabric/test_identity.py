"""Identities and the ECDSA signer: creator bytes, DER low-S signatures, PEM loading."""

import hashlib

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import (
    Prehashed,
    decode_dss_signature,
    encode_dss_signature,
)
from fabric_protos.msp import identities_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

import ledger.fabric
from fedcore import ConfigError
from ledger.fabric import (
    Identity,
    ecdsa_signer,
    load_identity,
    load_private_key,
    load_signer,
    sha256,
)
from ledger.fabric._identity import P256_HALF_ORDER, P256_ORDER, check_key_pair, is_low_s

KEY = ec.generate_private_key(ec.SECP256R1())
SIGNER = ecdsa_signer(KEY)


def test_the_creator_is_a_serialized_identity(admin):
    identity = admin.identity
    creator = identity.creator()
    parsed = identities_pb2.SerializedIdentity.FromString(creator)
    assert parsed.mspid == "Org1MSP"
    assert parsed.id_bytes == admin.cert_pem
    assert identity.creator() == creator  # the same bytes every time
    assert Identity("Org1MSP", admin.cert_pem.decode()) == identity
    assert "BEGIN CERTIFICATE" not in repr(identity)


def test_an_identity_needs_an_msp_id_and_a_certificate(admin):
    with pytest.raises(ValueError, match="MSP id"):
        Identity("", admin.cert_pem)
    with pytest.raises(ValueError, match="X.509"):
        Identity("Org1MSP", b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    with pytest.raises(TypeError):
        Identity("Org1MSP", 42)


def test_signatures_are_der_ecdsa_p256_over_sha256_of_the_exact_bytes():
    message = b"proposal bytes \x00\x01"
    signature = SIGNER(sha256(message))
    assert sha256(message) == hashlib.sha256(message).digest()
    # Verifies as a plain ECDSA/SHA-256 signature of the message itself (what a peer does).
    KEY.public_key().verify(signature, message, ec.ECDSA(hashes.SHA256()))
    decode_dss_signature(signature)  # DER
    with pytest.raises(Exception):  # noqa: B017 - any verification failure
        KEY.public_key().verify(signature, message + b"!", ec.ECDSA(hashes.SHA256()))


def test_high_s_signatures_never_leave_the_signer():
    digest = sha256(b"the same message, signed again and again")
    raw_high = 0
    for _ in range(400):
        raw = KEY.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))
        raw_high += decode_dss_signature(raw)[1] > P256_HALF_ORDER
        assert is_low_s(SIGNER(digest))
    assert raw_high > 100  # without normalization about half would be high-S


@settings(max_examples=300, deadline=None)
@given(message=st.binary(max_size=256))
def test_every_signature_is_low_s_and_valid(message):
    signature = SIGNER(sha256(message))
    r, s = decode_dss_signature(signature)
    assert 0 < s <= P256_HALF_ORDER
    KEY.public_key().verify(signature, message, ec.ECDSA(hashes.SHA256()))
    # Its high-S twin is valid ECDSA too: Fabric's refusal of it is a policy, not math.
    twin = encode_dss_signature(r, P256_ORDER - s)
    KEY.public_key().verify(twin, message, ec.ECDSA(hashes.SHA256()))
    assert not is_low_s(twin)


def test_the_signer_takes_a_sha256_digest_and_a_p256_key():
    with pytest.raises(ValueError, match="32-byte"):
        SIGNER(b"not a digest")
    with pytest.raises(TypeError, match="P-256"):
        ecdsa_signer(ec.generate_private_key(ec.SECP384R1()))
    with pytest.raises(TypeError, match="P-256"):
        ecdsa_signer(ed25519.Ed25519PrivateKey.generate())


def test_loading_from_pem_files(tmp_path, admin):
    (tmp_path / "cert.pem").write_bytes(admin.cert_pem)
    (tmp_path / "key.pem").write_bytes(admin.key_pem)
    sec1 = admin.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    (tmp_path / "sec1.pem").write_bytes(sec1)
    identity = load_identity("Org1MSP", tmp_path / "cert.pem")
    assert identity == admin.identity
    key = load_private_key(tmp_path / "sec1.pem")
    check_key_pair(identity, key)
    digest = sha256(b"m")
    admin.key.public_key().verify(
        load_signer(tmp_path / "key.pem")(digest), digest, ec.ECDSA(Prehashed(hashes.SHA256()))
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "certificate file not found"),
        (b"hello", "not a PEM X.509 certificate"),
    ],
)
def test_certificate_errors_name_the_file(tmp_path, content, message):
    path = tmp_path / "cert.pem"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=message) as info:
        load_identity("Org1MSP", path)
    assert info.value.file == str(path) and str(path) in str(info.value)


def test_private_key_errors_name_the_file(tmp_path):
    path = tmp_path / "key.pem"
    with pytest.raises(ConfigError, match="private key file not found") as info:
        load_private_key(path)
    assert info.value.file == str(path)
    path.write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="unencrypted PEM private key"):
        load_private_key(path)
    encrypted = KEY.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    )
    path.write_bytes(encrypted)
    with pytest.raises(ConfigError, match="unencrypted PEM private key"):
        load_private_key(path)
    ed = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.write_bytes(ed)
    with pytest.raises(ConfigError, match="P-256") as info:
        load_private_key(path)
    assert str(path) in str(info.value)


def test_a_key_that_is_not_the_certificates_is_caught_early(admin):
    with pytest.raises(ValueError, match="does not match the certificate"):
        check_key_pair(admin.identity, KEY)


def test_the_public_surface():
    names = ledger.fabric.__all__
    assert names == sorted(names, key=lambda n: (not n.isupper(), not n[0].isupper(), n))
    public = {n for n in dir(ledger.fabric) if not n.startswith("_")}
    submodules = {n for n in public if type(getattr(ledger.fabric, n)).__name__ == "module"}
    assert set(names) == public - submodules
    assert set(names) == {
        "CHANNEL_OPTIONS", "MAX_MESSAGE_BYTES", "BlockStream", "ChaincodeEvent", "ChaincodeEventStream",
        "ChaincodeEventsError", "CommitError", "CommitStatus", "CommitStatusError",
        "ConnectionProfile", "DeliverError", "EndorseError", "ErrorDetail", "EvaluateError", "FabricClient",
        "FabricError", "FabricLedger", "FabricVerifyReport", "Hash", "Identity", "Proposal", "Signer",
        "SubmitError", "Transaction", "block_header_hash", "connect", "ecdsa_signer", "load_identity",
        "load_private_key", "load_profile", "load_signer", "open_channel", "sha256", "verify_blocks",
        "verify_chain",
    }  # fmt: skip
