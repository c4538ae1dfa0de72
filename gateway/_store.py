"""The gateway's durable store (SQLite, WAL): models, rounds, accepted updates, rejections.

An update counts only once its row is committed here, so a gateway killed at any point
restarts with every accepted update and none twice (the primary key forbids it).
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcore import ProcessLock, connect_readonly, lock_beside, table_names

from ._errors import GatewayError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    hash    TEXT PRIMARY KEY,
    round   INTEGER NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    task          TEXT NOT NULL,
    round         INTEGER NOT NULL,
    base_hash     TEXT NOT NULL,
    opened_at     REAL NOT NULL,
    deadline      REAL NOT NULL,
    status        TEXT NOT NULL CHECK (status IN ('open', 'closed')),
    new_hash      TEXT,
    record        TEXT,
    ledgered      INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (task, round)
);
CREATE TABLE IF NOT EXISTS updates (
    task        TEXT NOT NULL,
    round       INTEGER NOT NULL,
    device      TEXT NOT NULL,
    digest      TEXT NOT NULL,
    samples     INTEGER NOT NULL,
    counter     INTEGER NOT NULL,
    size        INTEGER NOT NULL,
    frame       BLOB NOT NULL,
    received_at REAL NOT NULL,
    PRIMARY KEY (task, round, device)
);
CREATE TABLE IF NOT EXISTS optimizer_states (
    task    TEXT NOT NULL,
    round   INTEGER NOT NULL,
    payload BLOB NOT NULL,
    PRIMARY KEY (task, round)
);
CREATE TABLE IF NOT EXISTS counters (
    device  TEXT PRIMARY KEY,
    counter INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS updates_by_device ON updates (task, device, digest);
CREATE INDEX IF NOT EXISTS rounds_unledgered ON rounds (task, round)
    WHERE status = 'closed' AND ledgered = 0;
CREATE TABLE IF NOT EXISTS rejections (
    id          INTEGER PRIMARY KEY,
    task        TEXT,
    round       INTEGER,
    device      TEXT,
    reason      TEXT NOT NULL,
    size        INTEGER NOT NULL,
    received_at REAL NOT NULL,
    digest      TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    task TEXT PRIMARY KEY,
    run  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS secagg_messages (
    task    TEXT NOT NULL,
    round   INTEGER NOT NULL,
    stage   TEXT NOT NULL,
    device  TEXT NOT NULL,
    counter INTEGER NOT NULL,
    frame   BLOB NOT NULL,
    PRIMARY KEY (task, round, stage, device)
);
CREATE TABLE IF NOT EXISTS ledger_refusals (
    task   TEXT NOT NULL,
    round  INTEGER NOT NULL,
    reason TEXT NOT NULL,
    since  REAL NOT NULL,
    PRIMARY KEY (task, round)
);
"""


_TABLES = {"models", "rounds", "updates"}


def _not_a_store(path: Path, tables: set[str]) -> str:
    if {"blocks", "state"} <= tables:
        return (
            f"{path} is a ledger, not a gateway store (the store is the file named by"
            " 'store' in gateway.toml)"
        )
    return f"{path} is not a gateway store (tables: {', '.join(sorted(tables)) or 'none'})"


def _refuse_foreign(path: Path) -> None:
    """A database with tables but not the store's belongs to something else: never add ours."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    db = connect_readonly(path, what="gateway store", error=GatewayError)
    try:
        tables = table_names(db)
    finally:
        db.close()
    if tables and not tables >= _TABLES:
        raise GatewayError(_not_a_store(path, tables))


@dataclass(frozen=True, slots=True)
class RoundRow:
    task: str
    round: int
    base_hash: str
    opened_at: float
    deadline: float
    status: str
    new_hash: str | None
    record: dict[str, Any] | None
    ledgered: bool


@dataclass(frozen=True, slots=True)
class PendingUpdate:
    task: str
    round: int
    device: str
    digest: str
    samples: int
    counter: int
    frame: bytes
    received_at: float


@dataclass(frozen=True, slots=True)
class PendingRejection:
    task: str
    round: int | None
    device: str | None
    reason: str
    size: int
    received_at: float
    digest: str


@dataclass(frozen=True, slots=True)
class StoredUpdate:
    device: str
    digest: str
    samples: int
    counter: int
    size: int
    frame: bytes


class UpdateStore:
    #: The process lock of an ``exclusive`` store (read-only opens hold none).
    _owner: ProcessLock | None = None

    def __init__(
        self, path: str | os.PathLike[str], *, synchronous: str = "FULL", exclusive: bool = False
    ):
        """``exclusive``: this process is the store's one gateway (``fedledger gateway run``);
        a second one is refused, naming the holder's PID (lock file ``<store>.lock``)."""
        self.path = Path(path)
        self._lock = threading.Lock()
        _refuse_foreign(self.path)
        if exclusive:
            self._owner = lock_beside(self.path, holder="a gateway", error=GatewayError)
        try:
            self._db = sqlite3.connect(
                str(self.path), isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous}")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            if self._owner is not None:
                self._owner.release()
            raise GatewayError(f"cannot open update store {self.path}: {exc}") from None

    @classmethod
    def open_readonly(cls, path: str | os.PathLike[str]) -> UpdateStore:
        """Open an existing store for reading (audits, status): the file is never written,
        whatever it is (see ``fedcore.connect_readonly``); another kind of file is refused."""
        db = connect_readonly(path, what="gateway store", error=GatewayError)
        tables = table_names(db)
        if not tables >= _TABLES:
            db.close()
            raise GatewayError(_not_a_store(Path(path), tables))
        self = cls.__new__(cls)
        self.path, self._lock, self._db = Path(path), threading.Lock(), db
        return self

    def _write(self, statements: list[tuple[str, tuple]]) -> None:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                for sql, args in statements:
                    self._db.execute(sql, args)
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise GatewayError(f"update store {self.path}: {exc}") from None

    # runs
    def run_id(self, task: str) -> str:
        """This store's run of ``task``: made once (random, 16 hex) and kept, so a restarted
        gateway goes on with the same run and a fresh store starts a new one. Model messages
        carry it: agents tell a new run of a reused task id from the old run's retained
        final model."""
        self._write([("INSERT OR IGNORE INTO runs VALUES (?, ?)", (task, secrets.token_hex(8)))])
        row = self._db.execute("SELECT run FROM runs WHERE task = ?", (task,)).fetchone()
        return str(row[0])

    # models
    def put_model(self, model_hash: str, round_: int, payload: bytes) -> None:
        self._write(
            [("INSERT OR IGNORE INTO models VALUES (?, ?, ?)", (model_hash, round_, payload))]
        )

    def find_models(self, prefix: str) -> list[str]:
        """The stored models' hashes starting with ``prefix`` (hex), sorted (at most 10)."""
        if not prefix or not set(prefix) <= set("0123456789abcdef"):
            return []
        rows = self._db.execute(
            "SELECT hash FROM models WHERE hash >= ? AND hash < ? ORDER BY hash LIMIT 10",
            (prefix, prefix + "g"),
        ).fetchall()
        return [str(r[0]) for r in rows]

    def get_model(self, model_hash: str) -> bytes | None:
        row = self._db.execute(
            "SELECT payload FROM models WHERE hash = ?", (model_hash,)
        ).fetchone()
        return None if row is None else bytes(row[0])

    # rounds
    def open_round(
        self, task: str, round_: int, base_hash: str, opened_at: float, deadline: float
    ) -> None:
        self._write(
            [
                (
                    "INSERT INTO rounds (task, round, base_hash, opened_at, deadline, status)"
                    " VALUES (?, ?, ?, ?, ?, 'open') ON CONFLICT (task, round)"
                    " DO UPDATE SET deadline = excluded.deadline",
                    (task, round_, base_hash, opened_at, deadline),
                )
            ]
        )

    def close_round(
        self,
        task: str,
        round_: int,
        new_hash: str,
        payload: bytes,
        record: dict[str, Any],
        optimizer_state: bytes | None = None,
    ) -> None:
        """Store the new model (and the server optimizer's state after this round) and close
        the round, in one transaction."""
        statements = [
            ("INSERT OR IGNORE INTO models VALUES (?, ?, ?)", (new_hash, round_ + 1, payload)),
            (
                "UPDATE rounds SET status = 'closed', new_hash = ?, record = ?"
                " WHERE task = ? AND round = ?",
                (new_hash, json.dumps(record, sort_keys=True), task, round_),
            ),
        ]
        if optimizer_state is not None:
            statements.append(
                (
                    "INSERT OR REPLACE INTO optimizer_states VALUES (?, ?, ?)",
                    (task, round_, optimizer_state),
                )
            )
        self._write(statements)

    def optimizer_state(self, task: str) -> tuple[int, bytes] | None:
        """The newest stored server optimizer state: ``(round, payload)``."""
        row = self._db.execute(
            "SELECT round, payload FROM optimizer_states WHERE task = ? ORDER BY round DESC"
            " LIMIT 1",
            (task,),
        ).fetchone()
        return None if row is None else (int(row[0]), bytes(row[1]))

    def mark_ledgered(self, task: str, round_: int) -> None:
        self._write(
            [
                ("UPDATE rounds SET ledgered = 1 WHERE task = ? AND round = ?", (task, round_)),
                ("DELETE FROM ledger_refusals WHERE task = ? AND round = ?", (task, round_)),
            ]
        )

    def note_refused(self, task: str, round_: int, reason: str, since: float) -> None:
        """Record that the ledger contract refuses a closed round (``gateway status`` reads
        it from here while the gateway runs, or after it stopped); anchoring it clears it."""
        self._write(
            [
                (
                    "INSERT INTO ledger_refusals VALUES (?, ?, ?, ?) ON CONFLICT (task, round)"
                    " DO UPDATE SET reason = excluded.reason",
                    (task, round_, reason, since),
                )
            ]
        )

    def refusals(self, task: str) -> list[dict[str, Any]]:
        """The closed rounds the ledger refuses, as last reported (none in a store written
        before refusals were recorded)."""
        try:
            rows = self._db.execute(
                "SELECT round, reason, since FROM ledger_refusals WHERE task = ? ORDER BY round",
                (task,),
            ).fetchall()
        except sqlite3.OperationalError:  # an older store, opened read-only
            return []
        return [{"round": int(r), "reason": why, "since": since} for r, why, since in rows]

    def summary(self, task: str) -> dict[str, Any]:
        """Counts for ``gateway status``: closed rounds, those the ledger lacks, the open
        round with its accepted updates, and rejections by reason."""
        closed, unledgered = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(ledgered = 0), 0) FROM rounds"
            " WHERE task = ? AND status = 'closed'",
            (task,),
        ).fetchone()
        oldest = self._db.execute(
            "SELECT MIN(round) FROM rounds WHERE task = ? AND status = 'closed' AND ledgered = 0",
            (task,),
        ).fetchone()[0]
        open_row = self._db.execute(
            "SELECT round, deadline FROM rounds WHERE task = ? AND status = 'open'"
            " ORDER BY round DESC LIMIT 1",
            (task,),
        ).fetchone()
        opened = None
        if open_row is not None:
            (count,) = self._db.execute(
                "SELECT COUNT(*) FROM updates WHERE task = ? AND round = ?", (task, open_row[0])
            ).fetchone()
            opened = {"round": int(open_row[0]), "deadline": open_row[1], "updates": count}
        (accepted,) = self._db.execute(
            "SELECT COUNT(*) FROM updates WHERE task = ?", (task,)
        ).fetchone()
        return {
            "task": task,
            "closed_rounds": int(closed),
            "unledgered_rounds": int(unledgered),
            "oldest_unledgered": None if oldest is None else int(oldest),
            "open_round": opened,
            "accepted_updates": int(accepted),
            "rejections": self.rejection_counts(task),
            "refused_rounds": self.refusals(task),
        }

    def rounds(self, task: str) -> list[RoundRow]:
        """Every round of the task (audits and reports; the gateway's loop never reads them
        all)."""
        return self._round_rows("WHERE task = ? ORDER BY round", (task,))

    def last_round(self, task: str) -> RoundRow | None:
        """The task's newest round (open or closed): a start resumes from it."""
        rows = self._round_rows("WHERE task = ? ORDER BY round DESC LIMIT 1", (task,))
        return rows[0] if rows else None

    def round(self, task: str, round_: int) -> RoundRow | None:
        rows = self._round_rows("WHERE task = ? AND round = ?", (task, round_))
        return rows[0] if rows else None

    def tasks(self) -> list[str]:
        """The tasks the store holds rounds of."""
        return [r[0] for r in self._db.execute("SELECT DISTINCT task FROM rounds ORDER BY task")]

    def closed_rounds(self) -> Iterator[tuple[str, int, bool]]:
        """``(task, round, ledgered)`` of every closed round, streamed in order (audits
        cross-checking the ledger; nothing is held but the cursor)."""
        cursor = self._db.execute(
            "SELECT task, round, ledgered FROM rounds WHERE status = 'closed' ORDER BY task, round"
        )
        for task, round_, ledgered in cursor:
            yield task, int(round_), bool(ledgered)

    def unledgered(self, task: str) -> list[RoundRow]:
        """Closed rounds the ledger does not have yet, in order (a partial index: the cost
        is the number of such rounds, not the task's age)."""
        return self._round_rows(
            "WHERE task = ? AND status = 'closed' AND ledgered = 0 ORDER BY round", (task,)
        )

    def bases_since(self, task: str, first: int) -> dict[int, str]:
        """The base model of each round from ``first`` on."""
        rows = self._db.execute(
            "SELECT round, base_hash FROM rounds WHERE task = ? AND round >= ?", (task, first)
        ).fetchall()
        return {int(r): h for r, h in rows}

    def _round_rows(self, where: str, args: tuple) -> list[RoundRow]:
        rows = self._db.execute(
            "SELECT task, round, base_hash, opened_at, deadline, status, new_hash, record,"
            f" ledgered FROM rounds {where}",
            args,
        ).fetchall()
        return [RoundRow(*r[:7], json.loads(r[7]) if r[7] else None, bool(r[8])) for r in rows]

    def has_update(self, task: str, device: str, digest: str) -> bool:
        """Whether this exact update (frame digest) of ``device`` is stored: a message the
        broker delivers again, or a device re-sends, after a crash."""
        row = self._db.execute(
            "SELECT 1 FROM updates WHERE task = ? AND device = ? AND digest = ? LIMIT 1",
            (task, device, digest),
        ).fetchone()
        return row is not None

    # updates and rejections
    def write_batch(self, updates: list[PendingUpdate], rejections: list[PendingRejection]) -> None:
        """Commit accepted updates (advancing device counters) and rejections at once.

        One transaction, one fsync for the batch: updates count only after this returns.
        """
        statements: list[tuple[str, tuple]] = []
        for u in updates:
            row = (u.task, u.round, u.device, u.digest, u.samples, u.counter)
            statements.append(
                (
                    "INSERT INTO updates VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (*row, len(u.frame), u.frame, u.received_at),
                )
            )
            statements.append(
                (
                    "INSERT INTO counters VALUES (?, ?) ON CONFLICT (device)"
                    " DO UPDATE SET counter = MAX(counter, excluded.counter)",
                    (u.device, u.counter),
                )
            )
        for r in rejections:
            statements.append(
                (
                    "INSERT INTO rejections (task, round, device, reason, size, received_at,"
                    " digest) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (r.task, r.round, r.device, r.reason, r.size, r.received_at, r.digest),
                )
            )
        if statements:
            self._write(statements)

    def updates(self, task: str, round_: int) -> list[StoredUpdate]:
        rows = self._db.execute(
            "SELECT device, digest, samples, counter, size, frame FROM updates"
            " WHERE task = ? AND round = ? ORDER BY received_at, device",
            (task, round_),
        ).fetchall()
        return [StoredUpdate(r[0], r[1], r[2], r[3], r[4], bytes(r[5])) for r in rows]

    def counters(self) -> dict[str, int]:
        return dict(self._db.execute("SELECT device, counter FROM counters").fetchall())

    # secure aggregation
    def put_secagg(
        self, task: str, round_: int, stage: str, device: str, counter: int, frame: bytes
    ) -> bool:
        """Keep a secure aggregation message (a device's keys, shares or reveal; ``device``
        ``""``: the gateway's own roster, relay or unmask decision). False: that device
        already sent one for this stage of the round (kept as it was)."""
        with self._lock:
            before = self._db.total_changes
        self._write(
            [(
                "INSERT OR IGNORE INTO secagg_messages VALUES (?, ?, ?, ?, ?, ?)",
                (task, round_, stage, device, counter, frame),
            )]
        )  # fmt: skip
        with self._lock:
            return self._db.total_changes > before

    def secagg_messages(self, task: str, round_: int) -> list[tuple[str, str, int, bytes]]:
        """``(stage, device, counter, frame)`` of a round, in the order they were kept."""
        rows = self._db.execute(
            "SELECT stage, device, counter, frame FROM secagg_messages"
            " WHERE task = ? AND round = ? ORDER BY rowid",
            (task, round_),
        ).fetchall()
        return [(r[0], r[1], int(r[2]), bytes(r[3])) for r in rows]

    def secagg_counters(self, task: str) -> dict[str, int]:
        """Each device's last secure aggregation message counter (replay defence)."""
        rows = self._db.execute(
            "SELECT device, MAX(counter) FROM secagg_messages WHERE task = ? AND device != ''"
            " GROUP BY device",
            (task,),
        ).fetchall()
        return {r[0]: int(r[1]) for r in rows}

    # rejections
    def rejections(self, task: str, round_: int) -> list[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT device, digest, reason FROM rejections"
            " WHERE task = ? AND round = ? ORDER BY id",
            (task, round_),
        ).fetchall()
        return [{"device": d, "digest": g, "reason": r} for d, g, r in rows]

    def rejection_counts(self, task: str) -> dict[str, int]:
        rows = self._db.execute(
            "SELECT reason, COUNT(*) FROM rejections WHERE task = ? GROUP BY reason", (task,)
        ).fetchall()
        return dict(rows)

    def close(self) -> None:
        self._db.close()
        if self._owner is not None:
            self._owner.release()
            self._owner = None
