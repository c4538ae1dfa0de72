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
    sent = listener.messages.get_nowait().payload
    env = decode_envelope(sent)
    device_key.public_key().verify(env.signature, env.signed)
    assert env.header.device == "dev-0" and env.header.samples == 50 and env.header.codec == "int8"
    assert env.header.counter == 0 and env.header.round == 0
    # the frame is saved with the counter, before it is published
    assert AgentState.load(agent._state_path) == AgentState(counter=0, last_round=0, pending=sent)


def test_model_signed_by_someone_else_is_ignored(setup, task):
    broker, agent, listener, _ = setup
    publish_model(broker, task, generate_key())
    agent.step(0)
    assert listener.messages.empty() and agent.rounds_trained == 0


def restart(broker, task, gateway_key, device_key, dataset, tmp_path):
    agent = EdgeAgent(
        device="dev-0",
        task=task,
        transport=broker.transport(),
        signer=device_key.sign,
        gateway_key=gateway_key.public_key(),
        data=(dataset.x_train[:50], dataset.y_train[:50]),
        state_path=tmp_path / "state.json",
    )
    agent.start()
    return agent


def test_counter_survives_a_restart(setup, task, gateway_key, dataset, tmp_path):
    broker, agent, listener, device_key = setup
    publish_model(broker, task, gateway_key, round_=0)
    agent.step(0)
    first = listener.messages.get_nowait().payload
    restarted = restart(broker, task, gateway_key, device_key, dataset, tmp_path)
    restarted.step(0)  # the retained round-0 model: already trained, not again
    assert restarted.rounds_trained == 0
    # ...but round 0 is still the gateway's, so the saved frame goes again, byte for byte
    assert restarted.resends == 1 and listener.messages.get_nowait().payload == first
    publish_model(broker, task, gateway_key, round_=1)
    restarted.step(0)
    env = decode_envelope(listener.messages.get_nowait().payload)
    assert env.header.counter == 1 and env.header.round == 1
    assert listener.messages.empty()


def test_killed_between_saving_and_publishing_the_update_is_sent_at_restart(
    setup, task, gateway_key, dataset, tmp_path
):
    """The state file says round 0 was trained, but nothing left the device."""
    broker, agent, listener, device_key = setup
    agent.transport.publish = lambda *a, **k: None  # the process dies before the publish
    publish_model(broker, task, gateway_key, round_=0)
    agent.step(0)
    assert listener.messages.empty()
    saved = AgentState.load(tmp_path / "state.json")
    assert saved.last_round == 0 and saved.pending is not None
    restarted = restart(broker, task, gateway_key, device_key, dataset, tmp_path)
    restarted.step(0)
    assert listener.messages.get_nowait().payload == saved.pending
    assert restarted.rounds_trained == 0 and restarted.state.counter == 0


def test_a_later_round_means_the_saved_update_is_not_sent_again(
    setup, task, gateway_key, dataset, tmp_path
):
    broker, agent, listener, device_key = setup
    publish_model(broker, task, gateway_key, round_=0)
    agent.step(0)
    listener.messages.get_nowait()
    publish_model(broker, task, gateway_key, round_=2)  # round 0 closed while we were away
    restarted = restart(broker, task, gateway_key, device_key, dataset, tmp_path)
    restarted.step(0)
    env = decode_envelope(listener.messages.get_nowait().payload)
    assert env.header.round == 2 and restarted.resends == 0 and listener.messages.empty()


def test_unreadable_pending_frame_names_the_state_file(tmp_path):
    path = tmp_path / "state.json"
    path.write_text('{"counter": 1, "last_round": 1, "pending": "not base64!"}')
    with pytest.raises(AgentError, match="state.json: unreadable agent state"):
        AgentState.load(path)


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


FIRMWARE = __import__("pathlib").Path(__file__).parents[2] / "firmware_configs"


def test_device_class_sets_codec_and_sends_topk_with_error_feedback(task, dataset, gateway_key):
    from fedcore import decode_tensors, load_device_class
    from gateway import RoundContext, UpdateValidator

    broker = InMemoryBroker()
    key = generate_key()
    zero = load_device_class(FIRMWARE / "raspberry-pi-zero-2w.toml")
    agent = EdgeAgent(
        device="dev-0", task=task, transport=broker.transport(), signer=key.sign,
        gateway_key=gateway_key.public_key(), data=(dataset.x_train[:60], dataset.y_train[:60]),
        device_class=zero,
    )  # fmt: skip
    listener = broker.transport()
    listener.subscribe(update_subscription(task.id))
    listener.start()
    agent.start()
    publish_model(broker, task, gateway_key)
    agent.step(0)
    frame = listener.messages.get_nowait()
    env = decode_envelope(frame.payload)
    assert env.header.codec == zero.codec == "topk-int8"
    sent = decode_tensors(env.payload)
    assert (
        sum(int(np.count_nonzero(v)) for v in sent.values()) <= 2
    )  # 1% of each tensor, at least one
    assert agent.residual is not None and any(np.abs(r).sum() > 0 for r in agent.residual.values())
    from fedcore import public_key_b64
    from gateway import DeviceRegistry

    validator = UpdateValidator(
        task=task.id, registry=DeviceRegistry({"dev-0": public_key_b64(key)}),
        shapes=task.model_spec().shapes(), max_message_bytes=1 << 20,
    )  # fmt: skip
    ctx = RoundContext(
        round=0, base=env.header.base, has_update=lambda d: False, last_counter=lambda d: -1
    )
    assert validator.check(frame.topic, frame.payload, ctx).header.codec == "topk-int8"


def test_a_task_too_big_for_the_board_is_refused(task, gateway_key):
    from fedcore import ConfigError, TaskSpec, load_device_class

    big = TaskSpec.model_validate(
        {**task.model_dump(), "model": {**task.model.model_dump(), "kind": "mlp", "hidden": 40_000}}
    )
    with pytest.raises(ConfigError, match="max_model_params"):
        EdgeAgent(
            device="d", task=big, transport=InMemoryBroker().transport(), signer=gateway_key.sign,
            gateway_key=gateway_key.public_key(), data=(np.ones((4, 30), np.float32), np.zeros(4, np.int64)),
            device_class=load_device_class(FIRMWARE / "raspberry-pi-zero-2w.toml"),
        )  # fmt: skip


def test_the_pending_update_goes_again_every_resend_seconds_while_its_round_is_newest(
    task, dataset, gateway_key
):
    broker, now = InMemoryBroker(), [0.0]
    agent = EdgeAgent(
        device="dev-0", task=task, transport=broker.transport(), signer=generate_key().sign,
        gateway_key=gateway_key.public_key(), data=(dataset.x_train[:50], dataset.y_train[:50]),
        resend_seconds=10.0, clock=lambda: now[0],
    )  # fmt: skip
    listener = broker.transport()
    listener.subscribe(update_subscription(task.id))
    listener.start()
    agent.start()
    publish_model(broker, task, gateway_key, round_=0)
    agent.step(0)
    first = listener.messages.get_nowait().payload
    now[0] = 9.9
    agent.step(0)
    assert listener.messages.empty()  # not yet
    now[0] = 10.0
    agent.step(0)
    assert listener.messages.get_nowait().payload == first and agent.resends == 1
    now[0] = 15.0
    agent.step(0)
    assert listener.messages.empty()  # the clock restarts at each send
    publish_model(broker, task, gateway_key, round_=1)
    agent.step(0)
    assert decode_envelope(listener.messages.get_nowait().payload).header.round == 1
    now[0] = 100.0
    agent.step(0)
    assert decode_envelope(listener.messages.get_nowait().payload).header.round == 1
    assert agent.resends == 2  # the round-1 update, round 0 is never sent again
