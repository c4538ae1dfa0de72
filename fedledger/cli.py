"""The ``fedledger`` command line.

Every command turns the errors users can cause (bad config, missing broker, corrupt
ledger) into one line on stderr and a non-zero exit code: no tracebacks.
"""

from __future__ import annotations

import enum
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fedcore import DEFAULT_MAX_MESSAGE_BYTES

from . import __version__

app = typer.Typer(
    help="Federated learning on edge devices with a verifiable ledger.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
agent_app = typer.Typer(help="Run an edge agent on a device.", no_args_is_help=True)
gateway_app = typer.Typer(help="Run a gateway.", no_args_is_help=True)
ledger_app = typer.Typer(help="Inspect and verify the ledger.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks that print JSON figures.", no_args_is_help=True)
app.add_typer(agent_app, name="agent")
app.add_typer(gateway_app, name="gateway")
app.add_typer(ledger_app, name="ledger")
app.add_typer(bench_app, name="bench")

#: Output that is not a terminal (a pipe, a file, CI logs) gets 100 columns, not rich's 80.
console = Console(width=None if sys.stdout.isatty() else 100)
err = Console(stderr=True)

LogLevel = Annotated[
    str, typer.Option("--log-level", help="debug, info, warning or error.", show_default=True)
]


def _logging(level: str, *, file: Path | None = None, quiet: bool = False) -> None:
    """Log at ``level`` to stderr, or to ``file``, or (``quiet``) nowhere yet: the demo adds
    a file handler inside its site folder once that folder is its own."""
    value = getattr(logging, level.upper(), None)
    if not isinstance(value, int):
        raise typer.BadParameter(f"unknown log level {level!r}", param_hint="--log-level")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if file is not None:
        handlers = [logging.FileHandler(file)]
    elif quiet:
        handlers = [logging.NullHandler()]
    logging.basicConfig(
        level=value,
        handlers=handlers,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )


BrokerOption = Annotated[
    str | None,
    typer.Option(
        "--broker",
        metavar="HOST:PORT",
        help="The MQTT broker to use instead of the config file's (default: $FEDLEDGER_BROKER,"
        " else the file's [broker]).",
    ),
]


def _stop_on_sigterm() -> threading.Event:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    return stop


@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        console.print(f"fedledger {__version__}")
        raise typer.Exit()


# ---------------------------------------------------------------- demo
@app.command()
def demo(
    devices: Annotated[int, typer.Option(min=2, max=200, help="Edge agents to start.")] = 10,
    rounds: Annotated[int, typer.Option(min=1, max=1000, help="Federated rounds.")] = 10,
    seed: Annotated[int, typer.Option(help="Seeds the data split and the initial model.")] = 0,
    alpha: Annotated[
        float,
        typer.Option(min=0.01, help="Dirichlet concentration of the label split (small = skewed)."),
    ] = 0.5,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the JSON report on stdout (no live table).")
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Write the JSON report here (a PNG plot goes beside it; default:"
            " report.json in --workdir).",
        ),
    ] = None,
    workdir: Annotated[
        Path, typer.Option(help="Keys, configs, data, store and ledger go here (recreated).")
    ] = Path("fedledger-demo"),
    model: Annotated[str, typer.Option(help="logreg or mlp.")] = "logreg",
    codec: Annotated[
        str,
        typer.Option(help="Update codec: f32, int8, int8-channel, int4, topk-f32 or topk-int8."),
    ] = "int8",
    epochs: Annotated[int, typer.Option(min=1, help="Local epochs per round.")] = 5,
    aggregation: Annotated[
        str,
        typer.Option(
            help="fedavg, fedprox, median, trimmed_mean, krum, multi_krum, bulyan,"
            " geometric_median or centered_clip"
            " (recorded on the ledger with every round)."
        ),
    ] = "fedavg",
    lr: Annotated[float, typer.Option(min=1e-6, help="Local learning rate.")] = 0.1,
    agents: Annotated[
        str, typer.Option(help="process: one OS process per agent; thread: all in this process.")
    ] = "process",
    plot: Annotated[bool, typer.Option(help="Write a PNG of accuracy per round.")] = True,
    secure: Annotated[
        bool,
        typer.Option(
            help="Mutual TLS: an organisation CA, a certificate per device and gateway, and a"
            " broker that accepts only TLS clients and lets each device publish only its own"
            " topics."
        ),
    ] = False,
    privacy: Annotated[
        str,
        typer.Option(
            help="none; dp: client-level differential privacy (clipped updates, Gaussian"
            " noise on their sum, a budget the ledger records); secagg: secure aggregation"
            " (the gateway learns only each round's sum, SecAgg+); both: dp over secagg"
            " (docs/privacy.md)."
        ),
    ] = "none",
    noise_multiplier: Annotated[
        float, typer.Option(min=0.01, max=100, help="With --privacy dp: noise std / clip.")
    ] = 1.0,
    clip: Annotated[
        float,
        typer.Option(
            min=1e-6, help="With --privacy dp, secagg or both: the L2 bound of each update."
        ),
    ] = 1.0,
    sampling: Annotated[
        float,
        typer.Option(
            min=0.01,
            max=1.0,
            help="With --privacy dp: each device's chance to take part in a round.",
        ),
    ] = 1.0,
    budget_epsilon: Annotated[
        float,
        typer.Option(
            min=0.01, help="With --privacy dp: the task ends before a round that would exceed it."
        ),
    ] = 20.0,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Print only the final summary.")
    ] = False,
    log_level: LogLevel = "warning",
) -> None:
    """Run a complete federated training on this machine and verify its ledger.

    Starts a private Mosquitto broker on a free loopback port, a gateway with an embedded
    ledger, and N edge agents, each with its own key and its own non-IID share of the
    breast-cancer diagnostic data set bundled with scikit-learn. Prints a live table per
    round, then a summary; writes a JSON report and a PNG plot.
    """
    from ._demo import DemoOptions, run_demo
    from ._progress import RoundTable
    from ._provision import TaskOptions

    if model not in ("logreg", "mlp"):
        raise typer.BadParameter("must be logreg or mlp", param_hint="--model")
    from fedcore import CODECS
    from gateway import AGGREGATION_RULES

    if codec not in CODECS:
        raise typer.BadParameter(f"must be one of {', '.join(CODECS)}", param_hint="--codec")
    if aggregation not in AGGREGATION_RULES:
        raise typer.BadParameter(
            f"must be one of {', '.join(AGGREGATION_RULES)}", param_hint="--aggregation"
        )
    if agents not in ("process", "thread"):
        raise typer.BadParameter("must be process or thread", param_hint="--agents")
    if privacy not in ("none", "dp", "secagg", "both"):
        raise typer.BadParameter("must be none, dp, secagg or both", param_hint="--privacy")
    if privacy != "none" and aggregation not in ("fedavg", "fedprox"):
        raise typer.BadParameter(
            f"--privacy {privacy} composes only with fedavg or fedprox (docs/privacy.md)",
            param_hint="--aggregation",
        )
    dp = secagg = None
    if privacy in ("secagg", "both"):
        secagg = {} if privacy == "both" else {"clip": clip}
    if privacy in ("dp", "both"):
        dp = {
            "noise_multiplier": noise_multiplier,
            "clip": clip,
            "sampling": sampling,
            "budget_epsilon": budget_epsilon,
        }
    from fedcore import check_folder

    from ._provision import SITE_KIND

    # Refused here, before anything starts: a folder fedledger did not make is never emptied.
    check_folder(workdir, kind=SITE_KIND, fresh=True)
    _logging(log_level, file=None, quiet=True)
    options = DemoOptions(
        devices=devices,
        rounds=rounds,
        seed=seed,
        alpha=alpha,
        workdir=workdir,
        json_path=out,
        plot=plot,
        agents=agents,
        secure=secure,
        task=TaskOptions(
            rounds=rounds,
            codec=codec,
            model=model,
            epochs=epochs,
            lr=lr,
            aggregation=aggregation,
            dp=dp,
            secagg=secagg,
        ),
    )
    table = RoundTable(console, rounds=rounds, devices=devices, enabled=not (quiet or as_json))
    with table:
        report = run_demo(options, on_round=table.add, on_status=table.status)
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        table.summary(report)
    if not report["ledger_verified"]:
        raise typer.Exit(1)


# ---------------------------------------------------------------- agent / gateway
@agent_app.command("run")
def agent_run(
    config: Annotated[Path, typer.Option("--config", "-c", help="Agent config file (TOML).")],
    log_level: LogLevel = "info",
    broker: BrokerOption = None,
) -> None:
    """Run an edge agent until stopped (or until the task ends, with exit_on_final).

    Reconnects to the broker by itself; trains on each new global model the gateway
    publishes and sends one signed update per round.
    """
    # `fedledger agent run` itself usually starts in fedledger._entry, without this module.
    from edge_agent import run_agent

    _logging(log_level)
    run_agent(str(config), broker)


@agent_app.command("device-class")
def agent_device_class(
    path: Annotated[Path, typer.Argument(help="A device class file (firmware_configs/*.toml).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the class as JSON.")] = False,
) -> None:
    """Validate a device class file and print its budgets (provisioning reads the memory and
    CPU limits of the agent's systemd unit from here)."""
    from fedcore import load_device_class

    device_class = load_device_class(path)
    if as_json:
        sys.stdout.write(json.dumps(device_class.model_dump(mode="json"), sort_keys=True) + "\n")
        return
    console.print(
        f"{device_class.name}: {device_class.memory_budget_mb} MiB for the agent of"
        f" {device_class.memory_mb} MiB, {device_class.cpu_cores} core(s), models up to"
        f" {device_class.max_model_params:,} parameters, codec {device_class.codec}",
        highlight=False,
    )


@gateway_app.command("run")
def gateway_run(
    config: Annotated[Path, typer.Option("--config", "-c", help="Gateway config file (TOML).")],
    log_level: LogLevel = "info",
    broker: BrokerOption = None,
) -> None:
    """Run a gateway until its task's last round is closed (or until stopped).

    Resumes an interrupted task from its store: accepted updates of the open round are
    kept, none is counted twice.
    """
    from gateway import load_gateway_config, open_gateway

    _logging(log_level)
    cfg = load_gateway_config(config)
    cfg = cfg.model_copy(update={"broker": cfg.broker.overridden(broker)})
    gw = open_gateway(cfg)
    stop = _stop_on_sigterm()
    try:
        gw.connect()
        gw.wait_for_devices(cfg.gateway.start_wait)
        gw.start()
        gw.run(stop)
    finally:
        gw.close()


@gateway_app.command("status")
def gateway_status(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Gateway config file (TOML).")
    ] = None,
    store: Annotated[
        Path | None,
        typer.Option("--store", help="A gateway store (SQLite) instead: every task it holds."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
) -> None:
    """Show what a gateway's store says, running or not: closed rounds, rounds the ledger
    does not hold yet, the open round and its updates, rejections, and any round the ledger
    contract refuses (later rounds wait behind it). Read-only.

    Exit status: 0, or 1 when the ledger refuses a round.
    """
    from fedcore import load_task
    from gateway import DeviceRegistry, UpdateStore, load_gateway_config

    if (config is None) == (store is None):
        raise typer.BadParameter("give --config (a gateway) or --store (a store file)")
    tasks = None
    quorum: dict[str, int] = {}
    if config is not None:
        section = load_gateway_config(config).gateway
        task = load_task(section.task)
        store, tasks = section.store, [task.id]
        fleet = len(DeviceRegistry.load(section.registry))
        quorum = {"quorum": task.quorum_of(fleet), "devices": fleet}
    assert store is not None
    if not store.exists():
        raise typer.BadParameter(f"{store}: no such store (has the gateway run yet?)")
    db = UpdateStore.open_readonly(store)
    try:
        summaries = [{**db.summary(task), **quorum} for task in (tasks or db.tasks())]
    finally:
        db.close()
    refused = any(s["refused_rounds"] for s in summaries)
    if as_json:
        sys.stdout.write(json.dumps({"store": str(store), "tasks": summaries}, sort_keys=True))
        sys.stdout.write("\n")
    else:
        if not summaries:
            console.print(f"{store}: no rounds yet", highlight=False)
        for s in summaries:
            console.print(_status_text(s), highlight=False)
    if refused:
        raise typer.Exit(1)


def _iso(when: float | None) -> str:
    """A unix time as ISO-8601 UTC for tables (JSON output keeps the number)."""
    if when is None:
        return ""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def _status_text(s: dict) -> str:
    lines = [f"task {s['task']}: {s['closed_rounds']} closed rounds"]
    opened = s["open_round"]
    if opened is not None:
        when = _iso(opened["deadline"])
        lines.append(
            f"  open: round {opened['round']}, {opened['updates']} updates, deadline {when}"
        )
        if "quorum" in s:
            lines.append(f"  quorum: {s['quorum']} of {s['devices']} registered devices")
            if opened["updates"] < s["quorum"] and opened["deadline"] < time.time():
                lines.append(
                    f"  stalled: {opened['updates']} updates at the deadline, below the quorum"
                    f" {s['quorum']} (the deadline is extended until it is met)"
                )
    if s["unledgered_rounds"]:
        lines.append(
            f"  not on the ledger yet: {s['unledgered_rounds']} rounds, from round"
            f" {s['oldest_unledgered']}"
        )
    else:
        lines.append("  the ledger holds every closed round")
    for r in s["refused_rounds"]:
        lines.append(f"  REFUSED by the ledger: round {r['round']}: {r['reason']}")
    lines.append(f"  accepted updates: {s['accepted_updates']}")
    if s["rejections"]:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(s["rejections"].items()))
        lines.append(f"  rejected: {counts}")
    return "\n".join(lines)


# ---------------------------------------------------------------- ledger
DbOption = Annotated[Path, typer.Option("--db", help="Embedded ledger file (SQLite).")]


@ledger_app.command("verify")
def ledger_verify(
    db: Annotated[Path | None, typer.Option("--db", help="Embedded ledger file (SQLite).")] = None,
    fabric_profile: Annotated[
        Path | None,
        typer.Option(
            help="Verify a Fabric channel instead: read its blocks through the peer in this"
            " connection profile (TOML)."
        ),
    ] = None,
    msp_ca: Annotated[
        list[str] | None,
        typer.Option(
            metavar="MSPID=PEM",
            help="With --fabric-profile, MSPID=ca.pem (repeatable): every creator and endorser"
            " certificate must be issued by a root CA of its MSP.",
        ),
    ] = None,
    orderer_msp: Annotated[
        list[str] | None,
        typer.Option(
            metavar="MSPID",
            help="With --fabric-profile, the ordering service's MSP (repeatable): every block"
            " must carry a valid signature of one of its members (give its --msp-ca too).",
        ),
    ] = None,
    public_key: Annotated[
        str | None,
        typer.Option(
            help="Pin the gateway's public key (base64) instead of trusting the genesis block."
        ),
    ] = None,
    store: Annotated[
        Path | None,
        typer.Option(
            help="The gateway's store (gateway.sqlite), opened read-only: cross-check it with"
            " the ledger both ways (every closed round and accepted update of the store on the"
            " ledger, every round and accepted update of the ledger in the store, the same"
            " models); exits 1 naming the first discrepancy, --json lists them all."
        ),
    ] = None,
    replay: Annotated[
        bool,
        typer.Option(
            help="Re-execute every transaction through the contract and compare its reads,"
            " writes, event and result (--no-replay checks signatures and hashes only)."
        ),
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Re-check the whole chain: hash links, Merkle roots, block hashes, signatures, and
    (by default) the contract's rules by replaying every transaction.

    Exits 1 and names the first bad block when anything is inconsistent.
    """
    if (db is None) == (fabric_profile is None):
        raise typer.BadParameter("give --db (embedded ledger) or --fabric-profile (Fabric)")
    if fabric_profile is not None:
        if public_key is not None:
            raise typer.BadParameter("--public-key applies to an embedded ledger")
        _verify_fabric(fabric_profile, msp_ca or [], orderer_msp or [], replay, as_json, store)
        return
    if msp_ca or orderer_msp:
        raise typer.BadParameter(
            "--msp-ca and --orderer-msp apply to a Fabric chain (--fabric-profile)"
        )
    from gateway import UpdateStore
    from ledger import EmbeddedLedger

    gateway_store = None
    if store is not None:
        gateway_store = UpdateStore.open_readonly(store)
    try:
        with EmbeddedLedger.open_readonly(db) as chain:
            report = chain.verify(public_key=public_key, replay=replay, store=gateway_store)
    finally:
        if gateway_store is not None:
            gateway_store.close()
    if as_json:
        console.print_json(json.dumps(report.to_dict()))
    elif report.ok:
        what = "signatures, hashes" + (", contract replay" if replay else "")
        if store is not None:
            what += f", {report.checked_models} models and {report.checked_updates} updates"
            if report.checked_aggregates:
                what += f", {report.checked_aggregates} secure sums unmasked again"
            what += " against the store, every closed round and accepted update in the store"
            what += " on the ledger"
        console.print(
            f"[green]ok[/]: {report.blocks} blocks, {report.records} records verified ({what})",
            soft_wrap=True,
        )
    else:
        _print_problem(report)
    if not report.ok:
        raise typer.Exit(1)


def _print_problem(report) -> None:
    """One line: the chain's first bad block, or the first way ledger and store disagree."""
    if report.discrepancies:
        first, more = report.discrepancies[0], len(report.discrepancies) - 1
        also = f" (and {more} more: --json lists them)" if more else ""
        err.print(
            f"[red]ledger and store disagree[/]: {first.kind}: {first.describe()}{also}",
            soft_wrap=True,
            highlight=False,
        )
        return
    err.print(
        f"[red]ledger inconsistent[/] at block {report.first_bad_height}: {report.problem}",
        soft_wrap=True,
    )


def _verify_fabric(
    profile: Path,
    msp_ca: list[str],
    orderer_msp: list[str],
    replay: bool,
    as_json: bool,
    store: Path | None,
) -> None:
    from gateway import UpdateStore
    from ledger.fabric import connect, verify_chain

    from ._progress import BlockProgress

    roots = _msp_roots(msp_ca) if msp_ca else None
    gateway_store = None if store is None else UpdateStore.open_readonly(store)
    try:
        with connect(profile) as client, BlockProgress(err) as progress:
            report = verify_chain(
                client,
                replay=replay,
                msp_roots=roots,
                orderer_msps=orderer_msp,
                progress=progress.update,
                store=gateway_store,
            )
    finally:
        if gateway_store is not None:
            gateway_store.close()
    if as_json:
        console.print_json(json.dumps(report.to_dict()))
    elif report.ok:
        what = "hash chain, signatures, endorsements, read versions"
        what += (", contract replay" if replay else "") + ", contract invariants"
        if roots:
            what += f", certificates of {', '.join(sorted(roots))}"
        if orderer_msp:
            what += f", block signatures of {', '.join(sorted(orderer_msp))}"
        if store is not None:
            what += f", {report.checked_models} models and {report.checked_updates} updates"
            if report.checked_aggregates:
                what += f", {report.checked_aggregates} secure sums unmasked again"
            what += " against the store, every closed round and accepted update in the store"
            what += " on the ledger"
        console.print(
            f"[green]ok[/]: {report.blocks} blocks of {report.channel},"
            f" {report.transactions} {report.chaincode} transactions ({report.invalid} invalid,"
            f" not applied) verified ({what})",
            soft_wrap=True,
        )
    else:
        _print_problem(report)
    if not report.ok:
        raise typer.Exit(1)


def _msp_roots(specs: list[str]) -> dict:
    from cryptography import x509

    roots: dict[str, list] = {}
    for spec in specs:
        msp_id, sep, path = spec.partition("=")
        if not sep or not msp_id or not path:
            raise typer.BadParameter(f"{spec!r} is not MSPID=ca.pem", param_hint="--msp-ca")
        try:
            roots.setdefault(msp_id, []).extend(
                x509.load_pem_x509_certificates(Path(path).read_bytes())
            )
        except (OSError, ValueError) as exc:
            raise typer.BadParameter(f"{path}: {exc}", param_hint="--msp-ca") from None
    return roots


ProfileOption = Annotated[
    Path | None,
    typer.Option(help="Query a Fabric network through this connection profile instead of --db."),
]


def _evaluate(db: Path | None, profile: Path | None, fn: str, *args):
    from ledger import EmbeddedLedger, Identity

    if profile is not None:
        from ledger.fabric import FabricLedger, connect

        backend = FabricLedger(connect(profile))
        try:
            return backend.evaluate(fn, *args)
        finally:
            backend.close()
    if db is None:
        raise typer.BadParameter("give --db (embedded ledger) or --profile (Fabric)")
    with EmbeddedLedger.open_readonly(db) as chain:
        return chain.evaluate(fn, *args, identity=Identity("auditor", "cli", "auditor"))


@ledger_app.command("history")
def ledger_history(
    model_hash: Annotated[
        str,
        typer.Argument(
            help="A global model's hash (SHA-256 hex), or a unique prefix of it (6+ digits)."
        ),
    ],
    db: Annotated[Path | None, typer.Option("--db", help="Embedded ledger file (SQLite).")] = None,
    profile: ProfileOption = None,
    task: Annotated[str | None, typer.Option(help="The task, when the hash is in several.")] = None,
    wide: Annotated[
        bool, typer.Option("--wide", help="Full model hashes and every metric of each round.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """The lineage of a global model: every round that built it, back to the initial model.

    The table shows each round's model by a 12-digit prefix (any unique prefix of 6 or more
    digits is accepted wherever a model hash is asked for) and its headline metrics; --wide
    shows full hashes and every metric, --json everything."""
    from rich.table import Table

    history = _evaluate(db, profile, "GetHistory", model_hash, task)
    if as_json:
        sys.stdout.write(json.dumps(history, indent=2) + "\n")
        return
    if wide:  # a block per round: full hashes do not fit a table row
        console.print(
            f"task {history['task']}: lineage of {history['model']}",
            highlight=False,
            soft_wrap=True,
        )
        for r in history["rounds"]:
            metrics = ", ".join(f"{k} {v:.4g}" for k, v in sorted((r.get("metrics") or {}).items()))
            for line in (
                f"round {r['round']}  committed {_iso(r.get('committed_at'))}"
                f"  devices {len(r.get('contributors') or [])}  samples {r.get('samples', '')}",
                f"  global model {r['global_model']}",
                f"  base model   {r['base_model']}",
                f"  metrics      {metrics}",
            ):
                console.print(line, highlight=False, soft_wrap=True)
        console.print(f"initial model {history['initial_model']}", highlight=False)
        return
    table = Table(title=f"task {history['task']}: lineage of {history['model'][:16]}")
    headline = ("accuracy", "balanced_accuracy", "auc")
    titles = {"accuracy": "accuracy", "balanced_accuracy": "bal. acc.", "auc": "AUC"}
    for column in ("round", "committed (UTC)", "global model", "devices", "samples"):
        justify = "left" if column == "global model" else "right"
        table.add_column(column, no_wrap=True, justify=justify)
    for key in headline:
        table.add_column(titles[key], no_wrap=True, justify="right")
    for r in history["rounds"]:
        metrics = r.get("metrics") or {}
        table.add_row(
            str(r["round"]),
            _iso(r.get("committed_at")),
            r["global_model"][:12],
            str(len(r.get("contributors") or [])),
            str(r.get("samples", "")),
            *("-" if metrics.get(k) is None else f"{metrics[k]:.4f}" for k in headline),
        )
    console.print(table)
    console.print(f"initial model {history['initial_model']}", highlight=False)


@ledger_app.command("device")
def ledger_device(
    device_id: Annotated[str, typer.Argument(help="The device id.")],
    db: Annotated[Path | None, typer.Option("--db", help="Embedded ledger file (SQLite).")] = None,
    profile: ProfileOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """A device's registration and every accepted update it contributed, by task and round."""
    from rich.table import Table

    device = _evaluate(db, profile, "GetDevice", device_id)
    contributions = _evaluate(db, profile, "GetDeviceContributions", device_id)
    if as_json:
        out = {"device": device, "contributions": contributions}
        sys.stdout.write(json.dumps(out, indent=2) + "\n")
        return
    console.print(
        f"device {device_id}: {device.get('status')}, org {device.get('org')},"
        f" class {device.get('device_class')}",
        highlight=False,
    )
    table = Table()
    for column in ("task", "round", "update digest", "samples", "round status", "global model"):
        table.add_column(column, no_wrap=True)
    for c in contributions:
        table.add_row(
            c["task"],
            str(c["round"]),
            c["digest"][:16],
            str(c["samples"]),
            str(c.get("status", "")),
            str(c.get("global_model") or "")[:12],
        )
    console.print(table)


@ledger_app.command("privacy")
def ledger_privacy_cmd(
    task_id: Annotated[str, typer.Argument(help="The task id.")],
    db: Annotated[Path | None, typer.Option("--db", help="Embedded ledger file (SQLite).")] = None,
    profile: ProfileOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Recompute a task's privacy budget from the ledger alone: epsilon after every round
    from the rounds' DP events (the same RDP accountant as the gateway), compared with what
    the gateway recorded; once the task ended, the revealed sampling seed is checked against
    its commitment and every contributor against it.

    Exit status: 0 when every check holds, 1 otherwise.
    """
    from ledger import EmbeddedLedger, Identity, privacy_report

    auditor = Identity("auditor", "cli", "auditor")
    if profile is not None:
        from ledger.fabric import FabricLedger, connect

        backend = FabricLedger(connect(profile))
        try:
            report = privacy_report(backend, task_id, identity=auditor)
        finally:
            backend.close()
    elif db is None:
        raise typer.BadParameter("give --db (embedded ledger) or --profile (Fabric)")
    else:
        with EmbeddedLedger.open_readonly(db) as chain:
            report = privacy_report(chain, task_id, identity=auditor)
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2, sort_keys=True) + "\n")
    else:
        console.print(_privacy_text(report), highlight=False)
    if not report["ok"]:
        raise typer.Exit(1)


def _privacy_text(r: dict) -> str:
    if r["dp"] is None:
        return f"task {r['task']}: no differential privacy (no budget to account)"
    dp = r["dp"]
    lines = [
        f"task {r['task']}: noise multiplier {dp['noise_multiplier']}, clip {dp['clip']},"
        f" sampling {dp['sampling']}, delta {dp['target_delta']:g},"
        f" budget epsilon {dp['budget_epsilon']:g}",
        f"  {len(r['rounds'])} rounds: epsilon {r['epsilon']:.6f} (recorded by the gateway:"
        f" {r['recorded_epsilon']}); without sampling amplification"
        f" {r['epsilon_without_amplification']:.4f}",
    ]
    ended = r["ended"]
    if ended is not None:
        lines.append(f"  ended: {ended['status']} after {ended['rounds']} rounds")
        if dp.get("seed_sha256"):
            checked = all(x.get("contributors_sampled", False) for x in r["rounds"])
            lines.append(
                "  sampling seed revealed and matches its commitment; every contributor was sampled"
                if checked and not r["problems"]
                else "  sampling not verified"
            )
    for problem in r["problems"]:
        lines.append(f"  PROBLEM: {problem}")
    lines.append("  ok" if r["ok"] else "  FAILED")
    return "\n".join(lines)


@ledger_app.command("revoke-device")
def ledger_revoke_device(
    device_id: Annotated[str, typer.Argument(help="The device to revoke.")],
    db: DbOption,
    reason: Annotated[str, typer.Option(help="Why, recorded on the ledger.")] = "revoked",
    key: Annotated[
        Path,
        typer.Option(help="The gateway's signing key (the embedded ledger is signed with it)."),
    ] = Path("keys/gateway.pem"),
    org: Annotated[str, typer.Option(help="The organisation whose admin revokes.")] = "org1",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Revoke a device as the site's admin: from the next round on the gateway refuses its
    updates (reason `revoked`), and the contract refuses to record them."""
    from fedcore import load_private_key, public_key_b64, signer_from_key
    from ledger import EmbeddedLedger, Identity

    signer_key = load_private_key(key)
    if not db.is_file():
        raise typer.BadParameter(f"no ledger at {db}", param_hint="--db")
    with EmbeddedLedger(
        db, signer=signer_from_key(signer_key), public_key=public_key_b64(signer_key)
    ) as chain:
        record = chain.submit(
            "RevokeDevice", device_id, reason, identity=Identity(org, "admin", "admin")
        )
    if as_json:
        sys.stdout.write(json.dumps(record, indent=2) + "\n")
    else:
        console.print(f"device {device_id} revoked ({reason})", highlight=False)


@ledger_app.command("serve-chaincode")
def ledger_serve_chaincode(
    address: Annotated[
        str, typer.Option(help="host:port to listen on; the peer dials it (connection.json).")
    ] = "0.0.0.0:9999",
    chaincode_id: Annotated[
        str,
        typer.Option(help="The package id the peer gave the installed package (label:sha256)."),
    ] = "",
    tls_cert: Annotated[Path | None, typer.Option(help="Server certificate (PEM).")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="Server private key (PEM).")] = None,
    client_ca: Annotated[
        Path | None, typer.Option(help="CA of the peer's client certificates: mutual TLS.")
    ] = None,
    max_workers: Annotated[int, typer.Option(min=1, help="Transactions run at once.")] = 16,
    log_level: LogLevel = "info",
) -> None:
    """Serve the fedledger contract as Fabric chaincode-as-a-service until stopped.

    Install the package from `fedledger ledger package-chaincode` on the peers, approve and
    commit the definition (docs/ledger.md), then run this with the package id.
    """
    from ledger.chaincode import serve

    _logging(log_level)
    if not chaincode_id:
        raise typer.BadParameter(
            "the installed package's id is required", param_hint="--chaincode-id"
        )
    serve(
        address,
        chaincode_id=chaincode_id,
        tls_cert=tls_cert,
        tls_key=tls_key,
        client_ca=client_ca,
        max_workers=max_workers,
        on_start=lambda server: err.print(
            f"chaincode {chaincode_id} listening on {server.address}"
        ),
    )


@ledger_app.command("package-chaincode")
def ledger_package_chaincode(
    out: Annotated[Path, typer.Option(help="Package file, or a folder for <label>.tar.gz.")],
    address: Annotated[str, typer.Option(help="host:port where the peer reaches the server.")],
    label: Annotated[str, typer.Option(help="Package label.")] = "fedledger_1.0",
    tls: Annotated[bool, typer.Option(help="The peer connects over TLS.")] = False,
    client_auth: Annotated[bool, typer.Option(help="The server requires mutual TLS.")] = False,
    root_cert: Annotated[Path | None, typer.Option(help="CA of the server certificate.")] = None,
    client_cert: Annotated[Path | None, typer.Option(help="Peer's client certificate.")] = None,
    client_key: Annotated[Path | None, typer.Option(help="Peer's client key.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Build the CCaaS package (connection.json, metadata.json) that
    `peer lifecycle chaincode install` takes, and print its package id."""
    from ledger.chaincode import build_package, package_id

    path = build_package(
        out,
        label=label,
        address=address,
        tls_required=tls,
        client_auth_required=client_auth,
        root_cert=root_cert,
        client_cert=client_cert,
        client_key=client_key,
    )
    result = {"package": str(path), "package_id": package_id(path)}
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        console.print(
            f"package {result['package']}\npackage id {result['package_id']}", highlight=False
        )


# ---------------------------------------------------------------- pki and broker (issue 4)
# Module level, next to the other sub-apps (needs: `import enum` at the top of cli.py).
pki_app = typer.Typer(
    help="The organisation's certificate authority. Idempotent; --json for scripts.",
    no_args_is_help=True,
)
broker_app = typer.Typer(help="Mosquitto configuration for production.", no_args_is_help=True)
app.add_typer(pki_app, name="pki")
app.add_typer(broker_app, name="broker")


class CertKind(str, enum.Enum):
    device = "device"
    gateway = "gateway"
    broker = "broker"


PkiDir = Annotated[
    Path, typer.Option("--dir", help="The CA directory (created by 'pki init').", show_default=True)
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]


def _report(result: dict, as_json: bool, line: str) -> None:
    """One JSON object (with "changed", for Ansible) or one human line; never key material."""
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2, sort_keys=True) + "\n")
    else:
        console.print(line, highlight=False, soft_wrap=True)


@pki_app.command("init")
def pki_init(
    org: Annotated[str, typer.Option(help="The organisation (O) of every certificate.")],
    directory: PkiDir = Path("pki"),
    days: Annotated[int, typer.Option(min=1, help="CA validity in days.")] = 3650,
    as_json: JsonFlag = False,
) -> None:
    """Create the organisation CA (EC P-256), or report the one already there.

    An existing CA is never overwritten; a different --org than the existing CA's is an error.
    """
    from fedcore.pki import init_ca

    ca = init_ca(directory, org, days=days)
    verb = "created" if ca.created else "exists"
    _report(
        ca.to_dict(),
        as_json,
        f"CA {verb}: {ca.org}, {ca.cert} (key {ca.key}, 0600), valid until"
        f" {ca.not_after:%Y-%m-%d}, sha256 {ca.fingerprint[:16]}",
    )


@pki_app.command("issue")
def pki_issue(
    kind: Annotated[CertKind, typer.Argument(help="device, gateway or broker.")],
    name: Annotated[str, typer.Argument(help="The device or gateway id (the certificate CN).")],
    directory: PkiDir = Path("pki"),
    days: Annotated[int, typer.Option(min=1, help="Validity in days.")] = 365,
    dns: Annotated[
        list[str] | None, typer.Option("--dns", help="Broker only: a host name clients use.")
    ] = None,
    ip: Annotated[
        list[str] | None, typer.Option("--ip", help="Broker only: an address clients use.")
    ] = None,
    rotate: Annotated[
        bool,
        typer.Option(
            "--rotate",
            help="Issue a new key and certificate even if the current one is valid (or revoked).",
        ),
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Issue a certificate (CN=NAME, OU=KIND, O=org) and its key (0600), unless a valid one
    exists. Prints where they are, never the key."""
    from fedcore.pki import issue

    done = issue(directory, kind.value, name, days=days, dns=dns or (), ips=ip or (), rotate=rotate)
    _report(
        done.to_dict(),
        as_json,
        f"{done.kind} {done.name}: {done.action}, {done.cert} (key {done.key}, 0600),"
        f" serial {done.serial:x}, valid until {done.not_after:%Y-%m-%d}",
    )


@pki_app.command("x25519")
def pki_x25519(
    name: Annotated[str, typer.Argument(help="The gateway id whose key this is.")] = "gateway",
    directory: PkiDir = Path("pki"),
    as_json: JsonFlag = False,
) -> None:
    """Create the gateway's X25519 key pair (x25519/NAME.key 0600, x25519/NAME.pub) that
    devices seal update payloads to, unless it exists. Prints the public key, never the
    private one."""
    from fedcore.pki import x25519_key

    done = x25519_key(directory, name)
    verb = "created" if done.created else "exists"
    _report(
        done.to_dict(),
        as_json,
        f"X25519 key {verb}: {done.key} (0600), public {done.public_key}",
    )


@pki_app.command("revoke")
def pki_revoke(
    name: Annotated[str, typer.Argument(help="The device or gateway id.")],
    directory: PkiDir = Path("pki"),
    superseded: Annotated[
        bool,
        typer.Option(
            "--superseded", help="Revoke only certificates a rotation replaced; keep the current."
        ),
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Revoke NAME's certificates and rewrite crl.pem; reload the broker to apply it."""
    from fedcore.pki import revoke

    done = revoke(directory, name, superseded_only=superseded)
    what = f"revoked {len(done.revoked)} certificate(s)" if done.revoked else "already revoked"
    _report(done.to_dict(), as_json, f"{name}: {what}; CRL {done.crl}")


@pki_app.command("crl")
def pki_crl(
    directory: PkiDir = Path("pki"),
    days: Annotated[int, typer.Option(min=1, help="Days until the CRL's next update.")] = 30,
    as_json: JsonFlag = False,
) -> None:
    """Re-sign the CRL with a fresh validity (run it regularly: an expired CRL locks everyone
    out of the broker)."""
    from fedcore.pki import refresh_crl

    path = refresh_crl(directory, crl_days=days)
    _report({"crl": str(path), "changed": True}, as_json, f"CRL refreshed: {path}")


@pki_app.command("signing-key")
def pki_signing_key(
    name: Annotated[str, typer.Argument(help="The device or gateway id.")],
    directory: PkiDir = Path("pki"),
    as_json: JsonFlag = False,
) -> None:
    """Create NAME's Ed25519 signing key (0600, under DIR/signing/) unless it exists, and
    print its public key: what a device registry and an agent's gateway_public_key hold."""
    from ._keys import ensure_signing_key

    done = ensure_signing_key(directory, name)
    verb = "created" if done.created else "exists"
    _report(
        done.to_dict(), as_json, f"{name}: signing key {verb}, {done.key}; public {done.public_key}"
    )


@pki_app.command("dp-seed")
def pki_dp_seed(
    out: Annotated[Path, typer.Option("--out", help="The seed file to create (never replaced).")],
    as_json: JsonFlag = False,
) -> None:
    """Create a secret sampling seed for a task with differential privacy (32 random bytes
    as hex, mode 0600) and print its SHA-256: put that in the task as dp.seed_sha256 and the
    file in the gateway's [gateway] section as dp_seed. The gateway reveals the seed on the
    ledger when the task ends, so anyone can recheck who was sampled."""
    from fedcore import new_dp_seed

    digest = new_dp_seed(out)
    _report(
        {"seed": str(out), "seed_sha256": digest},
        as_json,
        f"{out}: sampling seed created; dp.seed_sha256 = {digest!r}",
    )


@broker_app.command("config")
def broker_config(
    out: Annotated[Path, typer.Option("--out", help="Where to write mosquitto.conf and acl.")],
    task: Annotated[list[str], typer.Option("--task", help="A task id (repeat for several).")],
    pki: Annotated[
        Path, typer.Option("--pki", help="The CA directory ('pki init').", show_default=True)
    ] = Path("pki"),
    registry: Annotated[
        Path | None,
        typer.Option(help="The device registry (registry.json): every device in it gets rights."),
    ] = None,
    device: Annotated[
        list[str] | None, typer.Option("--device", help="A device id (repeat; adds to --registry).")
    ] = None,
    gateway: Annotated[
        list[str] | None, typer.Option("--gateway", help="A gateway id (repeat).")
    ] = None,
    broker_name: Annotated[
        str, typer.Option(help="The broker certificate's name in the CA directory.")
    ] = "broker",
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TLS port.")] = 8883,
    crl: Annotated[bool, typer.Option(help="Refuse revoked certificates (crlfile).")] = True,
    persistence: Annotated[
        Path | None, typer.Option(help="Keep sessions and queued messages here across restarts.")
    ] = None,
    max_message_bytes: Annotated[
        int, typer.Option(min=1024, help="Largest message, as the gateway's max_message_bytes.")
    ] = DEFAULT_MAX_MESSAGE_BYTES,
    as_json: JsonFlag = False,
) -> None:
    """Write a production Mosquitto config: mutual TLS only, certificate CN as identity, and
    an ACL from the registry (each device publishes only its own update and presence topics
    and reads only its task's model; gateways read updates and publish the model)."""
    from fedcore.mosquitto import write_broker_config
    from fedcore.pki import ca_cert_path, certificate_paths, crl_path
    from gateway import DeviceRegistry

    devices = list(DeviceRegistry.load(registry)) if registry is not None else []
    devices += device or []
    server_cert, server_key = certificate_paths(pki, "broker", broker_name)
    files = write_broker_config(
        out,
        ca=ca_cert_path(pki),
        server_cert=server_cert,
        server_key=server_key,
        crl=crl_path(pki) if crl else None,
        port=port,
        host=host,
        devices=devices,
        gateways=gateway or ["gateway"],
        tasks=task,
        persistence_dir=persistence,
        max_message_bytes=max_message_bytes,
    )
    _report(
        {**files.to_dict(), "changed": True},
        as_json,
        f"wrote {files.config} and {files.acl}: {len(files.devices)} devices,"
        f" {len(files.gateways)} gateways, {len(files.tasks)} tasks;"
        f" run 'mosquitto -c {files.config}'",
    )


model_app = typer.Typer(help="Export global models for on-device inference.", no_args_is_help=True)
app.add_typer(model_app, name="model")


class ExportFormat(str, enum.Enum):
    onnx = "onnx"
    tflite = "tflite"


@model_app.command("export")
def model_export(
    task: Annotated[Path, typer.Option(help="The task file (its [model] section).")],
    out: Annotated[Path, typer.Option(help="Where to write the exported model.")],
    fmt: Annotated[ExportFormat, typer.Option("--format", help="onnx or tflite.")] = (
        ExportFormat.onnx
    ),
    model: Annotated[Path | None, typer.Option(help="A .npz of the model's parameters.")] = None,
    store: Annotated[
        Path | None, typer.Option(help="A gateway's store (gateway.sqlite), with --hash.")
    ] = None,
    hash_: Annotated[
        str | None,
        typer.Option(
            "--hash", help="The global model's hash in --store, or a unique prefix (6+ digits)."
        ),
    ] = None,
    per_tensor: Annotated[
        bool, typer.Option(help="One int8 scale per tensor (default: per output channel).")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Export a global model (int8 weights) to ONNX or TFLite for on-device inference
    (onnxruntime or LiteRT; see edge_agent.Predictor)."""
    import numpy as np

    from fedcore import decode_tensors, export_model, load_task, model_hash
    from gateway import UpdateStore
    from ledger import MIN_HASH_PREFIX

    if (model is None) == (store is None) or (store is not None and not hash_):
        raise typer.BadParameter("give either --model, or --store with --hash")
    spec = load_task(task).model_spec()
    if model is not None:
        with np.load(model) as archive:
            params = {name: archive[name].astype(np.float32) for name in archive.files}
    else:
        db = UpdateStore.open_readonly(store)
        try:
            found = db.find_models(hash_.lower()) if len(hash_) >= MIN_HASH_PREFIX else []
            if len(found) > 1:
                shown = ", ".join(h[:16] for h in found)
                raise typer.BadParameter(
                    f"{hash_} is ambiguous in {store}: {shown}", param_hint="--hash"
                )
            payload = db.get_model(found[0]) if found else None
        finally:
            db.close()
        if payload is None:
            raise typer.BadParameter(
                f"no model in {store} starts with {hash_} (give at least {MIN_HASH_PREFIX} hex"
                " digits)",
                param_hint="--hash",
            )
        params = decode_tensors(payload)
    path = export_model(spec, params, out, fmt=fmt.value, per_channel=not per_tensor)
    result = {
        "changed": True,
        "format": fmt.value,
        "model_hash": model_hash(params),
        "path": str(path),
        "bytes": path.stat().st_size,
    }
    _report(
        result, as_json, f"exported {result['model_hash'][:12]} to {path} ({result['bytes']} bytes)"
    )


data_app = typer.Typer(
    help="Simulation data: split a data set across devices.", no_args_is_help=True
)
app.add_typer(data_app, name="data")


@data_app.command("split")
def data_split(
    out: Annotated[
        Path, typer.Option(help="Folder for device-NN/data.npz, holdout.npz, manifest.json.")
    ],
    devices: Annotated[int, typer.Option(min=1, help="Number of devices.")] = 10,
    alpha: Annotated[
        float | None,
        typer.Option(
            "--alpha",
            "--dirichlet",
            help="Non-IID: label shares per device ~ Dirichlet(ALPHA); small is skewed"
            " (--dirichlet is the old name).",
        ),
    ] = None,
    iid: Annotated[bool, typer.Option("--iid", help="IID: shuffle and deal out evenly.")] = False,
    dataset: Annotated[str, typer.Option(help="A bundled data set: breast_cancer or digits.")] = (
        "breast_cancer"
    ),
    csv: Annotated[
        Path | None, typer.Option(help="Split this CSV instead (label in the last column).")
    ] = None,
    holdout: Annotated[
        float, typer.Option(min=0.05, max=0.9, help="Share kept aside for the gateway.")
    ] = 0.2,
    seed: Annotated[int, typer.Option(help="Seeds the held-out split and the partition.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
) -> None:
    """Split a data set across simulated devices, IID or non-IID (Dirichlet over labels).

    Writes one data file per device (what `agent run` reads as its local data), a held-out
    file for the gateway's evaluation, and a manifest with counts and file digests.
    """
    from fedcore import load_local_data

    from ._datasets import (
        dirichlet_partition,
        iid_partition,
        load_dataset,
        split_dataset,
        write_split,
    )

    if (alpha is None) == (not iid):
        raise typer.BadParameter("give exactly one of --alpha ALPHA or --iid")
    if alpha is not None and alpha <= 0:
        raise typer.BadParameter("must be positive", param_hint="--alpha")
    try:
        if csv is not None:
            x, y = load_local_data(csv)
            data = split_dataset(csv.stem, x, y, test_fraction=holdout, seed=seed)
        else:
            data = load_dataset(dataset, test_fraction=holdout, seed=seed)
        if iid:
            parts = iid_partition(len(data.y_train), devices, seed=seed)
        else:
            parts = dirichlet_partition(data.y_train, devices, alpha=alpha, seed=seed)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    how = {"split": "iid"} if iid else {"split": "dirichlet", "alpha": alpha}
    manifest = write_split(out, data, parts, description={**how, "seed": seed})
    if as_json:
        sys.stdout.write(json.dumps(manifest, indent=2) + "\n")
        return
    from rich.table import Table

    kind = "IID" if iid else f"Dirichlet alpha={alpha}"
    table = Table(title=f"{data.name}: {kind} over {devices} devices, {len(data.y_test)} held out")
    for column in ("device", "samples", "labels"):
        table.add_column(column)
    for d in manifest["devices"]:
        table.add_row(d["device"], str(d["samples"]), " ".join(map(str, d["labels"])))
    console.print(table)
    console.print(f"wrote {out / 'manifest.json'}", highlight=False)


# ---------------------------------------------------------------- own federation
device_app = typer.Typer(
    help="The devices of a site made by 'fedledger init'.", no_args_is_help=True
)
app.add_typer(device_app, name="device")


@app.command("init")
def init(
    site: Annotated[Path, typer.Argument(help="The site folder to create (missing or empty).")],
    data: Annotated[
        Path,
        typer.Option("--data", help="The gateway's held-out CSV: a header row naming the columns."),
    ],
    label: Annotated[str, typer.Option("--label", help="The label column of --data.")],
    task_id: Annotated[str, typer.Option("--task-id", help="The task's id on the ledger.")] = (
        "my-task"
    ),
    model: Annotated[str, typer.Option(help="logreg or mlp.")] = "logreg",
    hidden: Annotated[int, typer.Option(min=1, help="Hidden units of the mlp.")] = 16,
    rounds: Annotated[int, typer.Option(min=1, help="Federated rounds.")] = 10,
    epochs: Annotated[int, typer.Option(min=1, help="Local epochs per round.")] = 5,
    batch_size: Annotated[int, typer.Option(min=1, help="Local batch size.")] = 16,
    lr: Annotated[float, typer.Option(min=1e-6, help="Local learning rate.")] = 0.1,
    codec: Annotated[str, typer.Option(help="Update codec (see 'fedledger demo --help').")] = (
        "int8"
    ),
    aggregation: Annotated[str, typer.Option(help="Aggregation rule, as for the demo.")] = (
        "fedavg"
    ),
    quorum: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Updates that close a round at its deadline (default: a majority of the devices).",
        ),
    ] = None,
    round_timeout: Annotated[
        float, typer.Option(min=0.1, help="Seconds a round stays open.")
    ] = 30.0,
    classes: Annotated[
        str | None,
        typer.Option(
            help="The label values in class order, comma-separated (default: whole numbers"
            " 0..max if every label is one, else the labels of --data sorted)."
        ),
    ] = None,
    broker: Annotated[
        str, typer.Option(metavar="HOST:PORT", help="The MQTT broker gateway and devices use.")
    ] = "127.0.0.1:1883",
    org: Annotated[str, typer.Option(help="The organisation (ledger MSP id).")] = "org1",
    secure: Annotated[
        bool,
        typer.Option(
            help="An organisation CA under SITE/pki: mutual TLS, certificate-signed and sealed"
            " updates (write the broker's config with 'fedledger broker config')."
        ),
    ] = False,
    seed: Annotated[int, typer.Option(help="Seeds the initial model.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Create a site from your own held-out CSV: task (feature statistics from --data only),
    gateway config, empty registry, the gateway's key and a device config template."""
    from fedcore import CODECS, parse_broker_address
    from gateway import AGGREGATION_RULES

    from ._site import SiteOptions, init_site

    if model not in ("logreg", "mlp"):
        raise typer.BadParameter("must be logreg or mlp", param_hint="--model")
    if codec not in CODECS:
        raise typer.BadParameter(f"must be one of {', '.join(CODECS)}", param_hint="--codec")
    if aggregation not in AGGREGATION_RULES:
        raise typer.BadParameter(
            f"must be one of {', '.join(AGGREGATION_RULES)}", param_hint="--aggregation"
        )
    host, port = parse_broker_address(broker)
    names = None
    if classes is not None:
        names = tuple(c.strip() for c in classes.split(",") if c.strip())
    options = SiteOptions(
        task_id=task_id, rounds=rounds, model=model, hidden=hidden, codec=codec, epochs=epochs,
        batch_size=batch_size, lr=lr, round_timeout=round_timeout, quorum=quorum,
        aggregation=aggregation, seed=seed, classes=names, broker_host=host, broker_port=port,
        org=org, secure=secure,
    )  # fmt: skip
    done = init_site(site, data, label, options)
    result = done.to_dict()
    counts = ", ".join(f"{k} {v}" for k, v in result["holdout_labels"].items())
    _report(
        result,
        as_json,
        f"site {result['site']}: task {result['task']} ({result['model']},"
        f" {result['features']} features, classes {counts} in {result['holdout_rows']}"
        f" held-out rows); next: fedledger device add {site} NAME --data DEVICE.csv",
    )


@device_app.command("add")
def device_add(
    site: Annotated[Path, typer.Argument(help="The site folder ('fedledger init').")],
    name: Annotated[str, typer.Argument(help="The device id.")],
    device_class: Annotated[
        str | None,
        typer.Option(
            "--class",
            help="Its board: a firmware_configs name (pi4, pi5, pi-zero-2w, arm64, or the file"
            " name) or a device class .toml; the task must fit it.",
        ),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help="The device's CSV (checked now against the task's columns and classes);"
            " default: data.csv in its folder.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Admit a device: its key (or certificate, on a --secure site), its registry entry and
    its agent config. An existing name is an error, never replaced."""
    from ._site import add_device

    done = add_device(site, name, device_class=device_class, data=data)
    _report(
        done.to_dict(),
        as_json,
        f"device {done.name} added ({done.device_class}): run 'fedledger agent run -c"
        f" {done.config}'",
    )


@ledger_app.command("register-fleet")
def ledger_register_fleet(
    site: Annotated[Path, typer.Option("--site", help="The site folder ('fedledger init').")],
    db: Annotated[
        Path | None, typer.Option("--db", help="Embedded ledger file (default: the site's).")
    ] = None,
    profile: Annotated[
        Path | None,
        typer.Option(help="Register on a Fabric network through this connection profile (TOML)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Register every device of the site's registry on the ledger, as the organisation's
    admin. Running it again changes nothing: devices already there are reported."""
    from ._site import AdminLedger, open_site

    with AdminLedger(open_site(site), db=db, profile=profile) as chain:
        results = chain.register_fleet()
        where = chain.where
    new = sum(r.status == "registered" for r in results)
    if as_json:
        out = {"ledger": where, "devices": [r.to_dict() for r in results], "changed": new > 0}
        sys.stdout.write(json.dumps(out, indent=2) + "\n")
        return
    for r in results:
        console.print(f"{r.what}: {r.status}", highlight=False)
    console.print(f"{new} registered, {len(results) - new} already registered on {where}")


@ledger_app.command("create-task")
def ledger_create_task(
    site: Annotated[Path, typer.Option("--site", help="The site folder ('fedledger init').")],
    db: Annotated[
        Path | None, typer.Option("--db", help="Embedded ledger file (default: the site's).")
    ] = None,
    profile: Annotated[
        Path | None,
        typer.Option(help="Create it on a Fabric network through this connection profile."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Declare the site's task and its initial model on the ledger, as the organisation's
    admin. Running it again changes nothing: a task already there is reported."""
    from ._site import AdminLedger, open_site

    with AdminLedger(open_site(site), db=db, profile=profile) as chain:
        result = chain.create_task()
        where = chain.where
    out = {**result.to_dict(), "ledger": where, "changed": result.status == "created"}
    _report(out, as_json, f"task {result.what}: {result.status} on {where}")


@data_app.command("sample-csv")
def data_sample_csv(
    out: Annotated[Path, typer.Option("--out", help="Folder for holdout.csv and device-N.csv.")],
    devices: Annotated[int, typer.Option(min=1, max=100, help="Device files to write.")] = 3,
    holdout: Annotated[
        float, typer.Option(min=0.05, max=0.9, help="Share kept for the gateway.")
    ] = 0.2,
    seed: Annotated[int, typer.Option(help="Seeds the split.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Write the bundled breast-cancer data as CSV files shaped like a hospital's export: a
    header row, named columns, a 'diagnosis' column of benign/malignant."""
    from ._sample import write_sample_csv

    result = write_sample_csv(out, devices=devices, holdout=holdout, seed=seed)
    _report(
        result,
        as_json,
        f"wrote {result['holdout']} ({result['holdout_rows']} rows) and {devices} device files"
        f" under {result['folder']}",
    )


# ---------------------------------------------------------------- config reference
config_app = typer.Typer(
    help="The configuration files and what their keys mean.", no_args_is_help=True
)
app.add_typer(config_app, name="config")


class ConfigFileName(str, enum.Enum):
    task = "task"
    gateway = "gateway"
    agent = "agent"
    registry = "registry"
    fabric_profile = "fabric-profile"
    device_class = "device-class"


@config_app.command("reference")
def config_reference(
    file: Annotated[
        ConfigFileName | None,
        typer.Option(
            "--file",
            help="Only this file (default: all of them).",
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Write the Markdown here instead of printing it (a file this command did not"
            " write is never replaced).",
        ),
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print the reference as JSON (with --out: the result of writing it).",
        ),
    ] = False,
) -> None:
    """Print every key of task.toml, gateway.toml, agent.toml, registry.json, a Fabric
    connection profile and the device classes (firmware_configs/*.toml): its section, type,
    allowed values, default and meaning, as the loaders' models declare them.

    docs/configuration.md is this command's output: `fedledger config reference --out
    docs/configuration.md` brings it up to date after a model changes.
    """
    from ._reference import as_data, render, select, write_reference

    files = select(None if file is None else [file.value])
    if out is None:
        if as_json:
            sys.stdout.write(json.dumps(as_data(files), indent=2) + "\n")
        else:
            sys.stdout.write(render(files))
        return
    changed = write_reference(out, render(files))
    result = {"path": str(out), "files": [f.file for f in files], "changed": changed}
    _report(result, as_json, f"{out}: {'written' if changed else 'up to date'}")


# ---------------------------------------------------------------- bench
@bench_app.command("aggregate")
def bench_aggregate(
    devices: Annotated[int, typer.Option(min=1, help="Updates to aggregate (N).")] = 100,
    params: Annotated[int, typer.Option(min=1000, help="Parameters per update (M).")] = 1_000_000,
    repeats: Annotated[int, typer.Option(min=1, help="Best of this many runs.")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
) -> None:
    """FedAvg of N updates of M parameters vs. reading N x M float32 once with NumPy."""
    from bench.aggregate import run

    _print_bench(run(devices=devices, params=params, repeats=repeats), as_json)


@bench_app.command("ingest")
def bench_ingest(
    messages: Annotated[int, typer.Option(min=10, help="Updates to send.")] = 2000,
    size: Annotated[int, typer.Option(min=256, help="Approximate update size in bytes.")] = 10_240,
    tls: Annotated[
        bool,
        typer.Option(
            "--tls",
            help="Also measure both rates over mutual TLS (temporary CA, TLS-only broker) and"
            " report the TLS cost (plain / TLS rate).",
        ),
    ] = False,
    secure: Annotated[
        bool,
        typer.Option(
            "--secure",
            help="Also send the same updates certificate-signed (ECDSA P-256) and sealed"
            " (X25519) through a gateway requiring both, and time the validator alone on"
            " each kind; report the cost (Ed25519 plain / secure rate).",
        ),
    ] = False,
    ledger_delay: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=30.0,
            help="Also run FedBuff rounds on a ledger this many seconds slow per round"
            " transaction (a Fabric block wait), anchored in the background and inline:"
            " ingest rate and close-to-next-model time beside the ledger as it is. 0 skips.",
        ),
    ] = 2.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
) -> None:
    """Signed updates per second through Mosquitto and the gateway into SQLite, beside the
    rate at which Mosquitto alone passes the same messages (both measured now)."""
    from bench.ingest import run

    figures = run(messages=messages, size=size, tls=tls, secure=secure, ledger_delay=ledger_delay)
    _print_bench(figures, as_json)


@bench_app.command("ledger")
def bench_ledger(
    batch: Annotated[
        int, typer.Option(min=1, max=1000, help="Update records per transaction.")
    ] = 100,
    rounds: Annotated[int, typer.Option(min=1, help="Rounds anchored for the rate.")] = 100,
    verify_records: Annotated[
        int, typer.Option(min=100, help="Records in the chain whose verification is timed.")
    ] = 1_000_000,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
) -> None:
    """Embedded ledger: update records anchored per second (vs. raw SQLite group commit in
    the same run) and the time to verify, and to replay, a chain of a million records."""
    from bench.ledger import run

    _print_bench(run(batch=batch, rounds=rounds, verify_records=verify_records), as_json)


@bench_app.command("accuracy")
def bench_accuracy(
    datasets: Annotated[
        str, typer.Option(help="Data sets, comma-separated: breast_cancer, digits.")
    ] = "breast_cancer,digits",
    devices: Annotated[int, typer.Option(min=1, help="Simulated devices.")] = 20,
    alpha: Annotated[
        float, typer.Option(min=0.001, help="Dirichlet concentration of the label split.")
    ] = 0.5,
    rounds: Annotated[int, typer.Option(min=1, help="Federated rounds.")] = 20,
    codecs: Annotated[
        str, typer.Option(help="Update codecs, comma-separated (f32 always runs: the reference).")
    ] = "f32,int8,int8-channel,int4,topk-f32,topk-int8",
    seed: Annotated[int, typer.Option(help="First seed.")] = 0,
    repeats: Annotated[int, typer.Option(min=1, help="Seeds averaged (seed, seed+1, ...).")] = 5,
    k_fraction: Annotated[
        float, typer.Option(min=1e-6, max=1.0, help="Share of each tensor top-k codecs keep.")
    ] = 0.01,
    quick: QuickFlag = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
) -> None:
    """Federated (Dirichlet split) vs. centralized training of the same model, per update
    codec: final accuracy, gaps in percentage points and uplink bytes against float32.
    Progress goes to stderr; --quick checks the set-up."""
    from bench.accuracy import run

    def _split(text: str) -> tuple[str, ...]:
        return tuple(part.strip() for part in text.split(",") if part.strip())

    chosen, kinds = _split(datasets), _split(codecs)
    if quick:
        chosen, kinds, rounds, repeats = chosen[:1], kinds[:2], min(rounds, 5), 1
    try:
        result = run(
            datasets=chosen, devices=devices, alpha=alpha, rounds=rounds,
            codecs=kinds, seed=seed, repeats=repeats, k_fraction=k_fraction,
        )  # fmt: skip
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    _print_bench({**result, "quick": quick}, as_json)


@bench_app.command("robustness")
def bench_robustness(
    rounds: Annotated[int, typer.Option(min=1, help="Federated rounds per simulation.")] = 30,
    devices: Annotated[int, typer.Option(min=4, help="Simulated devices, honest and not.")] = 20,
    repeats: Annotated[
        int, typer.Option(min=1, help="Simulations averaged per cell (seeds seed, seed + 1...).")
    ] = 3,
    seed: Annotated[int, typer.Option(help="First seed.")] = 0,
    dataset: Annotated[
        list[str] | None,
        typer.Option("--dataset", help="breast_cancer or digits; repeat for both (default)."),
    ] = None,
    quick: QuickFlag = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
) -> None:
    """Final accuracy of each aggregation rule under attack (sign flip, x100 scaling,
    Gaussian noise, label flip, constant, NaN, free riders) at 10%, 30% and 45% malicious
    devices, beside the same rule's clean run (all simulated in process). Several minutes;
    progress goes to stderr, --quick checks the set-up."""
    from bench.robustness import run

    datasets = tuple(dataset) if dataset else ("breast_cancer", "digits")
    extra = {}
    if quick:
        datasets, rounds, repeats = datasets[:1], min(rounds, 8), 1
        extra = {"fractions": (0.3,)}
    result = run(
        datasets=datasets, rounds=rounds, devices=devices, repeats=repeats, seed=seed, **extra
    )
    _print_bench({**result, "quick": quick}, as_json)


@bench_app.command("async")
def bench_async(
    repeats: Annotated[int, typer.Option(min=1, help="Seeds averaged (seed, seed + 1...).")] = 5,
    devices: Annotated[int, typer.Option(min=2, help="Simulated devices.")] = 20,
    buffer: Annotated[int, typer.Option(min=1, help="Updates per asynchronous version (K).")] = 5,
    max_staleness: Annotated[
        int, typer.Option(min=0, help="Versions an update may lag; more is refused.")
    ] = 20,
    seed: Annotated[int, typer.Option(help="First seed.")] = 0,
    dataset: Annotated[
        list[str] | None,
        typer.Option("--dataset", help="digits or breast_cancer; repeat for both (default)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
) -> None:
    """Virtual time to 95% of centralized accuracy with device speeds spread 10x: buffered
    asynchronous rounds (FedBuff) against synchronous ones (simulated in process)."""
    from bench.asynchronous import DATASETS, run

    result = run(
        datasets=tuple(dataset) if dataset else DATASETS, devices=devices, buffer=buffer,
        max_staleness=max_staleness, seed=seed, repeats=repeats,
    )  # fmt: skip
    _print_bench(result, as_json)


@bench_app.command("agent")
def bench_agent(
    rounds: Annotated[int, typer.Option(min=1, help="Local rounds the agent trains.")] = 5,
    model: Annotated[
        str, typer.Option(help="The model kind: logreg, mlp or cnn1d.", metavar="KIND")
    ] = "mlp",
    hidden: Annotated[
        int, typer.Option(min=1, help="Hidden units of the benchmark MLP (3300: 108,902 params).")
    ] = 3300,
    epochs: Annotated[int, typer.Option(min=1, help="Local epochs per round.")] = 2,
    launcher: Annotated[
        str | None,
        typer.Option(
            help="Start the agent through this command prefix, e.g. a systemd-nspawn into an "
            "arm64 userland; {dir} becomes the benchmark's folder, which it must bind at the "
            "same path. CPU times are then reported as emulated.",
            metavar="COMMAND",
        ),
    ] = None,
    python: Annotated[
        str | None,
        typer.Option(help="The interpreter that runs the agent (inside the launcher's system)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
) -> None:
    """A real `fedledger agent run` process training the benchmark model: idle and peak
    resident memory and CPU seconds per local round, against a Raspberry Pi budget and the
    memory budget of every device class in firmware_configs/."""
    from bench.agent import run
    from fedcore import MODEL_KINDS

    if model not in MODEL_KINDS:
        raise typer.BadParameter(f"must be one of {', '.join(MODEL_KINDS)}", param_hint="--model")
    if launcher is not None:
        import shlex
        import shutil

        try:
            words = shlex.split(launcher)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--launcher") from None
        if not words or shutil.which(words[0]) is None:
            raise typer.BadParameter(
                f"{words[0] if words else launcher!r} is not a command on PATH",
                param_hint="--launcher",
            )
    result = run(
        rounds=rounds, model=model, hidden=hidden, epochs=epochs, launcher=launcher, python=python
    )
    _print_bench(result, as_json)


@bench_app.command("soak")
def bench_soak(
    minutes: Annotated[
        float, typer.Option(min=0.05, max=1440, help="Soak length after the first round (0.5 ok).")
    ] = 10.0,
    devices: Annotated[
        int, typer.Option(min=1, max=50, help="Edge agents (threads, own MQTT clients).")
    ] = 3,
    round_timeout: Annotated[
        float, typer.Option(min=0.5, help="The task's round timeout in seconds (quorum = all).")
    ] = 10.0,
    plot: Annotated[
        Path | None,
        typer.Option("--plot", help="Write a PNG of CPU per round and RSS over time here."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
) -> None:
    """Many short rounds for N minutes through a real `fedledger gateway run` process: its
    CPU per round and resident memory in the first and the last slice, and their ratios
    (goal: flat within 5%). Progress goes to stderr."""
    from bench.soak import run

    _print_bench(
        run(minutes=minutes, devices=devices, round_timeout=round_timeout, plot=plot), as_json
    )


@bench_app.command("privacy")
def bench_privacy(
    devices: Annotated[int, typer.Option(min=2, help="Simulated devices (goal: >= 100).")] = 300,
    sampling: Annotated[
        float, typer.Option(min=0.001, max=1.0, help="Poisson sampling rate q per round.")
    ] = 0.1,
    rounds: Annotated[int, typer.Option(min=1, help="Federated rounds.")] = 60,
    noise: Annotated[
        list[float] | None,
        typer.Option("--noise", help="Noise multipliers z to try (repeatable).", min=0.01),
    ] = None,
    clip: Annotated[float, typer.Option(min=1e-6, help="L2 clip of each update.")] = 0.5,
    repeats: Annotated[int, typer.Option(min=1, help="Seeds averaged (seed, seed + 1...).")] = 3,
    seed: Annotated[int, typer.Option(help="First seed.")] = 0,
    dataset: Annotated[str, typer.Option(help="digits or breast_cancer.")] = "digits",
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Write a PNG of accuracy against epsilon.")
    ] = None,
    secagg: Annotated[
        bool,
        typer.Option(
            help="Also measure secure aggregation: upload bytes and round time against plain"
            " int8 at 10, 50 and 100 devices, and exact sums with 0, 10 and 30% dropouts."
        ),
    ] = True,
    quick: QuickFlag = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
) -> None:
    """Accuracy against epsilon of DP-FedAvg with Poisson-sampled devices (in process, the
    gateway's own DP aggregator and accountant), beside the same sampled run without DP and
    the epsilon the same noise costs without sampling. Goal: epsilon <= 8 at delta 1e-5
    with at most 3 pp loss. Then secure aggregation with the real gateway and agents over
    the in-process broker (bench/secagg.py): goals masked upload <= 2x int8 and round time
    <= 2x plain at 100 devices, and sums exact with dropouts. Progress goes to stderr."""
    from bench import secagg as secagg_bench
    from bench.privacy import plot as draw
    from bench.privacy import run

    if dataset not in ("digits", "breast_cancer"):
        raise typer.BadParameter("must be digits or breast_cancer", param_hint="--dataset")
    multipliers = tuple(noise or (0.7, 1.0, 1.3, 2.0))
    if quick:
        devices, rounds, repeats, multipliers = min(devices, 100), min(rounds, 10), 1, (1.0,)
    result = run(
        dataset=dataset, devices=devices, rate=sampling, rounds=rounds,
        noise_multipliers=multipliers, clip=clip, repeats=repeats, seed=seed,
    )  # fmt: skip
    result["quick"] = quick
    if secagg:
        sizes = (10, 20) if quick else (10, 50, 100)
        result["secagg"] = secagg_bench.run(devices=sizes, rounds=1 if quick else 2, seed=seed)
    if plot is not None:
        draw(result, plot)
        result["plot_path"] = str(plot)
    if not as_json:
        for row in (result.get("secagg") or {}).get("cost", []):
            console.print(
                f"secure aggregation, {row['devices']} devices: masked input"
                f" x{row['update_frame_ratio']} of an int8 update (x{row['upload_ratio']} with"
                f" the protocol's messages), round time x{row['time_ratio_parallel']} of plain",
                highlight=False,
            )
        for s in result["settings"]:
            console.print(
                f"z={s['noise_multiplier']}: accuracy {100 * s['accuracy']:.2f}%"
                f" ({s['loss_pp']:.2f} pp below no DP), epsilon {s['epsilon']:.2f}"
                f" ({s['epsilon_without_amplification']:.1f} without sampling)",
                highlight=False,
            )
        result = {k: v for k, v in result.items() if not isinstance(v, list)}
    _print_bench(result, as_json)


QuickFlag = Annotated[
    bool,
    typer.Option(
        "--quick",
        help="A short run (one data set, one seed, few rounds) to check the set-up in about a"
        " minute; its figures are marked quick and are not the benchmark's.",
    ),
]


def _print_bench(result: dict, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
        return
    from rich.table import Table

    table = Table(title=result.get("bench", "bench"), show_header=True)
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in result.items():
        if isinstance(value, dict):
            continue
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    console.print(table)


def main() -> None:
    from ._command import run

    sys.exit(run(app))
