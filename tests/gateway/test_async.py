"""Buffered asynchronous rounds (FedBuff): the pure rules, then the gateway over the in-memory
fleet with a straggler that never answers."""

import math

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from fedcore import (
    ConfigError,
    InMemoryBroker,
    TaskSpec,
    UpdateHeader,
    encode_tensors,
    encode_update,
    load_task,
    update_topic,
)
from gateway import GatewayMetrics, Rejected
from gateway._buffer import place_update, staleness_weight
from ledger import Identity

from .fleet import Clock, make_agents, make_gateway, pump

ADMIN = Identity(msp_id="org1", subject="admin", role="admin")


def asynchronous(task, *, rounds=4, **section):
    section = {"buffer": 2, "max_staleness": 1, **section}
    return TaskSpec.model_validate({**task.model_dump(), "rounds": rounds, "asynchronous": section})


# ---------------------------------------------------------------- pure rules
def test_staleness_weight_is_polynomial_and_one_when_fresh():
    assert staleness_weight(0, 0.5) == 1.0
    assert staleness_weight(3, 0.5) == pytest.approx(0.5)
    assert staleness_weight(7, 1.0) == pytest.approx(0.125)
    assert staleness_weight(10, 0.0) == 1.0
    weights = [staleness_weight(s, 0.5) for s in range(6)]
    assert weights == sorted(weights, reverse=True)
    with pytest.raises(ValueError):
        staleness_weight(-1, 0.5)


def place(device, base, occupancy, *, current=5, trained_on=frozenset(), rounds=100):
    return place_update(
        device=device, base_round=base, current=current, buffer=2, max_staleness=2,
        rounds=rounds, occupancy=occupancy, trained_on=trained_on,
    )  # fmt: skip


def test_buffer_takes_updates_in_order_and_passes_a_full_one_on():
    assert place("a", 5, {}) == 5
    assert place("a", 4, {5: {"b", "c"}}) == 6  # round 5's buffer is full
    assert place("a", 5, {5: {"a"}}) == 6  # one update per device and round
    assert place("a", 3, {}) == 5  # stale by 2: still accepted


@pytest.mark.parametrize(
    ("base", "occupancy", "trained_on", "reason"),
    [
        (2, {}, frozenset(), "too_stale"),  # 3 versions behind
        (3, {5: {"b", "c"}}, frozenset(), "too_stale"),  # would count 3 versions late
        (5, {}, frozenset({("a", 5)}), "duplicate"),  # a second update from one base
    ],
)
def test_buffer_refuses_with_a_reason(base, occupancy, trained_on, reason):
    with pytest.raises(Rejected) as caught:
        place("a", base, occupancy, trained_on=trained_on)
    assert caught.value.reason == reason and caught.value.device == "a"


def test_buffer_refuses_past_the_last_round():
    with pytest.raises(Rejected) as caught:
        place("a", 5, {5: {"b", "c"}}, rounds=6)
    assert caught.value.reason == "round_closed"


def test_asynchronous_section_errors_name_the_key(tmp_path, task):
    path = tmp_path / "task.toml"
    body = f'id = "t"\n[model]\nkind = "logreg"\nn_features = {task.model.n_features}\n'
    body += "n_classes = 2\n[asynchronous]\nbuffer = 0\n"
    path.write_text(body)
    with pytest.raises(ConfigError) as caught:
        load_task(path)
    assert caught.value.key == "asynchronous.buffer"
    path.write_text(body.replace("buffer = 0", "buffer = 3\nstaleness = 1"))
    with pytest.raises(ConfigError) as caught:
        load_task(path)
    assert caught.value.key == "asynchronous.staleness"
    path.write_text(body.replace("buffer = 0", "buffer = 3"))
    loaded = load_task(path).asynchronous
    assert (loaded.buffer, loaded.max_staleness, loaded.staleness_exponent) == (3, 10, 0.5)
    assert TaskSpec.model_validate(task.model_dump()).spec_hash() == task.spec_hash()


# ---------------------------------------------------------------- the gateway
@pytest.fixture
def fleet(tmp_path, task, registry, gateway_key, dataset, device_keys):
    def build(spec, *, clock=None, metrics=None):
        broker = InMemoryBroker()
        gateway = make_gateway(
            tmp_path, spec, registry, gateway_key, dataset, broker, clock or Clock(),
            metrics=metrics,
        )  # fmt: skip
        agents = make_agents(spec, device_keys, gateway_key, dataset, broker)
        gateway.connect()
        gateway.start()
        return gateway, agents

    return build


def stale_update(spec, gateway, device_keys, device="dev-4"):
    """A correctly signed update from ``device`` trained on round 0's model."""
    base = gateway.store.rounds(spec.id)[0].base_hash
    shapes = spec.model_spec().shapes()
    payload = encode_tensors({k: np.zeros(s, np.float32) for k, s in shapes.items()}, "int8")
    header = UpdateHeader(
        task=spec.id, round=0, device=device, base=base, samples=5, codec="int8", counter=0
    )
    return encode_update(header, payload, device_keys[device].sign)


def test_a_straggler_stalls_nothing_and_a_too_stale_update_is_refused(fleet, task, device_keys):
    spec = asynchronous(task)
    prom = CollectorRegistry()
    gateway, agents = fleet(spec, metrics=GatewayMetrics(registry=prom, version="0"))
    live = agents[:4]  # dev-4 never answers, and the clock never moves
    pump(gateway, live)
    # Round 0 took two updates; the other two trained on model 0 counted in round 1, one
    # version stale; round 2 is open.
    assert [r.participants for r in gateway.results] == [2, 2]
    assert gateway.current_round == 2
    gateway.transport.publish(
        update_topic(spec.id, "dev-4"), stale_update(spec, gateway, device_keys)
    )
    gateway.step(0)
    assert gateway.stats.rejected == {"too_stale": 1}
    assert (
        prom.get_sample_value("fedledger_gateway_updates_rejected_total", {"reason": "too_stale"})
        == 1
    )
    for _ in range(3):
        pump(gateway, live)
    assert gateway.finished
    assert [r.round for r in gateway.results] == [0, 1, 2, 3]
    assert gateway.results[-1].accuracy > 0.85
    assert all(a.final_model == gateway.final_model for a in live)

    rounds = [gateway.ledger.evaluate("GetRound", spec.id, r, identity=ADMIN) for r in range(4)]
    assert [r["status"] for r in rounds] == ["committed"] * 4
    assert all(len(r["contributors"]) == 2 for r in rounds)
    assert all("dev-4" not in r["contributors"] for r in rounds)
    assert [r["base_model"] for r in rounds[1:]] == [r["global_model"] for r in rounds[:-1]]
    assert rounds[-1]["global_model"] == gateway.final_model
    assert rounds[2]["rejected_by_reason"] == {"too_stale": 1}
    assert rounds[0]["metrics"]["staleness_max"] == 0.0
    assert rounds[1]["metrics"]["staleness_mean"] == 1.0
    report = gateway.ledger.verify(replay=True, store=gateway.store)
    assert report.ok, report.problem
    assert report.checked_models == 4 and report.checked_updates == 8


def test_synchronous_rounds_wait_for_the_straggler_until_the_deadline(fleet, task):
    clock = Clock()
    gateway, agents = fleet(task, clock=clock)
    for _ in range(4):
        pump(gateway, agents[:4])
    assert gateway.results == []  # waiting for dev-4
    clock.now += task.round_timeout + 1
    gateway.step(0)
    assert [r.participants for r in gateway.results] == [4]


def test_a_stale_update_weighs_less(fleet, task):
    """Round 1's two updates were trained on model 0: applied one version late, each
    counts (1 + 1) ** -0.5 of its delta."""
    spec = asynchronous(task, rounds=2)
    gateway, agents = fleet(spec)
    pump(gateway, agents[:4])
    assert gateway.finished
    # The same updates, replayed by hand: model 2 = model 1 + w * mean delta.
    models = [gateway.load_model(r.base_hash) for r in gateway.store.rounds(spec.id)]
    final = gateway.load_model(gateway.final_model)
    stored = gateway.store.updates(spec.id, 1)
    deltas = [gateway.read_update(u.frame) for u in stored]
    samples = [u.samples for u in stored]
    w = 1 / math.sqrt(2)
    for name in final:
        mean = sum(
            n * next(v.data.astype(np.float32) * v.scale for v in views if v.name == name)
            for n, (_, views) in zip(samples, deltas, strict=True)
        ) / sum(samples)
        expected = models[1][name] + w * mean.reshape(final[name].shape)
        np.testing.assert_allclose(final[name], expected, rtol=1e-5, atol=1e-6)


def test_deadline_closes_a_short_buffer(fleet, task):
    """A fleet smaller than the buffer is not stalled: the deadline closes it (quorum 1)."""
    clock = Clock()
    spec = asynchronous(task, buffer=5)
    gateway, agents = fleet(spec, clock=clock)
    pump(gateway, agents[:3])
    assert gateway.results == []
    clock.now += spec.round_timeout + 1
    gateway.step(0)
    assert [r.participants for r in gateway.results] == [3]


def test_restart_resumes_the_buffers(tmp_path, task, registry, gateway_key, dataset, device_keys):
    spec = asynchronous(task, rounds=3)
    broker = InMemoryBroker()
    first = make_gateway(tmp_path, spec, registry, gateway_key, dataset, broker, Clock())
    agents = make_agents(spec, device_keys, gateway_key, dataset, broker)
    first.connect()
    first.start()
    pump(first, agents[:3])
    # dev-0 and dev-1 closed round 0; dev-2's update waits in round 1's buffer.
    assert first.current_round == 1 and len(first.results) == 1
    held = first.store.updates(spec.id, 1)
    assert [u.device for u in held] == ["dev-2"]
    first.transport.stop()  # the process dies: nothing but the store survives
    first.store.close()
    first.ledger.close()

    second = make_gateway(tmp_path, spec, registry, gateway_key, dataset, broker, Clock())
    second.connect()
    second.start()
    assert second.open_round.devices == {"dev-2"}
    second.transport.publish(update_topic(spec.id, "dev-2"), held[0].frame)
    second.step(0)
    # The same frame again (as the broker re-delivers it after a crash): dropped, neither
    # counted twice nor recorded as a rejection.
    assert second.stats.rejected == {} and second.stats.redelivered == 1
    assert second.open_round.devices == {"dev-2"}
    for _ in range(3):
        pump(second, agents[:3])
    assert second.finished
    record = second.ledger.evaluate("GetRound", spec.id, 1, identity=ADMIN)
    assert "dev-2" in record["contributors"] and len(record["contributors"]) == 2
    assert second.ledger.verify(replay=True, store=second.store).ok
