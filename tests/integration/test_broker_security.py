"""The production broker configuration, run for real: Mosquitto with mutual TLS only,
certificate identities and the generated ACL, attacked with real paho clients on loopback.

Waits are bounded. A refused publish is silent in MQTT 3.1.1, so non-delivery is asserted
behind a sync point: the attacker's next, legitimate message arrives, and the forged one sent
before it on the same connection has not.
"""

from __future__ import annotations

import queue
import ssl
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from fedcore import (
    ConfigError,
    Message,
    MqttSettings,
    MqttTransport,
    model_topic,
    presence_topic,
    update_subscription,
    update_topic,
)
from fedcore.mosquitto import (
    MosquittoBroker,
    SecureBrokerFiles,
    find_mosquitto,
    render_acl,
    write_broker_config,
)
from fedcore.pki import ca_cert_path, crl_path, init_ca, issue, revoke

ORG = "Acme Health"
DEVICES = ["dev-a", "dev-b", "dev-revoked", "dev-late"]
GATEWAY = "gw"
TASKS = ["deliver", "forge", "read", "v5", "takeover"]
WAIT = 5.0  # for what must happen
QUIET = 1.0  # for what must not, after a sync point proved the path is live


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pki")
    init_ca(root / "org", ORG)
    for device in DEVICES:
        issue(root / "org", "device", device)
    issue(root / "org", "gateway", GATEWAY)
    issue(root / "org", "broker", "broker", dns=["localhost"], ips=["127.0.0.1"])
    revoke(root / "org", "dev-revoked")
    # A forger with a CA of the same name, issuing itself a certificate for a real device
    # and a broker certificate to impersonate the broker.
    init_ca(root / "forger", ORG)
    issue(root / "forger", "device", "dev-a")
    issue(root / "forger", "broker", "broker", dns=["localhost"], ips=["127.0.0.1"])
    # The real CA's broker certificate, for another host than the one clients connect to.
    issue(root / "org", "broker", "elsewhere", dns=["broker.example"], ips=["10.0.0.7"])
    return root


def secure_files(pki: Path, *, ca="org", broker="broker") -> SecureBrokerFiles:
    return SecureBrokerFiles(
        ca=ca_cert_path(pki / ca),
        server_cert=pki / ca / "brokers" / f"{broker}.pem",
        server_key=pki / ca / "brokers" / f"{broker}.key",
        crl=crl_path(pki / ca),
        devices=DEVICES,
        gateways=[GATEWAY],
        tasks=TASKS,
    )


@pytest.fixture(scope="module")
def broker(pki):
    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed: run the tests through 'make test'")
    with MosquittoBroker(secure=secure_files(pki)) as running:
        yield running


@pytest.fixture
def connect(broker, pki):
    """Start a TLS client as ``name`` (its certificate from ``ca``); all stopped at the end."""
    started: list[MqttTransport] = []

    def start(
        name: str | None,
        *,
        ca: str = "org",
        kind: str = "devices",
        client_id: str | None = None,
        subscribe: tuple[str, ...] = (),
        tls: bool = True,
        port: int | None = None,
        host: str = "127.0.0.1",
    ) -> MqttTransport:
        settings = MqttSettings(
            host=host,
            port=port or broker.port,
            client_id=client_id or name or "anonymous",
            clean_session=True,
        )
        if tls:
            settings.tls_ca = ca_cert_path(pki / "org")  # clients trust the real CA only
            if name is not None:
                settings.tls_cert = pki / ca / kind / f"{name}.pem"
                settings.tls_key = pki / ca / kind / f"{name}.key"
        transport = MqttTransport(settings)
        for topic in subscribe:
            transport.subscribe(topic, 1)
        transport.start()
        started.append(transport)
        return transport

    yield start
    for transport in started:
        transport.stop()


def wait_for(transport: MqttTransport, topic: str, timeout: float = WAIT) -> Message:
    end = time.monotonic() + timeout
    while (remaining := end - time.monotonic()) > 0:
        try:
            message = transport.messages.get(timeout=remaining)
        except queue.Empty:
            break
        if message.topic == topic:
            return message
    raise AssertionError(f"nothing on {topic} within {timeout} s")


def drain(transport: MqttTransport, timeout: float = QUIET) -> list[Message]:
    """Everything that arrives within ``timeout``."""
    out = []
    end = time.monotonic() + timeout
    while (remaining := end - time.monotonic()) > 0:
        try:
            out.append(transport.messages.get(timeout=remaining))
        except queue.Empty:
            break
    return out


def refused(transport: MqttTransport, timeout: float = WAIT) -> str:
    """The connection attempt fails, and the retry too; returns why (``last_error``)."""
    end = time.monotonic() + timeout
    while transport.last_error is None and time.monotonic() < end:
        assert not transport.connected, "the broker accepted the connection"
        time.sleep(0.02)
    assert transport.last_error is not None, f"no failure reported within {timeout} s"
    # paho retries after 1 s: the retry is refused too
    assert not transport.wait_connected(1.5), "the broker accepted a retry"
    return transport.last_error


# ---------------------------------------------------------------- what is allowed works


@pytest.mark.mqtt
def test_device_update_reaches_the_gateway_and_the_model_reaches_devices(connect):
    gateway = connect(GATEWAY, kind="gateways", subscribe=(update_subscription("deliver"),))
    device = connect("dev-a", subscribe=(model_topic("deliver"),))
    assert gateway.wait_connected(WAIT) and device.wait_connected(WAIT)
    assert gateway.last_error is None and device.last_error is None

    device.publish_confirmed(update_topic("deliver", "dev-a"), b"update-1")
    assert wait_for(gateway, update_topic("deliver", "dev-a")).payload == b"update-1"
    device.publish_confirmed(presence_topic("deliver", "dev-a"), b"online")  # allowed too

    gateway.publish_confirmed(model_topic("deliver"), b"model-1")
    assert wait_for(device, model_topic("deliver")).payload == b"model-1"


# ---------------------------------------------------------------- what is not, is refused


@pytest.mark.mqtt
def test_a_device_cannot_publish_on_another_devices_update_topic(connect):
    gateway = connect(GATEWAY, kind="gateways", subscribe=(update_subscription("forge"),))
    mallory = connect("dev-a")
    assert gateway.wait_connected(WAIT) and mallory.wait_connected(WAIT)

    # MQTT 3.1.1 has no way to say "not authorised" for a publish: the broker acknowledges
    # and drops it.
    mallory.publish_confirmed(update_topic("forge", "dev-b"), b"forged as dev-b")
    mallory.publish_confirmed(update_topic("forge", "dev-a"), b"sync")
    assert wait_for(gateway, update_topic("forge", "dev-a")).payload == b"sync"
    assert drain(gateway) == []
    # Still connected: the broker drops the message, not the (authenticated) client.
    assert mallory.connected


@pytest.mark.mqtt
def test_mqtt5_publish_on_another_devices_topic_is_answered_not_authorized(broker, pki):
    acks: queue.Queue[tuple[int, int]] = queue.Queue()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.tls_set(
        ca_certs=str(ca_cert_path(pki / "org")),
        certfile=str(pki / "org" / "devices" / "dev-a.pem"),
        keyfile=str(pki / "org" / "devices" / "dev-a.key"),
        tls_version=ssl.PROTOCOL_TLS_CLIENT,
    )
    client.on_publish = lambda c, u, mid, reason, props: acks.put((mid, reason.value))
    connected = threading.Event()
    client.on_connect = lambda c, u, flags, reason, props: connected.set()
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        assert connected.wait(WAIT)
        forged = client.publish(update_topic("v5", "dev-b"), b"forged", qos=1).mid
        own = client.publish(update_topic("v5", "dev-a"), b"mine", qos=1).mid
        model = client.publish(model_topic("v5"), b"forged model", qos=1).mid
        got = dict(acks.get(timeout=WAIT) for _ in range(3))
        assert got[forged] == got[model] == 0x87  # not authorized
        assert got[own] in (0x00, 0x10)  # success, or "no matching subscribers" (nobody listens)
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.mark.mqtt
def test_a_device_cannot_read_updates_or_forge_the_global_model(connect):
    gateway = connect(GATEWAY, kind="gateways", subscribe=(update_subscription("read"),))
    # Mosquitto 2.0 grants these subscriptions (SUBACK) but checks every delivery against the
    # reader's grants: nothing but the model may reach a device.
    snoop = connect(
        "dev-b",
        subscribe=(
            update_topic("read", "dev-a"),
            update_subscription("read"),
            "#",
            model_topic("read"),
        ),
    )
    victim = connect("dev-a")
    for t in (gateway, snoop, victim):
        assert t.wait_connected(WAIT)

    victim.publish_confirmed(model_topic("read"), b"forged model")  # a device is no gateway
    victim.publish_confirmed(update_topic("read", "dev-a"), b"private update")
    assert wait_for(gateway, update_topic("read", "dev-a")).payload == b"private update"
    gateway.publish_confirmed(model_topic("read"), b"genuine model")
    assert wait_for(snoop, model_topic("read")).payload == b"genuine model"
    assert drain(snoop) == []  # neither the update nor the forged model, before or after


@pytest.mark.mqtt
def test_a_client_id_cannot_take_over_the_gateways_session(connect):
    gateway = connect(
        GATEWAY,
        kind="gateways",
        client_id="gateway-gw",
        subscribe=(update_subscription("takeover"),),
    )
    assert gateway.wait_connected(WAIT)
    # Same client id as the gateway (what gateway/_run.py sends, and its CN): without
    # use_username_as_clientid the broker would disconnect the gateway for the newcomer.
    for client_id in ("gateway-gw", GATEWAY):
        intruder = connect("dev-a", client_id=client_id)
        assert intruder.wait_connected(WAIT)
    intruder.publish_confirmed(update_topic("takeover", "dev-a"), b"sync")
    assert wait_for(gateway, update_topic("takeover", "dev-a")).payload == b"sync"
    assert gateway.connected


@pytest.mark.mqtt
def test_a_client_without_a_certificate_cannot_connect(connect):
    why = refused(connect(None))  # TLS, trusts the CA, presents nothing
    assert "certificate required" in why.lower(), why  # TLS 1.3: the alert after the handshake
    refused(connect("plain", tls=False))  # no TLS at all: there is no plain listener


@pytest.mark.mqtt
def test_a_certificate_from_another_ca_cannot_connect(connect):
    why = refused(connect("dev-a", ca="forger"))  # same CN, same CA name, another key
    assert "unknown ca" in why.lower(), why


@pytest.mark.mqtt
def test_a_revoked_device_cannot_connect(connect, broker, pki):
    why = refused(connect("dev-revoked"))
    assert "revoked" in why.lower(), why

    # Revoked while the broker runs: effective for new connections once the broker reloads.
    late = connect("dev-late", client_id="dev-late-1")
    assert late.wait_connected(WAIT)
    revoke(pki / "org", "dev-late")
    broker.reload()
    deadline = time.monotonic() + WAIT
    while True:  # the reload is asynchronous: retry fresh connections until one is refused
        attempt = connect("dev-late", client_id="dev-late-2")
        if not attempt.wait_connected(1.0):
            break
        attempt.stop()
        assert time.monotonic() < deadline, "the broker still accepts a revoked certificate"
    assert "revoked" in refused(attempt).lower()


@pytest.mark.mqtt
@pytest.mark.parametrize(
    ("ca", "cert", "expect"),
    [("forger", "broker", "certificate verify failed"), ("org", "elsewhere", "mismatch")],
    ids=["broker-of-another-ca", "broker-cert-for-another-host"],
)
def test_clients_refuse_a_broker_they_cannot_authenticate(connect, pki, ca, cert, expect):
    with MosquittoBroker(secure=secure_files(pki, ca=ca, broker=cert)) as impostor:
        why = refused(connect("dev-a", port=impostor.port))
        assert expect in why, why


# ---------------------------------------------------------------- the generated files


def directives(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def test_generated_config_is_tls_only_with_certificate_identities(pki, tmp_path):
    files = write_broker_config(
        tmp_path / "broker",
        **{k: getattr(secure_files(pki), k) for k in ("ca", "server_cert", "server_key", "crl")},
        port=8883,
        host="0.0.0.0",
        devices=["dev-b", "dev-a"],
        gateways=[GATEWAY],
        tasks=["t1"],
    )
    text = files.config.read_text()
    lines = directives(text)
    options = [line.split(" ", 1)[0] for line in lines]
    assert options.count("listener") == 1 and "port" not in options
    listener = options.index("listener")
    for setting in (
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",  # listener options: after the listener line
        f"cafile {ca_cert_path(pki / 'org')}",
        f"crlfile {crl_path(pki / 'org')}",
    ):
        assert setting in lines[listener:], setting
    for setting in (
        "allow_anonymous false",
        f"acl_file {files.acl}",
        "per_listener_settings false",
    ):
        assert setting in lines, setting
    assert "allow_anonymous true" not in lines
    # every directive is documented: each run of directives follows a comment
    previous = ""
    for line in text.splitlines():
        if line and not line.startswith("#"):
            assert previous.startswith("#") or previous in lines, line
        previous = line


def test_generated_acl_grants_exactly_the_wire_topics():
    acl = render_acl(devices=["dev-a"], gateways=[GATEWAY], tasks=["t1", "t2"])
    grants: dict[str, list[str]] = {}
    user = None
    for line in directives(acl):
        word, _, rest = line.partition(" ")
        if word == "user":
            user = rest
            grants[user] = []
        else:
            assert word == "topic" and user is not None, "no anonymous or pattern grants"
            grants[user].append(rest)
    expected: dict[str, list[str]] = {GATEWAY: [], "dev-a": []}
    for t in ("t1", "t2"):
        head = f"fedledger/v1/{t}"
        expected[GATEWAY] += [
            f"read {head}/update/+", f"read {head}/presence/+", f"read {head}/secagg/+",
            f"write {head}/model", f"write {head}/stage", f"write {head}/inbox/+",
        ]  # fmt: skip
        expected["dev-a"] += [
            f"write {head}/update/dev-a", f"write {head}/presence/dev-a",
            f"write {head}/secagg/dev-a", f"read {head}/model", f"read {head}/stage",
            f"read {head}/inbox/dev-a",
        ]  # fmt: skip
    assert grants == expected


@pytest.mark.parametrize(
    ("change", "key", "message"),
    [
        ({"ca": "missing.pem"}, "ca", "file not found"),
        ({"devices": ["dev/a"]}, "devices", "not an identifier"),
        ({"devices": [GATEWAY]}, "devices", "both a device and a gateway"),
        ({"tasks": []}, "tasks", "at least one task"),
        ({"port": 0}, "port", "between 1 and 65535"),
    ],
)
def test_broker_config_errors_name_the_key(pki, tmp_path, change, key, message):
    options = {k: getattr(secure_files(pki), k) for k in ("ca", "server_cert", "server_key")}
    options |= {"port": 8883, "host": "0.0.0.0", "devices": ["dev-a"], "gateways": [GATEWAY]}
    options |= {"tasks": ["t1"], **change}
    if "ca" in change:
        options["ca"] = tmp_path / change["ca"]
    with pytest.raises(ConfigError, match=message) as err:
        write_broker_config(tmp_path / "out", **options)
    assert err.value.key == key
    if "ca" in change:
        assert err.value.file == str(tmp_path / "missing.pem")


def test_transport_tls_settings_errors_name_the_file(pki, tmp_path):
    org = pki / "org"
    cases = [
        ({"tls_ca": tmp_path / "nope.pem"}, "tls_ca", tmp_path / "nope.pem"),
        ({"tls_cert": org / "devices" / "dev-a.pem"}, "tls_key", None),
        (
            {"tls_cert": org / "devices" / "dev-a.pem", "tls_key": org / "devices" / "dev-b.key"},
            "tls_cert",
            org / "devices" / "dev-a.pem",
        ),
    ]
    for extra, key, file in cases:
        settings = MqttSettings(client_id="x", tls_ca=ca_cert_path(org))
        for name, value in extra.items():
            setattr(settings, name, value)
        with pytest.raises(ConfigError) as err:
            MqttTransport(settings)
        assert err.value.key == key, extra
        if file is not None:
            assert err.value.file == str(file)
