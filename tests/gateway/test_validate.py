import numpy as np
import pytest

from fedcore import (
    ModelHeader,
    UpdateHeader,
    encode_model,
    encode_tensors,
    encode_update,
    update_topic,
)
from gateway import Rejected, RoundContext, UpdateValidator

BASE = "cd" * 32
SHAPES = {"w": (30, 2), "b": (2,)}


@pytest.fixture
def validator(registry):
    return UpdateValidator(
        task="test-task", registry=registry, shapes=SHAPES, max_message_bytes=4096
    )


def ctx(*, round_=2, base=BASE, seen=(), counters=None):
    counters = counters or {}
    return RoundContext(
        round=round_,
        base=base,
        has_update=set(seen).__contains__,
        last_counter=lambda d: counters.get(d, -1),
    )


def frame(key, *, device="dev-0", tensors=None, codec="int8", **changes):
    fields = dict(
        task="test-task", round=2, device=device, base=BASE, samples=10, codec=codec, counter=5
    )
    fields.update(changes)
    if tensors is None:
        tensors = {"w": np.ones((30, 2), np.float32), "b": np.zeros(2, np.float32)}
    return encode_update(UpdateHeader(**fields), encode_tensors(tensors, codec), key.sign)


def reason(validator, data, context=None, device="dev-0"):
    with pytest.raises(Rejected) as info:
        validator.check(update_topic("test-task", device), data, context or ctx())
    return info.value.reason


def test_accepts_a_good_update(validator, device_keys):
    accepted = validator.check(
        update_topic("test-task", "dev-0"), frame(device_keys["dev-0"]), ctx()
    )
    assert accepted.header.device == "dev-0"
    assert [v.name for v in accepted.views] == ["w", "b"]
    assert len(accepted.digest) == 64


def test_rejections_each_have_their_reason(validator, device_keys, gateway_key):
    key = device_keys["dev-0"]
    good = frame(key)
    assert reason(validator, b"") == "malformed"
    assert reason(validator, b"\x00" * 100) == "malformed"
    assert reason(validator, good[:-10]) == "truncated"
    assert reason(validator, good + b"x" * 5000) == "too_large"
    assert reason(validator, frame(device_keys["dev-1"])) == "bad_signature"
    assert reason(validator, frame(key), device="dev-1") == "topic_mismatch"
    assert reason(validator, frame(key, task="other")) == "wrong_task"
    assert reason(validator, frame(key, device="stranger"), device="stranger") == "unknown_device"
    assert reason(validator, frame(key, round=1)) == "stale_round"
    assert reason(validator, frame(key, round=3)) == "future_round"
    assert reason(validator, frame(key, base="ef" * 32)) == "wrong_base"
    assert reason(validator, good, ctx(counters={"dev-0": 5})) == "replayed"
    assert reason(validator, good, ctx(seen={"dev-0"})) == "duplicate"
    assert (
        reason(validator, frame(key, tensors={"w": np.ones((3, 2), np.float32)}))
        == "shape_mismatch"
    )
    model = encode_model(
        ModelHeader(task="test-task", round=2, status="open", deadline=0.0),
        b"\0\0",
        gateway_key.sign,
    )
    assert reason(validator, model) == "wrong_type"


def test_non_finite_float_update_is_rejected(validator, device_keys):
    import struct

    from fedcore import encode_tensors as enc

    payload = bytearray(
        enc({"w": np.ones((30, 2), np.float32), "b": np.zeros(2, np.float32)}, "f32")
    )
    payload[-4:] = struct.pack("<f", float("inf"))
    fields = dict(
        task="test-task", round=2, device="dev-0", base=BASE, samples=10, codec="f32", counter=5
    )
    data = encode_update(UpdateHeader(**fields), bytes(payload), device_keys["dev-0"].sign)
    assert reason(validator, data) == "non_finite"


def test_garbage_payload_signed_by_the_device_is_bad_payload(validator, device_keys):
    fields = dict(
        task="test-task", round=2, device="dev-0", base=BASE, samples=10, codec="int8", counter=5
    )
    data = encode_update(UpdateHeader(**fields), b"\x01\x00\x05", device_keys["dev-0"].sign)
    assert reason(validator, data) == "bad_payload"
