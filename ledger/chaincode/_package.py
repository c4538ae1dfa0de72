"""The chaincode-as-a-service package that ``peer lifecycle chaincode install`` accepts.

A CCaaS package holds no code, only where the chaincode server listens and how to reach
it. Its layout (Fabric's ``ccaas`` external builder, built into the peer since 2.4)::

    <label>.tar.gz
    ├── metadata.json        {"label": "<label>", "type": "ccaas"}
    └── code.tar.gz
        └── connection.json  {"address": "host:port", "dial_timeout": "10s",
                              "tls_required": true, "client_auth_required": true,
                              "root_cert": "<PEM>", "client_cert": "<PEM>",
                              "client_key": "<PEM>"}

``root_cert`` is the CA the peer checks the chaincode server's TLS certificate with;
``client_cert``/``client_key`` are the TLS identity the peer presents when the server asks
for one (mutual TLS: the server's ``client_ca`` must have signed ``client_cert``). All are
PEM text inside the JSON. The package id the peer reports is ``<label>:<sha256 of the
package file>``; :func:`build_package` writes the same bytes for the same inputs (fixed
timestamps and owners), so every organisation can build it and compute the same id with
:func:`package_id`.

The file holds ``client_key`` when mutual TLS is on, so it is then written readable by its
owner only.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ._errors import ChaincodeError

# Fabric's package label rule is ^[a-zA-Z0-9]+([.+-_][a-zA-Z0-9]+)*$ (where ``+-_`` is a
# character range); this is the readable subset of it.
_LABEL = re.compile(r"[A-Za-z0-9]+(?:[._+-][A-Za-z0-9]+)*")
# Go's time.ParseDuration format, which the peer parses dial_timeout with.
_DURATION = re.compile(
    r"(?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|ms|s|m|h)(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|ms|s|m|h))*"
)
_HOST = re.compile(r"\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?")

PemSource = bytes | str | os.PathLike[str]


def _pem_text(value: PemSource, setting: str) -> str:
    if isinstance(value, bytes | bytearray):
        data = bytes(value)
    elif isinstance(value, str | os.PathLike):
        try:
            data = Path(value).read_bytes()
        except OSError as exc:
            raise ChaincodeError(f"cannot read {value}: {exc.strerror}", setting=setting) from None
    else:
        raise ChaincodeError(
            f"expected PEM bytes or a file path, got {type(value).__name__}", setting=setting
        )
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise ChaincodeError("PEM must be ASCII text", setting=setting) from None


def _certificates(value: PemSource, setting: str) -> tuple[str, list[x509.Certificate]]:
    text = _pem_text(value, setting)
    try:
        return text, x509.load_pem_x509_certificates(text.encode("ascii"))
    except ValueError:
        raise ChaincodeError("not a PEM certificate (bundle)", setting=setting) from None


def _check_address(address: Any) -> str:
    if not isinstance(address, str):
        raise ChaincodeError(f"{address!r} is not host:port", setting="address")
    host, sep, port = address.rpartition(":")
    if not sep or not _HOST.fullmatch(host) or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ChaincodeError(f"{address!r} is not host:port (port 1-65535)", setting="address")
    return address


def _connection(
    *,
    address: str,
    tls_required: bool,
    client_auth_required: bool,
    root_cert: PemSource | None,
    client_cert: PemSource | None,
    client_key: PemSource | None,
    dial_timeout: str,
) -> dict[str, Any]:
    for name, flag in (
        ("tls_required", tls_required),
        ("client_auth_required", client_auth_required),
    ):
        if not isinstance(flag, bool):
            raise ChaincodeError("must be true or false", setting=name)
    if not isinstance(dial_timeout, str) or not _DURATION.fullmatch(dial_timeout):
        raise ChaincodeError(
            f"{dial_timeout!r} is not a duration such as '10s', '500ms' or '1m'",
            setting="dial_timeout",
        )
    out: dict[str, Any] = {
        "address": _check_address(address),
        "dial_timeout": dial_timeout,
        "tls_required": tls_required,
        "client_auth_required": client_auth_required,
    }
    if not tls_required:
        if client_auth_required:
            raise ChaincodeError(
                "client authentication needs TLS (tls_required)", setting="client_auth_required"
            )
        for name, value in (
            ("root_cert", root_cert),
            ("client_cert", client_cert),
            ("client_key", client_key),
        ):
            if value is not None:
                raise ChaincodeError("given, but tls_required is false", setting=name)
        return out
    if root_cert is None:
        raise ChaincodeError(
            "TLS needs the CA of the chaincode server's certificate", setting="root_cert"
        )
    out["root_cert"], _ = _certificates(root_cert, "root_cert")
    if not client_auth_required:
        for name, value in (("client_cert", client_cert), ("client_key", client_key)):
            if value is not None:
                raise ChaincodeError("given, but client_auth_required is false", setting=name)
        return out
    if client_cert is None or client_key is None:
        missing = "client_cert" if client_cert is None else "client_key"
        raise ChaincodeError(
            "client authentication needs client_cert and client_key", setting=missing
        )
    cert_text, certs = _certificates(client_cert, "client_cert")
    key_text = _pem_text(client_key, "client_key")
    try:
        key = serialization.load_pem_private_key(key_text.encode("ascii"), password=None)
    except (ValueError, TypeError):
        raise ChaincodeError("not an unencrypted PEM private key", setting="client_key") from None
    if certs[0].public_key() != key.public_key():
        raise ChaincodeError(
            "the key does not belong to client_cert's certificate", setting="client_key"
        )
    out["client_cert"] = cert_text
    out["client_key"] = key_text
    return out


def _tar_gz(files: dict[str, bytes]) -> bytes:
    """A reproducible tar.gz: fixed order, times, owners and modes; no name in the gzip header."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), compresslevel=9, mtime=0)


def _json_bytes(value: dict[str, Any]) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True, ensure_ascii=True) + "\n").encode("ascii")


def build_package(
    out_path: str | os.PathLike[str],
    *,
    label: str,
    address: str,
    tls_required: bool,
    client_auth_required: bool,
    root_cert: PemSource | None = None,
    client_cert: PemSource | None = None,
    client_key: PemSource | None = None,
    dial_timeout: str = "10s",
) -> Path:
    """Write the CCaaS package for ``peer lifecycle chaincode install`` and return its path.

    ``out_path`` is the package file, or a directory to write ``<label>.tar.gz`` into.
    ``address`` is where peers reach the chaincode server (``host:port``); the PEM inputs
    are bytes or file paths (see the module docstring for what each one is). Every argument
    is checked as the peer would, plus what the peer only finds out when it dials: a
    certificate that does not parse, a client key that does not match ``client_cert``, TLS
    material given while TLS is off. Raises :class:`ChaincodeError` naming the argument.
    """
    if not isinstance(label, str) or not _LABEL.fullmatch(label):
        raise ChaincodeError(
            f"{label!r} is not a package label (letters and digits, joined by '.', '_', '+', '-')",
            setting="label",
        )
    connection = _connection(
        address=address,
        tls_required=tls_required,
        client_auth_required=client_auth_required,
        root_cert=root_cert,
        client_cert=client_cert,
        client_key=client_key,
        dial_timeout=dial_timeout,
    )
    code = _tar_gz({"connection.json": _json_bytes(connection)})
    package = _tar_gz(
        {"metadata.json": _json_bytes({"label": label, "type": "ccaas"}), "code.tar.gz": code}
    )
    path = Path(out_path)
    if path.is_dir():
        path = path / f"{label}.tar.gz"
    secret = "client_key" in connection
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(package)
        os.chmod(tmp, 0o600 if secret else 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def package_id(package: str | os.PathLike[str] | bytes) -> str:
    """The id a peer gives the installed package: ``<label>:<sha256 of the package bytes>``.

    ``package`` is the package file's path or its bytes; the label is read from its
    ``metadata.json``. This is the ``chaincode_id`` the chaincode server must register with.
    """
    data = bytes(package) if isinstance(package, bytes | bytearray) else Path(package).read_bytes()
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            member = tar.getmember("metadata.json")
            fh = tar.extractfile(member)
            if fh is None:
                raise KeyError("metadata.json")
            label = json.loads(fh.read())["label"]
    except (tarfile.TarError, KeyError, ValueError, TypeError, OSError, EOFError):
        raise ChaincodeError(
            "not a chaincode package with a metadata.json label", setting="package"
        ) from None
    if not isinstance(label, str) or not label:
        raise ChaincodeError("metadata.json has no label", setting="package")
    return f"{label}:{hashlib.sha256(data).hexdigest()}"
