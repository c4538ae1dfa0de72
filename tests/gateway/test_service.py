"""The gateway's round logic over the in-memory transport (fast, deterministic)."""

import numpy as np
import pytest

from fedcore import InMemoryBroker, decode_envelope, model_topic, update_topic
from gateway import GatewayError
from ledger import Identity

from .fleet import Clock, make_agents, make_gateway, pump


@pytest.fixture
def world(tmp_path, task, registry, gateway_key, dataset, device_keys):
    broker = InMemoryBroker()
    clock = Clock()
    gateway = make_gateway(tmp_path, task, registry, gateway_key, dataset, broker, clock)
    agents = make_agents(task, device_keys, gateway_key, dataset, broker)
    gateway.connect()
    return broker, clock, gateway, agents


def test_all_rounds_close_and_are_anchored(world, task, device_keys):
    broker, clock, gateway, agents = world
    gateway.start()
    for _ in range(10):
        pump(gateway, agents)
    assert gateway.finished
    assert [r.round for r in gateway.results] == [0, 1, 2]
    assert all(r.participants == 5 for r in gateway.results)
    assert gateway.results[-1].accuracy > 0.9
    assert all(a.final_model == gateway.final_model for a in agents)
    admin = Identity(msp_id="org1", subject="admin", role="admin")
    rounds = [gateway.ledger.evaluate("GetRound", task.id, r, identity=admin) for r in range(3)]
    assert [r["status"] for r in rounds] == ["committed"] * 3
    assert rounds[1]["base_model"] == rounds[0]["global_model"]
    assert rounds[2]["global_model"] == gateway.final_model
    assert all(sorted(r["contributors"]) == sorted(device_keys) for r in rounds)
    history = gateway.ledger.evaluate("GetHistory", gateway.final_model, identity=admin)
    assert [h["round"] for h in history["rounds"]] == [2, 1, 0]
    report = gateway.ledger.verify(replay=True, store=gateway.store)
    assert report.ok, report.problem
    assert report.checked_models == 3 and report.checked_updates == 15
    # Beside accuracy, each round carries its clinical metrics: in the result the gateway
    # keeps, and (rounded to 6 decimals) in the round's ledger record.
    clinical = {"balanced_accuracy", "auc", "sensitivity", "specificity", "recall_0", "recall_1"}
    for result, record in zip(gateway.results, rounds, strict=True):
        assert set(result.clinical) == clinical
        assert all(0.0 <= v <= 1.0 for v in result.clinical.values())
        assert record["metrics"]["accuracy"] == round(result.accuracy, 6)
        for name, value in result.clinical.items():
            assert record["metrics"][name] == round(value, 6), name
    last = gateway.results[-1].clinical
    assert last["auc"] > 0.9 and last["sensitivity"] > 0.8 and last["specificity"] > 0.8
    assert last["balanced_accuracy"] == pytest.approx((last["recall_0"] + last["recall_1"]) / 2)
    assert gateway.stats.last_clinical == last


def test_deadline_closes_a_round_with_the_updates_that_arrived(world):
    broker, clock, gateway, agents = world
    gateway.start()
    pump(gateway, agents[:3])  # two devices stay silent
    assert gateway.results == []
    clock.now += 21  # past round_timeout
    gateway.step(0)
    assert gateway.results[0].participants == 3


def test_deadline_below_quorum_extends_the_round(world):
    broker, clock, gateway, agents = world
    gateway.start()
    clock.now += 21
    gateway.step(0)
    assert gateway.results == [] and gateway.current_round == 0
    pump(gateway, agents)
    assert gateway.results[0].participants == 5


def test_an_unset_quorum_is_a_majority_of_the_fleet(world):
    """Two of five devices at the deadline are not enough: one or two devices' updates
    must not become the global model."""
    broker, clock, gateway, agents = world
    assert gateway.task.quorum is None and gateway.protocol.quorum == 3
    gateway.start()
    pump(gateway, agents[:2])
    clock.now += 21
    gateway.step(0)
    assert gateway.results == [] and gateway.current_round == 0
    pump(gateway, agents[2:3])
    clock.now += 21
    gateway.step(0)
    assert [r.participants for r in gateway.results] == [3]


def test_a_quorum_above_the_fleet_is_refused_at_start(
    tmp_path, task, registry, gateway_key, dataset
):
    too_many = task.model_copy(update={"quorum": len(registry) + 1})
    with pytest.raises(GatewayError, match=r"quorum 6 exceeds the 5 registered devices"):
        make_gateway(tmp_path, too_many, registry, gateway_key, dataset, InMemoryBroker(), Clock())


def test_restart_resumes_the_open_round_without_double_counting(
    tmp_path, task, registry, gateway_key, dataset, device_keys
):
    broker = InMemoryBroker()
    clock = Clock()
    first = make_gateway(tmp_path, task, registry, gateway_key, dataset, broker, clock)
    agents = make_agents(task, device_keys, gateway_key, dataset, broker)
    first.connect()
    first.start()
    pump(first, agents[:3])
    assert first.current_round == 0 and first.results == []
    first.transport.stop()  # the process dies: nothing but the store survives
    first.store.close()
    first.ledger.close()

    second = make_gateway(tmp_path, task, registry, gateway_key, dataset, broker, clock)
    second.connect()
    second.start()
    # an already-stored update delivered again (as the broker does after a crash) is
    # dropped: not counted twice, and no rejection either
    stored = second.store.updates(task.id, 0)
    assert len(stored) == 3
    second.transport.publish(update_topic(task.id, stored[0].device), stored[0].frame)
    second.step(0)
    assert second.stats.redelivered == 1 and not second.stats.rejected
    assert second.open_round.devices == {u.device for u in stored}
    pump(second, agents[3:])
    assert second.results[0].participants == 5
    assert second.results[0].samples == sum(len(a.y) for a in agents)


def test_republished_model_is_not_trained_twice(world, task):
    broker, clock, gateway, agents = world
    gateway.start()
    pump(gateway, agents[:1])
    trained, pending = agents[0].rounds_trained, agents[0].state.pending
    # the retained model arrives again (e.g. after a reconnect): the agent does not train
    # again, it sends the same frame once more, which the gateway counts once
    agents[0].transport.subscribe(model_topic(task.id))
    agents[0].step(0)
    assert agents[0].rounds_trained == trained
    assert agents[0].resends == 1 and agents[0].state.pending == pending
    gateway.step(0)
    assert gateway.stats.redelivered == 1
    assert len(gateway.store.updates(task.id, 0)) == 1


def test_final_model_message_is_signed_by_the_gateway(world, task, gateway_key):
    broker, clock, gateway, agents = world
    gateway.start()
    for _ in range(10):
        pump(gateway, agents)
    probe = broker.transport()
    probe.subscribe(model_topic(task.id))
    probe.start()
    env = decode_envelope(probe.messages.get_nowait().payload)
    assert env.header.status == "final"
    gateway_key.public_key().verify(env.signature, env.signed)


def test_two_updates_from_one_device_in_one_batch_count_once(world, task, device_keys):
    from fedcore import UpdateHeader, encode_tensors, encode_update

    _broker, _clock, gateway, _agents = world
    gateway.start()
    base = gateway.open_round.base_hash
    shapes = task.model_spec().shapes()
    payload = encode_tensors({k: np.zeros(s, np.float32) for k, s in shapes.items()}, "int8")
    for counter in (1, 2):
        header = UpdateHeader(
            task=task.id,
            round=0,
            device="dev-0",
            base=base,
            samples=5,
            codec="int8",
            counter=counter,
        )
        gateway.transport.publish(
            update_topic(task.id, "dev-0"),
            encode_update(header, payload, device_keys["dev-0"].sign),
        )
    gateway.step(0)
    assert gateway.stats.accepted == 1
    assert gateway.stats.rejected == {"duplicate": 1}
    assert len(gateway.store.updates(task.id, 0)) == 1


@pytest.mark.parametrize(
    ("rule", "options"),
    [("median", {}), ("fedavg", {"clip_factor": 1.0}), ("multi_krum", {"f": 1})],
)
def test_robust_rules_aggregate_and_are_recorded(
    tmp_path, task, registry, gateway_key, dataset, device_keys, rule, options
):
    robust = task.model_copy(update={"aggregation": rule, "aggregation_options": options})
    broker = InMemoryBroker()
    gateway = make_gateway(tmp_path, robust, registry, gateway_key, dataset, broker, Clock())
    agents = make_agents(robust, device_keys, gateway_key, dataset, broker)
    gateway.connect()
    gateway.start()
    for _ in range(10):
        pump(gateway, agents)
    assert gateway.finished and gateway.results[-1].accuracy > 0.85
    admin = Identity(msp_id="org1", subject="admin", role="admin")
    last = gateway.ledger.evaluate("GetRound", task.id, 2, identity=admin)
    assert last["aggregation"] == rule
    assert last["metrics"]["updates_dropped"] == 0.0
    assert gateway.ledger.verify(replay=True, store=gateway.store).ok


@pytest.mark.parametrize("held_out", ["none", "ill only"])
def test_metrics_the_held_out_data_cannot_define_are_left_out_of_the_record(
    tmp_path, task, registry, gateway_key, dataset, device_keys, held_out
):
    ill = dataset.y_test == 1
    evaluation = None if held_out == "none" else (dataset.x_test[ill], dataset.y_test[ill])
    broker = InMemoryBroker()
    gateway = make_gateway(
        tmp_path, task, registry, gateway_key, dataset, broker, Clock(), evaluation=evaluation
    )
    agents = make_agents(task, device_keys, gateway_key, dataset, broker)
    gateway.connect()
    gateway.start()
    for _ in range(10):
        pump(gateway, agents)
    assert gateway.finished
    admin = Identity(msp_id="org1", subject="admin", role="admin")
    record = gateway.ledger.evaluate("GetRound", task.id, 2, identity=admin)["metrics"]
    result = gateway.results[-1]
    if held_out == "none":
        assert result.accuracy is None and result.clinical == {}
        assert record == {}
    else:  # no healthy patient: no specificity, no recall of class 0, no AUC
        assert set(result.clinical) == {"balanced_accuracy", "sensitivity", "recall_1"}
        assert set(record) == {"accuracy", "balanced_accuracy", "sensitivity", "recall_1"}
        assert record["sensitivity"] == round(result.accuracy, 6)
    assert gateway.ledger.verify(replay=True, store=gateway.store).ok


def test_a_device_revoked_on_the_ledger_is_refused(world, task):
    _broker, _clock, gateway, agents = world
    gateway.start()
    pump(gateway, agents)  # round 0 with everyone
    admin = Identity(msp_id="org1", subject="admin", role="admin")
    gateway.ledger.submit("RevokeDevice", "dev-3", "stolen", identity=admin)
    for _ in range(6):
        pump(gateway, agents)
    assert gateway.finished
    # round 1 was open when it happened: dev-3's update is dropped at the close
    # round 2: refused on arrival, and the round does not wait for it
    assert [r.participants for r in gateway.results] == [5, 4, 4]
    assert [r.rejected_by_reason for r in gateway.results[1:]] == [{"revoked": 1}] * 2
    for r in (1, 2):
        record = gateway.ledger.evaluate("GetRound", task.id, r, identity=admin)
        assert "dev-3" not in record["contributors"]
        assert record["rejected_by_reason"] == {"revoked": 1}
    assert gateway.ledger.verify(replay=True, store=gateway.store).ok


def test_adaptive_server_optimizer_keeps_its_state_across_a_restart(
    tmp_path, task, registry, gateway_key, dataset, device_keys
):
    adam = task.model_copy(update={"server_optimizer": "fedadam", "server_lr": 0.05, "rounds": 3})
    broker = InMemoryBroker()
    first = make_gateway(tmp_path, adam, registry, gateway_key, dataset, broker, Clock())
    agents = make_agents(adam, device_keys, gateway_key, dataset, broker)
    first.connect()
    first.start()
    pump(first, agents)
    assert [r.round for r in first.results] == [0]
    stored = first.store.optimizer_state(adam.id)
    assert stored is not None and stored[0] == 0
    first.transport.stop()
    first.store.close()
    first.ledger.close()

    second = make_gateway(tmp_path, adam, registry, gateway_key, dataset, broker, Clock())
    second.connect()
    second.start()
    for _ in range(6):
        pump(second, agents)
    assert second.finished and second.store.optimizer_state(adam.id)[0] == 2
    assert second.results[-1].accuracy > 0.85
    admin = Identity(msp_id="org1", subject="admin", role="admin")
    record = second.ledger.evaluate("GetRound", adam.id, 2, identity=admin)
    assert record["aggregation"] == "fedavg_fedadam"
    assert second.ledger.verify(replay=True, store=second.store).ok


def test_a_long_running_gateway_keeps_a_bounded_tail_of_results(
    tmp_path, task, registry, gateway_key, dataset, device_keys, monkeypatch
):
    import gateway._rounds as rounds_module

    monkeypatch.setattr(rounds_module, "RESULTS_KEPT", 2)
    long_task = task.model_copy(update={"rounds": 12})
    broker, clock = InMemoryBroker(), Clock()
    gateway = make_gateway(tmp_path, long_task, registry, gateway_key, dataset, broker, clock)
    agents = make_agents(long_task, device_keys, gateway_key, dataset, broker)
    gateway.connect()
    gateway.start()
    for _ in range(40):
        pump(gateway, agents)
    assert gateway.finished
    kept = [r.round for r in gateway.results]
    assert 2 <= len(kept) <= 4 and kept == list(range(12 - len(kept), 12))
    assert all(r.ledgered for r in gateway.results)
    # the store still holds every round
    assert len(gateway.store.rounds(long_task.id)) == 12
