"""ledger.chaincode: the fedledger contract as Fabric chaincode-as-a-service (CCaaS).

- :func:`serve` / :func:`start_server`: the gRPC server a Fabric peer dials, running the
  contract through Hyperledger's Python shim (``fabric-chaincode-python``) with its 2.5.4
  defects worked around in one adapter (see ``ledger/chaincode/_adapter.py``);
- :func:`build_package` / :func:`package_id`: the ``connection.json``/``metadata.json``
  package ``peer lifecycle chaincode install`` takes, and the id the peer gives it;
- :func:`certificate_identity`: how a creator certificate becomes the contract's identity
  (role from the ``fedledger.role`` Fabric CA attribute, else from a role OU).
"""

from ._adapter import (
    ERROR_STATUS,
    MAX_MESSAGE_BYTES,
    ROLE_ATTRIBUTE,
    ChaincodeService,
    FedLedgerChaincode,
    certificate_identity,
    decode_arguments,
    encode_arguments,
)
from ._errors import ChaincodeError, PeerRequestError
from ._package import build_package, package_id
from ._server import ChaincodeServer, serve, start_server

__all__ = [
    "ERROR_STATUS",
    "MAX_MESSAGE_BYTES",
    "ROLE_ATTRIBUTE",
    "ChaincodeError",
    "ChaincodeServer",
    "ChaincodeService",
    "FedLedgerChaincode",
    "PeerRequestError",
    "build_package",
    "certificate_identity",
    "decode_arguments",
    "encode_arguments",
    "package_id",
    "serve",
    "start_server",
]
