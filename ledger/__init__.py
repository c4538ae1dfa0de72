"""ledger: verifiable records of which devices built which model.

The gateway talks to a :class:`LedgerBackend`; :class:`EmbeddedLedger` is the zero-setup
backend (a signed hash chain in SQLite).
"""

from ._backend import BlockInfo, LedgerBackend, VerifyReport
from ._embedded import EmbeddedLedger
from ._errors import ChainError, LedgerError
from ._merkle import leaf_hash, merkle_root

__all__ = [
    "BlockInfo",
    "ChainError",
    "EmbeddedLedger",
    "LedgerBackend",
    "LedgerError",
    "VerifyReport",
    "leaf_hash",
    "merkle_root",
]
