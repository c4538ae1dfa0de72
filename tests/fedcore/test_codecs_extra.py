"""The compact codecs: per-channel int8, int4, top-k (f32 or int8 values) with error
feedback; strict decoding of each; the original f32/int8 bytes unchanged."""

import struct
import typing

import numpy as np
import pytest

from fedcore import (
    CodecError,
    TaskSpec,
    UpdateHeader,
    decode_envelope,
    decode_tensors,
    encode_tensors,
    encode_update,
    generate_key,
    iter_tensors,
    signer_from_key,
)
from fedcore._codec import (
    CODECS,
    DEFAULT_K_FRACTION,
    quantize_int4,
    quantize_int8_channels,
    topk_with_feedback,
)

NEW_CODECS = ["int8-channel", "int4", "topk-f32", "topk-int8"]


def tensors(rng):
    return {
        "w1": rng.normal(size=(30, 40)).astype(np.float32),
        "b1": rng.normal(size=(40,)).astype(np.float32),
        "w2": rng.normal(size=(40, 3)).astype(np.float32) * 0.01,
        "b2": rng.normal(size=(3,)).astype(np.float32),
        "s": np.float32(0.25),  # 0-D
        "odd": rng.normal(size=(7,)).astype(np.float32),  # odd count: int4 pads a nibble
    }


def header() -> bytes:
    """Count 1, name "w", for hand-built payloads."""
    return struct.pack("<H", 1) + b"\x01w"


# ---------------------------------------------------------------- golden bytes


GOLDEN = {
    "w": np.array([[0.5, -1.25], [3.0, 0.0], [-2.0, 1e-3]], np.float32),
    "b": np.array([0.1, -0.2], np.float32),
}
GOLDEN_F32 = (
    "02000177010203000000020000000000003f0000a0bf0000404000000000000000c06f12833a"
    "0162010102000000cdcccc3dcdcc4cbe"
)
GOLDEN_INT8 = "02000177020203000000020000000683c13c15cb7f00ab000162020102000000a069ce3a4081"


def test_f32_and_int8_bytes_are_unchanged():
    # Taken from the encoder before the new codecs existed: fleets in the field send these.
    assert encode_tensors(GOLDEN, "f32").hex() == GOLDEN_F32
    assert encode_tensors(GOLDEN, "int8").hex() == GOLDEN_INT8
    assert encode_tensors(GOLDEN, "f32", k_fraction=0.5).hex() == GOLDEN_F32


def test_golden_payloads_still_decode():
    f32 = decode_tensors(bytes.fromhex(GOLDEN_F32))
    np.testing.assert_array_equal(f32["w"], GOLDEN["w"])
    int8 = decode_tensors(bytes.fromhex(GOLDEN_INT8))
    np.testing.assert_allclose(int8["w"], GOLDEN["w"], atol=3.0 / 127 / 2 + 1e-7)


# ---------------------------------------------------------------- round trips


def test_codec_names_are_shared_by_task_and_wire():
    field = TaskSpec.model_fields["codec"].annotation
    assert typing.get_args(field) == CODECS
    assert set(NEW_CODECS) <= set(CODECS)


def test_int8_channel_round_trip(rng):
    values = tensors(rng)
    decoded = decode_tensors(encode_tensors(values, "int8-channel"))
    assert list(decoded) == list(values)
    for name, array in values.items():
        array = np.asarray(array)
        assert decoded[name].shape == array.shape
        if array.ndim >= 2:  # half a step of each column's own scale
            tolerance = np.abs(array).max(axis=0) / 127 / 2 + 1e-7
        else:
            tolerance = np.abs(array).max() / 127 / 2 + 1e-7
        assert np.all(np.abs(decoded[name] - array) <= tolerance)


def test_int8_channel_keeps_small_columns_that_per_tensor_int8_flattens(rng):
    w = rng.normal(size=(50, 4)).astype(np.float32)
    w[:, 0] *= 1000.0  # one loud output channel
    per_tensor = decode_tensors(encode_tensors({"w": w}, "int8"))["w"]
    per_channel = decode_tensors(encode_tensors({"w": w}, "int8-channel"))["w"]
    quiet = slice(1, None)
    err_tensor = np.abs(per_tensor[:, quiet] - w[:, quiet]).max()
    err_channel = np.abs(per_channel[:, quiet] - w[:, quiet]).max()
    assert err_channel < err_tensor / 100


def test_int8_channel_scales():
    q, scales = quantize_int8_channels(np.array([[1.0, -4.0], [-2.0, 0.0]], np.float32))
    np.testing.assert_allclose(scales, [2.0 / 127, 4.0 / 127], rtol=1e-6)
    assert q.tolist() == [[64, -127], [-127, 0]]
    q, scales = quantize_int8_channels(np.zeros((3, 2), np.float32))
    assert scales.tolist() == [1.0, 1.0] and not q.any()
    q, scales = quantize_int8_channels(np.array([0.5, -1.0], np.float32))  # 1-D: one scale
    assert scales.shape == (1,)


def test_int4_round_trip(rng):
    values = tensors(rng)
    decoded = decode_tensors(encode_tensors(values, "int4"))
    for name, array in values.items():
        array = np.asarray(array)
        tolerance = np.abs(array).max() / 7 / 2 + 1e-7
        assert decoded[name].shape == array.shape
        assert np.all(np.abs(decoded[name] - array) <= tolerance), name


def test_int4_exact_levels():
    values = np.arange(-7, 8, dtype=np.float32) * 0.5
    q, scale = quantize_int4(values)
    assert scale == pytest.approx(0.5) and q.tolist() == list(range(-7, 8))
    np.testing.assert_allclose(decode_tensors(encode_tensors({"w": values}, "int4"))["w"], values)


@pytest.mark.parametrize("codec", ["topk-f32", "topk-int8"])
@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5])
def test_topk_keeps_the_largest_entries(rng, codec, fraction):
    w = rng.normal(size=(40, 50)).astype(np.float32)
    decoded = decode_tensors(encode_tensors({"w": w}, codec, k_fraction=fraction))["w"]
    k = int(np.ceil(fraction * w.size))
    kept = np.flatnonzero(decoded)
    largest = np.sort(np.argsort(np.abs(w).ravel())[-k:])
    assert kept.tolist() == largest.tolist()
    tolerance = 0.0 if codec == "topk-f32" else np.abs(w).max() / 127 / 2 + 1e-7
    assert np.abs(decoded.ravel()[kept] - w.ravel()[kept]).max() <= tolerance


def test_topk_keeps_at_least_one_value_per_tensor(rng):
    values = {"b": np.array([0.1, -3.0, 0.2], np.float32)}
    decoded = decode_tensors(encode_tensors(values, "topk-f32", k_fraction=0.01))
    assert decoded["b"].tolist() == [0.0, -3.0, 0.0]


def test_topk_with_everything_kept_is_lossless(rng):
    values = tensors(rng)
    decoded = decode_tensors(encode_tensors(values, "topk-f32", k_fraction=1.0))
    for name, array in values.items():
        np.testing.assert_array_equal(decoded[name], array)


def test_topk_does_not_send_zeros():
    values = {"w": np.zeros(1000, np.float32)}
    for codec in ("topk-f32", "topk-int8"):
        payload = encode_tensors(values, codec, k_fraction=0.5)
        assert not decode_tensors(payload)["w"].any()
        assert len(payload) < 30


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5, float("nan")])
def test_topk_fraction_is_checked(fraction):
    with pytest.raises(ValueError):
        encode_tensors({"w": np.ones(4, np.float32)}, "topk-int8", k_fraction=fraction)


@pytest.mark.parametrize("codec", CODECS)
def test_empty_and_scalar_tensors(codec):
    values = {"e": np.zeros((0, 3), np.float32), "z": np.zeros((2, 0), np.float32)}
    values["s"] = np.float32(-1.5)
    decoded = decode_tensors(encode_tensors(values, codec))
    assert {k: v.shape for k, v in decoded.items()} == {"e": (0, 3), "z": (2, 0), "s": ()}
    assert decoded["s"] == pytest.approx(-1.5, rel=1e-2)


# ---------------------------------------------------------------- sizes


def big_model(rng):
    # The benchmark MLP's shapes: 64 features, 1536 hidden, 10 classes (115,210 values).
    return {
        "w1": rng.normal(size=(64, 1536)).astype(np.float32),
        "b1": rng.normal(size=(1536,)).astype(np.float32),
        "w2": rng.normal(size=(1536, 10)).astype(np.float32),
        "b2": rng.normal(size=(10,)).astype(np.float32),
    }


def test_sizes_against_f32(rng):
    values = big_model(rng)
    f32 = len(encode_tensors(values, "f32"))
    assert f32 / len(encode_tensors(values, "int8")) > 3.95
    assert f32 / len(encode_tensors(values, "int8-channel")) > 3.7  # plus one scale a column
    assert f32 / len(encode_tensors(values, "int4")) > 7.9
    # top-k 1%: 5 bytes a kept value (u32 index, i8 value) against 400 for 100 floats
    assert f32 / len(encode_tensors(values, "topk-int8", k_fraction=0.01)) > 75
    assert f32 / len(encode_tensors(values, "topk-f32", k_fraction=0.01)) > 48
    assert DEFAULT_K_FRACTION == 0.01
    assert len(encode_tensors(values, "topk-int8")) == len(
        encode_tensors(values, "topk-int8", k_fraction=0.01)
    )


# ---------------------------------------------------------------- views and folding


@pytest.mark.parametrize("codec", NEW_CODECS)
def test_new_codecs_yield_dense_float_views(rng, codec):
    values = tensors(rng)
    payload = encode_tensors(values, codec)
    decoded = decode_tensors(payload)
    for view in iter_tensors(payload, max_elements=10_000):
        assert view.data.dtype == np.float32 and view.scale == 1.0
        assert view.data.size == int(np.prod(view.shape))
        assert not view.data.flags.writeable
        np.testing.assert_array_equal(view.dequantize(), decoded[view.name])


@pytest.mark.parametrize("codec", CODECS)
def test_gateway_accumulator_folds_every_codec(rng, codec):
    from gateway import FedAvgAccumulator

    updates = [(tensors(rng), n) for n in (3, 5, 11)]
    shapes = {k: np.shape(v) for k, v in updates[0][0].items()}
    acc = FedAvgAccumulator(shapes)
    expected = {k: np.zeros(s, np.float64) for k, s in shapes.items()}
    for values, n in updates:
        payload = encode_tensors(values, codec)
        acc.add(list(iter_tensors(payload, max_elements=10_000)), n)
        for k, v in decode_tensors(payload).items():
            expected[k] += v * n / 19
    for k, v in acc.result().items():
        np.testing.assert_allclose(v, expected[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("codec", NEW_CODECS)
def test_update_header_accepts_new_codecs(rng, codec):
    payload = encode_tensors(tensors(rng), codec)
    frame = encode_update(
        UpdateHeader(
            task="t", round=0, device="d", base="0" * 64, samples=1, codec=codec, counter=0
        ),
        payload,
        signer_from_key(generate_key()),
    )
    envelope = decode_envelope(frame)
    assert envelope.header.codec == codec and envelope.payload == payload


# ---------------------------------------------------------------- error feedback


def test_topk_with_feedback_conserves_the_update(rng):
    delta = tensors(rng)
    residual = {k: rng.normal(size=np.shape(v)).astype(np.float32) for k, v in delta.items()}
    before = {k: np.array(v, copy=True) for k, v in delta.items()}
    sent, new_residual = topk_with_feedback(delta, residual, 0.05)
    for k in delta:
        np.testing.assert_array_equal(delta[k], before[k])  # inputs untouched
        np.testing.assert_allclose(sent[k] + new_residual[k], delta[k] + residual[k], atol=1e-6)
        assert np.count_nonzero(sent[k]) == max(1, int(np.ceil(0.05 * np.size(delta[k]))))


@pytest.mark.parametrize("codec", ["topk-f32", "topk-int8"])
def test_what_is_sent_is_what_is_decoded(rng, codec):
    delta = tensors(rng)
    sent, residual = topk_with_feedback(delta, None, 0.02, codec=codec)
    decoded = decode_tensors(encode_tensors(sent, codec, k_fraction=0.02))
    for k in delta:
        np.testing.assert_allclose(decoded[k], sent[k], rtol=1e-6, atol=1e-9)
        # the quantization error of the kept values went into the residual
        np.testing.assert_allclose(sent[k] + residual[k], delta[k], atol=1e-6)


def test_error_feedback_delivers_a_steady_update(rng):
    # A device that keeps pushing the same delta: without feedback only the same 10 largest
    # entries would ever be sent; with it, each entry is sent once its residual climbs to
    # the top-k threshold (about sum|delta| / k), so what arrives tracks the sum of the
    # deltas, lagging by a residual that stays bounded.
    delta = {"w": rng.normal(size=(200,)).astype(np.float32)}
    residual = None
    total = np.zeros(200, np.float64)
    peaks = []
    for _ in range(400):
        sent, residual = topk_with_feedback(delta, residual, 0.05, codec="topk-int8")
        total += sent["w"]
        peaks.append(np.abs(residual["w"]).max())
    np.testing.assert_allclose(total + residual["w"], 400 * delta["w"], rtol=1e-4, atol=1e-2)
    threshold = np.abs(delta["w"]).sum() / 10
    assert max(peaks) < 2 * threshold
    assert max(peaks[200:]) <= max(peaks[:200]) * 1.1  # not growing
    assert np.count_nonzero(total) > 150  # not just the 10 largest
    assert np.abs(total).sum() > 0.9 * 400 * np.abs(delta["w"]).sum()


def test_topk_with_feedback_refuses_bad_arguments(rng):
    delta = {"w": np.ones(4, np.float32)}
    with pytest.raises(CodecError):
        topk_with_feedback(delta, None, 0.5, codec="int8")
    with pytest.raises(ValueError):
        topk_with_feedback(delta, None, 0.0)
    with pytest.raises(ValueError):
        topk_with_feedback(delta, {"w": np.ones(3, np.float32)}, 0.5)


# ---------------------------------------------------------------- strict decoding


@pytest.mark.parametrize("codec", NEW_CODECS)
def test_every_truncation_is_refused(rng, codec):
    payload = encode_tensors(
        {"w": rng.normal(size=(5, 3)).astype(np.float32)}, codec, k_fraction=0.4
    )
    for cut in range(len(payload)):
        with pytest.raises(CodecError) as info:
            decode_tensors(payload[:cut])
        assert info.value.reason == "truncated", cut


@pytest.mark.parametrize("codec", NEW_CODECS)
def test_trailing_bytes_are_refused(rng, codec):
    payload = encode_tensors(tensors(rng), codec)
    with pytest.raises(CodecError) as info:
        decode_tensors(payload + b"\0")
    assert info.value.reason == "trailing_bytes"


def sparse(dims, indices, values, *, dtype=5, k=None, scale=0.5):
    body = struct.pack("<I", len(indices) if k is None else k)
    body += struct.pack(f"<{len(indices)}I", *indices)
    if dtype == 5:
        body += struct.pack(f"<{len(values)}f", *values)
    else:
        body += struct.pack("<f", scale) + struct.pack(f"<{len(values)}b", *values)
    head = header() + struct.pack("<BB", dtype, len(dims)) + struct.pack(f"<{len(dims)}I", *dims)
    return head + body


@pytest.mark.parametrize("dtype", [5, 6])
def test_hand_built_sparse_payload_decodes(dtype):
    decoded = decode_tensors(sparse((2, 3), [0, 4, 5], [1, -2, 3], dtype=dtype))["w"]
    factor = 1.0 if dtype == 5 else 0.5
    assert decoded.tolist() == [[1 * factor, 0, 0], [0, -2 * factor, 3 * factor]]


@pytest.mark.parametrize("dtype", [5, 6])
@pytest.mark.parametrize(
    ("indices", "reason"),
    [
        ([0, 6], "index_out_of_range"),  # 2 x 3 = 6 values: 6 is one past the end
        ([0, 2**32 - 1], "index_out_of_range"),
        ([3, 1], "unsorted_indices"),
        ([1, 1], "unsorted_indices"),  # repeated
        ([0, 4, 2], "unsorted_indices"),
    ],
)
def test_bad_sparse_indices(dtype, indices, reason):
    with pytest.raises(CodecError) as info:
        decode_tensors(sparse((2, 3), indices, [1] * len(indices), dtype=dtype))
    assert info.value.reason == reason


@pytest.mark.parametrize("dtype", [5, 6])
def test_sparse_count_above_size_is_refused(dtype):
    with pytest.raises(CodecError) as info:
        decode_tensors(sparse((2, 3), [0, 1, 2, 3, 4, 5, 6], [1] * 7, dtype=dtype))
    assert info.value.reason == "bad_count"
    # a huge count with nothing behind it is refused before anything is read
    with pytest.raises(CodecError) as info:
        decode_tensors(sparse((2, 3), [], [], dtype=dtype, k=2**32 - 1))
    assert info.value.reason == "bad_count"


@pytest.mark.parametrize("dtype", [5, 6])
def test_sparse_count_inconsistent_with_data_is_refused(dtype):
    # declares 3 values, carries 2 indices and nothing after them
    payload = sparse((10,), [1, 2], [], dtype=dtype, k=3)
    payload = payload[: len(payload) - (4 if dtype == 6 else 0)]  # no scale either
    with pytest.raises(CodecError) as info:
        decode_tensors(payload)
    assert info.value.reason == "truncated"
    # declares 1, carries 2: the rest is trailing
    with pytest.raises(CodecError) as info:
        decode_tensors(sparse((10,), [1, 2], [1, 1], dtype=dtype, k=1))
    assert info.value.reason == "trailing_bytes"


@pytest.mark.parametrize("dtype", [3, 4, 5, 6])
def test_dense_size_is_bounded_before_allocation(dtype):
    payload = header() + struct.pack("<BB", dtype, 2) + struct.pack("<II", 2**32 - 1, 2**32 - 1)
    with pytest.raises(CodecError) as info:
        list(iter_tensors(payload, max_elements=1000))
    assert info.value.reason == "too_large"


def test_sparse_values_must_be_finite():
    with pytest.raises(CodecError) as info:
        decode_tensors(sparse((4,), [1], [float("nan")]))
    assert info.value.reason == "non_finite"
    with pytest.raises(CodecError) as info:
        decode_tensors(sparse((4,), [1], [1], dtype=6, scale=float("inf")))
    assert info.value.reason == "non_finite"


def test_symmetric_int8_refuses_minus_128():
    with pytest.raises(CodecError) as info:
        decode_tensors(sparse((4,), [1], [-128], dtype=6))
    assert info.value.reason == "bad_value"
    channel = header() + struct.pack("<BBI", 3, 1, 2) + struct.pack("<f", 0.5) + b"\x01\x80"
    with pytest.raises(CodecError) as info:
        decode_tensors(channel)
    assert info.value.reason == "bad_value"


@pytest.mark.parametrize("bad_scale", [0.0, -1.0, float("nan"), float("inf")])
def test_int8_channel_scales_must_be_finite_and_positive(bad_scale):
    body = struct.pack("<2f", 0.5, bad_scale) + bytes([1, 2, 3, 4])
    payload = header() + struct.pack("<BBII", 3, 2, 2, 2) + body
    with pytest.raises(CodecError) as info:
        decode_tensors(payload)
    assert info.value.reason == "non_finite"


def test_dequantized_overflow_is_refused():
    big = float(np.finfo(np.float32).max) / 2
    payload = header() + struct.pack("<BBI", 3, 1, 1) + struct.pack("<f", big) + bytes([127])
    with pytest.raises(CodecError) as info:
        decode_tensors(payload)
    assert info.value.reason == "non_finite"


def int4_payload(size: int, packed: bytes, scale: float = 0.5) -> bytes:
    return header() + struct.pack("<BBI", 4, 1, size) + struct.pack("<f", scale) + packed


def test_int4_layout_low_nibble_first():
    # q = [1, -1, 7]: bytes 0xF1 (1 low, -1 high), 0x07 (7, padding 0)
    assert decode_tensors(int4_payload(3, b"\xf1\x07"))["w"].tolist() == [0.5, -0.5, 3.5]
    assert encode_tensors({"w": np.array([0.5, -0.5, 3.5], np.float32)}, "int4") == int4_payload(
        3, b"\xf1\x07"
    )


@pytest.mark.parametrize(
    ("size", "packed"),
    [
        (2, b"\x08"),  # -8 in the low nibble
        (2, b"\x80"),  # -8 in the high nibble
        (3, b"\x11\x71"),  # odd count with a non-zero padding nibble
    ],
)
def test_int4_bad_nibbles(size, packed):
    with pytest.raises(CodecError) as info:
        decode_tensors(int4_payload(size, packed))
    assert info.value.reason == "bad_value"


def test_int4_bad_scale():
    with pytest.raises(CodecError) as info:
        decode_tensors(int4_payload(2, b"\x11", scale=float("nan")))
    assert info.value.reason == "non_finite"


def test_unknown_dtype_is_refused():
    payload = header() + struct.pack("<BBI", 8, 1, 1) + b"\0" * 4
    with pytest.raises(CodecError) as info:
        decode_tensors(payload)
    assert info.value.reason == "bad_dtype"


@pytest.mark.parametrize("codec", CODECS)
def test_random_corruption_only_ever_raises_codec_error(rng, codec):
    # Flipped bytes must give a clean refusal or finite tensors, never another exception.
    payload = encode_tensors(tensors(rng), codec, k_fraction=0.2)
    for _ in range(300):
        corrupt = bytearray(payload)
        for at in rng.integers(0, len(corrupt), size=int(rng.integers(1, 4))):
            corrupt[at] = int(rng.integers(0, 256))
        try:
            decoded = decode_tensors(bytes(corrupt), max_elements=5000)
        except CodecError:
            continue
        assert all(np.all(np.isfinite(v)) for v in decoded.values())
