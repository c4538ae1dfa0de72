"""A gateway anchoring its rounds on Fabric (the test peer running the real contract)."""

from fedcore import InMemoryBroker, init_params, model_hash, signer_from_key
from gateway import Gateway, UpdateStore
from ledger.fabric import FabricLedger
from tests.gateway.fleet import make_agents, pump


def test_rounds_are_anchored_through_the_fabric_gateway(
    tmp_path, make_client, admin, gateway_member, task, registry, device_keys, gateway_key, dataset
):
    operator = FabricLedger(make_client(admin))
    for device in registry:
        operator.submit("RegisterDevice", device, "Org1MSP", "pi4", registry.fingerprint(device))
    initial = model_hash(init_params(task.model_spec()))
    spec_hash = task.model_spec().spec_hash()
    operator.submit("CreateTask", task.id, "Org1MSP", "gateway1", spec_hash, "fedavg", {}, initial)

    broker = InMemoryBroker()
    gateway = Gateway(
        task=task,
        transport=broker.transport(),
        store=UpdateStore(tmp_path / "store.sqlite"),
        ledger=FabricLedger(make_client(gateway_member)),
        registry=registry,
        signer=signer_from_key(gateway_key),
        evaluation=(dataset.x_test, dataset.y_test),
        max_message_bytes=1 << 20,
    )
    agents = make_agents(task, device_keys, gateway_key, dataset, broker)
    gateway.connect()
    gateway.start()
    for _ in range(10):
        pump(gateway, agents)
    assert gateway.finished
    assert all(r.ledgered for r in gateway.results)
    history = operator.evaluate("GetHistory", gateway.final_model)
    assert [r["round"] for r in history["rounds"]] == [2, 1, 0]
    assert history["initial_model"] == initial
    assert sorted(history["rounds"][0]["contributors"]) == sorted(device_keys)
