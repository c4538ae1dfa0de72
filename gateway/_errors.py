"""Gateway exceptions.

The tree::

    FedledgerError (fedcore)
    └── GatewayError           the gateway cannot run (store, config, broker)
        └── Rejected           one inbound message was refused (reason, device)
"""

from __future__ import annotations

from fedcore import FedledgerError

#: Every reason an inbound message can be refused for; metrics and logs use these codes.
REJECT_REASONS = (
    "too_large",
    "malformed",
    "truncated",
    "unsupported_version",
    "digest_mismatch",
    "wrong_type",
    "topic_mismatch",
    "wrong_task",
    "out_of_range",
    "unknown_device",
    "revoked",
    "not_encrypted",
    "algorithm_mismatch",
    "bad_certificate",
    "subject_mismatch",
    "certificate_revoked",
    "bad_signature",
    "stale_round",
    "future_round",
    "too_stale",
    "wrong_base",
    "replayed",
    "duplicate",
    "decrypt_failed",
    "bad_payload",
    "shape_mismatch",
    "non_finite",
    "round_closed",
    "not_sampled",
    # secure aggregation
    "codec_mismatch",
    "stage_closed",
    "not_in_round",
)


class GatewayError(FedledgerError):
    """The gateway cannot do its work."""


class Rejected(GatewayError):
    """An inbound message was refused; ``reason`` is one of :data:`REJECT_REASONS`."""

    def __init__(self, reason: str, detail: str, *, device: str | None = None):
        assert reason in REJECT_REASONS, reason
        self.reason = reason
        self.detail = detail
        self.device = device
        super().__init__(f"{reason}: {detail}")
