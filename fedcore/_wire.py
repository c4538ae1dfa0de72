"""The signed message envelope used for updates (device -> gateway) and global models
(gateway -> devices). ``docs/wire.md`` is the normative description; keep them in step.

Frame (big-endian lengths)::

    offset  size  field
    0       4     magic b"FLDG"
    4       1     wire version (1)
    5       1     message type (1 = update, 2 = model)
    6       2     header length H (<= 2048)
    8       4     payload length P
    12      H     header: canonical JSON object, fields fixed per type
    12+H    P     payload: tensors, see ``_codec``
    12+H+P  1     signature length S (64)
    13+H+P  S     Ed25519 signature over bytes [0, 12+H) of this frame

The signature covers the fixed prefix and the header; the header carries the SHA-256 of the
payload, so the payload is bound too without signing it twice.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import asdict, dataclass
from typing import Any

from ._canonical import canonical_json
from ._codec import CODECS
from ._errors import WireError
from ._signing import SIGNATURE_BYTES, Signer
from ._topics import IDENTIFIER

MAGIC = b"FLDG"
WIRE_VERSION = 1
TYPE_UPDATE = 1
TYPE_MODEL = 2
PREFIX_BYTES = 12
MAX_HEADER_BYTES = 2048
DEFAULT_MAX_MESSAGE_BYTES = 1 << 20
MODEL_STATUSES = ("open", "final")
_PREFIX = struct.Struct(">4sBBHI")
_HEX64 = frozenset("0123456789abcdef")


@dataclass(frozen=True, slots=True)
class UpdateHeader:
    task: str
    round: int
    device: str
    base: str  # sha256 hex of the global model the update was trained from
    samples: int
    codec: str
    counter: int  # per-device, strictly increasing across every update it sends
    payload_sha256: str = ""


@dataclass(frozen=True, slots=True)
class ModelHeader:
    task: str
    round: int  # the round this model opens (or, when final, the last round + 1)
    status: str  # "open": train on it; "final": the task is finished
    deadline: float  # unix seconds after which the gateway closes the round
    payload_sha256: str = ""

    @property
    def model_hash(self) -> str:
        """A global model is named by the SHA-256 of its float32 payload."""
        return self.payload_sha256


@dataclass(frozen=True, slots=True)
class Envelope:
    """A decoded frame; the signature is not yet checked."""

    type: int
    header: UpdateHeader | ModelHeader
    signed: bytes  # the exact bytes the signature covers
    payload: bytes
    signature: bytes

    @property
    def size(self) -> int:
        return len(self.signed) + len(self.payload) + 1 + len(self.signature)

    def digest(self) -> str:
        """SHA-256 of the whole frame: the update digest recorded on the ledger."""
        h = hashlib.sha256(self.signed)
        h.update(self.payload)
        h.update(bytes([len(self.signature)]))
        h.update(self.signature)
        return h.hexdigest()


def _frame(kind: int, header: dict[str, Any], payload: bytes, signer: Signer) -> bytes:
    header_bytes = canonical_json(header)
    if len(header_bytes) > MAX_HEADER_BYTES:
        raise WireError("header_too_large", f"header is {len(header_bytes)} bytes")
    prefix = _PREFIX.pack(MAGIC, WIRE_VERSION, kind, len(header_bytes), len(payload))
    signed = prefix + header_bytes
    signature = signer(signed)
    return b"".join((signed, payload, bytes([len(signature)]), signature))


def encode_update(header: UpdateHeader, payload: bytes, signer: Signer) -> bytes:
    """Frame and sign an update; ``payload_sha256`` is computed here."""
    fields = asdict(header)
    fields["payload_sha256"] = hashlib.sha256(payload).hexdigest()
    _check_update(fields)
    return _frame(TYPE_UPDATE, fields, payload, signer)


def encode_model(header: ModelHeader, payload: bytes, signer: Signer) -> bytes:
    fields = asdict(header)
    fields["payload_sha256"] = hashlib.sha256(payload).hexdigest()
    _check_model(fields)
    return _frame(TYPE_MODEL, fields, payload, signer)


def decode_envelope(data: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Envelope:
    """Split and check a frame without trusting any of it.

    Checks run cheapest first: total size, prefix, lengths, header schema, payload digest.
    Raises :class:`WireError` whose ``reason`` is one of the codes in ``docs/wire.md``.
    """
    if len(data) > max_bytes:
        raise WireError("too_large", f"message is {len(data)} bytes, limit {max_bytes}")
    if len(data) < PREFIX_BYTES:
        raise WireError("malformed", "message shorter than the frame prefix")
    magic, version, kind, header_len, payload_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise WireError("malformed", "bad magic")
    if version != WIRE_VERSION:
        raise WireError("unsupported_version", f"wire version {version}, expected 1")
    if kind not in (TYPE_UPDATE, TYPE_MODEL):
        raise WireError("malformed", f"unknown message type {kind}")
    if header_len > MAX_HEADER_BYTES:
        raise WireError("malformed", f"header length {header_len} over {MAX_HEADER_BYTES}")
    sig_at = PREFIX_BYTES + header_len + payload_len
    if sig_at + 1 > len(data):
        raise WireError("truncated", "message shorter than its declared lengths")
    sig_len = data[sig_at]
    if sig_len != SIGNATURE_BYTES:
        raise WireError("malformed", f"signature length {sig_len}, expected {SIGNATURE_BYTES}")
    if sig_at + 1 + sig_len != len(data):
        raise WireError("truncated", "message length does not match its declared lengths")
    header_bytes = data[PREFIX_BYTES : PREFIX_BYTES + header_len]
    try:
        fields = json.loads(header_bytes.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise WireError("malformed", "header is not UTF-8 JSON") from None
    if not isinstance(fields, dict):
        raise WireError("malformed", "header is not a JSON object")
    try:
        # Re-encoding can fail on what json.loads accepts: 1e400 (inf), lone surrogates.
        canonical = canonical_json(fields)
    except (ValueError, RecursionError):
        raise WireError("malformed", "header is not canonical JSON") from None
    if canonical != header_bytes:
        raise WireError("malformed", "header is not canonical JSON")
    header: UpdateHeader | ModelHeader
    if kind == TYPE_UPDATE:
        _check_update(fields)
        header = UpdateHeader(**fields)
    else:
        _check_model(fields)
        header = ModelHeader(**fields)
    payload = data[PREFIX_BYTES + header_len : sig_at]
    if hashlib.sha256(payload).hexdigest() != header.payload_sha256:
        raise WireError("digest_mismatch", "payload does not match payload_sha256")
    return Envelope(
        type=kind,
        header=header,
        signed=data[: PREFIX_BYTES + header_len],
        payload=payload,
        signature=data[sig_at + 1 :],
    )


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in a header")


def _require(fields: dict[str, Any], spec: dict[str, type]) -> None:
    if set(fields) != set(spec):
        missing = sorted(set(spec) - set(fields))
        extra = sorted(set(fields) - set(spec))
        raise WireError("malformed", f"header fields: missing {missing}, unexpected {extra}")
    for key, kind in spec.items():
        value = fields[key]
        ok = isinstance(value, kind) and not isinstance(value, bool)
        if kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok:
            raise WireError("malformed", f"header field {key} must be {kind.__name__}")


def _check_identifier(value: str, key: str) -> None:
    if not IDENTIFIER.fullmatch(value):
        raise WireError("malformed", f"header field {key} is not a valid identifier")


def _check_hex64(value: str, key: str) -> None:
    if len(value) != 64 or not set(value) <= _HEX64:
        raise WireError("malformed", f"header field {key} is not a SHA-256 hex digest")


_UPDATE_FIELDS = {
    "task": str,
    "round": int,
    "device": str,
    "base": str,
    "samples": int,
    "codec": str,
    "counter": int,
    "payload_sha256": str,
}
_MODEL_FIELDS = {
    "task": str,
    "round": int,
    "status": str,
    "deadline": float,
    "payload_sha256": str,
}
_MAX_INT = 2**53


def _check_update(fields: dict[str, Any]) -> None:
    _require(fields, _UPDATE_FIELDS)
    _check_identifier(fields["task"], "task")
    _check_identifier(fields["device"], "device")
    _check_hex64(fields["base"], "base")
    _check_hex64(fields["payload_sha256"], "payload_sha256")
    if not 0 <= fields["round"] < _MAX_INT or not 0 <= fields["counter"] < _MAX_INT:
        raise WireError("malformed", "round and counter must be in [0, 2**53)")
    if not 1 <= fields["samples"] < _MAX_INT:
        raise WireError("malformed", "samples must be in [1, 2**53)")
    if fields["codec"] not in CODECS:
        raise WireError("malformed", f"codec must be one of {CODECS}")


def _check_model(fields: dict[str, Any]) -> None:
    _require(fields, _MODEL_FIELDS)
    _check_identifier(fields["task"], "task")
    _check_hex64(fields["payload_sha256"], "payload_sha256")
    if not 0 <= fields["round"] < _MAX_INT:
        raise WireError("malformed", "round must be in [0, 2**53)")
    if fields["status"] not in MODEL_STATUSES:
        raise WireError("malformed", f"status must be one of {MODEL_STATUSES}")
