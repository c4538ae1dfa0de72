import hashlib

import numpy as np
import pytest

from fedcore import (
    TYPE_MODEL,
    TYPE_UPDATE,
    ModelHeader,
    SignatureError,
    UpdateHeader,
    WireError,
    canonical_json,
    decode_envelope,
    encode_model,
    encode_tensors,
    encode_update,
    generate_key,
    signer_from_key,
    verify_signature,
)

BASE = "ab" * 32


def header(**changes):
    fields = dict(
        task="t1", round=3, device="dev-1", base=BASE, samples=40, codec="int8", counter=7
    )
    fields.update(changes)
    return UpdateHeader(**fields)


@pytest.fixture
def key():
    return generate_key()


@pytest.fixture
def payload():
    return encode_tensors({"w": np.ones((3, 2), np.float32)}, "int8")


def test_update_round_trip_and_signature(key, payload):
    frame = encode_update(header(), payload, signer_from_key(key))
    env = decode_envelope(frame)
    assert env.type == TYPE_UPDATE
    assert env.header == header(payload_sha256=hashlib.sha256(payload).hexdigest())
    assert env.payload == payload
    verify_signature(key.public_key(), env.signature, env.signed)
    assert env.size == len(frame)
    assert env.digest() == hashlib.sha256(frame).hexdigest()


def test_signature_covers_prefix_and_header(key, payload):
    frame = encode_update(header(), payload, signer_from_key(key))
    env = decode_envelope(frame)
    assert env.signed == frame[: 12 + len(canonical_json(dict(
        task="t1", round=3, device="dev-1", base=BASE, samples=40, codec="int8", counter=7,
        payload_sha256=hashlib.sha256(payload).hexdigest(), alg="ed25519",
    )))]  # fmt: skip


def test_another_key_does_not_verify(key, payload):
    env = decode_envelope(encode_update(header(), payload, signer_from_key(key)))
    with pytest.raises(SignatureError):
        verify_signature(generate_key().public_key(), env.signature, env.signed)


def test_model_round_trip(key, payload):
    frame = encode_model(
        ModelHeader(task="t1", round=0, status="open", deadline=12.5), payload, key.sign
    )
    env = decode_envelope(frame)
    assert env.type == TYPE_MODEL
    assert env.header.model_hash == hashlib.sha256(payload).hexdigest()


def test_a_model_carries_the_gateways_run_and_a_bad_run_is_malformed(key, payload):
    plain = ModelHeader(task="t1", round=0, status="open", deadline=12.5)
    with_run = ModelHeader(task="t1", round=0, status="open", deadline=12.5, run="0a" * 8)
    assert decode_envelope(encode_model(with_run, payload, key.sign)).header.run == "0a" * 8
    # absent when unset: the header is byte-identical to one from before the field
    assert b'"run"' not in encode_model(plain, payload, key.sign)
    for bad in ("0A" * 8, "0a" * 7, "zz" * 8):
        with pytest.raises(WireError, match="run must be 16 lowercase hex"):
            encode_model(
                ModelHeader(task="t1", round=0, status="open", deadline=1.0, run=bad),
                payload,
                key.sign,
            )


def test_tampered_payload_is_a_digest_mismatch(key, payload):
    frame = bytearray(encode_update(header(), payload, key.sign))
    frame[-70] ^= 1  # inside the payload, before the signature
    with pytest.raises(WireError) as info:
        decode_envelope(bytes(frame))
    assert info.value.reason == "digest_mismatch"


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda f: f[:5], "malformed"),
        (lambda f: b"XXXX" + f[4:], "malformed"),
        (lambda f: f[:4] + b"\x02" + f[5:], "unsupported_version"),
        (lambda f: f[:5] + b"\x09" + f[6:], "malformed"),
        (lambda f: f[:-1], "truncated"),
        (lambda f: f + b"\0", "truncated"),
    ],
)
def test_frame_errors(key, payload, mutate, reason):
    frame = encode_update(header(), payload, key.sign)
    with pytest.raises(WireError) as info:
        decode_envelope(mutate(frame))
    assert info.value.reason == reason


def test_size_limit_checked_first(key, payload):
    frame = encode_update(header(), payload, key.sign)
    with pytest.raises(WireError) as info:
        decode_envelope(frame, max_bytes=len(frame) - 1)
    assert info.value.reason == "too_large"


@pytest.mark.parametrize(
    "bad",
    [
        {"round": -1},
        {"round": True},
        {"samples": 0},
        {"device": "a/b"},
        {"device": "+"},
        {"codec": "zip"},
        {"base": "xyz"},
        {"counter": 2**60},
    ],
)
def test_header_schema_is_strict(key, payload, bad):
    with pytest.raises(WireError) as info:
        encode_update(header(**bad), payload, key.sign)
    assert info.value.reason == "malformed"


def test_non_canonical_or_extra_header_is_refused(key, payload):
    import struct

    fields = {
        "task": "t1", "round": 1, "device": "d", "base": BASE, "samples": 1, "codec": "int8",
        "counter": 1, "payload_sha256": hashlib.sha256(payload).hexdigest(),
    }  # fmt: skip
    for body in (
        canonical_json({**fields, "extra": 1}),
        canonical_json(fields).replace(b",", b", "),
        b'{"round": NaN}',
    ):
        prefix = struct.pack(">4sBBHI", b"FLDG", 1, 1, len(body), len(payload))
        frame = prefix + body + payload + bytes([64]) + key.sign(prefix + body)
        with pytest.raises(WireError) as info:
            decode_envelope(frame)
        assert info.value.reason == "malformed"


def test_identifier_with_trailing_newline_is_refused(key, payload):
    with pytest.raises(WireError) as info:
        encode_update(header(device="dev-1\n"), payload, key.sign)
    assert info.value.reason == "malformed"
