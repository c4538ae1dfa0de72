"""Secure aggregation rounds with real agents over the in-memory broker: the gateway
unmasks exactly the survivors' sum, survives dropouts after sharing and its own restart
mid-stage, refuses bad stage messages, and never holds a device's plaintext update."""

from __future__ import annotations

import base64
import json
import logging

import numpy as np
import pytest
from pydantic import ValidationError

from edge_agent import _secagg as agent_secagg
from fedcore import (
    InMemoryBroker,
    TaskSpec,
    UpdateHeader,
    canonical_json,
    encode_update,
    generate_key,
    public_key_b64,
    secagg_topic,
    signer_from_key,
    update_topic,
)
from fedcore import secagg as sa
from gateway import DeviceRegistry
from gateway import _secagg as gateway_secagg
from ledger import Identity, privacy_report

from .fleet import Clock, gateway_chain, make_agents, make_gateway, pump

AUDITOR = Identity("org1", "auditor", "auditor")
SEED = bytes(range(32))


def secagg_task(task: TaskSpec, *, dp: dict | None = None, **terms) -> TaskSpec:
    data = {**task.model_dump(), "id": "sa-task", "secagg": {"stage_timeout": 5.0, **terms}}
    if dp is not None:
        data["dp"] = dp
    elif "clip" not in terms:
        data["secagg"]["clip"] = 1.0
    return TaskSpec.model_validate(data)


class Recorder:
    """What the devices quantized (before masking) and what the gateway unmasked, per round."""

    def __init__(self, monkeypatch):
        self.quantized: dict[int, dict[str, np.ndarray]] = {}
        self.unmasked: dict[int, np.ndarray] = {}
        self.masked_inputs: list[tuple[int, str]] = []
        on_relay = agent_secagg.DeviceRound.on_relay
        unmasked = gateway_secagg.SecAggAggregator.unmasked
        recorder = self

        def spy_relay(session, data):
            plain = session.quantized.copy()
            out = on_relay(session, data)
            if out is not None:
                recorder.quantized.setdefault(session.round, {})[session.device] = plain
            return out

        def spy_unmasked(aggregator, plain):
            recorder.unmasked[len(recorder.unmasked)] = np.array(plain)
            return unmasked(aggregator, plain)

        monkeypatch.setattr(agent_secagg.DeviceRound, "on_relay", spy_relay)
        monkeypatch.setattr(gateway_secagg.SecAggAggregator, "unmasked", spy_unmasked)


def make_fleet(tmp_path, spec, gateway_key, dataset, n, clock=None, **options):
    keys = {f"dev-{i:02d}": generate_key() for i in range(n)}
    registry = DeviceRegistry({d: public_key_b64(k) for d, k in keys.items()})
    broker = InMemoryBroker()
    clock = clock or Clock()
    gateway = make_gateway(tmp_path, spec, registry, gateway_key, dataset, broker, clock, **options)
    agents = make_agents(spec, keys, gateway_key, dataset, broker)
    gateway.connect()
    return gateway, agents, broker, keys, clock


def run_to_end(gateway, agents, limit=40):
    for _ in range(limit):
        if gateway.finished:
            break
        pump(gateway, agents)
    assert gateway.finished
    gateway.outbox.drain(10)


def test_the_gateway_unmasks_exactly_the_sum_of_the_quantized_updates(
    tmp_path, task, gateway_key, dataset, monkeypatch
):
    spec = secagg_task(task)
    seen = Recorder(monkeypatch)
    gateway, agents, *_ = make_fleet(tmp_path, spec, gateway_key, dataset, 5)
    try:
        gateway.start()
        run_to_end(gateway, agents)
        assert len(gateway.results) == spec.rounds
        assert [r.participants for r in gateway.results] == [5] * spec.rounds
        for round_ in range(spec.rounds):
            expected = sum(seen.quantized[round_].values())
            np.testing.assert_array_equal(seen.unmasked[round_], expected)
        # the global model learns: the unmasked mean of the clipped updates
        assert gateway.results[-1].accuracy > 0.9
        record = gateway.ledger.evaluate("GetRound", spec.id, 0, identity=AUDITOR)
        assert record["metrics"]["secagg_shared"] == 5
        assert record["metrics"]["secagg_bits"] == sa.modulus_bits(5)
        task_record = gateway.ledger.evaluate("GetTask", spec.id, identity=AUDITOR)
        assert task_record["privacy"]["secure_aggregation"] is True
        assert task_record["privacy"]["secagg"]["threshold"] == 0.5
        report = gateway.ledger.verify(replay=True, store=gateway.store)
        assert report.ok and report.checked_aggregates == spec.rounds
        record = gateway.ledger.evaluate("GetRound", spec.id, 1, identity=AUDITOR)
        assert record["aggregate_sha256"] == sa.aggregate_digest(seen.unmasked[1])
    finally:
        gateway.close()


def test_verify_unmasks_the_stored_sum_again_and_catches_a_changed_one(
    tmp_path, task, gateway_key, dataset
):
    spec = secagg_task(task)
    gateway, agents, *_ = make_fleet(tmp_path, spec, gateway_key, dataset, 4)
    try:
        gateway.start()
        run_to_end(gateway, agents)
        assert gateway.ledger.verify(store=gateway.store).checked_aggregates == spec.rounds
        # the gateway's record of round 1's sum, its masked sum changed by one
        rows = gateway.store.secagg_messages(spec.id, 1)
        frame = next(f for stage, device, _c, f in rows if stage == "sum" and not device)
        data = json.loads(frame)
        bits = json.loads(next(f for st, d, _c, f in rows if st == "roster" and not d))["bits"]
        masked = sa.unpack_bits(base64.b64decode(data["masked_sum"]), bits, data["count"])
        masked[0] = (int(masked[0]) + 1) % (1 << bits)
        data["masked_sum"] = base64.b64encode(sa.pack_bits(masked, bits)).decode()
        with gateway.store._db:
            gateway.store._db.execute(
                "UPDATE secagg_messages SET frame = ? WHERE task = ? AND round = 1 AND stage ="
                " 'sum'", (canonical_json(data), spec.id),
            )  # fmt: skip
        report = gateway.ledger.verify(store=gateway.store)
        assert not report.ok
        kinds = {(d.kind, d.round) for d in report.discrepancies}
        assert ("aggregate_differs", 1) in kinds
        details = " ".join(d.detail for d in report.discrepancies)
        assert "do not sum to the recorded masked sum" in details
        assert "the ledger records" in details
    finally:
        gateway.close()


def test_the_contract_wants_the_sum_hash_of_a_secure_task_only(tmp_path, gateway_key):
    from ledger import ContractError

    chain = gateway_chain(tmp_path / "l.sqlite", gateway_key)
    admin, me = Identity("org1", "admin", "admin"), Identity("org1", "gateway", "gateway")
    for task_id, secure in (("secure", True), ("plain", False)):
        chain.submit("CreateTask", task_id, "org1", "gateway", "a" * 64, "fedavg",
                     {"secure_aggregation": secure}, "b" * 64, identity=admin)  # fmt: skip
        chain.submit("OpenRound", task_id, 0, "b" * 64, 0.0, identity=me)
    chain.submit("RegisterDevice", "dev-1", "org1", "default", "f" * 64, identity=admin)
    for task_id in ("secure", "plain"):
        chain.submit("RecordUpdates", task_id, 0, [{"device": "dev-1", "digest": "c" * 64,
                     "samples": 3, "codec": "int8", "accepted": True, "reason": None}],
                     identity=me)  # fmt: skip
    with pytest.raises(ContractError, match="the sum's hash is due"):
        chain.submit("CommitRound", "secure", 0, "d" * 64, "fedavg", ["dev-1"], {}, identity=me)
    with pytest.raises(ContractError, match="does not aggregate securely"):
        chain.submit("CommitRound", "plain", 0, "d" * 64, "fedavg", ["dev-1"], {}, "e" * 64,
                     identity=me)  # fmt: skip
    chain.submit("CommitRound", "secure", 0, "d" * 64, "fedavg", ["dev-1"], {}, "e" * 64,
                 identity=me)  # fmt: skip
    assert chain.evaluate("GetRound", "secure", 0, identity=me)["aggregate_sha256"] == "e" * 64
    assert chain.verify(replay=True).ok


def test_two_devices_dropping_after_sharing_leave_the_survivors_sum(
    tmp_path, task, gateway_key, dataset, monkeypatch
):
    spec = secagg_task(task)
    seen = Recorder(monkeypatch)
    gateway, agents, _broker, _keys, clock = make_fleet(tmp_path, spec, gateway_key, dataset, 8)
    try:
        gateway.start()
        for _ in range(6):  # keys, roster, shares, relay
            for agent in agents:
                agent.step(0)
            gateway.step(0)
            if gateway.protocol._stage == "masked":
                break
        assert gateway.protocol._stage in ("masked", "reveal")
        # two devices die holding their relayed shares, before masking
        gone = {a.device for a in agents[:2]}
        live = agents[2:]
        for _ in range(4):
            pump(gateway, live)
        assert gateway.protocol._stage == "masked"
        clock.now += spec.secagg.stage_timeout + 1
        for _ in range(6):
            pump(gateway, live)
            if gateway.results:
                break
        assert gateway.results[0].participants == 6
        survivors = {d: q for d, q in seen.quantized[0].items() if d not in gone}
        np.testing.assert_array_equal(seen.unmasked[0], sum(survivors.values()))
        record = gateway.ledger.evaluate("GetRound", spec.id, 0, identity=AUDITOR)
        assert record["metrics"]["secagg_dropped"] == 2
        assert sorted(record["contributors"]) == sorted(survivors)
    finally:
        gateway.close()


def test_too_many_dropouts_for_the_threshold_keep_the_round_waiting(
    tmp_path, task, gateway_key, dataset, caplog
):
    """k = 4, t = 4 (threshold 1.0): one device gone after masking leaves its neighbours'
    self-mask seeds one share short; the round does not close on a wrong sum."""
    spec = secagg_task(task, neighbours=4, threshold=1.0)
    gateway, agents, _b, _k, clock = make_fleet(tmp_path, spec, gateway_key, dataset, 6)
    try:
        gateway.start()
        for _ in range(8):
            pump(gateway, agents)
            if gateway.protocol._stage == "reveal":
                break
        assert gateway.protocol._stage == "reveal"
        clock.now += spec.round_timeout + 1
        with caplog.at_level(logging.WARNING):
            for _ in range(3):
                pump(gateway, agents[1:])  # one survivor never reveals
                clock.now += spec.secagg.stage_timeout + 1
        assert not gateway.results
        assert gateway.protocol._stage == "reveal"
        assert "stage reveal" in caplog.text
        pump(gateway, agents)  # it comes back and reveals: the round closes
        pump(gateway, agents)
        assert gateway.results and gateway.results[0].participants == 6
    finally:
        gateway.close()


def test_a_gateway_restarted_mid_stage_resumes_the_round(
    tmp_path, task, gateway_key, dataset, monkeypatch
):
    spec = secagg_task(task)
    seen = Recorder(monkeypatch)
    gateway, agents, broker, keys, clock = make_fleet(tmp_path, spec, gateway_key, dataset, 5)
    gateway.start()
    for agent in agents:
        agent.step(0)  # keys
    gateway.step(0)  # roster
    assert gateway.protocol._stage == "shares"
    for agent in agents:
        agent.step(0)  # shares: taken, stored, before the gateway dies
    gateway.step(0)
    stage = gateway.protocol._stage
    assert stage == "masked"
    gateway.close()
    again = make_gateway(tmp_path, spec, gateway.registry, gateway_key, dataset, broker, clock)
    try:
        again.connect()
        again.start()
        assert again.protocol._stage == stage
        assert again.protocol._u2 == gateway.protocol._u2
        run_to_end(again, agents)
        assert [r.participants for r in again.results] == [5] * spec.rounds
        np.testing.assert_array_equal(seen.unmasked[0], sum(seen.quantized[0].values()))
        assert again.ledger.verify(replay=True, store=again.store).ok
    finally:
        again.close()


def test_no_plaintext_update_reaches_the_store_the_logs_or_the_round_state(
    tmp_path, task, gateway_key, dataset, monkeypatch, caplog
):
    spec = secagg_task(task)
    seen = Recorder(monkeypatch)
    gateway, agents, *_ = make_fleet(tmp_path, spec, gateway_key, dataset, 4)
    with caplog.at_level(logging.DEBUG):
        gateway.start()
        for _ in range(12):
            pump(gateway, agents)
            if gateway.results:
                break
    try:
        assert gateway.results
        bits = sa.modulus_bits(4)
        blob = b"".join(p.read_bytes() for p in tmp_path.glob("store.sqlite*"))
        text = caplog.text.encode()
        stored = [u.frame for u in gateway.store.updates(spec.id, 0)]
        assert len(stored) == 4
        for device, q in seen.quantized[0].items():
            forms = {
                "int8": q.astype(np.int8).tobytes(),
                "residues": sa.pack_bits(sa.to_ring(q, bits), bits),
                "int64": q.astype("<i8").tobytes(),
            }
            for name, raw in forms.items():
                for at in range(0, max(len(raw) - 24, 1), 16):
                    chunk = raw[at : at + 24]
                    if len(set(chunk)) < 4:
                        continue  # a run of equal bytes (zeros) says nothing
                    assert chunk not in blob, f"{device}'s {name} update is in the store"
                    assert chunk not in text, f"{device}'s {name} update is in the logs"
                    for frame in stored:
                        assert chunk not in frame
        state = gateway.protocol
        assert state._aggregator is not None
        for q in seen.quantized[0].values():
            residues = sa.to_ring(q, bits)
            assert not np.array_equal(state._aggregator.masked_sum, residues)
    finally:
        gateway.close()


def test_bad_secure_aggregation_messages_are_refused_and_counted(
    tmp_path, task, gateway_key, dataset
):
    spec = secagg_task(task)
    gateway, agents, broker, keys, _clock = make_fleet(tmp_path, spec, gateway_key, dataset, 3)
    try:
        gateway.start()
        device = agents[0].device
        base = gateway.protocol._base

        def frame(codec, payload, counter, round_=0, key=keys[device]):
            header = UpdateHeader(
                task=spec.id, round=round_, device=device, base=base, samples=5,
                codec=codec, counter=counter,
            )  # fmt: skip
            return encode_update(header, payload, signer_from_key(key))

        client = broker.transport()
        client.start()
        client.publish(secagg_topic(spec.id, device), frame("secagg-keys", b"[1]", 900))
        client.publish(secagg_topic(spec.id, device), frame("secagg-keys", b"{}", 901))
        client.publish(
            secagg_topic(spec.id, device), frame("secagg-keys", b"{}", 902, key=generate_key())
        )
        client.publish(secagg_topic(spec.id, device), frame("secagg-shares", b"{}", 903))
        client.publish(secagg_topic(spec.id, device), frame("secagg-keys", b"{}", 904, 7))
        client.publish(update_topic(spec.id, device), frame("secagg-keys", b"{}", 905))
        client.publish(update_topic(spec.id, device), frame("int8", b"\0\0", 906))
        gateway.step(0)
        rejected = gateway.stats.rejected
        assert rejected["bad_payload"] == 2  # not an object; no keys in it
        assert rejected["bad_signature"] == 1
        assert rejected["stage_closed"] == 1
        assert rejected["stale_round"] == 1
        assert rejected["wrong_type"] == 1
        assert rejected["codec_mismatch"] == 1
        # keys of low order (all zero) are refused; a good keys message, then its replay
        zero = b'{"c": "' + b"A" * 43 + b'=", "s": "' + b"A" * 43 + b'="}'
        client.publish(secagg_topic(spec.id, device), frame("secagg-keys", zero, 940))
        gateway.step(0)
        assert rejected["bad_payload"] == 3
        good = agent_secagg.DeviceRound(
            task=spec.id, round_=0, base=base, device=device, shapes={}, quantized=np.zeros(0)
        ).keys_payload()
        client.publish(secagg_topic(spec.id, device), frame("secagg-keys", good, 950))
        client.publish(secagg_topic(spec.id, device), frame("secagg-keys", good, 950))
        gateway.step(0)
        assert device in gateway.protocol._keys
        assert rejected["replayed"] == 1
        agents[0].step(0)  # the genuine device, its counter behind the forged one's
        gateway.step(0)
        assert rejected["replayed"] == 2
    finally:
        gateway.close()


def test_secagg_with_dp_records_the_budget_and_the_ledger_recomputes_it(
    tmp_path, task, gateway_key, dataset
):
    dp = {"noise_multiplier": 0.5, "clip": 1.0, "budget_epsilon": 200.0}
    spec = secagg_task(task, dp=dp)
    gateway, agents, *_ = make_fleet(tmp_path, spec, gateway_key, dataset, 4)
    try:
        gateway.start()
        run_to_end(gateway, agents)
        report = privacy_report(gateway.ledger, spec.id, identity=AUDITOR)
        assert report["ok"], report["problems"]
        assert abs(report["epsilon"] - gateway.protocol.privacy.epsilon) <= 1e-6
        assert [r["noised"] for r in report["rounds"]] == [4.0] * spec.rounds
    finally:
        gateway.close()


def test_secagg_composes_only_with_a_plain_synchronous_sum(task):
    base = task.model_dump()
    for extra, message in (
        ({"aggregation": "median"}, "secagg needs aggregation"),
        ({"asynchronous": {"buffer": 2}}, "synchronous"),
        ({"secagg": {}}, "needs a clip"),
    ):
        data = {**base, "secagg": {"clip": 1.0}, **extra}
        with pytest.raises(ValidationError, match=message):
            TaskSpec.model_validate(data)
    with pytest.raises(ValidationError, match="differ"):
        TaskSpec.model_validate(
            {**base, "secagg": {"clip": 2.0},
             "dp": {"noise_multiplier": 1, "clip": 1, "budget_epsilon": 8}}
        )  # fmt: skip
