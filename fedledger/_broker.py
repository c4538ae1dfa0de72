"""A private Mosquitto broker on a free loopback port, for the demo, tests and benchmarks.

The configuration lives in a temporary directory and the process is stopped when the
context exits, whatever the reason (an exception, Ctrl-C).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from fedcore import FedledgerError

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


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class MosquittoBroker:
    def __init__(
        self, *, host: str = "127.0.0.1", port: int | None = None, binary: str | None = None
    ):
        self.host = host
        self.port = port or free_port(host)
        self.binary = binary or find_mosquitto()
        if self.binary is None:
            raise BrokerError(INSTALL_HINT)
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None

    def start(self, timeout: float = 10.0) -> MosquittoBroker:
        self._dir = tempfile.TemporaryDirectory(prefix="fedledger-mosquitto-")
        root = Path(self._dir.name)
        conf = root / "mosquitto.conf"
        conf.write_text(
            "\n".join(
                [
                    f"listener {self.port} {self.host}",
                    "allow_anonymous true",
                    "persistence false",
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
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise BrokerError(f"mosquitto did not listen on {self.host}:{self.port} within {timeout} s")

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

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
