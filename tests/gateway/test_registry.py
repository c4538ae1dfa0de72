"""registry.json is read through its model: errors name the file and the key."""

from __future__ import annotations

import json

import pytest

from fedcore import ConfigError, generate_key, public_key_b64
from gateway import DeviceRegistry

FINGERPRINT = "ab" * 32


def test_a_saved_registry_loads_back(tmp_path):
    key = public_key_b64(generate_key())
    registry = DeviceRegistry({"ward-1": key}, certificates={"ward-2": FINGERPRINT})
    registry.save(tmp_path / "registry.json")
    loaded = DeviceRegistry.load(tmp_path / "registry.json")
    assert list(loaded) == ["ward-1", "ward-2"]
    assert loaded.public_key("ward-1") is not None and loaded.public_key("ward-2") is None
    assert loaded.fingerprint("ward-2") == FINGERPRINT


@pytest.mark.parametrize(
    ("body", "key", "message"),
    [
        ({"devices": {"d": {"pubkey": "x"}}}, "devices.d.pubkey",
         "unknown key (allowed: certificate_sha256, public_key)"),
        ({"devices": {"d": {}}}, "devices.d", 'expected {"public_key": base64}'),
        ({"devices": {"d": {"certificate_sha256": "ab"}}}, "devices.d.certificate_sha256",
         "should match pattern"),
        ({"devices": {"d": {"public_key": 5}}}, "devices.d.public_key", "valid string"),
        ({"devices": {"d": {"public_key": "AAAA"}}}, "devices.d.public_key", "expected 32"),
        ({"devices": {"-d": {"public_key": "x"}}}, "devices.-d.[key]", "should match pattern"),
        ({}, "devices", "required key is missing"),
        ({"devices": {}, "version": 2}, "version", "unknown key (allowed: devices)"),
        ([], None, "valid dictionary"),
    ],
)  # fmt: skip
def test_a_bad_registry_names_the_key(tmp_path, body, key, message):
    path = tmp_path / "registry.json"
    path.write_text(json.dumps(body))
    with pytest.raises(ConfigError) as caught:
        DeviceRegistry.load(path)
    assert caught.value.file == str(path) and caught.value.key == key
    assert message in str(caught.value)
