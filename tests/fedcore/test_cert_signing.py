"""Certificate-signed and sealed update frames (fedcore side): real keys, real certificates."""

from __future__ import annotations

import base64
import hashlib
import json
import struct

import pytest

from fedcore import (
    ALG_ECDSA_P256,
    SEAL_OVERHEAD,
    DecryptError,
    SignatureError,
    UpdateHeader,
    WireError,
    certificate_der,
    certificate_signer,
    check_key_matches,
    decode_envelope,
    encode_update,
    generate_key,
    generate_x25519_key,
    load_certificate,
    load_ec_private_key,
    load_x25519_public_key,
    open_update_payload,
    signer_from_key,
    verify_ecdsa,
    x25519_public_b64,
)
from fedcore._canonical import canonical_json
from fedcore.pki import init_ca, issue

BASE = "ab" * 32
PAYLOAD = bytes(range(200))


@pytest.fixture(scope="module")
def device(tmp_path_factory):
    pki = tmp_path_factory.mktemp("pki")
    init_ca(pki, "test org")
    done = issue(pki, "device", "dev-1")
    return load_ec_private_key(done.key), load_certificate(done.cert)


@pytest.fixture
def key():
    return generate_key()


def header(cert=None, **changes) -> UpdateHeader:
    fields = dict(
        task="t1", round=3, device="dev-1", base=BASE, samples=40, codec="int8", counter=7
    )
    if cert is not None:
        fields.update(alg=ALG_ECDSA_P256, cert=base64.b64encode(certificate_der(cert)).decode())
    fields.update(changes)
    return UpdateHeader(**fields)


def test_a_certificate_signed_frame_carries_alg_and_certificate(device):
    key, cert = device
    frame = encode_update(header(cert), PAYLOAD, certificate_signer(key))
    env = decode_envelope(frame)
    assert env.header.alg == ALG_ECDSA_P256
    assert env.header.certificate == certificate_der(cert)
    assert len(env.signature) == 64  # r || s: the frame keeps one signature length
    verify_ecdsa(cert.public_key(), env.signature, env.signed)
    assert check_key_matches(key, cert)
    with pytest.raises(SignatureError):
        verify_ecdsa(cert.public_key(), env.signature, env.signed + b"x")


def test_ed25519_frames_name_their_algorithm(key):
    env = decode_envelope(encode_update(header(), PAYLOAD, signer_from_key(key)))
    assert env.header.alg == "ed25519"
    assert b'"alg":"ed25519"' in env.signed


def test_legacy_frames_without_alg_still_decode_as_ed25519(key):
    fields = {
        "task": "t1", "round": 3, "device": "dev-1", "base": BASE, "samples": 40,
        "codec": "int8", "counter": 7, "payload_sha256": hashlib.sha256(PAYLOAD).hexdigest(),
    }  # fmt: skip
    frame = _raw_frame(fields, PAYLOAD, key.sign)
    assert decode_envelope(frame).header.alg == "ed25519"


@pytest.mark.parametrize(
    "change",
    [
        {"alg": "rsa"},  # unknown algorithm
        {"alg": ALG_ECDSA_P256},  # ECDSA without the signer's certificate
        {"cert": "AAAA"},  # a certificate with an Ed25519 signature
        {"alg": "ed25519", "cert": ""},  # an explicit empty field has a second signed form
        {"enc": "x25519-hkdf-sha256-aes256gcm"},  # enc without epk
        {"enc": "aes-cbc", "epk": base64.b64encode(b"k" * 32).decode()},
        {"enc": "x25519-hkdf-sha256-aes256gcm", "epk": base64.b64encode(b"k" * 31).decode()},
        {"alg": ALG_ECDSA_P256, "cert": "not base64!"},
    ],
)
def test_signing_fields_are_checked_together(key, change):
    fields = {
        "task": "t1", "round": 3, "device": "dev-1", "base": BASE, "samples": 40,
        "codec": "int8", "counter": 7, "payload_sha256": hashlib.sha256(PAYLOAD).hexdigest(),
        "alg": "ed25519",
    } | change  # fmt: skip
    with pytest.raises(WireError) as info:
        decode_envelope(_raw_frame(fields, PAYLOAD, key.sign))
    assert info.value.reason == "malformed"


def test_a_sealed_payload_opens_only_with_the_gateway_key(device):
    key, cert = device
    gateway = generate_x25519_key()
    recipient = load_x25519_public_key(x25519_public_b64(gateway))
    frame = encode_update(header(cert), PAYLOAD, certificate_signer(key), seal_to=recipient)
    env = decode_envelope(frame)
    assert env.header.enc == "x25519-hkdf-sha256-aes256gcm"
    assert len(env.payload) == len(PAYLOAD) + SEAL_OVERHEAD
    assert PAYLOAD not in frame  # the broker sees no update contents
    # The signature covers the ciphertext's digest: checked before anything is decrypted.
    assert env.header.payload_sha256 == hashlib.sha256(env.payload).hexdigest()
    assert open_update_payload(env, gateway) == PAYLOAD
    with pytest.raises(DecryptError):
        open_update_payload(env, generate_x25519_key())
    with pytest.raises(DecryptError):
        open_update_payload(env, None)


def test_every_frame_has_its_own_ephemeral_key(device):
    key, cert = device
    recipient = generate_x25519_key().public_key()
    a = decode_envelope(
        encode_update(header(cert), PAYLOAD, certificate_signer(key), seal_to=recipient)
    )
    b = decode_envelope(
        encode_update(header(cert), PAYLOAD, certificate_signer(key), seal_to=recipient)
    )
    assert a.header.epk != b.header.epk and a.payload != b.payload


def test_a_ciphertext_does_not_open_under_another_header(key):
    """The header is associated data: moving a ciphertext to another frame (here: another
    counter, re-signed by the device itself) breaks its authentication."""
    gateway = generate_x25519_key()
    original = decode_envelope(
        encode_update(header(), PAYLOAD, signer_from_key(key), seal_to=gateway.public_key())
    )
    fields = json.loads(original.signed[12:])
    fields["counter"] = 8
    moved = decode_envelope(_raw_frame(fields, original.payload, key.sign))
    with pytest.raises(DecryptError):
        open_update_payload(moved, gateway)
    tampered = bytearray(original.payload)
    tampered[0] ^= 1
    fields = json.loads(original.signed[12:])
    fields["payload_sha256"] = hashlib.sha256(bytes(tampered)).hexdigest()
    with pytest.raises(DecryptError):
        open_update_payload(decode_envelope(_raw_frame(fields, bytes(tampered), key.sign)), gateway)


def _raw_frame(fields: dict, payload: bytes, sign) -> bytes:
    body = canonical_json(fields)
    signed = struct.pack(">4sBBHI", b"FLDG", 1, 1, len(body), len(payload)) + body
    signature = sign(signed)
    return signed + payload + bytes([len(signature)]) + signature
