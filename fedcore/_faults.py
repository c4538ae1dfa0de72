"""Named crash points, for testing what a kill at a chosen moment does.

``FEDLEDGER_CRASH_AT=point`` (or ``point:n``) makes the process kill itself with SIGKILL the
first (n-th) time it passes :func:`crash_point` with that name: no ``finally``, no flush, no
atexit, as a power cut or the OOM killer would. The variable is read once at import; when it
is unset, as in every real deployment, a point costs a comparison.

The points (see ``docs/operations.md``):

- ``gateway.before-commit``: a batch of updates validated, not yet in the store;
- ``gateway.after-commit``: the batch committed, its messages not yet acknowledged;
- ``gateway.round-closed``: a round, its model and its ledger record committed, the next
  round not yet opened or published;
- ``gateway.anchoring``: the ledger has the round opened, not its updates or commit;
- ``agent.after-save``: the agent's state (counter, round, the update) saved, the update
  not yet published.
"""

from __future__ import annotations

import os
import signal

POINTS = (
    "gateway.before-commit",
    "gateway.after-commit",
    "gateway.round-closed",
    "gateway.anchoring",
    "agent.after-save",
)


def _parse(spec: str | None) -> tuple[str, int] | None:
    if not spec:
        return None
    name, _, nth = spec.partition(":")
    if name not in POINTS:
        raise ValueError(f"FEDLEDGER_CRASH_AT: unknown crash point {name!r}; known: {POINTS}")
    try:
        count = int(nth) if nth else 1
    except ValueError:
        raise ValueError(f"FEDLEDGER_CRASH_AT: {nth!r} is not a count") from None
    return name, max(count, 1)


_ARMED = _parse(os.environ.get("FEDLEDGER_CRASH_AT"))
_passed = 0


def crash_point(name: str) -> None:
    """Kill this process here if ``FEDLEDGER_CRASH_AT`` names this point (and count)."""
    global _passed
    if _ARMED is None or _ARMED[0] != name:
        return
    _passed += 1
    if _passed >= _ARMED[1]:
        os.kill(os.getpid(), signal.SIGKILL)
