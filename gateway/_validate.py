"""Inbound update validation, cheapest checks first; nothing here trusts the sender."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedcore import (
    ALG_ECDSA_P256,
    MASKED_CODEC,
    MAX_ROUND,
    MAX_SAMPLES,
    STAGE_CODECS,
    TYPE_UPDATE,
    CertificateError,
    CertificateTrust,
    CodecError,
    DecryptError,
    Envelope,
    SignatureError,
    TensorView,
    UpdateHeader,
    WireError,
    decode_envelope,
    device_from_topic,
    iter_tensors,
    open_update_payload,
    verify_ecdsa,
    verify_signature,
)

from ._errors import Rejected
from ._registry import DeviceRegistry


@dataclass(frozen=True, slots=True)
class AcceptedUpdate:
    header: UpdateHeader
    digest: str
    views: list[TensorView]
    frame: bytes
    #: SHA-256 of the certificate that signed it; ``None`` for an Ed25519 signature.
    certificate_sha256: str | None = None


@dataclass(frozen=True, slots=True)
class RoundContext:
    """What the gateway expects right now."""

    round: int
    base: str
    has_update: Callable[[str], bool]
    last_counter: Callable[[str], int]
    #: Devices revoked on the ledger: their updates are refused even when signed correctly.
    revoked: frozenset[str] = frozenset()
    #: Asynchronous rounds: how many versions an update's base may lag behind ``round``
    #: (``None``: synchronous, the base must be ``round`` itself) ...
    max_staleness: int | None = None
    #: ... and the base model of each round still accepted as a base.
    bases: Mapping[int, str] = field(default_factory=dict)


class UpdateValidator:
    def __init__(
        self,
        *,
        task: str,
        registry: DeviceRegistry,
        shapes: Mapping[str, tuple[int, ...]],
        max_message_bytes: int,
        trust: CertificateTrust | None = None,
        decryption_key: X25519PrivateKey | None = None,
        require_encryption: bool = False,
        masked: bool = False,
    ):
        """``trust`` (the organisation CA and CRL) admits certificate-signed updates;
        ``decryption_key`` opens payloads sealed to this gateway, and ``require_encryption``
        refuses the others, so a misconfigured device cannot leak updates to the broker."""
        self.trust = trust
        self.decryption_key = decryption_key
        self.require_encryption = require_encryption
        #: A secure aggregation task: updates are masked inputs (codec ``secagg``), only.
        self.masked = masked
        self.task = task
        self.registry = registry
        self.shapes = dict(shapes)
        self.max_message_bytes = max_message_bytes
        self._max_elements = sum(int(np.prod(s)) for s in self.shapes.values())

    def check(self, topic: str, data: bytes, ctx: RoundContext) -> AcceptedUpdate:
        """Return the accepted update or raise :class:`Rejected` with a reason code."""
        envelope, header, fingerprint, sender = self._authenticated(topic, data, ctx.revoked)
        if header.codec in STAGE_CODECS:
            raise Rejected("wrong_type", "a secure aggregation message on the update topic",
                           device=sender)  # fmt: skip
        if (header.codec == MASKED_CODEC) != self.masked:
            why = "this task takes masked inputs only" if self.masked else "a masked input"
            raise Rejected("codec_mismatch", why, device=sender)
        # Authenticated from here on: the checks below are about freshness.
        if header.round > ctx.round:
            raise Rejected("future_round", f"round {header.round} > {ctx.round}", device=sender)
        if ctx.max_staleness is None:
            if header.round < ctx.round:
                raise Rejected("stale_round", f"round {header.round} < {ctx.round}", device=sender)
            base = ctx.base
        else:
            if ctx.round - header.round > ctx.max_staleness:
                raise Rejected(
                    "too_stale",
                    f"round {header.round} is over {ctx.max_staleness} versions behind {ctx.round}",
                    device=sender,
                )
            base = ctx.bases.get(header.round)
        if header.base != base:
            raise Rejected("wrong_base", "trained from another global model", device=sender)
        if header.counter <= ctx.last_counter(header.device):
            raise Rejected("replayed", f"counter {header.counter} already seen", device=sender)
        # Asynchronous rounds take one update per device and base; the gateway checks that
        # where it chooses the buffer (``place_update``).
        if ctx.max_staleness is None and ctx.has_update(header.device):
            raise Rejected("duplicate", "device already contributed this round", device=sender)
        try:
            plaintext = open_update_payload(envelope, self.decryption_key)
        except DecryptError as exc:
            raise Rejected("decrypt_failed", str(exc), device=sender) from None
        views = self._check_payload(plaintext, sender)
        return AcceptedUpdate(
            header=header,
            digest=envelope.digest(),
            views=views,
            frame=data,
            certificate_sha256=fingerprint,
        )

    def authenticate_stage(
        self, topic: str, data: bytes, revoked: frozenset[str]
    ) -> tuple[UpdateHeader, bytes]:
        """A secure aggregation message (keys, shares, reveal) of a registered, unrevoked
        device, its signature checked like an update's: ``(header, JSON payload)``. Its
        round, stage and counter are the protocol's to check."""
        envelope, header, _fingerprint, sender = self._authenticated(topic, data, revoked)
        if header.codec not in STAGE_CODECS:
            raise Rejected("wrong_type", "not a secure aggregation message", device=sender)
        try:
            return header, open_update_payload(envelope, self.decryption_key)
        except DecryptError as exc:
            raise Rejected("decrypt_failed", str(exc), device=sender) from None

    def _authenticated(
        self, topic: str, data: bytes, revoked: frozenset[str]
    ) -> tuple[Envelope, UpdateHeader, str | None, str | None]:
        """Decode, check who sent it and that they may: ``(envelope, header, certificate
        fingerprint, sender)``."""
        sender = device_from_topic(topic, self.task)
        try:
            envelope = decode_envelope(data, max_bytes=self.max_message_bytes)
        except WireError as exc:
            raise Rejected(exc.reason, str(exc), device=sender) from None
        if envelope.type != TYPE_UPDATE:
            raise Rejected("wrong_type", "not an update message", device=sender)
        header = envelope.header
        assert isinstance(header, UpdateHeader)
        if header.device != sender:
            raise Rejected("topic_mismatch", f"header names {header.device!r}", device=sender)
        if header.task != self.task:
            raise Rejected("wrong_task", f"task {header.task!r}", device=sender)
        if header.samples > MAX_SAMPLES or header.round > MAX_ROUND:
            # The wire allows up to 2**53; the ledger does not, and would refuse the round.
            raise Rejected(
                "out_of_range",
                f"samples {header.samples} or round {header.round} over the ledger's limits"
                f" ({MAX_SAMPLES}, {MAX_ROUND})",
                device=sender,
            )
        if header.device not in self.registry:
            raise Rejected("unknown_device", "device is not registered", device=sender)
        if header.device in revoked:
            raise Rejected("revoked", "device is revoked on the ledger", device=sender)
        return envelope, header, self._authenticate(envelope, header, sender), sender

    def _authenticate(
        self, envelope: Envelope, header: UpdateHeader, sender: str | None
    ) -> str | None:
        """Check the signature with the key the gateway expects for this device, never with
        one the header chooses: the algorithm must be the one the device is admitted for
        (Ed25519 needs a registered key, a certificate needs a trusted CA). Returns the
        signing certificate's fingerprint, if any."""
        if self.require_encryption and not header.enc:
            raise Rejected(
                "not_encrypted", "this gateway takes sealed payloads only", device=sender
            )
        if header.alg != ALG_ECDSA_P256:
            key = self.registry.public_key(header.device)
            if key is None:
                raise Rejected(
                    "algorithm_mismatch", "device has no Ed25519 key registered", device=sender
                )
            try:
                verify_signature(key, envelope.signature, envelope.signed)
            except SignatureError:
                raise Rejected(
                    "bad_signature", "signature does not verify", device=sender
                ) from None
            return None
        if self.trust is None:
            raise Rejected(
                "algorithm_mismatch", "this gateway trusts no CA for certificates", device=sender
            )
        der = header.certificate
        assert der is not None  # decode_envelope requires cert with this alg
        try:
            cert = self.trust.verify(der, header.device)
        except CertificateError as exc:
            raise Rejected(exc.reason, str(exc), device=sender) from None
        try:
            verify_ecdsa(cert.public_key(), envelope.signature, envelope.signed)  # type: ignore[arg-type]
        except SignatureError:
            raise Rejected("bad_signature", "signature does not verify", device=sender) from None
        return cert.fingerprint(hashes.SHA256()).hex()

    def plaintext(self, frame: bytes) -> bytes:
        """The tensor payload of a stored (already accepted) frame, opened if sealed."""
        envelope = decode_envelope(frame, max_bytes=len(frame))
        return open_update_payload(envelope, self.decryption_key)

    def _check_payload(self, payload: bytes, sender: str | None) -> list[TensorView]:
        try:
            views = list(iter_tensors(payload, max_elements=self._max_elements))
        except CodecError as exc:
            reason = "non_finite" if exc.reason == "non_finite" else "bad_payload"
            if exc.reason == "too_large":
                reason = "shape_mismatch"
            raise Rejected(reason, str(exc), device=sender) from None
        got = {v.name: v.shape for v in views}
        if got != self.shapes:
            raise Rejected("shape_mismatch", "tensors do not match the task's model", device=sender)
        for view in views:
            if (view.data.dtype == np.uint32) != self.masked:
                raise Rejected("codec_mismatch", f"tensor {view.name}: masked residues"
                               f" {'expected' if self.masked else 'in a plain update'}",
                               device=sender)  # fmt: skip
            if view.data.dtype == np.float32 and not np.isfinite(view.data).all():
                raise Rejected("non_finite", f"tensor {view.name} holds NaN or Inf", device=sender)
            if view.data.dtype == np.int8 and view.data.size:
                # q * scale must stay finite in float32 (scale near FLT_MAX overflows).
                peak = np.float32(np.abs(view.data.astype(np.int16)).max())
                with np.errstate(over="ignore"):
                    if not np.isfinite(peak * np.float32(view.scale)):
                        raise Rejected("non_finite", f"tensor {view.name} overflows", device=sender)
        return views
