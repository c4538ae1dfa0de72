"""A round's aggregate under the task's rule: streaming FedAvg where it can, else every
update in a preallocated matrix for the rules of :mod:`gateway._strategies`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from fedcore import Params, TensorView

from ._aggregate import FedAvgAccumulator
from ._robust import UpdateMatrix
from ._strategies import AGGREGATION_RULES, aggregate


class RoundAggregator:
    """A round's aggregation under the task's rule.

    Plain FedAvg streams (memory O(model)); every other rule, or any clipping, needs all of
    the round's updates and fills a preallocated ``UpdateMatrix`` (O(devices x model)).
    """

    def __init__(
        self,
        shapes: Mapping[str, tuple[int, ...]],
        *,
        rule: str,
        options: Mapping[str, object],
        capacity: int,
    ):
        self.rule = rule
        self.options = AGGREGATION_RULES[rule].resolve(options)
        self.streaming = rule in ("fedavg", "fedprox") and not options
        self.total_samples = 0
        self.dropped = 0
        self.clipped = 0
        if self.streaming:
            self._stream = FedAvgAccumulator(shapes)
        else:
            self._matrix = UpdateMatrix(shapes, capacity=max(capacity, 1))

    def add(self, views: Sequence[TensorView], n_samples: int) -> None:
        self.total_samples += n_samples
        if self.streaming:
            self._stream.add(views, n_samples)
        else:
            self._matrix.add(views, n_samples)

    def result(self) -> Params:
        if self.streaming:
            return self._stream.result()
        outcome = aggregate(self._matrix, self.rule, **self.options)
        self.dropped = len(outcome.dropped)
        self.clipped = len(outcome.clipped)
        return outcome.params
