"""Nothing the gateway accepts can be refused on the ledger: the validator enforces the
contract's own limits (``fedcore.MAX_SAMPLES``, ``MAX_ROUND``), from the same constants."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcore import MAX_ROUND, MAX_SAMPLES, UpdateHeader, encode_update, update_topic
from gateway import Rejected, RoundContext
from ledger._contract import ContractError, _round
from tests.gateway.test_fuzz import BASE, KEYS, TASK, VALID_PAYLOADS, make_validator
from tests.ledger.test_contract import ADMIN, GATEWAY, SPEC, Ledger, M, h

WIRE_MAX = 2**53 - 1  # what the wire format itself allows


def ledger_with_open_round() -> Ledger:
    led = Ledger()
    led.submit(ADMIN, "RegisterDevice", "dev-0", "Org1MSP", "wearable", h("key-0"))
    led.submit(ADMIN, "CreateTask", TASK, "Org1MSP", "gateway1", SPEC, "fedavg", {}, M[0])
    led.submit(GATEWAY, "OpenRound", TASK, 0, M[0], 2_000.0)
    return led


def frame(*, samples: int, round_: int = 0) -> bytes:
    header = UpdateHeader(
        task=TASK, round=round_, device="dev-0", base=BASE, samples=samples, codec="int8",
        counter=1,
    )  # fmt: skip
    return encode_update(header, VALID_PAYLOADS["int8"], KEYS["dev-0"].sign)


def check(data: bytes, round_: int = 0):
    ctx = RoundContext(
        round=round_, base=BASE, has_update=lambda _d: False, last_counter=lambda _d: -1
    )
    return make_validator().check(update_topic(TASK, "dev-0"), data, ctx)


@settings(max_examples=200, deadline=None)
@given(
    samples=st.one_of(
        st.integers(1, WIRE_MAX),
        st.sampled_from([1, MAX_SAMPLES - 1, MAX_SAMPLES, MAX_SAMPLES + 1, 2**31, WIRE_MAX]),
    )
)
def test_every_update_the_validator_accepts_the_contract_records(samples):
    try:
        accepted = check(frame(samples=samples))
    except Rejected as exc:
        assert exc.reason == "out_of_range" and samples > MAX_SAMPLES
        return
    record = {
        "device": "dev-0",
        "digest": hashlib.sha256(b"update").hexdigest(),
        "samples": accepted.header.samples,
        "codec": accepted.header.codec,
        "accepted": True,
        "reason": None,
    }
    ledger_with_open_round().submit(GATEWAY, "RecordUpdates", TASK, 0, [record])


def test_a_sample_count_the_contract_refuses_is_rejected_with_a_reason():
    with pytest.raises(Rejected) as caught:
        check(frame(samples=2**31))
    assert caught.value.reason == "out_of_range" and "2147483648" in caught.value.detail
    # ... and the contract does refuse it: the two limits are one.
    record = {
        "device": "dev-0", "digest": h("u"), "samples": 2**31, "codec": "int8",
        "accepted": True, "reason": None,
    }  # fmt: skip
    with pytest.raises(ContractError):
        ledger_with_open_round().submit(GATEWAY, "RecordUpdates", TASK, 0, [record])


@pytest.mark.parametrize("round_", [MAX_ROUND, MAX_ROUND + 1, WIRE_MAX])
def test_rounds_past_the_contracts_last_are_rejected(round_):
    contract_takes_it = True
    try:
        _round(round_)
    except ContractError:
        contract_takes_it = False
    try:
        check(frame(samples=1, round_=round_), round_=round_)
        validator_takes_it = True
    except Rejected as exc:
        assert exc.reason == "out_of_range"
        validator_takes_it = False
    assert validator_takes_it == contract_takes_it == (round_ <= MAX_ROUND)
