"""Buffered asynchronous rounds (FedBuff): each round is one model version, closed by
``buffer`` accepted updates trained from any of the last ``max_staleness`` versions, each
weighted by its staleness (rules in ``_buffer``). The deadline and quorum still apply, so a
fleet smaller than the buffer is not stalled either."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from fedcore import TensorView, UpdateHeader

from ._buffer import place_update, staleness_weight
from ._protocol import RoundProtocol, register_protocol

if TYPE_CHECKING:
    from ._round import OpenRound


@register_protocol
class FedBuffRounds(RoundProtocol):
    name = "fedbuff"
    cascades = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        section = self.task.asynchronous
        assert section is not None, "FedBuff needs the task's asynchronous section"
        self.section = section
        #: The devices each buffer from the open round on holds, the ``(device, base
        #: round)`` of accepted updates in the staleness window, and the base model of each
        #: round still accepted as a base.
        self._occupancy: dict[int, set[str]] = {}
        self._trained_on: set[tuple[str, int]] = set()
        self._bases: dict[int, str] = {}
        self._current = 0

    @property
    def max_staleness(self) -> int:
        return self.section.max_staleness

    @property
    def bases(self) -> Mapping[int, str]:
        return self._bases

    @property
    def quorum(self) -> int:
        return min(self.task_quorum, self.section.buffer)

    def opened(self, round_: int, base_hash: str, *, resume: bool) -> bool:
        """Slide the bases, buffers and trained-on set to ``round_``; at a restart, rebuild
        them from the store (whatever it holds counts, nothing else). A buffer may hold
        updates before it opens (passed on by a full buffer before it)."""
        oldest = round_ - self.max_staleness
        self._current = round_
        if resume or not self._bases:
            self._bases = self.store.bases_since(self.task.id, oldest)
            self._occupancy, self._trained_on = {}, set()
            # Updates based on a round in the window are counted from there to
            # ``max_staleness`` rounds later.
            for held in range(max(oldest, 0), round_ + self.max_staleness + 1):
                for stored in self.store.updates(self.task.id, held):
                    header, _ = self.read_frame(stored.frame)
                    self._trained_on.add((stored.device, header.round))
                    if held >= round_:
                        self._occupancy.setdefault(held, set()).add(stored.device)
        self._bases[round_] = base_hash
        self._bases = {r: h for r, h in self._bases.items() if r >= oldest}
        self._occupancy = {r: d for r, d in self._occupancy.items() if r >= round_}
        self._trained_on = {(d, b) for d, b in self._trained_on if b >= oldest}
        return True

    def place(self, header: UpdateHeader, current: int) -> int:
        """The round whose buffer takes the update, reserved at once so the rest of the
        batch sees it."""
        target = place_update(
            device=header.device,
            base_round=header.round,
            current=current,
            buffer=self.section.buffer,
            max_staleness=self.max_staleness,
            rounds=self.task.rounds,
            occupancy=self._occupancy,
            trained_on=self._trained_on,
        )
        self._occupancy.setdefault(target, set()).add(header.device)
        self._trained_on.add((header.device, header.round))
        return target

    def weight(self, views: Sequence[TensorView], staleness: int) -> Sequence[TensorView]:
        """One multiply on each scale, so the aggregation rules (and the streaming mean)
        need not know about staleness."""
        if staleness == 0:
            return views
        w = staleness_weight(staleness, self.section.staleness_exponent)
        return [replace(v, scale=v.scale * w) for v in views]

    def due(self, current: OpenRound, live: int) -> bool:
        return len(current.devices) >= max(1, min(self.section.buffer, live))

    def dropped(self, round_: int, devices: set[str]) -> None:
        if round_ in self._occupancy:
            self._occupancy[round_] -= devices

    def record_metrics(self, current: OpenRound) -> dict[str, float]:
        if not current.contributors:
            return {}
        staleness = [c["staleness"] for c in current.contributors]
        return {
            "staleness_mean": round(sum(staleness) / len(staleness), 6),
            "staleness_max": float(max(staleness)),
        }
