"""The embedded ledger's figures, each beside a limit measured in the same run.

``records_per_s`` (anchoring)
    Update records anchored per second through the contract: rounds of ``batch`` devices,
    each round ``OpenRound`` + one ``RecordUpdates`` transaction with ``batch`` accepted
    records + ``CommitRound``, every transaction a signed block committed with
    ``synchronous=FULL``; rate = records / wall time of the whole round loop.
``sqlite_records_per_s`` (the limit)
    Raw SQLite group commit on the same disk with the same settings (WAL, FULL): one
    transaction inserting ``batch`` rows of the same size as the records, as fast as it goes.
``verify_s`` / ``verify_replay_s``
    Verifying a chain that holds ``verify_records`` update records (``RecordUpdates``
    transactions of ``batch`` records, built untimed with ``synchronous=OFF``): hash links,
    Merkle roots, block hashes and Ed25519 signatures; then the same with every transaction
    replayed through the contract.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

from fedcore import generate_key, public_key_b64
from ledger import EmbeddedLedger, Identity

from ._timing import sig

ADMIN = Identity(msp_id="org1", subject="admin", role="admin")
GATEWAY = Identity(msp_id="org1", subject="gateway", role="gateway")


def _hex(i: int) -> str:
    return f"{i:064x}"


def _setup(ledger: EmbeddedLedger, devices: list[str]) -> None:
    for d in devices:
        ledger.submit("RegisterDevice", d, "org1", "pi4", _hex(1), identity=ADMIN)
    ledger.submit(
        "CreateTask", "bench", "org1", "gateway", _hex(2), "fedavg", {}, _hex(3), identity=ADMIN
    )


def _records(devices: list[str], start: int, accepted: bool) -> list[dict[str, Any]]:
    return [
        {
            "device": d,
            "digest": _hex(start + i),
            "samples": 100 if accepted else None,
            "codec": "int8" if accepted else None,
            "accepted": accepted,
            "reason": None if accepted else "bad_signature",
        }
        for i, d in enumerate(devices)
    ]


def anchoring_rate(root: Path, *, batch: int, rounds: int) -> dict[str, float]:
    key = generate_key()
    devices = [f"dev-{i:05d}" for i in range(batch)]
    with EmbeddedLedger(
        root / "anchor.sqlite", signer=key.sign, public_key=public_key_b64(key)
    ) as led:
        _setup(led, devices)
        base = _hex(3)
        started = time.perf_counter()
        for r in range(rounds):
            led.submit("OpenRound", "bench", r, base, 0.0, identity=GATEWAY)
            led.submit(
                "RecordUpdates",
                "bench",
                r,
                _records(devices, 1000 + r * batch, True),
                identity=GATEWAY,
            )
            base = _hex(10**9 + r)
            led.submit(
                "CommitRound",
                "bench",
                r,
                base,
                "fedavg",
                devices,
                {"accuracy": 0.9},
                identity=GATEWAY,
            )
        elapsed = time.perf_counter() - started
    return {
        "records": batch * rounds,
        "seconds": elapsed,
        "records_per_s": batch * rounds / elapsed,
    }


def sqlite_rate(root: Path, *, batch: int, transactions: int, row_bytes: int) -> float:
    db = sqlite3.connect(str(root / "raw.sqlite"), isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE rows (id INTEGER PRIMARY KEY, body BLOB NOT NULL)")
    body = os.urandom(row_bytes)
    started = time.perf_counter()
    for _ in range(transactions):
        db.execute("BEGIN IMMEDIATE")
        db.executemany("INSERT INTO rows (body) VALUES (?)", [(body,)] * batch)
        db.execute("COMMIT")
    elapsed = time.perf_counter() - started
    db.close()
    return batch * transactions / elapsed


def verify_times(root: Path, *, batch: int, records: int) -> dict[str, float]:
    key = generate_key()
    devices = [f"dev-{i:05d}" for i in range(batch)]
    path = root / "verify.sqlite"
    with EmbeddedLedger(
        path, signer=key.sign, public_key=public_key_b64(key), synchronous="OFF"
    ) as led:
        _setup(led, devices)
        led.submit("OpenRound", "bench", 0, _hex(3), 0.0, identity=GATEWAY)
        batches = records // batch
        # one accepted batch (each device once per round), then rejected-message batches
        led.submit("RecordUpdates", "bench", 0, _records(devices, 10**6, True), identity=GATEWAY)
        for b in range(1, batches):
            led.submit(
                "RecordUpdates",
                "bench",
                0,
                _records(devices, 10**6 + b * batch, False),
                identity=GATEWAY,
            )
    with EmbeddedLedger.open_readonly(path) as led:
        started = time.perf_counter()
        plain = led.verify()
        verify_s = time.perf_counter() - started
        started = time.perf_counter()
        replayed = led.verify(replay=True)
        replay_s = time.perf_counter() - started
    if not (plain.ok and replayed.ok):
        raise RuntimeError(f"benchmark chain does not verify: {plain.problem or replayed.problem}")
    return {"blocks": plain.blocks, "verify_s": verify_s, "verify_replay_s": replay_s}


def run(*, batch: int = 100, rounds: int = 100, verify_records: int = 1_000_000) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fedledger-bench-ledger-") as tmp:
        root = Path(tmp)
        anchor = anchoring_rate(root, batch=batch, rounds=rounds)
        raw = sqlite_rate(root, batch=batch, transactions=rounds, row_bytes=200)
        verify = verify_times(root, batch=batch, records=verify_records)
    return {
        "bench": "ledger",
        "batch": batch,
        "records_anchored": anchor["records"],
        "records_per_s": sig(anchor["records_per_s"]),
        "sqlite_records_per_s": sig(raw),
        "ratio_to_sqlite": sig(anchor["records_per_s"] / raw),
        "goal_records_per_s": 10_000,
        "verify_records": (verify_records // batch) * batch,
        "verify_blocks": verify["blocks"],
        "verify_s": sig(verify["verify_s"]),
        "verify_replay_s": sig(verify["verify_replay_s"]),
        "goal_verify_s": 10.0,
    }
