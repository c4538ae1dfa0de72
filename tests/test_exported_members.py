"""Pin each package's public surface: a change here is an API change, made on purpose."""

import subprocess
import sys

import pytest

import edge_agent
import fedcore
import gateway
import ledger


@pytest.mark.parametrize("module", [fedcore, edge_agent, gateway, ledger])
def test_all_is_sorted_and_complete(module):
    names = module.__all__
    assert names == sorted(names, key=lambda n: (not n.isupper(), not n[0].isupper(), n))
    public = {n for n in dir(module) if not n.startswith("_")}
    submodules = {n for n in public if type(getattr(module, n)).__name__ == "module"}
    assert set(names) == public - submodules


def test_surfaces():
    assert set(edge_agent.__all__) == {
        "BACKENDS", "AgentConfig", "AgentError", "AgentMetrics", "AgentSection", "AgentState",
        "EdgeAgent", "InferenceError", "Predictor", "load_agent_config", "open_agent", "run_agent",
    }  # fmt: skip
    assert set(ledger.__all__) == {
        "CODES", "DISCREPANCY_KINDS", "MIN_HASH_PREFIX", "BlockInfo", "ChainError", "ContractError",
        "Discrepancy",
        "EmbeddedLedger", "FedLedgerContract", "GatewayStore", "Identity", "LedgerBackend",
        "LedgerError", "MVCCConflictError", "MemoryContext", "MemoryWorldState", "StoreCheck",
        "TxContext", "VerifyReport", "leaf_hash", "merkle_root", "privacy_report",
    }  # fmt: skip
    assert {
        "Gateway", "GatewayMetrics", "UpdateValidator", "FedAvgAccumulator", "fedavg", "REJECT_REASONS",
    } <= set(gateway.__all__)  # fmt: skip
    assert {"encode_update", "decode_envelope", "ModelSpec", "MqttTransport"} <= set(
        fedcore.__all__
    )
    # What a site is built from without private helpers: CSV tables read by column name,
    # labels checked against the task's classes, the initial model and its hash.
    assert {
        "ColumnsSection", "CsvTable", "check_labels", "init_params", "model_hash", "read_csv_table",
    } <= set(fedcore.__all__)  # fmt: skip


def test_edge_agent_imports_no_server_code():
    code = (
        "import sys, edge_agent, fedledger.cli;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('gateway', 'ledger', 'sklearn', 'matplotlib'));"
        "print(','.join(bad))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == ""


def test_fedledger_exports_what_sites_are_built_from_lazily():
    import fedledger

    assert set(fedledger.__all__) == set(fedledger._LAZY) | {"__version__"}
    code = (
        "import sys, fedledger;"
        "assert 'fedledger._datasets' not in sys.modules;"
        "fedledger.load_dataset;"
        "assert 'fedledger._datasets' in sys.modules;"
        "assert fedledger.provision.__module__ == 'fedledger._provision'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("module", ["fedcore.pki", "fedcore.mosquitto"])
def test_the_ca_and_the_broker_are_public_parts(module):
    import importlib

    mod = importlib.import_module(module)
    for name in mod.__all__:
        assert getattr(mod, name) is not None, name
    assert mod.__all__ == sorted(
        mod.__all__, key=lambda n: (not n.isupper(), not n[0].isupper(), n)
    )
