"""The ledger contract through the in-memory transaction context.

Each transaction runs in its own :class:`MemoryContext` and is committed to a shared
:class:`MemoryWorldState`, as the embedded backend and a Fabric peer will do.
"""

import ast
import inspect
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ledger._context
import ledger._contract
import ledger._merkle
from fedcore import canonical_json, sha256_hex
from ledger import LedgerError, leaf_hash, merkle_root
from ledger._context import Identity, MemoryContext, MemoryWorldState, MVCCConflictError
from ledger._contract import CODES, ContractError, FedLedgerContract

TX = FedLedgerContract.transactions()

ADMIN = Identity("Org1MSP", "admin1", "admin")
ADMIN2 = Identity("Org2MSP", "admin2", "admin")
GATEWAY = Identity("Org1MSP", "gateway1", "gateway")
AUDITOR = Identity("Org2MSP", "auditor1", "auditor")


def h(name: str) -> str:
    return sha256_hex(name.encode())


M = [h(f"model-{i}") for i in range(5)]
SPEC = h("model-spec")


def rec(device, name=None, *, samples=10, accepted=True, reason=None, codec="int8"):
    return {
        "device": device,
        "digest": h(name or f"update-{device}"),
        "samples": samples,
        "codec": codec,
        "accepted": accepted,
        "reason": reason,
    }


def rej(device, reason="bad_signature", name=None):
    return rec(device, name or f"rejected-{device}", accepted=False, reason=reason)


class Ledger:
    """Drives the contract like a backend: one context per transaction, commit on success."""

    def __init__(self):
        self.world = MemoryWorldState()
        self.time = 1_000.0
        self.contexts: list[MemoryContext] = []

    def context(self, who, *, read_only=False):
        self.time += 1.0
        return self.world.context(
            tx_id=f"tx-{len(self.contexts):04d}",
            timestamp=self.time,
            creator=who,
            read_only=read_only,
        )

    def submit(self, who, name, *args):
        fn, kind = TX[name]
        assert kind == "submit"
        ctx = self.context(who)
        self.contexts.append(ctx)
        result = fn(ctx, *args)
        self.world.commit(ctx)
        return result

    def evaluate(self, who, name, *args):
        fn, kind = TX[name]
        assert kind == "evaluate"
        ctx = self.context(who, read_only=True)
        result = fn(ctx, *args)
        assert ctx.write_set == {} and ctx.event is None
        return result

    def refused(self, code, who, name, *args):
        """Run a transaction that must fail with ``code`` and leave the state as it was."""
        assert code in CODES
        before = dict(self.world)
        fn, _ = TX[name]
        ctx = self.context(who)
        with pytest.raises(ContractError) as info:
            fn(ctx, *args)
        assert info.value.code == code, info.value
        assert dict(self.world) == before
        return info.value

    def events(self, name):
        return [
            json.loads(ctx.event[1])
            for ctx in self.contexts
            if ctx.event is not None and ctx.event[0] == name
        ]


@pytest.fixture
def led():
    """Devices dev-0..dev-3 of Org1 (dev-3 revoked), dev-9 of Org2, task t1 of Org1."""
    led = Ledger()
    for i in range(4):
        led.submit(ADMIN, "RegisterDevice", f"dev-{i}", "Org1MSP", "wearable", h(f"key-{i}"))
    led.submit(ADMIN2, "RegisterDevice", "dev-9", "Org2MSP", "bedside-monitor", h("key-9"))
    led.submit(ADMIN, "RevokeDevice", "dev-3", "key lost")
    led.submit(
        ADMIN,
        "CreateTask",
        "t1",
        "Org1MSP",
        "gateway1",
        SPEC,
        "fedavg",
        {"dp": {"epsilon": 1.0, "clip": 1.0}, "secure_aggregation": False},
        M[0],
    )
    return led


@pytest.fixture
def open0(led):
    """Round 0 of t1 open, dev-0 accepted in batch 0."""
    led.submit(GATEWAY, "OpenRound", "t1", 0, M[0], 2_000.0)
    led.submit(GATEWAY, "RecordUpdates", "t1", 0, [rec("dev-0"), rej("dev-3")])
    return led


def run_round(led, r, devices, batches=1):
    led.submit(GATEWAY, "OpenRound", "t1", r, M[r], led.time + 30)
    records = [rec(d, f"r{r}-{d}", samples=10 + i) for i, d in enumerate(devices)]
    records.append(rej(None, "malformed", f"r{r}-junk"))
    size = -(-len(records) // batches)
    for b in range(batches):
        led.submit(GATEWAY, "RecordUpdates", "t1", r, records[b * size : (b + 1) * size])
    return led.submit(
        GATEWAY,
        "CommitRound",
        "t1",
        r,
        M[r + 1],
        "fedavg",
        devices[::-1],
        {"accuracy": 0.5 + r / 10},
    )


# ---------------------------------------------------------------------------- registry


def test_transactions_and_kinds():
    assert {name: kind for name, (_, kind) in TX.items()} == {
        "CommitRound": "submit",
        "CreateTask": "submit",
        "EndTask": "submit",
        "GetDevice": "evaluate",
        "GetDevices": "evaluate",
        "GetDeviceContributions": "evaluate",
        "GetHistory": "evaluate",
        "GetRound": "evaluate",
        "GetTask": "evaluate",
        "OpenRound": "submit",
        "RecordUpdates": "submit",
        "RegisterDevice": "submit",
        "RevokeDevice": "submit",
        "RotateDeviceKey": "submit",
    }
    for name, (fn, _) in TX.items():
        assert next(iter(inspect.signature(fn).parameters)) == "ctx", name
        assert getattr(FedLedgerContract(), name) is fn


def test_contract_error_codes_are_fixed():
    err = ContractError("conflict", "no")
    assert isinstance(err, LedgerError) and err.code == "conflict" and str(err) == "conflict: no"
    with pytest.raises(ValueError):
        ContractError("oops", "unknown code")


# ---------------------------------------------------------------------------- happy path


def test_three_rounds_history_contributions_and_events(led):
    run_round(led, 0, ["dev-0", "dev-1"])
    run_round(led, 1, ["dev-0", "dev-1", "dev-2", "dev-9"], batches=2)
    last = run_round(led, 2, ["dev-1"])

    assert last["status"] == "committed" and last["contributors"] == ["dev-1"]
    r1 = led.evaluate(AUDITOR, "GetRound", "t1", 1)
    assert r1["batches"] == 2 and r1["accepted"] == 4 and r1["rejected"] == 1
    assert r1["rejected_by_reason"] == {"malformed": 1}
    assert r1["samples"] == 10 + 11 + 12 + 13
    assert r1["contributors"] == ["dev-0", "dev-1", "dev-2", "dev-9"]
    assert r1["metrics"] == {"accuracy": 0.6}
    # The gateway's own formula: Merkle root over contributors' digests sorted by device.
    assert (
        r1["updates_root"]
        == merkle_root(leaf_hash(bytes.fromhex(h(f"r1-{d}"))) for d in r1["contributors"]).hex()
    )

    history = led.evaluate(AUDITOR, "GetHistory", M[3])
    assert history["task"] == "t1" and history["initial_model"] == M[0]
    assert [r["round"] for r in history["rounds"]] == [2, 1, 0]
    assert [(r["base_model"], r["global_model"]) for r in history["rounds"]] == [
        (M[2], M[3]),
        (M[1], M[2]),
        (M[0], M[1]),
    ]
    assert history["rounds"][0]["contributors"] == ["dev-1"]
    assert [r["round"] for r in led.evaluate(AUDITOR, "GetHistory", M[1])["rounds"]] == [0]
    assert led.evaluate(AUDITOR, "GetHistory", M[0], "t1")["rounds"] == []

    contributions = led.evaluate(AUDITOR, "GetDeviceContributions", "dev-1")
    assert [(c["task"], c["round"]) for c in contributions] == [("t1", 0), ("t1", 1), ("t1", 2)]
    assert [c["global_model"] for c in contributions] == M[1:4]
    assert {c["status"] for c in contributions} == {"committed"}
    assert contributions[1]["digest"] == h("r1-dev-1") and contributions[1]["samples"] == 11
    assert [c["round"] for c in led.evaluate(AUDITOR, "GetDeviceContributions", "dev-9")] == [1]
    assert led.evaluate(AUDITOR, "GetDeviceContributions", "dev-3") == []

    recorded = led.events("UpdatesRecorded")
    assert [(e["round"], e["batch"]) for e in recorded] == [(0, 0), (1, 0), (1, 1), (2, 0)]
    first = recorded[0]
    assert (
        first["merkle_root"]
        == merkle_root(
            leaf_hash(bytes.fromhex(d)) for d in (h("r0-dev-0"), h("r0-dev-1"), h("r0-junk"))
        ).hex()
    )
    assert (first["accepted"], first["rejected"]) == (2, 1)
    committed = led.events("RoundCommitted")
    assert [(e["round"], e["global_model"], e["contributors"]) for e in committed] == [
        (0, M[1], 2),
        (1, M[2], 4),
        (2, M[3], 1),
    ]
    for ctx in led.contexts:
        if ctx.event is not None:
            assert canonical_json(json.loads(ctx.event[1])) == ctx.event[1]


def test_state_is_canonical_json_under_the_documented_keys(led):
    run_round(led, 0, ["dev-0", "dev-1"])
    for key, value in led.world.items():
        assert canonical_json(json.loads(value)) == value, key
    assert list(led.world) == [
        "contrib/dev-0/t1/00000000",
        "contrib/dev-1/t1/00000000",
        "device/dev-0",
        "device/dev-1",
        "device/dev-2",
        "device/dev-3",
        "device/dev-9",
        *sorted([f"model/{M[0]}/t1", f"model/{M[1]}/t1"]),
        "round/t1/00000000",
        "task/t1",
        "updates/t1/00000000/0000",
    ]
    batch = json.loads(led.world["updates/t1/00000000/0000"])
    assert [r["device"] for r in batch["records"]] == ["dev-0", "dev-1", None]
    assert batch["records"][2] == {
        "accepted": False,
        "codec": "int8",
        "device": None,
        "digest": h("r0-junk"),
        "reason": "malformed",
        "samples": 10,
    }


def test_timestamps_and_tx_ids_come_from_the_transaction(led):
    device = led.evaluate(AUDITOR, "GetDevice", "dev-3")
    assert device["status"] == "revoked" and device["revocation_reason"] == "key lost"
    assert device["registered_at"] == 1_004.0 and device["registered_tx"] == "tx-0003"
    assert device["revoked_at"] == 1_006.0 and device["revoked_by"] == "admin1"
    opened = led.submit(GATEWAY, "OpenRound", "t1", 0, M[0], 5.0)
    assert opened["opened_at"] == led.time and opened["opened_tx"] == led.contexts[-1].tx_id
    assert opened["deadline"] == 5.0


def test_rw_sets_are_recorded_and_deterministic(open0):
    def run(name, *args):
        fn, _ = TX[name]
        ctx = open0.world.context(tx_id="tx-same", timestamp=9_999.5, creator=GATEWAY)
        fn(ctx, *args)
        return ctx

    for name, args in [
        ("RecordUpdates", ("t1", 0, [rec("dev-1"), rej("dev-7", "unknown_device")])),
        ("CommitRound", ("t1", 0, M[1], "fedavg", ["dev-0"], {"accuracy": 0.75})),
    ]:
        a, b = run(name, *args), run(name, *args)
        assert a.read_set and a.write_set and a.event is not None
        assert a.read_set == b.read_set
        assert a.write_set == b.write_set and list(a.write_set) == list(b.write_set)
        assert a.event == b.event
    assert set(a.read_set) >= {"task/t1", "round/t1/00000000", "contrib/dev-0/t1/00000000"}
    assert set(a.write_set) == {"task/t1", "round/t1/00000000", f"model/{M[1]}/t1"}


def test_revocation_is_not_retroactive(open0):
    open0.submit(ADMIN, "RevokeDevice", "dev-0", "decommissioned")
    open0.submit(GATEWAY, "CommitRound", "t1", 0, M[1], "fedavg", ["dev-0"], {})
    open0.submit(GATEWAY, "OpenRound", "t1", 1, M[1], 3_000)
    open0.refused("revoked", GATEWAY, "RecordUpdates", "t1", 1, [rec("dev-0")])


def test_rejected_records_of_unknown_or_revoked_devices_are_kept(open0):
    out = open0.submit(
        GATEWAY,
        "RecordUpdates",
        "t1",
        0,
        [
            rej("dev-7", "unknown_device"),
            rej("dev-3", "bad_signature"),
            {
                "device": None,
                "digest": h("x"),
                "samples": None,
                "codec": None,
                "accepted": False,
                "reason": "malformed",
            },
            rej("dev-0", "duplicate"),
        ],
    )
    assert (out["batch"], out["accepted"], out["rejected"]) == (1, 0, 4)
    rnd = open0.evaluate(AUDITOR, "GetRound", "t1", 0)
    assert rnd["rejected_by_reason"] == {
        "bad_signature": 2,
        "duplicate": 1,
        "malformed": 1,
        "unknown_device": 1,
    }


def test_a_round_without_contributors_keeps_its_model(led):
    led.submit(GATEWAY, "OpenRound", "t1", 0, M[0], 2_000)
    led.refused("conflict", GATEWAY, "CommitRound", "t1", 0, M[1], "fedavg", [], {})
    led.submit(GATEWAY, "CommitRound", "t1", 0, M[0], "fedavg", [], {})
    led.submit(GATEWAY, "OpenRound", "t1", 1, M[0], 2_000)
    led.submit(GATEWAY, "RecordUpdates", "t1", 1, [rec("dev-1")])
    led.submit(GATEWAY, "CommitRound", "t1", 1, M[1], "fedavg", ["dev-1"], {})
    assert [r["round"] for r in led.evaluate(AUDITOR, "GetHistory", M[0])["rounds"]] == [0]
    assert [r["round"] for r in led.evaluate(AUDITOR, "GetHistory", M[1])["rounds"]] == [1, 0]


def test_history_takes_a_unique_prefix_of_a_model_hash(led):
    x, y = "abcdef" + "1" * 58, "abcdef" + "2" * 58
    led.submit(GATEWAY, "OpenRound", "t1", 0, M[0], 2_000)
    led.submit(GATEWAY, "RecordUpdates", "t1", 0, [rec("dev-1")])
    led.submit(GATEWAY, "CommitRound", "t1", 0, x, "fedavg", ["dev-1"], {})
    led.submit(GATEWAY, "OpenRound", "t1", 1, x, 2_000)
    led.submit(GATEWAY, "RecordUpdates", "t1", 1, [rec("dev-1")])
    led.submit(GATEWAY, "CommitRound", "t1", 1, y, "fedavg", ["dev-1"], {})
    assert led.evaluate(AUDITOR, "GetHistory", "abcdef1")["model"] == x
    assert [r["round"] for r in led.evaluate(AUDITOR, "GetHistory", "abcdef2", "t1")["rounds"]] == [
        1,
        0,
    ]
    err = led.refused("conflict", AUDITOR, "GetHistory", "abcdef")
    assert "ambiguous" in err.message and "abcdef1111111111" in err.message
    led.refused("not_found", AUDITOR, "GetHistory", M[4][:10])
    led.refused("not_found", AUDITOR, "GetHistory", "abcdef1", "t9")
    err = led.refused("invalid_argument", AUDITOR, "GetHistory", "abcde")
    assert "prefix" in err.message


def test_history_of_a_model_shared_by_two_tasks_needs_the_task(led):
    led.submit(ADMIN2, "CreateTask", "t2", "Org2MSP", "gw@org2", SPEC, "fedavg", {}, M[0])
    err = led.refused("conflict", AUDITOR, "GetHistory", M[0])
    assert "t1, t2" in err.message
    assert led.evaluate(AUDITOR, "GetHistory", M[0], "t2")["task"] == "t2"
    led.refused("not_found", AUDITOR, "GetHistory", M[4])
    led.refused("not_found", AUDITOR, "GetHistory", M[0], "t3")


def test_the_task_records_its_settings(led):
    task = json.loads(led.world["task/t1"])
    assert task["gateway"] == "gateway1" and task["org"] == "Org1MSP"
    assert task["privacy"] == {"dp": {"clip": 1.0, "epsilon": 1.0}, "secure_aggregation": False}
    assert (task["next_round"], task["open_round"], task["model"]) == (0, None, M[0])


# ---------------------------------------------------------------------------- rules


OTHER_ORG_GATEWAY = Identity("Org2MSP", "gateway1", "gateway")
OTHER_GATEWAY = Identity("Org1MSP", "gateway2", "gateway")


@pytest.mark.parametrize(
    ("who", "name", "args"),
    [
        (GATEWAY, "RegisterDevice", ("dev-5", "Org1MSP", "wearable", h("k"))),
        (AUDITOR, "RegisterDevice", ("dev-5", "Org2MSP", "wearable", h("k"))),
        (ADMIN2, "RegisterDevice", ("dev-5", "Org1MSP", "wearable", h("k"))),
        (ADMIN2, "RevokeDevice", ("dev-0", "not mine")),
        (GATEWAY, "RevokeDevice", ("dev-0", "not an admin")),
        (GATEWAY, "CreateTask", ("t9", "Org1MSP", "gateway1", SPEC, "fedavg", {}, M[0])),
        (ADMIN2, "CreateTask", ("t9", "Org1MSP", "gateway1", SPEC, "fedavg", {}, M[0])),
        (ADMIN, "OpenRound", ("t1", 0, M[0], 2_000)),
        (OTHER_ORG_GATEWAY, "OpenRound", ("t1", 0, M[0], 2_000)),
        (OTHER_GATEWAY, "OpenRound", ("t1", 0, M[0], 2_000)),
        (Identity("Org1MSP", "gateway1", "device"), "OpenRound", ("t1", 0, M[0], 2_000)),
        (Identity("Org1MSP", "gateway1", "root"), "GetDevice", ("dev-0",)),
        (Identity("", "x", "auditor"), "GetDevice", ("dev-0",)),
        ("Org1MSP/admin1", "GetDevice", ("dev-0",)),
    ],
)
def test_wrong_identity_is_forbidden(led, who, name, args):
    led.refused("forbidden", who, name, *args)


@pytest.mark.parametrize("who", [ADMIN, OTHER_ORG_GATEWAY, OTHER_GATEWAY, AUDITOR])
def test_only_the_task_gateway_records_and_commits(open0, who):
    open0.refused("forbidden", who, "RecordUpdates", "t1", 0, [rec("dev-1")])
    open0.refused("forbidden", who, "CommitRound", "t1", 0, M[1], "fedavg", ["dev-0"], {})


def test_registry_conflicts(led):
    led.refused("conflict", ADMIN, "RegisterDevice", "dev-0", "Org1MSP", "wearable", h("k"))
    led.refused("conflict", ADMIN, "RegisterDevice", "dev-3", "Org1MSP", "wearable", h("k"))
    led.refused("conflict", ADMIN, "RevokeDevice", "dev-3", "again")
    led.refused("not_found", ADMIN, "RevokeDevice", "dev-5", "never registered")
    led.refused("not_found", AUDITOR, "GetDevice", "dev-5")
    led.refused("not_found", AUDITOR, "GetDeviceContributions", "dev-5")
    led.refused("conflict", ADMIN, "CreateTask", "t1", "Org1MSP", "gw", SPEC, "fedavg", {}, M[1])


def test_rounds_open_in_order_on_the_right_base(led):
    led.refused("not_found", GATEWAY, "OpenRound", "t9", 0, M[0], 2_000)
    led.refused("conflict", GATEWAY, "OpenRound", "t1", 1, M[0], 2_000)
    led.refused("conflict", GATEWAY, "OpenRound", "t1", 0, M[1], 2_000)
    led.submit(GATEWAY, "OpenRound", "t1", 0, M[0], 2_000)
    led.refused("conflict", GATEWAY, "OpenRound", "t1", 0, M[0], 2_000)
    led.refused("conflict", GATEWAY, "OpenRound", "t1", 1, M[0], 2_000)
    led.submit(GATEWAY, "RecordUpdates", "t1", 0, [rec("dev-0")])
    led.submit(GATEWAY, "CommitRound", "t1", 0, M[1], "fedavg", ["dev-0"], {})
    led.refused("conflict", GATEWAY, "OpenRound", "t1", 2, M[1], 2_000)
    led.refused("conflict", GATEWAY, "OpenRound", "t1", 1, M[0], 2_000)
    led.refused("conflict", GATEWAY, "OpenRound", "t1", 0, M[0], 2_000)
    led.submit(GATEWAY, "OpenRound", "t1", 1, M[1], 2_000)


def test_commit_rules(open0):
    commit = ("t1", 0, M[1], "fedavg")
    open0.refused("not_found", GATEWAY, "CommitRound", "t1", 1, M[1], "fedavg", [], {})
    open0.refused("not_found", GATEWAY, "CommitRound", "t9", 0, M[1], "fedavg", [], {})
    open0.refused("conflict", GATEWAY, "CommitRound", *commit, [], {})
    open0.refused("conflict", GATEWAY, "CommitRound", *commit, ["dev-1"], {})
    open0.refused("conflict", GATEWAY, "CommitRound", *commit, ["dev-0", "dev-1"], {})
    open0.refused("conflict", GATEWAY, "CommitRound", *commit, ["dev-3"], {})
    open0.refused("invalid_argument", GATEWAY, "CommitRound", *commit, ["dev-0", "dev-0"], {})
    open0.refused("conflict", GATEWAY, "CommitRound", "t1", 0, M[1], "median", ["dev-0"], {})
    open0.submit(GATEWAY, "CommitRound", *commit, ["dev-0"], {"accuracy": 0.9})
    open0.refused("conflict", GATEWAY, "CommitRound", *commit, ["dev-0"], {"accuracy": 0.9})
    open0.refused("conflict", GATEWAY, "CommitRound", "t1", 0, M[2], "fedavg", ["dev-0"], {})
    open0.refused("conflict", GATEWAY, "RecordUpdates", "t1", 0, [rec("dev-1")])
    open0.refused("conflict", GATEWAY, "RecordUpdates", "t1", 0, [rej("dev-1")])
    open0.refused("not_found", GATEWAY, "CommitRound", "t1", 1, M[2], "fedavg", [], {})


def test_record_rules(open0):
    def refused(code, records, round_=0):
        return open0.refused(code, GATEWAY, "RecordUpdates", "t1", round_, records)

    refused("revoked", [rec("dev-1"), rec("dev-3")])
    refused("not_found", [rec("dev-1"), rec("dev-7")])
    refused("conflict", [rec("dev-1"), rec("dev-1", "again")])
    refused("conflict", [rec("dev-0", "second")])  # accepted in an earlier batch
    refused("not_found", [rec("dev-1")], round_=1)
    assert (
        "records[1]" in refused("invalid_argument", [rec("dev-1"), rec("dev-2", samples=0)]).message
    )
    open0.submit(GATEWAY, "RecordUpdates", "t1", 0, [rec("dev-1"), rec("dev-9")])
    assert open0.evaluate(AUDITOR, "GetRound", "t1", 0)["accepted"] == 3


def bad(**changes):
    record = rec("dev-1")
    record.update(changes)
    return record


@pytest.mark.parametrize(
    "records",
    [
        [],
        {"device": "dev-1"},
        "dev-1",
        [bad(digest="ab" * 31)],
        [bad(digest="AB" * 32)],
        [bad(digest="zz" * 32)],
        [bad(digest=h("x") + "\n")],
        [bad(digest=None)],
        [bad(samples=0)],
        [bad(samples=-3)],
        [bad(samples=True)],
        [bad(samples=1.5)],
        [bad(samples="10")],
        [bad(samples=None)],
        [bad(samples=2**31)],
        [bad(codec="f16")],
        [bad(codec=None)],
        [bad(accepted=1)],
        [bad(accepted="true")],
        [bad(reason="late")],
        [bad(device=None)],
        [bad(device="dev/1")],
        [bad(device="dev-1\n")],
        [bad(device="")],
        [bad(extra=1)],
        [{k: v for k, v in rec("dev-1").items() if k != "codec"}],
        [rej("dev-1", reason=None)],
        [rej("dev-1", reason="Not A Code")],
        [rej("dev-1") | {"samples": 0}],
        [rej("dev-1") | {"codec": "gzip"}],
        [rec(f"dev-{i % 3}", f"u{i}") for i in range(1_001)],
    ],
)
def test_bad_records_are_invalid(open0, records):
    open0.refused("invalid_argument", GATEWAY, "RecordUpdates", "t1", 0, records)


@pytest.mark.parametrize(
    ("who", "name", "args"),
    [
        (ADMIN, "RegisterDevice", ("dev 5", "Org1MSP", "wearable", h("k"))),
        (ADMIN, "RegisterDevice", ("dev-5", "Org1MSP", "wearable", "sha256:" + h("k"))),
        (ADMIN, "RegisterDevice", ("dev-5", "Org1MSP", "", h("k"))),
        (ADMIN, "RegisterDevice", ("dev-5", 7, "wearable", h("k"))),
        (ADMIN, "RevokeDevice", ("dev-0", "")),
        (ADMIN, "RevokeDevice", ("dev-0", "line\nbreak")),
        (ADMIN, "RevokeDevice", ("dev-0", "x" * 201)),
        (ADMIN, "CreateTask", ("t9", "Org1MSP", "gate way", SPEC, "fedavg", {}, M[0])),
        (ADMIN, "CreateTask", ("t9", "Org1MSP", "gateway1", SPEC, "FedAvg", {}, M[0])),
        (ADMIN, "CreateTask", ("t9", "Org1MSP", "gateway1", SPEC, "fedavg", [], M[0])),
        (
            ADMIN,
            "CreateTask",
            ("t9", "Org1MSP", "gateway1", SPEC, "fedavg", {"eps": math.nan}, M[0]),
        ),
        (ADMIN, "CreateTask", ("t9", "Org1MSP", "gateway1", SPEC, "fedavg", {"Eps": 1}, M[0])),
        (
            ADMIN,
            "CreateTask",
            ("t9", "Org1MSP", "gateway1", SPEC, "fedavg", {"a": {"b": {"c": {"d": {}}}}}, M[0]),
        ),
        (
            ADMIN,
            "CreateTask",
            ("t9", "Org1MSP", "gateway1", SPEC, "fedavg", {"n": "x" * 5_000}, M[0]),
        ),
        (ADMIN, "CreateTask", ("t9", "Org1MSP", "gateway1", SPEC, "fedavg", {"o": object()}, M[0])),
        (ADMIN, "CreateTask", ("t9", "Org1MSP", "gateway1", SPEC, "fedavg", {}, M[0][:-1])),
        (GATEWAY, "OpenRound", ("t1", -1, M[0], 2_000)),
        (GATEWAY, "OpenRound", ("t1", 10**8, M[0], 2_000)),
        (GATEWAY, "OpenRound", ("t1", "0", M[0], 2_000)),
        (GATEWAY, "OpenRound", ("t1", False, M[0], 2_000)),
        (GATEWAY, "OpenRound", ("t1", 0, M[0], math.inf)),
        (GATEWAY, "OpenRound", ("t1", 0, M[0], -1)),
        (GATEWAY, "OpenRound", ("t1", 0, M[0], "soon")),
        (GATEWAY, "CommitRound", ("t1", 0, M[1], "fedavg", "dev-0", {})),
        (GATEWAY, "CommitRound", ("t1", 0, M[1], "fedavg", ["dev-0"], {"accuracy": math.nan})),
        (GATEWAY, "CommitRound", ("t1", 0, M[1], "fedavg", ["dev-0"], {"accuracy": "high"})),
        (GATEWAY, "CommitRound", ("t1", 0, M[1], "fedavg", ["dev-0"], {"Accuracy": 1.0})),
        (GATEWAY, "CommitRound", ("t1", 0, M[1], "fedavg", ["dev-0"], [0.9])),
        (AUDITOR, "GetRound", ("t1", -1)),
        (AUDITOR, "GetHistory", ("not-a-hash",)),
        (AUDITOR, "GetHistory", (M[0], "t/1")),
        (AUDITOR, "GetDeviceContributions", ("dev-0/",)),
    ],
)
def test_bad_arguments_are_invalid(open0, who, name, args):
    open0.refused("invalid_argument", who, name, *args)


def test_the_transaction_time_must_be_valid(led):
    ctx = led.world.context(tx_id="tx", timestamp=0.0, creator=ADMIN)
    ctx.timestamp = -1.0  # an adapter handing over a broken proposal timestamp
    with pytest.raises(ContractError) as info:
        TX["RegisterDevice"][0](ctx, "dev-5", "Org1MSP", "wearable", h("k"))
    assert info.value.code == "invalid_argument"


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=70)
    | st.sampled_from(["\ud800", "tab\there", "x" * 5_000, 10**400, -(2**63)]),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
_field = {
    "device": st.sampled_from(["dev-0", "dev-1", "dev-3", "dev-7", None, "", "a/b"]) | _json,
    "digest": st.sampled_from([h("a"), h("b"), "00" * 32, "0" * 63]) | _json,
    "samples": st.integers(-2, 3) | _json,
    "codec": st.sampled_from(["int8", "f32", None, "x"]) | _json,
    "accepted": st.booleans() | _json,
    "reason": st.sampled_from([None, "malformed", "Bad"]) | _json,
}
_record = st.fixed_dictionaries(_field) | _json


@settings(max_examples=300, deadline=None)
@given(records=st.lists(_record, max_size=4) | _json, metrics=_json, privacy=_json)
def test_any_argument_either_succeeds_or_raises_a_contract_error(records, metrics, privacy):
    """Whatever an adapter decodes, the contract answers with a result or a ContractError."""
    led = Ledger()
    led.submit(ADMIN, "RegisterDevice", "dev-0", "Org1MSP", "wearable", h("k0"))
    led.submit(ADMIN, "RegisterDevice", "dev-1", "Org1MSP", "wearable", h("k1"))
    led.submit(ADMIN, "RegisterDevice", "dev-3", "Org1MSP", "wearable", h("k3"))
    led.submit(ADMIN, "RevokeDevice", "dev-3", "lost")
    led.submit(ADMIN, "CreateTask", "t1", "Org1MSP", "gateway1", SPEC, "fedavg", {}, M[0])
    led.submit(GATEWAY, "OpenRound", "t1", 0, M[0], 2_000)
    calls = [
        ("RecordUpdates", ("t1", 0, records)),
        ("CommitRound", ("t1", 0, M[1], "fedavg", [], metrics)),
        ("CommitRound", ("t1", 0, M[0], "fedavg", [], metrics)),
        ("CreateTask", ("t2", "Org1MSP", "gateway1", SPEC, "fedavg", privacy, M[0])),
    ]
    for name, args in calls:
        fn, _ = TX[name]
        ctx = led.context(ADMIN if name == "CreateTask" else GATEWAY)
        try:
            fn(ctx, *args)
        except ContractError as exc:
            assert exc.code in CODES
        else:
            for value in ctx.write_set.values():
                assert canonical_json(json.loads(value)) == value


# ---------------------------------------------------------------------------- the context


def test_reads_see_committed_state_only():
    world = MemoryWorldState()
    ctx = world.context(tx_id="a", timestamp=1.0, creator=ADMIN)
    ctx.put_state("k/1", b"1")
    assert ctx.get_state("k/1") is None and list(ctx.get_state_by_prefix("k/")) == []
    assert "k/1" not in world
    assert world.commit(ctx) == 1 and world["k/1"] == b"1" and world.version("k/1") == 1
    later = world.context(tx_id="b", timestamp=2.0, creator=ADMIN)
    assert later.get_state("k/1") == b"1" and later.read_set == {"k/1": 1}
    with pytest.raises(LedgerError, match="already committed"):
        world.commit(ctx)
    with pytest.raises(LedgerError, match="another world"):
        MemoryWorldState().commit(later)


def test_prefix_reads_are_sorted_and_recorded():
    world = MemoryWorldState()
    ctx = world.context(tx_id="a", timestamp=1.0, creator=ADMIN)
    for key in ["p/b", "p/a", "q/a", "p-x/a", "p/c"]:
        ctx.put_state(key, key.encode())
    world.commit(ctx)
    reader = world.context(tx_id="b", timestamp=2.0, creator=ADMIN)
    assert [k for k, _ in reader.get_state_by_prefix("p/")] == ["p/a", "p/b", "p/c"]
    assert reader.range_reads == [("p/", ("p/a", "p/b", "p/c"))]
    assert reader.read_set == {"p/a": 1, "p/b": 1, "p/c": 1}


def test_stale_reads_fail_at_commit_like_fabric_mvcc(open0):
    """Two gateways' batches endorsed on the same state: the second one must be re-run."""
    fn, _ = TX["RecordUpdates"]
    first = open0.world.context(tx_id="x1", timestamp=3_000.0, creator=GATEWAY)
    second = open0.world.context(tx_id="x2", timestamp=3_000.0, creator=GATEWAY)
    fn(first, "t1", 0, [rec("dev-1")])
    fn(second, "t1", 0, [rec("dev-1")])
    open0.world.commit(first)
    before = dict(open0.world)
    with pytest.raises(MVCCConflictError) as info:
        open0.world.commit(second)
    assert info.value.code == "MVCC_READ_CONFLICT" and info.value.tx_id == "x2"
    assert dict(open0.world) == before


def test_phantom_reads_fail_at_commit(open0):
    reader = open0.world.context(tx_id="r", timestamp=3_000.0, creator=AUDITOR)
    TX["GetDeviceContributions"][0](reader, "dev-1")
    open0.submit(GATEWAY, "RecordUpdates", "t1", 0, [rec("dev-1")])
    with pytest.raises(MVCCConflictError) as info:
        open0.world.commit(reader)
    assert info.value.code == "PHANTOM_READ_CONFLICT" and info.value.key == "contrib/dev-1/"


def test_context_refuses_what_fabric_would_not_do():
    world = MemoryWorldState()
    ctx = world.context(tx_id="a", timestamp=1.0, creator=ADMIN)
    ctx.set_event("One", b"{}")
    with pytest.raises(LedgerError, match="one event"):
        ctx.set_event("Two", b"{}")
    for key in ["", "\x00composite", 7]:
        with pytest.raises(TypeError):
            ctx.put_state(key, b"x")
    with pytest.raises(TypeError):
        ctx.put_state("k", "text")
    with pytest.raises(TypeError):
        ctx.put_state("k", b"")
    readonly = world.context(tx_id="b", timestamp=1.0, creator=ADMIN, read_only=True)
    with pytest.raises(LedgerError, match="read-only"):
        readonly.put_state("k", b"x")
    with pytest.raises(LedgerError, match="read-only"):
        readonly.set_event("E", b"{}")
    for stamp in [math.nan, math.inf, "1", True]:
        with pytest.raises(TypeError):
            world.context(tx_id="c", timestamp=stamp, creator=ADMIN)
    with pytest.raises(TypeError):
        world.context(tx_id="", timestamp=1.0, creator=ADMIN)


# ---------------------------------------------------------------------------- purity


FORBIDDEN_MODULES = {
    "time", "datetime", "random", "os", "sqlite3", "socket", "secrets", "uuid", "pathlib",
    "io", "subprocess", "threading", "asyncio", "logging", "urllib", "http", "shutil", "tempfile",
}  # fmt: skip
ALLOWED_MODULES = {
    "__future__", "collections.abc", "dataclasses", "hashlib", "json", "math", "re", "typing",
    "fedcore", "ledger._context", "ledger._errors", "ledger._merkle",
}  # fmt: skip
FORBIDDEN_CALLS = {"open", "print", "input", "eval", "exec", "compile", "__import__", "hash", "id"}


def imported_modules(module):
    tree = ast.parse(inspect.getsource(module))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield f"ledger.{node.module}" if node.level else node.module


@pytest.mark.parametrize("module", [ledger._contract, ledger._context, ledger._merkle])
def test_the_contract_does_no_io_and_reads_no_clock(module):
    names = set(imported_modules(module))
    assert not {n.split(".")[0] for n in names} & FORBIDDEN_MODULES
    assert names <= ALLOWED_MODULES, names - ALLOWED_MODULES
    globals_ = {
        value.__name__.split(".")[0] for value in vars(module).values() if inspect.ismodule(value)
    }
    assert not globals_ & FORBIDDEN_MODULES
    calls = {
        node.func.id
        for node in ast.walk(ast.parse(inspect.getsource(module)))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    }
    assert not calls & FORBIDDEN_CALLS


def test_get_devices_reads_the_fleet_in_one_query(led):
    found = led.evaluate(GATEWAY, "GetDevices", ["dev-0", "dev-3", "dev-7", "dev-9"])
    assert sorted(found) == ["dev-0", "dev-3", "dev-9"]  # dev-7 is not registered
    assert found["dev-3"]["status"] == "revoked" and found["dev-0"]["status"] != "revoked"
    assert led.evaluate(GATEWAY, "GetDevices", []) == {}
    with pytest.raises(ContractError, match="device_ids"):
        led.evaluate(GATEWAY, "GetDevices", ["dev-0"] * 1001)
    with pytest.raises(ContractError, match="device_id"):
        led.evaluate(GATEWAY, "GetDevices", ["not an id"])
