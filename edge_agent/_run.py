"""Assemble an agent from its config file: the path ``fedledger agent run`` takes."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from fedcore import (
    ConfigError,
    Message,
    MqttTransport,
    Transport,
    Will,
    load_device_class,
    load_local_data,
    load_private_key,
    load_public_key,
    load_task,
    presence_topic,
    signer_from_key,
)

from ._agent import EdgeAgent
from ._config import AgentConfig
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
    key = load_private_key(a.key)
    if transport is None:
        presence = presence_topic(task.id, a.device)
        transport = MqttTransport(
            config.broker.mqtt_settings(
                client_id=f"agent-{a.device}",
                will=Will(presence, b"offline"),
                online=Message(presence, b"online", retain=True),
            )
        )
    metrics = None if a.metrics_port is None else AgentMetrics(registry=CollectorRegistry())
    device_class = None if a.device_class is None else load_device_class(a.device_class)
    agent = EdgeAgent(
        device=a.device,
        task=task,
        transport=transport,
        signer=signer_from_key(key),
        gateway_key=gateway_key,
        data=load_local_data(a.data),
        state_path=a.state,
        metrics=metrics,
        device_class=device_class,
    )
    if metrics is not None and a.metrics_port is not None:
        # Served for the life of the process (a daemon thread); AgentMetrics.close() stops it.
        metrics.serve(a.metrics_port, host=a.metrics_host)
    return agent
