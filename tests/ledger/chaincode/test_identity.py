"""How a creator certificate becomes the contract's identity, and how arguments are decoded."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import given
from hypothesis import strategies as st

from ledger._context import Identity
from ledger._contract import ContractError
from ledger.chaincode import (
    ROLE_ATTRIBUTE,
    certificate_identity,
    decode_arguments,
    encode_arguments,
)
from ledger.chaincode._adapter import _prefix_range

from .fake_peer import make_certificate, pem


def identity(common_name="alice", **kw) -> Identity:
    cert, _ = make_certificate(common_name, **kw)
    return certificate_identity("Org1MSP", pem(cert))


@pytest.mark.parametrize("role", ["admin", "gateway", "device", "auditor"])
def test_role_from_an_organizational_unit(role):
    assert identity(ous=["client", "org1", role]) == Identity("Org1MSP", "alice", role)


def test_nodeou_admin_is_an_admin():
    assert identity(ous=["admin"]).role == "admin"


def test_the_fabric_ca_attribute_overrides_the_ous():
    got = identity(ous=["client", "device"], attrs={ROLE_ATTRIBUTE: "gateway", "hf.Type": "client"})
    assert got.role == "gateway"


def test_other_attributes_leave_the_ou_role():
    assert identity(ous=["client", "auditor"], attrs={"hf.Affiliation": "org1"}).role == "auditor"


@pytest.mark.parametrize(
    "kw",
    [
        {"ous": ["client"]},  # no role at all
        {"ous": ["client", "Gateway"]},  # roles are lowercase, as NodeOU identifiers are exact
        {"ous": ["gateway", "device"]},  # two roles name none
        {"ous": ["gateway"], "attrs": {ROLE_ATTRIBUTE: "superuser"}},  # not a role
        {"ous": ["gateway"], "raw_attr_extension": b"not json"},  # unreadable: no guess
        {"ous": ["gateway"], "raw_attr_extension": b'{"attrs": 3}'},
    ],
)
def test_no_role_means_an_empty_role(kw):
    assert identity(**kw).role == ""


def test_subject_is_the_common_name_or_empty():
    assert identity("gateway1.org1", ous=["gateway"]).subject == "gateway1.org1"
    assert identity(None, ous=["gateway"]).subject == ""


def test_der_and_garbage_certificates():
    cert, _ = make_certificate("bob", ous=["device"])
    der = cert.public_bytes(serialization.Encoding.DER)
    assert certificate_identity("Org2MSP", der) == Identity("Org2MSP", "bob", "device")
    assert certificate_identity("Org2MSP", b"not a certificate") == Identity("Org2MSP", "", "")
    assert certificate_identity("", b"") == Identity("", "", "")
    with pytest.raises(TypeError):
        certificate_identity("Org2MSP", pem(cert).decode())


def test_decode_arguments():
    assert decode_arguments([b"F", b'{"a": [1, 2.5]}', b"null", '"é"'.encode()]) == (
        "F",
        [{"a": [1, 2.5]}, None, "é"],
    )
    call = encode_arguments("RecordUpdates", "t", 0, [{"b": 1, "a": "é"}], None)
    assert call == [b"RecordUpdates", b'"t"', b"0", '[{"a":"é","b":1}]'.encode(), b"null"]
    assert decode_arguments(call) == ("RecordUpdates", ["t", 0, [{"a": "é", "b": 1}], None])
    with pytest.raises(ContractError) as info:
        decode_arguments([b"F", b"1", b"Infinity"])
    assert info.value.code == "invalid_argument"
    assert info.value.message.startswith("argument 2 of F is not a JSON text")


keys = st.text(st.characters(blacklist_categories=("Cs",)), max_size=6)


@given(prefix=keys, key=keys)
def test_prefix_range_holds_exactly_the_keys_with_the_prefix(prefix, key):
    start, end = _prefix_range(prefix)
    as_bytes = key.encode()  # Fabric compares keys as UTF-8 bytes
    inside = as_bytes >= start.encode() and (end == "" or as_bytes < end.encode())
    if key and not key.startswith("\x00"):  # Fabric has no empty keys; composite keys differ
        assert inside == key.startswith(prefix)


def test_prefix_range_examples():
    assert _prefix_range("model/abc/") == ("model/abc/", "model/abc0")
    assert _prefix_range("a\U0010ffff") == ("a\U0010ffff", "b")
    assert _prefix_range("\ud7ff") == ("\ud7ff", "\ue000")  # the next one skips surrogates
    assert _prefix_range("") == ("\x01", "")
