"""ledger: verifiable records of which devices built which model.

One contract (:class:`FedLedgerContract`) decides what may be recorded; backends run it.
The gateway talks to a :class:`LedgerBackend`: :class:`EmbeddedLedger` (a signed hash chain
in SQLite, zero setup) or the Hyperledger Fabric client in ``ledger.fabric``.
"""

from ._backend import BlockInfo, LedgerBackend, VerifyReport
from ._context import Identity, MemoryContext, MemoryWorldState, MVCCConflictError, TxContext
from ._contract import CODES, MIN_HASH_PREFIX, ContractError, FedLedgerContract
from ._embedded import EmbeddedLedger
from ._errors import ChainError, LedgerError
from ._merkle import leaf_hash, merkle_root
from ._privacy import privacy_report
from ._store_check import DISCREPANCY_KINDS, Discrepancy, GatewayStore, StoreCheck

__all__ = [
    "CODES",
    "DISCREPANCY_KINDS",
    "MIN_HASH_PREFIX",
    "BlockInfo",
    "ChainError",
    "ContractError",
    "Discrepancy",
    "EmbeddedLedger",
    "FedLedgerContract",
    "GatewayStore",
    "Identity",
    "LedgerBackend",
    "LedgerError",
    "MVCCConflictError",
    "MemoryContext",
    "MemoryWorldState",
    "StoreCheck",
    "TxContext",
    "VerifyReport",
    "leaf_hash",
    "merkle_root",
    "privacy_report",
]
