"""The signed message envelope used for updates (device -> gateway) and global models
(gateway -> devices). ``docs/wire.md`` is the normative description; keep them in step.

Frame (big-endian lengths)::

    offset  size  field
    0       4     magic b"FLDG"
    4       1     wire version (1)
    5       1     message type (1 = update, 2 = model, 3 = stage)
    6       2     header length H (<= 2048)
    8       4     payload length P
    12      H     header: canonical JSON object, fields fixed per type
    12+H    P     payload: tensors, see ``_codec``
    12+H+P  1     signature length S (64)
    13+H+P  S     signature over bytes [0, 12+H) of this frame: Ed25519, or ECDSA P-256
                  as r || s when an update header names ``"alg": "ecdsa-p256-sha256"``

The signature covers the fixed prefix and the header; the header carries the SHA-256 of the
payload, so the payload is bound too without signing it twice. An update's header names its
signature algorithm (``alg``), the signer's certificate when it signs with one (``cert``),
and, when the payload is sealed to the gateway (``enc``, ``epk``), ``payload_sha256`` is the
digest of the ciphertext: the signature is checked before anything is decrypted.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import struct
from dataclasses import asdict, dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from ._canonical import canonical_json
from ._certs import ALG_ECDSA_P256, ALG_ED25519, MAX_CERTIFICATE_BYTES, SIGNING_ALGS
from ._codec import CODECS, MASKED_CODEC
from ._errors import DecryptError, WireError
from ._seal import ENC_X25519_AES256GCM, open_sealed, seal
from ._signing import SIGNATURE_BYTES, Signer
from ._topics import IDENTIFIER

MAGIC = b"FLDG"
WIRE_VERSION = 1
TYPE_UPDATE = 1
TYPE_MODEL = 2
#: A secure aggregation message from the gateway (roster, relayed shares, unmask request).
TYPE_STAGE = 3
#: What a device's update header may name as its codec: a task codec, the masked input of
#: secure aggregation, or one of its protocol messages (JSON payloads on the secagg topic).
STAGE_CODECS = ("secagg-keys", "secagg-shares", "secagg-reveal")
UPDATE_CODECS = (*CODECS, MASKED_CODEC, *STAGE_CODECS)
#: The gateway's secure aggregation messages, in the order a round sends them.
STAGES = ("roster", "relay", "unmask")
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
    payload_sha256: str = ""  # of the payload as sent: the ciphertext when sealed
    alg: str = ALG_ED25519  # the signature algorithm; absent in frames of older agents
    cert: str = ""  # base64 DER certificate of the signer, with alg ecdsa-p256-sha256 only
    enc: str = ""  # sealing scheme when the payload is encrypted to the gateway
    epk: str = ""  # base64 ephemeral X25519 public key of the sealing

    @property
    def certificate(self) -> bytes | None:
        return base64.b64decode(self.cert) if self.cert else None


@dataclass(frozen=True, slots=True)
class ModelHeader:
    task: str
    round: int  # the round this model opens (or, when final, the last round + 1)
    status: str  # "open": train on it; "final": the task is finished
    deadline: float  # unix seconds after which the gateway closes the round
    payload_sha256: str = ""
    #: A task with sampled rounds (differential privacy): the devices asked to train on this
    #: model, sorted; the others skip the round. ``None``: every device trains.
    sampled: tuple[str, ...] | None = None
    #: The gateway's run of the task (16 hex, made with its store): a task id reused with a
    #: fresh store is a new run, and its agents start over. ``None``: not sent.
    run: str | None = None

    @property
    def model_hash(self) -> str:
        """A global model is named by the SHA-256 of its float32 payload."""
        return self.payload_sha256


@dataclass(frozen=True, slots=True)
class StageHeader:
    """A secure aggregation message of the gateway (``docs/wire.md``, type 3)."""

    task: str
    round: int
    stage: str  # one of STAGES
    base: str  # the round's base model
    payload_sha256: str = ""
    #: To one device (``relay``: its shares, on its inbox topic); ``""``: to every device.
    to: str = ""


@dataclass(frozen=True, slots=True)
class Envelope:
    """A decoded frame; the signature is not yet checked."""

    type: int
    header: UpdateHeader | ModelHeader | StageHeader
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


def _update_fields(header: UpdateHeader) -> dict[str, Any]:
    """The header as it goes on the wire: optional fields only when set."""
    fields = asdict(header)
    for key in _UPDATE_OPTIONAL_EMPTY:
        if not fields[key]:
            del fields[key]
    return fields


def _sealing_aad(fields: dict[str, Any]) -> bytes:
    """Associated data of a sealed payload: every header field but the ciphertext's digest,
    so a ciphertext opens only in the frame (task, round, device, counter...) it was made for."""
    rest = {k: v for k, v in fields.items() if k != "payload_sha256"}
    return MAGIC + bytes([WIRE_VERSION, TYPE_UPDATE]) + canonical_json(rest)


def encode_update(
    header: UpdateHeader,
    payload: bytes,
    signer: Signer,
    *,
    seal_to: X25519PublicKey | None = None,
) -> bytes:
    """Frame and sign an update; ``payload_sha256`` is computed here.

    ``header.alg`` must name what ``signer`` does (and ``header.cert`` carry the certificate
    of an ECDSA signer). With ``seal_to`` the payload is encrypted to that gateway key with a
    fresh ephemeral key; ``enc`` and ``epk`` are filled in here.
    """
    if seal_to is not None:
        ephemeral = X25519PrivateKey.generate()
        epk = base64.b64encode(ephemeral.public_key().public_bytes_raw()).decode("ascii")
        fields = _update_fields(header) | {"enc": ENC_X25519_AES256GCM, "epk": epk}
        fields["payload_sha256"] = "0" * 64
        _check_update(fields)
        payload = seal(payload, seal_to, _sealing_aad(fields), ephemeral=ephemeral)
    else:
        fields = _update_fields(header)
    fields["payload_sha256"] = hashlib.sha256(payload).hexdigest()
    _check_update(fields)
    return _frame(TYPE_UPDATE, fields, payload, signer)


def open_update_payload(envelope: Envelope, private_key: X25519PrivateKey | None) -> bytes:
    """The plaintext payload of an update: as sent, or opened with the gateway's key.

    Raises :class:`~fedcore.DecryptError` when a sealed payload does not open (another
    gateway's key, no key, or bytes changed in transit).
    """
    header = envelope.header
    assert isinstance(header, UpdateHeader)
    if not header.enc:
        return envelope.payload
    if private_key is None:
        raise DecryptError("the payload is sealed and this gateway holds no decryption key")
    epk = base64.b64decode(header.epk)
    aad = _sealing_aad(_update_fields(header))
    return open_sealed(envelope.payload, epk, private_key, aad)


def encode_model(header: ModelHeader, payload: bytes, signer: Signer) -> bytes:
    fields = asdict(header)
    if header.sampled is None:
        del fields["sampled"]  # absent, so a model without sampling has the header it had
    else:
        fields["sampled"] = list(header.sampled)
    if header.run is None:
        del fields["run"]
    fields["payload_sha256"] = hashlib.sha256(payload).hexdigest()
    _check_model(fields)
    return _frame(TYPE_MODEL, fields, payload, signer)


def encode_stage(header: StageHeader, payload: bytes, signer: Signer) -> bytes:
    fields = asdict(header)
    if not header.to:
        del fields["to"]
    fields["payload_sha256"] = hashlib.sha256(payload).hexdigest()
    _check_stage(fields)
    return _frame(TYPE_STAGE, fields, payload, signer)


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
    if kind not in (TYPE_UPDATE, TYPE_MODEL, TYPE_STAGE):
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
    header: UpdateHeader | ModelHeader | StageHeader
    if kind == TYPE_UPDATE:
        _check_update(fields)
        header = UpdateHeader(**fields)
    elif kind == TYPE_STAGE:
        _check_stage(fields)
        header = StageHeader(**fields)
    else:
        _check_model(fields)
        if "sampled" in fields:
            fields["sampled"] = tuple(fields["sampled"])
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
#: Optional update fields: present only when set (an explicit empty value is malformed).
_UPDATE_OPTIONAL = {"alg": str, "cert": str, "enc": str, "epk": str}
_UPDATE_OPTIONAL_EMPTY = ("cert", "enc", "epk")
_MODEL_FIELDS = {
    "task": str,
    "round": int,
    "status": str,
    "deadline": float,
    "payload_sha256": str,
}
_MAX_INT = 2**53


def _check_update(fields: dict[str, Any]) -> None:
    optional = {k: v for k, v in _UPDATE_OPTIONAL.items() if k in fields}
    _require(fields, _UPDATE_FIELDS | optional)
    _check_signing_fields(fields)
    _check_identifier(fields["task"], "task")
    _check_identifier(fields["device"], "device")
    _check_hex64(fields["base"], "base")
    _check_hex64(fields["payload_sha256"], "payload_sha256")
    if not 0 <= fields["round"] < _MAX_INT or not 0 <= fields["counter"] < _MAX_INT:
        raise WireError("malformed", "round and counter must be in [0, 2**53)")
    if not 1 <= fields["samples"] < _MAX_INT:
        raise WireError("malformed", "samples must be in [1, 2**53)")
    if fields["codec"] not in UPDATE_CODECS:
        raise WireError("malformed", f"codec must be one of {UPDATE_CODECS}")


_STAGE_FIELDS = {
    "task": str,
    "round": int,
    "stage": str,
    "base": str,
    "payload_sha256": str,
}


def _check_stage(fields: dict[str, Any]) -> None:
    to = fields.get("to")
    _require({k: v for k, v in fields.items() if k != "to"}, _STAGE_FIELDS)
    if to is not None:
        if not isinstance(to, str):
            raise WireError("malformed", "header field to must be str")
        _check_identifier(to, "to")
    _check_identifier(fields["task"], "task")
    _check_hex64(fields["base"], "base")
    _check_hex64(fields["payload_sha256"], "payload_sha256")
    if not 0 <= fields["round"] < _MAX_INT:
        raise WireError("malformed", "round must be in [0, 2**53)")
    if fields["stage"] not in STAGES:
        raise WireError("malformed", f"stage must be one of {STAGES}")


def _check_model(fields: dict[str, Any]) -> None:
    sampled = fields.get("sampled")
    if "sampled" in fields:
        if not isinstance(sampled, list) or not all(isinstance(d, str) for d in sampled):
            raise WireError("malformed", "header field sampled must be a list of device ids")
        for device in sampled:
            _check_identifier(device, "sampled")
        if sampled != sorted(set(sampled)):
            raise WireError("malformed", "header field sampled must be sorted, without repeats")
        fields = {k: v for k, v in fields.items() if k != "sampled"}
    if "run" in fields:
        run = fields["run"]
        if not isinstance(run, str) or len(run) != 16 or not set(run) <= _HEX64:
            raise WireError("malformed", "header field run must be 16 lowercase hex digits")
        fields = {k: v for k, v in fields.items() if k != "run"}
    _require(fields, _MODEL_FIELDS)
    _check_identifier(fields["task"], "task")
    _check_hex64(fields["payload_sha256"], "payload_sha256")
    if not 0 <= fields["round"] < _MAX_INT:
        raise WireError("malformed", "round must be in [0, 2**53)")
    if fields["status"] not in MODEL_STATUSES:
        raise WireError("malformed", f"status must be one of {MODEL_STATUSES}")


def _b64_length(value: str, key: str, low: int, high: int) -> int:
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise WireError("malformed", f"header field {key} is not base64") from None
    if not low <= len(raw) <= high or base64.b64encode(raw).decode("ascii") != value:
        raise WireError("malformed", f"header field {key} has a bad length or form")
    return len(raw)


def _check_signing_fields(fields: dict[str, Any]) -> None:
    """``alg`` decides what else must be there, so no field can be dropped or added alone."""
    alg = fields.get("alg", ALG_ED25519)
    if alg not in SIGNING_ALGS:
        raise WireError("malformed", f"alg must be one of {SIGNING_ALGS}")
    if alg == ALG_ECDSA_P256:
        if "cert" not in fields:
            raise WireError("malformed", f"alg {ALG_ECDSA_P256} needs the signer's cert")
        _b64_length(fields["cert"], "cert", 1, MAX_CERTIFICATE_BYTES)
    elif "cert" in fields:
        raise WireError("malformed", "cert is only carried with a certificate signature")
    if ("enc" in fields) != ("epk" in fields):
        raise WireError("malformed", "enc and epk come together")
    if "enc" in fields:
        if fields["enc"] != ENC_X25519_AES256GCM:
            raise WireError("malformed", f"enc must be {ENC_X25519_AES256GCM}")
        _b64_length(fields["epk"], "epk", 32, 32)
