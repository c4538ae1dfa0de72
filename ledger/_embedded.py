"""The embedded ledger: a hash-chained, signed block store in one SQLite file.

Each block header is canonical JSON ``{height, prev, merkle_root, timestamp, n_records}``;
its SHA-256 is the block hash, which the gateway signs (Ed25519). The records are stored as
canonical JSON and their leaf hashes give the Merkle root. Block 0 (genesis) records the
signer's public key; ``verify`` trusts that key unless the caller pins one.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from fedcore import (
    SignatureError,
    Signer,
    canonical_json,
    load_public_key,
    sha256_hex,
    verify_signature,
)

from ._backend import BlockInfo, VerifyReport
from ._errors import ChainError, LedgerError
from ._merkle import leaf_hash, merkle_root

FORMAT = "fedledger-embedded/1"
GENESIS_PREV = "0" * 64

_SCHEMA = """
CREATE TABLE IF NOT EXISTS blocks (
    height      INTEGER PRIMARY KEY,
    prev_hash   TEXT NOT NULL,
    merkle_root TEXT NOT NULL,
    timestamp   REAL NOT NULL,
    n_records   INTEGER NOT NULL,
    records     BLOB NOT NULL,
    block_hash  TEXT NOT NULL,
    signature   BLOB NOT NULL
);
"""


def block_header(height: int, prev: str, root: str, timestamp: float, n_records: int) -> bytes:
    return canonical_json(
        {
            "height": height,
            "prev": prev,
            "merkle_root": root,
            "timestamp": timestamp,
            "n_records": n_records,
        }
    )


class EmbeddedLedger:
    """Append-only signed chain in SQLite; one ``append`` is one transaction."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        signer: Signer | None = None,
        public_key: str | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.path = Path(path)
        self._signer = signer
        self._clock = clock
        try:
            self._db = sqlite3.connect(str(self.path), isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot open ledger {self.path}: {exc}") from None
        if self._height() < 0:
            if signer is None or public_key is None:
                raise LedgerError(f"{self.path} holds no chain and no signer was given")
            self.append([{"type": "genesis", "format": FORMAT, "public_key": public_key}])

    @classmethod
    def open_readonly(cls, path: str | os.PathLike[str]) -> EmbeddedLedger:
        if not Path(path).is_file():
            raise LedgerError(f"no ledger at {path}")
        return cls(path)

    def _height(self) -> int:
        row = self._db.execute("SELECT MAX(height) FROM blocks").fetchone()
        return -1 if row[0] is None else int(row[0])

    def append(self, records: Sequence[Mapping[str, Any]]) -> BlockInfo:
        if self._signer is None:
            raise LedgerError("ledger opened without a signer is read-only")
        encoded = [canonical_json(dict(r)) for r in records]
        root = merkle_root(leaf_hash(e) for e in encoded).hex()
        body = b"[" + b",".join(encoded) + b"]"
        try:
            self._db.execute("BEGIN IMMEDIATE")
            row = self._db.execute(
                "SELECT height, block_hash FROM blocks ORDER BY height DESC LIMIT 1"
            ).fetchone()
            height, prev = (0, GENESIS_PREV) if row is None else (row[0] + 1, row[1])
            timestamp = round(float(self._clock()), 6)
            header = block_header(height, prev, root, timestamp, len(encoded))
            block_hash = sha256_hex(header)
            signature = self._signer(bytes.fromhex(block_hash))
            self._db.execute(
                "INSERT INTO blocks VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (height, prev, root, timestamp, len(encoded), body, block_hash, signature),
            )
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise LedgerError(f"cannot append to {self.path}: {exc}") from None
        return BlockInfo(height, block_hash, root, timestamp, len(encoded))

    def _rows(self) -> Iterator[tuple]:
        yield from self._db.execute(
            "SELECT height, prev_hash, merkle_root, timestamp, n_records, records, block_hash,"
            " signature FROM blocks ORDER BY height"
        )

    def records(self, record_type: str | None = None) -> list[dict[str, Any]]:
        out = []
        for row in self._rows():
            for record in json.loads(row[5]):
                if record_type is None or record.get("type") == record_type:
                    out.append(record)
        return out

    def verify(self, *, public_key: str | None = None) -> VerifyReport:
        """Check heights, hash links, Merkle roots, block hashes and signatures.

        Stops at the first inconsistent block and names it. ``public_key`` pins the signer;
        without it the key recorded in the genesis block is used.
        """
        blocks = records = 0
        try:
            for height, block in enumerate(self._iter_checked(public_key)):
                blocks = height + 1
                records += block
        except ChainError as exc:
            return VerifyReport(False, blocks, records, exc.height, exc.problem)
        if blocks == 0:
            return VerifyReport(False, 0, 0, 0, "the ledger holds no blocks")
        return VerifyReport(True, blocks, records)

    def _iter_checked(self, pinned_key: str | None) -> Iterator[int]:
        key = load_public_key(pinned_key) if pinned_key else None
        prev = GENESIS_PREV
        for expected, row in enumerate(self._rows()):
            height, prev_hash, root, timestamp, n_records, body, block_hash, signature = row
            if height != expected:
                raise ChainError(expected, f"missing (next block found is {height})")
            if prev_hash != prev:
                raise ChainError(height, "previous-hash link is broken")
            try:
                items = json.loads(body)
                encoded = [canonical_json(r) for r in items]
            except (ValueError, TypeError):
                raise ChainError(height, "records are not canonical JSON") from None
            if len(encoded) != n_records:
                raise ChainError(height, "record count does not match the header")
            if merkle_root(leaf_hash(e) for e in encoded).hex() != root:
                raise ChainError(height, "Merkle root does not match the records")
            header = block_header(height, prev_hash, root, timestamp, n_records)
            if sha256_hex(header) != block_hash:
                raise ChainError(height, "block hash does not match the header")
            if key is None:
                key = self._genesis_key(height, items)
            try:
                verify_signature(key, bytes(signature), bytes.fromhex(block_hash))
            except SignatureError:
                raise ChainError(height, "signature does not verify") from None
            prev = block_hash
            yield n_records

    @staticmethod
    def _genesis_key(height: int, items: list) -> Any:
        try:
            genesis = items[0]
            if genesis.get("type") != "genesis":
                raise ValueError
            return load_public_key(genesis["public_key"])
        except (IndexError, KeyError, ValueError, AttributeError, TypeError):
            raise ChainError(height, "genesis block does not name a valid signer key") from None

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> EmbeddedLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
