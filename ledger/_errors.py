"""Ledger exceptions.

The tree::

    FedledgerError (fedcore)
    └── LedgerError            the ledger cannot be opened or appended to
        └── ChainError         verification found an inconsistency (height, problem)
"""

from __future__ import annotations

from fedcore import FedledgerError


class LedgerError(FedledgerError):
    """A ledger operation failed."""


class ChainError(LedgerError):
    """The chain is inconsistent at block ``height``."""

    def __init__(self, height: int, problem: str):
        self.height = height
        self.problem = problem
        super().__init__(f"block {height}: {problem}")
