"""Lay out a complete single-machine deployment: keys, registry, task spec, per-device
data and configs. The demo uses it; so can anyone who wants to run the pieces by hand."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tomli_w

from fedcore import fresh_folder, generate_key, new_dp_seed, public_key_b64, save_private_key
from fedcore.pki import ca_cert_path, certificate_paths, crl_path, init_ca, issue, x25519_key
from gateway import DeviceRegistry

from ._datasets import POSITIVE_CLASS, Dataset, dirichlet_partition


@dataclass(frozen=True)
class Layout:
    root: Path
    task: Path
    gateway_config: Path
    agent_configs: dict[str, Path]
    ledger: Path
    store: Path
    gateway_public_key: str
    device_samples: dict[str, int]
    device_labels: dict[str, list[int]]
    pki: Path | None = None


@dataclass(frozen=True)
class TaskOptions:
    task_id: str = "breast-cancer-diagnosis"
    rounds: int = 10
    codec: str = "int8"
    model: str = "logreg"
    hidden: int = 16
    epochs: int = 5
    batch_size: int = 16
    lr: float = 0.1
    round_timeout: float = 30.0
    #: ``None``: a majority of the fleet (the task leaves ``quorum`` unset).
    quorum: int | None = None
    aggregation: str = "fedavg"
    #: The task's ``[dp]`` terms (``noise_multiplier``, ``clip``, ``budget_epsilon``,
    #: optionally ``sampling`` and ``target_delta``); a sampling seed is made when needed.
    dp: dict | None = None
    #: The task's ``[secagg]`` terms (``clip`` unless ``dp`` sets one, ``neighbours``,
    #: ``threshold``, ``stage_timeout``): the gateway learns only each round's sum.
    secagg: dict | None = None


def device_ids(n: int) -> list[str]:
    return [f"device-{i:02d}" for i in range(1, n + 1)]


def provision(
    root: Path,
    dataset: Dataset,
    *,
    devices: int,
    alpha: float,
    seed: int,
    options: TaskOptions,
    broker_host: str,
    broker_port: int,
    secure: bool = False,
) -> Layout:
    """Write the site. ``secure`` adds an organisation CA under ``pki/`` with a certificate
    for the broker, the gateway and each device, and mutual TLS in every broker section;
    devices then sign updates with their certificate keys (the registry lists certificate
    fingerprints, no Ed25519 keys) and seal payloads to the gateway's X25519 key, and the
    gateway checks each certificate against the CA and its CRL.

    ``root`` must be missing, empty, or a demo site this function made (it carries the
    ``.fedledger-site`` marker): anything else is refused with ``UnsafePathError`` before
    anything is written. A previous site is replaced only once the new one is complete."""
    # Everything that can fail on the inputs runs before the folder is touched.
    parts = dirichlet_partition(dataset.y_train, devices, alpha=alpha, seed=seed)
    with fresh_folder(root, kind=SITE_KIND, created_by="fedledger demo") as site:
        return _provision(
            site, dataset, parts, alpha=alpha, seed=seed, options=options,
            broker_host=broker_host, broker_port=broker_port, secure=secure,
        )  # fmt: skip


SITE_KIND = "demo-site"


def _provision(
    root: Path,
    dataset: Dataset,
    parts: list[np.ndarray],
    *,
    alpha: float,
    seed: int,
    options: TaskOptions,
    broker_host: str,
    broker_port: int,
    secure: bool,
) -> Layout:
    for sub in ("keys", "devices"):
        (root / sub).mkdir(parents=True)
    pki = root / "pki"
    if secure:
        init_ca(pki, "fedledger demo site")
        issue(pki, "broker", "broker", dns=("localhost",), ips=(broker_host,))

    # The task owner's reference statistics come from the gateway's held-out data,
    # never from any device.
    mean = dataset.x_test.mean(axis=0)
    scale = dataset.x_test.std(axis=0) + 1e-6
    task = {
        "id": options.task_id,
        "rounds": options.rounds,
        "codec": options.codec,
        "quorum": options.quorum,
        "round_timeout": options.round_timeout,
        "aggregation": options.aggregation,
        "model": {
            "kind": options.model,
            "n_features": int(dataset.x_train.shape[1]),
            "n_classes": dataset.n_classes,
            "hidden": options.hidden,
            "feature_mean": [float(v) for v in mean],
            "feature_scale": [float(v) for v in scale],
            "init_seed": seed,
        },
        "training": {"epochs": options.epochs, "batch_size": options.batch_size, "lr": options.lr},
    }
    gateway_dp: dict[str, object] = {}
    if options.dp is not None:
        terms = dict(options.dp)
        if terms.get("sampling", 1.0) < 1:
            terms["seed_sha256"] = new_dp_seed(root / "keys" / "dp-seed")
            gateway_dp = {"dp_seed": "keys/dp-seed"}
        task["dp"] = terms
    if options.secagg is not None:
        task["secagg"] = dict(options.secagg)
    if options.quorum is None:
        del task["quorum"]  # a majority of the fleet
    if dataset.name in POSITIVE_CLASS and dataset.n_classes == 2:
        task["positive_class"] = POSITIVE_CLASS[dataset.name]
    task_path = root / "task.toml"
    task_path.write_text(tomli_w.dumps(task))

    gateway_key = generate_key()
    save_private_key(gateway_key, root / "keys" / "gateway.pem")
    gateway_pub = public_key_b64(gateway_key)

    sealing = x25519_key(pki, "gateway") if secure else None
    certificates: dict[str, str] = {}

    def broker(kind: str, name: str) -> dict[str, object]:
        section: dict[str, object] = {"host": broker_host, "port": broker_port}
        if secure:
            done = issue(pki, kind, name)
            section.update(
                tls_ca=str(ca_cert_path(pki)), tls_cert=str(done.cert), tls_key=str(done.key)
            )
            if kind == "device":
                certificates[name] = done.fingerprint
        return section

    np.savez(root / "holdout.npz", x=dataset.x_test, y=dataset.y_test)
    registry: dict[str, str] = {}
    agent_configs: dict[str, Path] = {}
    samples: dict[str, int] = {}
    labels: dict[str, list[int]] = {}
    for device, idx in zip(device_ids(len(parts)), parts, strict=True):
        home = root / "devices" / device
        home.mkdir()
        if not secure:
            key = generate_key()
            save_private_key(key, home / "device.pem")
            registry[device] = public_key_b64(key)
        y = dataset.y_train[idx]
        np.savez(home / "data.npz", x=dataset.x_train[idx], y=y)
        samples[device] = len(idx)
        labels[device] = np.bincount(y, minlength=dataset.n_classes).tolist()
        config = {
            "agent": {
                "device": device,
                "key": "device.pem",
                "task": "../../task.toml",
                "data": "data.npz",
                "gateway_public_key": gateway_pub,
                "state": "state.json",
                "exit_on_final": True,
            },
            "broker": broker("device", device),
        }
        if secure:
            assert sealing is not None
            cert, cert_key = certificate_paths(pki, "device", device)
            config["agent"].update(
                key=str(cert_key),
                certificate=str(cert),
                gateway_encryption_key=sealing.public_key,
            )
        agent_configs[device] = home / "agent.toml"
        agent_configs[device].write_text(tomli_w.dumps(config))
    DeviceRegistry(registry, certificates=certificates).save(root / "registry.json")
    gateway_trust: dict[str, object] = {}
    if secure:
        assert sealing is not None
        gateway_trust = {
            "ca": str(ca_cert_path(pki)),
            "crl": str(crl_path(pki)),
            "encryption_key": str(sealing.key),
            "require_encryption": True,
        }

    gateway_config = root / "gateway.toml"
    gateway_config.write_text(
        tomli_w.dumps(
            {
                "gateway": {
                    "id": "gateway",
                    "key": "keys/gateway.pem",
                    "task": "task.toml",
                    "registry": "registry.json",
                    "store": "gateway.sqlite",
                    "ledger": "ledger.sqlite",
                    "evaluation": "holdout.npz",
                    **gateway_trust,
                    **gateway_dp,
                },
                "broker": broker("gateway", "gateway"),
            }
        )
    )
    return Layout(
        root=root,
        task=task_path,
        gateway_config=gateway_config,
        agent_configs=agent_configs,
        ledger=root / "ledger.sqlite",
        store=root / "gateway.sqlite",
        gateway_public_key=gateway_pub,
        device_samples=samples,
        device_labels=labels,
        pki=pki if secure else None,
    )
