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
