"""The Fabric :class:`~ledger.LedgerBackend`: the same contract, run as chaincode on a
Fabric network and reached through a peer's Gateway service.

On Fabric the submitter is the client's MSP identity (its certificate), not the
``identity`` argument the Protocol carries for the embedded backend: the gateway's profile
must hold the identity its role needs (the task's gateway, or an admin to register devices).
A refusal by the contract comes back inside the peer's error details as ``"<code>: <text>"``
and is raised as the contract's own :class:`~ledger.ContractError`, so callers handle both
backends alike.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .._context import Identity
from .._contract import CODES, ContractError
from ._client import FabricClient
from ._errors import EndorseError, EvaluateError, FabricError

_REFUSAL = re.compile(r"\b(" + "|".join(CODES) + r"): (.+)")


class FabricLedger:
    def __init__(self, client: FabricClient):
        self.client = client

    def submit(self, fn: str, *args: Any, identity: Identity | None = None) -> Any:
        try:
            raw = self.client.submit(fn, *args)
        except EndorseError as exc:
            raise _as_contract_error(exc) from None
        return _decode(raw)

    def evaluate(self, fn: str, *args: Any, identity: Identity | None = None) -> Any:
        try:
            raw = self.client.evaluate(fn, *args)
        except EvaluateError as exc:
            raise _as_contract_error(exc) from None
        return _decode(raw)

    def close(self) -> None:
        self.client.close()


def _decode(raw: bytes) -> Any:
    return json.loads(raw) if raw else None


def _as_contract_error(exc: FabricError) -> FabricError | ContractError:
    """The contract's refusal if the peer reports one, else the Fabric error itself."""
    for text in [d.message for d in exc.details] + [exc.status_message]:
        match = _REFUSAL.search(text or "")
        if match:
            return ContractError(match.group(1), match.group(2).strip())
    return exc
