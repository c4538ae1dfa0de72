"""The agent's metrics on a fresh registry after one trained round."""

import urllib.request

import pytest
from prometheus_client import CollectorRegistry

from edge_agent import AgentError, AgentMetrics, EdgeAgent
from fedcore import (
    InMemoryBroker,
    ModelHeader,
    encode_model,
    generate_key,
    init_params,
    model_payload,
    model_topic,
    update_subscription,
)

A = "fedledger_agent_"


@pytest.fixture
def trained(task, dataset, gateway_key):
    broker = InMemoryBroker()
    prom = CollectorRegistry()
    agent = EdgeAgent(
        device="dev-0",
        task=task,
        transport=broker.transport(),
        signer=generate_key().sign,
        gateway_key=gateway_key.public_key(),
        data=(dataset.x_train[:50], dataset.y_train[:50]),
        metrics=AgentMetrics(registry=prom, version="9.9.9"),
    )
    listener = broker.transport()
    listener.subscribe(update_subscription(task.id))
    listener.start()
    agent.start()
    frame = encode_model(
        ModelHeader(task=task.id, round=0, status="open", deadline=0.0),
        model_payload(init_params(task.model_spec())),
        gateway_key.sign,
    )
    broker.transport().publish(model_topic(task.id), frame, retain=True)
    agent.step(0)
    sent = listener.messages.get_nowait().payload
    yield agent, prom, sent
    agent.metrics.close()


def value(prom, name, **labels):
    return prom.get_sample_value(name, labels)


def test_one_trained_round(trained):
    agent, prom, sent = trained
    assert value(prom, A + "rounds_trained_total") == 1
    assert value(prom, A + "update_sent_bytes_total") == len(sent) == agent.bytes_sent
    assert value(prom, A + "training_seconds_count") == 1
    assert value(prom, A + "training_seconds_sum") > 0
    rss = value(prom, A + "resident_memory_bytes")
    assert rss is not None and 10 << 20 < rss < 64 << 30
    assert value(prom, A + "build_info", version="9.9.9") == 1
    for family in prom.collect():
        for sample in family.samples:
            assert sample.name.startswith(A), sample.name
            assert set(sample.labels) <= {"version", "le"}, sample
            assert not any("dev-0" in v for v in sample.labels.values()), sample


def test_the_same_model_again_changes_nothing(trained, task):
    agent, prom, _ = trained
    agent.transport.subscribe(model_topic(task.id))  # the retained model arrives again
    agent.step(0)
    assert value(prom, A + "rounds_trained_total") == 1
    assert value(prom, A + "training_seconds_count") == 1


def test_serve_and_close(trained):
    agent, _prom, _ = trained
    port = agent.metrics.serve(0)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        body = response.read().decode()
    assert "fedledger_agent_rounds_trained_total 1.0" in body
    with pytest.raises(AgentError, match="already served"):
        agent.metrics.serve(0)
    agent.metrics.close()
    assert agent.metrics.port is None
