import struct

import numpy as np
import pytest

from fedcore import CodecError, decode_tensors, encode_tensors, iter_tensors, quantize_int8


def tensors(rng):
    return {
        "w": rng.normal(size=(30, 2)).astype(np.float32),
        "b": rng.normal(size=(2,)).astype(np.float32),
    }


@pytest.mark.parametrize("codec", ["f32", "int8"])
def test_round_trip(rng, codec):
    values = tensors(rng)
    decoded = decode_tensors(encode_tensors(values, codec))
    assert list(decoded) == ["w", "b"]
    for name, array in values.items():
        assert decoded[name].shape == array.shape
        tolerance = 0.0 if codec == "f32" else np.abs(array).max() / 127 / 2 + 1e-7
        np.testing.assert_allclose(decoded[name], array, atol=tolerance, rtol=0)


def test_int8_is_about_four_times_smaller(rng):
    values = {"w": rng.normal(size=(1000,)).astype(np.float32)}
    assert len(encode_tensors(values, "int8")) < len(encode_tensors(values, "f32")) / 3.9


def test_quantize_zero_tensor():
    q, scale = quantize_int8(np.zeros(4, np.float32))
    assert scale == 1.0 and not q.any()


def test_encoder_refuses_nan(rng):
    with pytest.raises(CodecError) as info:
        encode_tensors({"w": np.array([1.0, np.nan], np.float32)}, "int8")
    assert info.value.reason == "non_finite"


@pytest.mark.parametrize("cut", [0, 1, 3, 10, -1])
def test_truncated_payload(rng, cut):
    payload = encode_tensors(tensors(rng), "int8")
    with pytest.raises(CodecError):
        decode_tensors(payload[:cut])


def test_trailing_bytes(rng):
    with pytest.raises(CodecError) as info:
        decode_tensors(encode_tensors(tensors(rng), "int8") + b"\0")
    assert info.value.reason == "trailing_bytes"


def test_declared_size_bound_checked_before_allocation():
    # one float32 tensor claiming 2**32-1 x 2**32-1 values, with no data behind it
    payload = (
        struct.pack("<H", 1)
        + b"\x01w"
        + struct.pack("<BB", 1, 2)
        + struct.pack("<II", 2**32 - 1, 2**32 - 1)
    )
    with pytest.raises(CodecError) as info:
        list(iter_tensors(payload, max_elements=1000))
    assert info.value.reason == "too_large"


def test_nan_in_float_payload_is_refused():
    payload = encode_tensors({"w": np.ones(3, np.float32)}, "f32")
    poisoned = payload[:-4] + struct.pack("<f", float("nan"))
    with pytest.raises(CodecError) as info:
        decode_tensors(poisoned)
    assert info.value.reason == "non_finite"


def test_bad_scale_is_refused():
    payload = bytearray(encode_tensors({"w": np.ones(3, np.float32)}, "int8"))
    scale_at = 2 + 2 + 2 + 4  # count, name, dtype+ndim, one dim
    payload[scale_at : scale_at + 4] = struct.pack("<f", float("inf"))
    with pytest.raises(CodecError) as info:
        decode_tensors(bytes(payload))
    assert info.value.reason == "non_finite"


def test_repeated_names_are_refused():
    one = encode_tensors({"w": np.ones(2, np.float32)}, "f32")[2:]
    with pytest.raises(CodecError) as info:
        decode_tensors(struct.pack("<H", 2) + one + one)
    assert info.value.reason == "bad_name"
