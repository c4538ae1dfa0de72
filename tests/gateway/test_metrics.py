"""The gateway's metrics on a fresh registry, over the in-memory transport."""

import urllib.request

import pytest
from prometheus_client import CollectorRegistry

from fedcore import (
    InMemoryBroker,
    presence_topic,
    update_topic,
)
from gateway import REJECT_REASONS, GatewayError, GatewayMetrics

from .fleet import Clock, make_agents, make_gateway

G = "fedledger_gateway_"


class FlakyLedger:
    """An embedded ledger whose appends fail once ``failing`` is set (a fake, not a mock)."""

    def __init__(self, inner):
        self.inner = inner
        self.failing = False

    def submit(self, fn, *args, identity):
        if self.failing:
            raise OSError("ledger unreachable")
        return self.inner.submit(fn, *args, identity=identity)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture
def world(tmp_path, task, registry, gateway_key, dataset, device_keys):
    broker = InMemoryBroker()
    clock = Clock()
    prom = CollectorRegistry()
    metrics = GatewayMetrics(registry=prom, version="9.9.9")
    gateway = make_gateway(
        tmp_path, task, registry, gateway_key, dataset, broker, clock,
        wrap_ledger=FlakyLedger, metrics=metrics,
    )  # fmt: skip
    agents = make_agents(task, device_keys, gateway_key, dataset, broker)
    gateway.connect()
    yield broker, clock, gateway, agents, prom
    gateway.close()


#: The clinical gauges (one value each) -> the clinical metric they export.
CLINICAL_GAUGES = {
    "global_model_balanced_accuracy_ratio": "balanced_accuracy",
    "global_model_auc_ratio": "auc",
    "global_model_sensitivity_ratio": "sensitivity",
    "global_model_specificity_ratio": "specificity",
}


def value(prom, name, **labels):
    return prom.get_sample_value(name, labels)


def run_round(gateway, agents, clock, seconds):
    for agent in agents:
        agent.step(0)
    clock.now += seconds
    gateway.step(0)


def test_counters_gauges_and_histograms_after_three_rounds(world, task, device_keys):
    broker, clock, gateway, agents, prom = world
    outsider = broker.transport()
    for device in ("dev-0", "dev-1", "not-registered"):
        outsider.publish(presence_topic(task.id, device), b"online", retain=True)
    gateway.step(0)
    gateway.start()
    assert value(prom, G + "current_round") == 0
    assert value(prom, G + "last_round_participants") is None  # no round closed yet
    assert value(prom, G + "global_model_accuracy_ratio") is None
    for clinical in CLINICAL_GAUGES:
        assert value(prom, G + clinical) is None
    assert value(prom, G + "global_model_class_recall_ratio", **{"class": "0"}) is None

    run_round(gateway, agents, clock, 3.0)
    outsider.publish(update_topic(task.id, "dev-0"), b"garbage")
    outsider.publish(update_topic(task.id, "dev-3"), b"\0" * (2 << 20))
    run_round(gateway, agents, clock, 4.0)
    run_round(gateway, agents, clock, 5.0)
    assert gateway.finished
    outsider.publish(update_topic(task.id, "dev-1"), b"late")
    gateway.step(0)

    s = gateway.stats
    assert value(prom, G + "updates_received_total") == s.received == 15 + 3
    assert value(prom, G + "updates_accepted_total") == s.accepted == 15
    assert value(prom, G + "update_received_bytes_total") == s.bytes_received > 2 << 20
    expected = {"malformed": 1, "too_large": 1, "round_closed": 1}
    for reason in REJECT_REASONS:  # every reason is exported, zeros included
        got = value(prom, G + "updates_rejected_total", reason=reason)
        assert got == expected.get(reason, 0), reason
    assert value(prom, G + "rounds_closed_total") == 3
    assert value(prom, G + "current_round") == task.rounds  # final model published
    assert value(prom, G + "last_round_participants") == 5
    acc = value(prom, G + "global_model_accuracy_ratio")
    assert acc == gateway.results[-1].accuracy and 0.5 < acc <= 1.0
    clinical = gateway.results[-1].clinical
    for gauge, key in CLINICAL_GAUGES.items():
        got = value(prom, G + gauge)
        assert got == clinical[key] and 0.5 < got <= 1.0, gauge
    for k in ("0", "1"):
        got = value(prom, G + "global_model_class_recall_ratio", **{"class": k})
        assert got == clinical[f"recall_{k}"], k
    assert value(prom, G + "global_model_class_recall_ratio", **{"class": "2"}) is None
    assert value(prom, G + "devices_registered") == len(device_keys)
    assert value(prom, G + "devices_online") == 2  # the unregistered one is not counted
    assert value(prom, G + "build_info", version="9.9.9") == 1

    assert value(prom, G + "round_duration_seconds_count") == 3
    assert value(prom, G + "round_duration_seconds_sum") == pytest.approx(3.0 + 4.0 + 5.0)
    assert value(prom, G + "round_duration_seconds_bucket", le="2.5") == 0
    assert value(prom, G + "round_duration_seconds_bucket", le="5.0") == 3
    assert value(prom, G + "aggregation_seconds_count") == 3
    assert value(prom, G + "aggregation_seconds_sum") > 0
    assert value(prom, G + "ledger_commit_seconds_count") == 3
    assert value(prom, G + "ledger_commit_failures_total") == 0


def test_no_label_carries_a_device_id(world, task, device_keys):
    broker, clock, gateway, agents, prom = world
    gateway.start()
    broker.transport().publish(update_topic(task.id, "dev-2"), b"garbage")
    for _ in range(3):
        run_round(gateway, agents, clock, 1.0)
    devices = [*device_keys, "dev-"]
    samples = [s for family in prom.collect() for s in family.samples]
    assert len(samples) > 50
    for sample in samples:
        assert sample.name.startswith(G), sample.name
        for key, label in sample.labels.items():
            assert key in ("reason", "version", "le", "class"), sample
            assert not any(d in label for d in devices), sample


def test_clinical_gauges_export_only_what_the_last_round_defines(world):
    _broker, _clock, gateway, _agents, prom = world
    # a three-class task's last round whose held-out data had no class 1
    gateway.stats.last_clinical = {
        "balanced_accuracy": 0.8, "auc": 0.9, "recall_0": 0.7, "recall_2": 0.9,
    }  # fmt: skip
    assert value(prom, G + "global_model_balanced_accuracy_ratio") == 0.8
    assert value(prom, G + "global_model_auc_ratio") == 0.9
    assert value(prom, G + "global_model_sensitivity_ratio") is None
    assert value(prom, G + "global_model_specificity_ratio") is None
    recall = [
        (s.labels["class"], s.value)
        for family in prom.collect()
        if family.name == G + "global_model_class_recall_ratio"
        for s in family.samples
    ]
    assert recall == [("0", 0.7), ("2", 0.9)]


def test_a_failed_ledger_append_is_counted_not_timed(world):
    _broker, clock, gateway, agents, prom = world
    gateway.start()
    gateway.ledger.failing = True
    run_round(gateway, agents, clock, 1.0)
    assert gateway.results[0].ledgered is False
    # closing round 0 and opening round 1 both failed
    assert value(prom, G + "ledger_commit_failures_total") == 2
    assert value(prom, G + "ledger_commit_seconds_count") == 0
    gateway.ledger.failing = False
    run_round(gateway, agents, clock, 1.0)
    # round 0 is anchored first, then round 1
    assert gateway.results[1].ledgered is True
    assert value(prom, G + "ledger_commit_failures_total") == 2
    assert value(prom, G + "ledger_commit_seconds_count") == 2
    assert gateway.ledger.verify(replay=True, store=gateway.store).ok


def test_the_registry_refuses_a_second_set_of_gateway_metrics():
    prom = CollectorRegistry()
    GatewayMetrics(registry=prom)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        GatewayMetrics(registry=prom)


def test_serve_exposes_the_registry_over_http_until_closed(world):
    _broker, clock, gateway, agents, _prom = world
    gateway.start()
    metrics = gateway.metrics
    port = metrics.serve(0)
    assert metrics.port == port > 0
    with pytest.raises(GatewayError, match="already served"):
        metrics.serve(0)
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        body = response.read().decode()
    assert "fedledger_gateway_current_round 0.0" in body
    assert 'fedledger_gateway_updates_rejected_total{reason="replayed"} 0.0' in body
    # before a round closes the clinical gauges are declared, without a value
    assert "# TYPE fedledger_gateway_global_model_auc_ratio gauge" in body
    assert "\nfedledger_gateway_global_model_auc_ratio " not in body
    run_round(gateway, agents, clock, 1.0)
    with urllib.request.urlopen(url, timeout=5) as response:
        body = response.read().decode()
    clinical = gateway.results[0].clinical
    for gauge, key in CLINICAL_GAUGES.items():
        assert f"\nfedledger_gateway_{gauge} {clinical[key]!r}\n" in body, gauge
    for k in (0, 1):
        line = f'fedledger_gateway_global_model_class_recall_ratio{{class="{k}"}} '
        assert f"\n{line}{clinical[f'recall_{k}']!r}\n" in body, k
    gateway.close()  # closing the gateway stops the endpoint
    assert metrics.port is None
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=2)


def test_serve_on_a_taken_port_is_a_gateway_error():
    first = GatewayMetrics(registry=CollectorRegistry())
    port = first.serve(0)
    try:
        with pytest.raises(GatewayError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            GatewayMetrics(registry=CollectorRegistry()).serve(port)
    finally:
        first.close()


def test_metrics_port_is_validated_at_load(tmp_path):
    from fedcore import ConfigError
    from gateway import load_gateway_config

    base = 'key = "k.pem"\ntask = "t.toml"\nregistry = "r.json"\nstore = "s.db"\nledger = "l.db"\n'
    path = tmp_path / "gateway.toml"
    path.write_text("[gateway]\n" + base)
    assert load_gateway_config(path).gateway.metrics_port is None
    path.write_text("[gateway]\n" + base + 'metrics_port = 9464\nmetrics_host = "0.0.0.0"\n')
    section = load_gateway_config(path).gateway
    assert (section.metrics_port, section.metrics_host) == (9464, "0.0.0.0")
    path.write_text("[gateway]\n" + base + "metrics_port = 70000\n")
    with pytest.raises(ConfigError, match=r"gateway.toml: gateway.metrics_port: .*65535"):
        load_gateway_config(path)
