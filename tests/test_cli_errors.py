"""Every command, fed what a user gets wrong, answers with one ``error:`` line and exit 2.

The commands are read from the typer application, so a new command is covered by the
generic cases (unknown option, missing required input, a wrong type, an out-of-range
number) without being listed here; ``BAD_INPUTS`` adds bad files per command. Every case
fails before anything trains, listens or connects.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedledger._command import build, commands
from fedledger.cli import app

FEDLEDGER = [sys.executable, "-m", "fedledger"]
ROOT = build(app)
LEAVES = {path: c for path, c in commands(ROOT) if path and not hasattr(c, "commands")}


def run(*args, cwd=None, env=None):
    return subprocess.run(
        [*FEDLEDGER, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120
    )


def assert_one_error_line(done) -> None:
    everything = done.stdout + done.stderr
    assert "Traceback" not in everything, everything
    assert done.returncode == 2, everything
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines and lines[0].startswith("error: "), done.stderr
    # a usage error may add where the help is; nothing else
    assert len(lines) == 1 or (len(lines) == 2 and lines[1].startswith("try '")), done.stderr


def _ids(path):
    return " ".join(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Garbage under every name a command reads, a valid task, and a real empty ledger."""
    root = tmp_path_factory.mktemp("bad-inputs")
    rubbish = os.urandom(2048)
    for name in ("garbage.toml", "garbage.json", "garbage.sqlite", "garbage.pem", "garbage.npz",
                 "garbage.csv"):  # fmt: skip
        (root / name).write_bytes(rubbish)
    (root / "task.toml").write_text(
        "id = 't'\n[model]\nkind = 'logreg'\nn_features = 3\nn_classes = 2\n"
    )
    (root / "a-file").write_text("not a folder\n")
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fedcore import public_key_b64, signer_from_key
    from ledger import EmbeddedLedger

    key = Ed25519PrivateKey.generate()
    EmbeddedLedger(
        root / "ledger.sqlite", signer=signer_from_key(key), public_key=public_key_b64(key)
    ).close()
    return root


# ---------------------------------------------------------------- generic, from the app
def test_every_command_is_enumerated():
    assert {("demo",), ("agent", "run"), ("ledger", "verify"), ("data", "split")} <= set(LEAVES)


@pytest.mark.parametrize("path", sorted(LEAVES), ids=_ids)
def test_unknown_option(path):
    assert_one_error_line(run(*path, "--no-such-option"))


@pytest.mark.parametrize(
    "path", sorted(p for p, c in LEAVES.items() if any(q.required for q in c.params)), ids=_ids
)
def test_missing_required_input(path):
    done = run(*path)
    assert_one_error_line(done)
    assert "missing" in done.stderr


def _ranged(command):
    return [p for p in command.params if getattr(p, "min", None) is not None]


@pytest.mark.parametrize("path", sorted(p for p, c in LEAVES.items() if _ranged(c)), ids=_ids)
def test_wrong_type(path):
    option = _ranged(LEAVES[path])[0]
    done = run(*path, option.opts[0], "abc")
    assert_one_error_line(done)
    assert option.opts[0] in done.stderr


@pytest.mark.parametrize("path", sorted(p for p, c in LEAVES.items() if _ranged(c)), ids=_ids)
def test_out_of_range(path):
    option = _ranged(LEAVES[path])[-1]
    done = run(*path, option.opts[0], str(option.min - 1))
    assert_one_error_line(done)
    assert option.opts[0] in done.stderr


# ---------------------------------------------------------------- bad files and values
BAD_INPUTS = {
    ("agent", "run"): [
        ["--config", "{d}/missing.toml"],
        ["--config", "{d}/garbage.toml"],
        ["--config", "{d}/garbage.toml", "--log-level", "loud"],
    ],
    ("agent", "device-class"): [["{d}/missing.toml"], ["{d}/garbage.toml"]],
    ("gateway", "run"): [["--config", "{d}/missing.toml"], ["--config", "{d}/garbage.toml"]],
    ("gateway", "status"): [
        [],
        ["--store", "{d}/missing.sqlite"],
        ["--store", "{d}/garbage.sqlite"],
        ["--store", "{d}/ledger.sqlite"],
        ["--config", "{d}/garbage.toml"],
        ["--config", "{d}/garbage.toml", "--store", "{d}/garbage.sqlite"],
    ],
    ("ledger", "verify"): [
        ["--db", "{d}/missing.sqlite"],
        ["--db", "{d}/garbage.sqlite"],
        ["--db", "{d}/ledger.sqlite", "--public-key", "nonsense"],
        ["--db", "{d}/ledger.sqlite", "--store", "{d}/garbage.sqlite"],
        ["--fabric-profile", "{d}/garbage.toml"],
        ["--fabric-profile", "{d}/missing.toml"],
    ],
    ("ledger", "history"): [
        ["ab" * 32, "--db", "{d}/garbage.sqlite"],
        ["ab" * 32, "--db", "{d}/missing.sqlite"],
        ["ab" * 32, "--db", "{d}/ledger.sqlite"],
        ["ab" * 32],
    ],
    ("ledger", "privacy"): [
        ["t", "--db", "{d}/garbage.sqlite"],
        ["t", "--db", "{d}/missing.sqlite"],
        ["t", "--db", "{d}/ledger.sqlite"],
        ["t"],
    ],
    ("bench", "agent"): [
        ["--model", "resnet"],
        ["--launcher", "no-such-launcher-x", "--rounds", "1"],
    ],
    ("bench", "privacy"): [["--dataset", "nonsense"], ["--noise", "0"]],
    ("ledger", "device"): [
        ["device-01", "--db", "{d}/garbage.sqlite"],
        ["device-01", "--db", "{d}/ledger.sqlite"],
    ],
    ("ledger", "revoke-device"): [
        ["device-01", "--db", "{d}/ledger.sqlite", "--key", "{d}/garbage.pem"],
        ["device-01", "--db", "{d}/ledger.sqlite", "--key", "{d}/missing.pem"],
    ],
    ("ledger", "serve-chaincode"): [[], ["--address", "nowhere", "--chaincode-id", ""]],
    ("ledger", "package-chaincode"): [
        ["--out", "{d}/pkg", "--address", "cc:9999", "--tls", "--root-cert", "{d}/missing.pem"],
    ],
    ("pki", "init"): [["--org", "O", "--dir", "{d}/a-file"]],
    ("pki", "issue"): [["nonsense", "n", "--dir", "{d}/pki"], ["device", "d", "--dir", "{d}/no"]],
    ("pki", "revoke"): [["d", "--dir", "{d}/no-pki"]],
    ("pki", "crl"): [["--dir", "{d}/no-pki"]],
    ("pki", "x25519"): [["gateway", "--dir", "{d}/a-file"]],
    ("pki", "signing-key"): [["d", "--dir", "{d}/a-file"]],
    ("pki", "dp-seed"): [["--out", "{d}/a-file"], ["--out", "{d}"]],
    ("broker", "config"): [
        ["--out", "{d}/b", "--task", "t", "--registry", "{d}/garbage.json"],
        ["--out", "{d}/b", "--task", "t", "--pki", "{d}/no-pki"],
    ],
    ("config", "reference"): [
        ["--file", "nonsense"],
        ["--out", "{d}/a-file"],
        ["--out", "{d}"],
        ["--out", "{d}/task.toml", "--json"],
    ],
    ("model", "export"): [
        ["--task", "{d}/garbage.toml", "--out", "{d}/m.onnx", "--model", "{d}/garbage.npz"],
        ["--task", "{d}/task.toml", "--out", "{d}/m.onnx", "--model", "{d}/garbage.npz"],
        ["--task", "{d}/task.toml", "--out", "{d}/m.onnx", "--model", "{d}/missing.npz"],
        [
            "--task",
            "{d}/task.toml",
            "--out",
            "{d}/m.onnx",
            "--store",
            "{d}/garbage.sqlite",
            "--hash",
            "ab" * 32,
        ],
        ["--task", "{d}/task.toml", "--out", "{d}/m.onnx", "--format", "pdf"],
    ],
    ("data", "split"): [
        ["--out", "{d}/s1", "--iid", "--csv", "{d}/garbage.csv"],
        ["--out", "{d}/s2", "--iid", "--csv", "{d}/missing.csv"],
        ["--out", "{d}/s3", "--alpha", "0"],
        ["--out", "{d}/s4", "--iid", "--dataset", "nonsense"],
        ["--out", "{d}/s5"],
    ],
    ("demo",): [
        ["--model", "cnn"],
        ["--codec", "zip"],
        ["--aggregation", "mean"],
        ["--agents", "fibres"],
        ["--workdir", "{d}/a-file"],
        ["--log-level", "loud", "--workdir", "{d}/demo"],
        ["--privacy", "secret"],
        ["--privacy", "dp", "--aggregation", "median"],
    ],
    ("bench", "accuracy"): [["--datasets", "nonsense", "--repeats", "1", "--rounds", "1"]],
}

CASES = [(path, args) for path, table in sorted(BAD_INPUTS.items()) for args in table]


def test_the_table_names_only_real_commands():
    assert set(BAD_INPUTS) <= set(LEAVES)


@pytest.mark.parametrize(
    ("path", "args"), CASES, ids=[f"{_ids(p)}:{' '.join(a)}" for p, a in CASES]
)
def test_bad_input(path, args, files):
    done = run(*path, *(a.format(d=files) for a in args), cwd=files)
    assert_one_error_line(done)


def test_an_unexpected_error_is_one_line_with_a_hint(tmp_path):
    """A bug still reaches the user as one line (the traceback only on request)."""
    code = (
        "import sys; from fedledger import _errors\n"
        "try:\n    raise RuntimeError('boom')\n"
        "except RuntimeError as exc:\n    sys.exit(_errors.report(exc))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [
        "error: unexpected RuntimeError: boom (run with FEDLEDGER_DEBUG=1 for the traceback,"
        " and please report it)"
    ]
    env = {**os.environ, "FEDLEDGER_DEBUG": "1"}
    debug = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert "Traceback" in debug.stderr and debug.stderr.splitlines()[-1].startswith("error:")


def test_json_errors_are_one_line(files):
    assert json  # the JSON flag prints nothing on stdout when the command fails
    done = run("ledger", "verify", "--db", str(files / "garbage.sqlite"), "--json")
    assert_one_error_line(done)
    assert done.stdout == ""
