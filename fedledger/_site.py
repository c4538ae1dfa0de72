"""A site of one's own: a gateway's folder built from the team's own held-out CSV, then its
devices one at a time (``fedledger init``, ``fedledger device add``).

What the demo lays out in one go (:mod:`fedledger._provision`) is split here into the steps a
hospital team takes over days: the task and the gateway first, from data that stays with the
gateway; then each device as it is unpacked. Nothing here generates data.

A site folder::

    .fedledger-site         marker (kind "site")
    task.toml               model, training recipe, [columns] of the CSV
    gateway.toml            the gateway's config (paths relative to the folder)
    holdout.csv             the gateway's held-out data (a copy), for evaluation only
    registry.json           admitted devices and their keys
    agent.template.toml     what every device's agent.toml starts from
    keys/gateway.pem        the gateway's Ed25519 signing key
    devices/NAME/           agent.toml, device.pem (or a certificate under pki/)
    pki/                    with --secure: the organisation CA, certificates, X25519 key

Every path written into a config is relative to that config, so the folder can be moved.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from fedcore import (
    IDENTIFIER,
    ConfigError,
    FedledgerError,
    TaskSpec,
    atomic_write_bytes,
    atomic_write_text,
    check_folder,
    check_task_fits,
    claim_folder,
    generate_key,
    load_config,
    load_device_class,
    load_local_data,
    load_private_key,
    load_task,
    public_key_b64,
    read_csv_table,
    read_marker,
    remove_owned_folder,
    save_private_key,
    validate_config,
)
from fedcore.pki import ca_cert_path, crl_path, init_ca, issue, x25519_key

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

SITE_KIND = "site"
TEMPLATE = "agent.template.toml"
#: Device classes ``--class`` may name by a short name (the files are in firmware_configs/).
CLASS_ALIASES = {
    "pi4": "raspberry-pi-4",
    "pi5": "raspberry-pi-5",
    "pi-zero-2w": "raspberry-pi-zero-2w",
    "arm64": "generic-arm64",
}
FIRMWARE_CONFIGS = Path(__file__).resolve().parents[1] / "firmware_configs"


class SiteError(FedledgerError):
    """A site cannot be made or changed as asked; nothing was changed."""


@dataclass(frozen=True)
class SiteOptions:
    task_id: str = "my-task"
    rounds: int = 10
    model: str = "logreg"
    hidden: int = 16
    codec: str = "int8"
    epochs: int = 5
    batch_size: int = 16
    lr: float = 0.1
    round_timeout: float = 30.0
    #: ``None``: a majority of the fleet (the task leaves ``quorum`` unset).
    quorum: int | None = None
    aggregation: str = "fedavg"
    seed: int = 0
    #: The label values in class order; unset: found in the held-out CSV.
    classes: tuple[str, ...] | None = None
    broker_host: str = "127.0.0.1"
    broker_port: int = 1883
    gateway_id: str = "gateway"
    org: str = "org1"
    #: An organisation CA under pki/: mutual TLS, certificate-signed and sealed updates.
    secure: bool = False


@dataclass(frozen=True)
class Site:
    root: Path
    task: TaskSpec
    gateway_public_key: str
    rows: int
    label_counts: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        columns = self.task.columns
        assert columns is not None
        return {
            "site": str(self.root),
            "task": self.task.id,
            "task_file": str(self.root / "task.toml"),
            "gateway_config": str(self.root / "gateway.toml"),
            "model": self.task.model.kind,
            "features": len(columns.features),
            "classes": list(columns.classes),
            "holdout_rows": self.rows,
            "holdout_labels": self.label_counts,
            "gateway_public_key": self.gateway_public_key,
            "secure": (self.root / "pki").is_dir(),
            "changed": True,
        }


@dataclass(frozen=True)
class Device:
    name: str
    config: Path
    key: Path
    data: Path
    device_class: str
    certificate: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.name,
            "config": str(self.config),
            "key": str(self.key),
            "certificate": None if self.certificate is None else str(self.certificate),
            "data": str(self.data),
            "device_class": self.device_class,
            "changed": True,
        }


# ---------------------------------------------------------------- init


def init_site(root: str | os.PathLike[str], data: Path, label: str, options: SiteOptions) -> Site:
    """Write a new site at ``root`` (missing or empty) from the held-out CSV ``data``.

    The task's feature statistics come from ``data`` alone: the gateway's held-out set, never
    a device's. Everything that can fail on the inputs (the CSV, the task) fails before the
    folder is touched; the site is built beside ``root`` and renamed into place once whole.
    """
    target = check_folder(root, kind=SITE_KIND)
    if target.is_dir() and read_marker(target) is not None:
        raise SiteError(
            f"{target} is already a site; init writes a new site into a missing or empty folder"
            " (add devices with 'fedledger device add')"
        )
    table = read_csv_table(data, label=label, classes=options.classes)
    task = _task_spec(table, label, options)
    staging = target.with_name(f".{target.name}.init-{os.getpid()}")
    folder = claim_folder(staging, kind=SITE_KIND, created_by="fedledger init")
    try:
        public = _write_site(folder, data, task, options)
        if target.exists():
            target.rmdir()  # empty: checked above; rename needs it gone or empty
        os.replace(folder, target)
    except BaseException:
        if staging.exists():
            remove_owned_folder(staging, kind=SITE_KIND)
        raise
    counts = {name: int((table.y == i).sum()) for i, name in enumerate(table.classes)}
    return Site(target, task, public, len(table.y), counts)


def _task_spec(table, label: str, options: SiteOptions) -> TaskSpec:
    mean = table.x.mean(axis=0)
    scale = table.x.std(axis=0) + 1e-6
    body: dict[str, Any] = {
        "id": options.task_id,
        "rounds": options.rounds,
        "codec": options.codec,
        "quorum": options.quorum,
        "round_timeout": options.round_timeout,
        "aggregation": options.aggregation,
        "model": {
            "kind": options.model,
            "n_features": int(table.x.shape[1]),
            "n_classes": len(table.classes),
            "hidden": options.hidden,
            "feature_mean": [float(v) for v in mean],
            "feature_scale": [float(v) for v in scale],
            "init_seed": options.seed,
        },
        "training": {
            "epochs": options.epochs,
            "batch_size": options.batch_size,
            "lr": options.lr,
        },
        "columns": {
            "label": label,
            "features": list(table.features),
            "classes": list(table.classes),
        },
    }
    return validate_config(body, TaskSpec, file="task.toml")


def _write_site(folder: Path, data: Path, task: TaskSpec, options: SiteOptions) -> str:
    (folder / "keys").mkdir()
    (folder / "devices").mkdir()
    atomic_write_text(folder / "task.toml", tomli_w.dumps(task.model_dump(exclude_none=True)))
    atomic_write_bytes(folder / "holdout.csv", Path(data).read_bytes())
    key = generate_key()
    save_private_key(key, folder / "keys" / "gateway.pem")
    public = public_key_b64(key)
    atomic_write_text(folder / "registry.json", '{"devices":{}}\n')

    gateway: dict[str, Any] = {
        "id": options.gateway_id,
        "org": options.org,
        "key": "keys/gateway.pem",
        "task": "task.toml",
        "registry": "registry.json",
        "store": "gateway.sqlite",
        "ledger": "ledger.sqlite",
        "evaluation": "holdout.csv",
    }
    broker: dict[str, Any] = {"host": options.broker_host, "port": options.broker_port}
    agent: dict[str, Any] = {
        "task": "../../task.toml",
        "gateway_public_key": public,
        "state": "state.json",
        "exit_on_final": True,
    }
    device_broker = dict(broker)
    if options.secure:
        pki = folder / "pki"
        init_ca(pki, options.org)
        ips = (options.broker_host,) if _is_ip(options.broker_host) else ()
        dns = ("localhost",) if ips else ("localhost", options.broker_host)
        issue(pki, "broker", "broker", dns=dns, ips=ips)
        tls = issue(pki, "gateway", options.gateway_id)
        sealing = x25519_key(pki, options.gateway_id)
        gateway.update(
            ca="pki/ca.pem",
            crl="pki/crl.pem",
            encryption_key=os.path.relpath(sealing.key, folder),
            require_encryption=True,
        )
        broker.update(
            tls_ca="pki/ca.pem",
            tls_cert=os.path.relpath(tls.cert, folder),
            tls_key=os.path.relpath(tls.key, folder),
        )
        agent["gateway_encryption_key"] = sealing.public_key
        device_broker["tls_ca"] = "../../pki/ca.pem"
        assert ca_cert_path(pki).is_file() and crl_path(pki).is_file()
    atomic_write_text(
        folder / "gateway.toml", tomli_w.dumps({"gateway": gateway, "broker": broker})
    )
    template = (
        "# What `fedledger device add` starts each devices/NAME/agent.toml from: edit the\n"
        "# broker address devices reach, or anything shared, before adding devices.\n"
        "# device, key, data (and certificate, device_class) are filled in per device.\n"
    )
    atomic_write_text(
        folder / TEMPLATE, template + tomli_w.dumps({"agent": agent, "broker": device_broker})
    )
    return public


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------- devices


def open_site(root: str | os.PathLike[str]) -> Path:
    """``root`` resolved, if it is a site ``fedledger init`` made."""
    folder = Path(root).expanduser().resolve()
    marker = read_marker(folder) if folder.is_dir() else None
    if marker is None or marker["kind"] != SITE_KIND:
        raise SiteError(f"{root} is not a site made by 'fedledger init'")
    return folder


@contextlib.contextmanager
def _locked(site: Path) -> Iterator[None]:
    """One writer of the registry at a time (two ``device add`` at once both land)."""
    with (site / ".registry.lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def resolve_device_class(name: str) -> Path:
    """A device class file: a path, or a name (or short name) from ``firmware_configs/``."""
    path = Path(name)
    if path.suffix == ".toml" or os.sep in name:
        return path
    stem = CLASS_ALIASES.get(name, name)
    path = FIRMWARE_CONFIGS / f"{stem}.toml"
    if not path.is_file():
        known = sorted(p.stem for p in FIRMWARE_CONFIGS.glob("*.toml"))
        known += sorted(CLASS_ALIASES)
        raise SiteError(f"no device class {name!r} (known: {', '.join(known)}; or a .toml file)")
    return path


def add_device(
    root: str | os.PathLike[str],
    name: str,
    *,
    device_class: str | None = None,
    data: Path | None = None,
) -> Device:
    """Admit device ``name``: its key (or certificate, on a site with a CA), its folder with
    an agent config, and its registry entry, written last and atomically. A name already in
    the registry or among the device folders is an error; nothing is replaced."""
    from gateway import DeviceRegistry

    site = open_site(root)
    if not IDENTIFIER.fullmatch(name):
        raise SiteError(f"{name!r} is not a device id (letters, digits, '_', '.', '-'; up to 64)")
    task = load_task(site / "task.toml")
    class_file = None
    if device_class is not None:
        class_file = resolve_device_class(device_class)
        check_task_fits(load_device_class(class_file), task)
    data_path = None
    if data is not None:
        data_path = Path(data).expanduser().resolve()
        x, _ = load_local_data(data_path, n_classes=task.model.n_classes, columns=task.columns)
        if x.shape[1] != task.model.n_features:
            raise ConfigError(
                f"{x.shape[1]} features, the task expects {task.model.n_features}",
                file=str(data_path),
            )
    template = _read_template(site)
    secure = (site / "pki").is_dir()
    with _locked(site):
        registry_path = site / "registry.json"
        registry = DeviceRegistry.load(registry_path)
        home = site / "devices" / name
        if name in registry or home.exists():
            raise SiteError(f"device {name} is already in {site} (registry.json or devices/{name})")
        staging = site / "devices" / f".{name}.add-{os.getpid()}"
        staging.mkdir()
        try:
            device, entry = _write_device(
                site, staging, home, name, template, task, class_file, data_path, secure
            )
            os.replace(staging, home)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        try:
            registry.with_device(name, **entry).save(registry_path)
        except BaseException:
            shutil.rmtree(home, ignore_errors=True)
            raise
    return device


def _read_template(site: Path) -> dict[str, Any]:
    path = site / TEMPLATE
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("file not found", file=str(path)) from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"not valid TOML: {exc}", file=str(path)) from None


def _write_device(
    site: Path,
    staging: Path,
    home: Path,
    name: str,
    template: dict[str, Any],
    task: TaskSpec,
    class_file: Path | None,
    data: Path | None,
    secure: bool,
) -> tuple[Device, dict[str, str]]:
    agent = dict(template.get("agent", {}))
    broker = dict(template.get("broker", {}))
    agent["device"] = name
    agent["data"] = str(data) if data is not None else "data.csv"
    entry: dict[str, str] = {}
    certificate = None
    if secure:
        pki = site / "pki"
        done = issue(pki, "device", name)
        key_path, certificate = done.key, done.cert
        agent["key"] = os.path.relpath(done.key, home)
        agent["certificate"] = os.path.relpath(done.cert, home)
        broker.update(tls_cert=agent["certificate"], tls_key=agent["key"])
        entry["certificate_sha256"] = done.fingerprint
    else:
        key = generate_key()
        save_private_key(key, staging / "device.pem")
        key_path = home / "device.pem"
        agent["key"] = "device.pem"
        entry["public_key"] = public_key_b64(key)
    class_name = "default"
    if class_file is not None:
        class_name = load_device_class(class_file).name
        atomic_write_bytes(staging / class_file.name, class_file.read_bytes())
        agent["device_class"] = class_file.name
    config = staging / "agent.toml"
    atomic_write_text(config, tomli_w.dumps({"agent": agent, "broker": broker}))
    # Checked as the agent will read it: a template edited into nonsense fails here.
    from edge_agent import AgentConfig

    load_config(config, AgentConfig)
    device = Device(
        name=name,
        config=home / "agent.toml",
        key=key_path,
        data=Path(agent["data"]) if data is not None else home / "data.csv",
        device_class=class_name,
        certificate=certificate,
    )
    return device, entry


def device_class_of(site: Path, device: str) -> str:
    """The class a device was added with (its agent.toml's device_class), or ``default``."""
    config = site / "devices" / device / "agent.toml"
    try:
        agent = tomllib.loads(config.read_text(encoding="utf-8")).get("agent", {})
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return "default"
    value = agent.get("device_class")
    return Path(value).stem if isinstance(value, str) and value else "default"


# ---------------------------------------------------------------- the ledger, as the admin


@dataclass(frozen=True)
class LedgerResult:
    what: str
    status: str  # "registered" / "created", or "already registered" / "already created"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.what, "status": self.status}


class AdminLedger:
    """The site's ledger opened as its organisation's admin: the embedded ledger (signed
    with the gateway's key, as the gateway signs it) or a Fabric network through a
    connection profile holding an admin identity."""

    def __init__(self, site: Path, *, db: Path | None = None, profile: Path | None = None):
        from gateway import load_gateway_config
        from ledger import EmbeddedLedger, Identity

        if db is not None and profile is not None:
            raise SiteError("give --db (embedded ledger) or --profile (Fabric), not both")
        self.site = site
        self.config = load_gateway_config(site / "gateway.toml")
        g = self.config.gateway
        self.admin = Identity(msp_id=g.org, subject="admin", role="admin")
        profile = profile or (None if db is not None else g.fabric_profile)
        if profile is not None:
            from ledger.fabric import FabricLedger, connect

            self.backend = FabricLedger(connect(profile))
            self.where = f"Fabric ({profile})"
        else:
            path = db or g.ledger
            key = load_private_key(g.key)
            from fedcore import signer_from_key

            self.backend = EmbeddedLedger(
                path, signer=signer_from_key(key), public_key=public_key_b64(key)
            )
            self.where = str(path)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> AdminLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def register_fleet(self) -> list[LedgerResult]:
        """Register every device in the site's registry; one already registered with the
        same key is reported as such, one registered with another key is an error."""
        from gateway import DeviceRegistry
        from ledger import ContractError

        registry = DeviceRegistry.load(self.config.gateway.registry)
        if not len(registry):
            raise SiteError(f"{self.config.gateway.registry} lists no devices: add some first")
        org = self.config.gateway.org
        done, clashes = [], []
        for device in registry:
            fingerprint = registry.fingerprint(device)
            args = (device, org, device_class_of(self.site, device), fingerprint)
            try:
                self.backend.submit("RegisterDevice", *args, identity=self.admin)
                done.append(LedgerResult(device, "registered"))
                continue
            except ContractError as exc:
                if exc.code != "conflict":
                    raise SiteError(f"the ledger refused device {device}: {exc}") from None
            record = self.backend.evaluate("GetDevice", device, identity=self.admin)
            if record.get("key_fingerprint") != fingerprint:
                clashes.append(device)
            elif record.get("status") != "active":
                done.append(LedgerResult(device, f"already registered ({record.get('status')})"))
            else:
                done.append(LedgerResult(device, "already registered"))
        if clashes:
            raise SiteError(
                f"{', '.join(clashes)} registered on the ledger with another key than in"
                f" {self.config.gateway.registry}; nothing was changed for them"
            )
        return done

    def create_task(self) -> LedgerResult:
        """Declare the site's task with its initial model, as the gateway would on its first
        start; a task already there with the same initial model is reported as such."""
        from fedcore import init_params, ledger_privacy, model_hash
        from ledger import ContractError

        g = self.config.gateway
        task = load_task(g.task)
        spec = task.model_spec()
        initial = model_hash(init_params(spec))
        privacy = ledger_privacy(task)
        args = (task.id, g.org, g.id, spec.spec_hash(), task.aggregation_label(), privacy, initial)
        try:
            self.backend.submit("CreateTask", *args, identity=self.admin)
            return LedgerResult(task.id, "created")
        except ContractError as exc:
            if exc.code != "conflict":
                raise SiteError(f"the ledger refused task {task.id}: {exc}") from None
        try:
            history = self.backend.evaluate("GetHistory", initial, task.id, identity=self.admin)
        except ContractError:
            history = {}
        if history.get("initial_model") != initial:
            raise SiteError(
                f"task {task.id} is on the ledger with another initial model than"
                f" {g.task} gives; pick another --task-id"
            )
        return LedgerResult(task.id, "already created")
