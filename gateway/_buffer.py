"""Buffered asynchronous rounds (FedBuff, Nguyen et al., 2022): staleness weights and which
model version's buffer an update counts in.

Pure functions over small integers and sets, so the gateway and the asynchronous benchmark
run the same rules and the tests need nothing but Python. Vocabulary: round ``r`` is the
buffer that turns global model ``r`` into model ``r + 1``; an update *based* on round ``b``
was trained from model ``b``; counted in round ``t``, its staleness is ``t - b``.
"""

from __future__ import annotations

from collections.abc import Container, Mapping, Set

from ._errors import Rejected


def staleness_weight(staleness: int, exponent: float) -> float:
    """``(1 + s) ** -a``: FedBuff's polynomial damping of an update ``s`` versions stale.

    The update's delta is multiplied by it before the sample-weighted mean, whose
    denominator stays the plain sample total: a buffer of stale updates moves the model
    less, as in FedBuff's ``(1/K) sum w(s_i) delta_i``, instead of being renormalised back
    to full size.
    """
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness}")
    if exponent < 0:
        raise ValueError(f"the staleness exponent must be >= 0, got {exponent}")
    return float((1.0 + staleness) ** -exponent)


def place_update(
    *,
    device: str,
    base_round: int,
    current: int,
    buffer: int,
    max_staleness: int,
    rounds: int,
    occupancy: Mapping[int, Set[str]],
    trained_on: Container[tuple[str, int]] = frozenset(),
) -> int:
    """The round whose buffer takes ``device``'s update based on ``base_round``.

    The earliest round from the open one (``current``) on whose buffer is not full
    (``buffer`` updates) and holds nothing from this device yet: the ledger allows one
    accepted update per device and round, and a full buffer passes an update on to the next
    version rather than throw away training already done. ``occupancy`` maps rounds to the
    devices their buffers hold; ``trained_on`` holds the ``(device, base round)`` of updates
    already accepted, since a device trains once per model.

    Raises :class:`Rejected`: ``duplicate`` for a second update from one base,
    ``too_stale`` when the update would count more than ``max_staleness`` versions after its
    base, ``round_closed`` when the task's ``rounds`` versions end first.
    """
    if (device, base_round) in trained_on:
        raise Rejected(
            "duplicate", f"device already sent an update based on round {base_round}", device=device
        )
    for target in range(max(current, base_round), base_round + max_staleness + 1):
        if target >= rounds:
            raise Rejected("round_closed", f"the task ends after {rounds} rounds", device=device)
        held = occupancy.get(target, frozenset())
        if len(held) < buffer and device not in held:
            return target
    raise Rejected(
        "too_stale",
        f"based on round {base_round}, it would count in round"
        f" {max(current, base_round + max_staleness + 1)}: over {max_staleness} versions stale",
        device=device,
    )
