"""Assemble an agent from its config file: the path ``fedledger agent run`` takes."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedcore import (
    ConfigError,
    Message,
    ModelSpec,
    MqttTransport,
    Transport,
    Will,
    certificate_der,
    certificate_signer,
    check_key_matches,
    check_labels,
    load_certificate,
    load_device_class,
    load_ec_private_key,
    load_local_data,
    load_private_key,
    load_public_key,
    load_signal_windows,
    load_task,
    load_x25519_public_key,
    lock_beside,
    presence_topic,
    signer_from_key,
)

from ._agent import AgentError, EdgeAgent
from ._config import AgentConfig, AgentSection, load_agent_config

if TYPE_CHECKING:
    from fedcore import ProcessLock
    from fedcore._data import Columns

    from ._metrics import AgentMetrics


def open_agent(
    config: AgentConfig, *, source: str, transport: Transport | None = None
) -> EdgeAgent:
    """Build an :class:`EdgeAgent`; ``source`` is the config file named in errors."""
    a = config.agent
    task = load_task(a.task)
    try:
        gateway_key = load_public_key(a.gateway_public_key)
    except ValueError as exc:
        raise ConfigError(str(exc), file=source, key="agent.gateway_public_key") from None
    seal_to = None
    if a.gateway_encryption_key is not None:
        try:
            seal_to = load_x25519_public_key(a.gateway_encryption_key)
        except ValueError as exc:
            raise ConfigError(str(exc), file=source, key="agent.gateway_encryption_key") from None
    certificate = None
    if a.certificate is not None:
        cert = load_certificate(a.certificate)
        ec_key = load_ec_private_key(a.key)
        if not check_key_matches(ec_key, cert):
            raise ConfigError(
                f"the key is not the key of the certificate {a.certificate}",
                file=source,
                key="agent.key",
            )
        signer = certificate_signer(ec_key)
        certificate = certificate_der(cert)
    else:
        signer = signer_from_key(load_private_key(a.key))
    if transport is None:
        presence = presence_topic(task.id, a.device)
        transport = MqttTransport(
            config.broker.mqtt_settings(
                client_id=f"agent-{a.device}",
                will=Will(presence, b"offline"),
                online=Message(presence, b"online", retain=True),
            )
        )
    metrics: AgentMetrics | None = None
    if a.metrics_port is not None:
        # Only now: prometheus_client stays out of an agent that serves no metrics.
        from prometheus_client import CollectorRegistry

        from ._metrics import AgentMetrics

        metrics = AgentMetrics(registry=CollectorRegistry())
    device_class = None if a.device_class is None else load_device_class(a.device_class)
    agent = EdgeAgent(
        device=a.device,
        task=task,
        transport=transport,
        signer=signer,
        gateway_key=gateway_key,
        certificate=certificate,
        seal_to=seal_to,
        data=local_data(a, task.model_spec(), source=source, columns=task.columns),
        state_path=a.state,
        metrics=metrics,
        device_class=device_class,
        resend_seconds=a.resend_seconds,
    )
    if metrics is not None and a.metrics_port is not None:
        # Served for the life of the process (a daemon thread); AgentMetrics.close() stops it.
        metrics.serve(a.metrics_port, host=a.metrics_host)
    return agent


def local_data(
    section: AgentSection, spec: ModelSpec, *, source: str, columns: Columns | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The agent's training set: a table, or the windows of a signal (``[agent.signal]``)
    shaped for the task's model: its cnn1d window and channels, or for a dense model
    ``n_features / window`` channels. ``columns`` (the task's) reads a CSV table by column
    name. Every label must be one of the task's classes: checked here, with its row."""
    signal = section.signal
    if signal is None:
        return load_local_data(section.data, n_classes=spec.n_classes, columns=columns)
    key = "agent.signal.window"
    window = signal.window or spec.window
    if spec.kind == "cnn1d" and window != spec.window:
        message = f"{window} differs from the task's cnn1d window {spec.window}"
        raise ConfigError(message, file=source, key=key)
    if not window:
        raise ConfigError(f"required for a {spec.kind} task", file=source, key=key)
    if spec.n_features % window:
        message = f"does not divide the task's {spec.n_features} features"
        raise ConfigError(message, file=source, key=key)
    x, y = load_signal_windows(
        section.data,
        window=window,
        stride=signal.stride or max(window // 2, 1),
        channels=spec.n_features // window,
        labels=signal.labels,
        label=signal.label,
        max_windows=signal.max_windows,
    )
    check_labels(y, spec.n_classes, file=str(section.data), row=lambda i: f"window {i}")
    return x, y


def run_agent(config: str, broker: str | None = None) -> None:
    """The body of ``fedledger agent run`` (logging already set up): ``broker``
    (``host:port``), else ``$FEDLEDGER_BROKER``, overrides the config's broker address."""
    cfg = load_agent_config(config)
    cfg = cfg.model_copy(update={"broker": cfg.broker.overridden(broker)})
    owner = lock_state(cfg.agent.state)
    try:
        agent = open_agent(cfg, source=config)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        agent.start()
        try:
            agent.run(stop, exit_on_final=cfg.agent.exit_on_final)
        finally:
            agent.transport.stop()
    finally:
        owner.release()


def lock_state(state: Path) -> ProcessLock:
    """One agent per state file: two agents sharing one would reuse counters and train a
    round twice. The lock is ``<state>.lock`` beside it; a second agent is refused, naming
    the holder's PID."""
    try:
        state.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AgentError(f"cannot make the folder of agent state {state}: {exc}") from None
    return lock_beside(state, holder="an agent", error=AgentError)
