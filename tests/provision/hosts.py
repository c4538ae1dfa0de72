"""Real Debian hosts for the provisioning tests: a debootstrap root file system booted with
systemd-nspawn inside a network namespace, joined to this machine by a veth pair on a bridge.

Each host runs a real systemd and answers SSH, so the playbooks converge it exactly as they
would a Raspberry Pi or a gateway server. The hosts have no network beyond the bridge, so
everything a role installs from Debian is baked into the root file system (cached as a
tarball, rebuilt when the package list changes); Python packages come from the wheelhouse
the playbooks build on the control node.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
#: What the roles expect to find already installed (the hosts cannot reach a mirror).
PACKAGES = (
    "python3",
    "python3-venv",
    "python3-apt",
    "python3-packaging",
    "systemd",
    "systemd-sysv",
    "dbus",
    "openssh-server",
    "mosquitto",
    "prometheus",
    "iproute2",
    "ca-certificates",
)


class HostError(RuntimeError):
    """A test host could not be built or booted; the message says which step."""


def missing_tools() -> list[str]:
    """Commands the harness needs that this machine lacks (the tests skip with the list)."""
    need = ("debootstrap", "systemd-nspawn", "ip", "ssh", "ssh-keygen")
    return [tool for tool in need if shutil.which(tool) is None]


def _run(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, capture_output=True, text=True, **kwargs)
    if check and done.returncode != 0:
        raise HostError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def cache_dir() -> Path:
    root = os.environ.get("FEDLEDGER_CACHE") or Path.home() / ".cache" / "fedledger"
    path = Path(root) / "provision"
    path.mkdir(parents=True, exist_ok=True)
    return path


def rootfs_tarball(log=print) -> Path:
    """The cached root file system tarball, built with debootstrap when missing."""
    key = hashlib.sha256(f"{SUITE} {MIRROR} {' '.join(PACKAGES)}".encode()).hexdigest()[:12]
    tarball = cache_dir() / f"rootfs-{SUITE}-{key}.tar"
    if tarball.exists():
        return tarball
    work = cache_dir() / f"build-{key}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    log(f"building the {SUITE} root file system with debootstrap (cached in {tarball})")
    try:
        _run(
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(PACKAGES)}",
            SUITE,
            str(work),
            MIRROR,
        )
        # Services the roles start themselves; a fresh host has them stopped and disabled so
        # that what runs after a converge is what the playbooks made run.
        for unit in ("mosquitto.service", "prometheus.service", "prometheus-node-exporter.service"):
            for link in (work / "etc/systemd/system").rglob(unit):
                link.unlink()
        (work / "etc/machine-id").write_text("")
        partial = tarball.with_suffix(".partial")
        with tarfile.open(partial, "w") as tar:
            tar.add(work, arcname=".")
        partial.rename(tarball)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return tarball


def _free_subnet() -> str:
    """A /24 in 10.213.0.0/16 no interface of this machine uses."""
    used = _run("ip", "-o", "-4", "addr", "show").stdout
    for third in range(1, 255):
        prefix = f"10.213.{third}."
        if prefix not in used:
            return prefix
    raise HostError("no free 10.213.x.0/24 subnet for the test bridge")


@dataclass
class Network:
    """A bridge on this machine; every host's veth peer is a port of it."""

    tag: str
    prefix: str = field(default_factory=_free_subnet)
    hosts: list[Host] = field(default_factory=list)

    @property
    def bridge(self) -> str:
        return f"flbr{self.tag}"

    @property
    def gateway_ip(self) -> str:
        return f"{self.prefix}1"

    def __enter__(self) -> Network:
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{self.gateway_ip}/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        return self

    def __exit__(self, *exc) -> None:
        for host in reversed(self.hosts):
            host.stop()
        _run("ip", "link", "del", self.bridge, check=False)


@dataclass
class Host:
    """One booted Debian host; ``root`` is its file system as seen from this machine."""

    name: str
    ip: str
    netns: str
    root: Path
    veth: str
    log: Path
    process: subprocess.Popen | None = None

    def ssh_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise HostError(f"{self.name} exited while booting; see {self.log}")
            with contextlib.suppress(OSError), socket.create_connection((self.ip, 22), 0.5) as s:
                if s.recv(4).startswith(b"SSH"):
                    return True
            time.sleep(0.2)
        return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            # nspawn turns SIGTERM into a clean poweroff of the container's systemd.
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None
        _run("ip", "link", "del", self.veth, check=False)
        _run("ip", "netns", "del", self.netns, check=False)
        shutil.rmtree(self.root, ignore_errors=True)


def boot_host(
    network: Network, name: str, index: int, workdir: Path, authorized_key: str, tarball: Path
) -> Host:
    """Unpack, network and boot ``name``; returns once its SSH server answers."""
    tag = f"{network.tag}{index}"
    host = Host(
        name=name,
        ip=f"{network.prefix}{10 + index}",
        netns=f"fl-{tag}",
        root=workdir / name,
        veth=f"flv{tag}",
        log=workdir / f"{name}.console.log",
    )
    network.hosts.append(host)
    host.root.mkdir(parents=True)
    with tarfile.open(tarball) as tar:
        tar.extractall(host.root, filter="fully_trusted")
    (host.root / "etc/hostname").write_text(f"{name}\n")
    (host.root / "etc/hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {name}\n")
    ssh_dir = host.root / "root/.ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    (ssh_dir / "authorized_keys").write_text(authorized_key)
    (ssh_dir / "authorized_keys").chmod(0o600)

    _run("ip", "netns", "add", host.netns)
    peer = f"flp{tag}"
    _run("ip", "link", "add", host.veth, "type", "veth", "peer", "name", peer)
    _run("ip", "link", "set", host.veth, "master", network.bridge)
    _run("ip", "link", "set", host.veth, "up")
    _run("ip", "link", "set", peer, "netns", host.netns)
    inside = ("ip", "netns", "exec", host.netns)
    _run(*inside, "ip", "link", "set", "lo", "up")
    _run(*inside, "ip", "link", "set", peer, "name", "eth0")
    _run(*inside, "ip", "addr", "add", f"{host.ip}/24", "dev", "eth0")
    _run(*inside, "ip", "link", "set", "eth0", "up")
    _run(*inside, "ip", "route", "add", "default", "via", network.gateway_ip)

    with open(host.log, "wb") as log:
        host.process = subprocess.Popen(
            [
                "systemd-nspawn",
                "--boot",
                "--register=no",
                "--keep-unit",
                "--quiet",
                f"--network-namespace-path=/run/netns/{host.netns}",
                f"--machine={name}",
                "-D",
                str(host.root),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    if not host.ssh_ready(timeout=60):
        raise HostError(f"{name} did not answer SSH within 60 s; see {host.log}")
    return host
