"""The Fabric Gateway client: one identity, one channel, one chaincode.

Like the official fabric-gateway clients, a submit is four explicit stages, each with its
own error type carrying the transaction id::

    proposal = client.propose("RegisterDevice", "dev-1", ...)   # build and sign
    transaction = client.endorse(proposal)                      # EndorseError
    client.submit_transaction(transaction)                      # SubmitError
    client.commit_status(transaction.transaction_id)            # CommitStatusError, CommitError
    transaction.result                                          # the contract's answer

:meth:`FabricClient.submit` runs them in order; :meth:`FabricClient.evaluate` is a query
(one peer, nothing ordered). Each argument is sent as canonical JSON text (UTF-8), which
the fedledger chaincode adapter decodes, so strings, numbers, lists and objects all arrive
with their types (and no binary argument trips the chaincode shim's UTF-8 decoding).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import grpc
from fabric_protos.gateway import gateway_pb2_grpc
from fabric_protos.peer import events_pb2_grpc

from fedcore import canonical_json

from ._commit import CommitStatus, commit_status, commit_status_request
from ._deliver import DEFAULT_DELIVER_TIMEOUT, BlockStream, seek_envelope
from ._errors import (
    CommitStatusError,
    DeliverError,
    EndorseError,
    EvaluateError,
    SubmitError,
    from_rpc_error,
)
from ._events import ChaincodeEventStream, chaincode_events_request
from ._identity import Hash, Identity, Signer, sha256
from ._proposal import Proposal, new_proposal
from ._transaction import Transaction, endorsed_transaction

log = logging.getLogger(__name__)

#: Seconds; the official clients' suggested defaults.
DEFAULT_EVALUATE_TIMEOUT = 5.0
DEFAULT_ENDORSE_TIMEOUT = 15.0
DEFAULT_SUBMIT_TIMEOUT = 5.0
DEFAULT_COMMIT_STATUS_TIMEOUT = 60.0


def encode_argument(value: Any) -> bytes:
    """A transaction argument as canonical JSON text, UTF-8."""
    if isinstance(value, bytes | bytearray | memoryview):
        raise TypeError(
            "transaction arguments are JSON values; encode binary data (hex, base64) first"
        )
    try:
        return canonical_json(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"transaction argument is not JSON-serializable: {exc}") from None


class FabricClient:
    """Evaluate and submit transactions of ``chaincode`` on ``channel_name``.

    ``channel`` is a gRPC channel to a peer's Gateway service (see
    :func:`~ledger.fabric.connect`); it stays the caller's to close unless the client was
    made by ``connect``. Timeouts are seconds per call; each method also takes ``timeout``.
    """

    def __init__(
        self,
        channel: grpc.Channel,
        identity: Identity,
        signer: Signer,
        channel_name: str,
        chaincode: str,
        *,
        hash: Hash = sha256,
        evaluate_timeout: float = DEFAULT_EVALUATE_TIMEOUT,
        endorse_timeout: float = DEFAULT_ENDORSE_TIMEOUT,
        submit_timeout: float = DEFAULT_SUBMIT_TIMEOUT,
        commit_status_timeout: float = DEFAULT_COMMIT_STATUS_TIMEOUT,
        deliver_timeout: float = DEFAULT_DELIVER_TIMEOUT,
    ):
        if not isinstance(identity, Identity):
            raise TypeError("identity must be a ledger.fabric.Identity")
        if not callable(signer) or not callable(hash):
            raise TypeError("signer and hash must be callables")
        for name, value in (("channel_name", channel_name), ("chaincode", chaincode)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string")
        self._channel = channel
        self._stub = gateway_pb2_grpc.GatewayStub(channel)
        self._deliver = events_pb2_grpc.DeliverStub(channel)
        self._identity = identity
        self._signer = signer
        self._hash = hash
        self._channel_name = channel_name
        self._chaincode = chaincode
        self._timeouts = {
            "evaluate": evaluate_timeout,
            "endorse": endorse_timeout,
            "submit": submit_timeout,
            "commit_status": commit_status_timeout,
            "deliver": deliver_timeout,
        }
        self._owns_channel = False

    @property
    def identity(self) -> Identity:
        return self._identity

    @property
    def channel_name(self) -> str:
        return self._channel_name

    @property
    def chaincode(self) -> str:
        return self._chaincode

    # ------------------------------------------------------------------ shortcuts

    def evaluate(
        self,
        function: str,
        *args: Any,
        transient: Mapping[str, bytes] | None = None,
        target_organizations: Sequence[str] = (),
        timeout: float | None = None,
    ) -> bytes:
        """Run a query on one peer and return the contract's result; nothing is ordered."""
        proposal = self.propose(
            function, *args, transient=transient, endorsing_organizations=target_organizations
        )
        try:
            response = self._stub.Evaluate(
                proposal.evaluate_request(), timeout=self._timeout("evaluate", timeout)
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(EvaluateError, exc, proposal.transaction_id) from None
        result = response.result
        if result.status >= 400:  # a gateway reports this as a gRPC error, but be sure
            raise EvaluateError(
                f"chaincode response {result.status}, {result.message}",
                transaction_id=proposal.transaction_id,
            )
        return result.payload

    def submit(
        self,
        function: str,
        *args: Any,
        transient: Mapping[str, bytes] | None = None,
        endorsing_organizations: Sequence[str] = (),
    ) -> bytes:
        """Propose, endorse, submit, wait for a valid commit; return the contract's result."""
        proposal = self.propose(
            function,
            *args,
            transient=transient,
            endorsing_organizations=endorsing_organizations,
        )
        transaction = self.endorse(proposal)
        self.submit_transaction(transaction)
        self.commit_status(transaction.transaction_id)
        return transaction.result

    # ------------------------------------------------------------------ stages

    def propose(
        self,
        function: str,
        *args: Any,
        transient: Mapping[str, bytes] | None = None,
        endorsing_organizations: Sequence[str] = (),
    ) -> Proposal:
        """Build and sign a proposal to run ``function(*args)``."""
        return new_proposal(
            self._identity,
            self._signer,
            channel_name=self._channel_name,
            chaincode=self._chaincode,
            function=function,
            args=[encode_argument(arg) for arg in args],
            transient=transient,
            endorsing_organizations=endorsing_organizations,
            hash=self._hash,
        )

    def endorse(self, proposal: Proposal, *, timeout: float | None = None) -> Transaction:
        """Have the proposal endorsed; the result is unsigned, with the contract's result."""
        tx_id = proposal.transaction_id
        log.debug("endorse %s (%s)", tx_id, proposal.function)
        try:
            response = self._stub.Endorse(
                proposal.endorse_request(), timeout=self._timeout("endorse", timeout)
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(EndorseError, exc, tx_id) from None
        try:
            return endorsed_transaction(response.prepared_transaction, transaction_id=tx_id)
        except ValueError as exc:
            raise EndorseError(str(exc), transaction_id=tx_id) from None

    def submit_transaction(self, transaction: Transaction, *, timeout: float | None = None) -> str:
        """Sign (unless already signed) and submit for ordering; return the transaction id.

        This does not wait for the commit: see :meth:`commit_status`.
        """
        if not transaction.signature:
            transaction = transaction.sign(self._signer, self._hash)
        log.debug("submit %s", transaction.transaction_id)
        try:
            self._stub.Submit(
                transaction.submit_request(), timeout=self._timeout("submit", timeout)
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(SubmitError, exc, transaction.transaction_id) from None
        return transaction.transaction_id

    def commit_status(
        self, transaction_id: str, *, timeout: float | None = None, check: bool = True
    ) -> CommitStatus:
        """Wait until ``transaction_id`` is committed and return its status.

        With ``check`` (the default), a transaction committed as invalid raises
        :class:`CommitError`; without, the status says so and the caller decides.
        """
        request = commit_status_request(
            self._identity,
            self._signer,
            channel_name=self._channel_name,
            transaction_id=transaction_id,
            hash=self._hash,
        )
        try:
            response = self._stub.CommitStatus(
                request, timeout=self._timeout("commit_status", timeout)
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(CommitStatusError, exc, transaction_id) from None
        status = commit_status(transaction_id, response)
        log.debug(
            "commit %s: %s in block %d", transaction_id, status.validation_code, status.block_number
        )
        return status.check() if check else status

    # ------------------------------------------------------------------ events

    def chaincode_events(
        self,
        *,
        start_block: int | None = None,
        after_transaction_id: str | None = None,
        timeout: float | None = None,
    ) -> ChaincodeEventStream:
        """Events of this chaincode from committed blocks, from the next block or ``start_block``.

        ``timeout`` bounds the whole stream (None: until closed).
        """
        request = chaincode_events_request(
            self._identity,
            self._signer,
            channel_name=self._channel_name,
            chaincode=self._chaincode,
            start_block=start_block,
            after_transaction_id=after_transaction_id,
            hash=self._hash,
        )
        # A streaming call fails on iteration, not here: the stream raises the error.
        return ChaincodeEventStream(self._stub.ChaincodeEvents(request, timeout=timeout))

    # ------------------------------------------------------------------ blocks

    def blocks(
        self, start: int | None = 0, stop: int | None = None, *, timeout: float | None = None
    ) -> BlockStream:
        """Committed blocks ``start`` to ``stop`` (None: the newest) from the peer's Deliver
        service; ``timeout`` bounds the whole stream."""
        envelope = seek_envelope(
            self._identity,
            self._signer,
            channel_name=self._channel_name,
            start=start,
            stop=stop,
            hash=self._hash,
        )
        call = self._deliver.Deliver(iter([envelope]), timeout=self._timeout("deliver", timeout))
        return BlockStream(call, start=start)

    def height(self, *, timeout: float | None = None) -> int:
        """The number of blocks on the channel (the newest block's number + 1)."""
        with self.blocks(None, None, timeout=timeout) as stream:
            for block in stream:
                return block.header.number + 1
        raise DeliverError("the peer sent no newest block")

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Close the gRPC channel if :func:`~ledger.fabric.connect` opened it."""
        if self._owns_channel:
            self._channel.close()

    def __enter__(self) -> FabricClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _timeout(self, stage: str, override: float | None) -> float:
        return self._timeouts[stage] if override is None else override
