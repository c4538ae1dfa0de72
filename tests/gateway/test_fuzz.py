"""Fuzzing the gateway's decoder and validator: no input makes anything but a verdict.

Every generated payload goes through ``UpdateValidator.check`` (which runs
``decode_envelope`` and ``iter_tensors``) with a realistic round context and registry, and
must end accepted or rejected with a reason from ``REJECT_REASONS``; any other exception
fails the test with the operator and the bytes that caused it.

The bulk (``test_fuzz_100k_payloads``) is a seeded loop over mutation operators, because
it is fast: random bytes; valid frames with byte flips, insertions, deletions,
truncations and extensions; rewritten prefix lengths; mutated header JSON (random values
of random types, extra and missing fields, huge numbers, unicode, deep nesting), left with
the old signature or re-signed by a registered device; signed headers that reach the
freshness checks; and structured payload mutations (dtype codes, ndim, dims, scales,
counts, sparse indices, lengths, NaN and Inf), re-hashed and re-signed so the codec
checks are reached. A smaller hypothesis test covers the payload structure with shrinking.
"""

from __future__ import annotations

import hashlib
import json
import random
import resource
import struct
import time
import tracemalloc
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedcore import (
    CODECS,
    DEFAULT_MAX_MESSAGE_BYTES,
    ModelHeader,
    UpdateHeader,
    encode_model,
    encode_tensors,
    encode_update,
    generate_key,
    public_key_b64,
    update_topic,
)
from gateway import REJECT_REASONS, DeviceRegistry, Rejected, RoundContext, UpdateValidator

TASK = "fuzz-task"
BASE = "cd" * 32
SHAPES = {"w": (30, 2), "b": (2,)}
ROUND = 2
N_LOOP = 100_000
N_HYPOTHESIS = 1500
MAGIC = b"FLDG"
PREFIX = struct.Struct(">4sBBHI")

KEYS = {f"dev-{i}": generate_key() for i in range(3)}
STRANGER = generate_key()
REGISTRY = DeviceRegistry({d: public_key_b64(k) for d, k in KEYS.items()})
# dev-0 is fresh, dev-1 has sent counter 3 before, dev-2 already contributed this round.
CTX = RoundContext(
    round=ROUND,
    base=BASE,
    has_update={"dev-2"}.__contains__,
    last_counter=lambda d: {"dev-1": 3}.get(d, -1),
)


def make_validator() -> UpdateValidator:
    return UpdateValidator(
        task=TASK, registry=REGISTRY, shapes=SHAPES, max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES
    )


def good_fields(**changes):
    fields = dict(
        task=TASK, round=ROUND, device="dev-0", base=BASE, samples=10, codec="int8", counter=5
    )
    fields.update(changes)
    return fields


def canonical(value) -> bytes:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def assemble(header: bytes, payload: bytes, *, key=None, kind=1, version=1, sig=None) -> bytes:
    """A frame with consistent lengths; signed by ``key`` unless ``sig`` is given."""
    signed = PREFIX.pack(MAGIC, version, kind, len(header) & 0xFFFF, len(payload)) + header
    if sig is None:
        sig = (key or KEYS["dev-0"]).sign(signed)
    return signed + payload + bytes([len(sig) & 0xFF]) + sig


def signed_update(payload: bytes, *, key=None, **changes) -> bytes:
    fields = good_fields(**changes)
    fields["payload_sha256"] = hashlib.sha256(payload).hexdigest()
    return assemble(canonical(fields), payload, key=key or KEYS.get(fields["device"]))


_rng0 = np.random.default_rng(7)
_DELTA = {
    "w": (_rng0.normal(size=(30, 2)) * 0.1).astype(np.float32),
    "b": (_rng0.normal(size=2) * 0.1).astype(np.float32),
}
VALID_PAYLOADS = {codec: encode_tensors(_DELTA, codec, k_fraction=0.2) for codec in CODECS}
VALID_FRAMES = [
    encode_update(UpdateHeader(**good_fields(codec=c)), p, KEYS["dev-0"].sign)
    for c, p in VALID_PAYLOADS.items()
]
MODEL_FRAME = encode_model(
    ModelHeader(task=TASK, round=ROUND, status="open", deadline=0.0),
    VALID_PAYLOADS["f32"],
    KEYS["dev-0"].sign,
)


def run_case(
    validator: UpdateValidator, data: bytes, tally: Counter, op: str, topic=None, codec=None
):
    topic = topic or update_topic(TASK, "dev-0")
    try:
        accepted = validator.check(topic, data, CTX)
    except Rejected as exc:
        assert exc.reason in REJECT_REASONS, (op, exc.reason)
        tally[exc.reason] += 1
        if codec is not None and exc.reason in ("bad_payload", "non_finite", "shape_mismatch"):
            detail = exc.detail.split(":")[0] if ":" in exc.detail else "validator"
            codec[detail] += 1  # the CodecError reason, when there is one
        return
    except Exception as exc:  # anything else is a bug
        raise AssertionError(
            f"{op}: {type(exc).__name__}: {exc} escaped for {data[:4096].hex()}"
        ) from exc
    assert {v.name: v.shape for v in accepted.views} == SHAPES, op
    tally["accepted"] += 1


# ---------------------------------------------------------------- random values

SPECIAL_F32 = [
    float("nan"),
    float("inf"),
    float("-inf"),
    0.0,
    -0.0,
    -1.0,
    3.4e38,
    -3.4e38,
    1e-45,
    1.17549435e-38,
    1.0,
    0.01,
]
SPECIAL_U32 = [0, 1, 2, 29, 30, 31, 59, 60, 61, 62, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1]


def rand_json(r: random.Random, depth: int = 0):
    """A random JSON value of a random type."""
    choice = r.randrange(12 if depth < 3 else 8)
    if choice == 0:
        return r.randint(-(2**64), 2**64)
    if choice == 1:
        return r.choice([0, -1, 1, 2**53, 2**53 - 1, 10**300, -(10**300), 2**63])
    if choice == 2:
        return r.choice([0.5, -0.0, 1e308, 2.0, 5e-324])
    if choice == 3:
        return r.choice([True, False, None])
    if choice == 4:
        return "".join(
            chr(r.choice([r.randrange(32, 127), r.randrange(0x80, 0x2FFF)]))
            for _ in range(r.randrange(0, 12))
        )
    if choice == 5:
        return r.choice(
            ["", "dev-0", "dev-1", TASK, "int8", "f32", BASE, "x" * 70, "é", "\u2603", "\x00"]
        )
    if choice == 6:
        return r.choice(CODECS)
    if choice == 7:
        return "".join(r.choice("0123456789abcdefABCDEFg") for _ in range(r.choice([63, 64, 65])))
    if choice in (8, 9):
        return [rand_json(r, depth + 1) for _ in range(r.randrange(0, 4))]
    return {str(rand_json(r, 3))[:10]: rand_json(r, depth + 1) for _ in range(r.randrange(0, 4))}


RAW_HEADER_EDITS = [
    lambda h: h.replace(b'"samples":10', b'"samples":1e400'),
    lambda h: h.replace(b'"samples":10', b'"samples":NaN'),
    lambda h: h.replace(b'"samples":10', b'"samples":Infinity'),
    lambda h: h.replace(b'"samples":10', b'"samples":10.0'),
    lambda h: h.replace(b'"samples":10', b'"samples":' + b"9" * 1500),
    lambda h: h.replace(b'"device":"dev-0"', b'"device":"\\ud800"'),
    lambda h: h.replace(b'"device":"dev-0"', b'"device":"dev\\u002d0"'),
    lambda h: h.replace(b'"device":"dev-0"', b'"device":"dev-0\\n"'),
    lambda h: h.replace(b":", b": ", 1),
    lambda h: b" " + h,
    lambda h: h + b" ",
    lambda h: h[:-1] + b',"zz":' + b"[" * 600 + b"]" * 600 + b"}",
    lambda h: h[:-1] + b',"zz":' + b"[" * 1000 + b"]" * 1000 + b"}",
    lambda h: h[:-1] + b',"zz":' + b'{"a":' * 300 + b"1" + b"}" * 300 + b"}",
    lambda h: b"[" * 1024 + b"]" * 1024,
    lambda h: b" " * 2048,
    lambda h: b"\xff\xfe" + h,
    lambda h: h.replace(b"{", b'{"task":"x",', 1),
    lambda h: h[: len(h) // 2],
    lambda h: b"null",
    lambda h: b'"str"',
    lambda h: b"",
]


def mutate_header(r: random.Random) -> bytes:
    """Header bytes from a valid update header with random damage."""
    fields = good_fields(codec=r.choice(CODECS))
    fields["payload_sha256"] = hashlib.sha256(VALID_PAYLOADS[fields["codec"]]).hexdigest()
    mode = r.randrange(6)
    if mode <= 2:
        for _ in range(r.randrange(1, 3)):
            kind = r.randrange(3)
            key = r.choice(list(fields) or ["task"])
            if kind == 0:
                fields[key] = rand_json(r)
            elif kind == 1:
                fields.pop(key, None)
            else:
                fields[str(rand_json(r, 3))[:12]] = rand_json(r)
        try:
            header = canonical(fields)
        except (ValueError, RecursionError):
            header = repr(fields).encode("utf-8", "surrogatepass")
        if mode == 2:  # non-canonical spelling of the same object
            header = json.dumps(fields, default=str).encode("utf-8", "surrogatepass")
        return header[:2048]
    header = canonical(fields)
    return r.choice(RAW_HEADER_EDITS)(header)[:2048]


# ---------------------------------------------------------------- random payloads


def f32_values(r: random.Random, n: int) -> bytes:
    out = np.array([r.uniform(-1, 1) for _ in range(min(n, 64))] or [0.0], dtype="<f4")
    out = np.resize(out, n).astype("<f4")
    if n and r.random() < 0.3:
        out[r.randrange(n)] = r.choice(SPECIAL_F32)
    return out.tobytes()


def int8_values(r: random.Random, n: int) -> bytes:
    lo = -128 if r.random() < 0.2 else -127
    return bytes((r.randint(lo, 127) & 0xFF) for _ in range(n))


def rand_tensor(r: random.Random, name: str, shape: tuple[int, ...]) -> bytes:
    raw_name = name.encode()
    if r.random() < 0.05:
        raw_name = r.choice([b"", b"9w", b"w w", b"\xff", b"a" * 65, b"w"])
    name_len = len(raw_name)
    if r.random() < 0.03:
        name_len = r.randrange(256)
    dtype = r.randrange(1, 7) if r.random() < 0.93 else r.choice([0, 7, 8, 255])
    dims = list(shape)
    if r.random() < 0.2:
        dims = [r.choice(SPECIAL_U32) for _ in range(r.randrange(0, 6))]
    ndim = len(dims)
    if r.random() < 0.03:
        ndim = r.choice([0, 1, 2, 3, 4, 5, 255])
    size = 1
    for d in dims:
        size *= d
    n = size if size <= 4096 else r.randrange(0, 64)
    channels = dims[-1] if len(dims) >= 2 else 1
    channels = channels if channels <= 4096 else 3

    def scale() -> bytes:
        if r.random() < 0.3:
            return struct.pack("<f", r.choice(SPECIAL_F32))
        return struct.pack("<f", r.uniform(1e-4, 1.0))

    if dtype == 1:
        body = f32_values(r, n)
    elif dtype == 2:
        body = scale() + int8_values(r, n)
    elif dtype == 3:
        scales = b"".join(
            scale() if r.random() < 0.2 else struct.pack("<f", 0.01) for _ in range(channels)
        )
        body = scales + int8_values(r, n)
    elif dtype == 4:
        body = scale() + bytes(
            r.randrange(256) if r.random() < 0.3 else 0x21 for _ in range((n + 1) // 2)
        )
    elif dtype in (5, 6):
        k = r.randrange(0, max(1, min(n, 64)) + 1)
        if r.random() < 0.1:
            k = r.choice(SPECIAL_U32)
        kk = min(k, 256)
        idx = sorted(r.sample(range(max(n, kk)), kk))
        roll = r.random()
        if roll < 0.1 and len(idx) > 1:
            idx[0], idx[1] = idx[1], idx[0]
        elif roll < 0.2 and idx:
            idx[-1] = r.choice([n, n + 1, 2**32 - 1])
        elif roll < 0.25 and len(idx) > 1:
            idx[1] = idx[0]
        idx_b = struct.pack(f"<{len(idx)}I", *[i & 0xFFFFFFFF for i in idx])
        vals = f32_values(r, len(idx)) if dtype == 5 else scale() + int8_values(r, len(idx))
        body = struct.pack("<I", k) + idx_b + vals
    else:
        body = bytes(r.randrange(256) for _ in range(r.randrange(0, 16)))
    roll = r.random()
    if roll < 0.05 and body:
        body = body[: r.randrange(len(body))]
    elif roll < 0.1:
        body += bytes(r.randrange(1, 9))
    head = struct.pack("<B", name_len & 0xFF) + raw_name + struct.pack("<BB", dtype, ndim & 0xFF)
    return head + struct.pack(f"<{len(dims)}I", *dims) + body


def rand_payload(r: random.Random) -> bytes:
    names = [("w", SHAPES["w"]), ("b", SHAPES["b"])]
    roll = r.random()
    if roll < 0.1:
        r.shuffle(names)
    elif roll < 0.15:
        names = names[:1]
    elif roll < 0.2:
        names.append(("x", (3,)))
    elif roll < 0.23:
        names = [("w", SHAPES["w"]), ("w", SHAPES["w"])]
    count = len(names) if r.random() < 0.95 else r.choice([0, 1, 3, 255, 65535])
    return struct.pack("<H", count) + b"".join(rand_tensor(r, n, s) for n, s in names)


# ---------------------------------------------------------------- operators


def op_random_bytes(r):
    n = r.choice([r.randrange(0, 16), r.randrange(0, 200), r.randrange(0, 2000)])
    data = r.randbytes(n)
    if r.random() < 0.5:
        data = PREFIX.pack(MAGIC, 1, r.choice([1, 2]), r.randrange(300), r.randrange(300)) + data
    return data


def op_flip(r):
    data = bytearray(r.choice(VALID_FRAMES))
    for _ in range(r.randrange(1, 6)):
        i = r.randrange(len(data))
        data[i] ^= 1 << r.randrange(8) if r.random() < 0.7 else r.randrange(1, 256)
    return bytes(data)


def op_insert_delete(r):
    data = bytearray(r.choice(VALID_FRAMES))
    for _ in range(r.randrange(1, 4)):
        i = r.randrange(len(data) + 1)
        if r.random() < 0.5:
            data[i:i] = r.randbytes(r.randrange(1, 9))
        else:
            del data[i : i + r.randrange(1, 9)]
    return bytes(data)


def op_truncate_extend(r):
    data = r.choice([*VALID_FRAMES, MODEL_FRAME])
    if r.random() < 0.5:
        return data[: r.randrange(len(data))]
    return data + r.randbytes(r.choice([1, 2, 64, r.randrange(1, 4096)]))


def op_prefix_lengths(r):
    data = bytearray(r.choice(VALID_FRAMES))
    magic, version, kind, h, p = PREFIX.unpack_from(data)
    h = r.choice([h, 0, h - 1, h + 1, 2048, 2049, 0xFFFF])
    p = r.choice([p, 0, p - 1, p + 1, 2**31, 2**32 - 1])
    version = r.choice([version, version, 0, 2, 255])
    kind = r.choice([kind, kind, 0, 2, 3, 255])
    data[:12] = PREFIX.pack(magic, version, kind, h & 0xFFFF, p & 0xFFFFFFFF)
    return bytes(data)


def op_header_old_signature(r):
    return assemble(mutate_header(r), VALID_PAYLOADS["int8"], sig=VALID_FRAMES[1][-64:])


def op_header_signed(r):
    header = mutate_header(r)
    codec_payload = VALID_PAYLOADS[r.choice(CODECS)]
    return assemble(header, codec_payload, key=KEYS["dev-0"])


def op_freshness(r):
    codec = r.choice(CODECS)
    changes = r.choice(
        [
            {},
            {"round": r.choice([0, 1, 3, 2**53 - 1])},
            {"base": "ef" * 32},
            {"counter": r.choice([0, 3, 4, 2**53 - 1])},
            {"device": "dev-1", "counter": r.choice([2, 3, 4])},
            {"device": "dev-2"},
            {"task": "other-task"},
            {"device": "stranger"},
        ]
    )
    key = r.choice([None, None, None, KEYS["dev-1"], STRANGER])
    payload = VALID_PAYLOADS[codec]
    if r.random() < 0.1:
        payload = payload + b"\0"
    fields = good_fields(codec=codec, **changes)
    fields["payload_sha256"] = hashlib.sha256(payload).hexdigest()
    k = key or KEYS.get(fields["device"], STRANGER)
    return assemble(canonical(fields), payload, key=k), fields["device"]


def op_payload_structured(r):
    return signed_update(rand_payload(r), codec=r.choice(CODECS))


def op_payload_bytes(r):
    payload = bytearray(r.choice(list(VALID_PAYLOADS.values())))
    for _ in range(r.randrange(1, 4)):
        i = r.randrange(len(payload))
        if r.random() < 0.7:
            payload[i] = r.randrange(256)
        elif r.random() < 0.5:
            del payload[i : i + r.randrange(1, 5)]
        else:
            payload[i:i] = r.randbytes(r.randrange(1, 5))
    return signed_update(bytes(payload))


def op_model_frame(r):
    return MODEL_FRAME if r.random() < 0.5 else op_flip(r)


OPERATORS = [
    (op_random_bytes, 10),
    (op_flip, 12),
    (op_insert_delete, 8),
    (op_truncate_extend, 8),
    (op_prefix_lengths, 6),
    (op_header_old_signature, 8),
    (op_header_signed, 10),
    (op_freshness, 8),
    (op_payload_structured, 22),
    (op_payload_bytes, 7),
    (op_model_frame, 1),
]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def fuzz(n: int, seed: int) -> tuple[Counter, Counter, Counter]:
    r = random.Random(seed)
    ops = [op for op, _ in OPERATORS]
    weights = [w for _, w in OPERATORS]
    validator = make_validator()
    tally: Counter = Counter()
    per_op: Counter = Counter()
    codec: Counter = Counter()
    topics = [update_topic(TASK, "dev-0")] * 30 + [
        update_topic(TASK, "dev-1"),
        "fedledger/v1/other/update/dev-0",
        update_topic(TASK, "dev/0"),
        "",
    ]
    for _ in range(n):
        op = r.choices(ops, weights)[0]
        data = op(r)
        topic = r.choice(topics)
        if isinstance(data, tuple):  # the operator names the sending device
            data, device = data
            topic = update_topic(TASK, device)
        per_op[op.__name__] += 1
        run_case(validator, data, tally, op.__name__, topic=topic, codec=codec)
    return tally, per_op, codec


@pytest.mark.slow
def test_fuzz_100k_payloads(record_property):
    fuzz(2000, seed=1)  # warm caches and allocator pools before measuring RSS
    rss_before = rss_bytes()
    started = time.perf_counter()
    tally, per_op, codec = fuzz(N_LOOP, seed=20240601)
    elapsed = time.perf_counter() - started
    rss_growth = rss_bytes() - rss_before
    assert sum(tally.values()) == N_LOOP
    record_property("fuzz_cases", N_LOOP)
    record_property("fuzz_reasons", dict(tally))
    record_property("fuzz_seconds", round(elapsed, 1))
    record_property("fuzz_rss_growth_bytes", rss_growth)
    print(f"\n{N_LOOP} payloads in {elapsed:.1f} s, RSS growth {rss_growth / 2**20:.1f} MiB")
    print("outcomes:", dict(tally.most_common()))
    print("operators:", dict(per_op.most_common()))
    print("payload-level details:", dict(codec.most_common()))
    for reason in (
        "accepted",
        "malformed",
        "truncated",
        "unsupported_version",
        "digest_mismatch",
        "wrong_type",
        "topic_mismatch",
        "bad_signature",
        "stale_round",
        "future_round",
        "replayed",
        "duplicate",
        "bad_payload",
        "shape_mismatch",
        "non_finite",
    ):
        assert tally[reason] > 0, (reason, dict(tally))
    for codec_reason in (
        "truncated",
        "trailing_bytes",
        "too_large",
        "bad_name",
        "bad_dtype",
        "bad_shape",
        "bad_count",
        "index_out_of_range",
        "unsorted_indices",
        "bad_value",
        "non_finite",
    ):
        assert codec[codec_reason] > 0, (codec_reason, dict(codec))
    assert rss_growth < 50 * 2**20


def test_fuzz_memory_stays_bounded():
    """Traced peak over 5,000 mixed payloads (on top of the 100k loop)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        tally, _, _ = fuzz(5000, seed=99)
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(
        f"\ntraced: peak {(peak - base) / 2**20:.2f} MiB above start, retained {(current - base) / 2**10:.0f} KiB"
    )
    assert sum(tally.values()) == 5000
    assert peak - base < 16 * 2**20
    assert current - base < 2 * 2**20


# ---------------------------------------------------------------- hypothesis, with shrinking

_VALIDATOR = make_validator()

dims_st = st.lists(
    st.one_of(st.sampled_from(SPECIAL_U32), st.integers(0, 2**32 - 1)), min_size=0, max_size=5
)
tensor_st = st.tuples(
    st.sampled_from(["w", "b", "x", "w"]),
    st.integers(0, 9),  # dtype, 0 and 7..9 unknown
    dims_st,
    st.binary(max_size=300),  # body
)


@settings(
    max_examples=N_HYPOTHESIS,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    count=st.one_of(st.integers(0, 3), st.just(65535)),
    tensors=st.lists(tensor_st, max_size=3),
    codec=st.sampled_from(CODECS),
    tail=st.binary(max_size=8),
)
def test_fuzz_hypothesis_signed_payloads(count, tensors, codec, tail):
    parts = [struct.pack("<H", count)]
    for name, dtype, dims, body in tensors:
        parts.append(bytes([len(name)]) + name.encode() + bytes([dtype, len(dims)]))
        parts.append(struct.pack(f"<{len(dims)}I", *dims) + body)
    payload = b"".join(parts) + tail
    tally: Counter = Counter()
    run_case(_VALIDATOR, signed_update(payload, codec=codec), tally, "hypothesis")
    assert sum(tally.values()) == 1


@settings(max_examples=N_HYPOTHESIS, deadline=None, derandomize=True)
@given(data=st.binary(max_size=400), head=st.booleans())
def test_fuzz_hypothesis_raw_frames(data, head):
    if head:
        data = MAGIC + b"\x01\x01" + data
    tally: Counter = Counter()
    run_case(_VALIDATOR, data, tally, "hypothesis-raw")
    assert sum(tally.values()) == 1


def test_declared_4gb_tensor_is_rejected_without_allocating():
    w = struct.pack("<B", 1) + b"w" + bytes([1, 2]) + struct.pack("<II", 65536, 16384)
    data = signed_update(struct.pack("<H", 1) + w, codec="f32")  # 4 GiB of f32 declared
    assert len(data) < 400
    validator = make_validator()
    tracemalloc.start()
    try:
        started = time.perf_counter()
        tally: Counter = Counter()
        run_case(validator, data, tally, "4gb")
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert tally == Counter({"shape_mismatch": 1})
    assert elapsed < 0.1
    assert peak < 256 * 1024


def test_fuzz_certificate_signed_sealed_frames(tmp_path):
    """Certificate-signed, sealed frames under mutation: flipped bytes anywhere (header,
    certificate, ciphertext, signature), and the signing fields (alg, cert, enc, epk)
    replaced by random values and re-signed with the device's certificate key. Every case
    ends in a verdict; the valid frame itself is accepted."""
    import base64

    from fedcore import (
        ALG_ECDSA_P256,
        CertificateTrust,
        certificate_der,
        certificate_signer,
        generate_x25519_key,
        load_certificate,
        load_ec_private_key,
    )
    from fedcore.pki import crl_path, init_ca, issue

    init_ca(tmp_path, "fuzz org")
    done = issue(tmp_path, "device", "dev-0")
    key, cert = load_ec_private_key(done.key), load_certificate(done.cert)
    sign = certificate_signer(key)
    sealing = generate_x25519_key()
    validator = UpdateValidator(
        task=TASK,
        registry=DeviceRegistry({}, certificates={"dev-0": done.fingerprint}),
        shapes=SHAPES,
        max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES,
        trust=CertificateTrust.load(tmp_path / "ca.pem", crl_path(tmp_path)),
        decryption_key=sealing,
    )
    cert_b64 = base64.b64encode(certificate_der(cert)).decode()
    header = UpdateHeader(**good_fields(alg=ALG_ECDSA_P256, cert=cert_b64))
    good = encode_update(header, VALID_PAYLOADS["int8"], sign, seal_to=sealing.public_key())
    tally: Counter = Counter()
    run_case(validator, good, tally, "valid")
    assert tally == {"accepted": 1}
    header_len = PREFIX.unpack_from(good)[3]
    fields = json.loads(good[12 : 12 + header_len])
    payload = good[12 + header_len : -65]
    r = random.Random(11)
    for i in range(1500):
        if i % 2:
            data = bytearray(good)
            for _ in range(r.randint(1, 3)):
                data[r.randrange(len(data))] ^= 1 << r.randrange(8)
            if data != good:  # two flips of one bit give the valid frame back
                run_case(validator, bytes(data), tally, "cert_flip")
            continue
        changed = dict(fields)
        for _ in range(r.randint(1, 2)):
            name = r.choice(["alg", "cert", "enc", "epk"])
            if r.random() < 0.2:
                changed.pop(name, None)
            elif name == "cert" and r.random() < 0.5:
                raw = bytearray(certificate_der(cert))
                raw[r.randrange(len(raw))] ^= 1 << r.randrange(8)
                changed[name] = base64.b64encode(bytes(raw)).decode()
            elif name == "epk" and r.random() < 0.5:
                changed[name] = base64.b64encode(r.randbytes(32)).decode()
            else:
                changed[name] = rand_json(r)
        body = canonical(changed)
        signed = PREFIX.pack(MAGIC, 1, 1, len(body) & 0xFFFF, len(payload)) + body
        data = signed + payload + b"\x40" + sign(signed)
        run_case(validator, data, tally, "cert_fields")
    assert tally["accepted"] == 1
    assert tally["malformed"] and tally["bad_certificate"] and tally["decrypt_failed"]
