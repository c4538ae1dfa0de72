"""A real Prometheus scrapes a running gateway (and one agent) over a real Mosquitto; the
series are checked through Prometheus's own query API, as a dashboard would see them."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import tomli_w

from edge_agent import load_agent_config, open_agent
from fedcore.mosquitto import free_port
from fedledger._provision import TaskOptions, provision
from gateway import REJECT_REASONS, load_gateway_config, open_gateway

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

pytestmark = pytest.mark.mqtt

WAIT_S = 30.0
DEVICES = 3
ROUNDS = 2


def find_prometheus() -> str:
    found = shutil.which("prometheus")
    if found is None and os.access("/usr/bin/prometheus", os.X_OK):
        found = "/usr/bin/prometheus"
    if found is None:
        pytest.fail("prometheus is not installed: run the tests through 'make test'")
    return found


class Prometheus:
    """Our own Prometheus: its own free port, config and storage in a temporary folder (a
    system service the Debian package may have started is left alone)."""

    def __init__(self, workdir: Path, targets: dict[str, int]):
        self.binary = find_prometheus()
        self.port = free_port()
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "prometheus.yml"
        self.log_path = workdir / "prometheus.log"
        scrape = "\n".join(
            f"  - job_name: {job}\n    static_configs:\n      - targets: ['127.0.0.1:{port}']"
            for job, port in targets.items()
        )
        self.config.write_text(
            f"global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n{scrape}\n"
        )
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Prometheus:
        with self.log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={self.config}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_ready(self) -> None:
        end = time.monotonic() + WAIT_S
        while time.monotonic() < end:
            assert self._proc is not None
            if self._proc.poll() is not None:
                pytest.fail(f"prometheus exited with {self._proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url("/-/ready"), timeout=1) as response:
                    if response.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.1)
        pytest.fail(f"prometheus was not ready within {WAIT_S:.0f} s:\n{self.log()}")

    def __exit__(self, *exc: object) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(5)
        self._proc = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def query(self, promql: str) -> list[dict]:
        """The instant vector ``promql`` evaluates to now (``/api/v1/query``)."""
        url = self.url("/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        assert body["data"]["resultType"] == "vector", body
        return body["data"]["result"]

    def wait_for(self, promql: str, check=lambda result: True, *, end: float) -> list[dict]:
        """Poll until ``promql`` returns series that pass ``check`` or ``end`` (monotonic)."""
        result: list[dict] = []
        while time.monotonic() < end:
            result = self.query(promql)
            if result and check(result):
                return result
            time.sleep(0.25)
        pytest.fail(f"{promql}: no matching series within {WAIT_S:.0f} s; last answer {result}")


def values(result: list[dict]) -> list[float]:
    return [float(series["value"][1]) for series in result]


def rewrite(path: Path, section: str, **keys) -> None:
    data = tomllib.loads(path.read_text())
    data[section].update(keys)
    path.write_text(tomli_w.dumps(data))


@pytest.fixture
def layout(tmp_path, dataset, mosquitto):
    layout = provision(
        tmp_path / "site",
        dataset,
        devices=DEVICES,
        alpha=0.5,
        seed=3,
        options=TaskOptions(
            task_id=f"prom-{time.monotonic_ns()}", rounds=ROUNDS, epochs=1, round_timeout=30.0
        ),
        broker_host=mosquitto.host,
        broker_port=mosquitto.port,
    )
    rewrite(layout.gateway_config, "gateway", metrics_port=0)  # 0: any free port
    rewrite(next(iter(layout.agent_configs.values())), "agent", metrics_port=0)
    return layout


def test_prometheus_scrapes_the_gateway_and_an_agent(layout, tmp_path):
    devices = list(layout.agent_configs)
    gateway = open_gateway(load_gateway_config(layout.gateway_config))
    agents = [
        open_agent(load_agent_config(p), source=str(p)) for p in layout.agent_configs.values()
    ]
    stop = threading.Event()
    threads = [threading.Thread(target=a.run, args=(stop,), daemon=True) for a in agents]
    try:
        gateway_port, agent_port = gateway.metrics.port, agents[0].metrics.port
        assert gateway_port and agent_port
        assert all(a.metrics is None for a in agents[1:])
        targets = {"fedledger-gateway": gateway_port, "fedledger-agent": agent_port}
        with Prometheus(tmp_path / "prometheus", targets) as prom:
            for agent, thread in zip(agents, threads, strict=True):
                agent.start()
                thread.start()
            gateway.connect()
            assert gateway.wait_for_devices(20.0) == DEVICES
            gateway.start()
            end = time.monotonic() + 60
            while not gateway.finished and time.monotonic() < end:
                gateway.step(0.1)
            assert gateway.finished, "the task did not finish in time"
            check_series(prom, devices)
    finally:
        stop.set()
        for agent, thread in zip(agents, threads, strict=True):
            if thread.ident is not None:  # started
                thread.join(5)
            agent.transport.stop()
            if agent.metrics is not None:
                agent.metrics.close()
        gateway.close()


def check_series(prom: Prometheus, devices: list[str]) -> None:
    end = time.monotonic() + WAIT_S
    g = "fedledger_gateway_"
    updates = DEVICES * ROUNDS
    version = importlib.metadata.version("fedledger")

    assert values(prom.wait_for('up{job="fedledger-gateway"}', end=end)) == [1]
    assert values(prom.wait_for('up{job="fedledger-agent"}', end=end)) == [1]
    # Wait on the last values the gateway reaches: then every series is at its final value.
    prom.wait_for(g + "rounds_closed_total", lambda r: values(r) == [ROUNDS], end=end)
    prom.wait_for(g + "current_round", lambda r: values(r) == [ROUNDS], end=end)
    prom.wait_for("fedledger_agent_rounds_trained_total", lambda r: values(r) == [ROUNDS], end=end)

    def one(name: str) -> float:
        (got,) = values(prom.wait_for(name, end=end))
        return got

    assert one(g + "updates_received_total") == updates
    assert one(g + "updates_accepted_total") == updates
    assert one(g + "update_received_bytes_total") > 0
    rejected = prom.wait_for(g + "updates_rejected_total", end=end)
    assert {s["metric"]["reason"] for s in rejected} == set(REJECT_REASONS)
    assert set(values(rejected)) == {0}
    assert one(g + "round_duration_seconds_count") == ROUNDS
    assert one(g + "round_duration_seconds_sum") > 0
    assert one(g + 'round_duration_seconds_bucket{le="+Inf"}') == ROUNDS
    assert one(g + "aggregation_seconds_count") == ROUNDS
    assert one(g + "ledger_commit_seconds_count") == ROUNDS
    assert one(g + "ledger_commit_failures_total") == 0
    assert one(g + "last_round_participants") == DEVICES
    assert one(g + "devices_registered") == DEVICES
    assert one(g + "devices_online") == DEVICES
    assert 0.5 < one(g + "global_model_accuracy_ratio") <= 1
    assert 0.5 < one(g + "global_model_balanced_accuracy_ratio") <= 1
    assert 0.5 < one(g + "global_model_auc_ratio") <= 1
    assert 0 <= one(g + "global_model_sensitivity_ratio") <= 1
    assert 0 <= one(g + "global_model_specificity_ratio") <= 1
    recall = prom.wait_for(g + "global_model_class_recall_ratio", end=end)
    assert sorted(s["metric"]["class"] for s in recall) == ["0", "1"]
    assert all(0 <= v <= 1 for v in values(recall))
    info = prom.wait_for(g + "build_info", end=end)
    assert [s["metric"]["version"] for s in info] == [version] and values(info) == [1]

    a = "fedledger_agent_"
    assert one(a + "training_seconds_count") == ROUNDS
    assert one(a + "training_seconds_sum") > 0
    assert one(a + "update_sent_bytes_total") > 0
    assert one(a + "resident_memory_bytes") > 10 << 20
    info = prom.wait_for(a + "build_info", end=end)
    assert [s["metric"]["version"] for s in info] == [version]

    # What Prometheus stored carries no device id in any label, on either side.
    every = prom.query('{__name__=~"fedledger_.+"}')
    assert len(every) > 60
    for series in every:
        labels = {k: v for k, v in series["metric"].items() if k != "__name__"}
        assert set(labels) <= {"instance", "job", "le", "reason", "version", "class"}, series
        assert not any(d in v for d in devices for v in labels.values()), series
