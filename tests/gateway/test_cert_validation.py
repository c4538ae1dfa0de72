"""The gateway's checks of certificate-signed and sealed updates, with a real CA and CRL."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from edge_agent import EdgeAgent
from fedcore import (
    ALG_ECDSA_P256,
    CertificateTrust,
    InMemoryBroker,
    UpdateHeader,
    canonical_json,
    certificate_der,
    certificate_fingerprint,
    certificate_signer,
    encode_tensors,
    encode_update,
    generate_key,
    generate_x25519_key,
    load_certificate,
    load_ec_private_key,
    public_key_b64,
    update_topic,
)
from fedcore.pki import crl_path, init_ca, issue, revoke
from gateway import DeviceRegistry, Gateway, Rejected, RoundContext, UpdateStore, UpdateValidator
from ledger import EmbeddedLedger, Identity

from .fleet import Clock

TASK = "test-task"
BASE = "cd" * 32
SHAPES = {"w": (30, 2), "b": (2,)}
TENSORS = {"w": np.ones((30, 2), np.float32), "b": np.zeros(2, np.float32)}
ADMIN = Identity(msp_id="org1", subject="admin", role="admin")


@dataclass
class Device:
    name: str
    key: object
    cert: object

    @classmethod
    def issue(cls, pki: Path, name: str, **options) -> Device:
        done = issue(pki, "device", name, **options)
        return cls(name, load_ec_private_key(done.key), load_certificate(done.cert))

    @property
    def der(self) -> bytes:
        return certificate_der(self.cert)

    @property
    def fingerprint(self) -> str:
        return certificate_fingerprint(self.cert)


@pytest.fixture
def pki(tmp_path):
    directory = tmp_path / "pki"
    init_ca(directory, "test org")
    return directory


@pytest.fixture
def devices(pki):
    return {name: Device.issue(pki, name) for name in ("dev-0", "dev-1")}


@pytest.fixture
def registry(devices):
    return DeviceRegistry({}, certificates={d.name: d.fingerprint for d in devices.values()})


@pytest.fixture
def trust(pki):
    return CertificateTrust.load(pki / "ca.pem", crl_path(pki))


@pytest.fixture
def sealing():
    return generate_x25519_key()


def make_validator(registry, trust, sealing=None, **options) -> UpdateValidator:
    return UpdateValidator(
        task=TASK,
        registry=registry,
        shapes=SHAPES,
        max_message_bytes=1 << 20,
        trust=trust,
        decryption_key=sealing,
        **options,
    )


def ctx(*, counters=None) -> RoundContext:
    counters = counters or {}
    return RoundContext(
        round=2, base=BASE, has_update=lambda d: False, last_counter=lambda d: counters.get(d, -1)
    )


def frame(signer: Device, *, device=None, cert: bytes | None = None, seal_to=None, **changes):
    fields = dict(
        task=TASK, round=2, device=device or signer.name, base=BASE, samples=10, codec="int8",
        counter=5, alg=ALG_ECDSA_P256, cert=base64.b64encode(cert or signer.der).decode(),
    )  # fmt: skip
    fields.update(changes)
    payload = encode_tensors(TENSORS, "int8")
    return encode_update(
        UpdateHeader(**fields), payload, certificate_signer(signer.key), seal_to=seal_to
    )


def reason(validator, data, device="dev-0", context=None) -> str:
    with pytest.raises(Rejected) as info:
        validator.check(update_topic(TASK, device), data, context or ctx())
    return info.value.reason


def test_a_certificate_signed_update_is_accepted(registry, trust, devices):
    dev = devices["dev-0"]
    accepted = make_validator(registry, trust).check(update_topic(TASK, "dev-0"), frame(dev), ctx())
    assert accepted.header.alg == ALG_ECDSA_P256
    assert accepted.certificate_sha256 == dev.fingerprint
    assert [v.name for v in accepted.views] == ["w", "b"]


def test_a_certificate_of_another_ca_is_refused(registry, trust, tmp_path):
    init_ca(tmp_path / "other", "test org")  # same organisation name, another key
    impostor = Device.issue(tmp_path / "other", "dev-0")
    assert reason(make_validator(registry, trust), frame(impostor)) == "bad_certificate"


def test_an_expired_certificate_is_refused(registry, pki, devices):
    later = CertificateTrust.load(
        pki / "ca.pem", crl_path(pki), clock=lambda: time.time() + 400 * 86400
    )
    assert reason(make_validator(registry, later), frame(devices["dev-0"])) == "bad_certificate"
    earlier = CertificateTrust.load(pki / "ca.pem", clock=lambda: time.time() - 86400)
    assert reason(make_validator(registry, earlier), frame(devices["dev-0"])) == "bad_certificate"


def test_a_certificate_must_name_the_sender(registry, trust, devices):
    # dev-1 signs a frame for dev-0 with its own (valid) certificate and key.
    forged = frame(devices["dev-1"], device="dev-0")
    assert reason(make_validator(registry, trust), forged) == "subject_mismatch"


def test_a_gateway_certificate_cannot_sign_updates(pki, registry, trust):
    done = issue(pki, "gateway", "gw-0")
    gw = Device("gw-0", load_ec_private_key(done.key), load_certificate(done.cert))
    registry = DeviceRegistry({}, certificates={"gw-0": gw.fingerprint})
    assert reason(make_validator(registry, trust), frame(gw), device="gw-0") == "bad_certificate"


def test_a_revoked_certificate_is_refused_once_the_crl_changes(pki, registry, trust, devices):
    validator = make_validator(registry, trust)
    validator.check(update_topic(TASK, "dev-0"), frame(devices["dev-0"]), ctx())
    revoke(pki, "dev-0")
    _touch_later(crl_path(pki))
    trust.refresh(force=True)  # the gateway re-reads it by itself within a second
    assert reason(validator, frame(devices["dev-0"])) == "certificate_revoked"
    validator.check(update_topic(TASK, "dev-1"), frame(devices["dev-1"]), ctx())


def test_the_crl_is_reloaded_without_being_asked(pki, registry, trust, devices):
    validator = make_validator(registry, trust)
    validator.check(update_topic(TASK, "dev-0"), frame(devices["dev-0"]), ctx())
    revoke(pki, "dev-0")
    _touch_later(crl_path(pki))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            validator.check(update_topic(TASK, "dev-0"), frame(devices["dev-0"]), ctx())
        except Rejected as exc:
            assert exc.reason == "certificate_revoked"
            return
        time.sleep(0.1)
    pytest.fail("the changed CRL was never applied")


def test_an_algorithm_cannot_be_swapped(registry, trust, devices):
    dev = devices["dev-0"]
    validator = make_validator(registry, trust)
    # Ed25519 for a device admitted by certificate: the registry holds no Ed25519 key for it.
    stranger = generate_key()
    fields = dict(
        task=TASK, round=2, device="dev-0", base=BASE, samples=10, codec="int8", counter=5
    )
    ed = encode_update(UpdateHeader(**fields), encode_tensors(TENSORS, "int8"), stranger.sign)
    assert reason(validator, ed) == "algorithm_mismatch"
    # The header says ECDSA and carries the certificate, the signature is Ed25519.
    fields |= dict(alg=ALG_ECDSA_P256, cert=base64.b64encode(dev.der).decode())
    swapped = encode_update(UpdateHeader(**fields), encode_tensors(TENSORS, "int8"), stranger.sign)
    assert reason(validator, swapped) == "bad_signature"
    # A certificate frame relabelled as Ed25519 (cert dropped): no longer the signed bytes.
    good = frame(dev)
    relabelled = _resign(good, _as_ed25519, None)
    assert reason(validator, relabelled) == "algorithm_mismatch"
    with_key = DeviceRegistry({"dev-0": public_key_b64(stranger)})
    assert reason(make_validator(with_key, trust), relabelled) == "bad_signature"
    # A gateway that trusts no CA takes no certificate signatures at all.
    assert reason(make_validator(registry, None), good) == "algorithm_mismatch"


def test_a_rotated_certificate_is_accepted_and_the_counter_goes_on(pki, registry, trust, devices):
    old = devices["dev-0"]
    new = Device.issue(pki, "dev-0", rotate=True)
    assert new.fingerprint != old.fingerprint
    validator = make_validator(registry, trust)
    before = validator.check(update_topic(TASK, "dev-0"), frame(old, counter=5), ctx())
    after = validator.check(
        update_topic(TASK, "dev-0"), frame(new, counter=6), ctx(counters={"dev-0": 5})
    )
    assert before.certificate_sha256 == old.fingerprint
    assert after.certificate_sha256 == new.fingerprint  # no registry update was needed
    # An old frame (or the old key) replayed after the rotation: same device, same counter.
    seen = ctx(counters={"dev-0": 6})
    assert reason(validator, frame(old, counter=5), context=seen) == "replayed"
    assert reason(validator, frame(new, counter=6), context=seen) == "replayed"
    # The end of the rotation: the superseded certificate is revoked.
    revoke(pki, "dev-0", superseded_only=True)
    trust.refresh(force=True)
    assert reason(validator, frame(old, counter=7), context=seen) == "certificate_revoked"
    validator.check(update_topic(TASK, "dev-0"), frame(new, counter=7), seen)


def test_a_sealed_update_round_trips(registry, trust, devices, sealing):
    validator = make_validator(registry, trust, sealing, require_encryption=True)
    data = frame(devices["dev-0"], seal_to=sealing.public_key())
    accepted = validator.check(update_topic(TASK, "dev-0"), data, ctx())
    assert accepted.frame == data  # the stored (and ledgered) frame is the one sent
    np.testing.assert_allclose(accepted.views[0].dequantize(), TENSORS["w"], rtol=0.01)
    assert validator.plaintext(data) == encode_tensors(TENSORS, "int8")


def test_tampered_ciphertext_is_refused(registry, trust, devices, sealing):
    validator = make_validator(registry, trust, sealing)
    data = bytearray(frame(devices["dev-0"], seal_to=sealing.public_key()))
    data[-70] ^= 1  # a ciphertext byte (the payload ends 65 bytes from the end)
    assert reason(validator, bytes(data)) == "digest_mismatch"
    # The same change with payload_sha256 fixed up: the device's signature no longer holds.
    fixed = _resign(bytes(data), lambda f: None, None)
    assert reason(validator, fixed) == "bad_signature"
    # Re-signed by the device itself (a device cannot make another's ciphertext its own
    # either): the header is associated data, so the tag fails.
    resigned = _resign(bytes(data), lambda f: None, devices["dev-0"])
    assert reason(validator, resigned) == "decrypt_failed"


def test_an_update_sealed_to_another_gateway_is_decrypt_failed(registry, trust, devices, sealing):
    validator = make_validator(registry, trust, sealing)
    elsewhere = frame(devices["dev-0"], seal_to=generate_x25519_key().public_key())
    assert reason(validator, elsewhere) == "decrypt_failed"
    no_key = make_validator(registry, trust)
    assert reason(no_key, frame(devices["dev-0"], seal_to=sealing.public_key())) == (
        "decrypt_failed"
    )


def test_a_gateway_can_require_sealed_payloads(registry, trust, devices, sealing):
    validator = make_validator(registry, trust, sealing, require_encryption=True)
    assert reason(validator, frame(devices["dev-0"])) == "not_encrypted"


def test_frame_size_overhead(registry, trust, devices, sealing):
    """Certificate signing costs the certificate once per frame; sealing 16 bytes of tag and
    the ephemeral key. Both stay far inside the header and message limits."""
    dev = devices["dev-0"]
    payload = encode_tensors(TENSORS, "int8")
    fields = dict(
        task=TASK, round=2, device="dev-0", base=BASE, samples=10, codec="int8", counter=5
    )
    plain = len(encode_update(UpdateHeader(**fields), payload, generate_key().sign))
    signed = len(frame(dev))
    sealed = len(frame(dev, seal_to=sealing.public_key()))
    assert 500 < signed - plain < 1000
    assert 60 < sealed - signed < 130
    header_len = struct.unpack_from(">H", frame(dev, seal_to=sealing.public_key()), 6)[0]
    assert header_len < 2048


def test_rotation_is_anchored_on_the_ledger(tmp_path, pki, task, dataset, gateway_key, sealing):
    """A full task: a device rotates its certificate between rounds; the gateway accepts it,
    its counter continues, and the ledger records the new fingerprint with its history."""
    names = ["dev-0", "dev-1", "dev-2"]
    devices = {n: Device.issue(pki, n) for n in names}
    registry = DeviceRegistry({}, certificates={d.name: d.fingerprint for d in devices.values()})
    broker, clock = InMemoryBroker(), Clock()
    gateway = Gateway(
        task=task,
        transport=broker.transport(),
        store=UpdateStore(tmp_path / "store.sqlite"),
        ledger=EmbeddedLedger(
            tmp_path / "ledger.sqlite",
            signer=gateway_key.sign,
            public_key=public_key_b64(gateway_key),
        ),
        registry=registry,
        signer=gateway_key.sign,
        max_message_bytes=1 << 20,
        clock=clock,
        admin=ADMIN,
        trust=CertificateTrust.load(pki / "ca.pem", crl_path(pki)),
        decryption_key=sealing,
        require_encryption=True,
    )

    def agent(device: Device, i: int) -> EdgeAgent:
        idx = np.arange(i, len(dataset.y_train), len(names))
        made = EdgeAgent(
            device=device.name,
            task=task,
            transport=broker.transport(),
            signer=certificate_signer(device.key),
            gateway_key=gateway_key.public_key(),
            data=(dataset.x_train[idx], dataset.y_train[idx]),
            state_path=tmp_path / f"{device.name}.json",
            certificate=device.der,
            seal_to=sealing.public_key(),
        )
        made.start()
        return made

    agents = [agent(devices[n], i) for i, n in enumerate(names)]
    gateway.connect()
    gateway.start()
    for a in agents:
        a.step(0)
    gateway.step(0)
    assert [r.participants for r in gateway.results] == [3]
    # dev-0 restarts with a rotated certificate; its state (counter) is on disk, and the
    # retained model of round 1 reaches the new process.
    agents[0].transport.stop()
    rotated = Device.issue(pki, "dev-0", rotate=True)
    agents[0] = agent(rotated, 0)
    for _ in range(10):
        for a in agents:
            a.step(0)
        gateway.step(0)
    assert gateway.finished
    assert [r.participants for r in gateway.results] == [3, 3, 3]
    assert not any(r.rejected for r in gateway.results)
    record = gateway.ledger.evaluate("GetDevice", "dev-0", identity=ADMIN)
    assert record["key_fingerprint"] == rotated.fingerprint
    assert [(h["old"], h["new"]) for h in record["key_history"]] == [
        (devices["dev-0"].fingerprint, rotated.fingerprint)
    ]
    assert gateway.store.counters()["dev-0"] == 2  # 0, 1, 2: one counter across both keys
    report = gateway.ledger.verify(replay=True, store=gateway.store)
    assert report.ok, report.problem
    gateway.close()


def test_rotate_device_key_rules(tmp_path, gateway_key):
    led = EmbeddedLedger(
        tmp_path / "l.sqlite", signer=gateway_key.sign, public_key=public_key_b64(gateway_key)
    )
    a, b, c = ("a" * 64, "b" * 64, "c" * 64)
    led.submit("RegisterDevice", "dev-0", "org1", "default", a, identity=ADMIN)
    gateway = Identity(msp_id="org1", subject="gateway", role="gateway")
    other = Identity(msp_id="org2", subject="gateway", role="gateway")
    auditor = Identity(msp_id="org1", subject="x", role="auditor")
    for who, args, code in [
        (other, ("dev-0", "org2", a, b), "forbidden"),
        (auditor, ("dev-0", "org1", a, b), "forbidden"),
        (gateway, ("dev-0", "org1", c, b), "conflict"),  # stale view of the current key
        (gateway, ("dev-0", "org1", a, a), "conflict"),
        (gateway, ("dev-9", "org1", a, b), "not_found"),
    ]:
        with pytest.raises(Exception) as info:
            led.submit("RotateDeviceKey", *args, identity=who)
        assert getattr(info.value, "code", None) == code, (args, info.value)
    led.submit("RotateDeviceKey", "dev-0", "org1", a, b, identity=gateway)
    led.submit("RotateDeviceKey", "dev-0", "org1", b, c, identity=ADMIN)
    record = led.evaluate("GetDevice", "dev-0", identity=auditor)
    assert record["key_fingerprint"] == c
    assert [(h["old"], h["new"], h["by"]) for h in record["key_history"]] == [
        (a, b, "gateway"),
        (b, c, "admin"),
    ]
    led.submit("RevokeDevice", "dev-0", "lost", identity=ADMIN)
    with pytest.raises(Exception) as info:
        led.submit("RotateDeviceKey", "dev-0", "org1", c, a, identity=ADMIN)
    assert info.value.code == "revoked"
    led.close()


def _touch_later(path: Path) -> None:
    """Filesystems with coarse timestamps: make sure the change is visible."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))


def _as_ed25519(fields: dict) -> None:
    del fields["cert"]
    fields["alg"] = "ed25519"


def _resign(data: bytes, change, signer: Device | None) -> bytes:
    """Rebuild a frame with its header changed by ``change`` and ``payload_sha256`` fixed up;
    signed by ``signer``'s certificate key, or keeping the old signature."""
    header_len, payload_len = struct.unpack_from(">HI", data, 6)
    fields = json.loads(data[12 : 12 + header_len])
    payload = data[12 + header_len : 12 + header_len + payload_len]
    change(fields)
    fields["payload_sha256"] = hashlib.sha256(payload).hexdigest()
    body = canonical_json(fields)
    signed = struct.pack(">4sBBHI", b"FLDG", 1, 1, len(body), len(payload)) + body
    signature = data[-64:] if signer is None else certificate_signer(signer.key)(signed)
    return signed + payload + b"\x40" + signature


def test_the_secure_site_signs_with_certificates_and_seals(tmp_path, dataset):
    """``provision(secure=True)`` wires it all through the config files: agents sign with
    their certificate keys and seal, the gateway checks chain and CRL and requires sealing."""
    import tomli_w

    from edge_agent import load_agent_config, open_agent
    from fedcore import ConfigError, decode_envelope
    from fedledger._provision import TaskOptions, provision
    from gateway import load_gateway_config, open_gateway

    layout = provision(
        tmp_path / "site", dataset, devices=3, alpha=0.5, seed=0,
        options=TaskOptions(rounds=2), broker_host="127.0.0.1", broker_port=1, secure=True,
    )  # fmt: skip
    broker = InMemoryBroker()
    gateway = open_gateway(load_gateway_config(layout.gateway_config), transport=broker.transport())
    agents = [
        open_agent(load_agent_config(path), source=str(path), transport=broker.transport())
        for path in layout.agent_configs.values()
    ]
    for agent in agents:
        agent.start()
    gateway.connect()
    gateway.start()
    for agent in agents[:2]:
        agent.step(0)
    gateway.step(0)
    # The gateway dies with two sealed updates stored; the next one opens them to resume.
    gateway.transport.stop()
    gateway.store.close()
    gateway.ledger.close()
    gateway = open_gateway(load_gateway_config(layout.gateway_config), transport=broker.transport())
    gateway.connect()
    gateway.start()
    for _ in range(10):
        for agent in agents:
            agent.step(0)
        gateway.step(0)
    assert gateway.finished and [r.participants for r in gateway.results] == [3, 3]
    stored = gateway.store.updates(gateway.task.id, 0)
    headers = [decode_envelope(s.frame).header for s in stored]
    assert {(h.alg, h.enc) for h in headers} == {(ALG_ECDSA_P256, "x25519-hkdf-sha256-aes256gcm")}
    gateway.close()

    # A device configured with a key that is not its certificate's is refused at start.
    path = layout.agent_configs["device-01"]
    config = load_agent_config(path)
    other = layout.pki / "devices" / "device-02.key"
    path.write_text(tomli_w.dumps({"agent": {**_plain(config.agent), "key": str(other)}}))
    with pytest.raises(ConfigError, match="agent.key"):
        open_agent(load_agent_config(path), source=str(path), transport=broker.transport())


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"crl": "crl.pem"}, "crl needs ca"),
        ({"require_encryption": True}, "require_encryption needs encryption_key"),
    ],
)
def test_gateway_trust_settings_are_checked_at_load(tmp_path, extra, message):
    import tomli_w

    from fedcore import ConfigError
    from gateway import load_gateway_config

    section = {"key": "k", "task": "t", "registry": "r", "store": "s", "ledger": "l", **extra}
    path = tmp_path / "gateway.toml"
    path.write_text(tomli_w.dumps({"gateway": section}))
    with pytest.raises(ConfigError, match=message):
        load_gateway_config(path)


def _plain(section) -> dict:
    return {
        k: str(v) if isinstance(v, Path) else v
        for k, v in section.model_dump().items()
        if v is not None
    }
