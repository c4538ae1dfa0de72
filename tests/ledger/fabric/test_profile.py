"""Connection profiles: validation at load, and connecting over TLS, mutual TLS or plain text."""

import json
from pathlib import Path

import grpc
import pytest

from fedcore import ConfigError
from ledger.fabric import ConnectionProfile, EvaluateError, FabricClient, connect, load_profile

from .conftest import CHAINCODE, CHANNEL, PEER_NAME


@pytest.fixture
def files(tmp_path, admin, tls_ca, tls_client):
    """PEM files as an operator would have them, next to the profile."""
    (tmp_path / "tls").mkdir()
    (tmp_path / "tls" / "ca.pem").write_bytes(tls_ca.cert_pem)
    (tmp_path / "tls" / "client.pem").write_bytes(tls_client.cert_pem)
    (tmp_path / "tls" / "client.key").write_bytes(tls_client.key_pem)
    (tmp_path / "msp").mkdir()
    (tmp_path / "msp" / "cert.pem").write_bytes(admin.cert_pem)
    (tmp_path / "msp" / "key.pem").write_bytes(admin.key_pem)
    return tmp_path


def write_profile(folder: Path, peer: str, *, extra: str = "", identity: str = "") -> Path:
    identity = identity or 'msp_id = "Org1MSP"\ncert = "msp/cert.pem"\nkey = "msp/key.pem"\n'
    text = (
        f"[peer]\n{peer}\n\n[identity]\n{identity}\n"
        f'[chaincode]\nchannel = "{CHANNEL}"\nname = "{CHAINCODE}"\n{extra}'
    )
    path = folder / "profile.toml"
    path.write_text(text, encoding="utf-8")
    return path


def tls_peer(port: int, *, override: bool = True, mutual: bool = False) -> str:
    lines = [f'endpoint = "127.0.0.1:{port}"', 'tls_ca = "tls/ca.pem"']
    if override:
        lines.append(f'server_name_override = "{PEER_NAME}"')
    if mutual:
        lines += ['client_cert = "tls/client.pem"', 'client_key = "tls/client.key"']
    return "\n".join(lines)


def round_trip(client: FabricClient) -> None:
    record = json.loads(client.submit("RegisterDevice", "dev-tls", "Org1MSP", "pi", "ab" * 32))
    assert json.loads(client.evaluate("GetDevice", "dev-tls")) == record


def test_connect_over_tls_with_a_server_name_override(files, peer_server):
    path = write_profile(files, tls_peer(peer_server.tls_port))
    with connect(path) as client:
        assert (client.channel_name, client.chaincode) == (CHANNEL, CHAINCODE)
        assert client.identity.msp_id == "Org1MSP"
        round_trip(client)


def test_the_peer_certificate_must_name_the_server(files, peer_server):
    """The TLS certificate names the peer, not 127.0.0.1: without the override it fails."""
    path = write_profile(files, tls_peer(peer_server.tls_port, override=False))
    with connect(path) as client, pytest.raises(EvaluateError) as info:
        client.evaluate("GetDevice", "dev-1", timeout=5)
    assert info.value.code is grpc.StatusCode.UNAVAILABLE


def test_mutual_tls(files, peer_server):
    path = write_profile(files, tls_peer(peer_server.mtls_port, mutual=True))
    with connect(path) as client:
        round_trip(client)
    anonymous = write_profile(files, tls_peer(peer_server.mtls_port))
    with connect(anonymous) as client, pytest.raises(EvaluateError) as info:
        client.evaluate("GetDevice", "dev-1", timeout=5)
    assert info.value.code is grpc.StatusCode.UNAVAILABLE


def test_plain_text_only_when_asked_for(files, peer_server):
    path = write_profile(files, f'endpoint = "{peer_server.target}"\ntls = false')
    with connect(path) as client:
        round_trip(client)


def test_paths_resolve_from_the_profile_and_timeouts_are_read(files):
    extra = "\n[timeouts]\nevaluate = 2.5\ncommit_status = 120.0\n"
    profile = load_profile(write_profile(files, tls_peer(7051), extra=extra))
    assert isinstance(profile, ConnectionProfile)
    assert profile.peer.tls and profile.peer.tls_ca == files / "tls" / "ca.pem"
    assert profile.identity.cert == files / "msp" / "cert.pem"
    assert profile.timeouts.evaluate == 2.5 and profile.timeouts.commit_status == 120.0
    assert profile.timeouts.endorse == 15.0


@pytest.mark.parametrize(
    ("peer", "key", "message"),
    [
        ('endpoint = "127.0.0.1:7051"', "peer", "tls_ca is required"),
        ('endpoint = "127.0.0.1:7051"\ntls = false\ntls_ca = "x.pem"', "peer", "tls = false"),
        (
            'endpoint = "127.0.0.1:7051"\ntls_ca = "ca.pem"\nclient_cert = "c.pem"',
            "peer",
            "both client_cert and client_key",
        ),
        ('endpoint = "peer0"\ntls = false', "peer.endpoint", "not host:port"),
        ('endpoint = "127.0.0.1:7051"\ntls = "no"', "peer.tls", "boolean"),
        ('endpoint = "127.0.0.1:7051"\ntls = false\nport = 1', "peer.port", "unknown key"),
    ],
)
def test_invalid_profiles_name_the_file_and_key(tmp_path, peer, key, message):
    path = write_profile(tmp_path, peer)
    with pytest.raises(ConfigError, match=message) as info:
        load_profile(path)
    assert info.value.file == str(path)
    assert info.value.key == key


def test_a_missing_section_is_named(tmp_path):
    path = tmp_path / "profile.toml"
    path.write_text('[peer]\nendpoint = "h:1"\ntls = false\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="required key is missing") as info:
        load_profile(path)
    assert info.value.key in ("identity", "chaincode")


def test_missing_or_mismatched_credentials_name_the_file(files, org1_ca):
    missing = write_profile(
        files,
        'endpoint = "127.0.0.1:7051"\ntls = false',
        identity='msp_id = "Org1MSP"\ncert = "msp/nope.pem"\nkey = "msp/key.pem"\n',
    )
    with pytest.raises(ConfigError, match="certificate file not found") as info:
        connect(missing)
    assert info.value.file == str(files / "msp" / "nope.pem")

    other = org1_ca.issue("someone", msp_id="Org1MSP")
    (files / "msp" / "other.pem").write_bytes(other.key_pem)
    mismatched = write_profile(
        files,
        'endpoint = "127.0.0.1:7051"\ntls = false',
        identity='msp_id = "Org1MSP"\ncert = "msp/cert.pem"\nkey = "msp/other.pem"\n',
    )
    with pytest.raises(ConfigError, match="does not match the certificate") as info:
        connect(mismatched)
    assert info.value.file == str(files / "msp" / "other.pem")

    no_ca = write_profile(files, 'endpoint = "127.0.0.1:7051"\ntls_ca = "tls/none.pem"')
    with pytest.raises(ConfigError, match="TLS CA certificate file not found"):
        connect(no_ca)
