"""Verifying a Fabric chain: blocks read through Deliver from the in-process peer.

The peer builds its blocks as Fabric does (see ``fake_peer.py``, which hashes headers with
its own DER encoder); the tests tamper with them the ways an attacker could and check that
the first bad block and transaction are named.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import subprocess
import sys

import grpc
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from fabric_protos.common import common_pb2
from fabric_protos.ledger.rwset import rwset_pb2
from fabric_protos.ledger.rwset.kvrwset import kv_rwset_pb2
from fabric_protos.peer import (
    chaincode_pb2,
    proposal_pb2,
    proposal_response_pb2,
    transaction_pb2,
)

from fedcore import canonical_json, init_params, model_hash, sha256_hex, signer_from_key
from gateway import Gateway, UpdateStore
from ledger.fabric import (
    DeliverError,
    FabricClient,
    FabricLedger,
    block_header_hash,
    verify_blocks,
    verify_chain,
)
from tests.gateway.fleet import make_agents, pump

from .conftest import CHAINCODE, CHANNEL
from .fake_peer import header_hash

INVALID = transaction_pb2.TxValidationCode.Value("MVCC_READ_CONFLICT")
FILTER = common_pb2.BlockMetadataIndex.Value("TRANSACTIONS_FILTER")


def h(text: str) -> str:
    return sha256_hex(text.encode())


def register(client: FabricClient, device: str) -> None:
    client.submit("RegisterDevice", device, "Org1MSP", "wearable", h(f"key-{device}"))


def verify(peer, *, replay: bool = True, blocks=None):
    return verify_blocks(
        peer.blocks() if blocks is None else blocks,
        channel=CHANNEL,
        chaincode=CHAINCODE,
        replay=replay,
    )


@pytest.fixture
def federation(
    tmp_path, make_client, admin, gateway_member, task, registry, device_keys, gateway_key, dataset
):
    """Three rounds of a gateway and five devices, anchored on the test peer."""
    from fedcore import InMemoryBroker

    operator = FabricLedger(make_client(admin))
    for device in registry:
        operator.submit("RegisterDevice", device, "Org1MSP", "pi4", registry.fingerprint(device))
    initial = model_hash(init_params(task.model_spec()))
    spec_hash = task.model_spec().spec_hash()
    operator.submit("CreateTask", task.id, "Org1MSP", "gateway1", spec_hash, "fedavg", {}, initial)
    broker = InMemoryBroker()
    gateway = Gateway(
        task=task,
        transport=broker.transport(),
        store=UpdateStore(tmp_path / "store.sqlite"),
        ledger=FabricLedger(make_client(gateway_member)),
        registry=registry,
        signer=signer_from_key(gateway_key),
        evaluation=(dataset.x_test, dataset.y_test),
        max_message_bytes=1 << 20,
    )
    agents = make_agents(task, device_keys, gateway_key, dataset, broker)
    gateway.connect()
    gateway.start()
    for _ in range(10):
        pump(gateway, agents)
    assert gateway.finished and all(r.ledgered for r in gateway.results)
    return gateway


# ---------------------------------------------------------------------------- helpers


def find_tx(blocks, function: str, nth: int = 0) -> int:
    """The number of the block holding the ``nth`` call of ``function``."""
    found = []
    for block in blocks[1:]:
        payload = common_pb2.Payload.FromString(
            common_pb2.Envelope.FromString(block.data.data[0]).payload
        )
        action = transaction_pb2.Transaction.FromString(payload.data).actions[0]
        spec = chaincode_pb2.ChaincodeInvocationSpec.FromString(
            proposal_pb2.ChaincodeProposalPayload.FromString(
                transaction_pb2.ChaincodeActionPayload.FromString(
                    action.payload
                ).chaincode_proposal_payload
            ).input
        )
        if spec.chaincode_spec.input.args[0] == function.encode():
            found.append(block.header.number)
    return found[nth]


def rechain(blocks, start: int) -> None:
    """Recompute data hashes and previous-hash links from block ``start`` on."""
    for number in range(start, len(blocks)):
        header = blocks[number].header
        header.data_hash = hashlib.sha256(b"".join(blocks[number].data.data)).digest()
        if number:
            header.previous_hash = header_hash(blocks[number - 1].header)


def rewrite_writes(blocks, number: int, change, *, endorser=None, creator=None) -> None:
    """Change the write set of block ``number``'s transaction, re-sign it if given the
    keys (an insider), then rechain, so only the transaction's content gives it away."""
    envelope = common_pb2.Envelope.FromString(blocks[number].data.data[0])
    payload = common_pb2.Payload.FromString(envelope.payload)
    transaction = transaction_pb2.Transaction.FromString(payload.data)
    action_payload = transaction_pb2.ChaincodeActionPayload.FromString(
        transaction.actions[0].payload
    )
    response = proposal_response_pb2.ProposalResponsePayload.FromString(
        action_payload.action.proposal_response_payload
    )
    action = proposal_pb2.ChaincodeAction.FromString(response.extension)
    results = rwset_pb2.TxReadWriteSet.FromString(action.results)
    kv = kv_rwset_pb2.KVRWSet.FromString(results.ns_rwset[0].rwset)
    for write in kv.writes:
        value = change(write.key, write.value)
        if value is not None:
            write.value = value
    results.ns_rwset[0].rwset = kv.SerializeToString()
    action.results = results.SerializeToString()
    response.extension = action.SerializeToString()
    prp = response.SerializeToString()
    action_payload.action.proposal_response_payload = prp
    if endorser is not None:
        for endorsement in action_payload.action.endorsements:
            endorsement.signature = endorser.key.sign(
                prp + endorsement.endorser, ec.ECDSA(hashes.SHA256())
            )
    transaction.actions[0].payload = action_payload.SerializeToString()
    payload.data = transaction.SerializeToString()
    envelope.payload = payload.SerializeToString()
    if creator is not None:
        envelope.signature = creator.signer(hashlib.sha256(envelope.payload).digest())
    blocks[number].data.data[0] = envelope.SerializeToString()
    rechain(blocks, number)


def change_json(key_prefix: str, **fields):
    def change(key: str, value: bytes) -> bytes | None:
        if not key.startswith(key_prefix):
            return None
        record = json.loads(value)
        record.update(fields)
        return canonical_json(record)

    return change


def tx_id_of(block) -> str:
    payload = common_pb2.Payload.FromString(
        common_pb2.Envelope.FromString(block.data.data[0]).payload
    )
    return common_pb2.ChannelHeader.FromString(payload.header.channel_header).tx_id


# ---------------------------------------------------------------------------- block format


def test_header_hash_is_sha256_of_fabrics_der_encoding():
    header = common_pb2.BlockHeader(number=1, previous_hash=b"\x01" * 32, data_hash=b"\x02" * 32)
    der = bytes.fromhex("30470201010420") + b"\x01" * 32 + bytes.fromhex("0420") + b"\x02" * 32
    assert block_header_hash(header) == hashlib.sha256(der).digest()
    genesis = common_pb2.BlockHeader(number=0, data_hash=b"\x02" * 32)
    assert (
        block_header_hash(genesis)
        == hashlib.sha256(bytes.fromhex("302702010004000420") + b"\x02" * 32).digest()
    )
    for number in (127, 128, 255, 256, 65_535, 2**63, 2**64 - 1):
        header.number = number
        assert block_header_hash(header) == header_hash(header), number


def test_deliver_streams_the_blocks_as_committed(client, peer):
    for i in range(3):
        register(client, f"dev-{i}")
    assert client.height() == peer.height == 4
    blocks = list(client.blocks())
    assert [b.header.number for b in blocks] == [0, 1, 2, 3]
    assert blocks == peer.blocks()
    assert [b.header.number for b in client.blocks(2, 3)] == [2, 3]
    for previous, block in itertools.pairwise(blocks):
        assert block.header.previous_hash == block_header_hash(previous.header)
        assert block.metadata.metadata[FILTER] == bytes([0])
        assert tx_id_of(block) in peer.submitted


def test_deliver_errors_name_the_status(client, make_client, rogue_ca):
    with pytest.raises(DeliverError) as info:
        list(client.blocks(0, 5))
    assert info.value.status == "NOT_FOUND" and info.value.block_number == 0
    rogue = rogue_ca.issue("admin1", msp_id="Org1MSP", role="admin")
    with pytest.raises(DeliverError) as info:
        list(make_client(rogue).blocks())
    assert info.value.status == "FORBIDDEN"
    assert "deliver failed" in str(info.value)


def test_an_unreachable_peer_is_a_deliver_error(admin):
    channel = grpc.insecure_channel("127.0.0.1:1")
    try:
        client = FabricClient(channel, admin.identity, admin.signer, CHANNEL, CHAINCODE)
        with pytest.raises(DeliverError) as info:
            verify_chain(client, timeout=5)
        assert info.value.code is grpc.StatusCode.UNAVAILABLE
    finally:
        channel.close()


# ---------------------------------------------------------------------------- verification


def test_a_federations_rounds_verify_clean(federation, make_client, peer):
    report = verify_chain(make_client())
    assert report.ok, report.problem
    # genesis, 5 registrations, the task, open/record/commit per round
    assert report.blocks == peer.height == 1 + 5 + 1 + 3 * 3
    assert report.records == report.blocks
    assert report.transactions == report.blocks - 1 and report.invalid == 0
    assert report.endorsements == report.transactions
    assert report.replayed and report.first_bad_height is None
    as_dict = report.to_dict()
    assert as_dict["backend"] == "fabric" and as_dict["ok"] is True
    assert verify(peer, replay=False).ok


def test_progress_counts_every_block(client, peer):
    register(client, "dev-1")
    seen = []
    report = verify_chain(client, progress=lambda done, total: seen.append((done, total)))
    assert report.ok and seen == [(1, 2), (2, 2)]


def test_a_broken_previous_hash_is_named(client, peer):
    for i in range(4):
        register(client, f"dev-{i}")
    block = peer.blocks()[3]
    block.header.previous_hash = b"\x00" * 32
    peer.replace_block(3, block)
    report = verify_chain(client)
    assert not report.ok
    assert (report.first_bad_height, report.problem) == (3, "previous-hash link is broken")
    assert report.blocks == 3


def test_changed_data_is_named(client, peer):
    for i in range(3):
        register(client, f"dev-{i}")
    block = peer.blocks()[2]
    raw = bytearray(block.data.data[0])
    raw[-5] ^= 1
    block.data.data[0] = bytes(raw)
    peer.replace_block(2, block)
    report = verify_chain(client)
    assert (report.first_bad_height, report.problem) == (
        2,
        "data hash does not match the transactions",
    )


def test_a_missing_block_is_named(client, peer):
    for i in range(3):
        register(client, f"dev-{i}")
    blocks = peer.blocks()
    del blocks[2]
    report = verify(peer, blocks=blocks)
    assert report.first_bad_height == 2 and report.problem.startswith("missing")


def test_a_changed_write_breaks_the_signatures(federation, peer, gateway_member):
    blocks = peer.blocks()
    number = find_tx(blocks, "CommitRound", 1)
    rewrite_writes(blocks, number, change_json("round/", updates_root="ab" * 32))
    report = verify(peer, blocks=blocks)
    assert not report.ok and report.first_bad_height == number
    assert report.first_bad_tx == tx_id_of(blocks[number])
    assert report.problem == (
        f"transaction {report.first_bad_tx}: the creator's signature does not verify"
    )
    # The envelope re-signed by its creator, the endorsement still gives it away.
    rewrite_writes(blocks, number, lambda k, v: None, creator=gateway_member)
    report = verify(peer, blocks=blocks)
    assert report.first_bad_height == number
    assert report.problem.endswith("endorsement 0's signature does not verify")


def test_a_rewrite_by_the_key_holders_breaks_the_contract(
    federation, peer, peer_member, gateway_member
):
    """The gateway and the endorser collude to re-sign a round with a forged updates root."""
    blocks = peer.blocks()
    number = find_tx(blocks, "CommitRound", 1)
    forged = change_json("round/", updates_root="ab" * 32)
    rewrite_writes(blocks, number, forged, endorser=peer_member, creator=gateway_member)
    report = verify(peer, blocks=blocks)
    assert not report.ok and report.first_bad_height == number
    assert report.first_bad_tx == tx_id_of(blocks[number])
    assert report.problem.endswith("write set differs from what the contract writes")
    # Without replay, the rebuilt state breaks an invariant, found at the same transaction.
    report = verify(peer, blocks=blocks, replay=False)
    assert not report.ok and report.first_bad_height == number
    assert report.problem.endswith(
        "updates_root is not the Merkle root of the contributors' updates"
    )


def test_a_forged_contribution_without_replay_is_named(
    federation, peer, peer_member, gateway_member
):
    blocks = peer.blocks()
    number = find_tx(blocks, "RecordUpdates", 0)
    rewrite_writes(
        blocks, number, change_json("contrib/", device="dev-unknown"),
        endorser=peer_member, creator=gateway_member,
    )  # fmt: skip
    report = verify(peer, blocks=blocks, replay=False)
    assert not report.ok and report.first_bad_height == number
    assert "device dev-unknown is not registered" in report.problem


def test_an_invalid_transactions_writes_are_ignored(client, peer):
    register(client, "dev-1")
    peer.forced_codes.append("ENDORSEMENT_POLICY_FAILURE")
    with pytest.raises(Exception, match="ENDORSEMENT_POLICY_FAILURE"):
        register(client, "dev-2")
    register(client, "dev-2")  # the first attempt wrote nothing: registering again works
    report = verify_chain(client)
    assert report.ok, report.problem
    assert (report.transactions, report.invalid) == (3, 1)


def test_a_valid_transaction_flagged_invalid_is_caught_by_what_follows(client, peer):
    """Hiding a registration by flagging it invalid leaves the device's revocation dangling."""
    register(client, "dev-1")
    client.submit("RevokeDevice", "dev-1", "lost")
    blocks = peer.blocks()
    blocks[1].metadata.metadata[FILTER] = bytes([INVALID])
    rechain(blocks, 1)
    report = verify(peer, blocks=blocks)
    assert not report.ok and report.first_bad_height == 2
    assert report.first_bad_tx == tx_id_of(blocks[2])
    assert "(an MVCC conflict flagged VALID)" in report.problem


def test_a_transaction_flagged_valid_against_stale_reads_is_caught(client, peer):
    register(client, "dev-1")
    proposal = client.propose("RevokeDevice", "dev-1", "lost")
    first = client.endorse(proposal)
    second = client.endorse(client.propose("RevokeDevice", "dev-1", "stolen"))
    client.submit_transaction(first)
    client.commit_status(first.transaction_id)
    client.submit_transaction(second)
    assert client.commit_status(second.transaction_id, check=False).validation_code == (
        "MVCC_READ_CONFLICT"
    )
    assert verify_chain(client).ok
    blocks = peer.blocks()
    blocks[3].metadata.metadata[FILTER] = bytes([0])  # claim it was valid
    rechain(blocks, 3)
    report = verify(peer, blocks=blocks)
    assert report.first_bad_height == 3 and "MVCC" in report.problem


# ---------------------------------------------------------------------------- command line


def write_profile(tmp_path, member, endpoint: str):
    (tmp_path / "cert.pem").write_bytes(member.cert_pem)
    (tmp_path / "key.pem").write_bytes(member.key_pem)
    profile = tmp_path / "fabric.toml"
    profile.write_text(
        f'[peer]\nendpoint = "{endpoint}"\ntls = false\n\n'
        '[identity]\nmsp_id = "Org1MSP"\ncert = "cert.pem"\nkey = "key.pem"\n\n'
        f'[chaincode]\nchannel = "{CHANNEL}"\nname = "{CHAINCODE}"\n\n'
        "[timeouts]\ndeliver = 20.0\n"
    )
    return profile


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "fedledger", "ledger", "verify", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_command_line_verifies_a_fabric_chain(tmp_path, client, peer, peer_server, admin):
    for i in range(3):
        register(client, f"dev-{i}")
    profile = write_profile(tmp_path, admin, peer_server.target)
    done = run_cli("--fabric-profile", str(profile), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] is True and report["blocks"] == 4 and report["transactions"] == 3
    assert report["channel"] == CHANNEL and report["replayed"] is True

    block = peer.blocks()[2]
    block.header.previous_hash = b"\x00" * 32
    peer.replace_block(2, block)
    done = run_cli("--fabric-profile", str(profile))
    assert done.returncode == 1
    assert "block 2" in done.stderr and "previous-hash link is broken" in done.stderr


def test_the_command_line_reports_an_unreachable_peer(tmp_path, admin):
    profile = write_profile(tmp_path, admin, "127.0.0.1:1")
    done = run_cli("--fabric-profile", str(profile), "--json")
    assert done.returncode == 2
    assert "deliver failed: UNAVAILABLE" in done.stderr
    assert "Traceback" not in done.stderr


def test_certificates_are_checked_against_the_msp_roots(client, peer, org1_ca, org2_ca):
    register(client, "dev-1")
    trusted = {"Org1MSP": [org2_ca.cert, org1_ca.cert]}
    report = verify_blocks(peer.blocks(), channel=CHANNEL, chaincode=CHAINCODE, msp_roots=trusted)
    assert report.ok, report.problem
    wrong = {"Org1MSP": [org2_ca.cert]}
    report = verify_blocks(peer.blocks(), channel=CHANNEL, chaincode=CHAINCODE, msp_roots=wrong)
    assert report.first_bad_height == 1
    assert report.problem.endswith(
        "the creator's certificate is not issued by a root CA of Org1MSP"
    )


def test_the_command_line_checks_the_msp_roots(tmp_path, client, peer_server, admin, org2_ca):
    register(client, "dev-1")
    profile = write_profile(tmp_path, admin, peer_server.target)
    (tmp_path / "org2.pem").write_bytes(org2_ca.cert_pem)
    done = run_cli("--fabric-profile", str(profile), "--msp-ca", f"Org1MSP={tmp_path / 'org2.pem'}")
    assert done.returncode == 1
    assert "not issued by a root CA of Org1MSP" in done.stderr


def test_a_write_that_is_not_json_is_named_without_replay(client, peer, admin, peer_member):
    register(client, "dev-1")
    register(client, "dev-2")
    blocks = peer.blocks()
    rewrite_writes(blocks, 2, lambda k, v: b"\xff not json", endorser=peer_member, creator=admin)
    report = verify(peer, blocks=blocks, replay=False)
    assert report.first_bad_height == 2 and report.first_bad_tx == tx_id_of(blocks[2])
    assert report.problem.endswith("device/dev-2: not a JSON record")
    assert verify(peer, blocks=blocks).problem.endswith(
        "write set differs from what the contract writes"
    )


# ---------------------------------------------------------------------------- orderer signatures


@pytest.fixture(scope="module")
def orderer_ca():
    from .pki import CertificateAuthority

    return CertificateAuthority("ca.example.com", "example.com")


@pytest.fixture(scope="module")
def orderer(orderer_ca):
    return orderer_ca.issue("orderer0.example.com", msp_id="OrdererMSP")


def verify_orderer(blocks, roots):
    return verify_blocks(
        blocks,
        channel=CHANNEL,
        chaincode=CHAINCODE,
        msp_roots=roots,
        orderer_msps=["OrdererMSP"],
    )


def test_blocks_signed_by_the_orderer_verify(client, peer, orderer, orderer_ca, org1_ca):
    peer.orderer = orderer
    register(client, "dev-1")
    register(client, "dev-2")
    roots = {"OrdererMSP": [orderer_ca.cert], "Org1MSP": [org1_ca.cert]}
    report = verify_orderer(peer.blocks(), roots)
    assert report.ok, report.problem
    assert report.blocks == 3


def test_an_unsigned_or_forged_block_is_named(client, peer, orderer, orderer_ca, org1_ca):
    roots = {"OrdererMSP": [orderer_ca.cert], "Org1MSP": [org1_ca.cert]}
    register(client, "dev-1")  # block 1: the orderer signed nothing yet
    peer.orderer = orderer
    register(client, "dev-2")
    report = verify_orderer(peer.blocks(), roots)
    assert (report.first_bad_height, report.problem) == (
        1,
        "no valid orderer signature on the block",
    )
    # Without an orderer MSP to check, the same chain verifies (signatures are opt-in).
    assert verify_blocks(peer.blocks(), channel=CHANNEL, chaincode=CHAINCODE).ok

    # A signature over another header (the block re-chained after a change) is refused.
    blocks = peer.blocks()[:1] + peer.blocks()[2:]
    report = verify_orderer(blocks, roots)
    assert report.first_bad_height == 1


def test_a_signature_by_a_non_orderer_or_untrusted_key_is_refused(
    client, peer, orderer_ca, org1_ca, peer_member, rogue_ca
):
    # A peer of Org1 signing blocks is not the ordering service.
    peer.orderer = peer_member
    register(client, "dev-1")
    roots = {"OrdererMSP": [orderer_ca.cert], "Org1MSP": [org1_ca.cert]}
    assert not verify_orderer(peer.blocks(), roots).ok
    # An "orderer" certificate from a CA the OrdererMSP does not have.
    peer.orderer = rogue_ca.issue("orderer0.example.com", msp_id="OrdererMSP")
    register(client, "dev-2")
    report = verify_orderer(peer.blocks()[:1] + peer.blocks()[2:], roots)
    assert not report.ok


def test_the_command_line_checks_orderer_signatures(
    tmp_path, client, peer, peer_server, admin, orderer, orderer_ca, org1_ca
):
    peer.orderer = orderer
    register(client, "dev-1")
    profile = write_profile(tmp_path, admin, peer_server.target)
    (tmp_path / "orderer.pem").write_bytes(orderer_ca.cert_pem)
    (tmp_path / "org1.pem").write_bytes(org1_ca.cert_pem)
    args = ("--fabric-profile", str(profile), "--msp-ca", f"Org1MSP={tmp_path / 'org1.pem'}")
    orderers = ("--orderer-msp", "OrdererMSP")
    done = run_cli(*args, *orderers, "--msp-ca", f"OrdererMSP={tmp_path / 'orderer.pem'}")
    assert done.returncode == 0, done.stderr
    assert "block signatures of OrdererMSP" in done.stdout
    # With the wrong root for the orderers, block 1's signature is not trusted.
    done = run_cli(*args, *orderers, "--msp-ca", f"OrdererMSP={tmp_path / 'org1.pem'}")
    assert done.returncode == 1
    assert "no valid orderer signature" in done.stderr


def test_a_federations_store_cross_checks_with_the_chain_both_ways(
    federation, make_client, tmp_path
):
    """The same check as the embedded ledger's, fed with the writes of valid transactions."""
    import sqlite3

    path = tmp_path / "store.sqlite"
    federation.store.close()
    store = UpdateStore.open_readonly(path)
    try:
        report = verify_chain(make_client(), store=store)
    finally:
        store.close()
    assert report.ok, report.problem
    assert report.checked_models == 3 and report.checked_updates == 15
    assert report.to_dict()["discrepancies"] == []

    db = sqlite3.connect(path)
    db.execute("DELETE FROM rounds WHERE round = 2")
    db.execute(
        "DELETE FROM updates WHERE round = 0 AND device = ?", (sorted(federation.registry)[0],)
    )
    db.commit()
    db.close()
    store = UpdateStore.open_readonly(path)
    try:
        report = verify_chain(make_client(), store=store)
    finally:
        store.close()
    assert not report.ok
    assert [(d.kind, d.round) for d in report.discrepancies] == [
        ("update_missing_in_store", 0),
        ("round_missing_in_store", 2),
    ]
    assert report.problem == report.discrepancies[0].describe()
    assert report.first_bad_height == report.discrepancies[0].height is not None
