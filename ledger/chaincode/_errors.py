"""Errors of the chaincode server, its peer sessions and the CCaaS package builder.

The tree (under :class:`ledger.LedgerError`)::

    LedgerError
    └── ChaincodeError          a server or package setting cannot be used (setting)
        └── PeerRequestError    the peer refused or never answered a request (tx id, request)

A transaction never raises to the peer: the adapter turns every failure, these included,
into an error response (see :mod:`ledger.chaincode._adapter`).
"""

from __future__ import annotations

from .._errors import LedgerError


class ChaincodeError(LedgerError):
    """A chaincode server or package setting cannot be used; ``setting`` names it."""

    def __init__(self, message: str, *, setting: str | None = None):
        self.setting = setting
        self.detail = message
        super().__init__(f"{setting}: {message}" if setting else message)


class PeerRequestError(ChaincodeError):
    """The peer answered a state request with ERROR, or not at all.

    ``request`` is the shim message type (``GET_STATE``...), ``tx_id`` the transaction.
    """

    def __init__(self, tx_id: str, request: str, reason: str):
        self.tx_id = tx_id
        self.request = request
        self.reason = reason
        super().__init__(f"transaction {tx_id}: {request} failed: {reason}")
