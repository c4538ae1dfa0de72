"""fedledger never destroys what it did not make: refusals on real paths, byte for byte."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedcore import (
    MARKER,
    UnsafePathError,
    check_folder,
    claim_folder,
    fresh_folder,
    read_marker,
    remove_owned_folder,
)
from fedledger._datasets import load_dataset
from fedledger._provision import TaskOptions, provision

FEDLEDGER = [sys.executable, "-m", "fedledger"]


def run(*args, cwd=None, env=None):
    return subprocess.run(
        [*FEDLEDGER, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120
    )


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (or ``root`` itself) with the SHA-256 of its bytes."""
    if root.is_file():
        return {root.name: hashlib.sha256(root.read_bytes()).hexdigest()}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "/"
        for p in sorted(root.rglob("*"))
    }


def assert_refused(done, path: Path, why: str) -> None:
    assert done.returncode == 2, done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error:") and str(path) in lines[0] and why in lines[0], lines
    assert "Traceback" not in done.stderr + done.stdout


@pytest.fixture
def users_folder(tmp_path):
    folder = tmp_path / "thesis"
    (folder / "chapter").mkdir(parents=True)
    (folder / "notes.txt").write_text("three years of work\n")
    (folder / "chapter" / "1.tex").write_bytes(os.urandom(512))
    return folder


# ---------------------------------------------------------------- the demo's --workdir
def test_demo_refuses_a_folder_it_did_not_make(users_folder, tmp_path):
    before = snapshot(users_folder)
    done = run("demo", "--workdir", str(users_folder), "--devices", "2", cwd=tmp_path)
    assert_refused(done, users_folder, "not made by fedledger")
    assert snapshot(users_folder) == before


def test_demo_refuses_a_file(tmp_path):
    file = tmp_path / "some" / "file.txt"
    file.parent.mkdir()
    file.write_text("keep me")
    done = run("demo", "--workdir", str(file), cwd=tmp_path)
    assert_refused(done, file, "is a file")
    assert file.read_text() == "keep me"


def test_demo_refuses_the_home_directory(users_folder, tmp_path):
    env = {**os.environ, "HOME": str(users_folder)}
    before = snapshot(users_folder)
    done = run("demo", "--workdir", "~", cwd=tmp_path, env=env)
    assert_refused(done, users_folder, "")
    assert snapshot(users_folder) == before


def test_demo_refuses_the_current_directory_and_its_parents(users_folder):
    inner = users_folder / "chapter"
    before = snapshot(users_folder)
    for target, why in ((".", "current directory"), ("..", "")):
        done = run("demo", "--workdir", target, cwd=inner)
        assert done.returncode == 2 and "error:" in done.stderr, done.stderr
        assert why in done.stderr
    assert snapshot(users_folder) == before


def test_demo_refuses_a_marked_folder_of_another_kind(tmp_path):
    site = claim_folder(tmp_path / "site", kind="site", created_by="fedledger init")
    (site / "keys.pem").write_text("a hospital's keys")
    done = run("demo", "--workdir", str(site), cwd=tmp_path)
    assert_refused(done, site, "as a site, not a demo-site")
    assert (site / "keys.pem").read_text() == "a hospital's keys"


@pytest.mark.parametrize("path", ["/", str(Path.home())])
def test_root_and_home_are_refused_even_when_emptying_is_asked(path):
    with pytest.raises(UnsafePathError):
        check_folder(path, kind="demo-site", fresh=True)


def test_a_symbolic_link_to_a_folder_is_refused(users_folder, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(users_folder)
    with pytest.raises(UnsafePathError, match="symbolic link"):
        check_folder(link, kind="demo-site", fresh=True)


# ---------------------------------------------------------------- the demo's own folder
def _provision(root: Path, *, devices: int = 3):
    return provision(
        root, load_dataset(), devices=devices, alpha=0.5, seed=0,
        options=TaskOptions(), broker_host="127.0.0.1", broker_port=1883,
    )  # fmt: skip


def test_the_demos_own_folder_is_recreated_on_a_rerun(tmp_path):
    layout = _provision(tmp_path / "demo")
    assert read_marker(layout.root)["kind"] == "demo-site"
    (layout.root / "stale.txt").write_text("from the last run")
    again = _provision(tmp_path / "demo")
    assert again.root == layout.root and not (again.root / "stale.txt").exists()
    assert (again.root / MARKER).is_file() and again.gateway_config.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # nothing left aside


def test_a_failed_run_keeps_the_previous_results(tmp_path):
    layout = _provision(tmp_path / "demo")
    before = snapshot(layout.root)
    with pytest.raises(ValueError):
        _provision(tmp_path / "demo", devices=10_000)  # no split can serve so many
    assert snapshot(layout.root) == before


def test_a_failure_inside_a_fresh_folder_puts_the_old_one_back(tmp_path):
    with fresh_folder(tmp_path / "s", kind="demo-site", created_by="test") as site:
        (site / "result.json").write_text("1")
    with (
        pytest.raises(RuntimeError),
        fresh_folder(tmp_path / "s", kind="demo-site", created_by="t"),
    ):
        raise RuntimeError("the run broke")
    assert (tmp_path / "s" / "result.json").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_remove_owned_folder_refuses_a_users_folder(users_folder):
    before = snapshot(users_folder)
    with pytest.raises(UnsafePathError):
        remove_owned_folder(users_folder, kind="demo-site")
    assert snapshot(users_folder) == before


# ---------------------------------------------------------------- other writers
def test_data_split_refuses_a_users_folder_and_replaces_its_own(users_folder, tmp_path):
    before = snapshot(users_folder)
    done = run("data", "split", "--out", str(users_folder), "--devices", "2", "--iid")
    assert_refused(done, users_folder, "not made by fedledger")
    assert snapshot(users_folder) == before
    out = tmp_path / "split"
    for _ in range(2):
        done = run("data", "split", "--out", str(out), "--devices", "2", "--iid", "--json")
        assert done.returncode == 0, done.stderr
    assert read_marker(out)["kind"] == "data-split"
    assert sorted(p.name for p in out.iterdir()) == [
        MARKER, "device-01", "device-02", "holdout.npz", "manifest.json",
    ]  # fmt: skip


def test_broker_config_refuses_a_users_folder(users_folder, tmp_path):
    pki = tmp_path / "pki"
    assert run("pki", "init", "--org", "Example", "--dir", str(pki)).returncode == 0
    assert (
        run("pki", "issue", "broker", "broker", "--dns", "localhost", "--dir", str(pki)).returncode
        == 0
    )
    before = snapshot(users_folder)
    done = run("broker", "config", "--out", str(users_folder), "--task", "t", "--pki", str(pki))
    assert_refused(done, users_folder, "not made by fedledger")
    assert snapshot(users_folder) == before
    out = tmp_path / "broker"
    for _ in range(2):  # its own folder is rewritten in place
        done = run("broker", "config", "--out", str(out), "--task", "t", "--pki", str(pki))
        assert done.returncode == 0, done.stderr
    assert (out / "mosquitto.conf").is_file() and read_marker(out)["kind"] == "broker-config"


def test_pki_init_refuses_a_users_folder(users_folder):
    before = snapshot(users_folder)
    done = run("pki", "init", "--org", "Example", "--dir", str(users_folder))
    assert_refused(done, users_folder, "not made by fedledger")
    assert snapshot(users_folder) == before


def test_model_export_replaces_only_its_own_exports(tmp_path):
    layout = _provision(tmp_path / "demo")
    from fedcore import init_params, load_task

    spec = load_task(layout.task).model_spec()
    np.savez(tmp_path / "m.npz", **init_params(spec))
    target = tmp_path / "report.onnx"
    target.write_text("a user's file that happens to end in .onnx")
    args = ("model", "export", "--task", str(layout.task), "--model", str(tmp_path / "m.npz"))
    done = run(*args, "--out", str(target), "--format", "onnx")
    assert_refused(done, target, "not a onnx model fedledger exported")
    assert target.read_text() == "a user's file that happens to end in .onnx"
    for fmt in ("onnx", "tflite"):
        out = tmp_path / f"model.{fmt}"
        for _ in range(2):  # a second export replaces the first
            done = run(*args, "--out", str(out), "--format", fmt)
            assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------- read-only means read-only
def _foreign_sqlite(path: Path, *, wal: bool) -> Path:
    db = sqlite3.connect(path)
    if wal:
        db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE patients (id INTEGER PRIMARY KEY, name TEXT)")
    db.execute("INSERT INTO patients (name) VALUES ('x')")
    db.commit()
    db.close()
    return path


@pytest.mark.parametrize("wal", [False, True], ids=["rollback-journal", "wal"])
@pytest.mark.parametrize(
    "command",
    [
        ["ledger", "verify", "--db"],
        ["ledger", "history", "0" * 64, "--db"],
        ["ledger", "device", "device-01", "--db"],
    ],
    ids=["verify", "history", "device"],
)
def test_read_commands_leave_a_foreign_database_byte_identical(tmp_path, command, wal):
    db = _foreign_sqlite(tmp_path / "other.sqlite", wal=wal)
    before = snapshot(tmp_path)
    done = run(*command, str(db))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "holds no chain" in done.stderr and "Traceback" not in done.stderr
    assert snapshot(tmp_path) == before  # the file, and no -wal or -shm beside it


def test_verify_says_a_gateway_store_is_not_a_ledger(tmp_path):
    layout = _provision(tmp_path / "demo")
    from gateway import UpdateStore

    UpdateStore(layout.store).close()
    before = snapshot(layout.store)
    done = run("ledger", "verify", "--db", str(layout.store))
    assert done.returncode == 2
    assert "is a gateway store, not a ledger" in done.stderr
    assert snapshot(layout.store) == before


def test_verify_store_refuses_a_ledger_named_as_the_store(tmp_path):
    from fedcore import generate_key, public_key_b64, signer_from_key
    from ledger import EmbeddedLedger

    key = generate_key()
    with EmbeddedLedger(
        tmp_path / "ledger.sqlite", signer=signer_from_key(key), public_key=public_key_b64(key)
    ):
        pass
    before = snapshot(tmp_path)
    ledger_path = str(tmp_path / "ledger.sqlite")
    done = run("ledger", "verify", "--db", ledger_path, "--store", ledger_path)
    assert done.returncode == 2 and "is a ledger, not a gateway store" in done.stderr
    assert snapshot(tmp_path) == before


def test_the_report_and_marker_are_plain_json(tmp_path):
    layout = _provision(tmp_path / "demo")
    marker = json.loads((layout.root / MARKER).read_text())
    assert marker["created_by"] == "fedledger demo" and marker["kind"] == "demo-site"
