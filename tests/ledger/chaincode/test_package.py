"""The CCaaS package, read back as the peer reads it, and used to reach a running server."""

from __future__ import annotations

import gzip
import hashlib
import io
import ipaddress
import json
import stat
import tarfile

import grpc
import pytest
from cryptography import x509

from ledger.chaincode import ChaincodeError, build_package, package_id, start_server

from .fake_peer import FakePeer, key_pem, make_certificate, pem


def members(data: bytes) -> dict[str, bytes]:
    """Every entry of a tar.gz, checked to be a regular file as the peer requires."""
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for info in tar.getmembers():
            assert info.isreg(), info.name
            out[info.name] = tar.extractfile(info).read()
    return out


def read_package(path) -> tuple[dict, dict]:
    outer = members(path.read_bytes())
    assert list(outer) == ["metadata.json", "code.tar.gz"]
    inner = members(outer["code.tar.gz"])
    assert list(inner) == ["connection.json"]
    return json.loads(outer["metadata.json"]), json.loads(inner["connection.json"])


@pytest.fixture(scope="module")
def tls():
    ca = make_certificate("chaincode CA", is_ca=True)
    san = [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server_cert, server_key = make_certificate("fedledger-cc", issuer=ca, san=san)
    peer_ca = make_certificate("peer TLS CA", is_ca=True)
    client_cert, client_key = make_certificate("peer0.org1", issuer=peer_ca)
    return {
        "root_cert": pem(ca[0]),
        "server_cert": pem(server_cert),
        "server_key": key_pem(server_key),
        "peer_ca": pem(peer_ca[0]),
        "client_cert": pem(client_cert),
        "client_key": key_pem(client_key),
    }


def test_plain_package(tmp_path):
    path = build_package(
        tmp_path / "fedledger.tar.gz",
        label="fedledger_1.0",
        address="fedledger-cc.org1.example.com:9999",
        tls_required=False,
        client_auth_required=False,
    )
    assert path == tmp_path / "fedledger.tar.gz"
    metadata, connection = read_package(path)
    assert metadata == {"label": "fedledger_1.0", "type": "ccaas"}
    assert connection == {
        "address": "fedledger-cc.org1.example.com:9999",
        "dial_timeout": "10s",
        "tls_required": False,
        "client_auth_required": False,
    }
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    data = path.read_bytes()
    assert package_id(path) == "fedledger_1.0:" + hashlib.sha256(data).hexdigest()
    assert package_id(data) == package_id(path)


def test_mutual_tls_package_from_files_is_private(tmp_path, tls):
    for name in ("root_cert", "client_cert", "client_key"):
        (tmp_path / f"{name}.pem").write_bytes(tls[name])
    path = build_package(
        tmp_path,
        label="fedledger_1.0",
        address="[::1]:7052",
        tls_required=True,
        client_auth_required=True,
        root_cert=tmp_path / "root_cert.pem",
        client_cert=str(tmp_path / "client_cert.pem"),
        client_key=tls["client_key"],
        dial_timeout="1m30s",
    )
    assert path == tmp_path / "fedledger_1.0.tar.gz"
    _, connection = read_package(path)
    assert connection["root_cert"] == tls["root_cert"].decode()
    assert connection["client_cert"] == tls["client_cert"].decode()
    assert connection["client_key"] == tls["client_key"].decode()
    assert connection["dial_timeout"] == "1m30s"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # it holds a private key
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_the_same_inputs_give_the_same_package_id(tmp_path):
    ids = set()
    for name in ("a.tar.gz", "b.tar.gz"):
        path = build_package(
            tmp_path / name,
            label="fl",
            address="cc:1",
            tls_required=False,
            client_auth_required=False,
        )
        ids.add(package_id(path))
        # No name or time in the gzip header.
        assert path.read_bytes()[4:8] == b"\0\0\0\0"
        assert gzip.decompress(path.read_bytes())
    assert len(ids) == 1


@pytest.mark.parametrize(
    ("kwargs", "setting", "text"),
    [
        ({"label": "fed ledger"}, "label", "not a package label"),
        ({"label": "_fedledger"}, "label", "not a package label"),
        ({"address": "cc"}, "address", "not host:port"),
        ({"address": "cc:0"}, "address", "not host:port"),
        ({"address": "c c:80"}, "address", "not host:port"),
        ({"dial_timeout": "10"}, "dial_timeout", "not a duration"),
        ({"dial_timeout": 10}, "dial_timeout", "not a duration"),
        ({"tls_required": "yes"}, "tls_required", "true or false"),
        ({"client_auth_required": True}, "client_auth_required", "needs TLS"),
        ({"root_cert": "root_cert"}, "root_cert", "tls_required is false"),
        ({"tls_required": True}, "root_cert", "TLS needs the CA"),
        ({"tls_required": True, "root_cert": b"junk"}, "root_cert", "not a PEM certificate"),
        ({"tls_required": True, "root_cert": "root_cert", "client_key": "client_key"},
         "client_key", "client_auth_required is false"),
        ({"tls_required": True, "client_auth_required": True, "root_cert": "root_cert",
          "client_cert": "client_cert"}, "client_key", "needs client_cert and client_key"),
        ({"tls_required": True, "client_auth_required": True, "root_cert": "root_cert",
          "client_cert": "client_cert", "client_key": b"junk"}, "client_key", "not an unencrypted"),
        ({"tls_required": True, "client_auth_required": True, "root_cert": "root_cert",
          "client_cert": "root_cert", "client_key": "client_key"}, "client_key", "does not belong"),
        ({"tls_required": True, "root_cert": "/nonexistent.pem"}, "root_cert", "cannot read"),
        ({"tls_required": True, "root_cert": b"\xff"}, "root_cert", "ASCII"),
    ],
)  # fmt: skip
def test_bad_arguments_name_the_argument(tmp_path, tls, kwargs, setting, text):
    args = {
        "label": "fedledger_1.0",
        "address": "cc:7052",
        "tls_required": False,
        "client_auth_required": False,
    }
    for name, value in kwargs.items():
        args[name] = tls[value] if isinstance(value, str) and value in tls else value
    with pytest.raises(ChaincodeError) as info:
        build_package(tmp_path / "p.tar.gz", **args)
    assert info.value.setting == setting
    assert text in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_package_id_refuses_other_files(tmp_path):
    with pytest.raises(ChaincodeError, match="not a chaincode package"):
        package_id(b"not a tar.gz")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.addfile(tarfile.TarInfo("code.tar.gz"), io.BytesIO(b""))
    with pytest.raises(ChaincodeError, match="not a chaincode package"):
        package_id(buf.getvalue())


def test_a_peer_reaches_the_server_with_the_package_connection(tmp_path, tls, identities):
    """Dial the server with nothing but what connection.json says, as the peer does."""
    with start_server(
        "127.0.0.1:0",
        chaincode_id="placeholder:0",
        tls_cert=tls["server_cert"],
        tls_key=tls["server_key"],
        client_ca=tls["peer_ca"],
    ) as server:
        path = build_package(
            tmp_path / "pkg.tar.gz",
            label="fedledger_1.0",
            address=server.address,
            tls_required=True,
            client_auth_required=True,
            root_cert=tls["root_cert"],
            client_cert=tls["client_cert"],
            client_key=tls["client_key"],
        )
        _, connection = read_package(path)
        credentials = grpc.ssl_channel_credentials(
            connection["root_cert"].encode(),
            connection["client_key"].encode(),
            connection["client_cert"].encode(),
        )
        with FakePeer(connection["address"], credentials=credentials) as peer:
            assert peer.registered_as == "placeholder:0"
            result = peer.call(identities["auditor"], "GetDevice", "dev-1")
            assert result.error.startswith("not_found")
