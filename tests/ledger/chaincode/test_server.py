"""The server around the adapter: TLS and mutual TLS, settings, lifecycle, ``serve()``."""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import threading
import time

import grpc
import pytest
from cryptography import x509

from ledger.chaincode import ChaincodeError, serve, start_server

from .conftest import PACKAGE_ID
from .fake_peer import FakePeer, key_pem, make_certificate, pem


@pytest.fixture(scope="module")
def tls():
    """A server CA and server certificate; a peer TLS CA and a client certificate it signed."""
    ca = make_certificate("chaincode CA", is_ca=True)
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server_cert, server_key = make_certificate("fedledger-cc", issuer=ca, san=san)
    peer_ca = make_certificate("peer TLS CA", is_ca=True)
    client_cert, client_key = make_certificate("peer0.org1", issuer=peer_ca)
    stranger_ca = make_certificate("another CA", is_ca=True)
    stranger_cert, stranger_key = make_certificate("peer0.evil", issuer=stranger_ca)
    return {
        "ca": pem(ca[0]),
        "cert": pem(server_cert),
        "key": key_pem(server_key),
        "peer_ca": pem(peer_ca[0]),
        "client_cert": pem(client_cert),
        "client_key": key_pem(client_key),
        "stranger_cert": pem(stranger_cert),
        "stranger_key": key_pem(stranger_key),
    }


def test_tls_from_files(tmp_path, tls, identities):
    for name in ("cert", "key"):
        (tmp_path / name).write_bytes(tls[name])
    with start_server(
        "127.0.0.1:0",
        chaincode_id=PACKAGE_ID,
        tls_cert=tmp_path / "cert",
        tls_key=str(tmp_path / "key"),
    ) as server:
        assert server.tls and not server.mutual_tls
        credentials = grpc.ssl_channel_credentials(root_certificates=tls["ca"])
        with FakePeer(server.address, credentials=credentials) as peer:
            assert peer.registered_as == PACKAGE_ID
            assert peer.call(identities["auditor"], "GetDevice", "d").error.startswith("not_found")
        plain = FakePeer(server.address, handshake=False)
        with pytest.raises(grpc.RpcError):
            plain.next_message()
        plain.close()


def test_mutual_tls_needs_a_client_certificate_from_the_peer_ca(tls, identities):
    with start_server(
        "127.0.0.1:0",
        chaincode_id=PACKAGE_ID,
        tls_cert=tls["cert"],
        tls_key=tls["key"],
        client_ca=tls["peer_ca"],
    ) as server:
        assert server.mutual_tls
        good = grpc.ssl_channel_credentials(tls["ca"], tls["client_key"], tls["client_cert"])
        with FakePeer(server.address, credentials=good) as peer:
            assert peer.call(identities["auditor"], "GetDevice", "d").status == 500
        for credentials in (
            grpc.ssl_channel_credentials(tls["ca"]),
            grpc.ssl_channel_credentials(tls["ca"], tls["stranger_key"], tls["stranger_cert"]),
        ):
            refused = FakePeer(server.address, credentials=credentials, handshake=False)
            with pytest.raises(grpc.RpcError):
                refused.next_message()
            refused.close()


@pytest.mark.parametrize(
    ("kwargs", "setting", "text"),
    [
        ({"tls_cert": "cert"}, "tls_key", "TLS needs both"),
        ({"tls_key": "key"}, "tls_cert", "TLS needs both"),
        ({"client_ca": "ca"}, "client_ca", "client certificates need TLS"),
        ({"tls_cert": b"junk", "tls_key": "key"}, "tls_cert", "not a PEM certificate"),
        ({"tls_cert": "cert", "tls_key": b"junk"}, "tls_key", "not an unencrypted PEM private key"),
        ({"tls_cert": "cert", "tls_key": "client_key"}, "tls_key", "does not belong"),
        ({"tls_cert": "cert", "tls_key": "key", "client_ca": b"x"}, "client_ca", "not a PEM"),
        ({"tls_cert": "/nonexistent/cert.pem", "tls_key": "key"}, "tls_cert", "cannot read"),
        ({"tls_cert": 42, "tls_key": "key"}, "tls_cert", "expected PEM bytes or a file path"),
        ({"chaincode_id": " "}, "chaincode_id", "package id"),
        ({"address": "nowhere"}, "address", "not host:port"),
        ({"address": "127.0.0.1:99999"}, "address", "not host:port"),
        ({"grace": -1}, "grace", "non-negative"),
    ],
)
def test_bad_settings_name_the_setting(tls, kwargs, setting, text):
    args = {"address": "127.0.0.1:0", "chaincode_id": PACKAGE_ID}
    for name, value in kwargs.items():
        args[name] = tls.get(value, value) if isinstance(value, str) and value in tls else value
    with pytest.raises(ChaincodeError) as info:
        start_server(args.pop("address"), **args).stop()
    assert info.value.setting == setting
    assert text in str(info.value)


def test_a_port_in_use_is_an_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ChaincodeError, match="cannot listen on") as info:
            start_server(f"127.0.0.1:{port}", chaincode_id=PACKAGE_ID)
        assert info.value.setting == "address"


def test_stop_is_quick_with_an_idle_peer_connected(identities):
    server = start_server("127.0.0.1:0", chaincode_id=PACKAGE_ID, grace=10.0)
    peer = FakePeer(server.address)
    assert peer.call(identities["auditor"], "GetDevice", "d").status == 500
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 2.0  # no transaction running: no grace to wait for
    assert server.wait(0)
    peer._reader.join(5)
    assert isinstance(peer.stream_error, grpc.RpcError)
    peer.close()
    server.stop()  # idempotent


def test_serve_blocks_until_stopped(identities):
    handles = []
    thread = threading.Thread(
        target=serve,
        args=("127.0.0.1:0",),
        kwargs={"chaincode_id": PACKAGE_ID, "on_start": handles.append},
    )
    thread.start()
    deadline = time.monotonic() + 10
    while not handles and time.monotonic() < deadline:
        time.sleep(0.01)
    (server,) = handles
    with FakePeer(server.address) as peer:
        assert peer.call(identities["auditor"], "GetDevice", "d").status == 500
    assert thread.is_alive()
    server.stop()
    thread.join(10)
    assert not thread.is_alive()


def test_serve_stops_on_sigterm_and_restores_the_handler(identities):
    before = signal.getsignal(signal.SIGTERM)
    seen = []

    def on_start(server):
        seen.append(server.address)
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()

    started = time.monotonic()
    serve("127.0.0.1:0", chaincode_id=PACKAGE_ID, on_start=on_start)
    assert seen and time.monotonic() - started < 5
    assert signal.getsignal(signal.SIGTERM) is before
