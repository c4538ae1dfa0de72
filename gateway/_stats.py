"""The gateway's lifetime counters and last-round figures."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class GatewayStats:
    """Lifetime counters and last-round figures; :class:`GatewayMetrics` exports them."""

    received: int = 0
    accepted: int = 0
    bytes_received: int = 0
    rejected: Counter = field(default_factory=Counter)
    rejections: list[dict[str, Any]] = field(default_factory=list)
    rounds_closed: int = 0
    online: set[str] = field(default_factory=set)
    #: Ledger writes of the loop itself that failed (certificate rotations); the outbox
    #: counts its own.
    ledger_failures: int = 0
    #: Messages delivered again (by the broker after a crash, or re-sent by a device) whose
    #: update the store already held: acknowledged and dropped.
    redelivered: int = 0
    #: The open round; once the final model is published, the task's round count.
    current_round: int | None = None
    last_participants: int | None = None
    last_accuracy: float | None = None
    #: The last global model's :func:`fedcore.clinical_metrics`; replaced whole at each close,
    #: never changed in place, so a scrape may iterate it from another thread.
    last_clinical: dict[str, float] = field(default_factory=dict)
