"""``ledger register-fleet`` and ``create-task --profile``: the site's admin steps on Fabric
(the test peer running the real contract), idempotent like on the embedded ledger."""

import json
import subprocess
import sys

import pytest

from ledger.fabric import FabricLedger

from .test_profile import files, write_profile  # noqa: F401 (fixture)

FEDLEDGER = [sys.executable, "-m", "fedledger"]


def run(*args):
    return subprocess.run([*FEDLEDGER, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_fleet_and_task_on_fabric_twice(tmp_path, files, peer_server, make_client):  # noqa: F811
    data = tmp_path / "data"
    assert run("data", "sample-csv", "--out", str(data), "--devices", "1").returncode == 0
    site = tmp_path / "site"
    done = run("init", str(site), "--data", str(data / "holdout.csv"), "--label", "diagnosis",
               "--org", "Org1MSP", "--task-id", "fabric-site")  # fmt: skip
    assert done.returncode == 0, done.stderr
    for name in ("ward-1", "ward-2"):
        assert run("device", "add", str(site), name, "--class", "pi5").returncode == 0
    profile = write_profile(files, f'endpoint = "{peer_server.target}"\ntls = false')
    for expected in ("registered", "already registered"):
        done = run("ledger", "register-fleet", "--site", str(site), "--profile", str(profile),
                   "--json")  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert {d["status"] for d in json.loads(done.stdout)["devices"]} == {expected}
    for expected in ("created", "already created"):
        done = run("ledger", "create-task", "--site", str(site), "--profile", str(profile))
        assert done.returncode == 0, done.stderr
        assert f"task fabric-site: {expected}" in done.stdout
    auditor = FabricLedger(make_client())
    assert auditor.evaluate("GetDevice", "ward-2")["device_class"] == "raspberry-pi-5"
    assert not (site / "ledger.sqlite").exists()
