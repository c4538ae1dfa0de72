import numpy as np
import pytest

from edge_agent import AgentError, AgentState, EdgeAgent
from fedcore import (
    InMemoryBroker,
    ModelHeader,
    decode_envelope,
    encode_model,
    generate_key,
    init_params,
    model_payload,
    model_topic,
    update_subscription,
)


@pytest.fixture
def setup(task, dataset, gateway_key, tmp_path):
    broker = InMemoryBroker()
    device_key = generate_key()
    agent = EdgeAgent(
        device="dev-0",
        task=task,
        transport=broker.transport(),
        signer=device_key.sign,
        gateway_key=gateway_key.public_key(),
        data=(dataset.x_train[:50], dataset.y_train[:50]),
        state_path=tmp_path / "state.json",
    )
    listener = broker.transport()
    listener.subscribe(update_subscription(task.id))
    listener.start()
    agent.start()
    return broker, agent, listener, device_key


def publish_model(broker, task, key, round_=0, status="open"):
    payload = model_payload(init_params(task.model_spec()))
    frame = encode_model(
        ModelHeader(task=task.id, round=round_, status=status, deadline=0.0), payload, key.sign
    )
    broker.transport().publish(model_topic(task.id), frame, retain=True)


def test_trains_and_sends_a_signed_int8_update(setup, task, gateway_key):
    broker, agent, listener, device_key = setup
    publish_model(broker, task, gateway_key)
    agent.step(0)
    env = decode_envelope(listener.messages.get_nowait().payload)
    device_key.public_key().verify(env.signature, env.signed)
    assert env.header.device == "dev-0" and env.header.samples == 50 and env.header.codec == "int8"
    assert env.header.counter == 0 and env.header.round == 0
    assert AgentState.load(agent._state_path) == AgentState(counter=0, last_round=0)


def test_model_signed_by_someone_else_is_ignored(setup, task):
    broker, agent, listener, _ = setup
    publish_model(broker, task, generate_key())
    agent.step(0)
    assert listener.messages.empty() and agent.rounds_trained == 0


def test_counter_survives_a_restart(setup, task, gateway_key, dataset, tmp_path):
    broker, agent, listener, device_key = setup
    publish_model(broker, task, gateway_key, round_=0)
    agent.step(0)
    restarted = EdgeAgent(
        device="dev-0",
        task=task,
        transport=broker.transport(),
        signer=device_key.sign,
        gateway_key=gateway_key.public_key(),
        data=(dataset.x_train[:50], dataset.y_train[:50]),
        state_path=tmp_path / "state.json",
    )
    restarted.start()
    restarted.step(0)  # the retained round-0 model: already trained, not again
    assert restarted.rounds_trained == 0
    publish_model(broker, task, gateway_key, round_=1)
    restarted.step(0)
    listener.messages.get_nowait()
    env = decode_envelope(listener.messages.get_nowait().payload)
    assert env.header.counter == 1 and env.header.round == 1


def test_final_model_stops_the_agent(setup, task, gateway_key):
    broker, agent, listener, _ = setup
    publish_model(broker, task, gateway_key, round_=3, status="final")
    agent.run(exit_on_final=True)  # returns instead of waiting forever
    assert agent.final_model is not None and listener.messages.empty()


def test_data_that_does_not_fit_the_model_is_refused(task, gateway_key):
    with pytest.raises(AgentError, match="3 features"):
        EdgeAgent(
            device="d",
            task=task,
            transport=InMemoryBroker().transport(),
            signer=gateway_key.sign,
            gateway_key=gateway_key.public_key(),
            data=(np.ones((4, 3), np.float32), np.zeros(4, np.int64)),
        )
