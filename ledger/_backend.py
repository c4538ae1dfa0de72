"""The boundary the gateway calls: any ledger backend implements this Protocol.

Both backends run the same contract (``ledger._contract.FedLedgerContract``): the embedded
one in-process over SQLite, the Fabric one as chaincode behind a peer's Gateway service.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from ._context import Identity
from ._store_check import Discrepancy


@dataclass(frozen=True, slots=True)
class BlockInfo:
    height: int
    block_hash: str
    merkle_root: str
    timestamp: float
    n_records: int


@dataclass(frozen=True, slots=True)
class VerifyReport:
    ok: bool
    blocks: int
    records: int
    first_bad_height: int | None = None
    problem: str | None = None
    replayed: bool = False
    checked_models: int = 0
    checked_updates: int = 0
    #: Secure aggregation rounds whose sum was unmasked again from the store and matched.
    checked_aggregates: int = 0
    #: With a gateway store: where the ledger and the store disagree (``problem`` names the
    #: first); a chain that verifies but disagrees with its store is not ``ok``.
    discrepancies: tuple[Discrepancy, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "blocks": self.blocks,
            "records": self.records,
            "first_bad_height": self.first_bad_height,
            "problem": self.problem,
            "replayed": self.replayed,
            "checked_models": self.checked_models,
            "checked_updates": self.checked_updates,
            "checked_aggregates": self.checked_aggregates,
            "discrepancies": [d.to_dict() for d in self.discrepancies],
        }


class LedgerBackend(Protocol):
    """Run contract transactions as ``identity``.

    ``submit`` commits a transaction (raising the contract's ``ContractError`` when a rule
    refuses it, with nothing written); ``evaluate`` runs a read-only one.
    """

    def submit(self, fn: str, *args: Any, identity: Identity) -> Any: ...

    def evaluate(self, fn: str, *args: Any, identity: Identity) -> Any: ...

    def close(self) -> None: ...
