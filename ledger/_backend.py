"""The boundary the gateway calls: any ledger backend implements this Protocol."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol


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

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "blocks": self.blocks,
            "records": self.records,
            "first_bad_height": self.first_bad_height,
            "problem": self.problem,
        }


class LedgerBackend(Protocol):
    """Append-only, verifiable record store used for round records."""

    def append(self, records: Sequence[Mapping[str, Any]]) -> BlockInfo:
        """Append one block holding ``records`` (one transaction); return its header."""
        ...

    def verify(self) -> VerifyReport:
        """Re-check the whole chain."""
        ...

    def records(self, record_type: str | None = None) -> list[dict[str, Any]]:
        """Every record in order, optionally only those whose ``type`` matches."""
        ...

    def close(self) -> None: ...
