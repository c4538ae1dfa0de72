"""The embedded backend: the contract run over a signed hash chain in SQLite."""

import sqlite3

import pytest

from fedcore import generate_key, public_key_b64, signer_from_key
from ledger import ContractError, EmbeddedLedger, Identity, LedgerError, leaf_hash, merkle_root

ADMIN = Identity(msp_id="org1", subject="admin", role="admin")
GATEWAY = Identity(msp_id="org1", subject="gw", role="gateway")
H = [f"{i:064x}" for i in range(1, 40)]


@pytest.fixture
def chain(tmp_path, gateway_key):
    ledger = EmbeddedLedger(
        tmp_path / "ledger.sqlite",
        signer=signer_from_key(gateway_key),
        public_key=public_key_b64(gateway_key),
        clock=iter(range(1000, 2000)).__next__,
    )
    for d in ("a", "b"):
        ledger.submit("RegisterDevice", d, "org1", "pi4", H[0], identity=ADMIN)
    ledger.submit("CreateTask", "t", "org1", "gw", H[1], "fedavg", {}, H[2], identity=ADMIN)
    base = H[2]
    for r in range(2):
        ledger.submit("OpenRound", "t", r, base, 5000.0, identity=GATEWAY)
        records = [
            {
                "device": d,
                "digest": H[10 + 2 * r + i],
                "samples": 5,
                "codec": "int8",
                "accepted": True,
                "reason": None,
            }
            for i, d in enumerate(("a", "b"))
        ]
        ledger.submit("RecordUpdates", "t", r, records, identity=GATEWAY)
        base = H[20 + r]
        ledger.submit(
            "CommitRound", "t", r, base, "fedavg", ["a", "b"], {"accuracy": 0.9}, identity=GATEWAY
        )
    yield ledger
    ledger.close()


def tamper(path, sql, *args):
    db = sqlite3.connect(path)
    db.execute(sql, args)
    db.commit()
    db.close()


def test_fresh_chain_verifies_and_replays(chain):
    report = chain.verify(replay=True)
    assert report.ok, report.problem
    assert report.blocks == 10 and report.records == 10 and report.replayed
    assert [t["fn"] for t in chain.transactions()][:3] == [
        "RegisterDevice",
        "RegisterDevice",
        "CreateTask",
    ]
    assert chain.evaluate("GetRound", "t", 1, identity=ADMIN)["global_model"] == H[21]
    history = chain.evaluate("GetHistory", H[21], identity=ADMIN)
    assert [r["round"] for r in history["rounds"]] == [1, 0]
    assert len(chain.evaluate("GetDeviceContributions", "a", identity=ADMIN)) == 2


def test_a_refused_transaction_writes_nothing(chain):
    before = chain.height()
    with pytest.raises(ContractError) as info:
        chain.submit("CommitRound", "t", 1, H[30], "fedavg", ["a", "b"], {}, identity=GATEWAY)
    assert info.value.code == "conflict"
    with pytest.raises(ContractError) as info:
        chain.submit("CreateTask", "t2", "org1", "gw", H[1], "fedavg", {}, H[2], identity=GATEWAY)
    assert info.value.code == "forbidden"
    assert chain.height() == before
    assert chain.verify(replay=True).ok


def test_evaluate_and_submit_kinds_are_enforced(chain):
    with pytest.raises(ContractError):
        chain.submit("GetRound", "t", 0, identity=ADMIN)
    with pytest.raises(ContractError):
        chain.evaluate("RevokeDevice", "a", "lost", identity=ADMIN)
    with pytest.raises(ContractError):
        chain.submit("NoSuchThing", identity=ADMIN)


def test_one_batch_of_100_records_is_one_transaction(tmp_path, gateway_key):
    with EmbeddedLedger(
        tmp_path / "l.sqlite", signer=gateway_key.sign, public_key=public_key_b64(gateway_key)
    ) as led:
        devices = [f"d{i:03d}" for i in range(100)]
        for d in devices:
            led.submit("RegisterDevice", d, "org1", "pi4", H[0], identity=ADMIN)
        led.submit("CreateTask", "t", "org1", "gw", H[1], "fedavg", {}, H[2], identity=ADMIN)
        led.submit("OpenRound", "t", 0, H[2], 1.0, identity=GATEWAY)
        height = led.height()
        records = [
            {
                "device": d,
                "digest": "%064x" % (i + 1),
                "samples": 3,
                "codec": "int8",
                "accepted": True,
                "reason": None,
            }
            for i, d in enumerate(devices)
        ]
        led.submit("RecordUpdates", "t", 0, records, identity=GATEWAY)
        assert led.height() == height + 1
        assert led.verify(replay=True).ok


def test_pinned_key_must_match(chain, gateway_key):
    assert chain.verify(public_key=public_key_b64(gateway_key)).ok
    report = chain.verify(public_key=public_key_b64(generate_key()))
    assert not report.ok and report.first_bad_height == 0 and "signature" in report.problem


@pytest.mark.parametrize(
    ("sql", "args", "problem"),
    [
        (
            "UPDATE blocks SET records = replace(records, '\"samples\":5', '\"samples\":6') WHERE height = 5",
            (),
            "Merkle",
        ),
        ("UPDATE blocks SET timestamp = 5 WHERE height = 5", (), "block hash"),
        ("UPDATE blocks SET prev_hash = ? WHERE height = 5", ("0" * 64,), "previous-hash"),
        ("UPDATE blocks SET signature = zeroblob(64) WHERE height = 5", (), "signature"),
        ("DELETE FROM blocks WHERE height = 5", (), "missing"),
        ("UPDATE blocks SET records = 'not json' WHERE height = 5", (), "canonical JSON"),
    ],
)
def test_tampering_is_detected_and_named(chain, sql, args, problem):
    tamper(chain.path, sql, *args)
    report = chain.verify()
    assert not report.ok
    assert report.first_bad_height == 5
    assert problem in report.problem


def test_a_correctly_signed_chain_that_breaks_a_rule_fails_replay(tmp_path, gateway_key):
    """Someone holding the gateway key writes blocks the contract would refuse: only replay sees it."""
    with EmbeddedLedger(
        tmp_path / "l.sqlite", signer=gateway_key.sign, public_key=public_key_b64(gateway_key)
    ) as led:
        led.submit("RegisterDevice", "a", "org1", "pi4", H[0], identity=ADMIN)
        # forge a second, conflicting registration straight into a signed block
        forged = dict(led.transactions()[0], tx_id="f" * 64)
        led._begin()
        led._append_block([forged])
        led._db.execute("COMMIT")
        assert led.verify().ok
        report = led.verify(replay=True)
        assert not report.ok and report.first_bad_height == 2
        assert "breaks the contract" in report.problem


def test_a_forged_write_set_fails_replay(tmp_path, gateway_key):
    """A block whose recorded writes are not what its transaction writes is named by replay."""
    with EmbeddedLedger(
        tmp_path / "l.sqlite", signer=gateway_key.sign, public_key=public_key_b64(gateway_key)
    ) as led:
        led.submit("RegisterDevice", "a", "org1", "pi4", H[0], identity=ADMIN)
        led.submit("RegisterDevice", "b", "org1", "pi4", H[0], identity=ADMIN)
        record = led.transactions()[-1]
        record["writes"] = [[k, v.replace("pi4", "pi5")] for k, v in record["writes"]]
        led._db.execute("DELETE FROM blocks WHERE height = 2")
        led._begin()
        led._append_block([record], timestamp=record["timestamp"])
        led._db.execute("COMMIT")
        assert led.verify().ok
        report = led.verify(replay=True)
        assert not report.ok and report.first_bad_height == 2
        assert report.problem == "write set differs from what the contract writes"


def test_re_signed_forgery_is_caught_with_a_pinned_key(chain, gateway_key):
    mallory = generate_key()
    with EmbeddedLedger(
        chain.path.parent / "forged.sqlite", signer=mallory.sign, public_key=public_key_b64(mallory)
    ) as forged:
        forged.submit("RegisterDevice", "mallory", "org1", "pi4", H[0], identity=ADMIN)
        assert forged.verify().ok
        assert not forged.verify(public_key=public_key_b64(gateway_key)).ok


def test_reopen_continues_the_chain(chain, gateway_key):
    path = chain.path
    chain.close()
    with EmbeddedLedger(path, signer=signer_from_key(gateway_key), public_key="unused") as again:
        again.submit("OpenRound", "t", 2, H[21], 1.0, identity=GATEWAY)
        assert again.height() == 10
        assert again.verify(replay=True).ok


def test_empty_ledger_without_signer_is_an_error(tmp_path):
    with pytest.raises(LedgerError):
        EmbeddedLedger(tmp_path / "x.sqlite")
    with pytest.raises(LedgerError):
        EmbeddedLedger.open_readonly(tmp_path / "missing.sqlite")


def test_read_only_ledger_refuses_submit(chain):
    with EmbeddedLedger.open_readonly(chain.path) as reader:
        assert reader.verify().ok
        with pytest.raises(LedgerError):
            reader.submit("RegisterDevice", "z", "org1", "pi4", H[0], identity=ADMIN)


def test_merkle_root_properties():
    leaves = [leaf_hash(bytes([i])) for i in range(5)]
    assert merkle_root(leaves) != merkle_root(leaves[:4])
    assert merkle_root(leaves) != merkle_root(list(reversed(leaves)))
    assert merkle_root(leaves[:1]) == leaves[0]
    assert len(merkle_root([])) == 32
