"""ledger.fabric: a client for a Hyperledger Fabric peer's Gateway service.

Layered like the official fabric-gateway clients: an :class:`Identity` (MSP id and X.509
certificate) and a :data:`Signer` (``digest -> signature``) make signed proposals;
:class:`FabricClient` runs the stages propose, endorse, submit and commit status (one
error type each, carrying the transaction id), evaluates queries and streams chaincode
events and reads blocks (Deliver); :func:`connect` builds a client from a connection
profile (TOML); :func:`verify_chain` checks a channel's blocks and replays the fedledger
contract's transactions on them.

Needs the ``fabric`` extra (``grpcio``, ``hyperledger-fabric-protos``).
"""

from ._backend import FabricLedger
from ._client import FabricClient
from ._commit import CommitStatus
from ._deliver import BlockStream
from ._errors import (
    ChaincodeEventsError,
    CommitError,
    CommitStatusError,
    DeliverError,
    EndorseError,
    ErrorDetail,
    EvaluateError,
    FabricError,
    SubmitError,
)
from ._events import ChaincodeEvent, ChaincodeEventStream
from ._identity import (
    Hash,
    Identity,
    Signer,
    ecdsa_signer,
    load_identity,
    load_private_key,
    load_signer,
    sha256,
)
from ._profile import (
    CHANNEL_OPTIONS,
    MAX_MESSAGE_BYTES,
    ConnectionProfile,
    connect,
    load_profile,
    open_channel,
)
from ._proposal import Proposal
from ._transaction import Transaction
from ._verify import FabricVerifyReport, block_header_hash, verify_blocks, verify_chain

__all__ = [
    "CHANNEL_OPTIONS",
    "MAX_MESSAGE_BYTES",
    "BlockStream",
    "ChaincodeEvent",
    "ChaincodeEventStream",
    "ChaincodeEventsError",
    "CommitError",
    "CommitStatus",
    "CommitStatusError",
    "ConnectionProfile",
    "DeliverError",
    "EndorseError",
    "ErrorDetail",
    "EvaluateError",
    "FabricClient",
    "FabricError",
    "FabricLedger",
    "FabricVerifyReport",
    "Hash",
    "Identity",
    "Proposal",
    "Signer",
    "SubmitError",
    "Transaction",
    "block_header_hash",
    "connect",
    "ecdsa_signer",
    "load_identity",
    "load_private_key",
    "load_profile",
    "load_signer",
    "open_channel",
    "sha256",
    "verify_blocks",
    "verify_chain",
]
