"""Assemble a gateway from its config file: the path ``fedledger gateway run`` takes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from prometheus_client import CollectorRegistry

from fedcore import (
    CertificateTrust,
    ConfigError,
    MqttTransport,
    Transport,
    load_dp_seed,
    load_local_data,
    load_private_key,
    load_task,
    load_x25519_private_key,
    public_key_b64,
    signer_from_key,
)
from ledger import EmbeddedLedger, Identity, LedgerBackend

from ._config import GatewayConfig
from ._errors import GatewayError
from ._metrics import GatewayMetrics
from ._registry import DeviceRegistry
from ._service import Gateway, RoundResult
from ._store import UpdateStore
from ._strategies import AGGREGATION_RULES


def open_gateway(
    config: GatewayConfig,
    *,
    transport: Transport | None = None,
    on_round: Callable[[RoundResult], None] | None = None,
) -> Gateway:
    g = config.gateway
    task = load_task(g.task)
    try:
        AGGREGATION_RULES[task.aggregation].resolve(task.aggregation_options)
    except ValueError as exc:
        raise ConfigError(str(exc), file=str(g.task), key="aggregation_options") from None
    registry = DeviceRegistry.load(g.registry)
    key = load_private_key(g.key)
    signer = signer_from_key(key)
    evaluation = None
    if g.evaluation is not None:
        evaluation = load_local_data(
            g.evaluation, n_classes=task.model.n_classes, columns=task.columns
        )
    trust = None if g.ca is None else CertificateTrust.load(g.ca, g.crl)
    sealing = None if g.encryption_key is None else load_x25519_private_key(g.encryption_key)
    dp_seed = None if g.dp_seed is None else load_dp_seed(g.dp_seed)
    if transport is None:
        # PUBACK only once an update is committed to the store (see Gateway).
        transport = MqttTransport(
            config.broker.mqtt_settings(client_id=f"gateway-{g.id}", manual_ack=True)
        )
    metrics = None if g.metrics_port is None else GatewayMetrics(registry=CollectorRegistry())
    # One gateway per store: a second `gateway run` on it is refused with the first's PID.
    store = UpdateStore(g.store, exclusive=True)
    try:
        admin: Identity | None = None
        if g.fabric_profile is not None:
            ledger = _fabric_ledger(g.fabric_profile)
        else:
            ledger = EmbeddedLedger(g.ledger, signer=signer, public_key=public_key_b64(key))
            # The embedded ledger is the site's own: its operator is the admin who admits devices.
            admin = Identity(msp_id=g.org, subject="admin", role="admin")
        gateway = Gateway(
            task=task,
            transport=transport,
            store=store,
            ledger=ledger,
            registry=registry,
            signer=signer,
            evaluation=evaluation,
            max_message_bytes=g.max_message_bytes,
            on_round=on_round,
            metrics=metrics,
            identity=Identity(msp_id=g.org, subject=g.id, role="gateway"),
            admin=admin,
            trust=trust,
            decryption_key=sealing,
            require_encryption=g.require_encryption,
            dp_seed=dp_seed,
            # Anchoring waits for blocks (seconds on Fabric): never on the loop reading MQTT.
            ledger_worker=True,
        )
    except BaseException:
        store.close()
        raise
    if metrics is not None and g.metrics_port is not None:
        try:
            metrics.serve(g.metrics_port, host=g.metrics_host)  # Gateway.close() stops it
        except GatewayError:
            gateway.close()
            raise
    return gateway


def _fabric_ledger(profile: Path) -> LedgerBackend:
    try:
        from ledger.fabric import FabricLedger, connect
    except ImportError as exc:
        raise GatewayError(
            f"fabric_profile is set but the Fabric client is not installed ({exc.name});"
            " install fedledger[fabric]"
        ) from None
    client = connect(profile)
    return FabricLedger(client)
