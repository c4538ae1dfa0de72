"""The CCaaS server driven through the real shim protocol by a test acting as the peer.

Every test talks gRPC to ``Chaincode.Connect`` on a loopback port: registration handshake,
TRANSACTION messages with a signed proposal, the chaincode's state requests answered from
the test peer's world state, and assertions on the final COMPLETED or ERROR message.
"""

from __future__ import annotations

import json
import time

import pytest
from fabric_protos.peer import proposal_pb2

from fedcore import sha256_hex
from ledger._contract import EVENT_ROUND_COMMITTED
from ledger._merkle import leaf_hash, merkle_root

from .conftest import PACKAGE_ID
from .fake_peer import FakePeer, Msg, make_identity, signed_proposal

QUICK = 3.0  # seconds: an error response must come back at once, not after the peer's 30 s


def h(name: str) -> str:
    return sha256_hex(name.encode())


def rec(device: str, *, accepted: bool = True, samples: int = 10) -> dict:
    return {
        "device": device,
        "digest": h(f"update-{device}-{accepted}"),
        "samples": samples if accepted else None,
        "codec": "int8" if accepted else None,
        "accepted": accepted,
        "reason": None if accepted else "bad_signature",
    }


def register(peer: FakePeer, admin, devices: list[str]) -> None:
    started = [
        peer.start(admin, "RegisterDevice", d, "Org1MSP", "wearable", h(f"key-{d}"))
        for d in devices
    ]
    for _, future in started:
        assert future.result(20).status == 200


def create_task(peer: FakePeer, admin, task: str = "sepsis") -> dict:
    result = peer.call(
        admin,
        "CreateTask",
        task,
        "Org1MSP",
        "gateway1",
        h("spec"),
        "fedavg",
        {"dp": {"epsilon": 3.0}},
        h("model-0"),
    )
    return result.json()


def test_handshake_registers_with_the_package_id(peer):
    assert peer.registered_as == PACKAGE_ID


def test_register_device_then_get_device(peer, identities):
    admin, gateway = identities["admin"], identities["gateway"]
    result = peer.call(
        admin,
        "RegisterDevice",
        "dev-1",
        "Org1MSP",
        "wearable",
        h("key"),
        timestamp=1_712_345_678.5,
    )
    assert (result.kind, result.status) == ("COMPLETED", 200)
    record = result.json()
    # Identity and time come from the signed proposal: CN, MSP id, channel header timestamp.
    assert record["registered_by"] == "admin1"
    assert record["registered_at"] == 1_712_345_678.5
    assert record["registered_tx"] == result.tx_id
    # The result is canonical JSON (sorted keys, compact), as the contract stores it.
    assert (
        result.response.payload
        == json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
    )
    assert peer.world["device/dev-1"] == result.response.payload

    got = peer.call(gateway, "GetDevice", "dev-1")
    assert got.status == 200 and got.json() == record
    assert [n for t, n in peer.requests if t == got.tx_id] == ["GET_STATE", "COMPLETED"]


def test_round_flow_with_100_records_in_one_transaction_over_4_mib(peer, identities):
    admin, gateway = identities["admin"], identities["gateway"]
    devices = [f"dev-{i:03d}" for i in range(90)]
    register(peer, admin, devices)
    task = create_task(peer, admin)
    assert task["gateway"] == "gateway1"
    assert peer.call(gateway, "OpenRound", "sepsis", 0, h("model-0"), 1e9).status == 200

    records = [rec(d) for d in devices] + [
        rec(f"bad-{i}", accepted=False) | {"device": None} for i in range(10)
    ]
    assert len(records) == 100
    # A 5 MiB transient field makes the TRANSACTION message larger than gRPC's default
    # 4 MiB receive limit, which the shim's own server keeps.
    padding = {"note": b"x" * (5 * 1024 * 1024)}
    raw_args = [b"RecordUpdates", b'"sepsis"', b"0", json.dumps(records).encode()]
    _, proposal = signed_proposal(gateway, raw_args, timestamp=1.7e9, transient=padding)
    assert proposal.ByteSize() > 4 * 1024 * 1024
    recorded = peer.call(gateway, "RecordUpdates", raw_args=raw_args, proposal=proposal)
    assert recorded.status == 200, recorded.error
    summary = recorded.json()
    assert (summary["accepted"], summary["rejected"]) == (90, 10)
    assert (
        summary["merkle_root"]
        == merkle_root(leaf_hash(bytes.fromhex(r["digest"])) for r in records).hex()
    )
    # One transaction, 90 contribution records written, the UpdatesRecorded event attached.
    puts = [n for t, n in peer.requests if t == recorded.tx_id and n == "PUT_STATE"]
    assert len(puts) == 90 + 2
    assert recorded.message.chaincode_event.event_name == "UpdatesRecorded"

    committed = peer.call(
        gateway, "CommitRound", "sepsis", 0, h("model-1"), "fedavg", devices, {"auc": 0.91}
    )
    assert committed.status == 200, committed.error
    event = committed.message.chaincode_event
    assert event.event_name == EVENT_ROUND_COMMITTED
    assert event.tx_id == committed.tx_id
    payload = json.loads(event.payload)
    assert payload["contributors"] == 90
    assert payload["samples"] == 900
    assert payload["global_model"] == h("model-1")
    assert committed.json()["status"] == "committed"

    # A second round, then a range query that needs paging (page size 2, three rounds'
    # worth of lineage is read by key, contributions by prefix).
    assert peer.call(gateway, "OpenRound", "sepsis", 1, h("model-1"), 1e9).status == 200
    batch = [rec("dev-000", samples=5), rec("dev-001", samples=7), rec("dev-002")]
    assert peer.call(gateway, "RecordUpdates", "sepsis", 1, batch).status == 200
    contributions = peer.call(identities["auditor"], "GetDeviceContributions", "dev-000")
    assert [(c["task"], c["round"], c["status"]) for c in contributions.json()] == [
        ("sepsis", 0, "committed"),
        ("sepsis", 1, "open"),
    ]
    history = peer.call(identities["auditor"], "GetHistory", h("model-1"))
    assert [r["round"] for r in history.json()["rounds"]] == [0]

    peer.page_size = 1
    paged = peer.call(identities["auditor"], "GetDeviceContributions", "dev-001")
    assert len(paged.json()) == 2
    kinds = [n for t, n in peer.requests if t == paged.tx_id]
    assert kinds.count("GET_STATE_BY_RANGE") == 1
    assert kinds.count("QUERY_STATE_NEXT") >= 1
    assert kinds.count("QUERY_STATE_CLOSE") == 1  # the query is always closed
    assert kinds[-1] == "COMPLETED"


def test_forbidden_call_is_an_error_response_at_once(peer, identities):
    result = peer.call(
        identities["device"],
        "CreateTask",
        "sepsis",
        "Org1MSP",
        "gateway1",
        h("spec"),
        "fedavg",
        {},
        h("model-0"),
    )
    assert (result.kind, result.status) == ("COMPLETED", 500)
    assert result.error.startswith("forbidden: CreateTask needs an admin of Org1MSP")
    assert result.elapsed < QUICK
    assert not result.message.HasField("chaincode_event")
    assert peer.world == {}


def test_unexpected_exception_is_an_error_response_at_once(peer, identities):
    peer.world["device/dev-9"] = b"\xff\xfe not JSON"  # corrupt state: the contract cannot read it
    result = peer.call(identities["auditor"], "GetDevice", "dev-9")
    assert (result.kind, result.status) == ("COMPLETED", 500)
    assert result.error.startswith("internal: transaction ")
    assert "GetDevice" in result.error and "see the chaincode log" in result.error
    assert "\\xff" not in result.error  # no state or payload in the message
    assert result.elapsed < QUICK
    # The stream is still good.
    assert peer.call(identities["auditor"], "GetDevice", "dev-8").error.startswith("not_found")


def test_peer_error_answers_are_errors_not_values(peer, identities):
    def refuse(msg: Msg, name: str):
        if name in ("GET_STATE", "PUT_STATE"):
            return FakePeer.reply(msg, f"{name} refused by test".encode(), Msg.ERROR)
        return None

    peer.hook = refuse
    read = peer.call(identities["auditor"], "GetDevice", "dev-1")
    assert read.status == 500
    assert "GET_STATE failed: GET_STATE refused by test" in read.error

    def refuse_puts(msg: Msg, name: str):
        return refuse(msg, name) if name == "PUT_STATE" else None

    peer.hook = refuse_puts
    admin = identities["admin"]
    write = peer.call(admin, "RegisterDevice", "dev-1", "Org1MSP", "wearable", h("key"))
    assert write.status == 500  # a refused write does not pass silently
    assert "PUT_STATE failed: PUT_STATE refused by test" in write.error
    assert write.elapsed < QUICK


def test_concurrent_transactions_on_one_stream(peer, identities):
    n = 12  # below the server's 16 worker threads: each waiting transaction holds one
    peer.hold_reads_until(n)  # no read is answered until all n transactions wait for one
    started = [
        peer.start(
            identities["admin"], "RegisterDevice", f"dev-{i}", "Org1MSP", "wearable", h(f"k{i}")
        )
        for i in range(n)
    ]
    results = [future.result(20) for _, future in started]
    assert [r.status for r in results] == [200] * n, [r.error for r in results if r.status != 200]
    assert peer.max_in_flight == n
    assert sorted(peer.world) == sorted(f"device/dev-{i}" for i in range(n))
    for (tx_id, _), result in zip(started, results, strict=True):
        assert result.tx_id == tx_id
        assert result.json()["registered_tx"] == tx_id
    # All n reads were outstanding at once, then n writes and n replies went out together.
    kinds = [name for _, name in peer.requests]
    assert kinds[:n] == ["GET_STATE"] * n
    assert sorted(kinds[n:]) == sorted(["PUT_STATE"] * n + ["COMPLETED"] * n)


def test_more_concurrent_transactions_than_workers_queue_up(peer, identities):
    n = 60
    started = [
        peer.start(identities["admin"], "RegisterDevice", f"d{i}", "Org1MSP", "w", h(f"k{i}"))
        for i in range(n)
    ]
    assert [future.result(20).status for _, future in started] == [200] * n
    assert len(peer.world) == n


def test_non_utf8_argument_is_a_clear_error(peer, identities):
    result = peer.call(identities["auditor"], "GetDevice", raw_args=[b"GetDevice", b'"\xff\xfe"'])
    assert (result.kind, result.status) == ("COMPLETED", 500)
    assert result.error.startswith("invalid_argument: argument 1 of GetDevice is not UTF-8 text")
    assert "base64 or hex" in result.error
    assert result.elapsed < QUICK
    name = peer.call(identities["auditor"], "GetDevice", raw_args=[b"\xc3(", b'"dev"'])
    assert name.error == "invalid_argument: the function name is not UTF-8 text"
    assert peer.call(identities["auditor"], "GetDevice", "dev-1").error.startswith("not_found")


@pytest.mark.parametrize(
    ("raw_args", "message"),
    [
        ([b"GetDevice", b"dev-1"], "invalid_argument: argument 1 of GetDevice is not a JSON text"),
        ([b"GetDevice", b"NaN"], "invalid_argument: argument 1 of GetDevice is not a JSON text"),
        (
            [b"GetDevice", b'{"a": 1, "a": 2}'],
            "invalid_argument: argument 1 of GetDevice is not a JSON text",
        ),
        (
            [b"GetDevice", b"[" * 100_000],
            "invalid_argument: argument 1 of GetDevice is not a JSON text",
        ),
        ([b"GetDevice"], "invalid_argument: GetDevice: missing a required argument: 'device_id'"),
        (
            [b"GetDevice", b'"a"', b'"b"'],
            "invalid_argument: GetDevice: too many positional arguments",
        ),
        ([b"GetDevice", b"7"], "invalid_argument: device_id: 7 is not an identifier"),
        ([b"DeleteEverything"], "invalid_argument: no transaction function named DeleteEverything"),
        ([b"transactions"], "invalid_argument: no transaction function named transactions"),
        ([], "invalid_argument: no function name"),
    ],
)
def test_bad_arguments_are_invalid_argument(peer, identities, raw_args, message):
    result = peer.call(identities["auditor"], "x", raw_args=raw_args)
    assert result.status == 500
    assert result.error.startswith(message), result.error


def test_undecodable_messages_get_an_error_message(peer, identities):
    auditor = identities["auditor"]
    tx_id, future = peer.start(auditor, "GetDevice", "dev-1")
    assert future.result(20).status == 500  # not_found: the baseline works
    # A proposal whose bytes are not a Proposal: the stub cannot be built.
    bad = proposal_pb2.SignedProposal(proposal_bytes=b"\x0a\xff\xff", signature=b"")
    result = peer.call(None, "GetDevice", "dev-1", proposal=bad)
    assert result.kind == "ERROR"
    assert result.error.startswith(f"cannot start transaction {result.tx_id}")
    assert result.elapsed < QUICK
    # No proposal at all: no creator, so the contract refuses.
    anonymous = peer.call(None, "GetDevice", "dev-1")
    assert anonymous.error.startswith(
        "forbidden: the submitter carries no valid fedledger identity"
    )


def test_unknown_identity_roles_are_forbidden(peer):
    nobody = make_identity("Org1MSP", "nobody", None)  # OU=client only: no fedledger role
    result = peer.call(nobody, "GetDevice", "dev-1")
    assert result.error.startswith("forbidden: the submitter carries no valid fedledger identity")


def test_keepalive_is_echoed_and_init_completes(peer, identities):
    peer.send(Msg(type=Msg.KEEPALIVE))
    result = peer.call(identities["admin"], "Init", raw_args=[b"Init"], kind=Msg.INIT)
    assert (result.kind, result.status) == ("COMPLETED", 200)
    deadline = time.monotonic() + 5
    while peer.keepalives < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert peer.keepalives == 1


def test_each_peer_stream_is_independent(server, identities):
    with FakePeer(server.address) as one, FakePeer(server.address) as two:
        assert server.sessions == 2
        one.world["device/dev-1"] = b'{"device": "dev-1"}'
        assert one.call(identities["auditor"], "GetDevice", "dev-1").json() == {"device": "dev-1"}
        assert two.call(identities["auditor"], "GetDevice", "dev-1").error.startswith("not_found")


def test_a_handshake_out_of_order_is_refused(server):
    peer = FakePeer(server.address, handshake=False)
    try:
        assert peer.next_message().type == Msg.REGISTER
        peer.send(Msg(type=Msg.READY))  # READY before REGISTERED
        refused = peer.next_message()
        assert refused.type == Msg.ERROR
        assert refused.payload == b"expected REGISTERED in state created, got READY"
        with pytest.raises(StopIteration):
            peer.next_message()  # the chaincode ended the stream
    finally:
        peer.close()
