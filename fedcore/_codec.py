"""Tensor codecs: how named float tensors become payload bytes and back.

Layout (little-endian), documented in ``docs/wire.md``::

    u16 count
    count x tensor:
        u8  name length, name (ASCII identifier)
        u8  dtype       1 = float32, 2 = int8 (symmetric, per tensor)
        u8  ndim        0..4
        ndim x u32      dims
        f32 scale       int8 only: value = q * scale
        data            prod(dims) x itemsize bytes

Decoding is strict: every length is checked against what is left before anything is
allocated, the total element count is bounded, the payload must be consumed exactly, and
non-finite values are refused.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from ._errors import CodecError

CODECS = ("f32", "int8")
_DTYPE_F32 = 1
_DTYPE_INT8 = 2
_MAX_NDIM = 4
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]{0,63}$")


@dataclass(frozen=True, slots=True)
class TensorView:
    """One tensor as it sits in a payload, before dequantization."""

    name: str
    shape: tuple[int, ...]
    data: np.ndarray  # float32 or int8, flat, read-only view into the payload
    scale: float  # 1.0 for float32

    def dequantize(self) -> np.ndarray:
        if self.data.dtype == np.float32:
            return self.data.reshape(self.shape).copy()
        return (self.data.astype(np.float32) * np.float32(self.scale)).reshape(self.shape)


def quantize_int8(values: np.ndarray) -> tuple[np.ndarray, float]:
    """Symmetric per-tensor int8: ``values ~= q * scale`` with ``q`` in [-127, 127]."""
    values = np.asarray(values, dtype=np.float32)
    peak = float(np.max(np.abs(values))) if values.size else 0.0
    scale = peak / 127.0 if peak > 0.0 else 1.0
    q = np.clip(np.rint(values / np.float32(scale)), -127, 127).astype(np.int8)
    return q, scale


def encode_tensors(tensors: Mapping[str, np.ndarray], codec: str) -> bytes:
    """Encode named tensors with ``codec`` (``"f32"`` or ``"int8"``)."""
    if codec not in CODECS:
        raise CodecError("unknown_codec", f"codec {codec!r} is not one of {CODECS}")
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
        if codec == "f32":
            parts += [head, struct.pack("<BB", _DTYPE_F32, array.ndim), dims]
            parts.append(np.ascontiguousarray(array, dtype="<f4").tobytes())
        else:
            q, scale = quantize_int8(array)
            parts += [head, struct.pack("<BB", _DTYPE_INT8, array.ndim), dims]
            parts += [struct.pack("<f", scale), q.tobytes()]
    return b"".join(parts)


def iter_tensors(payload: bytes, *, max_elements: int) -> Iterator[TensorView]:
    """Walk a payload strictly, yielding views without copying tensor data.

    Raises :class:`CodecError` (with a reason code) on the first inconsistency.
    """
    buf = memoryview(payload)
    end = len(buf)
    pos = 0

    def take(n: int, what: str) -> memoryview:
        nonlocal pos
        if n < 0 or pos + n > end:
            raise CodecError("truncated", f"payload ends inside {what}")
        chunk = buf[pos : pos + n]
        pos += n
        return chunk

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
        if dtype_code not in (_DTYPE_F32, _DTYPE_INT8):
            raise CodecError("bad_dtype", f"tensor {name} has dtype code {dtype_code}")
        if ndim > _MAX_NDIM:
            raise CodecError("bad_shape", f"tensor {name} has {ndim} dims (max 4)")
        shape = struct.unpack(f"<{ndim}I", take(4 * ndim, "dims"))
        size = 1
        for dim in shape:
            size *= dim
        total += size
        if total > max_elements:
            raise CodecError("too_large", f"payload holds more than {max_elements} values")
        if dtype_code == _DTYPE_F32:
            data = np.frombuffer(take(4 * size, "data"), dtype="<f4")
            scale = 1.0
        else:
            (scale,) = struct.unpack("<f", take(4, "scale"))
            if not np.isfinite(scale) or scale <= 0.0:
                raise CodecError("non_finite", f"tensor {name} has scale {scale}")
            data = np.frombuffer(take(size, "data"), dtype=np.int8)
        yield TensorView(name=name, shape=tuple(shape), data=data, scale=float(scale))
    if pos != end:
        raise CodecError("trailing_bytes", f"{end - pos} bytes after the last tensor")


def decode_tensors(payload: bytes, *, max_elements: int = 10_000_000) -> dict[str, np.ndarray]:
    """Decode a payload into float32 arrays, refusing NaN and Inf."""
    out: dict[str, np.ndarray] = {}
    for view in iter_tensors(payload, max_elements=max_elements):
        array = view.dequantize()
        if not np.all(np.isfinite(array)):
            raise CodecError("non_finite", f"tensor {view.name} holds NaN or Inf")
        out[view.name] = array
    return out
