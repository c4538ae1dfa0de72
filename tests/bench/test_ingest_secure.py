"""``bench ingest --secure``: certificate-signed, sealed updates beside the plain ones, every
update accepted on both paths; the validator figures come from accepted frames only."""

from __future__ import annotations

import math

import pytest

from bench import ingest

pytestmark = pytest.mark.mqtt

MESSAGES = 20


def test_ingest_secure_small():
    result = ingest.run(messages=MESSAGES, size=2048, secure=True, ledger_delay=0)
    assert result["bench"] == "ingest"
    assert result["messages"] == MESSAGES
    assert result["secure"] is True
    assert "tls" not in result
    for key in (
        "gateway_msgs_per_s",
        "gateway_s",
        "gateway_secure_msgs_per_s",
        "gateway_secure_s",
        "secure_cost_gateway",
        "validator_msgs_per_s",
        "validator_secure_msgs_per_s",
        "validator_secure_cached_msgs_per_s",
        "secure_cost_validator",
    ):
        value = result[key]
        assert isinstance(value, (int, float)), key
        assert math.isfinite(value) and value > 0, (key, value)
    assert result["accepted"] == result["accepted_secure"] == MESSAGES
    assert result["rejected"] == result["rejected_secure"] == {}
    # The same tensors: the secure frame adds the certificate, the sealing fields and the tag.
    assert isinstance(result["message_bytes_secure"], int)
    assert 0 < result["message_bytes_secure"] - result["message_bytes"] < 1200


def test_secure_frames_are_certificate_signed_and_sealed(tmp_path):
    """What the secure path sends is what a secure site's agents send, and nothing else gets
    through the gateway's validator configured like a secure site's."""
    import numpy as np

    from fedcore import ALG_ECDSA_P256, ENC_X25519_AES256GCM, decode_envelope, update_topic
    from gateway import Rejected, RoundContext, UpdateValidator

    devices = ["dev-00000", "dev-00001"]
    task = ingest._task(16)
    updates = ingest._updates(task, devices, np.random.default_rng(0))
    site = ingest._SecureSite.create(tmp_path / "pki", devices)
    frames = site.frames(updates)
    for (header, payload), frame in zip(updates, frames, strict=True):
        sent = decode_envelope(frame).header
        assert sent.alg == ALG_ECDSA_P256
        assert sent.certificate == site.certificates[header.device]
        assert sent.enc == ENC_X25519_AES256GCM
        assert payload not in frame  # sealed
    validator = UpdateValidator(
        task=task.id,
        registry=site.registry(),
        shapes=task.model_spec().shapes(),
        max_message_bytes=1 << 20,
        **site.gateway_options(),
    )
    ctx = RoundContext(
        round=0, base=updates[0][0].base, has_update=lambda d: False, last_counter=lambda d: -1
    )
    for (header, payload), frame in zip(updates, frames, strict=True):
        accepted = validator.check(update_topic(task.id, header.device), frame, ctx)
        assert validator.plaintext(accepted.frame) == payload
    # The plain Ed25519 frames are refused there: sealing is required.
    plain = ingest._signed(updates, {d: ingest.generate_key() for d in devices})
    with pytest.raises(Rejected) as info:
        validator.check(update_topic(task.id, devices[0]), plain[0], ctx)
    assert info.value.reason == "not_encrypted"
