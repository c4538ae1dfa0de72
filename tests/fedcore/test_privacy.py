"""The DP building blocks: clipping, seeded Poisson sampling, the accountant, and the
model header's list of sampled devices."""

from __future__ import annotations

import hashlib

import dp_accounting
import numpy as np
import pytest

from fedcore import (
    ModelHeader,
    WireError,
    clip_update,
    decode_envelope,
    encode_model,
    encode_tensors,
    epsilon,
    generate_key,
    load_dp_seed,
    new_dp_seed,
    sampled_devices,
    seed_digest,
    update_norm,
)
from fedcore._errors import ConfigError
from fedcore._privacy import RDP_ORDERS, DPRoundEvent
from fedcore._wire import TYPE_MODEL, _frame


def test_clipping_bounds_the_norm_over_all_tensors():
    delta = {"w": np.full((3, 4), 1.0, np.float32), "b": np.array([2.0], np.float32)}
    assert update_norm(delta) == pytest.approx(4.0)
    clipped, norm = clip_update(delta, 1.0)
    assert norm == pytest.approx(4.0)
    assert update_norm(clipped) == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_allclose(clipped["b"], [0.5])
    same, _ = clip_update(delta, 10.0)
    np.testing.assert_array_equal(same["w"], delta["w"])


def test_sampling_is_a_function_of_the_seed_and_has_the_rate():
    devices = [f"d-{i:04d}" for i in range(4000)]
    a = sampled_devices(b"s" * 32, "task", 3, devices, 0.1)
    assert a == sampled_devices(b"s" * 32, "task", 3, reversed(devices), 0.1)
    assert a != sampled_devices(b"s" * 32, "task", 4, devices, 0.1)
    assert a != sampled_devices(b"t" * 32, "task", 3, devices, 0.1)
    assert 300 < len(a) < 500  # 400 expected; 5 standard deviations either side
    # each device's draw does not depend on who else is in the population
    assert set(sampled_devices(b"s" * 32, "task", 3, devices[:100], 0.1)) == set(a) & set(
        devices[:100]
    )
    assert sampled_devices(b"s" * 32, "task", 3, devices[:5], 1.0) == tuple(devices[:5])


def test_epsilon_is_dp_accountings_rdp_figure():
    events = [DPRoundEvent(1.1, 0.05)] * 30 + [DPRoundEvent(0.9, 0.05)] * 10
    accountant = dp_accounting.rdp.RdpAccountant(list(RDP_ORDERS))
    for z, n in ((1.1, 30), (0.9, 10)):
        event = dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(z))
        accountant.compose(event, n)
    assert epsilon(events, 1e-5) == pytest.approx(accountant.get_epsilon(1e-5), abs=1e-12)
    # the order of the rounds does not change the figure, bit for bit
    assert epsilon(events[::-1], 1e-5) == epsilon(events, 1e-5)
    assert epsilon(events, 1e-5) < epsilon(events, 1e-5, amplified=False)
    assert epsilon([], 1e-5) == 0.0
    more = epsilon([*events, DPRoundEvent(1.1, 0.05)], 1e-5)
    assert more > epsilon(events, 1e-5)


def test_a_seed_file_is_made_once_and_read_back(tmp_path):
    path = tmp_path / "seed"
    digest = new_dp_seed(path)
    assert (path.stat().st_mode & 0o777) == 0o600
    assert seed_digest(load_dp_seed(path)) == digest
    before = path.read_bytes()
    with pytest.raises(ConfigError, match="never overwritten"):
        new_dp_seed(path)
    assert path.read_bytes() == before
    (tmp_path / "bad").write_text("zz\n")
    with pytest.raises(ConfigError, match="gateway.dp_seed"):
        load_dp_seed(tmp_path / "bad")
    (tmp_path / "short").write_text("00ff\n")
    with pytest.raises(ConfigError, match="16 to 64"):
        load_dp_seed(tmp_path / "short")


def test_the_model_header_names_the_sampled_devices():
    key = generate_key()
    payload = encode_tensors({"w": np.ones(3, np.float32)}, "f32")
    header = ModelHeader(task="t", round=2, status="open", deadline=1.0, sampled=("a", "b"))
    decoded = decode_envelope(encode_model(header, payload, key.sign)).header
    assert decoded.sampled == ("a", "b")
    plain = decode_envelope(
        encode_model(ModelHeader(task="t", round=2, status="open", deadline=1.0), payload, key.sign)
    )
    assert plain.header.sampled is None
    assert b"sampled" not in plain.signed  # a model without sampling: the header it had
    for bad in (["b", "a"], ["a", "a"], ["no/slash"], "ab", [1]):
        fields = {"task": "t", "round": 2, "status": "open", "deadline": 1.0,
                  "payload_sha256": hashlib.sha256(payload).hexdigest(),
                  "sampled": bad}  # fmt: skip
        with pytest.raises(WireError, match="sampled"):
            decode_envelope(_frame(TYPE_MODEL, fields, payload, key.sign))
