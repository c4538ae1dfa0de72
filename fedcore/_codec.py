"""Tensor codecs: how named float tensors become payload bytes and back.

Layout (little-endian), documented in ``docs/wire.md``::

    u16 count
    count x tensor:
        u8  name length, name (ASCII identifier)
        u8  dtype       1 = float32          2 = int8, per tensor
                        3 = int8, per channel 4 = int4, per tensor
                        5 = sparse float32    6 = sparse int8
                        7 = masked residues (secure aggregation)
        u8  ndim        0..4
        ndim x u32      dims
        dtype-specific body (below)

    1  f32:         prod(dims) x f32
    2  int8:        f32 scale, prod(dims) x i8               value = q * scale
    3  int8/chan:   C x f32 scales, prod(dims) x i8          value = q * scale[i % C]
                    (C = dims[-1] for ndim >= 2, else 1: one scale per output column)
    4  int4:        f32 scale, ceil(prod(dims) / 2) bytes    two q in [-7, 7] per byte,
                    low nibble first, an odd count pads the last high nibble with 0
    5  sparse f32:  u32 k, k x u32 flat indices, k x f32 values
    6  sparse int8: u32 k, k x u32 flat indices, f32 scale, k x i8 values
    7  masked:      u8 bits (8..32), ceil(prod(dims) * bits / 8) bytes: residues modulo
                    2**bits, ``bits`` each, little-endian bit order (secure aggregation:
                    meaningless alone, summed by the gateway; yielded as uint32)

Codecs 1 and 2 are the wire's original encodings and stay byte for byte what they were.
Decoding is strict: every length is checked against what is left before anything is read,
the total element count is bounded before anything is allocated, sparse indices must be in
range and strictly increasing, the payload must be consumed exactly, and non-finite values
are refused. Reason codes (``CodecError.reason``): ``truncated``, ``trailing_bytes``,
``too_large``, ``bad_name``, ``bad_dtype``, ``bad_shape``, ``bad_count``,
``index_out_of_range``, ``unsorted_indices``, ``bad_value``, ``non_finite``,
``unknown_codec``.

Top-k sparsification drops most of an update; :func:`topk_with_feedback` keeps what was
dropped (and the quantization error of what was sent) as a residual that the device adds
to its next update, so nothing is lost for good, only delayed (error feedback, Seide et al.
2014; Stich et al. 2018).
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ._errors import CodecError

CodecName = Literal["f32", "int8", "int8-channel", "int4", "topk-f32", "topk-int8"]
#: Every payload codec, as named in task specs, device classes and update headers.
CODECS: tuple[str, ...] = ("f32", "int8", "int8-channel", "int4", "topk-f32", "topk-int8")
#: The update codec of a secure aggregation task's masked inputs (dtype 7): not a task
#: codec; the device quantizes with the task's, and adds masks (``_secagg``).
MASKED_CODEC = "secagg"
#: Share of each tensor's values a top-k codec keeps unless told otherwise.
DEFAULT_K_FRACTION = 0.01

_DTYPE_F32 = 1
_DTYPE_INT8 = 2
_DTYPE_INT8_CHANNEL = 3
_DTYPE_INT4 = 4
_DTYPE_SPARSE_F32 = 5
_DTYPE_SPARSE_INT8 = 6
_DTYPE_MASKED = 7
_DTYPES = frozenset(range(1, 8))
_MAX_NDIM = 4
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]{0,63}$")
# Smallest positive normal float32: a scale never rounds to 0 on its way to the wire.
_TINY = float(np.finfo(np.float32).tiny)


@dataclass(frozen=True, slots=True)
class TensorView:
    """One tensor of a payload, as cheap as the codec allows.

    ``f32`` and ``int8`` tensors are read-only views into the payload (int8 with its
    scale), so the gateway folds them into its sum without a float copy. Every other
    codec is yielded already dequantized: a dense float32 array with scale 1.0, so
    whatever folds views needs no codec-specific code.
    """

    name: str
    shape: tuple[int, ...]
    data: np.ndarray  # float32 or int8, flat, read-only
    scale: float  # 1.0 for float32

    def dequantize(self) -> np.ndarray:
        if self.data.dtype == np.float32:
            return self.data.reshape(self.shape).copy()
        return (self.data.astype(np.float32) * np.float32(self.scale)).reshape(self.shape)


# ---------------------------------------------------------------- quantizers


def quantize_int8(values: np.ndarray) -> tuple[np.ndarray, float]:
    """Symmetric per-tensor int8: ``values ~= q * scale`` with ``q`` in [-127, 127]."""
    values = np.asarray(values, dtype=np.float32)
    peak = float(np.max(np.abs(values))) if values.size else 0.0
    scale = peak / 127.0 if peak > 0.0 else 1.0
    q = np.clip(np.rint(values / np.float32(scale)), -127, 127).astype(np.int8)
    return q, scale


def quantize_int8_channels(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one scale per output channel (the last axis of a >= 2-D
    tensor; one scale for a 0-D or 1-D tensor).

    A column of small weights next to a column of large ones keeps its resolution, which a
    single per-tensor scale would spend on the large column.
    """
    values = np.asarray(values, dtype=np.float32)
    channels = _channels(values.shape)
    rows = values.reshape(-1, channels) if values.size else np.zeros((0, channels), np.float32)
    peak = np.max(np.abs(rows), axis=0) if rows.shape[0] else np.zeros(channels, np.float32)
    scales = np.where(peak > 0, np.maximum(peak / np.float32(127.0), _TINY), 1.0)
    scales = scales.astype(np.float32)
    q = np.clip(np.rint(rows / scales), -127, 127).astype(np.int8)
    return q.reshape(values.shape), scales


def quantize_int4(values: np.ndarray) -> tuple[np.ndarray, float]:
    """Symmetric per-tensor int4: ``values ~= q * scale`` with ``q`` in [-7, 7]."""
    values = np.asarray(values, dtype=np.float32)
    peak = float(np.max(np.abs(values))) if values.size else 0.0
    scale = max(peak / 7.0, _TINY) if peak > 0.0 else 1.0
    q = np.clip(np.rint(values / np.float32(scale)), -7, 7).astype(np.int8)
    return q, scale


def _topk_count(size: int, k_fraction: float) -> int:
    """Values a top-k codec keeps of a tensor of ``size``: ``ceil(k_fraction * size)``,
    at least one of a non-empty tensor."""
    _check_fraction(k_fraction)
    if size == 0:
        return 0
    # The epsilon keeps 0.07 * 100 (7.000000000000001 in binary) at 7.
    return min(size, max(1, math.ceil(k_fraction * size - 1e-9)))


def _topk_indices(flat: np.ndarray, k: int) -> np.ndarray:
    """Sorted flat indices of the ``k`` entries of largest magnitude."""
    size = flat.size
    if k >= size:
        return np.arange(size, dtype=np.int64)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    idx = np.argpartition(np.abs(flat), size - k)[size - k :]
    return np.sort(idx).astype(np.int64)


def topk_with_feedback(
    delta: Mapping[str, np.ndarray],
    residual: Mapping[str, np.ndarray] | None,
    k_fraction: float,
    *,
    codec: str = "topk-f32",
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Top-k sparsify ``delta + residual``; return ``(sent, new_residual)``.

    ``sent`` is dense (zeros except the kept entries) and is exactly what the receiver
    decodes once it is encoded with ``codec`` and the same ``k_fraction``: for
    ``"topk-int8"`` the kept values are already quantized, so their rounding error lands
    in the residual too. ``new_residual = delta + residual - sent``; carry it to the next
    round (``None`` for the first). Pure: the inputs are not modified.
    """
    if codec not in ("topk-f32", "topk-int8"):
        raise CodecError("unknown_codec", f"{codec!r} is not a top-k codec")
    _check_fraction(k_fraction)
    sent: dict[str, np.ndarray] = {}
    new_residual: dict[str, np.ndarray] = {}
    for name, value in delta.items():
        corrected = np.array(value, dtype=np.float32, copy=True)
        if residual is not None:
            carried = np.asarray(residual[name], dtype=np.float32)
            if carried.shape != corrected.shape:
                raise ValueError(
                    f"residual {name} has shape {carried.shape}, delta {corrected.shape}"
                )
            corrected += carried
        flat = corrected.reshape(-1)
        idx = _topk_indices(flat, _topk_count(flat.size, k_fraction))
        kept = flat[idx]
        if codec == "topk-int8":
            q, scale = quantize_int8(kept)
            kept = q.astype(np.float32) * np.float32(scale)
        out = np.zeros_like(flat)
        out[idx] = kept
        sent[name] = out.reshape(corrected.shape)
        new_residual[name] = corrected - sent[name]
    return sent, new_residual


# ---------------------------------------------------------------- encoding


def encode_tensors(
    tensors: Mapping[str, np.ndarray], codec: str, *, k_fraction: float = DEFAULT_K_FRACTION
) -> bytes:
    """Encode named tensors with ``codec`` (one of :data:`CODECS`).

    ``k_fraction`` is the share of each tensor a ``topk-*`` codec keeps (largest
    magnitudes; exact zeros among them are not sent); other codecs ignore it.
    """
    if codec not in CODECS:
        raise CodecError("unknown_codec", f"codec {codec!r} is not one of {CODECS}")
    if codec.startswith("topk-"):
        _check_fraction(k_fraction)
    parts = [struct.pack("<H", len(tensors))]
    for name, value in tensors.items():
        if not _NAME.fullmatch(name):
            raise CodecError("bad_name", f"tensor name {name!r} is not an identifier")
        array = np.asarray(value, dtype=np.float32)
        if array.ndim > _MAX_NDIM:
            raise CodecError("bad_shape", f"tensor {name} has {array.ndim} dims (max 4)")
        if not np.all(np.isfinite(array)):
            raise CodecError("non_finite", f"tensor {name} holds NaN or Inf")
        raw_name = name.encode("ascii")
        head = struct.pack("<B", len(raw_name)) + raw_name
        dims = struct.pack(f"<{array.ndim}I", *array.shape)
        dtype_code, body = _ENCODERS[codec](array, k_fraction)
        parts += [head, struct.pack("<BB", dtype_code, array.ndim), dims, *body]
    return b"".join(parts)


def _encode_f32(array: np.ndarray, _k: float) -> tuple[int, list[bytes]]:
    return _DTYPE_F32, [np.ascontiguousarray(array, dtype="<f4").tobytes()]


def _encode_int8(array: np.ndarray, _k: float) -> tuple[int, list[bytes]]:
    q, scale = quantize_int8(array)
    return _DTYPE_INT8, [struct.pack("<f", scale), q.tobytes()]


def _encode_int8_channel(array: np.ndarray, _k: float) -> tuple[int, list[bytes]]:
    q, scales = quantize_int8_channels(array)
    return _DTYPE_INT8_CHANNEL, [scales.astype("<f4").tobytes(), q.tobytes()]


def _encode_int4(array: np.ndarray, _k: float) -> tuple[int, list[bytes]]:
    q, scale = quantize_int4(array)
    nibbles = (q.reshape(-1).astype(np.uint8)) & np.uint8(0x0F)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    packed = nibbles[0::2] | (nibbles[1::2] << np.uint8(4))
    return _DTYPE_INT4, [struct.pack("<f", scale), packed.astype(np.uint8).tobytes()]


def _sparse(array: np.ndarray, k_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    flat = array.reshape(-1)
    idx = _topk_indices(flat, _topk_count(flat.size, k_fraction))
    idx = idx[flat[idx] != 0]
    return idx, flat[idx]


def _encode_topk_f32(array: np.ndarray, k_fraction: float) -> tuple[int, list[bytes]]:
    idx, values = _sparse(array, k_fraction)
    return _DTYPE_SPARSE_F32, [
        struct.pack("<I", idx.size),
        idx.astype("<u4").tobytes(),
        values.astype("<f4").tobytes(),
    ]


def _encode_topk_int8(array: np.ndarray, k_fraction: float) -> tuple[int, list[bytes]]:
    idx, values = _sparse(array, k_fraction)
    q, scale = quantize_int8(values)
    keep = q != 0  # entries that round to zero carry nothing
    idx, q = idx[keep], q[keep]
    return _DTYPE_SPARSE_INT8, [
        struct.pack("<I", idx.size),
        idx.astype("<u4").tobytes(),
        struct.pack("<f", scale),
        q.tobytes(),
    ]


_ENCODERS = {
    "f32": _encode_f32,
    "int8": _encode_int8,
    "int8-channel": _encode_int8_channel,
    "int4": _encode_int4,
    "topk-f32": _encode_topk_f32,
    "topk-int8": _encode_topk_int8,
}


# ---------------------------------------------------------------- decoding


class _Reader:
    """Bounds-checked cursor: every read is checked against the bytes left first."""

    __slots__ = ("buf", "end", "pos")

    def __init__(self, payload: bytes):
        self.buf = memoryview(payload)
        self.end = len(self.buf)
        self.pos = 0

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > self.end:
            raise CodecError("truncated", f"payload ends inside {what}")
        chunk = self.buf[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def scale(self, name: str) -> float:
        (value,) = struct.unpack("<f", self.take(4, "scale"))
        if not np.isfinite(value) or value <= 0.0:
            raise CodecError("non_finite", f"tensor {name} has scale {value}")
        return float(value)


def encode_masked(tensors: Mapping[str, np.ndarray], shapes, bits: int) -> bytes:
    """A masked input's payload: each tensor's residues modulo ``2**bits`` (uint32, flat,
    in the model's order) packed ``bits`` each (dtype 7)."""
    if not 8 <= bits <= 32:
        raise CodecError("bad_value", f"{bits} residue bits (8 to 32)")
    parts = [struct.pack("<H", len(tensors))]
    for name, value in tensors.items():
        shape = tuple(shapes[name])
        raw_name = name.encode("ascii")
        flat = np.ascontiguousarray(value, dtype="<u4").reshape(-1)
        if flat.size != math.prod(shape):
            raise CodecError("bad_shape", f"tensor {name} has {flat.size} residues for {shape}")
        parts += [
            struct.pack("<B", len(raw_name)) + raw_name,
            struct.pack("<BB", _DTYPE_MASKED, len(shape)),
            struct.pack(f"<{len(shape)}I", *shape),
            struct.pack("<B", bits),
            _pack_residues(flat, bits),
        ]
    return b"".join(parts)


def _pack_residues(values: np.ndarray, bits: int) -> bytes:
    unpacked = np.unpackbits(values.view(np.uint8).reshape(-1, 4), axis=1, bitorder="little")
    return np.packbits(unpacked[:, :bits].reshape(-1), bitorder="little").tobytes()


def _unpack_residues(raw, bits: int, count: int) -> np.ndarray:
    flat = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")
    full = np.zeros((count, 32), dtype=np.uint8)
    full[:, :bits] = flat[: count * bits].reshape(count, bits)
    return np.packbits(full, axis=1, bitorder="little").view("<u4").reshape(count)


def iter_tensors(payload: bytes, *, max_elements: int) -> Iterator[TensorView]:
    """Walk a payload strictly, yielding one :class:`TensorView` per tensor.

    ``max_elements`` bounds the total dense element count of the payload; it is checked
    from the declared dims before any tensor data is read or allocated. Raises
    :class:`CodecError` (with a reason code) on the first inconsistency.
    """
    reader = _Reader(payload)
    take = reader.take
    (count,) = struct.unpack("<H", take(2, "tensor count"))
    total = 0
    seen: set[str] = set()
    for _ in range(count):
        (name_len,) = struct.unpack("<B", take(1, "name length"))
        try:
            name = bytes(take(name_len, "name")).decode("ascii")
        except UnicodeDecodeError:
            raise CodecError("bad_name", "tensor name is not ASCII") from None
        if not _NAME.fullmatch(name) or name in seen:
            raise CodecError("bad_name", f"tensor name {name!r} is invalid or repeated")
        seen.add(name)
        dtype_code, ndim = struct.unpack("<BB", take(2, "dtype"))
        if dtype_code not in _DTYPES:
            raise CodecError("bad_dtype", f"tensor {name} has dtype code {dtype_code}")
        if ndim > _MAX_NDIM:
            raise CodecError("bad_shape", f"tensor {name} has {ndim} dims (max 4)")
        shape = tuple(struct.unpack(f"<{ndim}I", take(4 * ndim, "dims")))
        size = 1
        for dim in shape:
            size *= dim
        total += size
        if total > max_elements:
            raise CodecError("too_large", f"payload holds more than {max_elements} values")
        if dtype_code == _DTYPE_F32:
            data = np.frombuffer(take(4 * size, "data"), dtype="<f4")
            yield TensorView(name=name, shape=shape, data=data, scale=1.0)
        elif dtype_code == _DTYPE_INT8:
            scale = reader.scale(name)
            data = np.frombuffer(take(size, "data"), dtype=np.int8)
            yield TensorView(name=name, shape=shape, data=data, scale=scale)
        elif dtype_code == _DTYPE_MASKED:
            (bits,) = struct.unpack("<B", take(1, "bits"))
            if not 8 <= bits <= 32:
                raise CodecError("bad_value", f"tensor {name} has {bits} residue bits")
            data = _unpack_residues(take((size * bits + 7) // 8, "data"), bits, size)
            if bits < 32 and size and int(data.max()) >> bits:
                raise CodecError("bad_value", f"tensor {name} has residues over {bits} bits")
            data.flags.writeable = False
            yield TensorView(name=name, shape=shape, data=data, scale=1.0)
        else:
            with np.errstate(over="ignore", invalid="ignore"):  # overflow -> inf -> refused
                dense = _DECODERS[dtype_code](reader, name, shape, size)
            if not np.all(np.isfinite(dense)):
                raise CodecError("non_finite", f"tensor {name} holds NaN or Inf")
            dense.flags.writeable = False
            yield TensorView(name=name, shape=shape, data=dense, scale=1.0)
    if reader.pos != reader.end:
        raise CodecError("trailing_bytes", f"{reader.end - reader.pos} bytes after the last tensor")


def _int8_values(raw: memoryview, name: str) -> np.ndarray:
    q = np.frombuffer(raw, dtype=np.int8)
    if q.size and int(q.min()) == -128:
        raise CodecError("bad_value", f"tensor {name} holds -128 (symmetric int8 is +-127)")
    return q


def _decode_int8_channel(reader: _Reader, name: str, shape: tuple, size: int) -> np.ndarray:
    channels = _channels(shape)
    scales = np.frombuffer(reader.take(4 * channels, "scales"), dtype="<f4")
    if not (np.all(np.isfinite(scales)) and np.all(scales > 0)):
        raise CodecError("non_finite", f"tensor {name} has a scale that is not finite and > 0")
    q = _int8_values(reader.take(size, "data"), name)
    if size == 0:
        return np.zeros(0, dtype=np.float32)
    dense = q.reshape(-1, channels).astype(np.float32)
    dense *= scales.astype(np.float32)
    return dense.reshape(-1)


def _decode_int4(reader: _Reader, name: str, shape: tuple, size: int) -> np.ndarray:
    scale = reader.scale(name)
    packed = np.frombuffer(reader.take((size + 1) // 2, "data"), dtype=np.uint8)
    nibbles = np.empty(2 * packed.size, dtype=np.uint8)
    nibbles[0::2] = packed & 0x0F
    nibbles[1::2] = packed >> 4
    if size % 2 and nibbles[-1] != 0:
        raise CodecError("bad_value", f"tensor {name} has a non-zero padding nibble")
    nibbles = nibbles[:size]
    if np.any(nibbles == 8):
        raise CodecError("bad_value", f"tensor {name} holds -8 (symmetric int4 is +-7)")
    q = (nibbles.astype(np.int8) ^ np.int8(8)) - np.int8(8)
    return q.astype(np.float32) * np.float32(scale)


def _sparse_indices(reader: _Reader, name: str, size: int) -> np.ndarray:
    (k,) = struct.unpack("<I", reader.take(4, "value count"))
    if k > size:
        raise CodecError("bad_count", f"tensor {name} keeps {k} of {size} values")
    idx = np.frombuffer(reader.take(4 * k, "indices"), dtype="<u4")
    if k and int(idx.max()) >= size:
        raise CodecError("index_out_of_range", f"tensor {name} has an index >= {size}")
    if k > 1 and not np.all(idx[1:] > idx[:-1]):
        raise CodecError("unsorted_indices", f"tensor {name} has indices not strictly increasing")
    return idx


def _decode_sparse_f32(reader: _Reader, name: str, shape: tuple, size: int) -> np.ndarray:
    idx = _sparse_indices(reader, name, size)
    values = np.frombuffer(reader.take(4 * idx.size, "values"), dtype="<f4")
    dense = np.zeros(size, dtype=np.float32)
    dense[idx] = values
    return dense


def _decode_sparse_int8(reader: _Reader, name: str, shape: tuple, size: int) -> np.ndarray:
    idx = _sparse_indices(reader, name, size)
    scale = reader.scale(name)
    q = _int8_values(reader.take(idx.size, "values"), name)
    dense = np.zeros(size, dtype=np.float32)
    dense[idx] = q.astype(np.float32) * np.float32(scale)
    return dense


_DECODERS = {
    _DTYPE_INT8_CHANNEL: _decode_int8_channel,
    _DTYPE_INT4: _decode_int4,
    _DTYPE_SPARSE_F32: _decode_sparse_f32,
    _DTYPE_SPARSE_INT8: _decode_sparse_int8,
}


def decode_tensors(payload: bytes, *, max_elements: int = 10_000_000) -> dict[str, np.ndarray]:
    """Decode a payload into float32 arrays, refusing NaN and Inf."""
    out: dict[str, np.ndarray] = {}
    for view in iter_tensors(payload, max_elements=max_elements):
        if view.data.dtype == np.uint32:
            raise CodecError("bad_dtype", f"tensor {view.name} is masked: it has no value alone")
        array = view.dequantize()
        if not np.all(np.isfinite(array)):
            raise CodecError("non_finite", f"tensor {view.name} holds NaN or Inf")
        out[view.name] = array
    return out


def _channels(shape: tuple[int, ...]) -> int:
    return shape[-1] if len(shape) >= 2 else 1


def _check_fraction(k_fraction: float) -> None:
    if not (isinstance(k_fraction, (int, float)) and 0.0 < k_fraction <= 1.0):
        raise ValueError(f"k_fraction must be in (0, 1], got {k_fraction!r}")
