"""The embedded ledger: the contract run in-process over a signed hash chain in SQLite.

Each ``submit`` executes one contract transaction against the committed world state and,
inside one SQLite transaction, appends a block holding it (function, arguments, creator,
time, read set, write set, event, result digest) and applies its writes. The block header is
canonical JSON ``{height, prev, merkle_root, timestamp, n_records}``; its SHA-256 is the
block hash, signed (Ed25519) by the gateway. Block 0 (genesis) records the signer's key.

In this backend the signing gateway vouches for the identities it submits as (an operator
registers devices as the site's ``admin``); on Fabric the MSP does. ``verify`` re-checks the
chain and, with ``replay``, re-executes every transaction through the contract from empty
state and compares what it reads and writes, so a chain that breaks a rule is caught even if
it is correctly signed.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fedcore import (
    SignatureError,
    Signer,
    canonical_json,
    connect_readonly,
    load_public_key,
    sha256_hex,
    table_names,
    verify_signature,
)

from ._backend import BlockInfo, VerifyReport
from ._context import Identity, MemoryWorldState
from ._contract import ContractError, FedLedgerContract
from ._errors import ChainError, LedgerError
from ._merkle import leaf_hash, merkle_root
from ._store_check import StoreCheck

FORMAT = "fedledger-embedded/2"
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
CREATE TABLE IF NOT EXISTS state (
    key     TEXT PRIMARY KEY,
    value   BLOB NOT NULL,
    version INTEGER NOT NULL
);
"""

_TRANSACTIONS = FedLedgerContract.transactions()


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


def _identity_dict(identity: Identity) -> dict[str, str]:
    return {"msp_id": identity.msp_id, "subject": identity.subject, "role": identity.role}


class _SqliteContext:
    """A transaction over the committed ``state`` table, recording reads and writes.

    Reads see committed state only (as on Fabric); writes are applied with the block.
    """

    def __init__(self, db: sqlite3.Connection, *, tx_id: str, timestamp: float, creator: Identity):
        self._db = db
        self.tx_id = tx_id
        self.timestamp = timestamp
        self.creator = creator
        self.read_set: dict[str, int | None] = {}
        self.write_set: dict[str, bytes] = {}
        self.event: tuple[str, bytes] | None = None

    def get_state(self, key: str) -> bytes | None:
        row = self._db.execute("SELECT value, version FROM state WHERE key = ?", (key,)).fetchone()
        self.read_set[key] = None if row is None else int(row[1])
        return None if row is None else bytes(row[0])

    def put_state(self, key: str, value: bytes) -> None:
        if not isinstance(key, str) or not key or not isinstance(value, bytes) or not value:
            raise TypeError("state keys are non-empty strings, values non-empty bytes")
        self.write_set[key] = value

    def get_state_by_prefix(self, prefix: str) -> Iterator[tuple[str, bytes]]:
        rows = self._db.execute(
            "SELECT key, value, version FROM state WHERE key >= ? AND key < ? ORDER BY key",
            (prefix, prefix + "\U0010ffff"),
        ).fetchall()
        for key, _, version in rows:
            self.read_set[key] = int(version)
        return iter([(key, bytes(value)) for key, value, _ in rows])

    def set_event(self, name: str, payload: bytes) -> None:
        if self.event is not None:
            raise LedgerError(f"transaction {self.tx_id} already set event {self.event[0]!r}")
        self.event = (name, payload)


def _not_a_ledger(path: Path, tables: set[str]) -> str:
    if {"rounds", "updates", "models"} <= tables:
        return (
            f"{path} is a gateway store, not a ledger (the ledger is the file named by"
            " 'ledger' in gateway.toml)"
        )
    if not tables:
        return f"{path} holds no chain (an empty database)"
    return (
        f"{path} holds no chain (a database of another kind, tables: {', '.join(sorted(tables))})"
    )


def _refuse_foreign(path: Path) -> None:
    """A database with tables but no chain belongs to something else: never add ours to it."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    db = connect_readonly(path, what="ledger", error=LedgerError)
    try:
        tables = table_names(db)
    finally:
        db.close()
    if tables and not {"blocks", "state"} <= tables:
        raise LedgerError(_not_a_ledger(path, tables))


class EmbeddedLedger:
    """The zero-setup :class:`~ledger.LedgerBackend`: one SQLite file, one block per transaction."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        signer: Signer | None = None,
        public_key: str | None = None,
        clock: Callable[[], float] = time.time,
        synchronous: str = "FULL",
    ):
        self.path = Path(path)
        self._signer = signer
        self._clock = clock
        self._lock = threading.RLock()
        if signer is None and not self.path.is_file():
            raise LedgerError(f"no ledger at {self.path} (and no signer to start one)")
        _refuse_foreign(self.path)
        try:
            # The gateway anchors from its ledger worker and reads device status from its
            # loop: one connection, used under ``_lock``.
            self._db = sqlite3.connect(
                str(self.path), isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous}")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot open ledger {self.path}: {exc}") from None
        if self.height() < 0:
            if signer is None or public_key is None:
                raise LedgerError(f"{self.path} holds no chain and no signer was given")
            self._begin()
            self._append_block([{"type": "genesis", "format": FORMAT, "public_key": public_key}])
            self._db.execute("COMMIT")

    @classmethod
    def open_readonly(cls, path: str | os.PathLike[str]) -> EmbeddedLedger:
        """Open an existing chain for reading: the file is never written, whatever it is
        (see ``fedcore.connect_readonly``); a file that holds no chain is refused."""
        db = connect_readonly(path, what="ledger", error=LedgerError)
        tables = table_names(db)
        if not {"blocks", "state"} <= tables:
            db.close()
            raise LedgerError(_not_a_ledger(Path(path), tables))
        self = cls.__new__(cls)
        self.path, self._signer, self._clock, self._db = Path(path), None, time.time, db
        self._lock = threading.RLock()
        if self.height() < 0:
            db.close()
            raise LedgerError(f"{path} holds no chain (no genesis block)")
        return self

    def height(self) -> int:
        row = self._db.execute("SELECT MAX(height) FROM blocks").fetchone()
        return -1 if row[0] is None else int(row[0])

    # ------------------------------------------------------------------ transactions
    def submit(self, fn: str, *args: Any, identity: Identity) -> Any:
        """Execute ``fn`` and commit it in a new block; a refused transaction writes nothing."""
        method = self._method(fn, "submit")
        if self._signer is None:
            raise LedgerError("ledger opened without a signer is read-only")
        nonce = os.urandom(24)
        creator = canonical_json(_identity_dict(identity))
        tx_id = hashlib.sha256(nonce + creator).hexdigest()
        with self._lock:
            return self._submit(method, fn, args, identity, tx_id)

    def _submit(self, method, fn: str, args: tuple, identity: Identity, tx_id: str) -> Any:
        self._begin()
        try:
            timestamp = round(float(self._clock()), 6)
            ctx = _SqliteContext(self._db, tx_id=tx_id, timestamp=timestamp, creator=identity)
            result = method(ctx, *args)
            height = self.height() + 1
            record = _tx_record(fn, list(args), identity, ctx, result)
            for key, value in ctx.write_set.items():
                self._db.execute(
                    "INSERT INTO state VALUES (?, ?, ?) ON CONFLICT (key)"
                    " DO UPDATE SET value = excluded.value, version = excluded.version",
                    (key, value, height),
                )
            self._append_block([record], timestamp=timestamp)
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        return result

    def evaluate(self, fn: str, *args: Any, identity: Identity) -> Any:
        method = self._method(fn, "evaluate")
        with self._lock:
            ctx = _SqliteContext(
                self._db, tx_id="evaluate", timestamp=self._clock(), creator=identity
            )
            return method(ctx, *args)

    @staticmethod
    def _method(fn: str, kind: str) -> Callable[..., Any]:
        entry = _TRANSACTIONS.get(fn)
        if entry is None:
            raise ContractError("invalid_argument", f"no transaction {fn!r} in the contract")
        if entry[1] != kind:
            raise ContractError("invalid_argument", f"{fn} is a {entry[1]} transaction, not {kind}")
        return entry[0]

    def _begin(self) -> None:
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot write to {self.path}: {exc}") from None

    def _append_block(
        self, records: list[dict[str, Any]], *, timestamp: float | None = None
    ) -> BlockInfo:
        assert self._signer is not None
        encoded = [canonical_json(r) for r in records]
        root = merkle_root(leaf_hash(e) for e in encoded).hex()
        body = b"[" + b",".join(encoded) + b"]"
        row = self._db.execute(
            "SELECT height, block_hash FROM blocks ORDER BY height DESC LIMIT 1"
        ).fetchone()
        height, prev = (0, GENESIS_PREV) if row is None else (row[0] + 1, row[1])
        if timestamp is None:
            timestamp = round(float(self._clock()), 6)
        header = block_header(height, prev, root, timestamp, len(encoded))
        block_hash = sha256_hex(header)
        signature = self._signer(bytes.fromhex(block_hash))
        self._db.execute(
            "INSERT INTO blocks VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (height, prev, root, timestamp, len(encoded), body, block_hash, signature),
        )
        return BlockInfo(height, block_hash, root, timestamp, len(encoded))

    # ------------------------------------------------------------------ reading
    def _rows(self) -> Iterator[tuple]:
        yield from self._db.execute(
            "SELECT height, prev_hash, merkle_root, timestamp, n_records, records, block_hash,"
            " signature FROM blocks ORDER BY height"
        )

    def transactions(self, fn: str | None = None) -> list[dict[str, Any]]:
        """Every transaction record in chain order, optionally only calls of ``fn``."""
        out = []
        for row in self._rows():
            for record in json.loads(row[5]):
                if record.get("type") == "tx" and (fn is None or record.get("fn") == fn):
                    out.append(record)
        return out

    # ------------------------------------------------------------------ verification
    def verify(
        self, *, public_key: str | None = None, replay: bool = False, store: Any = None
    ) -> VerifyReport:
        """Check heights, hash links, Merkle roots, block hashes and signatures.

        ``public_key`` pins the signer (else the genesis block's key is trusted). ``replay``
        re-executes every transaction through the contract. ``store`` (a gateway
        ``UpdateStore``) is cross-checked with the chain in both directions (see
        ``ledger._store_check``): every disagreement is listed in ``discrepancies``. A broken
        chain stops at the first problem and names its block.
        """
        blocks = records = 0
        world = MemoryWorldState() if replay else None
        check = None if store is None else StoreCheck(store, all_tasks=True)
        try:
            for height, block in self._iter_checked(public_key):
                blocks = height + 1
                records += len(block)
                for record in block:
                    if world is not None:
                        _replay(world, height, record)
                    if check is not None and record.get("type") == "tx":
                        check.writes(height, _record_writes(height, record))
        except ChainError as exc:
            return VerifyReport(
                False, blocks, records, exc.height, exc.problem, replay,
                *_counts(check),
            )  # fmt: skip
        if blocks == 0:
            return VerifyReport(False, 0, 0, 0, "the ledger holds no blocks")
        found = () if check is None else tuple(check.finish())
        if found:
            first = found[0]
            return VerifyReport(
                False, blocks, records, first.height, first.describe(), replay,
                *_counts(check), discrepancies=found,
            )  # fmt: skip
        return VerifyReport(True, blocks, records, None, None, replay, *_counts(check))

    def _iter_checked(self, pinned_key: str | None) -> Iterator[tuple[int, list[dict[str, Any]]]]:
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
            yield height, items

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


def _tx_record(
    fn: str, args: list[Any], identity: Identity, ctx: Any, result: Any
) -> dict[str, Any]:
    event = None
    if ctx.event is not None:
        event = {"name": ctx.event[0], "payload": ctx.event[1].decode("utf-8")}
    return {
        "type": "tx",
        "tx_id": ctx.tx_id,
        "fn": fn,
        "args": args,
        "creator": _identity_dict(identity),
        "timestamp": ctx.timestamp,
        "reads": [[k, v] for k, v in sorted(ctx.read_set.items())],
        "writes": [[k, v.decode("utf-8")] for k, v in sorted(ctx.write_set.items())],
        "event": event,
        "result_sha256": sha256_hex(canonical_json(result)),
    }


def _replay(world: MemoryWorldState, height: int, record: dict[str, Any]) -> None:
    """Re-execute a transaction record from its inputs and compare everything it claims."""
    if record.get("type") == "genesis" and height == 0:
        return
    try:
        entry = _TRANSACTIONS[record["fn"]]
        identity = Identity(**record["creator"])
        ctx = world.context(tx_id=record["tx_id"], timestamp=record["timestamp"], creator=identity)
        result = entry[0](ctx, *record["args"])
    except ContractError as exc:
        raise ChainError(height, f"transaction breaks the contract: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise ChainError(height, f"transaction record is malformed: {exc}") from None
    reads = [[k, v] for k, v in sorted(ctx.read_set.items())]
    writes = [[k, v.decode("utf-8")] for k, v in sorted(ctx.write_set.items())]
    event = None if ctx.event is None else {"name": ctx.event[0], "payload": ctx.event[1].decode()}
    if writes != record.get("writes"):
        raise ChainError(height, "write set differs from what the contract writes")
    if reads != record.get("reads"):
        raise ChainError(height, "read set differs from what the contract reads")
    if event != record.get("event"):
        raise ChainError(height, "event differs from what the contract emits")
    if sha256_hex(canonical_json(result)) != record.get("result_sha256"):
        raise ChainError(height, "result differs from what the contract returns")
    world.commit(ctx)
    if world.height != height:
        raise ChainError(height, "blocks and transactions are out of step")


def _record_writes(height: int, record: dict[str, Any]) -> list[tuple[str, str]]:
    try:
        return [(str(k), str(v)) for k, v in record.get("writes") or []]
    except (TypeError, ValueError):
        raise ChainError(height, "transaction record is malformed: writes") from None


def _counts(check: StoreCheck | None) -> tuple[int, int, int]:
    if check is None:
        return (0, 0, 0)
    return (check.checked_models, check.checked_updates, check.checked_aggregates)
