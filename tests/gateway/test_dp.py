"""Differentially private rounds: clipping, noise, Poisson sampling from a committed seed,
the budget that fails closed, and the ledger records an auditor recomputes epsilon from."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from fedcore import (
    DPRoundEvent,
    InMemoryBroker,
    TaskSpec,
    TensorView,
    decode_envelope,
    decode_tensors,
    epsilon,
    generate_key,
    model_topic,
    public_key_b64,
    sampled_devices,
    seed_digest,
    update_norm,
)
from gateway import DeviceRegistry, GatewayError
from gateway._dp import DPAggregator
from ledger import ContractError, Identity, privacy_report

from .fleet import Clock, gateway_chain, make_agents, make_gateway, pump

AUDITOR = Identity("org1", "auditor", "auditor")
SEED = bytes(range(32))


def dp_task(task: TaskSpec, **dp) -> TaskSpec:
    terms = {"noise_multiplier": 0.8, "clip": 0.5, "budget_epsilon": 50.0, **dp}
    if terms.get("sampling", 1.0) < 1:
        terms.setdefault("seed_sha256", seed_digest(SEED))
    return TaskSpec.model_validate({**task.model_dump(), "id": "dp-task", "dp": terms})


@pytest.fixture
def fleet(tmp_path, task, gateway_key, dataset, request):
    """``request.param``: (dp terms, devices)."""
    terms, n = request.param
    keys = {f"dev-{i:02d}": generate_key() for i in range(n)}
    registry = DeviceRegistry({d: public_key_b64(k) for d, k in keys.items()})
    spec = dp_task(task, **terms)
    broker = InMemoryBroker()
    gateway = make_gateway(
        tmp_path, spec, registry, gateway_key, dataset, broker, Clock(), dp_seed=SEED
    )
    agents = make_agents(spec, keys, gateway_key, dataset, broker)
    gateway.connect()
    yield spec, gateway, agents
    gateway.close()


def watch(agent, seen: dict) -> None:
    """Record, per round, the ``sampled`` list of the open models ``agent`` receives, and
    the last model message."""
    original = agent._open_model

    def spy(message):
        if message.topic == model_topic(agent.task.id):
            header = decode_envelope(message.payload).header
            if header.status == "open":
                seen[header.round] = header.sampled
                seen["last"] = message
        return original(message)

    agent._open_model = spy


def run_to_end(gateway, agents, limit=20):
    gateway.start()
    for _ in range(limit):
        if gateway.finished:
            break
        pump(gateway, agents)
    assert gateway.finished
    assert gateway.outbox.drain(10)
    for agent in agents:
        agent.step(0)  # the final model


@pytest.mark.parametrize("fleet", [({}, 4)], indirect=True)
def test_every_round_records_its_dp_event_and_epsilon_recomputes(fleet):
    spec, gateway, agents = fleet
    run_to_end(gateway, agents)
    report = privacy_report(gateway.ledger, spec.id, identity=AUDITOR)
    assert report["ok"], report["problems"]
    assert len(report["rounds"]) == spec.rounds
    expected = epsilon([DPRoundEvent(0.8, 1.0)] * spec.rounds, 1e-5)
    assert report["epsilon"] == pytest.approx(expected, abs=1e-9)
    assert abs(report["epsilon"] - gateway.protocol.epsilon) <= 1e-6
    assert report["recorded_epsilon"] == pytest.approx(gateway.protocol.epsilon, abs=1e-9)
    assert [r["noised"] for r in report["rounds"]] == [4.0] * spec.rounds
    assert report["ended"]["status"] == "completed"
    task = gateway.ledger.evaluate("GetTask", spec.id, identity=AUDITOR)
    assert task["privacy"]["dp"]["noise_multiplier"] == 0.8
    assert gateway.ledger.verify(replay=True, store=gateway.store).ok


@pytest.mark.parametrize("fleet", [({"sampling": 0.5}, 8)], indirect=True)
def test_sampled_devices_alone_train_and_the_revealed_seed_proves_it(fleet):
    spec, gateway, agents = fleet
    seen = {}
    for agent in agents:
        watch(agent, seen)
    run_to_end(gateway, agents, limit=40)
    for round_ in range(spec.rounds):
        chosen = sampled_devices(SEED, spec.id, round_, [a.device for a in agents], 0.5)
        assert seen[round_] == chosen
        record = gateway.ledger.evaluate("GetRound", spec.id, round_, identity=AUDITOR)
        assert sorted(record["contributors"]) == list(chosen)
    assert sum(a.rounds_skipped for a in agents) > 0
    report = privacy_report(gateway.ledger, spec.id, identity=AUDITOR)
    assert report["ok"], report["problems"]
    assert report["ended"]["detail"]["dp_seed"] == SEED.hex()
    assert all(r["contributors_sampled"] for r in report["rounds"])
    assert report["epsilon"] < report["epsilon_without_amplification"]


@pytest.mark.parametrize("fleet", [({"sampling": 0.5}, 8)], indirect=True)
def test_an_update_of_a_device_not_sampled_is_refused(fleet):
    spec, gateway, agents = fleet
    gateway.start()
    chosen = set(gateway.protocol.sampled)
    outsider = next(a for a in agents if a.device not in chosen)
    seen: dict = {}
    watch(outsider, seen)
    outsider.step(0)
    assert outsider.rounds_skipped == 1 and outsider.rounds_trained == 0
    # trained anyway (a device ignoring the model message's list)
    envelope = decode_envelope(seen["last"].payload)
    outsider._train_and_send(envelope.header, decode_tensors(envelope.payload))
    gateway.step(0)
    assert gateway.stats.rejected["not_sampled"] == 1


@pytest.mark.parametrize("fleet", [({"noise_multiplier": 1.0, "budget_epsilon": 5.0}, 3)],
                         indirect=True)  # fmt: skip
def test_a_round_over_the_budget_is_not_opened_and_the_ledger_says_so(fleet):
    spec, gateway, agents = fleet
    allowed = max(
        k for k in range(spec.rounds + 1) if epsilon([DPRoundEvent(1.0, 1.0)] * k, 1e-5) <= 5.0
    )
    assert 0 < allowed < spec.rounds  # the budget ends the task early
    run_to_end(gateway, agents)
    assert len(gateway.results) == allowed
    task = gateway.ledger.evaluate("GetTask", spec.id, identity=AUDITOR)
    assert task["ended"]["status"] == "budget_exhausted"
    assert "over the budget" in task["ended"]["detail"]["reason"]
    with pytest.raises(ContractError):
        gateway.ledger.evaluate("GetRound", spec.id, allowed, identity=AUDITOR)
    assert all(a.final_model == gateway.final_model for a in agents)
    report = privacy_report(gateway.ledger, spec.id, identity=AUDITOR)
    assert report["ok"] and report["within_budget"]


def test_the_aggregate_is_the_clipped_sum_over_the_denominator():
    shapes = {"w": (3,), "b": (1,)}
    agg = DPAggregator(shapes, clip=1.0, noise_multiplier=0.0, denominator=4.0)
    big = [TensorView("w", (3,), np.array([3.0, 0, 0], np.float32), 1.0),
           TensorView("b", (1,), np.array([4.0], np.float32), 1.0)]  # fmt: skip
    small = [TensorView("w", (3,), np.array([10, 0, 0], np.int8), 0.01),
             TensorView("b", (1,), np.array([0], np.int8), 0.01)]  # fmt: skip
    agg.add(big, 10)  # norm 5: scaled to 1
    agg.add(small, 20)  # norm 0.1: kept
    out = agg.result()
    np.testing.assert_allclose(out["w"], [(0.6 + 0.1) / 4, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(out["b"], [0.8 / 4], rtol=1e-6)
    assert agg.clipped == 1 and agg.count == 2
    noisy = DPAggregator({"w": (20000,)}, clip=0.5, noise_multiplier=2.0, denominator=1.0)
    assert np.std(noisy.result()["w"]) == pytest.approx(1.0, rel=0.05)


def test_dp_composes_only_with_a_plain_sum(task):
    with pytest.raises(ValidationError, match="robust rules"):
        TaskSpec.model_validate(
            {**task.model_dump(), "aggregation": "median",
             "dp": {"noise_multiplier": 1, "clip": 1, "budget_epsilon": 8}}
        )  # fmt: skip
    with pytest.raises(ValidationError, match="seed_sha256"):
        TaskSpec.model_validate(
            {**task.model_dump(),
             "dp": {"noise_multiplier": 1, "clip": 1, "budget_epsilon": 8, "sampling": 0.1}}
        )  # fmt: skip
    with pytest.raises(ValidationError, match="synchronous"):
        TaskSpec.model_validate(
            {**task.model_dump(), "asynchronous": {"buffer": 2},
             "dp": {"noise_multiplier": 1, "clip": 1, "budget_epsilon": 8}}
        )  # fmt: skip


def test_the_gateway_refuses_a_seed_the_task_does_not_commit_to(
    tmp_path, task, registry, gateway_key, dataset
):
    spec = dp_task(task, sampling=0.5)
    for seed, message in ((None, "needs its sampling seed"), (b"x" * 32, "not the task's")):
        with pytest.raises(GatewayError, match=message):
            make_gateway(
                tmp_path, spec, registry, gateway_key, dataset, InMemoryBroker(), Clock(),
                dp_seed=seed,
            )  # fmt: skip


@pytest.mark.parametrize("fleet", [({"sampling": 0.5}, 4)], indirect=True)
def test_the_contract_takes_only_the_committed_seed_and_no_round_after_the_end(fleet):
    spec, gateway, agents = fleet
    run_to_end(gateway, agents, limit=40)
    ledger, me = gateway.ledger, gateway.identity
    with pytest.raises(ContractError, match="already ended"):
        ledger.submit("EndTask", spec.id, "completed", {"dp_seed": SEED.hex()}, identity=me)
    with pytest.raises(ContractError, match="ended"):
        ledger.submit("OpenRound", spec.id, spec.rounds, gateway.final_model, 0.0, identity=me)


def test_end_task_refuses_a_seed_that_does_not_match(tmp_path, gateway_key):

    chain = gateway_chain(tmp_path / "l.sqlite", gateway_key)
    admin, me = Identity("org1", "admin", "admin"), Identity("org1", "gateway", "gateway")
    terms = {"dp": {"seed_sha256": seed_digest(SEED)}, "secure_aggregation": False}
    chain.submit("CreateTask", "t", "org1", "gateway", "a" * 64, "fedavg", terms, "b" * 64,
                 identity=admin)  # fmt: skip
    with pytest.raises(ContractError, match="must be revealed"):
        chain.submit("EndTask", "t", "completed", {}, identity=me)
    with pytest.raises(ContractError, match="does not hash"):
        chain.submit("EndTask", "t", "completed", {"dp_seed": "00" * 32}, identity=me)
    with pytest.raises(ContractError, match="forbidden|needs gateway"):
        chain.submit("EndTask", "t", "completed", {"dp_seed": SEED.hex()}, identity=admin)
    chain.submit("EndTask", "t", "completed", {"dp_seed": SEED.hex()}, identity=me)
    assert chain.evaluate("GetTask", "t", identity=me)["ended"]["status"] == "completed"
    assert chain.verify(replay=True).ok


@pytest.mark.parametrize("fleet", [({"sampling": 0.5}, 6)], indirect=True)
def test_a_restarted_gateway_keeps_the_budget_and_the_sample(fleet, tmp_path, gateway_key, dataset):
    spec, gateway, agents = fleet
    gateway.start()
    pump(gateway, agents)
    pump(gateway, agents)
    assert len(gateway.results) >= 1
    spent, sample = gateway.protocol.epsilon, gateway.protocol.sampled
    gateway.close()
    again = make_gateway(
        tmp_path, spec, gateway.registry, gateway_key, dataset, InMemoryBroker(), Clock(),
        dp_seed=SEED,
    )  # fmt: skip
    try:
        assert again.protocol.epsilon == spent
        assert len(again.protocol.events) == len(gateway.results)
        again.start()
        assert again.protocol.sampled == sample
    finally:
        again.close()


@pytest.mark.parametrize("fleet", [({"clip": 0.01}, 3)], indirect=True)
def test_devices_clip_their_updates(fleet):
    spec, gateway, agents = fleet
    gateway.start()
    pump(gateway, agents)
    stored = gateway.store.updates(spec.id, 0)
    assert len(stored) == 3
    for update in stored:
        delta = decode_tensors(decode_envelope(update.frame).payload)
        assert update_norm(delta) <= 0.01 * 1.02  # int8 rounding on top of the clip
    assert gateway.results[0].participants == 3
