"""Secure aggregation's cost and exactness: the real gateway and real edge agents (their
keys, signatures, stage messages, masks and unmasking) over the in-process broker, beside
the same fleet running plain int8 rounds.

For each fleet size: the bytes each device uploads per round (every message it signs: keys,
shares, masked input and reveal, against the one int8 update), the masked input's payload
bytes per parameter against int8's, and the round time. All devices run in this one
process, one after the other, so two round times are reported: ``sequential_s`` (the whole
round's CPU, every device's and the gateway's, in turn) and ``parallel_s``, what a fleet
computing side by side waits for: per stage, the slowest device's step, plus the gateway's
(network round trips, a few per stage on a LAN, are not in either, nor is the in-process
broker's routing, which a real broker does in its own process).

Exactness: with 0 %, 10 % and 30 % of the devices gone after their shares were relayed
(they never send a masked input), the unmasked sum must equal the sum of the survivors'
quantized updates (captured on the devices before masking) bit for bit.
"""

from __future__ import annotations

import functools
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedcore import (
    InMemoryBroker,
    TaskSpec,
    generate_key,
    public_key_b64,
    signer_from_key,
)
from fedcore import secagg as sa

from .accuracy import _load

#: Goals (issue 14): upload <= 2x int8 at 100 devices, round time <= 2x plain.
GOAL_BYTES_RATIO = 2.0
GOAL_TIME_RATIO = 2.0
HIDDEN = 32


def _progress(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


class _Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def _task(data, *, secagg: bool, rounds: int) -> TaskSpec:
    terms: dict[str, Any] = {
        "id": "secagg-bench" if secagg else "plain-bench",
        "rounds": rounds,
        "round_timeout": 60.0,
        "codec": "int8",
        "model": {
            "kind": "mlp",
            "n_features": int(data.x_train.shape[1]),
            "n_classes": data.n_classes,
            "hidden": HIDDEN,
            "feature_mean": [float(v) for v in data.x_test.mean(axis=0)],
            "feature_scale": [float(v) for v in np.maximum(data.x_test.std(axis=0), 1.0)],
        },
        # the accuracy bench's local training of digits (bench.accuracy.RECIPES)
        "training": {"epochs": 5, "batch_size": 16, "lr": 0.2},
    }
    if secagg:
        terms["secagg"] = {"clip": 2.0, "stage_timeout": 30.0}
    return TaskSpec.model_validate(terms)


class _Fleet:
    """A gateway and ``n`` agents on one in-process broker, in a directory it made."""

    def __init__(self, task: TaskSpec, data, n: int, workdir: Path):
        from edge_agent import EdgeAgent
        from gateway import DeviceRegistry, Gateway, UpdateStore
        from ledger import EmbeddedLedger, Identity

        keys = {f"dev-{i:03d}": generate_key() for i in range(n)}
        gateway_key = generate_key()
        broker = InMemoryBroker()
        # The in-process broker routes each message inside the sender's publish call, which
        # a real broker does in its own process: that time is taken out of the figures.
        self.routing = 0.0
        route = broker._route

        def timed_route(message):
            started = time.perf_counter()
            try:
                route(message)
            finally:
                self.routing += time.perf_counter() - started

        broker._route = timed_route  # type: ignore[method-assign]
        self.clock = _Clock()
        signer = signer_from_key(gateway_key)
        self.gateway = Gateway(
            task=task,
            transport=broker.transport(),
            store=UpdateStore(workdir / "store.sqlite"),
            ledger=EmbeddedLedger(
                workdir / "ledger.sqlite", signer=signer, public_key=public_key_b64(gateway_key)
            ),
            registry=DeviceRegistry({d: public_key_b64(k) for d, k in keys.items()}),
            signer=signer,
            evaluation=None,
            max_message_bytes=1 << 20,
            clock=self.clock,
            admin=Identity(msp_id="org1", subject="admin", role="admin"),
        )
        self.agents = []
        for i, (device, key) in enumerate(keys.items()):
            idx = np.arange(i, len(data.y_train), n)
            agent = EdgeAgent(
                device=device, task=task, transport=broker.transport(),
                signer=signer_from_key(key), gateway_key=gateway_key.public_key(),
                data=(data.x_train[idx], data.y_train[idx]),
            )  # fmt: skip
            agent.start()
            self.agents.append(agent)
        self.gateway.connect()
        self.sequential = 0.0
        self.parallel = 0.0
        self.gateway_s = 0.0
        self.device_s: dict[str, float] = {}
        self.quantized: dict[str, np.ndarray] = {}
        self.aggregators: list = []
        protocol = self.gateway.protocol
        if hasattr(protocol, "_aggregator"):
            make = protocol.aggregator

            def remember(*args, **kwargs):
                aggregator = make(*args, **kwargs)
                self.aggregators.append(aggregator)
                return aggregator

            protocol.aggregator = remember  # type: ignore[method-assign]

    def _timed(self, call) -> float:
        """Seconds ``call`` took, less the broker's routing inside it."""
        routed, started = self.routing, time.perf_counter()
        call()
        return time.perf_counter() - started - (self.routing - routed)

    def pump(self, agents) -> None:
        slowest = 0.0
        for agent in agents:
            took = self._timed(functools.partial(agent.step, 0))
            slowest = max(slowest, took)
            self.sequential += took
            self.device_s[agent.device] = self.device_s.get(agent.device, 0.0) + took
            session = agent.secagg
            if session is not None and session.stage == "keys":
                self.quantized[agent.device] = session.quantized.copy()
        took = self._timed(lambda: self.gateway.step(0))
        self.sequential += took
        self.gateway_s += took
        self.parallel += slowest + took

    def close(self) -> None:
        self.gateway.close()


def _rounds(fleet: _Fleet, rounds: int, limit: int = 60) -> None:
    fleet.gateway.start()
    for _ in range(limit):
        if len(fleet.gateway.results) >= rounds:
            return
        fleet.pump(fleet.agents)
    raise RuntimeError(f"{rounds} rounds did not close in {limit} steps")


def _cost(data, n: int, rounds: int, root: Path) -> dict[str, Any]:
    row: dict[str, Any] = {"devices": n}
    for kind in ("plain", "secagg"):
        task = _task(data, secagg=kind == "secagg", rounds=rounds)
        workdir = root / f"{kind}-{n}"
        workdir.mkdir()
        fleet = _Fleet(task, data, n, workdir)
        try:
            _rounds(fleet, rounds)
            sent = sum(a.bytes_sent for a in fleet.agents) / (n * rounds)
            frames = [len(a.state.pending) for a in fleet.agents if a.state.pending]
            row[kind] = {
                "upload_bytes_per_device": round(sent, 1),
                # the update (plain: int8; secagg: the masked input), signed frame and all
                "update_frame_bytes": round(float(np.mean(frames)), 1),
                "sequential_s": round(fleet.sequential / rounds, 4),
                "parallel_s": round(fleet.parallel / rounds, 4),
                "gateway_cpu_s": round(fleet.gateway_s / rounds, 4),
                "device_cpu_s_max": round(max(fleet.device_s.values()) / rounds, 4),
                "device_cpu_s_mean": round(sum(fleet.device_s.values()) / (n * rounds), 4),
            }
        finally:
            fleet.close()
    params = task.model_spec().n_params()
    bits = sa.modulus_bits(n)
    row["parameters"] = params
    row["bits"] = bits
    row["k"] = sa.default_neighbours(n)
    int8_payload = params + 4 * len(task.model_spec().shapes())  # values and a scale each
    row["masked_payload_ratio"] = round(sa.packed_size(params, bits) / int8_payload, 3)
    row["update_frame_ratio"] = round(
        row["secagg"]["update_frame_bytes"] / row["plain"]["update_frame_bytes"], 3
    )
    row["upload_ratio"] = round(
        row["secagg"]["upload_bytes_per_device"] / row["plain"]["upload_bytes_per_device"], 3
    )
    row["time_ratio_parallel"] = round(row["secagg"]["parallel_s"] / row["plain"]["parallel_s"], 3)
    row["time_ratio_sequential"] = round(
        row["secagg"]["sequential_s"] / row["plain"]["sequential_s"], 3
    )
    return row


def _exactness(data, n: int, fraction: float, root: Path) -> dict[str, Any]:
    task = _task(data, secagg=True, rounds=1)
    workdir = root / f"drop-{n}-{fraction}"
    workdir.mkdir()
    fleet = _Fleet(task, data, n, workdir)
    gone = {a.device for a in fleet.agents[: round(fraction * n)]}
    try:
        fleet.gateway.start()
        protocol = fleet.gateway.protocol
        for _ in range(20):
            fleet.pump(fleet.agents)
            if protocol._stage == "masked":
                break
        live = [a for a in fleet.agents if a.device not in gone]
        for _ in range(40):
            if fleet.gateway.results:
                break
            fleet.pump(live)
            if protocol._stage == "masked" and gone:
                fleet.clock.now += task.secagg.stage_timeout + 1  # the dropouts' timeout
        if not fleet.gateway.results:
            raise RuntimeError(f"the round with {len(gone)} dropouts did not close")
        plain = next(a.plain for a in fleet.aggregators if a.plain is not None)
        expected = sum(q for d, q in fleet.quantized.items() if d not in gone)
        return {
            "devices": n,
            "dropout": fraction,
            "dropped": len(gone),
            "participants": fleet.gateway.results[0].participants,
            "exact": bool(np.array_equal(plain, expected)),
        }
    finally:
        fleet.close()


def run(
    *,
    devices: Sequence[int] = (10, 50, 100),
    dropouts: Sequence[float] = (0.0, 0.1, 0.3),
    rounds: int = 2,
    seed: int = 0,
) -> dict[str, Any]:
    """Cost per fleet size and exactness per dropout rate (see the module doc)."""
    if not devices or min(devices) < 3 or rounds < 1:
        raise ValueError("at least 3 devices and 1 round are required")
    from threadpoolctl import threadpool_limits

    data = _load("digits", seed)
    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="fedledger-secagg-bench-"))
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            cost = []
            for n in devices:
                cost.append(_cost(data, n, rounds, root))
                c = cost[-1]
                _progress(
                    f"[secagg] {n} devices: upload x{c['upload_ratio']} of int8"
                    f" (masked payload x{c['masked_payload_ratio']}), round time"
                    f" x{c['time_ratio_parallel']} in parallel"
                )
            exact = []
            for fraction in dropouts:
                exact.append(_exactness(data, max(devices), fraction, root))
                _progress(
                    f"[secagg] {max(devices)} devices, {exact[-1]['dropped']} dropped after"
                    f" sharing: exact {exact[-1]['exact']}"
                )
    finally:
        shutil.rmtree(root)  # made above, by this run
    largest = max(cost, key=lambda c: c["devices"])
    return {
        "model": f"mlp ({HIDDEN} hidden) on digits",
        "rounds": rounds,
        "cost": cost,
        "exactness": exact,
        "goal": f"masked upload <= {GOAL_BYTES_RATIO}x int8 and round time <="
        f" {GOAL_TIME_RATIO}x plain at {largest['devices']} devices; exact sums",
        "goal_met": bool(
            largest["masked_payload_ratio"] <= GOAL_BYTES_RATIO
            and largest["time_ratio_parallel"] <= GOAL_TIME_RATIO
            and all(e["exact"] for e in exact)
        ),
        "duration_s": round(time.perf_counter() - started, 1),
    }
