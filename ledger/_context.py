"""The transaction context the contract runs in, and an in-memory one for tests.

:class:`TxContext` is the slice of Fabric's chaincode stub the contract needs, so the same
contract code runs as Fabric chaincode (behind a shim adapter) and in the embedded backend.
What it mirrors from Fabric, on purpose:

- reads see committed state only: a transaction does not read its own writes;
- the transaction time is the proposal's timestamp, chosen once by the submitter, so every
  endorser computes the same write set; the contract never reads a clock;
- one event per transaction (Fabric keeps only the last ``SetEvent``; the in-memory context
  refuses a second one, so a contract that relies on two fails here rather than silently on a
  peer);
- the read set records each key's version, and prefix (range) reads record the keys they
  saw, so :meth:`MemoryWorldState.commit` can refuse a transaction whose reads went stale
  (Fabric's ``MVCC_READ_CONFLICT`` and ``PHANTOM_READ_CONFLICT``).

A Fabric adapter implements ``get_state_by_prefix`` as a range query from ``prefix`` to the
prefix with its last character incremented (the contract's prefixes end in ``/``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

from ._errors import LedgerError

#: Roles an identity can carry; the contract refuses any other with ``forbidden``.
ROLES = ("admin", "auditor", "device", "gateway")


@dataclass(frozen=True, slots=True)
class Identity:
    """Who submitted the transaction.

    ``msp_id`` is the organisation (Fabric MSP id), ``subject`` the identity's name within
    it (the certificate's common name on Fabric, the configured name in the embedded
    backend), ``role`` one of :data:`ROLES` (a certificate attribute on Fabric). The contract
    checks the role rather than this class, because an adapter builds it from whatever a
    certificate says.
    """

    msp_id: str
    subject: str
    role: str


class TxContext(Protocol):
    """What a contract function may touch: its transaction's identity, time and state."""

    @property
    def tx_id(self) -> str: ...

    @property
    def timestamp(self) -> float:
        """Transaction time in seconds since the epoch, the same on every endorser."""
        ...

    @property
    def creator(self) -> Identity: ...

    def get_state(self, key: str) -> bytes | None:
        """The committed value of ``key``, or None; never this transaction's own write."""
        ...

    def put_state(self, key: str, value: bytes) -> None: ...

    def get_state_by_prefix(self, prefix: str) -> Iterator[tuple[str, bytes]]:
        """Committed ``(key, value)`` pairs whose key starts with ``prefix``, sorted by key."""
        ...

    def set_event(self, name: str, payload: bytes) -> None:
        """Attach the transaction's event, delivered to listeners when it commits."""
        ...


class MVCCConflictError(LedgerError):
    """A transaction read state that changed before it committed; it must be re-run.

    ``code`` is Fabric's validation code: ``MVCC_READ_CONFLICT`` (a key's version changed)
    or ``PHANTOM_READ_CONFLICT`` (the keys under a prefix read by the transaction changed).
    """

    def __init__(self, tx_id: str, code: str, key: str):
        self.tx_id = tx_id
        self.code = code
        self.key = key
        super().__init__(f"transaction {tx_id}: {code} on {key!r}")


class MemoryWorldState(Mapping[str, bytes]):
    """Committed state: a read-only mapping of key to value, plus per-key versions.

    The version of a key is the sequence number of the commit that last wrote it (1, 2,
    ...); :meth:`commit` is the only way state changes.
    """

    def __init__(self) -> None:
        self._values: dict[str, bytes] = {}
        self._versions: dict[str, int] = {}
        self._height = 0

    def __getitem__(self, key: str) -> bytes:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._values))

    def __len__(self) -> int:
        return len(self._values)

    @property
    def height(self) -> int:
        """How many transactions have been committed."""
        return self._height

    def version(self, key: str) -> int | None:
        return self._versions.get(key)

    def context(
        self, *, tx_id: str, timestamp: float, creator: Identity, read_only: bool = False
    ) -> MemoryContext:
        return MemoryContext(
            self, tx_id=tx_id, timestamp=timestamp, creator=creator, read_only=read_only
        )

    def commit(self, ctx: MemoryContext) -> int:
        """Validate ``ctx``'s reads against current state, then apply its writes.

        Returns the commit's sequence number (the version its writes get). Raises
        :class:`MVCCConflictError` and changes nothing if a read went stale.
        """
        if ctx.world is not self:
            raise LedgerError(f"transaction {ctx.tx_id} belongs to another world state")
        if ctx.committed:
            raise LedgerError(f"transaction {ctx.tx_id} is already committed")
        for key, seen in ctx.read_set.items():
            if self._versions.get(key) != seen:
                raise MVCCConflictError(ctx.tx_id, "MVCC_READ_CONFLICT", key)
        for prefix, keys in ctx.range_reads:
            if tuple(k for k in sorted(self._values) if k.startswith(prefix)) != keys:
                raise MVCCConflictError(ctx.tx_id, "PHANTOM_READ_CONFLICT", prefix)
        self._height += 1
        for key in sorted(ctx.write_set):
            self._values[key] = ctx.write_set[key]
            self._versions[key] = self._height
        ctx.committed = True
        return self._height


class MemoryContext:
    """One transaction over a :class:`MemoryWorldState`, recording its read/write sets.

    ``read_set`` maps each key read to the version seen (None: absent), ``range_reads``
    lists ``(prefix, keys seen)``, ``write_set`` maps keys to the bytes written, ``event`` is
    the ``(name, payload)`` set, if any. ``read_only`` makes writes and events an error, to
    check that evaluate functions do not write.
    """

    def __init__(
        self,
        world: MemoryWorldState,
        *,
        tx_id: str,
        timestamp: float,
        creator: Identity,
        read_only: bool = False,
    ):
        if not isinstance(tx_id, str) or not tx_id:
            raise TypeError("tx_id must be a non-empty string")
        if (
            isinstance(timestamp, bool)
            or not isinstance(timestamp, int | float)
            or not math.isfinite(timestamp)
        ):
            raise TypeError("timestamp must be a finite number of seconds")
        self.world = world
        self.tx_id = tx_id
        self.timestamp = float(timestamp)
        self.creator = creator
        self.read_only = read_only
        self.read_set: dict[str, int | None] = {}
        self.range_reads: list[tuple[str, tuple[str, ...]]] = []
        self.write_set: dict[str, bytes] = {}
        self.event: tuple[str, bytes] | None = None
        self.committed = False

    def get_state(self, key: str) -> bytes | None:
        _check_key(key)
        self.read_set[key] = self.world.version(key)
        return self.world.get(key)

    def put_state(self, key: str, value: bytes) -> None:
        _check_key(key)
        if not isinstance(value, bytes) or not value:
            raise TypeError("a state value must be non-empty bytes")
        if self.read_only:
            raise LedgerError(f"transaction {self.tx_id} is read-only but wrote {key!r}")
        self.write_set[key] = value

    def get_state_by_prefix(self, prefix: str) -> Iterator[tuple[str, bytes]]:
        if not isinstance(prefix, str):
            raise TypeError("a key prefix must be a string")
        found = [(k, self.world[k]) for k in self.world if k.startswith(prefix)]
        for key, _ in found:
            self.read_set[key] = self.world.version(key)
        self.range_reads.append((prefix, tuple(k for k, _ in found)))
        return iter(found)

    def set_event(self, name: str, payload: bytes) -> None:
        if not isinstance(name, str) or not name or not isinstance(payload, bytes):
            raise TypeError("an event needs a non-empty name and bytes payload")
        if self.read_only:
            raise LedgerError(f"transaction {self.tx_id} is read-only but set event {name!r}")
        if self.event is not None:
            raise LedgerError(
                f"transaction {self.tx_id} already set event {self.event[0]!r}:"
                " Fabric keeps one event per transaction"
            )
        self.event = (name, payload)


def _check_key(key: str) -> None:
    # Fabric reserves keys starting with U+0000 for composite keys and refuses empty ones.
    if not isinstance(key, str) or not key or key.startswith("\x00"):
        raise TypeError(f"invalid state key {key!r}")
