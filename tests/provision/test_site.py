"""The Ansible site converged for real: a gateway host (broker, gateway, monitoring) and an
edge device, two Debian hosts booted with systemd-nspawn in their own network namespaces,
provisioned over SSH.

Asserts on the running result (services under their users, key permissions, the agent's
updates reaching the gateway through the broker over mutual TLS, Prometheus scraping both),
then that a second run changes nothing and that ``--check`` finds no drift.
"""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tomli_w

from fedledger._datasets import dirichlet_partition, load_dataset

from . import hosts

# Booting the hosts and the first converge happen in the fixture: minutes, not seconds.
pytestmark = [pytest.mark.provision, pytest.mark.timeout(1200)]

REPO = Path(__file__).resolve().parents[2]
ANSIBLE = REPO / "ansible"
BIN = Path(sys.executable).parent


def _recap(output: str) -> dict[str, dict[str, int]]:
    """PLAY RECAP counters per host."""
    recap = {}
    for line in output.split("PLAY RECAP", 1)[-1].splitlines():
        match = re.match(r"^(\S+)\s+:\s+(.*)$", line.strip())
        if match:
            recap[match[1]] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", match[2])}
    return recap


class Site:
    def __init__(self, workdir: Path, network: hosts.Network, key: Path):
        self.workdir = workdir
        self.network = network
        self.key = key
        self.inventory = workdir / "inventory" / "hosts.yml"

    def playbook(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, ANSIBLE_HOST_KEY_CHECKING="False", ANSIBLE_NOCOLOR="1")
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        done = subprocess.run(
            [str(BIN / "ansible-playbook"), "-i", str(self.inventory), *args],
            cwd=ANSIBLE,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        with (self.workdir / "ansible.log").open("a") as log:
            log.write(done.stdout + done.stderr)
        return done

    def ssh(self, host: hosts.Host, command: str) -> str:
        done = subprocess.run(
            [
                "ssh",
                "-i",
                str(self.key),
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "BatchMode=yes",
                "-o",
                "LogLevel=ERROR",
                f"root@{host.ip}",
                command,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, f"{host.name}: {command}: {done.stderr}"
        return done.stdout.strip()


#: The edge devices and their boards (different classes: different unit limits).
EDGES = {"edge-1": "raspberry-pi-4", "edge-2": "raspberry-pi-zero-2w"}


def _write_inventory(workdir: Path, gw: hosts.Host, edges: list[hosts.Host], key: Path) -> Path:
    data = load_dataset(seed=0)
    parts = dirichlet_partition(data.y_train, len(edges), alpha=100.0, seed=0)
    for edge, part in zip(edges, parts, strict=True):
        np.savez(workdir / f"{edge.name}.npz", x=data.x_train[part], y=data.y_train[part])
    np.savez(workdir / "holdout.npz", x=data.x_test, y=data.y_test)
    task = {
        "id": "ward-test",
        # Enough rounds that the gateway is still running when the playbooks run again.
        "rounds": 100_000,
        "codec": "int8",
        "quorum": 1,
        "round_timeout": 5.0,
        "model": {
            "kind": "logreg",
            "n_features": int(data.x_train.shape[1]),
            "n_classes": data.n_classes,
            "feature_mean": [float(v) for v in data.x_test.mean(axis=0)],
            "feature_scale": [float(v) + 1e-6 for v in data.x_test.std(axis=0)],
        },
        "training": {"epochs": 1, "batch_size": 32, "lr": 0.1},
    }
    (workdir / "task.toml").write_text(tomli_w.dumps(task))
    inventory = {
        "all": {
            "vars": {
                "ansible_user": "root",
                "ansible_ssh_private_key_file": str(key),
                "ansible_ssh_common_args": "-o UserKnownHostsFile=/dev/null",
                "fedledger_org": "Test Hospital",
                "fedledger_org_id": "org1",
                "fedledger_task_id": "ward-test",
                "fedledger_task_file": str(workdir / "task.toml"),
                "fedledger_source": str(REPO),
                "fedledger_pki_dir": str(workdir / "pki"),
                "fedledger_wheelhouse_dir": str(workdir / "wheels"),
                "fedledger_cli": str(BIN / "fedledger"),
                "fedledger_revoked_devices": [],
                "fedledger_broker_port": 8883,
                "fedledger_gateway_metrics_port": 9464,
                "fedledger_agent_metrics_port": 9465,
                "ansible_managed": "Managed by Ansible (fedledger test site)",
                "monitoring_scrape_interval": "2s",
                "gateway_evaluation_file": str(workdir / "holdout.npz"),
                "gateway_start_wait": 5,
            },
            "children": {
                "brokers": {"hosts": {gw.name: {"ansible_host": gw.ip}}},
                "gateways": {"hosts": {gw.name: {"ansible_host": gw.ip}}},
                "monitoring": {"hosts": {gw.name: {"ansible_host": gw.ip}}},
                "edge_devices": {
                    "hosts": {
                        edge.name: {
                            "ansible_host": edge.ip,
                            "edge_agent_device_class": EDGES[edge.name],
                            "edge_agent_data_file": str(workdir / f"{edge.name}.npz"),
                        }
                        for edge in edges
                    }
                },
            },
        }
    }
    path = workdir / "inventory" / "hosts.yml"
    path.parent.mkdir()
    # JSON is YAML; the inventory plugin reads it as such.
    path.write_text(json.dumps(inventory, indent=2))
    return path


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the test hosts need root (network namespaces, systemd-nspawn)")
    missing = hosts.missing_tools()
    assert not missing, f"missing {missing}: run 'make test-provision', which installs them"
    tarball = hosts.rootfs_tarball()
    workdir = tmp_path_factory.mktemp("site")
    key = workdir / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    public = (workdir / "id_ed25519.pub").read_text()
    with hosts.Network(tag=str(os.getpid() % 10000)) as network:
        gw = hosts.boot_host(network, "gw-1", 0, workdir, public, tarball)
        edges = [
            hosts.boot_host(network, name, i, workdir, public, tarball)
            for i, name in enumerate(EDGES, start=1)
        ]
        _write_inventory(workdir, gw, edges, key)
        site = Site(workdir, network, key)
        site.gw, site.edge, site.edge2 = gw, edges[0], edges[1]
        site.first = site.playbook("site.yml")
        yield site


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except (OSError, ValueError, KeyError) as exc:
            last = exc
        time.sleep(1)
    raise AssertionError(f"{what} within {timeout} s; last: {last!r}")


def _metric(text: str, name: str) -> float:
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name)]
    return sum(values)


def test_site_converges(site):
    assert site.first.returncode == 0, site.first.stdout[-4000:] + site.first.stderr[-2000:]
    recap = _recap(site.first.stdout)
    assert set(recap) == {"gw-1", "edge-1", "edge-2"}
    assert all(counts["failed"] == 0 and counts["unreachable"] == 0 for counts in recap.values())


def test_services_run_under_their_users(site):
    for host, unit, user in [
        (site.gw, "mosquitto", "mosquitto"),
        (site.gw, "fedledger-gateway", "fedledger-gateway"),
        (site.gw, "prometheus", "prometheus"),
        (site.edge, "fedledger-agent", "fedledger-agent"),
        (site.edge2, "fedledger-agent", "fedledger-agent"),
    ]:
        assert site.ssh(host, f"systemctl is-active {unit}") == "active", unit
        assert site.ssh(host, f"systemctl is-enabled {unit}") == "enabled", unit
        pid = site.ssh(host, f"systemctl show -p MainPID --value {unit}")
        assert site.ssh(host, f"ps -o user= -p {pid}") == user, unit


def test_keys_and_files_have_the_right_owners_and_modes(site):
    def stat(host, path):
        return site.ssh(host, f"stat -c '%a %U %G' {path}")

    assert stat(site.edge, "/etc/fedledger-agent/pki/device.key") == (
        "600 fedledger-agent fedledger-agent"
    )
    # The agent signs with its certificate's key; it holds no other private key.
    assert (
        site.ssh(site.edge, "ls /etc/fedledger-agent/pki")
        == "ca.pem\ncrl.pem\ndevice.key\ndevice.pem"
    )
    assert stat(site.edge, "/etc/fedledger-agent/agent.toml") == "640 root fedledger-agent"
    assert stat(site.edge, "/var/lib/fedledger-agent") == "750 fedledger-agent fedledger-agent"
    assert stat(site.gw, "/etc/fedledger-gateway/pki/gateway.key").startswith(
        "600 fedledger-gateway"
    )
    assert stat(site.gw, "/etc/fedledger-gateway/pki/signing.pem").startswith(
        "600 fedledger-gateway"
    )
    assert stat(site.gw, "/etc/fedledger-gateway/pki/sealing.key").startswith(
        "600 fedledger-gateway"
    )
    assert stat(site.gw, "/etc/mosquitto/fedledger/broker.key").startswith("600 mosquitto")
    # The registry admits the device by its certificate, not by a raw key.
    registry = json.loads(site.ssh(site.gw, "cat /etc/fedledger-gateway/registry.json"))
    assert list(registry["devices"]) == ["edge-1", "edge-2"]
    assert set(registry["devices"]["edge-1"]) == {"certificate_sha256"}
    # The CA key never leaves the control node.
    for host in (site.gw, site.edge):
        found = site.ssh(host, "find / -xdev -name ca.key 2>/dev/null | wc -l")
        assert found == "0"
    # The edge device has the agent's dependencies only.
    freeze = site.ssh(site.edge, "/opt/fedledger-agent/venv/bin/pip freeze")
    assert "fedledger==" in freeze and "scikit-learn" not in freeze


def test_agent_unit_has_the_device_class_limits(site):
    show = site.ssh(site.edge, "systemctl show -p MemoryMax -p CPUQuotaPerSecUSec fedledger-agent")
    # raspberry-pi-4: 256 MiB for the agent, 4 cores.
    assert "MemoryMax=268435456" in show
    assert "CPUQuotaPerSecUSec=4s" in show
    show = site.ssh(site.edge2, "systemctl show -p MemoryMax fedledger-agent")
    assert "MemoryMax=104857600" in show  # raspberry-pi-zero-2w: 100 MiB
    hardening = site.ssh(
        site.gw, "systemctl show -p ProtectSystem -p NoNewPrivileges fedledger-gateway"
    )
    assert "ProtectSystem=strict" in hardening and "NoNewPrivileges=yes" in hardening


def test_agent_updates_reach_the_gateway_over_mutual_tls(site):
    url = f"http://{site.gw.ip}:9464/metrics"
    accepted = _wait(
        lambda: _metric(_get(url), "fedledger_gateway_updates_accepted_total"),
        120,
        "the gateway accepted an update from the edge device",
    )
    assert accepted >= 1
    assert _metric(_get(url), "fedledger_gateway_rounds_closed_total") >= 1
    # The gateway requires sealed, certificate-signed updates: accepted ones were both.
    assert "require_encryption = true" in site.ssh(
        site.gw, "cat /etc/fedledger-gateway/gateway.toml"
    )
    assert _metric(_get(url), "fedledger_gateway_updates_rejected_total") == 0
    journal = site.ssh(site.gw, "journalctl -u mosquitto --no-pager -o cat")
    assert re.search(rf"New client connected from {re.escape(site.edge.ip)}:\d+ as edge-1", journal)
    # Without a client certificate the broker refuses the handshake.
    context = ssl.create_default_context(cafile=str(site.workdir / "pki" / "ca.pem"))
    context.check_hostname = False
    with (
        pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)),
        socket.create_connection((site.gw.ip, 8883), timeout=5) as raw,
        context.wrap_socket(raw) as tls,
    ):
        tls.sendall(b"\x10\x00")
        if not tls.recv(1):
            raise ConnectionResetError("closed without a client certificate")


def test_broker_acl_matches_the_generator(site):
    rendered = site.ssh(site.gw, "cat /etc/mosquitto/fedledger.acl")
    out = site.workdir / "generated"
    subprocess.run(
        [
            str(BIN / "fedledger"),
            "broker",
            "config",
            "--out",
            str(out),
            "--task",
            "ward-test",
            "--pki",
            str(site.workdir / "pki"),
            "--device",
            "edge-1",
            "--device",
            "edge-2",
            "--gateway",
            "gw-1",
            "--broker-name",
            "gw-1-broker",
        ],
        check=True,
        capture_output=True,
    )

    def grants(text: str) -> list[str]:
        return [line for line in text.splitlines() if line and not line.startswith("#")]

    assert grants(rendered) == grants((out / "acl").read_text())


def test_prometheus_scrapes_gateway_and_agent(site):
    api = f"http://{site.gw.ip}:9090/api/v1/query?query="

    def up() -> dict[str, str]:
        body = json.loads(_get(api + urllib.parse.quote("up")))
        return {r["metric"]["job"]: r["value"][1] for r in body["data"]["result"]}

    jobs = _wait(
        lambda: (
            lambda u: (
                u if u.get("fedledger-agent") == "1" and u.get("fedledger-gateway") == "1" else None
            )
        )(up()),
        90,
        "Prometheus scraped both targets",
    )
    assert jobs["prometheus"] == "1"
    rules = json.loads(_get(f"http://{site.gw.ip}:9090/api/v1/rules"))
    names = {r["name"] for g in rules["data"]["groups"] for r in g["rules"]}
    assert "FedledgerGatewayDown" in names
    for path in (
        "/etc/grafana/provisioning/datasources/fedledger.yml",
        "/var/lib/grafana/dashboards/fedledger/fleet-overview.json",
    ):
        site.ssh(site.gw, f"test -s {path}")


def test_second_run_changes_nothing_and_check_finds_no_drift(site):
    again = site.playbook("site.yml")
    assert again.returncode == 0, again.stdout[-4000:]
    recap = _recap(again.stdout)
    assert {h: c["changed"] for h, c in recap.items()} == {"gw-1": 0, "edge-1": 0, "edge-2": 0}, (
        again.stdout[-6000:]
    )
    check = site.playbook("site.yml", "--check", "--diff")
    assert check.returncode == 0, check.stdout[-4000:]
    recap = _recap(check.stdout)
    assert {h: c["changed"] for h, c in recap.items()} == {"gw-1": 0, "edge-1": 0, "edge-2": 0}, (
        check.stdout[-6000:]
    )
    # The services kept running through both runs.
    assert site.ssh(site.gw, "systemctl is-active fedledger-gateway") == "active"
    assert site.ssh(site.edge, "systemctl is-active fedledger-agent") == "active"
    assert site.ssh(site.edge2, "systemctl is-active fedledger-agent") == "active"


def _mqtt_connect(site, cert: Path, key: Path) -> bytes:
    """TLS with a client certificate, then an MQTT 3.1.1 CONNECT; returns the broker's
    first bytes (a CONNACK), or raises if the broker refuses the certificate."""
    context = ssl.create_default_context(cafile=str(site.workdir / "pki" / "ca.pem"))
    context.check_hostname = False
    context.load_cert_chain(cert, key)
    client_id = b"probe"
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(client_id).to_bytes(2, "big") + client_id
    with (
        socket.create_connection((site.gw.ip, 8883), timeout=5) as raw,
        context.wrap_socket(raw) as tls,
    ):
        tls.sendall(b"\x10" + bytes([len(body)]) + body)
        answer = tls.recv(4)
        if not answer:
            raise ConnectionResetError("closed by the broker")
        return answer


def test_revoked_device_is_shut_out(site):
    """Last: revoking edge-1 in the inventory stops its agent, drops it from the ACL and the
    registry, and the broker refuses its certificate; edge-2 goes on contributing."""
    pki = site.workdir / "pki"
    cli = str(BIN / "fedledger")
    probe = json.loads(
        subprocess.run(
            [cli, "pki", "issue", "device", "probe-1", "--dir", str(pki), "--json"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    # A valid certificate of the CA is let in (the ACL still grants it no topic).
    assert _mqtt_connect(site, Path(probe["cert"]), Path(probe["key"]))[:1] == b"\x20"

    done = site.playbook("site.yml", "-e", json.dumps({"fedledger_revoked_devices": ["edge-1"]}))
    assert done.returncode == 0, done.stdout[-4000:]
    assert site.ssh(site.edge, "systemctl is-active fedledger-agent || true") == "inactive"
    assert site.ssh(site.edge, "systemctl is-enabled fedledger-agent || true") == "disabled"
    assert "edge-1" not in site.ssh(site.gw, "cat /etc/mosquitto/fedledger.acl")
    registry = json.loads(site.ssh(site.gw, "cat /etc/fedledger-gateway/registry.json"))
    assert list(registry["devices"]) == ["edge-2"]
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        _mqtt_connect(site, pki / "devices" / "edge-1.pem", pki / "devices" / "edge-1.key")
    assert _mqtt_connect(site, Path(probe["cert"]), Path(probe["key"]))[:1] == b"\x20"
    url = f"http://{site.gw.ip}:9464/metrics"
    before = _metric(_get(url), "fedledger_gateway_updates_accepted_total")
    try:
        _wait(
            lambda: _metric(_get(url), "fedledger_gateway_updates_accepted_total") > before,
            240,
            "edge-2's updates still accepted after edge-1's revocation",
        )
    except AssertionError as exc:
        journals = {
            f"{host.name} {unit}": site.ssh(host, f"journalctl -u {unit} --no-pager -n 40 -o cat")
            for host, unit in [(site.gw, "fedledger-gateway"), (site.edge2, "fedledger-agent")]
        }
        raise AssertionError(f"{exc}\n{json.dumps(journals, indent=1)}") from None
