"""The command line as a user meets it: real subprocesses, real exit codes, no tracebacks."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

FEDLEDGER = [sys.executable, "-m", "fedledger"]


def run(*args, cwd=None, timeout=120):
    return subprocess.run(
        [*FEDLEDGER, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout
    )


@pytest.mark.mqtt
def test_demo_writes_report_plot_and_a_verifiable_ledger(tmp_path, mosquitto):
    report_path = tmp_path / "out" / "report.json"
    done = run(
        "demo", "--devices", "3", "--rounds", "2", "--seed", "1", "--epochs", "2",
        "--out", str(report_path), "--workdir", str(tmp_path / "work"), cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr + done.stdout
    report = json.loads(report_path.read_text())
    assert [r["round"] for r in report["rounds"]] == [0, 1]
    for r in report["rounds"]:
        assert r["participants"] == 3 and r["rejected"] == 0 and r["bytes_received"] > 0
        assert 0.5 < r["accuracy"] <= 1.0
        # the sample task is binary (malignant or benign): every clinical metric is defined
        assert set(r["clinical"]) == {
            "balanced_accuracy", "auc", "sensitivity", "specificity", "recall_0", "recall_1",
        }  # fmt: skip
        assert all(0.5 < v <= 1.0 for v in r["clinical"].values())
    assert report["final_clinical"] == report["rounds"][-1]["clinical"]
    assert report["ledger_verified"] is True
    assert 0.5 < report["centralized_accuracy"] <= 1.0
    assert report["final_accuracy"] == report["rounds"][-1]["accuracy"]
    assert (tmp_path / "out" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ledger" in done.stdout and "verified" in done.stdout
    assert "final clinical" in done.stdout and "sensitivity" in done.stdout
    verify = run("ledger", "verify", "--db", report["ledger_path"], "--json")
    assert verify.returncode == 0
    # genesis, 3 registrations, the task, open/record/commit per round
    assert json.loads(verify.stdout)["blocks"] == 11
    assert json.loads(verify.stdout)["replayed"] is True
    # every agent ran as its own process and logged its rounds
    logs = sorted((tmp_path / "work" / "logs").glob("*.log"))
    assert len(logs) == 3
    assert all("sent" in log.read_text() for log in logs)


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["demo", "--help"],
        ["agent", "run", "--help"],
        ["gateway", "run", "--help"],
        ["ledger", "verify", "--help"],
        ["bench", "aggregate", "--help"],
        ["bench", "ingest", "--help"],
    ],
)
def test_help_explains_every_command(args):
    done = run(*args)
    assert done.returncode == 0
    assert "Usage" in done.stdout and len(done.stdout) > 200


def test_version():
    assert run("--version").stdout.strip() == "fedledger 0.1.0"


def test_missing_config_names_the_file(tmp_path):
    done = run("agent", "run", "--config", str(tmp_path / "nope.toml"))
    assert done.returncode == 2
    assert "nope.toml: file not found" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("[agent]\ndevice = 'd'\n", "agent.key: required key is missing"),
        ("[agent]\nbogus = 1\n", "agent.bogus: unknown key (allowed: certificate, data, device,"),
        ("[broker]\nport = 'x'\n", "broker.port: Input should be a valid integer"),
        ("[broker\n", "not valid TOML"),
    ],
)
def test_bad_agent_config_names_file_and_key(tmp_path, body, expected):
    path = tmp_path / "agent.toml"
    path.write_text(body)
    done = run("agent", "run", "--config", str(path))
    assert done.returncode == 2
    assert f"{path}: " in done.stderr and expected in done.stderr
    assert "Traceback" not in done.stderr


def test_unreadable_key_in_gateway_config(tmp_path):
    (tmp_path / "task.toml").write_text(
        "id = 't'\n[model]\nkind = 'logreg'\nn_features = 3\nn_classes = 2\n"
    )
    (tmp_path / "registry.json").write_text('{"devices": {}}')
    (tmp_path / "gw.pem").write_text("not a key")
    (tmp_path / "gateway.toml").write_text(
        "[gateway]\nkey = 'gw.pem'\ntask = 'task.toml'\nregistry = 'registry.json'\n"
        "store = 's.sqlite'\nledger = 'l.sqlite'\n"
    )
    done = run("gateway", "run", "--config", str(tmp_path / "gateway.toml"))
    assert done.returncode == 2
    assert "gw.pem: not an unencrypted PEM private key" in done.stderr
    assert "Traceback" not in done.stderr


def test_bad_task_value_names_the_task_file(tmp_path):
    (tmp_path / "task.toml").write_text(
        "id = 't'\n[model]\nkind = 'cnn'\nn_features = 3\nn_classes = 2\n"
    )
    (tmp_path / "a.toml").write_text(
        "[agent]\ndevice = 'd'\nkey = 'k.pem'\ntask = 'task.toml'\ndata = 'd.npz'\n"
        "gateway_public_key = 'x'\nstate = 's.json'\n"
    )
    done = run("agent", "run", "--config", str(tmp_path / "a.toml"))
    assert done.returncode == 2
    assert "task.toml: model.kind: Input should be 'logreg', 'mlp' or 'cnn1d'" in done.stderr


def test_verify_of_a_missing_ledger_is_a_clear_error(tmp_path):
    done = run("ledger", "verify", "--db", str(tmp_path / "none.sqlite"))
    assert done.returncode == 2
    assert "no ledger at" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.mqtt
def test_history_and_device_commands(tmp_path, mosquitto):
    report_path = tmp_path / "report.json"
    done = run(
        "demo", "--devices", "3", "--rounds", "2", "--agents", "thread", "--no-plot", "--quiet",
        "--out", str(report_path), "--workdir", str(tmp_path / "work"), cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(report_path.read_text())
    db = report["ledger_path"]
    history = run("ledger", "history", report["final_model"], "--db", db, "--json")
    assert history.returncode == 0, history.stderr
    lineage = json.loads(history.stdout)
    assert [r["round"] for r in lineage["rounds"]] == [1, 0]
    assert lineage["rounds"][0]["global_model"] == report["final_model"]
    assert lineage["rounds"][1]["base_model"] == lineage["initial_model"]
    device = run("ledger", "device", "device-02", "--db", db, "--json")
    assert device.returncode == 0, device.stderr
    body = json.loads(device.stdout)
    assert body["device"]["status"] == "active"
    assert [c["round"] for c in body["contributions"]] == [0, 1]
    table = run("ledger", "history", report["final_model"][:8], "--db", db)  # a prefix, as git
    assert table.returncode == 0 and "lineage" in table.stdout, table.stderr
    assert re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", table.stdout), "no ISO-8601 time"
    wide = run("ledger", "history", report["final_model"], "--db", db, "--wide")
    assert f"global model {report['final_model']}" in wide.stdout and "recall_0" in wide.stdout
    assert all(len(line) <= 100 for line in table.stdout.splitlines()), table.stdout
    short = run("ledger", "history", report["final_model"][:4], "--db", db)
    assert short.returncode == 2 and "6 to 64 lowercase hex" in short.stderr
    unknown = run("ledger", "device", "nobody", "--db", db)
    assert unknown.returncode == 2 and "not_found" in unknown.stderr
    verify = run(
        "ledger", "verify", "--db", db, "--store", str(tmp_path / "work" / "gateway.sqlite")
    )
    assert verify.returncode == 0 and "2 models and 6 updates" in verify.stdout


def test_package_and_serve_chaincode(tmp_path):
    import signal
    import socket
    import tarfile
    import time

    from fedcore.mosquitto import free_port

    done = run(
        "ledger", "package-chaincode", "--out", str(tmp_path), "--address", "cc.org1:9999", "--json"
    )
    assert done.returncode == 0, done.stderr
    package = json.loads(done.stdout)
    with tarfile.open(package["package"]) as outer:
        names = set(outer.getnames())
        metadata = json.loads(outer.extractfile("metadata.json").read())
    assert names == {"metadata.json", "code.tar.gz"}
    assert metadata == {"type": "ccaas", "label": "fedledger_1.0"}
    assert package["package_id"].startswith("fedledger_1.0:")

    port = free_port()
    server = subprocess.Popen(
        [*FEDLEDGER, "ledger", "serve-chaincode", "--address", f"127.0.0.1:{port}",
         "--chaincode-id", package["package_id"]],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        end = time.monotonic() + 20
        while time.monotonic() < end:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail("the chaincode server did not listen")
        server.send_signal(signal.SIGTERM)
        out, errors = server.communicate(timeout=20)
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
    assert server.returncode == 0, errors
    assert "listening on" in errors and "Traceback" not in errors


def test_serve_chaincode_needs_an_id():
    done = run("ledger", "serve-chaincode")
    assert done.returncode == 2 and "--chaincode-id" in done.stderr


@pytest.mark.mqtt
def test_secure_demo_runs_over_mutual_tls(tmp_path):
    report_path = tmp_path / "report.json"
    done = run(
        "demo", "--secure", "--devices", "3", "--rounds", "2", "--agents", "thread", "--no-plot",
        "--out", str(report_path), "--workdir", str(tmp_path / "work"), cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr + done.stdout
    report = json.loads(report_path.read_text())
    assert report["secure"] is True and report["ledger_verified"] is True
    assert [r["participants"] for r in report["rounds"]] == [3, 3]
    agent = (tmp_path / "work" / "devices" / "device-01" / "agent.toml").read_text()
    assert "tls_cert" in agent and "device-01.pem" in agent
    assert "mutual TLS" in done.stdout


def test_pki_commands_are_idempotent_and_scriptable(tmp_path):
    pki = str(tmp_path / "pki")
    first = run("pki", "init", "--org", "Hospital", "--dir", pki, "--json")
    again = run("pki", "init", "--org", "Hospital", "--dir", pki, "--json")
    assert first.returncode == again.returncode == 0, first.stderr
    assert json.loads(first.stdout)["changed"] is True
    assert json.loads(again.stdout)["changed"] is False
    issued = run("pki", "issue", "device", "dev-7", "--dir", pki, "--json")
    assert issued.returncode == 0, issued.stderr
    body = json.loads(issued.stdout)
    assert body["action"] == "issued" and "PRIVATE KEY" not in issued.stdout
    assert (tmp_path / "pki" / "devices" / "dev-7.key").stat().st_mode & 0o777 == 0o600
    revoked = run("pki", "revoke", "dev-7", "--dir", pki, "--json")
    assert revoked.returncode == 0 and json.loads(revoked.stdout)["changed"] is True
    other = run("pki", "init", "--org", "Elsewhere", "--dir", pki)
    assert other.returncode == 2 and "ca.pem" in other.stderr and "Traceback" not in other.stderr


@pytest.mark.mqtt
def test_model_export_from_the_store_runs_on_device_runtimes(tmp_path):
    import numpy as np

    from edge_agent import Predictor
    from fedledger._datasets import load_dataset

    report_path = tmp_path / "report.json"
    done = run(
        "demo", "--devices", "3", "--rounds", "2", "--agents", "thread", "--no-plot", "--quiet",
        "--out", str(report_path), "--workdir", str(tmp_path / "work"), cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(report_path.read_text())
    work = tmp_path / "work"
    x_test = load_dataset(seed=0).x_test
    predictions = []
    for fmt in ("onnx", "tflite"):
        out = tmp_path / f"model.{fmt}"
        exported = run(
            "model", "export", "--task", str(work / "task.toml"), "--store", str(work / "gateway.sqlite"),
            "--hash", report["final_model"][:10], "--format", fmt, "--out", str(out), "--json",
        )  # fmt: skip
        assert exported.returncode == 0, exported.stderr
        assert json.loads(exported.stdout)["model_hash"] == report["final_model"]
        predictions.append(Predictor(out).predict(x_test))
    assert np.mean(predictions[0] == predictions[1]) >= 0.99
    missing = run(
        "model", "export", "--task", str(work / "task.toml"), "--out", str(tmp_path / "x.onnx")
    )
    assert missing.returncode == 2 and "--model" in missing.stderr


def test_data_split_writes_device_files_and_a_manifest(tmp_path):
    import numpy as np

    from fedcore import load_local_data

    done = run("data", "split", "--out", str(tmp_path / "s"), "--devices", "4", "--alpha", "0.5",
               "--dataset", "digits", "--seed", "3", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    manifest = json.loads(done.stdout)
    assert manifest["split"] == "dirichlet" and manifest["classes"] == 10
    assert [d["device"] for d in manifest["devices"]] == [f"device-0{i}" for i in range(1, 5)]
    total = 0
    for d in manifest["devices"]:
        x, y = load_local_data(tmp_path / "s" / d["path"])
        assert len(y) == d["samples"] and np.bincount(y, minlength=10).tolist() == d["labels"]
        total += len(y)
    assert total + manifest["holdout"]["samples"] == 1797  # every digit exactly once
    again = run("data", "split", "--out", str(tmp_path / "t"), "--devices", "4", "--dirichlet", "0.5",
                "--dataset", "digits", "--seed", "3", "--json")  # fmt: skip
    assert [d["sha256"] for d in json.loads(again.stdout)["devices"]] == [
        d["sha256"] for d in manifest["devices"]
    ]


def test_data_split_iid_from_a_csv(tmp_path):
    rows = "\n".join(f"{i},{i % 7},{i % 2}" for i in range(40))
    (tmp_path / "site.csv").write_text("a,b,label\n" + rows + "\n")
    done = run("data", "split", "--out", str(tmp_path / "s"), "--devices", "4", "--iid",
               "--csv", str(tmp_path / "site.csv"), "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    manifest = json.loads(done.stdout)
    assert [d["samples"] for d in manifest["devices"]] == [8, 8, 8, 8]
    assert manifest["holdout"]["samples"] == 8
    bad = run(
        "data", "split", "--out", str(tmp_path / "u"), "--devices", "2", "--iid", "--alpha", "1"
    )
    assert bad.returncode == 2 and "exactly one" in bad.stderr


@pytest.mark.mqtt
def test_revoke_device_on_the_embedded_ledger(tmp_path):
    done = run(
        "demo", "--devices", "3", "--rounds", "1", "--agents", "thread", "--no-plot", "--quiet",
        "--workdir", str(tmp_path / "work"), cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    work = tmp_path / "work"
    db = str(work / "ledger.sqlite")
    revoked = run("ledger", "revoke-device", "device-02", "--db", db, "--reason", "lost",
                  "--key", str(work / "keys" / "gateway.pem"), "--json")  # fmt: skip
    assert revoked.returncode == 0, revoked.stderr
    assert json.loads(revoked.stdout)["status"] == "revoked"
    device = json.loads(run("ledger", "device", "device-02", "--db", db, "--json").stdout)
    assert (
        device["device"]["status"] == "revoked" and device["device"]["revocation_reason"] == "lost"
    )
    again = run(
        "ledger",
        "revoke-device",
        "device-02",
        "--db",
        db,
        "--key",
        str(work / "keys" / "gateway.pem"),
    )
    assert again.returncode == 2 and "conflict" in again.stderr
    assert run("ledger", "verify", "--db", db).returncode == 0


@pytest.mark.mqtt
def test_one_seed_gives_one_final_model(tmp_path, mosquitto):
    """Same seed, same model hash: the order updates arrive in (threads, the network) must
    not change the global model."""
    finals = []
    for i in range(2):
        out = tmp_path / f"report-{i}.json"
        done = run(
            "demo", "--devices", "4", "--rounds", "3", "--seed", "7", "--agents", "thread",
            "--no-plot", "--quiet", "--out", str(out), "--workdir", str(tmp_path / f"work-{i}"),
            cwd=tmp_path,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        finals.append(json.loads(out.read_text())["final_model"])
    assert finals[0] == finals[1]
