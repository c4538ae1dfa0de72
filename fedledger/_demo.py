"""``fedledger demo``: a whole federation on one machine, every part real.

A private Mosquitto, a gateway with its store and embedded ledger, and N agents, each a
separate process (``fedledger agent run``) with its own key, MQTT identity and data.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedcore import BrokerSection, accuracy, atomic_write_text, init_params, load_task, train
from fedcore.mosquitto import MosquittoBroker, SecureBrokerFiles, free_port
from fedcore.pki import ca_cert_path, crl_path
from gateway import RoundResult, UpdateStore, load_gateway_config, open_gateway
from ledger import EmbeddedLedger, Identity, privacy_report

from ._datasets import load_dataset
from ._provision import Layout, TaskOptions, provision

log = logging.getLogger(__name__)

AUDITOR = Identity(msp_id="org1", subject="demo", role="auditor")


@dataclass(frozen=True)
class DemoOptions:
    devices: int = 10
    rounds: int = 10
    seed: int = 0
    alpha: float = 0.5
    workdir: Path = Path("fedledger-demo")
    json_path: Path | None = None
    plot: bool = True
    agents: str = "process"  # or "thread": agents inside this process (faster start)
    secure: bool = False  # mutual TLS with an organisation CA and a per-device ACL
    task: TaskOptions = field(default_factory=TaskOptions)


def centralized_accuracy(layout: Layout, dataset) -> float:
    """The same model and recipe trained on the pooled data: the bar federation aims for."""
    task = load_task(layout.task)
    spec = task.model_spec()
    t = task.training
    params = train(
        spec, init_params(spec), dataset.x_train, dataset.y_train,
        epochs=t.epochs * task.rounds, batch_size=t.batch_size, lr=t.lr, seed=0,
    )  # fmt: skip
    return accuracy(spec, params, dataset.x_test, dataset.y_test)


class LocalAgents:
    """The demo's edge devices: separate processes, or threads for quick runs."""

    def __init__(self, layout: Layout, mode: str):
        self.layout = layout
        self.mode = mode
        self._procs: list[subprocess.Popen[bytes]] = []
        self._threads: list[Any] = []
        self._stop = None

    def start(self) -> None:
        if self.mode == "process":
            logs = self.layout.root / "logs"
            logs.mkdir(exist_ok=True)
            # The demo's agents use the demo's own broker, whatever the environment says.
            env = {k: v for k, v in os.environ.items() if k != BrokerSection.ENV}
            for device, config in self.layout.agent_configs.items():
                with (logs / f"{device}.log").open("wb") as out:
                    self._procs.append(
                        subprocess.Popen(
                            [
                                sys.executable,
                                "-m",
                                "fedledger",
                                "agent",
                                "run",
                                "--config",
                                str(config),
                            ],
                            stdout=out,
                            stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL,
                            env=env,
                        )
                    )
            return
        import threading

        from edge_agent import load_agent_config, open_agent

        self._stop = threading.Event()
        for config in self.layout.agent_configs.values():
            agent = open_agent(load_agent_config(config), source=str(config))
            agent.start()
            thread = threading.Thread(target=agent.run, args=(self._stop,), daemon=True)
            thread.start()
            self._threads.append((agent, thread))

    def stop(self, grace: float = 10.0) -> None:
        end = time.monotonic() + grace
        for proc in self._procs:
            try:
                proc.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for agent, thread in self._threads:
            thread.join(max(0.1, end - time.monotonic()))
            if self._stop is not None:
                self._stop.set()
            agent.transport.stop()


def run_demo(
    options: DemoOptions,
    *,
    on_round: Callable[[RoundResult], None] | None = None,
    on_status: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the whole federation; return the report (also written as JSON)."""
    status = on_status or (lambda _msg: None)
    started = time.monotonic()
    dataset = load_dataset(seed=options.seed)
    root = options.workdir.resolve()
    host, port = "127.0.0.1", free_port()
    layout = provision(
        root,
        dataset,
        devices=options.devices,
        alpha=options.alpha,
        seed=options.seed,
        options=TaskOptions(**{**options.task.__dict__, "rounds": options.rounds}),
        broker_host=host,
        broker_port=port,
        secure=options.secure,
    )
    status(f"provisioned {options.devices} devices under {root}")
    log_handler = logging.FileHandler(root / "demo.log")
    log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(log_handler)
    secure = None
    if layout.pki is not None:
        secure = SecureBrokerFiles(
            ca=ca_cert_path(layout.pki),
            server_cert=layout.pki / "brokers" / "broker.pem",
            server_key=layout.pki / "brokers" / "broker.key",
            devices=sorted(layout.agent_configs),
            gateways=["gateway"],
            tasks=[options.task.task_id],
            crl=crl_path(layout.pki),
        )
    with MosquittoBroker(host=host, port=port, secure=secure) as broker:
        tls = " (mutual TLS, per-device ACL)" if secure else ""
        status(f"Mosquitto listening on {broker.host}:{broker.port}{tls}")
        gateway = open_gateway(load_gateway_config(layout.gateway_config), on_round=on_round)
        agents = LocalAgents(layout, options.agents)
        grace = 0.0  # on an error or Ctrl-C, stop the agents at once
        try:
            gateway.connect()
            agents.start()
            status(
                f"starting {options.devices} agents ({options.agents}es)".replace(
                    "threades", "threads"
                )
            )
            online = gateway.wait_for_devices(60.0)
            status(f"{online} of {options.devices} devices online; training")
            gateway.start()
            results = gateway.run()
            grace = 10.0  # they leave by themselves once the final model is out
        finally:
            agents.stop(grace=grace)
            gateway.close()
    store = UpdateStore.open_readonly(layout.store)
    try:
        with EmbeddedLedger.open_readonly(layout.ledger) as chain:
            verify = chain.verify(public_key=layout.gateway_public_key, replay=True, store=store)
    finally:
        store.close()
    privacy = None
    if options.task.dp is not None:
        with EmbeddedLedger.open_readonly(layout.ledger) as chain:
            privacy = privacy_report(chain, options.task.task_id, identity=AUDITOR)
    central = centralized_accuracy(layout, dataset)
    final = results[-1].accuracy if results else None
    report: dict[str, Any] = {
        "task": options.task.task_id,
        "dataset": dataset.name,
        "devices": options.devices,
        "alpha": options.alpha,
        "seed": options.seed,
        "codec": options.task.codec,
        "model": options.task.model,
        "aggregation": options.task.aggregation,
        "secure": options.secure,
        "privacy": privacy,
        "secure_aggregation": options.task.secagg is not None,
        "device_samples": layout.device_samples,
        "device_labels": layout.device_labels,
        "rounds": [
            {
                "round": r.round,
                "accuracy": r.accuracy,
                "clinical": r.clinical,
                "participants": r.participants,
                "samples": r.samples,
                "bytes_received": r.bytes_received,
                "rejected": r.rejected,
                "rejected_by_reason": r.rejected_by_reason,
                "duration_s": round(r.duration_s, 4),
                "model_hash": r.model_hash,
                "ledgered": r.ledgered,
            }
            for r in results
        ],
        "final_accuracy": final,
        "final_clinical": results[-1].clinical if results else None,
        "centralized_accuracy": central,
        "gap_pp": None if final is None else round(100 * (central - final), 3),
        "final_model": results[-1].model_hash if results else None,
        "ledger_verified": verify.ok,
        "ledger_blocks": verify.blocks,
        "ledger_problem": verify.problem,
        "ledger_checked_models": verify.checked_models,
        "ledger_checked_updates": verify.checked_updates,
        "ledger_checked_aggregates": verify.checked_aggregates,
        "ledger_path": str(layout.ledger),
        "gateway_public_key": layout.gateway_public_key,
        "workdir": str(root),
        "duration_s": round(time.monotonic() - started, 3),
    }
    json_path = (options.json_path or root / "report.json").resolve()
    json_path.parent.mkdir(parents=True, exist_ok=True)
    if options.plot:
        report["plot_path"] = str(write_plot(report, json_path.with_suffix(".png")))
    report["report_path"] = str(json_path)
    atomic_write_text(json_path, json.dumps(report, indent=2) + "\n")
    logging.getLogger().removeHandler(log_handler)
    log_handler.close()
    return report


def plot_title(report: dict[str, Any]) -> str:
    """What was run, as the plot's title: data set, model, rule, codec and the split."""
    return (
        f"{report['dataset']} · {report['model']} · {report.get('aggregation', 'fedavg')}"
        f" · {report['codec']} updates · {report['devices']} devices,"
        f" Dirichlet α={report['alpha']}, seed {report['seed']}"
    )


def write_plot(report: dict[str, Any], path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig = report_figure(report)
    fig.savefig(path)
    plt.close(fig)
    return path


def report_figure(report: dict[str, Any]):
    """Two panels: held-out accuracy (and balanced accuracy) per round against the same model
    trained centrally, with the privacy spent when the task has a budget; and what each
    device brought, its samples by class (the non-IID split the rounds had to overcome).
    Legends sit outside the data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax, share) = plt.subplots(
        1, 2, figsize=(12, 4.8), dpi=110, gridspec_kw={"width_ratios": [3, 2]}
    )
    fig.suptitle(plot_title(report), fontsize=10)
    rounds = [r["round"] for r in report["rounds"]]
    accs = [100 * (r["accuracy"] or 0.0) for r in report["rounds"]]
    ax.plot(rounds, accs, marker="o", label="federated accuracy")
    balanced = [(r.get("clinical") or {}).get("balanced_accuracy") for r in report["rounds"]]
    if rounds and all(b is not None for b in balanced):
        ax.plot(rounds, [100 * b for b in balanced], marker=".", label="balanced accuracy")
    ax.axhline(
        100 * report["centralized_accuracy"], color="grey", linestyle="--", label="centralized"
    )
    ax.set_xlabel("round")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("the global model per round", fontsize=9)
    ax.set_xticks(rounds if len(rounds) <= 20 else rounds[:: max(len(rounds) // 10, 1)])
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    privacy = report.get("privacy")
    if privacy is not None and privacy["rounds"]:
        # the privacy spent, on its own axis: what each round of accuracy cost
        spent = ax.twinx()
        spent.plot(
            [r["round"] for r in privacy["rounds"]],
            [r["epsilon"] for r in privacy["rounds"]],
            color="tab:red", marker=".", label="epsilon spent",
        )  # fmt: skip
        spent.axhline(privacy["budget_epsilon"], color="tab:red", linestyle=":", label="budget")
        spent.set_ylim(0, 1.25 * privacy["budget_epsilon"])
        spent.set_ylabel(f"epsilon at delta {privacy['dp']['target_delta']:g}")
        more_h, more_l = spent.get_legend_handles_labels()
        handles, labels = handles + more_h, labels + more_l
    ax.legend(
        handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, fontsize=8,
        frameon=False,
    )  # fmt: skip
    devices = sorted(report.get("device_labels") or {})
    if devices:
        counts = np.array([report["device_labels"][d] for d in devices], dtype=float)
        left = np.zeros(len(devices))
        for k in range(counts.shape[1]):
            share.barh(devices, counts[:, k], left=left, label=f"class {k}")
            left += counts[:, k]
        share.invert_yaxis()
        share.set_xlabel("training samples")
        share.set_title("each device's data, by class", fontsize=9)
        share.tick_params(axis="y", labelsize=7 if len(devices) <= 30 else 5)
        share.legend(
            loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=min(counts.shape[1], 5),
            fontsize=8, frameon=False,
        )  # fmt: skip
    else:
        share.set_axis_off()
    fig.tight_layout()
    return fig
