"""Each kind of bad input, correctly signed where that is needed to reach its check, is
rejected with its reason, quickly and without a big allocation.

Kinds: oversized, truncated, NaN- and Inf-filled (every codec, scales too), values that
overflow when dequantized, wrong shape, wrong dtype, and zip-bomb-like frames (tiny frames
declaring enormous dims, counts or lengths; deeply nested or whitespace-padded headers).
"""

from __future__ import annotations

import hashlib
import json
import struct
import time
import tracemalloc

import numpy as np
import pytest

from fedcore import (
    DEFAULT_MAX_MESSAGE_BYTES,
    UpdateHeader,
    encode_tensors,
    encode_update,
    generate_key,
    public_key_b64,
    update_topic,
)
from gateway import DeviceRegistry, Rejected, RoundContext, UpdateValidator

TASK = "test-task"
BASE = "cd" * 32
SHAPES = {"w": (30, 2), "b": (2,)}
PREFIX = struct.Struct(">4sBBHI")
KEY = generate_key()
OTHER_KEY = generate_key()
REGISTRY = DeviceRegistry({"dev-0": public_key_b64(KEY), "dev-1": public_key_b64(OTHER_KEY)})
CTX = RoundContext(round=2, base=BASE, has_update=lambda d: False, last_counter=lambda d: -1)
VALIDATOR = UpdateValidator(
    task=TASK, registry=REGISTRY, shapes=SHAPES, max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES
)
#: The whole check, including decoding, may not trace more than this at its peak.
PEAK_LIMIT = 512 * 1024
TIME_LIMIT_S = 0.25

W = (np.arange(60, dtype=np.float32).reshape(30, 2) - 30.0) / 100.0
B = np.array([0.5, -0.5], np.float32)
NAN = float("nan")
INF = float("inf")


def fields(**changes) -> dict:
    out = dict(task=TASK, round=2, device="dev-0", base=BASE, samples=10, codec="f32", counter=5)
    out.update(changes)
    return out


def canonical(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def assemble(header: bytes, payload: bytes, *, declared_payload: int | None = None) -> bytes:
    """A frame signed by dev-0 with whatever header bytes and payload lengths are given."""
    p_len = len(payload) if declared_payload is None else declared_payload
    signed = PREFIX.pack(b"FLDG", 1, 1, len(header), p_len) + header
    return signed + payload + b"\x40" + KEY.sign(signed)


def signed(payload: bytes, codec: str = "f32") -> bytes:
    """A correctly signed, fresh update carrying ``payload`` (so payload checks are reached)."""
    head = fields(codec=codec)
    head["payload_sha256"] = hashlib.sha256(payload).hexdigest()
    return assemble(canonical(head), payload)


def signed_header(header: bytes, payload: bytes = b"\0\0") -> bytes:
    return assemble(header, payload)


def tensor(name: str, dtype: int, dims, body: bytes, ndim: int | None = None) -> bytes:
    dims = tuple(dims)
    head = bytes([len(name)]) + name.encode() + bytes([dtype, len(dims) if ndim is None else ndim])
    return head + struct.pack(f"<{len(dims)}I", *dims) + body


def payload(*tensors: bytes, count: int | None = None) -> bytes:
    return struct.pack("<H", len(tensors) if count is None else count) + b"".join(tensors)


def f32(values) -> bytes:
    return np.asarray(values, dtype="<f4").tobytes()


def good_b() -> bytes:
    return tensor("b", 1, (2,), f32(B))


def with_w(dtype: int, body: bytes, dims=(30, 2)) -> bytes:
    return signed(payload(tensor("w", dtype, dims, body), good_b()))


def good() -> bytes:
    return signed(encode_tensors({"w": W, "b": B}, "f32"))


def scale(v: float) -> bytes:
    return struct.pack("<f", v)


def int8s(n: int, q: int = 1) -> bytes:
    return bytes([q & 0xFF]) * n


def sparse(k: int, idx, values: bytes) -> bytes:
    return struct.pack("<I", k) + struct.pack(f"<{len(idx)}I", *idx) + values


def check(data: bytes, device: str = "dev-0") -> tuple[str, float, int]:
    """Run the validator under tracemalloc: (reason or "accepted", seconds, traced peak)."""
    topic = update_topic(TASK, device)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        started = time.perf_counter()
        try:
            VALIDATOR.check(topic, data, CTX)
            outcome = "accepted"
        except Rejected as exc:
            outcome = exc.reason
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return outcome, elapsed, peak - base


def huge_frame() -> bytes:
    return good() + b"\0" * DEFAULT_MAX_MESSAGE_BYTES


CASES = {
    # ---- oversized
    "oversized: frame over max_message_bytes": (huge_frame, "too_large"),
    "oversized: header length 2049 declared": (
        lambda: PREFIX.pack(b"FLDG", 1, 1, 2049, 0) + b"{}" + b"\x40" + b"\0" * 64,
        "malformed",
    ),
    "oversized: header length 65535 declared": (
        lambda: PREFIX.pack(b"FLDG", 1, 1, 0xFFFF, 0) + b"\0" * 100,
        "malformed",
    ),
    "oversized: payload length 4 GiB declared in a tiny frame": (
        lambda: assemble(
            canonical(fields(payload_sha256="00" * 32)), b"", declared_payload=2**32 - 1
        ),
        "truncated",
    ),
    "oversized: 4 GiB f32 tensor declared (65536 x 16384)": (
        lambda: with_w(1, b"", dims=(65536, 16384)),
        "shape_mismatch",
    ),
    # ---- truncated
    "truncated: inside the prefix": (lambda: good()[:7], "malformed"),
    "truncated: inside the header": (lambda: good()[:40], "truncated"),
    "truncated: inside the payload": (lambda: good()[:300], "truncated"),
    "truncated: signature one byte short": (lambda: good()[:-1], "truncated"),
    "truncated: one byte appended": (lambda: good() + b"\0", "truncated"),
    "truncated: payload cut, re-signed": (
        lambda: signed(encode_tensors({"w": W, "b": B}, "f32")[:-3]),
        "bad_payload",
    ),
    "truncated: payload cut inside dims, re-signed": (
        lambda: signed(payload(good_b())[:7]),
        "bad_payload",
    ),
    "truncated: trailing bytes after the last tensor, re-signed": (
        lambda: signed(encode_tensors({"w": W, "b": B}, "f32") + b"\0"),
        "bad_payload",
    ),
    # ---- NaN / Inf
    "nan-filled f32": (lambda: with_w(1, f32(np.full(60, NAN))), "non_finite"),
    "inf-filled f32": (lambda: with_w(1, f32(np.full(60, INF))), "non_finite"),
    "-inf-filled f32 bias": (
        lambda: signed(
            payload(tensor("w", 1, (30, 2), f32(W)), tensor("b", 1, (2,), f32([-INF, -INF])))
        ),
        "non_finite",
    ),
    "one nan among f32 values": (
        lambda: with_w(1, f32(np.where(np.arange(60) == 59, NAN, 0.1))),
        "non_finite",
    ),
    "int8 with nan scale": (lambda: with_w(2, scale(NAN) + int8s(60)), "non_finite"),
    "int8 with inf scale": (lambda: with_w(2, scale(INF) + int8s(60)), "non_finite"),
    "int8 with zero scale": (lambda: with_w(2, scale(0.0) + int8s(60)), "non_finite"),
    "int8 with negative scale": (lambda: with_w(2, scale(-1.0) + int8s(60)), "non_finite"),
    "int8 whose q * scale overflows float32 (127 * 3e38)": (
        lambda: with_w(2, scale(3e38) + int8s(60, 127)),
        "non_finite",
    ),
    "int8-channel with an inf scale": (
        lambda: with_w(3, scale(1.0) + scale(INF) + int8s(60)),
        "non_finite",
    ),
    "int8-channel whose q * scale overflows": (
        lambda: with_w(3, scale(3e38) * 2 + int8s(60, 127)),
        "non_finite",
    ),
    "int4 with nan scale": (lambda: with_w(4, scale(NAN) + bytes(30)), "non_finite"),
    "int4 whose q * scale overflows (7 * 3e38)": (
        lambda: with_w(4, scale(3e38) + b"\x77" * 30),
        "non_finite",
    ),
    "sparse f32 with a nan value": (
        lambda: with_w(5, sparse(2, [3, 7], f32([0.5, NAN]))),
        "non_finite",
    ),
    "sparse f32 with an inf value": (
        lambda: with_w(5, sparse(1, [3], f32([INF]))),
        "non_finite",
    ),
    "sparse int8 with inf scale": (
        lambda: with_w(6, sparse(1, [3], scale(INF) + int8s(1))),
        "non_finite",
    ),
    "sparse int8 whose q * scale overflows": (
        lambda: with_w(6, sparse(1, [3], scale(3e38) + int8s(1, 127))),
        "non_finite",
    ),
    # ---- wrong shape
    "wrong shape: w is (3, 2)": (
        lambda: signed(encode_tensors({"w": W[:3], "b": B}, "f32")),
        "shape_mismatch",
    ),
    "wrong shape: w transposed (2, 30), same size": (
        lambda: signed(encode_tensors({"w": W.T, "b": B}, "f32")),
        "shape_mismatch",
    ),
    "wrong shape: w flattened to (60,)": (
        lambda: signed(encode_tensors({"w": W.reshape(-1), "b": B}, "f32")),
        "shape_mismatch",
    ),
    "wrong shape: b missing": (lambda: signed(encode_tensors({"w": W}, "f32")), "shape_mismatch"),
    "wrong shape: an extra tensor": (
        lambda: signed(encode_tensors({"w": W, "b": B, "x": B}, "f32")),
        "shape_mismatch",
    ),
    "wrong shape: w renamed": (
        lambda: signed(encode_tensors({"v": W, "b": B}, "f32")),
        "shape_mismatch",
    ),
    "wrong shape: 5 dims": (lambda: with_w(1, f32(W), dims=(1, 1, 1, 30, 2)), "bad_payload"),
    "wrong shape: ndim 255 declared": (
        lambda: signed(payload(tensor("w", 1, (), b"", ndim=255), good_b())),
        "bad_payload",
    ),
    "wrong shape: repeated tensor name": (
        lambda: signed(payload(good_b(), good_b())),
        "bad_payload",
    ),
    # ---- wrong dtype
    "wrong dtype: code 0": (lambda: with_w(0, f32(W)), "bad_payload"),
    "wrong dtype: code 7": (lambda: with_w(7, f32(W)), "bad_payload"),
    "wrong dtype: code 255": (lambda: with_w(255, f32(W)), "bad_payload"),
    "wrong dtype: float64 data claimed as float32 (w)": (
        lambda: with_w(1, W.astype("<f8").tobytes()),
        "bad_payload",
    ),
    "wrong dtype: float64 data claimed as float32 (last tensor)": (
        lambda: signed(
            payload(
                tensor("w", 1, (30, 2), f32(W)), tensor("b", 1, (2,), B.astype("<f8").tobytes())
            )
        ),
        "bad_payload",
    ),
    "wrong dtype: int8 -128 in per-channel int8": (
        lambda: with_w(3, scale(0.1) * 2 + int8s(60, -128)),
        "bad_payload",
    ),
    "wrong dtype: int4 nibble -8": (lambda: with_w(4, scale(0.1) + b"\x88" * 30), "bad_payload"),
    # ---- zip-bomb-like
    "bomb: dims 4 x (2**32 - 1) in 30 bytes": (
        lambda: with_w(1, b"", dims=(2**32 - 1,) * 4),
        "shape_mismatch",
    ),
    "bomb: int8 tensor of 2**32 - 1 values": (
        lambda: with_w(2, scale(1.0), dims=(2**32 - 1,)),
        "shape_mismatch",
    ),
    "bomb: sparse tensor of 2**40 values claiming 4e9 indices": (
        lambda: with_w(5, struct.pack("<I", 2**32 - 1), dims=(2**20, 2**20)),
        "shape_mismatch",
    ),
    "bomb: sparse w claiming 4e9 indices of 60": (
        lambda: with_w(5, struct.pack("<I", 2**32 - 1)),
        "bad_payload",
    ),
    "bomb: sparse w claiming all 60 indices, sending 2": (
        lambda: with_w(5, sparse(60, [0, 1], f32([1.0, 2.0]))),
        "bad_payload",
    ),
    "bomb: sparse index 2**32 - 1": (
        lambda: with_w(5, sparse(1, [2**32 - 1], f32([1.0]))),
        "bad_payload",
    ),
    "bomb: sparse indices repeated": (
        lambda: with_w(5, sparse(2, [4, 4], f32([1.0, 2.0]))),
        "bad_payload",
    ),
    "bomb: int8-channel with 2**32 - 1 channels and no rows": (
        lambda: with_w(3, b"", dims=(0, 2**32 - 1)),
        "bad_payload",
    ),
    "bomb: 65535 tensors declared in 2 bytes": (lambda: signed(b"\xff\xff"), "bad_payload"),
    "bomb: name length 255 with 3 bytes left": (
        lambda: signed(b"\x01\x00\xffabc"),
        "bad_payload",
    ),
    "bomb: deeply nested header JSON (1000 levels), signed": (
        lambda: signed_header(b"[" * 1000 + b"]" * 1000),
        "malformed",
    ),
    "bomb: nested header field (600 levels), signed": (
        lambda: signed_header(
            canonical(fields(payload_sha256="00" * 32))[:-1]
            + b',"z":'
            + b"[" * 600
            + b"]" * 600
            + b"}"
        ),
        "malformed",
    ),
    "bomb: header of 2 KB whitespace, signed": (lambda: signed_header(b" " * 2048), "malformed"),
    "bomb: header of 2 KB digits, signed": (lambda: signed_header(b"9" * 2048), "malformed"),
    # ---- header values json accepts but the wire must refuse
    "header: samples 1e400 (inf after parsing), signed": (
        lambda: signed_header(
            canonical(fields(payload_sha256="00" * 32)).replace(b'"samples":10', b'"samples":1e400')
        ),
        "malformed",
    ),
    "header: NaN literal, signed": (
        lambda: signed_header(
            canonical(fields(payload_sha256="00" * 32)).replace(b'"samples":10', b'"samples":NaN')
        ),
        "malformed",
    ),
    "header: lone surrogate in device, signed": (
        lambda: signed_header(
            canonical(fields(payload_sha256="00" * 32)).replace(b'"dev-0"', b'"\\ud800"')
        ),
        "malformed",
    ),
    "header: samples true, signed": (
        lambda: signed_header(canonical(fields(samples=True, payload_sha256="00" * 32))),
        "malformed",
    ),
    "header: round 2**53, signed": (
        lambda: signed_header(canonical(fields(round=2**53, payload_sha256="00" * 32))),
        "malformed",
    ),
}


def test_the_reference_frame_is_accepted():
    outcome, _, peak = check(good())
    assert outcome == "accepted"
    assert peak < PEAK_LIMIT


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_rejected_quickly_without_allocating(name):
    build, expected = CASES[name]
    data = build()
    outcome, elapsed, peak = check(data)
    assert outcome == expected, (name, outcome)
    assert elapsed < TIME_LIMIT_S, (name, elapsed)
    assert peak < PEAK_LIMIT, (name, peak)


def test_int8_overflow_is_refused_but_largest_finite_scale_is_fine():
    """Dequantized int8 (codec 2) must stay finite: 127 * scale <= FLT_MAX."""
    limit = float(np.finfo(np.float32).max) / 127
    ok = with_w(2, scale(limit * 0.99) + int8s(60, 127))
    assert check(ok)[0] == "accepted"
    assert check(with_w(2, scale(limit * 1.02) + int8s(60, 127)))[0] == "non_finite"
    assert check(with_w(2, scale(limit * 1.02) + int8s(60, 0)))[0] == "accepted"


def test_encoder_built_frames_for_every_codec_are_accepted():
    for codec in ("f32", "int8", "int8-channel", "int4", "topk-f32", "topk-int8"):
        data = encode_update(
            UpdateHeader(**fields(codec=codec)),
            encode_tensors({"w": W, "b": B}, codec, k_fraction=0.1),
            KEY.sign,
        )
        assert check(data)[0] == "accepted", codec
