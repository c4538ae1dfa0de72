"""Mosquitto, the broker fedledger runs on: its production configuration (mutual TLS,
certificate identities, a generated ACL; :func:`write_broker_config`), and a private broker
on a free loopback port for the demo, tests and benchmarks (:class:`MosquittoBroker`).

The configuration lives in a temporary directory and the process is stopped when the
context exits, whatever the reason (an exception, Ctrl-C). By default the broker is open
(plain TCP, anonymous); with ``secure=`` it runs the production configuration of
:mod:`fedcore.mosquitto` (mutual TLS only, certificate identities, generated ACL).
"""

from __future__ import annotations

import getpass
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedcore import FedledgerError, read_marker, write_marker

from ._mosquitto_config import (
    BrokerConfigFiles,
    persistence_directives,
    render_acl,
    render_config,
    write_broker_config,
)

__all__ = [
    "INSTALL_HINT",
    "BrokerConfigFiles",
    "BrokerError",
    "MosquittoBroker",
    "SecureBrokerFiles",
    "find_mosquitto",
    "free_port",
    "persistence_directives",
    "render_acl",
    "render_config",
    "write_broker_config",
]

INSTALL_HINT = (
    "Mosquitto is not installed. Install it with your package manager, e.g. "
    "'sudo apt-get install mosquitto' on Debian/Ubuntu ('make demo' and 'make test' do this "
    "for you when run as root or with sudo)."
)


class BrokerError(FedledgerError):
    """The broker cannot be found or started."""


def find_mosquitto() -> str | None:
    """``mosquitto`` on PATH, or where Debian puts it (``/usr/sbin`` is not on every PATH)."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


@dataclass(frozen=True)
class SecureBrokerFiles:
    """What a TLS-only broker needs: the organisation's PKI files and who may do what.

    The files are copied into the broker's private directory at every start and
    :meth:`MosquittoBroker.reload`, so the broker can read them after dropping root.
    """

    ca: Path
    server_cert: Path
    server_key: Path
    devices: Sequence[str]
    gateways: Sequence[str]
    tasks: Sequence[str]
    crl: Path | None = None
    #: Benchmark load generators allowed to write every device's update topics.
    publishers: Sequence[str] = ()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _unprivileged_user() -> pwd.struct_passwd | None:
    """The account Mosquitto switches to when started as root (``mosquitto``, else ``nobody``)."""
    if os.geteuid() != 0:
        return None
    for name in ("mosquitto", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    return None


class MosquittoBroker:
    """A broker process of our own; ``secure`` switches it to the production TLS config."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        binary: str | None = None,
        secure: SecureBrokerFiles | None = None,
        persistence: Path | None = None,
    ):
        """``persistence``: a folder where the broker keeps sessions, subscriptions and queued
        QoS 1 messages across restarts (as the production config does); None: kept nowhere."""
        self.host = host
        self.port = port or free_port(host)
        self.binary = binary or find_mosquitto()
        if self.binary is None:
            raise BrokerError(INSTALL_HINT)
        self.secure = secure
        self.persistence = persistence
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None
        self.config_path: Path | None = None

    @property
    def tls(self) -> bool:
        return self.secure is not None

    def _write_open_config(self, root: Path) -> Path:
        conf = root / "mosquitto.conf"
        conf.write_text(
            "\n".join(
                [
                    f"listener {self.port} {self.host}",
                    "allow_anonymous true",
                    *(
                        ["persistence false"]
                        if self.persistence is None
                        else [
                            *persistence_directives(self.persistence),
                            # Started as root, Mosquitto would switch to user mosquitto and
                            # could not write the folder: stay the user who owns it.
                            f"user {getpass.getuser()}",
                        ]
                    ),
                    "log_dest stdout",
                    "log_type error",
                    "log_type warning",
                    "log_type notice",
                    "max_queued_messages 100000",
                    "max_inflight_messages 100",
                    "",
                ]
            )
        )
        return conf

    def _write_secure_config(self, root: Path) -> Path:
        secure = self.secure
        assert secure is not None
        tls = root / "tls"
        tls.mkdir(mode=0o700, exist_ok=True)
        sources = {
            "ca": secure.ca,
            "server_cert": secure.server_cert,
            "server_key": secure.server_key,
        }
        if secure.crl is not None:
            sources["crl"] = secure.crl
        copies: dict[str, Path] = {}
        for name, source in sources.items():
            try:
                data = Path(source).read_bytes()
            except OSError as exc:
                raise BrokerError(
                    f"{source}: cannot read the broker's {name}: {exc.strerror}"
                ) from None
            copy = tls / f"{name}.pem"
            fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            copies[name] = copy
        # ``root`` is this launcher's own temporary folder: claim it for the generated files.
        if read_marker(root) is None:
            write_marker(root, kind="broker-config", created_by="fedledger broker launcher")
        files = write_broker_config(
            root,
            **copies,
            port=self.port,
            host=self.host,
            devices=list(secure.devices),
            gateways=list(secure.gateways),
            tasks=list(secure.tasks),
            publishers=list(secure.publishers),
        )
        user = _unprivileged_user()
        if user is not None:
            # Started as root, Mosquitto drops to this account before it reads the TLS files
            # and the ACL: hand it our private directory (still closed to everyone else).
            with files.config.open("a") as conf:
                conf.write(f"# Started as root: run as {user.pw_name}, who owns this directory.\n")
                conf.write(f"user {user.pw_name}\n")
            for path in (root, tls, *tls.iterdir(), files.acl):
                os.chown(path, user.pw_uid, user.pw_gid)
        return files.config

    def reload(self) -> None:
        """Copy the TLS files and ACL again and signal the broker (SIGHUP) to reload them.

        Mosquitto 2.0 re-reads the ACL file and the TLS files, CRL included, for connections
        made after the reload (tests/integration/test_broker_security.py shows it); clients
        already connected keep their session, a revoked one included.
        """
        if self._proc is None or self._dir is None:
            raise BrokerError("the broker is not running")
        if self.secure is not None:
            self._write_secure_config(Path(self._dir.name))
        self._proc.send_signal(signal.SIGHUP)

    def start(self, timeout: float = 10.0) -> MosquittoBroker:
        self._dir = tempfile.TemporaryDirectory(prefix="fedledger-mosquitto-")
        root = Path(self._dir.name)
        try:
            if self.secure is None:
                conf = self._write_open_config(root)
            else:
                conf = self._write_secure_config(root)
        except BaseException:
            self.stop()
            raise
        self.config_path = conf
        self.log_path = root / "mosquitto.log"
        log = self.log_path.open("wb")
        self._proc = subprocess.Popen(
            [self.binary, "-c", str(conf)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches us; we stop the broker ourselves
        )
        log.close()
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self._proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-500:]
                self.stop()
                raise BrokerError(f"mosquitto exited at start: {tail.strip()}")
            try:
                # A TCP connect is enough, for a TLS listener too (no handshake: we hold no
                # client certificate). Mosquitto listens a moment before it loads the TLS
                # files, so a secure broker is ready only once it also logged "running".
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    if self.secure is None or self._logged_running():
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise BrokerError(f"mosquitto did not listen on {self.host}:{self.port} within {timeout} s")

    def _logged_running(self) -> bool:
        # "mosquitto version X running" is an information message: the generated secure
        # config logs that level (log_type information), the open one does not need to.
        assert self.log_path is not None
        return b" running" in self.log_path.read_bytes()

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def kill(self) -> None:
        """End the broker with SIGKILL, as a crash or power loss would: nothing is saved on
        the way out. (Failure tests; ``stop`` is the clean shutdown.)"""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self.stop()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
