"""What fabric-chaincode-python 2.5.4 does on its own, so each workaround stays justified.

These tests run the stock shim (its ``ChaincodeService`` and ``Handler``, its server
settings, its stub) against the same test peer as ``test_protocol.py`` and pin each defect
(``conftest.py`` imports ``ledger.chaincode`` first, so the shim's logging is tamed).
The matching test there shows the adapter's fix. If one of these starts failing after a
shim upgrade, the defect is gone upstream and its workaround in ``_adapter.py`` can go.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import socket
import threading
from importlib.metadata import version

import grpc
import pytest
from fabric_chaincode_python.fabric_shim import server as stock_server
from fabric_chaincode_python.fabric_shim.handler import Handler
from fabric_chaincode_python.fabric_shim.interfaces import Chaincode
from fabric_chaincode_python.fabric_shim.msg_queue_handler import MsgQueueHandler
from fabric_chaincode_python.fabric_shim.response import success
from fabric_chaincode_python.fabric_shim.stub import ChaincodeStub
from fabric_protos.peer import chaincode_pb2
from fabric_protos.peer import chaincode_shim_pb2_grpc as shim_grpc

from ledger.chaincode import FedLedgerChaincode
from ledger.chaincode._adapter import _PeerSession

from .fake_peer import FakePeer, Msg, signed_proposal

pytestmark = pytest.mark.skipif(
    version("fabric-chaincode-python") != "2.5.4", reason="pins fabric-chaincode-python 2.5.4"
)


class Raising(Chaincode):
    @staticmethod
    async def init(stub):
        return success(b"")

    @staticmethod
    async def invoke(stub):
        raise RuntimeError("an exception escaping the chaincode")


class ReadWriteEvent(Chaincode):
    """Reads ``k``, writes a value, sets an event, returns what it read."""

    @staticmethod
    async def init(stub):
        return success(b"")

    @staticmethod
    async def invoke(stub):
        value = await stub.get_state("k")
        await stub.put_state(f"out/{stub.get_txid()}", b"value")
        stub.set_event("Written", b"event payload")
        return success(value)


class StockServer:
    """The stock ``ChaincodeService`` on a grpc.aio server in a thread of its own.

    ``stock_settings`` builds the server with the shim's own ``_internal_server`` (what
    ``start()`` uses), which takes a fixed address and no gRPC options.
    """

    def __init__(self, chaincode: Chaincode, *, stock_settings: bool = False):
        self._chaincode = chaincode
        self._stock = stock_settings
        self._ready = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._run(),), daemon=True)
        self.address = ""

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        if self._stock:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                self.address = f"127.0.0.1:{probe.getsockname()[1]}"
            server = stock_server._internal_server(
                ccid="stock:0", address=self.address, cc=self._chaincode, key=None, cert=None
            )
        else:
            server = grpc.aio.server()
            shim_grpc.add_ChaincodeServicer_to_server(
                stock_server.ChaincodeService("stock:0", self._chaincode), server
            )
            self.address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        await server.start()
        self._ready.set()
        await self._stop.wait()
        await server.stop(0)

    def __enter__(self) -> StockServer:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def test_an_exception_in_invoke_leaves_the_peer_waiting(identities):
    with StockServer(Raising()) as server, FakePeer(server.address) as peer:
        _, future = peer.start(identities["admin"], "Anything")
        with pytest.raises(concurrent.futures.TimeoutError):
            future.result(1.0)  # a peer would wait for its 30 s execute timeout


def test_events_are_not_sent_and_peer_errors_read_as_values(identities):
    with StockServer(ReadWriteEvent()) as server, FakePeer(server.address) as peer:
        result = peer.call(identities["admin"], "Anything")
        assert result.status == 200
        assert not result.message.HasField("chaincode_event")  # set_event is lost

        def refuse(msg, name):
            return (
                FakePeer.reply(msg, b"refused by the peer", Msg.ERROR)
                if name != "COMPLETED"
                else None
            )

        peer.hook = refuse
        result = peer.call(identities["admin"], "Anything")
        assert result.status == 200  # the refused read and the refused write both "worked"
        assert result.response.payload == b"refused by the peer"


class SlowStream:
    """Stands in for grpc.aio's servicer context: a write takes 20 ms; overlaps are counted."""

    def __init__(self):
        self.active = 0
        self.max_active = 0
        self.sent: list[Msg] = []

    async def write(self, msg: Msg) -> None:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        await asyncio.sleep(0.02)
        self.sent.append(msg)
        self.active -= 1


def two_transactions(identities) -> list[Msg]:
    out = []
    for i in range(2):
        args = [
            b"RegisterDevice",
            *(json.dumps(a).encode() for a in (f"d{i}", "Org1MSP", "w", "0" * 64)),
        ]
        tx_id, proposal = signed_proposal(identities["admin"], args, timestamp=1.7e9)
        msg = Msg(
            type=Msg.TRANSACTION,
            payload=chaincode_pb2.ChaincodeInput(args=args).SerializeToString(),
            txid=tx_id,
            channel_id="ch",
        )
        msg.proposal.CopyFrom(proposal)
        out.append(msg)
    return out


def test_the_stock_handler_writes_concurrently(identities):
    """Two transactions' first requests go out at the same time, with no lock between them."""

    async def run() -> SlowStream:
        stream = SlowStream()
        handler = Handler("stock:0", ReadWriteEvent())
        handler.context = stream
        handler.msg_queue_handler = MsgQueueHandler(handler)
        handler.state = "ready"
        tasks = [
            asyncio.create_task(handler.handle_message(m)) for m in two_transactions(identities)
        ]
        while len(stream.sent) < 2:
            await asyncio.sleep(0.005)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return stream

    stream = asyncio.run(run())
    assert stream.max_active == 2
    assert [m.type for m in stream.sent] == [Msg.GET_STATE, Msg.GET_STATE]


def test_the_adapter_session_never_overlaps_writes(identities):
    """The same two transactions through the adapter's session: one write at a time."""

    async def run() -> SlowStream:
        stream = SlowStream()
        chaincode = FedLedgerChaincode(max_workers=2)

        async def from_peer():
            yield Msg(type=Msg.REGISTERED)
            yield Msg(type=Msg.READY)
            for msg in two_transactions(identities):
                yield msg
            while sum(m.type == Msg.GET_STATE for m in stream.sent) < 2:
                await asyncio.sleep(0.005)

        try:
            await _PeerSession("fedledger:0", chaincode, stream).run(from_peer())
        finally:
            await asyncio.to_thread(chaincode.close)
        return stream

    stream = asyncio.run(run())
    assert stream.max_active == 1
    assert [m.type for m in stream.sent] == [Msg.REGISTER, Msg.GET_STATE, Msg.GET_STATE]


def test_grpc_aio_refuses_overlapping_writes_on_one_stream():
    """Why overlapping writes matter: grpc.aio fails them (GRPC_CALL_ERROR_TOO_MANY_OPERATIONS)."""
    outcome: list[object] = []

    class Servicer(shim_grpc.ChaincodeServicer):
        async def Connect(self, request_iterator, context):
            msgs = [Msg(type=Msg.KEEPALIVE, txid=str(i)) for i in range(10)]
            outcome.extend(
                await asyncio.gather(*(context.write(m) for m in msgs), return_exceptions=True)
            )

    async def main() -> None:
        server = grpc.aio.server()
        shim_grpc.add_ChaincodeServicer_to_server(Servicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = shim_grpc.ChaincodeStub(channel).Connect()
                with contextlib.suppress(grpc.aio.AioRpcError):
                    async for _ in call:
                        pass
        finally:
            await server.stop(0)

    asyncio.run(main())
    failures = [r for r in outcome if isinstance(r, Exception)]
    assert failures and "TOO_MANY_OPERATIONS" in str(failures[0])


def test_the_stock_server_keeps_the_4_mib_receive_limit(identities):
    raw_args = [b"Anything"]
    _, proposal = signed_proposal(
        identities["admin"], raw_args, timestamp=1.7e9, transient={"pad": b"x" * (5 << 20)}
    )
    with (
        StockServer(ReadWriteEvent(), stock_settings=True) as server,
        FakePeer(server.address) as peer,
    ):
        _, future = peer.start(None, "Anything", raw_args=raw_args, proposal=proposal)
        with pytest.raises(ConnectionError):
            future.result(10)
        assert peer.stream_error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_every_argument_is_decoded_as_utf8():
    cc_input = chaincode_pb2.ChaincodeInput(args=[b"GetDevice", b"\xff\xfe"])
    stub = ChaincodeStub(None, "channel", "tx", cc_input, None)
    with pytest.raises(UnicodeDecodeError):
        stub.get_function_and_parameters()
