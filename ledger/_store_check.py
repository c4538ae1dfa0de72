"""The ledger and the gateway's store, cross-checked in both directions.

A chain can verify perfectly and still not be the whole story: a round the gateway closed
but never anchored, an accepted update the round's record leaves out, or a round on the
ledger the store knows nothing of. Both backends feed the check the same thing, the writes
of every valid transaction in chain order (the ledger's own record of each round and of each
batch of update decisions), so one check serves the embedded ledger and Fabric:

- ledger -> store: a committed round must be closed in the store on the same base and new
  model, its global model stored (and hashing to its name), each accepted update stored
  with the digest the ledger records; an open round must be in the store;
- store -> ledger: each closed round must be committed on the ledger, each update the store
  accepted for it must be an accepted update of that round on the ledger (or recorded there
  as rejected with its digest: a device revoked while its round was open is dropped so);
- secure aggregation: a round's recorded aggregate hash must be what unmasking the stored
  masked sum with the stored revealed shares gives (and, where the masked inputs are not
  sealed to the gateway, the stored inputs must sum to that masked sum).

Reads are per round: a round's batches are held from its opening to its commit, then
compared with that round's rows in the store and dropped; the store's closed rounds are
streamed once at the end. Every discrepancy is collected (not only the first).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from fedcore import sha256_hex

#: The kinds of :class:`Discrepancy`, in the order the CLI's help lists them.
DISCREPANCY_KINDS = (
    "round_missing_in_ledger",
    "round_missing_in_store",
    "model_differs",
    "model_missing_in_store",
    "update_missing_in_ledger",
    "update_missing_in_store",
    "update_differs",
    "aggregate_differs",
)


@dataclass(frozen=True, slots=True)
class Discrepancy:
    """One way the ledger and the store disagree; ``counter`` is the device's update
    counter where the store holds the update (the ledger records digests, not counters),
    ``height`` the ledger block that recorded the round's commit, where there is one."""

    kind: str
    task: str
    round: int
    device: str | None = None
    counter: int | None = None
    height: int | None = None
    detail: str = ""

    def describe(self) -> str:
        where = f"round {self.round} of task {self.task}"
        if self.device is not None:
            who = f"update of {self.device}"
            if self.counter is not None:
                who += f" (counter {self.counter})"
            where = f"{who} in {where}"
        return f"{where}: {self.detail}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "task": self.task,
            "round": self.round,
            "device": self.device,
            "counter": self.counter,
            "height": self.height,
            "detail": self.detail,
        }


class StoreRound(Protocol):
    round: int
    base_hash: str
    status: str
    new_hash: str | None
    ledgered: bool


class StoreUpdate(Protocol):
    device: str
    counter: int
    frame: bytes


class GatewayStore(Protocol):
    """What the check reads from a gateway's store (``gateway.UpdateStore`` opened
    read-only)."""

    def tasks(self) -> list[str]: ...

    def round(self, task: str, round_: int) -> StoreRound | None: ...

    def closed_rounds(self) -> Iterator[tuple[str, int, bool]]: ...

    def updates(self, task: str, round_: int) -> list[Any]: ...

    def get_model(self, model_hash: str) -> bytes | None: ...


@dataclass
class _LedgerRound:
    base_model: str | None = None
    accepted: dict[str, str] = field(default_factory=dict)  # device -> digest
    rejected: set[tuple[str | None, str]] = field(default_factory=set)  # (device, digest)
    batches: set[int] = field(default_factory=set)


class StoreCheck:
    """Fed with each valid transaction's writes in chain order (:meth:`writes`), then
    :meth:`finish`; ``discrepancies`` lists what disagrees, sorted by task and round.

    ``all_tasks``: check every task on the ledger (an embedded ledger is one gateway's); else
    only the tasks the store holds rounds of (a Fabric channel may carry other gateways').
    """

    def __init__(self, store: GatewayStore, *, all_tasks: bool = True):
        self.store = store
        self._store_tasks = set(store.tasks())
        self._all_tasks = all_tasks or not self._store_tasks
        self._open: dict[tuple[str, int], _LedgerRound] = {}
        #: Rounds the ledger holds, open or committed (ints per task: small).
        self._on_ledger: dict[str, set[int]] = {}
        self.found: list[Discrepancy] = []
        self.checked_models = 0
        self.checked_updates = 0
        self.checked_aggregates = 0

    @property
    def discrepancies(self) -> list[Discrepancy]:
        return sorted(self.found, key=lambda d: (d.task, d.round, d.device or ""))

    def _in_scope(self, task: str) -> bool:
        return self._all_tasks or task in self._store_tasks

    def _add(self, kind: str, task: str, round_: int, detail: str, **more: Any) -> None:
        self.found.append(Discrepancy(kind, task, round_, detail=detail, **more))

    # ------------------------------------------------------------------ ledger side
    def writes(self, height: int, writes: Iterable[tuple[str, bytes | str]]) -> None:
        """One valid transaction's writes (``key -> canonical JSON``)."""
        for key, value in writes:
            kind = key.split("/", 1)[0]
            if kind not in ("round", "updates"):
                continue
            try:
                record = json.loads(value)
                task, round_ = record["task"], int(record["round"])
            except (ValueError, TypeError, KeyError):
                continue  # malformed records are the chain checks' business
            if not self._in_scope(task):
                continue
            current = self._open.setdefault((task, round_), _LedgerRound())
            self._on_ledger.setdefault(task, set()).add(round_)
            if kind == "updates":
                self._batch(current, record)
            else:
                current.base_model = record.get("base_model")
                if record.get("status") == "committed":
                    del self._open[(task, round_)]
                    self._committed(height, task, round_, current, record)

    @staticmethod
    def _batch(current: _LedgerRound, batch: dict[str, Any]) -> None:
        if batch.get("batch") in current.batches:
            return  # a batch is written once; a second write is the chain checks' business
        current.batches.add(batch.get("batch"))
        for item in batch.get("records") or []:
            if item.get("accepted"):
                current.accepted[item["device"]] = item["digest"]
            else:
                current.rejected.add((item.get("device"), item.get("digest")))

    def _committed(
        self, height: int, task: str, round_: int, ledger: _LedgerRound, record: dict[str, Any]
    ) -> None:
        """Compare one committed round with the store's rows of that round."""
        stored = self.store.round(task, round_)
        if stored is None or stored.status != "closed":
            held = "not in the store" if stored is None else "still open in the store"
            self._add(
                "round_missing_in_store", task, round_,
                f"committed on the ledger (block {height}) but {held}", height=height,
            )  # fmt: skip
            return
        model = record.get("global_model")
        if stored.new_hash != model:
            self._add(
                "model_differs", task, round_,
                f"the ledger's model is {str(model)[:16]}, the store's {str(stored.new_hash)[:16]}",
                height=height,
            )  # fmt: skip
        elif stored.base_hash != ledger.base_model:
            self._add(
                "model_differs", task, round_,
                f"the ledger's base model is {str(ledger.base_model)[:16]},"
                f" the store's {stored.base_hash[:16]}",
                height=height,
            )  # fmt: skip
        payload = self.store.get_model(model) if isinstance(model, str) else None
        if payload is None:
            self._add(
                "model_missing_in_store", task, round_,
                f"global model {str(model)[:16]} is not in the store", height=height,
            )  # fmt: skip
        elif sha256_hex(payload) != model:
            self._add(
                "model_missing_in_store", task, round_,
                f"the stored model {model[:16]} does not hash to its name", height=height,
            )  # fmt: skip
        else:
            self.checked_models += 1
        by_device = {u.device: u for u in self.store.updates(task, round_)}
        for device, digest in sorted(ledger.accepted.items()):
            update = by_device.pop(device, None)
            if update is None:
                self._add(
                    "update_missing_in_store", task, round_,
                    "accepted on the ledger but not in the store", device=device, height=height,
                )  # fmt: skip
            elif hashlib.sha256(update.frame).hexdigest() != digest:
                self._add(
                    "update_differs", task, round_,
                    f"the stored update does not match the digest {digest[:16]} on the ledger",
                    device=device, counter=update.counter, height=height,
                )  # fmt: skip
            else:
                self.checked_updates += 1
        aggregate = record.get("aggregate_sha256")
        if aggregate is not None:
            updates = [u for u in self.store.updates(task, round_) if u.device in ledger.accepted]
            self._aggregate(height, task, round_, stored.base_hash, aggregate, updates, ledger)
        for device, update in sorted(by_device.items()):
            digest = hashlib.sha256(update.frame).hexdigest()
            if (device, digest) in ledger.rejected:
                continue  # dropped from the round (revoked while it was open), as recorded
            self._add(
                "update_missing_in_ledger", task, round_,
                "accepted in the store but not in the round's record on the ledger",
                device=device, counter=update.counter, height=height,
            )  # fmt: skip

    def _aggregate(
        self, height: int, task: str, round_: int, base: str, recorded: str, updates: list,
        ledger: _LedgerRound,
    ) -> None:  # fmt: skip
        """Unmask a secure aggregation round again from the store and compare."""
        from fedcore import decode_envelope, iter_tensors
        from fedcore.secagg import SecAggError, recompute_aggregate

        messages = getattr(self.store, "secagg_messages", None)
        rows = [] if messages is None else messages(task, round_)
        decisions = {stage: json.loads(frame) for stage, device, _c, frame in rows if not device}
        masked: list | None = []
        for update in updates:
            envelope = decode_envelope(update.frame, max_bytes=len(update.frame))
            if getattr(envelope.header, "enc", ""):
                masked = None  # sealed to the gateway: the masked sum is taken as stored
                break
            views = iter_tensors(envelope.payload, max_elements=1 << 26)
            assert masked is not None
            masked.append(np.concatenate([v.data for v in views]))
        try:
            digest, problems = recompute_aggregate(task, round_, base, decisions, masked)
        except (SecAggError, ValueError, KeyError, TypeError) as exc:
            digest, problems = "", [f"cannot unmask the stored round: {exc}"]
        survivors = set((decisions.get("unmask") or {}).get("survivors", ()))
        if decisions.get("unmask") is not None and survivors != set(ledger.accepted):
            problems.append("the unmasked survivors are not the round's accepted devices")
        if digest and digest != recorded:
            problems.append(f"unmasking gives {digest[:16]}, the ledger records {recorded[:16]}")
        for problem in problems:
            self._add("aggregate_differs", task, round_, problem, height=height)
        if not problems:
            self.checked_aggregates += 1

    # ------------------------------------------------------------------ store side
    def finish(self) -> list[Discrepancy]:
        """Rounds still open on the ledger, and the store's closed rounds the ledger lacks."""
        for (task, round_), _ in sorted(self._open.items()):
            stored = self.store.round(task, round_)
            if stored is None:
                self._add(
                    "round_missing_in_store", task, round_, "open on the ledger, not in the store"
                )
            elif stored.status == "closed":
                self._add(
                    "round_missing_in_ledger", task, round_,
                    "closed in the store but only opened on the ledger, never committed"
                    + _anchored(stored.ledgered),
                )  # fmt: skip
        for task, round_, ledgered in self.store.closed_rounds():
            if not self._in_scope(task) or round_ in self._on_ledger.get(task, ()):
                continue
            self._add(
                "round_missing_in_ledger", task, round_,
                "closed in the store but not on the ledger" + _anchored(ledgered),
            )  # fmt: skip
        return self.discrepancies


def _anchored(ledgered: bool) -> str:
    if ledgered:
        return " (the store marks it anchored)"
    return " (the store marks it not yet anchored: the gateway anchors it when it next starts)"
