"""A round as data: what the gateway holds while it is open, and what it produced."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fedcore import Params, TensorView

from ._combine import RoundAggregator


@dataclass(frozen=True)
class RoundResult:
    """What a closed round produced; also the shape of the demo's per-round report.

    ``accuracy`` and ``clinical`` (:func:`fedcore.clinical_metrics`: balanced accuracy, AUC,
    sensitivity and specificity, per-class recall) are the new global model's on the
    gateway's held-out data: ``None`` and ``{}`` without it. The ledger records them rounded
    to 6 decimals.

    ``ledgered``: whether the ledger held the round when the result was last updated (the
    ledger worker anchors it after the close; :meth:`Gateway.results` reflects that)."""

    round: int
    accuracy: float | None
    clinical: dict[str, float]
    participants: int
    samples: int
    bytes_received: int
    rejected: int
    rejected_by_reason: dict[str, int]
    duration_s: float
    model_hash: str
    ledgered: bool


@dataclass
class OpenRound:
    """The open round: its base, deadline, the running aggregate and who is in it."""

    round: int
    base_hash: str
    base_params: Params
    opened_at: float
    deadline: float
    accumulator: RoundAggregator
    contributors: list[dict[str, Any]] = field(default_factory=list)
    devices: set[str] = field(default_factory=set)
    bytes_received: int = 0
    rejected: Counter = field(default_factory=Counter)
    rejections: list[dict[str, Any]] = field(default_factory=list)

    def count(
        self,
        device: str,
        digest: str,
        samples: int,
        views: Sequence[TensorView],
        staleness: int = 0,
    ) -> None:
        """Add one accepted (and already weighted) update to the aggregate."""
        self.accumulator.add(views, samples)
        self.devices.add(device)
        self.contributors.append(
            {"device": device, "update": digest, "samples": samples, "staleness": staleness}
        )

    def reject(self, device: str | None, digest: str, reason: str) -> None:
        self.rejected[reason] += 1
        self.rejections.append({"device": device, "digest": digest, "reason": reason})


def round_record(
    current: OpenRound,
    *,
    task: str,
    codec: str,
    aggregation: str,
    new_hash: str,
    metrics: dict[str, float],
    batch_size: int,
) -> dict[str, Any]:
    """What the ledger gets for a round: its update records in batches, then the commit.

    Kept in the store with the closed round (the ledger outbox), so an anchoring interrupted
    by a crash or a ledger outage is finished later, by whichever process runs next.
    """
    contributors = sorted(current.contributors, key=lambda c: c["device"])
    records = [
        {
            "device": c["device"],
            "digest": c["update"],
            "samples": c["samples"],
            "codec": codec,
            "accepted": True,
            "reason": None,
        }
        for c in contributors
    ] + [
        {
            "device": r["device"],
            "digest": r["digest"],
            "samples": None,
            "codec": None,
            "accepted": False,
            "reason": r["reason"],
        }
        for r in current.rejections
    ]
    return {
        "task": task,
        "round": current.round,
        "base_model": current.base_hash,
        "deadline": round(current.deadline, 3),
        "batches": [records[i : i + batch_size] for i in range(0, len(records), batch_size)],
        "global_model": new_hash,
        "aggregation": aggregation,
        "contributors": [c["device"] for c in contributors],
        "metrics": metrics,
    }
