"""Round protocols: the part of a round that differs between synchronous FedAvg, FedBuff and
whatever comes next; the gateway's loop (``_service``) is written once around them.

The loop receives, validates and persists every update, then asks the task's protocol:

- :meth:`RoundProtocol.opened`: a round opened (or was resumed from the store);
- :meth:`RoundProtocol.place`: which round an accepted update counts in;
- :meth:`RoundProtocol.weight`: the update's views as the aggregate should add them;
- :meth:`RoundProtocol.due` and :attr:`RoundProtocol.quorum`: when the round closes;
- :meth:`RoundProtocol.record_metrics`: what the round's ledger record adds.

A protocol whose messages are not model updates (secure aggregation's key shares, a
hierarchical tier's partial aggregates) lists its topics in :meth:`subscriptions` and
takes them in :meth:`on_message`. Adding a protocol is one module with a subclass and one
:func:`register_protocol` call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar

from fedcore import Message, TaskSpec, TensorView, UpdateHeader

from ._errors import GatewayError

if TYPE_CHECKING:
    from ._round import OpenRound
    from ._store import UpdateStore

#: Reads a stored update frame back as ``(header, views)``.
FrameReader = Callable[[bytes], tuple[UpdateHeader, list[TensorView]]]


class RoundProtocol:
    """Synchronous behaviour by default; a subclass overrides what differs."""

    #: The registry name.
    name: ClassVar[str] = ""
    #: Whether closing a round can leave the next one due at once (updates passed on).
    cascades: ClassVar[bool] = False

    def __init__(
        self, *, task: TaskSpec, store: UpdateStore, read_frame: FrameReader, fleet: int = 1
    ):
        """``fleet``: the registered devices, which an unset task quorum is a majority of."""
        self.task = task
        self.store = store
        self.read_frame = read_frame
        #: The task's quorum for this fleet (:meth:`TaskSpec.quorum_of`).
        self.task_quorum = task.quorum_of(fleet)

    # What the validator is told about bases.
    @property
    def max_staleness(self) -> int | None:
        """How many versions an update's base may lag (``None``: it must be the open round)."""
        return None

    @property
    def bases(self) -> Mapping[int, str]:
        return {}

    @property
    def quorum(self) -> int:
        return self.task_quorum

    def opened(self, round_: int, base_hash: str, *, resume: bool) -> bool:
        """A round opened; True when the store's updates of it count from the start (a
        resumed round, or a buffer that took updates passed on to it)."""
        return resume

    def place(self, header: UpdateHeader, current: int) -> int:
        """The round ``header``'s update counts in (raise :class:`Rejected` to refuse)."""
        return current

    def weight(self, views: Sequence[TensorView], staleness: int) -> Sequence[TensorView]:
        return views

    def due(self, current: OpenRound, live: int) -> bool:
        """Whether the round may close before its deadline (``live``: devices not revoked)."""
        return len(current.devices) >= live

    def closable(self, current: OpenRound) -> bool:
        """Whether the round may close at its deadline (with a quorum); secure aggregation
        closes only once its sum is unmasked."""
        return True

    def record_extra(self, current: OpenRound) -> dict[str, object]:
        """Fields the round's ledger commit adds (secure aggregation: the sum's hash)."""
        return {}

    def dropped(self, round_: int, devices: set[str]) -> None:
        """``devices``' updates were taken out of ``round_`` (revoked while it was open)."""

    def record_metrics(self, current: OpenRound) -> dict[str, float]:
        return {}

    def may_open(self, round_: int) -> str | None:
        """``None`` when ``round_`` may open; else why not (the task then ends there, with
        that reason on the ledger: a privacy budget spent, say)."""
        return None

    def sample(self, round_: int, population: Sequence[str]) -> tuple[str, ...] | None:
        """The devices asked to train in ``round_``, named in its model message (``None``:
        all of them). Called as the round opens, or is resumed."""
        return None

    @property
    def sampled(self) -> tuple[str, ...] | None:
        """The open round's :meth:`sample`."""
        return None

    def aggregator(self, shapes: Mapping[str, tuple[int, ...]], live: int) -> object | None:
        """A round aggregator of the protocol's own (``add``/``result`` like
        :class:`~gateway._combine.RoundAggregator`), or ``None`` for the task's rule."""
        return None

    def end_detail(self) -> dict[str, object] | None:
        """What the ledger records when the task ends (``EndTask``); ``None``: nothing."""
        return None

    def subscriptions(self, task_id: str) -> list[tuple[str, int]]:
        """Extra ``(topic filter, qos)`` this protocol's messages arrive on."""
        return []

    def on_message(self, message: Message) -> bool:
        """Take a message of one of :meth:`subscriptions` (and acknowledge it once it is
        durable); False if it is not one."""
        return False


PROTOCOLS: dict[str, type[RoundProtocol]] = {}


def register_protocol(cls: type[RoundProtocol]) -> type[RoundProtocol]:
    """Add a protocol to the registry under its ``name`` (usable as a class decorator)."""
    if not cls.name or cls.name in PROTOCOLS:
        raise ValueError(f"protocol name {cls.name!r} is empty or already registered")
    PROTOCOLS[cls.name] = cls
    return cls


def protocol_name(task: TaskSpec) -> str:
    """The protocol a task runs: ``secagg`` with a ``secagg`` section (DP composed in it),
    ``dp`` with a ``dp`` section, ``fedbuff`` with an ``asynchronous`` one, else
    ``synchronous``."""
    if task.secagg is not None:
        return "secagg"
    if task.dp is not None:
        return "dp"
    return "synchronous" if task.asynchronous is None else "fedbuff"


def make_protocol(
    name: str,
    *,
    task: TaskSpec,
    store: UpdateStore,
    read_frame: FrameReader,
    fleet: int = 1,
    **options,
) -> RoundProtocol:
    """``options`` go to the protocol's constructor (``dp_seed`` for ``dp``); ``fleet`` is
    the registered devices' count."""
    try:
        cls = PROTOCOLS[name]
    except KeyError:
        raise GatewayError(
            f"unknown round protocol {name!r}; known: {', '.join(sorted(PROTOCOLS))}"
        ) from None
    return cls(task=task, store=store, read_frame=read_frame, fleet=fleet, **options)
