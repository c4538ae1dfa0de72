import sqlite3

import pytest

from fedcore import generate_key, public_key_b64, signer_from_key
from ledger import EmbeddedLedger, LedgerError, leaf_hash, merkle_root


@pytest.fixture
def chain(tmp_path, gateway_key):
    ledger = EmbeddedLedger(
        tmp_path / "ledger.sqlite",
        signer=signer_from_key(gateway_key),
        public_key=public_key_b64(gateway_key),
        clock=iter(range(1000, 2000)).__next__,
    )
    for r in range(5):
        ledger.append([{"type": "round", "round": r, "contributors": ["a", "b"]}])
    yield ledger
    ledger.close()


def tamper(path, sql, *args):
    db = sqlite3.connect(path)
    db.execute(sql, args)
    db.commit()
    db.close()


def test_fresh_chain_verifies(chain):
    report = chain.verify()
    assert report.ok and report.blocks == 6 and report.records == 6
    assert [r["round"] for r in chain.records("round")] == [0, 1, 2, 3, 4]


def test_pinned_key_must_match(chain, gateway_key):
    assert chain.verify(public_key=public_key_b64(gateway_key)).ok
    report = chain.verify(public_key=public_key_b64(generate_key()))
    assert not report.ok and report.first_bad_height == 0 and "signature" in report.problem


@pytest.mark.parametrize(
    ("sql", "args", "problem"),
    [
        (
            "UPDATE blocks SET records = ? WHERE height = 3",
            ('[{"round":9,"type":"round"}]',),
            "Merkle",
        ),
        ("UPDATE blocks SET timestamp = 5 WHERE height = 3", (), "block hash"),
        ("UPDATE blocks SET prev_hash = ? WHERE height = 3", ("0" * 64,), "previous-hash"),
        ("UPDATE blocks SET signature = zeroblob(64) WHERE height = 3", (), "signature"),
        ("DELETE FROM blocks WHERE height = 3", (), "missing"),
        ("UPDATE blocks SET records = 'not json' WHERE height = 3", (), "canonical JSON"),
    ],
)
def test_tampering_is_detected_and_named(chain, sql, args, problem):
    tamper(chain.path, sql, *args)
    report = chain.verify()
    assert not report.ok
    assert report.first_bad_height == 3
    assert problem in report.problem


def test_re_signed_forgery_is_caught_with_a_pinned_key(chain, gateway_key):
    """An attacker who rewrites the whole chain with their own key fools only an unpinned check."""
    forged_path = chain.path.parent / "forged.sqlite"
    mallory = generate_key()
    with EmbeddedLedger(
        forged_path, signer=mallory.sign, public_key=public_key_b64(mallory)
    ) as forged:
        forged.append([{"type": "round", "round": 0, "contributors": ["mallory"]}])
        assert forged.verify().ok
        assert not forged.verify(public_key=public_key_b64(gateway_key)).ok


def test_reopen_continues_the_chain(chain, gateway_key):
    path = chain.path
    chain.close()
    with EmbeddedLedger(path, signer=signer_from_key(gateway_key), public_key="unused") as again:
        block = again.append([{"type": "round", "round": 5}])
        assert block.height == 6
        assert again.verify().ok


def test_empty_ledger_without_signer_is_an_error(tmp_path):
    with pytest.raises(LedgerError):
        EmbeddedLedger(tmp_path / "x.sqlite")
    with pytest.raises(LedgerError):
        EmbeddedLedger.open_readonly(tmp_path / "missing.sqlite")


def test_read_only_ledger_refuses_append(chain):
    with EmbeddedLedger.open_readonly(chain.path) as reader:
        assert reader.verify().ok
        with pytest.raises(LedgerError):
            reader.append([{"type": "x"}])


def test_merkle_root_properties():
    leaves = [leaf_hash(bytes([i])) for i in range(5)]
    assert merkle_root(leaves) != merkle_root(leaves[:4])
    assert merkle_root(leaves) != merkle_root(list(reversed(leaves)))
    assert merkle_root(leaves[:1]) == leaves[0]
    assert len(merkle_root([])) == 32
