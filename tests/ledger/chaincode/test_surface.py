"""Pin ledger.chaincode's public surface: a change here is an API change, made on purpose."""

import logging
import subprocess
import sys

import ledger.chaincode


def test_all_is_sorted_and_complete():
    names = ledger.chaincode.__all__
    assert names == sorted(names, key=lambda n: (not n.isupper(), not n[0].isupper(), n))
    public = {n for n in dir(ledger.chaincode) if not n.startswith("_")}
    submodules = {n for n in public if type(getattr(ledger.chaincode, n)).__name__ == "module"}
    assert set(names) == public - submodules


def test_surface():
    assert set(ledger.chaincode.__all__) == {
        "ERROR_STATUS", "MAX_MESSAGE_BYTES", "ROLE_ATTRIBUTE",
        "ChaincodeError", "ChaincodeServer", "ChaincodeService", "FedLedgerChaincode",
        "PeerRequestError",
        "build_package", "certificate_identity", "decode_arguments", "encode_arguments",
        "package_id", "serve",
        "start_server",
    }  # fmt: skip


def test_importing_leaves_logging_alone():
    """The shim configures the root logger at import; importing ledger.chaincode must not."""
    code = (
        "import logging, threading, ledger.chaincode;"
        "root = logging.getLogger();"
        "print(root.level, len(root.handlers), threading.active_count())"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # The root logger keeps its level and (no) handlers; the shim's queue thread is stopped.
    assert done.stdout.split() == [str(logging.WARNING), "0", "1"]
