"""`fedledger ledger verify --store`: the ledger and the gateway's store cross-checked both
ways, on the files of a real federation (a `fedledger demo` run), each test mutating copies."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import subprocess
import sys

import pytest

pytestmark = pytest.mark.mqtt

FEDLEDGER = [sys.executable, "-m", "fedledger"]
ROUNDS = 3
DEVICES = 3


def run(*args):
    return subprocess.run([*FEDLEDGER, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """The store and ledger of three rounds of three devices, never written again."""
    root = tmp_path_factory.mktemp("federation")
    done = run(
        "demo", "--devices", str(DEVICES), "--rounds", str(ROUNDS), "--agents", "thread",
        "--epochs", "1", "--no-plot", "--quiet", "--out", str(root / "report.json"),
        "--workdir", str(root / "work"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads((root / "report.json").read_text())
    return root / "work", report["task"]


@pytest.fixture
def files(federation, tmp_path):
    """Copies of the federation's ledger and store: (ledger, store, task)."""
    work, task = federation
    ledger, store = tmp_path / "ledger.sqlite", tmp_path / "gateway.sqlite"
    shutil.copyfile(work / "ledger.sqlite", ledger)
    shutil.copyfile(work / "gateway.sqlite", store)
    return ledger, store, task


def sql(path, statement, *args):
    db = sqlite3.connect(path)
    try:
        rows = db.execute(statement, args).fetchall()
        db.commit()
        return rows
    finally:
        db.close()


def verify(ledger, store, *more):
    return run("ledger", "verify", "--db", str(ledger), "--store", str(store), *more)


def drop_last_round_from_ledger(ledger) -> int:
    """Cut the chain before the last round's OpenRound: what remains is a valid chain (a
    prefix) that lacks the round."""
    for height, body in sql(ledger, "SELECT height, records FROM blocks ORDER BY height"):
        record = json.loads(body)[0]
        if record.get("fn") == "OpenRound" and record["args"][1] == ROUNDS - 1:
            sql(ledger, "DELETE FROM blocks WHERE height >= ?", height)
            return height
    raise AssertionError("no OpenRound of the last round")


def assert_one_line_failure(done, *words):
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_a_clean_store_and_ledger_pass_and_the_store_is_left_untouched(files):
    ledger, store, _ = files
    before = {p.name: p.read_bytes() for p in store.parent.iterdir()}
    done = verify(ledger, store)
    assert done.returncode == 0, done.stderr
    assert f"{ROUNDS} models and {ROUNDS * DEVICES} updates" in done.stdout
    body = json.loads(verify(ledger, store, "--json").stdout)
    assert body["ok"] is True and body["discrepancies"] == []
    assert body["checked_models"] == ROUNDS and body["checked_updates"] == ROUNDS * DEVICES
    # read-only: the same bytes, and no -wal or -shm left beside either file
    assert {p.name: p.read_bytes() for p in store.parent.iterdir()} == before


def test_a_closed_round_the_ledger_lacks_fails_naming_it(files):
    ledger, store, task = files
    drop_last_round_from_ledger(ledger)
    assert run("ledger", "verify", "--db", str(ledger)).returncode == 0  # the chain alone is fine
    done = verify(ledger, store)
    assert_one_line_failure(
        done, "round_missing_in_ledger", f"round {ROUNDS - 1} of task {task}", "marks it anchored"
    )


def test_an_accepted_update_the_ledger_lacks_fails_naming_device_and_counter(files):
    ledger, store, task = files
    (frame,) = sql(store, "SELECT frame FROM updates WHERE round = 1 LIMIT 1")[0]
    forged = bytes(frame) + b"\x00"
    sql(
        store,
        "INSERT INTO updates VALUES (?, 1, 'device-99', ?, 10, 4242, ?, ?, 0.0)",
        task, hashlib.sha256(forged).hexdigest(), len(forged), forged,
    )  # fmt: skip
    done = verify(ledger, store)
    assert_one_line_failure(
        done, "update_missing_in_ledger", "device-99", "counter 4242", f"round 1 of task {task}"
    )


def test_an_update_on_the_ledger_the_store_lacks_fails(files):
    ledger, store, _ = files
    sql(store, "DELETE FROM updates WHERE round = 0 AND device = 'device-02'")
    done = verify(ledger, store)
    assert_one_line_failure(done, "update_missing_in_store", "device-02", "round 0")


def test_a_ledger_round_absent_from_the_store_fails(files):
    ledger, store, task = files
    sql(store, "DELETE FROM rounds WHERE round = 1")
    done = verify(ledger, store)
    assert_one_line_failure(
        done, "round_missing_in_store", f"round 1 of task {task}", "not in the store"
    )


def test_a_model_hash_that_differs_fails(files):
    ledger, store, _ = files
    sql(store, "UPDATE rounds SET new_hash = ? WHERE round = 0", "ab" * 32)
    done = verify(ledger, store)
    assert_one_line_failure(done, "model_differs", "round 0", "abababab")


def test_json_lists_every_discrepancy(files):
    ledger, store, task = files
    height = drop_last_round_from_ledger(ledger)
    sql(store, "DELETE FROM updates WHERE round = 0 AND device = 'device-03'")
    sql(store, "UPDATE updates SET counter = 777 WHERE round = 1 AND device = 'device-01'")
    sql(store, "UPDATE updates SET frame = x'00' WHERE round = 1 AND device = 'device-01'")
    done = verify(ledger, store, "--json")
    assert done.returncode == 1, done.stderr
    body = json.loads(done.stdout)
    assert body["ok"] is False and body["first_bad_height"] is not None
    found = body["discrepancies"]
    for d in found:
        assert set(d) == {"kind", "task", "round", "device", "counter", "height", "detail"}
        assert d["task"] == task and d["detail"]
    assert [(d["kind"], d["round"], d["device"], d["counter"]) for d in found] == [
        ("update_missing_in_store", 0, "device-03", None),
        ("update_differs", 1, "device-01", 777),
        ("round_missing_in_ledger", ROUNDS - 1, None, None),
    ]
    assert found[2]["height"] is None and found[0]["height"] < height
    assert body["problem"].startswith("update of device-03 in round 0")
    # the line without --json names the first, and how many more there are
    assert_one_line_failure(verify(ledger, store), "update_missing_in_store", "and 2 more")


def test_a_file_that_is_not_a_store_is_a_clear_error(files, tmp_path):
    ledger, _, _ = files
    other = tmp_path / "other.sqlite"
    sql(other, "CREATE TABLE patients (id INTEGER PRIMARY KEY)")
    done = verify(ledger, other)
    assert done.returncode == 2 and "is not a gateway store" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
