"""Inbound update validation, cheapest checks first; nothing here trusts the sender."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from fedcore import (
    TYPE_UPDATE,
    CodecError,
    SignatureError,
    TensorView,
    UpdateHeader,
    WireError,
    decode_envelope,
    device_from_topic,
    iter_tensors,
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


@dataclass(frozen=True, slots=True)
class RoundContext:
    """What the gateway expects right now."""

    round: int
    base: str
    has_update: Callable[[str], bool]
    last_counter: Callable[[str], int]
    #: Devices revoked on the ledger: their updates are refused even when signed correctly.
    revoked: frozenset[str] = frozenset()


class UpdateValidator:
    def __init__(
        self,
        *,
        task: str,
        registry: DeviceRegistry,
        shapes: Mapping[str, tuple[int, ...]],
        max_message_bytes: int,
    ):
        self.task = task
        self.registry = registry
        self.shapes = dict(shapes)
        self.max_message_bytes = max_message_bytes
        self._max_elements = sum(int(np.prod(s)) for s in self.shapes.values())

    def check(self, topic: str, data: bytes, ctx: RoundContext) -> AcceptedUpdate:
        """Return the accepted update or raise :class:`Rejected` with a reason code."""
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
        key = self.registry.public_key(header.device)
        if key is None:
            raise Rejected("unknown_device", "device is not registered", device=sender)
        if header.device in ctx.revoked:
            raise Rejected("revoked", "device is revoked on the ledger", device=sender)
        try:
            verify_signature(key, envelope.signature, envelope.signed)
        except SignatureError:
            raise Rejected("bad_signature", "signature does not verify", device=sender) from None
        # Authenticated from here on: the checks below are about freshness.
        if header.round < ctx.round:
            raise Rejected("stale_round", f"round {header.round} < {ctx.round}", device=sender)
        if header.round > ctx.round:
            raise Rejected("future_round", f"round {header.round} > {ctx.round}", device=sender)
        if header.base != ctx.base:
            raise Rejected("wrong_base", "trained from another global model", device=sender)
        if header.counter <= ctx.last_counter(header.device):
            raise Rejected("replayed", f"counter {header.counter} already seen", device=sender)
        if ctx.has_update(header.device):
            raise Rejected("duplicate", "device already contributed this round", device=sender)
        views = self._check_payload(envelope.payload, sender)
        return AcceptedUpdate(header=header, digest=envelope.digest(), views=views, frame=data)

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
            if view.data.dtype == np.float32 and not np.isfinite(view.data).all():
                raise Rejected("non_finite", f"tensor {view.name} holds NaN or Inf", device=sender)
            if view.data.dtype == np.int8 and view.data.size:
                # q * scale must stay finite in float32 (scale near FLT_MAX overflows).
                peak = np.float32(np.abs(view.data.astype(np.int16)).max())
                with np.errstate(over="ignore"):
                    if not np.isfinite(peak * np.float32(view.scale)):
                        raise Rejected("non_finite", f"tensor {view.name} overflows", device=sender)
        return views
