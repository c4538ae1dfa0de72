"""Verify a Fabric channel's chain and the fedledger contract's history on it.

What the peer's Deliver service returns is checked from block 0 on, stopping at the first
problem, which names the block (and the transaction):

- the chain: block numbers consecutive from 0; each header's ``previous_hash`` is the hash
  of the previous header (SHA-256 of the ASN.1 DER ``SEQUENCE {number INTEGER,
  previous_hash OCTET STRING, data_hash OCTET STRING}``, Fabric's ``BlockHeaderHash``);
  ``data_hash`` is SHA-256 of the concatenated transaction envelopes (Fabric 2.x); the
  ``TRANSACTIONS_FILTER`` metadata has one validation code per transaction;
- every transaction flagged ``VALID`` that calls the fedledger chaincode: an endorser
  transaction of this channel, whose id is SHA-256(nonce + creator), unique, signed by its
  creator (the envelope signature over the payload bytes), with one action whose
  ``proposal_hash`` matches its header and proposal, whose endorsements verify against the
  endorsers' certificates (and, given ``msp_roots``, those certificates and the creator's are
  issued by a root CA of their MSP), whose reads saw the versions (block, transaction) the
  rebuilt state holds (Fabric's MVCC check, redone) and whose writes delete nothing;
- with ``replay`` (the default), each such transaction is re-executed through the contract
  (function and arguments from the proposal, the creator's identity as the chaincode derives
  it, the proposal's time) against the state rebuilt so far: a transaction the contract
  refuses, or whose read keys, writes, event or result differ from the block's, is named;
- the rebuilt world state (the writes of valid transactions only; an invalid transaction's
  writes never count) is then checked against the contract's invariants, whether or not it
  was replayed: each task's rounds committed in order from 0, each round on the previous
  round's model, the task's cursor consistent with its rounds; each batch's Merkle root over
  its update digests; each committed round's ``updates_root`` over its contributors'
  accepted updates, which match its ``accepted`` count; every contribution from a device
  registered in an earlier block and not revoked before it.

- given ``orderer_msps``, every block (but the genesis block) carries at least one orderer
  signature (``SIGNATURES`` metadata) that verifies: by a member of one of those MSPs (issued
  by one of its roots, given ``msp_roots``), over the metadata value, the signature header and
  the block header's DER bytes, as Fabric's ``BlockSignatureVerifier`` computes it.

Not checked: BFT signatures that name their signer by consenter id (``identifier_header``;
they need the channel config's consenter list), the peer's ``COMMIT_HASH``,
range-query (phantom read) information, private data, certificate chains through
intermediate CAs, and which transactions the peer flagged invalid, beyond the consequences
a wrongly flagged one has on later transactions.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from fabric_protos.common import common_pb2
from fabric_protos.ledger.rwset import rwset_pb2
from fabric_protos.ledger.rwset.kvrwset import kv_rwset_pb2
from fabric_protos.msp import identities_pb2
from fabric_protos.peer import (
    chaincode_event_pb2,
    chaincode_pb2,
    proposal_pb2,
    proposal_response_pb2,
    transaction_pb2,
)
from google.protobuf.message import DecodeError

from fedcore import canonical_json

from .._backend import VerifyReport
from .._context import Identity, MemoryWorldState
from .._contract import ContractError, FedLedgerContract
from .._errors import ChainError, LedgerError
from .._merkle import leaf_hash, merkle_root
from .._store_check import Discrepancy, GatewayStore, StoreCheck
from ._client import FabricClient

log = logging.getLogger(__name__)

VALID = transaction_pb2.TxValidationCode.Value("VALID")
_FILTER = common_pb2.BlockMetadataIndex.Value("TRANSACTIONS_FILTER")
_SIGNATURES = common_pb2.BlockMetadataIndex.Value("SIGNATURES")
_ENDORSER_TRANSACTION = common_pb2.HeaderType.Value("ENDORSER_TRANSACTION")
_TRANSACTIONS = FedLedgerContract.transactions()

#: ``(blocks done, blocks in all)``, called after each block.
Progress = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class FabricVerifyReport(VerifyReport):
    """A :class:`~ledger.VerifyReport` of a Fabric chain.

    ``blocks`` and ``records`` count blocks and transactions (of any chaincode, config
    included); ``transactions`` counts the fedledger chaincode's, ``invalid`` those of them
    flagged invalid (their writes are ignored), ``first_bad_tx`` names the transaction at
    fault, if it was one.
    """

    transactions: int = 0
    invalid: int = 0
    endorsements: int = 0
    first_bad_tx: str | None = None
    channel: str = ""
    chaincode: str = ""

    def to_dict(self) -> dict[str, Any]:
        out = VerifyReport.to_dict(self)
        out.update(
            backend="fabric",
            channel=self.channel,
            chaincode=self.chaincode,
            transactions=self.transactions,
            invalid=self.invalid,
            endorsements=self.endorsements,
            first_bad_tx=self.first_bad_tx,
        )
        return out


class _TxError(ChainError):
    def __init__(self, height: int, tx_id: str | None, problem: str):
        self.tx_id = tx_id
        super().__init__(height, problem if tx_id is None else f"transaction {tx_id}: {problem}")


# ---------------------------------------------------------------------------- block hashes


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _der(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + _der_length(len(content)) + content


def block_header_bytes(header: common_pb2.BlockHeader) -> bytes:
    """Fabric's ``protoutil.BlockHeaderBytes``: ASN.1 DER of (number, previous, data hash)."""
    number = header.number
    content = number.to_bytes(number.bit_length() // 8 + 1, "big")  # a leading 0 bit: >= 0
    return _der(
        0x30,
        _der(0x02, content) + _der(0x04, header.previous_hash) + _der(0x04, header.data_hash),
    )


def block_header_hash(header: common_pb2.BlockHeader) -> bytes:
    return hashlib.sha256(block_header_bytes(header)).digest()


def block_data_hash(data: common_pb2.BlockData) -> bytes:
    """Fabric 2.x ``protoutil.ComputeBlockDataHash``: SHA-256 of the concatenated envelopes."""
    return hashlib.sha256(b"".join(data.data)).digest()


# ---------------------------------------------------------------------------- transactions


@dataclass
class _Tx:
    """What a fedledger endorser transaction carries, decoded."""

    tx_id: str
    timestamp: float
    msp_id: str
    certificate: bytes
    raw_args: list[bytes]
    reads: dict[str, tuple[int, int] | None] = field(default_factory=dict)
    writes: dict[str, bytes] = field(default_factory=dict)
    event: tuple[str, bytes] | None = None
    result: bytes = b""
    endorsements: int = 0


def _load_certificate(raw: bytes) -> x509.Certificate:
    if raw.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_certificate(raw)
    return x509.load_der_x509_certificate(raw)


class _Checker:
    def __init__(
        self,
        *,
        channel: str,
        chaincode: str,
        replay: bool,
        msp_roots: Mapping[str, Sequence[x509.Certificate]] | None,
        orderer_msps: Sequence[str] = (),
        store_check: StoreCheck | None = None,
    ):
        self.channel = channel
        self.store_check = store_check
        self.orderer_msps = frozenset(orderer_msps)
        self.chaincode = chaincode
        self.replay = replay
        self.msp_roots = msp_roots
        self.world = MemoryWorldState()
        #: Fabric's version of each key: (block, transaction index) of its last valid write.
        self.versions: dict[str, tuple[int, int]] = {}
        #: The block of the first and the last valid write of each key.
        self.first_written: dict[str, int] = {}
        self.last_written: dict[str, tuple[int, str]] = {}
        self.tx_blocks: dict[str, int] = {}
        self.seen_tx_ids: set[str] = set()
        self.transactions = self.invalid = self.endorsements = 0
        self._certificates: dict[bytes, x509.Certificate] = {}

    # ------------------------------------------------------------------ blocks

    def block(self, block: common_pb2.Block, expected: int, previous: bytes | None) -> bytes:
        header = block.header
        if header.number != expected:
            raise ChainError(expected, f"missing (the peer sent block {header.number} next)")
        if previous is not None and header.previous_hash != previous:
            raise ChainError(expected, "previous-hash link is broken")
        if block_data_hash(block.data) != header.data_hash:
            raise ChainError(expected, "data hash does not match the transactions")
        metadata = block.metadata.metadata
        if self.orderer_msps and expected > 0:
            self.orderer_signed(expected, header, metadata)
        codes = metadata[_FILTER] if len(metadata) > _FILTER else b""
        if len(codes) != len(block.data.data):
            raise ChainError(
                expected,
                f"the transactions filter has {len(codes)} codes"
                f" for {len(block.data.data)} transactions",
            )
        for index, (raw, code) in enumerate(zip(block.data.data, codes, strict=True)):
            self.envelope(expected, index, raw, code)
        return block_header_hash(header)

    def orderer_signed(self, height: int, header: common_pb2.BlockHeader, metadata) -> None:
        """Raise unless one signature in the block's SIGNATURES metadata is an orderer's."""
        try:
            signatures = common_pb2.Metadata.FromString(
                metadata[_SIGNATURES] if len(metadata) > _SIGNATURES else b""
            )
        except DecodeError:
            raise ChainError(height, "the SIGNATURES metadata is not readable") from None
        header_bytes = block_header_bytes(header)
        for entry in signatures.signatures:
            if not entry.signature_header:
                continue  # BFT: signer named by consenter id (not checked; see module doc)
            try:
                creator = common_pb2.SignatureHeader.FromString(entry.signature_header).creator
                msp_id = identities_pb2.SerializedIdentity.FromString(creator).mspid
            except DecodeError:
                continue
            if msp_id not in self.orderer_msps:
                continue
            signed = signatures.value + entry.signature_header + header_bytes
            try:
                self.check_signature(creator, entry.signature, signed, "orderer")
            except (ValueError, _Untrusted):
                continue
            return
        raise ChainError(height, "no valid orderer signature on the block")

    def envelope(self, height: int, index: int, raw: bytes, code: int) -> None:
        try:
            envelope = common_pb2.Envelope.FromString(raw)
            payload = common_pb2.Payload.FromString(envelope.payload)
            channel_header = common_pb2.ChannelHeader.FromString(payload.header.channel_header)
        except DecodeError:
            if code == VALID:
                raise ChainError(height, f"transaction {index} is not an envelope") from None
            return
        if channel_header.type != _ENDORSER_TRANSACTION:
            return  # configuration: Fabric's own business
        tx_id = channel_header.tx_id or None
        try:
            tx = self.decode(envelope, payload, channel_header)
        except _NotOurs:
            return
        except DecodeError as exc:
            if code != VALID:
                return
            raise _TxError(height, tx_id, f"malformed: {exc}") from None
        except ValueError as exc:
            if code != VALID:
                return
            raise _TxError(height, tx_id, str(exc)) from None
        self.transactions += 1
        if code != VALID:
            self.invalid += 1
            return
        self.valid(height, index, tx)

    def decode(
        self,
        envelope: common_pb2.Envelope,
        payload: common_pb2.Payload,
        channel_header: common_pb2.ChannelHeader,
    ) -> _Tx:
        extension = proposal_pb2.ChaincodeHeaderExtension.FromString(channel_header.extension)
        transaction = transaction_pb2.Transaction.FromString(payload.data)
        if len(transaction.actions) != 1:
            if extension.chaincode_id.name != self.chaincode:
                raise _NotOurs
            raise ValueError(f"{len(transaction.actions)} actions, a fedledger call has one")
        action = transaction.actions[0]
        action_payload = transaction_pb2.ChaincodeActionPayload.FromString(action.payload)
        proposal_payload = proposal_pb2.ChaincodeProposalPayload.FromString(
            action_payload.chaincode_proposal_payload
        )
        spec = chaincode_pb2.ChaincodeInvocationSpec.FromString(proposal_payload.input)
        if spec.chaincode_spec.chaincode_id.name != self.chaincode:
            raise _NotOurs
        if extension.chaincode_id.name != self.chaincode:
            raise ValueError("the header names another chaincode than the invocation")
        signature_header = common_pb2.SignatureHeader.FromString(payload.header.signature_header)
        creator = identities_pb2.SerializedIdentity.FromString(signature_header.creator)
        response_payload = proposal_response_pb2.ProposalResponsePayload.FromString(
            action_payload.action.proposal_response_payload
        )
        chaincode_action = proposal_pb2.ChaincodeAction.FromString(response_payload.extension)
        stamp = channel_header.timestamp
        tx = _Tx(
            tx_id=channel_header.tx_id,
            timestamp=stamp.seconds + stamp.nanos / 1_000_000_000,
            msp_id=creator.mspid,
            certificate=creator.id_bytes,
            raw_args=list(spec.chaincode_spec.input.args),
            result=chaincode_action.response.payload,
        )
        # Structure and signatures, as a peer's validation checks them.
        if channel_header.channel_id != self.channel:
            raise ValueError(f"belongs to channel {channel_header.channel_id!r}")
        if (
            tx.tx_id
            != hashlib.sha256(signature_header.nonce + signature_header.creator).hexdigest()
        ):
            raise ValueError("the transaction id is not SHA-256(nonce + creator)")
        if action.header != payload.header.signature_header:
            raise ValueError("the action's signature header differs from the envelope's")
        self.check_signature(
            signature_header.creator, envelope.signature, envelope.payload, "the creator"
        )
        proposal_hash = hashlib.sha256(
            payload.header.channel_header
            + payload.header.signature_header
            + action_payload.chaincode_proposal_payload
        ).digest()
        if response_payload.proposal_hash != proposal_hash:
            raise ValueError("the endorsed proposal hash does not match the proposal")
        endorsements = action_payload.action.endorsements
        if not endorsements:
            raise ValueError("no endorsement")
        signed = action_payload.action.proposal_response_payload
        for i, endorsement in enumerate(endorsements):
            self.check_signature(
                endorsement.endorser,
                endorsement.signature,
                signed + endorsement.endorser,
                f"endorsement {i}",
            )
        tx.endorsements = len(endorsements)
        if chaincode_action.chaincode_id.name not in ("", self.chaincode):
            raise ValueError("the endorsed action names another chaincode")
        if chaincode_action.response.status >= 400:
            raise ValueError(f"the chaincode answered {chaincode_action.response.status}")
        results = rwset_pb2.TxReadWriteSet.FromString(chaincode_action.results)
        for ns in results.ns_rwset:
            if ns.namespace != self.chaincode:
                continue  # e.g. the _lifecycle definition read every invocation records
            kv = kv_rwset_pb2.KVRWSet.FromString(ns.rwset)
            for read in kv.reads:
                tx.reads[read.key] = (
                    (read.version.block_num, read.version.tx_num)
                    if read.HasField("version")
                    else None
                )
            for write in kv.writes:
                if write.is_delete:
                    raise ValueError(f"deletes {write.key!r}: the contract never deletes")
                tx.writes[write.key] = write.value
        event = chaincode_event_pb2.ChaincodeEvent.FromString(chaincode_action.events)
        if event.event_name:  # a peer may record an empty event for a transaction without one
            if event.chaincode_id != self.chaincode or event.tx_id != tx.tx_id:
                raise ValueError("the event names another chaincode or transaction")
            tx.event = (event.event_name, event.payload)
        return tx

    def check_signature(self, creator: bytes, signature: bytes, data: bytes, who: str) -> None:
        """Raise ValueError unless ``creator``'s certificate key signed ``data`` (ECDSA)."""
        try:
            identity = identities_pb2.SerializedIdentity.FromString(creator)
            cert = self._certificates.get(identity.id_bytes)
            if cert is None:
                cert = _load_certificate(identity.id_bytes)
                if not self._issued_by_root(identity.mspid, cert):
                    raise _Untrusted(
                        f"{who}'s certificate is not issued by a root CA of {identity.mspid}"
                    )
                self._certificates[identity.id_bytes] = cert
            key = cert.public_key()
            if not isinstance(key, ec.EllipticCurvePublicKey):
                raise TypeError("not an EC key")
            key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        except _Untrusted:
            raise
        except (DecodeError, InvalidSignature, ValueError, TypeError):
            raise ValueError(f"{who}'s signature does not verify") from None

    def _issued_by_root(self, msp_id: str, cert: x509.Certificate) -> bool:
        if self.msp_roots is None:
            return True
        for root in self.msp_roots.get(msp_id, ()):
            try:
                cert.verify_directly_issued_by(root)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return True
        return False

    # ------------------------------------------------------------------ state

    def valid(self, height: int, index: int, tx: _Tx) -> None:
        if tx.tx_id in self.seen_tx_ids:
            raise _TxError(height, tx.tx_id, "a second valid transaction with this id")
        self.seen_tx_ids.add(tx.tx_id)
        self.tx_blocks[tx.tx_id] = height
        self.endorsements += tx.endorsements
        for key, seen in tx.reads.items():
            if self.versions.get(key) != seen:
                raise _TxError(
                    height,
                    tx.tx_id,
                    f"read {key!r} at version {seen}, but the chain had written it at"
                    f" {self.versions.get(key)} (an MVCC conflict flagged VALID)",
                )
        if self.replay:
            ctx = self._replayed(height, tx)
        else:
            ctx = self.world.context(tx_id=tx.tx_id, timestamp=tx.timestamp, creator=_NOBODY)
            for key, value in tx.writes.items():
                try:
                    ctx.put_state(key, value)
                except TypeError as exc:
                    raise _TxError(height, tx.tx_id, f"invalid write: {exc}") from None
        self.world.commit(ctx)
        for key in tx.writes:
            self.versions[key] = (height, index)
            self.first_written.setdefault(key, height)
            self.last_written[key] = (height, tx.tx_id)
        if self.store_check is not None:
            self.store_check.writes(height, tx.writes.items())

    def _replayed(self, height: int, tx: _Tx) -> Any:
        # Imported here: the chaincode package loads the shim, needed only to replay.
        from ..chaincode import certificate_identity, decode_arguments

        try:
            fn, args = decode_arguments(tx.raw_args)
            entry = _TRANSACTIONS.get(fn)
            if entry is None or entry[1] != "submit":
                raise ContractError("invalid_argument", f"{fn!r} is not a submit transaction")
            creator = certificate_identity(tx.msp_id, tx.certificate)
            ctx = self.world.context(tx_id=tx.tx_id, timestamp=tx.timestamp, creator=creator)
            result = entry[0](ctx, *args)
        except ContractError as exc:
            raise _TxError(height, tx.tx_id, f"breaks the contract: {exc}") from None
        except (LedgerError, TypeError, ValueError) as exc:
            raise _TxError(height, tx.tx_id, f"cannot be replayed: {exc}") from None
        if set(ctx.read_set) != set(tx.reads):
            raise _TxError(height, tx.tx_id, "read set differs from what the contract reads")
        if ctx.write_set != tx.writes:
            raise _TxError(height, tx.tx_id, "write set differs from what the contract writes")
        if ctx.event != tx.event:
            raise _TxError(height, tx.tx_id, "event differs from what the contract emits")
        if canonical_json(result) != tx.result:
            raise _TxError(height, tx.tx_id, "result differs from what the contract returns")
        return ctx

    def state(self) -> None:
        """The contract's invariants over the rebuilt world state.

        Every key is checked; the problem reported is the one whose key was written in the
        earliest block, so it names the first transaction that left the state broken.
        """
        records: dict[str, Any] = {}
        problems: list[tuple[int, str, str]] = []
        for key in self.world:
            try:
                records[key] = json.loads(self.world[key])
            except ValueError:
                problems.append((self.last_written[key][0], key, "not a JSON record"))
        for key, value in records.items():
            kind = key.split("/", 1)[0]
            try:
                problem = _INVARIANTS.get(kind, _no_invariant)(key, value, records, self)
            except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
                problem = f"malformed record ({type(exc).__name__}: {exc})"
            if problem:
                problems.append((self.last_written[key][0], key, problem))
        if problems:
            _, key, problem = min(problems)
            height, tx_id = self.last_written[key]
            raise _TxError(height, tx_id, f"{key}: {problem}")


class _NotOurs(Exception):
    """A transaction of another chaincode."""


class _Untrusted(ValueError):
    """A certificate that no root CA of its MSP issued."""


#: The creator of a transaction applied without replay: nothing reads it.
_NOBODY = Identity("", "", "")


# ---------------------------------------------------------------------------- invariants


def _no_invariant(key: str, value: Any, records: dict[str, Any], checker: _Checker) -> None:
    return None


def _task_invariant(key: str, task: Any, records: dict[str, Any], checker: _Checker) -> str | None:
    task_id = task["task"]
    model = task["initial_model"]
    committed = task["next_round"]
    for r in range(committed):
        rnd = records.get(f"round/{task_id}/{r:08d}")
        if rnd is None or rnd["status"] != "committed":
            return f"round {r} is counted as committed but is not"
        if rnd["base_model"] != model:
            return f"round {r} did not start from the previous round's model"
        model = rnd["global_model"]
    if task["model"] != model:
        return "the task's model is not its last committed round's"
    beyond = f"round/{task_id}/{committed:08d}"
    if task["open_round"] is None:
        if beyond in records:
            return f"round {committed} exists but the task has no open round"
    elif task["open_round"] != committed or records.get(beyond, {}).get("status") != "open":
        return f"open round {task['open_round']} is not the next one, or not open"
    later = f"round/{task_id}/{committed + 1:08d}"
    if later in records:
        return f"round {committed + 1} exists before round {committed} is committed"
    return None


def _round_invariant(key: str, rnd: Any, records: dict[str, Any], checker: _Checker) -> str | None:
    task = records.get(f"task/{rnd['task']}")
    if task is None:
        return "round of an unknown task"
    if rnd["status"] != "committed":
        return None
    contributors = rnd["contributors"]
    if len(contributors) != rnd["accepted"] or contributors != sorted(contributors):
        return "contributors do not match the accepted updates"
    digests = []
    for device in contributors:
        contrib = records.get(f"contrib/{device}/{rnd['task']}/{rnd['round']:08d}")
        if contrib is None:
            return f"contributor {device} has no accepted update"
        digests.append(bytes.fromhex(contrib["digest"]))
    if merkle_root(leaf_hash(d) for d in digests).hex() != rnd["updates_root"]:
        return "updates_root is not the Merkle root of the contributors' updates"
    return None


def _batch_invariant(
    key: str, batch: Any, records: dict[str, Any], checker: _Checker
) -> str | None:
    digests = [bytes.fromhex(r["digest"]) for r in batch["records"]]
    if merkle_root(leaf_hash(d) for d in digests).hex() != batch["merkle_root"]:
        return "merkle_root is not the Merkle root of the batch's update digests"
    if sum(1 for r in batch["records"] if r["accepted"]) != batch["accepted"]:
        return "the accepted count does not match the records"
    return None


def _contrib_invariant(
    key: str, contrib: Any, records: dict[str, Any], checker: _Checker
) -> str | None:
    device_key = f"device/{contrib['device']}"
    device = records.get(device_key)
    if device is None:
        return f"device {contrib['device']} is not registered"
    contributed_in = checker.first_written[key]
    if checker.first_written[device_key] >= contributed_in:
        return f"device {contrib['device']} was registered after its contribution"
    revoked_in = checker.tx_blocks.get(device["revoked_tx"] or "")
    if revoked_in is not None and revoked_in < contributed_in:
        return f"device {contrib['device']} was revoked before its contribution"
    batch = records.get(f"updates/{contrib['task']}/{contrib['round']:08d}/{contrib['batch']:04d}")
    if batch is None or batch["records"][contrib["index"]]["digest"] != contrib["digest"]:
        return "the contribution is not in its batch"
    return None


_INVARIANTS: dict[str, Callable[[str, Any, dict[str, Any], _Checker], str | None]] = {
    "task": _task_invariant,
    "round": _round_invariant,
    "updates": _batch_invariant,
    "contrib": _contrib_invariant,
}


# ---------------------------------------------------------------------------- entry points


def verify_blocks(
    blocks: Iterable[common_pb2.Block],
    *,
    channel: str,
    chaincode: str,
    replay: bool = True,
    msp_roots: Mapping[str, Sequence[x509.Certificate]] | None = None,
    orderer_msps: Sequence[str] = (),
    total: int = 0,
    progress: Progress | None = None,
    store: GatewayStore | None = None,
) -> FabricVerifyReport:
    """Check ``blocks`` (the whole chain, from block 0, in order); see the module docstring.

    ``msp_roots`` maps MSP ids to their root CA certificates; given, every creator and
    endorser certificate must be issued directly by one of its MSP's roots. ``orderer_msps``
    names the ordering service's MSPs; given, every block must carry an orderer signature.
    ``store`` (a gateway's ``UpdateStore``) is cross-checked with the chain both ways for the
    tasks it holds (a channel may carry other gateways' tasks; see ``ledger._store_check``);
    what disagrees is listed in the report's ``discrepancies``.
    """
    check = None if store is None else StoreCheck(store, all_tasks=False)
    checker = _Checker(
        channel=channel,
        chaincode=chaincode,
        replay=replay,
        msp_roots=msp_roots,
        orderer_msps=orderer_msps,
        store_check=check,
    )
    count = records = 0
    previous: bytes | None = None

    def report(
        ok: bool, error: ChainError | None = None, found: Sequence[Discrepancy] = ()
    ) -> FabricVerifyReport:
        height = problem = None
        if error is not None:
            height, problem = error.height, error.problem
        elif found:
            height, problem = found[0].height, found[0].describe()
        return FabricVerifyReport(
            ok=ok,
            blocks=count,
            records=records,
            first_bad_height=height,
            problem=problem,
            replayed=replay,
            checked_models=0 if check is None else check.checked_models,
            checked_updates=0 if check is None else check.checked_updates,
            checked_aggregates=0 if check is None else check.checked_aggregates,
            discrepancies=tuple(found),
            transactions=checker.transactions,
            invalid=checker.invalid,
            endorsements=checker.endorsements,
            first_bad_tx=getattr(error, "tx_id", None),
            channel=channel,
            chaincode=chaincode,
        )

    try:
        for block in blocks:
            previous = checker.block(block, count, previous)
            count += 1
            records += len(block.data.data)
            if progress is not None:
                progress(count, max(total, count))
        if count == 0:
            return FabricVerifyReport(False, 0, 0, 0, "the peer sent no blocks")
        if count < total:
            raise ChainError(count, f"missing: the peer sent {count} of {total} blocks")
        checker.state()
    except ChainError as exc:
        log.info("chain inconsistent at block %d: %s", exc.height, exc.problem)
        return report(False, exc)
    found = () if check is None else check.finish()
    return report(not found, found=found)


def verify_chain(
    client: FabricClient,
    *,
    replay: bool = True,
    msp_roots: Mapping[str, Sequence[x509.Certificate]] | None = None,
    orderer_msps: Sequence[str] = (),
    progress: Progress | None = None,
    timeout: float | None = None,
    store: GatewayStore | None = None,
) -> FabricVerifyReport:
    """Fetch the client's channel from block 0 to the newest and verify it.

    The height is read first, so the chain verified is the one at that moment (and
    ``progress`` knows the total). Raises :class:`~ledger.fabric.DeliverError` when the peer
    cannot be read; a chain that does not verify is a report with ``ok`` false.
    """
    height = client.height(timeout=timeout)
    with client.blocks(0, height - 1, timeout=timeout) as stream:
        return verify_blocks(
            stream,
            channel=client.channel_name,
            chaincode=client.chaincode,
            replay=replay,
            msp_roots=msp_roots,
            orderer_msps=orderer_msps,
            total=height,
            progress=progress,
            store=store,
        )
