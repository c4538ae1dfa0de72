"""The Fabric LedgerBackend against the test peer running the real contract."""

import pytest

from ledger import ContractError
from ledger.fabric import EndorseError, FabricLedger

H = [f"{i:064x}" for i in range(1, 10)]


def test_submit_and_evaluate_decode_contract_results(make_client, admin):
    ledger = FabricLedger(make_client(admin))
    record = ledger.submit("RegisterDevice", "dev-a", "Org1MSP", "pi4", H[0])
    assert record["device"] == "dev-a" and record["status"] == "active"
    assert ledger.evaluate("GetDevice", "dev-a")["key_fingerprint"] == H[0]


def test_contract_refusals_become_contract_errors(make_client, admin, gateway_member):
    ledger = FabricLedger(make_client(admin))
    ledger.submit("RegisterDevice", "dev-b", "Org1MSP", "pi4", H[0])
    with pytest.raises(ContractError) as info:
        ledger.submit("RegisterDevice", "dev-b", "Org1MSP", "pi4", H[0])
    assert info.value.code == "conflict"
    with pytest.raises(ContractError) as info:
        ledger.evaluate("GetDevice", "nobody")
    assert info.value.code == "not_found"
    with pytest.raises(ContractError) as info:
        FabricLedger(make_client(gateway_member)).submit(
            "CreateTask", "t", "Org1MSP", "gateway1", H[1], "fedavg", {}, H[2]
        )
    assert info.value.code == "forbidden"


def test_other_failures_stay_fabric_errors(make_client, admin):
    ledger = FabricLedger(make_client(admin, channel_name="nochannel"))
    with pytest.raises(EndorseError):
        ledger.submit("RegisterDevice", "dev-c", "Org1MSP", "pi4", H[0])


def test_cli_history_and_device_through_a_profile(tmp_path, peer_server, admin, make_client):
    import json
    import subprocess
    import sys

    ledger = FabricLedger(make_client(admin))
    ledger.submit("RegisterDevice", "dev-p", "Org1MSP", "pi4", H[0])
    (tmp_path / "cert.pem").write_bytes(admin.cert_pem)
    (tmp_path / "key.pem").write_bytes(admin.key_pem)
    (tmp_path / "fabric.toml").write_text(
        f'[peer]\nendpoint = "{peer_server.target}"\ntls = false\n'
        '[identity]\nmsp_id = "Org1MSP"\ncert = "cert.pem"\nkey = "key.pem"\n'
        '[chaincode]\nchannel = "mychannel"\nname = "fedledger"\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "fedledger", "ledger", "device", "dev-p", "--profile",
         str(tmp_path / "fabric.toml"), "--json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    assert body["device"]["device"] == "dev-p" and body["contributions"] == []
