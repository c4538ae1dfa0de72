"""Merkle roots over ledger records (RFC 6962 style domain separation)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

_EMPTY = hashlib.sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def merkle_root(leaves: Iterable[bytes]) -> bytes:
    """Root over already-hashed leaves; an odd node is carried up unchanged."""
    level = list(leaves)
    if not level:
        return _EMPTY
    while len(level) > 1:
        nxt = [
            hashlib.sha256(b"\x01" + level[i] + level[i + 1]).digest()
            for i in range(0, len(level) - 1, 2)
        ]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]
