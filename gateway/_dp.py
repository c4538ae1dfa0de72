"""Differentially private rounds (DP-FedAvg, McMahan et al., 2018): the round protocol of a
task with a ``[dp]`` section.

- Before round r opens, the accountant checks that it fits the budget: epsilon after r+1
  rounds must stay at most ``budget_epsilon`` (fail closed: else the task ends, and the
  ledger says why).
- With ``sampling = q < 1`` each device takes part with probability q, drawn from the
  gateway's secret seed (:func:`fedcore.sampled_devices`); the model message names the
  sampled devices, others skip the round, and an update of a device not sampled is refused
  (``not_sampled``).
- Each accepted update is clipped to L2 norm C (again: devices clip too) and summed with
  weight 1; at the close Gaussian noise of std z*C is added to the sum, which is divided by
  the expected number of participants (q times the devices sampled from; without sampling,
  the live devices): the fixed-denominator estimator, so the count of updates moves the
  model only through the noised sum.
- The round's ledger record carries its DP event (``dp_noise_multiplier``, ``dp_clip``,
  ``dp_sampling_rate``, ``dp_noised``) and the epsilon after it (``dp_epsilon``), which
  ``fedledger ledger privacy`` recomputes from the records alone.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping, Sequence

import numpy as np

from fedcore import DPRoundEvent, TensorView, UpdateHeader, epsilon, sampled_devices

from ._errors import Rejected
from ._protocol import RoundProtocol, register_protocol
from ._round import OpenRound

log = logging.getLogger(__name__)


class DPAggregator:
    """Sum of clipped updates (weight 1 each), noised at :meth:`result`; memory O(model)."""

    streaming = True

    def __init__(
        self,
        shapes: Mapping[str, tuple[int, ...]],
        *,
        clip: float,
        noise_multiplier: float,
        denominator: float,
        rng: np.random.Generator | None = None,
    ):
        self._shapes = dict(shapes)
        self._sums = {n: np.zeros(int(np.prod(s)), dtype=np.float64) for n, s in shapes.items()}
        self.clip = clip
        self.noise_multiplier = noise_multiplier
        self.denominator = denominator
        self._rng = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
        self.total_samples = 0
        self.count = 0
        self.clipped = 0
        self.dropped = 0

    def add(self, views: Sequence[TensorView], n_samples: int) -> None:
        flat = {v.name: v.data.astype(np.float64) * float(v.scale) for v in views}
        norm = float(np.sqrt(sum(float(np.dot(x, x)) for x in flat.values())))
        factor = 1.0
        if norm > self.clip:
            factor = self.clip / norm
            self.clipped += 1
        for name, x in flat.items():
            self._sums[name] += factor * x
        self.total_samples += n_samples
        self.count += 1

    def result(self) -> dict[str, np.ndarray]:
        std = self.noise_multiplier * self.clip
        out = {}
        for name, total in self._sums.items():
            noised = total + self._rng.normal(0.0, std, size=total.shape)
            out[name] = (noised / self.denominator).astype(np.float32).reshape(self._shapes[name])
        return out


@register_protocol
class DPRounds(RoundProtocol):
    name = "dp"

    def __init__(self, *, dp_seed: bytes | None = None, **kwargs):
        super().__init__(**kwargs)
        dp = self.task.dp
        if dp is None:
            raise ValueError("the dp round protocol needs a task with a [dp] section")
        self.dp = dp
        self.seed = dp_seed
        #: Every closed round's DP event, from the store at start and then kept up.
        self.events: list[DPRoundEvent] = []
        for row in self.store.rounds(self.task.id):
            event = None if row.record is None else DPRoundEvent.from_metrics(row.record["metrics"])
            if event is not None:
                self.events.append(event)
        self.epsilon = epsilon(self.events, dp.target_delta)
        self._population: tuple[str, ...] = ()
        self._sampled: tuple[str, ...] | None = None
        self._round: int | None = None

    @property
    def event(self) -> DPRoundEvent:
        return DPRoundEvent(self.dp.noise_multiplier, self.dp.sampling)

    # budget
    def may_open(self, round_: int) -> str | None:
        """``None`` when round ``round_`` fits the budget, else why not."""
        after = epsilon([*self.events, self.event], self.dp.target_delta)
        if after > self.dp.budget_epsilon:
            return (
                f"round {round_} would take epsilon to {after:.4f} at delta"
                f" {self.dp.target_delta:g}, over the budget {self.dp.budget_epsilon:g}"
            )
        return None

    # sampling
    def sample(self, round_: int, population: Sequence[str]) -> tuple[str, ...] | None:
        """Who trains in ``round_`` (``None``: everyone, no sampling); the loop puts it in
        the model message."""
        self._round, self._population = round_, tuple(sorted(population))
        if self.dp.sampling >= 1:
            self._sampled = None
            return None
        assert self.seed is not None, "checked when the gateway is built"
        self._sampled = sampled_devices(
            self.seed, self.task.id, round_, self._population, self.dp.sampling
        )
        return self._sampled

    @property
    def sampled(self) -> tuple[str, ...] | None:
        return self._sampled

    def place(self, header: UpdateHeader, current: int) -> int:
        if self._sampled is not None and header.device not in self._sampled:
            raise Rejected(
                "not_sampled",
                f"{header.device} is not sampled in round {current}",
                device=header.device,
            )
        return current

    @property
    def quorum(self) -> int:
        if self._sampled is None:
            return self.task_quorum
        return min(self.task_quorum, len(self._sampled))

    def due(self, current: OpenRound, live: int) -> bool:
        if self._sampled is None:
            return len(current.devices) >= live
        return set(self._sampled) <= current.devices

    # aggregation
    def aggregator(self, shapes: Mapping[str, tuple[int, ...]], live: int) -> DPAggregator:
        if self.dp.sampling < 1:
            denominator = self.dp.sampling * max(len(self._population), 1)
        else:
            denominator = float(max(live, 1))
        return DPAggregator(
            shapes,
            clip=self.dp.clip,
            noise_multiplier=self.dp.noise_multiplier,
            denominator=denominator,
        )

    def record_metrics(self, current: OpenRound) -> dict[str, float]:
        self.events.append(self.event)
        self.epsilon = epsilon(self.events, self.dp.target_delta)
        log.info(
            "round %d: epsilon %.4f of %g at delta %g", current.round, self.epsilon,
            self.dp.budget_epsilon, self.dp.target_delta,
        )  # fmt: skip
        return {
            "dp_noise_multiplier": self.dp.noise_multiplier,
            "dp_clip": self.dp.clip,
            "dp_sampling_rate": self.dp.sampling,
            "dp_noised": float(current.accumulator.count),
            "dp_epsilon": self.epsilon,
        }

    def end_detail(self) -> dict[str, object]:
        """What the ledger's ``EndTask`` gets: the final epsilon and the revealed seed."""
        detail: dict[str, object] = {"epsilon": self.epsilon, "rounds": len(self.events)}
        if self.seed is not None:
            detail["dp_seed"] = self.seed.hex()
        return detail
