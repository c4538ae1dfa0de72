"""The fedledger contract: device registry, tasks and rounds, and the rules between them.

Written once and run unchanged as Fabric chaincode (behind a shim adapter) and by the
embedded backend, so it follows the chaincode rules: every transaction function takes the
:class:`~ledger._context.TxContext` first, does no I/O, reads no clock (time is
``ctx.timestamp``) and draws no randomness, and stores canonical JSON. Arguments arrive as
Python ``str``/``int``/``float``/``bool``/``None``/``list``/``dict`` values (an adapter decodes
them from JSON) and are validated strictly before any state is read.

Transactions (``submit`` writes, ``evaluate`` only reads):

============================  ========  ==================================================
RegisterDevice                submit    an ``admin`` of the device's organisation
RevokeDevice                  submit    an ``admin`` of the device's organisation
RotateDeviceKey               submit    an ``admin`` or a ``gateway`` of the device's org
GetDevice                     evaluate  anyone
GetDevices                    evaluate  anyone
CreateTask                    submit    an ``admin`` of the task's organisation
OpenRound                     submit    the task's gateway
RecordUpdates                 submit    the task's gateway; event ``UpdatesRecorded``
CommitRound                   submit    the task's gateway; event ``RoundCommitted``
EndTask                       submit    the task's gateway (reveals a DP sampling seed)
GetTask                       evaluate  anyone
GetRound                      evaluate  anyone
GetHistory                    evaluate  anyone
GetDeviceContributions        evaluate  anyone
============================  ========  ==================================================

"The task's gateway" is an identity with role ``gateway``, the task's organisation as MSP id
and the subject named when the task was created.

Keys (every variable part is an identifier without ``/``; numbers are zero-padded so keys
sort in round order)::

    device/<device>                              the device record
    task/<task>                                  the task record and its round cursor
    round/<task>/<round:08d>                     the round record (open, then committed)
    updates/<task>/<round:08d>/<batch:04d>       one RecordUpdates batch and its Merkle root
    contrib/<device>/<task>/<round:08d>          a device's accepted update in a round
    model/<model hash>/<task>                    where a model hash sits in a task's lineage

Rules: rounds open in order, one at a time, each on the previous round's global model (the
task's initial model for round 0); a round is committed once, after it is opened, with
exactly the devices that have an accepted update in it as contributors and the task's
aggregation rule; a round with no contributors keeps its base model. An accepted update must
come from a registered device that is not revoked, at most once per device and round.
Revocation is not retroactive: updates accepted before it still count. A rejected update is
recorded as the gateway saw it: fields it could not establish (device, samples, codec) are
null, the digest (of the raw message) and the reason are always there.

Errors are :class:`ContractError` with a fixed ``code``:

- ``invalid_argument``: an argument has the wrong type, format or range;
- ``forbidden``: the submitter's identity may not run this transaction;
- ``not_found``: a device, task, round or model the transaction names does not exist;
- ``conflict``: the state does not allow it (already exists, wrong order, wrong base model,
  contributors that do not match, a round already committed...);
- ``revoked``: an accepted update names a revoked device.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, TypeVar

from fedcore import (
    CODECS,
    IDENTIFIER,
    MAX_BATCH_RECORDS,
    MAX_BATCHES,
    MAX_METRICS,
    MAX_ROUND,
    MAX_SAMPLES,
    canonical_json,
)

from ._context import ROLES, Identity, TxContext
from ._errors import LedgerError
from ._merkle import leaf_hash, merkle_root

TxKind = Literal["submit", "evaluate"]

CODES = ("conflict", "forbidden", "invalid_argument", "not_found", "revoked")

EVENT_UPDATES_RECORDED = "UpdatesRecorded"
EVENT_ROUND_COMMITTED = "RoundCommitted"

#: Upper bounds that keep every key and every transaction small.
MAX_PRIVACY_BYTES = 4_096

_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX = re.compile(r"(?:[0-9a-f]{2}){16,64}")
#: How a task can end (``EndTask``).
TASK_END_STATUSES = ("completed", "budget_exhausted")


def _is_hex(value: str) -> bool:
    """16 to 64 bytes as lowercase hex (a revealed seed)."""
    return _HEX.fullmatch(value) is not None


_TOKEN = re.compile(r"[a-z][a-z0-9_]{0,63}")
_SUBJECT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}")
_RECORD_FIELDS = frozenset({"device", "digest", "samples", "codec", "accepted", "reason"})

F = TypeVar("F", bound=Callable[..., Any])


class ContractError(LedgerError):
    """The contract refused a transaction; ``code`` is one of :data:`CODES`."""

    def __init__(self, code: str, message: str):
        if code not in CODES:
            raise ValueError(f"unknown contract error code {code!r}")
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")


def submit(fn: F) -> F:
    """Mark a transaction function that writes state (Fabric: submitted, endorsed, ordered)."""
    fn.__tx_kind__ = "submit"  # type: ignore[attr-defined]
    return fn


def evaluate(fn: F) -> F:
    """Mark a read-only transaction function (Fabric: evaluated on one peer, not ordered)."""
    fn.__tx_kind__ = "evaluate"  # type: ignore[attr-defined]
    return fn


# ---------------------------------------------------------------------------- keys


def device_key(device_id: str) -> str:
    return f"device/{device_id}"


def task_key(task_id: str) -> str:
    return f"task/{task_id}"


def round_key(task_id: str, round_: int) -> str:
    return f"round/{task_id}/{round_:08d}"


def batch_key(task_id: str, round_: int, batch: int) -> str:
    return f"updates/{task_id}/{round_:08d}/{batch:04d}"


def contrib_key(device_id: str, task_id: str, round_: int) -> str:
    return f"contrib/{device_id}/{task_id}/{round_:08d}"


def model_key(model_hash: str, task_id: str) -> str:
    return f"model/{model_hash}/{task_id}"


# ---------------------------------------------------------------------------- validation


def _invalid(name: str, message: str) -> ContractError:
    return ContractError("invalid_argument", f"{name}: {message}")


def _show(value: Any) -> str:
    """A short repr for messages: arguments can be huge or not even printable by repr."""
    if isinstance(value, int) and value.bit_length() > 64:
        return "a very large integer"
    try:
        text = repr(value)
    except ValueError:  # an integer past Python's digit limit, nested in a list
        return f"a {type(value).__name__}"
    return text if len(text) <= 80 else text[:77] + "..."


def _identifier(value: Any, name: str) -> str:
    if not isinstance(value, str) or not IDENTIFIER.fullmatch(value):
        raise _invalid(name, f"{_show(value)} is not an identifier (letters, digits, '_.-', 1-64)")
    return value


def _subject(value: Any, name: str) -> str:
    if not isinstance(value, str) or not _SUBJECT.fullmatch(value):
        raise _invalid(name, f"{_show(value)} is not an identity name (letters, digits, '_.@-')")
    return value


def _hex64(value: Any, name: str) -> str:
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise _invalid(name, f"{_show(value)} is not a SHA-256 hex digest (64 lowercase hex)")
    return value


#: The shortest model hash prefix ``GetHistory`` resolves (as ``git`` takes abbreviated ids).
MIN_HASH_PREFIX = 6
_HEX_PREFIX = re.compile(rf"[0-9a-f]{{{MIN_HASH_PREFIX},64}}")


def _resolve_model(ctx: TxContext, value: Any, task_id: str | None) -> str:
    """A full model hash from ``value``: the hash itself, or a unique prefix of one recorded
    (in ``task_id``'s models when given)."""
    if not isinstance(value, str) or not _HEX_PREFIX.fullmatch(value):
        raise _invalid(
            "model_hash",
            f"{_show(value)} is not a SHA-256 hex digest or a prefix of one"
            f" ({MIN_HASH_PREFIX} to 64 lowercase hex)",
        )
    if len(value) == 64:
        return value
    found = set()
    for key, _ in ctx.get_state_by_prefix(f"model/{value}"):
        _, full, task = key.split("/", 2)
        if task_id is None or task == task_id:
            found.add(full)
    if not found:
        where = "" if task_id is None else f" in task {task_id}"
        raise ContractError("not_found", f"no model starts with {value}{where}")
    if len(found) > 1:
        shown = ", ".join(sorted(h[:16] for h in found))
        raise ContractError("conflict", f"model prefix {value} is ambiguous: {shown}")
    return found.pop()


def _token(value: Any, name: str) -> str:
    if not isinstance(value, str) or not _TOKEN.fullmatch(value):
        raise _invalid(name, f"{_show(value)} is not a code (lowercase letters, digits, '_')")
    return value


def _int(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _invalid(name, f"{_show(value)} is not an integer in [{low}, {high}]")
    return value


def _number(value: Any, name: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or abs(value) > 1e300  # before isfinite: a huge int does not convert to float
        or not math.isfinite(value)
    ):
        raise _invalid(name, f"{_show(value)} is not a finite number")
    return float(value)


def _text(value: Any, name: str, max_len: int) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > max_len:
        raise _invalid(name, f"must be non-empty text of at most {max_len} characters")
    if not value.isprintable():
        raise _invalid(name, "must not contain control characters")
    return value


def _list(value: Any, name: str) -> list[Any]:
    if not isinstance(value, list | tuple):
        raise _invalid(name, f"expected a list, got {type(value).__name__}")
    return list(value)


def _round(value: Any) -> int:
    return _int(value, "round", 0, MAX_ROUND)


def _json_value(value: Any, name: str, depth: int) -> Any:
    if isinstance(value, str):
        if not value.isprintable():
            raise _invalid(name, "text must be printable (no control characters or surrogates)")
        return value
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, float):
        return _number(value, name)
    if isinstance(value, int):
        return _int(value, name, -(2**53), 2**53)
    if depth >= 4:
        raise _invalid(name, "nested too deeply")
    if isinstance(value, list | tuple):
        return [_json_value(v, f"{name}[{i}]", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {
            _token(k, f"{name} key"): _json_value(v, f"{name}.{k}", depth + 1)
            for k, v in value.items()
        }
    raise _invalid(name, f"{type(value).__name__} is not a JSON value")


def _privacy(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _invalid("privacy", f"expected an object, got {type(value).__name__}")
    out = _json_value(value, "privacy", 0)
    if len(canonical_json(out)) > MAX_PRIVACY_BYTES:
        raise _invalid("privacy", f"more than {MAX_PRIVACY_BYTES} bytes as JSON")
    return out


def _metrics(value: Any) -> dict[str, float]:
    if not isinstance(value, dict) or len(value) > MAX_METRICS:
        raise _invalid("metrics", f"expected an object of at most {MAX_METRICS} numbers")
    return {_token(k, "metrics key"): _number(v, f"metrics.{k}") for k, v in value.items()}


def _update_record(value: Any, index: int) -> dict[str, Any]:
    name = f"records[{index}]"
    if not isinstance(value, dict) or set(value) != _RECORD_FIELDS:
        raise _invalid(name, f"expected an object with exactly {sorted(_RECORD_FIELDS)}")
    accepted = value["accepted"]
    if not isinstance(accepted, bool):
        raise _invalid(f"{name}.accepted", "must be true or false")
    digest = _hex64(value["digest"], f"{name}.digest")
    device, samples, codec, reason = (value[k] for k in ("device", "samples", "codec", "reason"))
    if accepted or device is not None:
        device = _identifier(device, f"{name}.device")
    if accepted or samples is not None:
        samples = _int(samples, f"{name}.samples", 1, MAX_SAMPLES)
    if (accepted or codec is not None) and codec not in CODECS:
        raise _invalid(f"{name}.codec", f"{_show(codec)} is not one of {CODECS}")
    if accepted and reason is not None:
        raise _invalid(f"{name}.reason", "an accepted update has no rejection reason")
    if not accepted:
        reason = _token(reason, f"{name}.reason")
    return {
        "accepted": accepted,
        "codec": codec,
        "device": device,
        "digest": digest,
        "reason": reason,
        "samples": samples,
    }


# ---------------------------------------------------------------------------- state


def _tx_time(ctx: TxContext) -> float:
    t = _number(ctx.timestamp, "transaction timestamp")
    if t < 0:
        raise _invalid("transaction timestamp", "is before 1970")
    return t


def _caller(ctx: TxContext) -> Identity:
    who = ctx.creator
    if (
        not isinstance(who, Identity)
        or who.role not in ROLES
        or not isinstance(who.msp_id, str)
        or not who.msp_id
        or not isinstance(who.subject, str)
        or not who.subject
    ):
        raise ContractError("forbidden", "the submitter carries no valid fedledger identity")
    return who


def _require_admin(who: Identity, org: str, action: str) -> None:
    if who.role != "admin" or who.msp_id != org:
        raise ContractError(
            "forbidden",
            f"{action} needs an admin of {org}; {who.subject} is {who.role} of {who.msp_id}",
        )


def _require_gateway(who: Identity, task: Mapping[str, Any], action: str) -> None:
    if who.role != "gateway" or who.msp_id != task["org"] or who.subject != task["gateway"]:
        raise ContractError(
            "forbidden",
            f"{action} on task {task['task']} needs gateway {task['gateway']} of {task['org']};"
            f" {who.subject} is {who.role} of {who.msp_id}",
        )


def _get(ctx: TxContext, key: str) -> dict[str, Any] | None:
    raw = ctx.get_state(key)
    return None if raw is None else json.loads(raw)


def _load(ctx: TxContext, key: str, what: str) -> dict[str, Any]:
    value = _get(ctx, key)
    if value is None:
        raise ContractError("not_found", f"no {what}")
    return value


def _put(ctx: TxContext, key: str, value: Mapping[str, Any]) -> None:
    ctx.put_state(key, canonical_json(value))


def _history_entry(record: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("round", "base_model", "global_model", "aggregation", "contributors", "samples")
    more = ("updates_root", "metrics", "committed_at", "committed_tx")
    entry = {k: record[k] for k in keys + more}
    if "aggregate_sha256" in record:
        entry["aggregate_sha256"] = record["aggregate_sha256"]
    return entry


# ---------------------------------------------------------------------------- contract


class FedLedgerContract:
    """The transaction functions; stateless, so each is a static function of its context."""

    @classmethod
    def transactions(cls) -> dict[str, tuple[Callable[..., Any], TxKind]]:
        """Every transaction function by name, with its kind, for a backend to dispatch."""
        out: dict[str, tuple[Callable[..., Any], TxKind]] = {}
        for name, attr in sorted(vars(cls).items()):
            fn = attr.__func__ if isinstance(attr, staticmethod) else attr
            kind = getattr(fn, "__tx_kind__", None)
            if kind is not None:
                out[name] = (fn, kind)
        return out

    # ------------------------------------------------------------------ devices

    @staticmethod
    @submit
    def RegisterDevice(
        ctx: TxContext, device_id: str, org: str, device_class: str, key_fingerprint: str
    ) -> dict[str, Any]:
        """Admit a device; ``key_fingerprint`` is the SHA-256 of its public key or certificate."""
        who = _caller(ctx)
        _identifier(device_id, "device_id")
        _identifier(org, "org")
        _identifier(device_class, "device_class")
        _hex64(key_fingerprint, "key_fingerprint")
        now = _tx_time(ctx)
        _require_admin(who, org, "RegisterDevice")
        key = device_key(device_id)
        if ctx.get_state(key) is not None:
            raise ContractError("conflict", f"device {device_id} is already registered")
        record = {
            "device": device_id,
            "org": org,
            "device_class": device_class,
            "key_fingerprint": key_fingerprint,
            "status": "active",
            "registered_at": now,
            "registered_by": who.subject,
            "registered_tx": ctx.tx_id,
            "revoked_at": None,
            "revoked_by": None,
            "revoked_tx": None,
            "revocation_reason": None,
        }
        _put(ctx, key, record)
        return record

    @staticmethod
    @submit
    def RevokeDevice(ctx: TxContext, device_id: str, reason: str) -> dict[str, Any]:
        """Refuse the device's updates from now on; its id can never be registered again."""
        who = _caller(ctx)
        _identifier(device_id, "device_id")
        _text(reason, "reason", 200)
        now = _tx_time(ctx)
        key = device_key(device_id)
        record = _load(ctx, key, f"device {device_id}")
        _require_admin(who, record["org"], "RevokeDevice")
        if record["status"] == "revoked":
            raise ContractError("conflict", f"device {device_id} is already revoked")
        record.update(
            status="revoked",
            revoked_at=now,
            revoked_by=who.subject,
            revoked_tx=ctx.tx_id,
            revocation_reason=reason,
        )
        _put(ctx, key, record)
        return record

    @staticmethod
    @submit
    def RotateDeviceKey(
        ctx: TxContext, device_id: str, org: str, old_fingerprint: str, new_fingerprint: str
    ) -> dict[str, Any]:
        """Record that a device now signs with another key or certificate (a rotation).

        The device keeps its id, and with it its contributions and revocation status: a
        revoked device cannot rotate its way back in. ``old_fingerprint`` must be the current
        one, so two gateways racing over a stale view cannot fork the history. A gateway may
        submit it because it records what the organisation CA already vouched for (it checked
        the new certificate's chain and CRL); ``key_history`` keeps every replaced fingerprint.
        """
        who = _caller(ctx)
        _identifier(device_id, "device_id")
        _identifier(org, "org")
        _hex64(old_fingerprint, "old_fingerprint")
        _hex64(new_fingerprint, "new_fingerprint")
        now = _tx_time(ctx)
        if who.role not in ("admin", "gateway") or who.msp_id != org:
            raise ContractError(
                "forbidden",
                f"RotateDeviceKey needs an admin or gateway of {org};"
                f" {who.subject} is {who.role} of {who.msp_id}",
            )
        key = device_key(device_id)
        record = _load(ctx, key, f"device {device_id}")
        if record["org"] != org:
            raise ContractError("forbidden", f"device {device_id} does not belong to {org}")
        if record["status"] == "revoked":
            raise ContractError("revoked", f"device {device_id} is revoked")
        if record["key_fingerprint"] != old_fingerprint:
            raise ContractError(
                "conflict", f"device {device_id} no longer signs with {old_fingerprint[:12]}"
            )
        if new_fingerprint == old_fingerprint:
            raise ContractError("conflict", f"device {device_id} already signs with that key")
        history = list(record.get("key_history", []))
        history.append(
            {
                "old": old_fingerprint,
                "new": new_fingerprint,
                "at": now,
                "by": who.subject,
                "tx": ctx.tx_id,
            }
        )
        record.update(key_fingerprint=new_fingerprint, key_history=history)
        _put(ctx, key, record)
        return record

    @staticmethod
    @evaluate
    def GetDevice(ctx: TxContext, device_id: str) -> dict[str, Any]:
        _caller(ctx)
        _identifier(device_id, "device_id")
        return _load(ctx, device_key(device_id), f"device {device_id}")

    @staticmethod
    @evaluate
    def GetDevices(ctx: TxContext, device_ids: list[str]) -> dict[str, dict[str, Any]]:
        """The records of the registered devices among ``device_ids`` (at most
        ``MAX_BATCH_RECORDS``), by id: a gateway reads its fleet's status in one query per
        round, not one per device."""
        _caller(ctx)
        if not isinstance(device_ids, list) or len(device_ids) > MAX_BATCH_RECORDS:
            raise _invalid("device_ids", f"must be a list of at most {MAX_BATCH_RECORDS} ids")
        found = {}
        for device_id in device_ids:
            record = _get(ctx, device_key(_identifier(device_id, "device_id")))
            if record is not None:
                found[device_id] = record
        return found

    # ------------------------------------------------------------------ tasks and rounds

    @staticmethod
    @submit
    def CreateTask(
        ctx: TxContext,
        task_id: str,
        org: str,
        gateway: str,
        model_spec_hash: str,
        aggregation: str,
        privacy: dict[str, Any],
        initial_model_hash: str,
    ) -> dict[str, Any]:
        """Declare a task; ``gateway`` names the identity (of ``org``) that runs its rounds."""
        who = _caller(ctx)
        _identifier(task_id, "task_id")
        _identifier(org, "org")
        _subject(gateway, "gateway")
        _hex64(model_spec_hash, "model_spec_hash")
        _token(aggregation, "aggregation")
        privacy = _privacy(privacy)
        _hex64(initial_model_hash, "initial_model_hash")
        now = _tx_time(ctx)
        _require_admin(who, org, "CreateTask")
        key = task_key(task_id)
        if ctx.get_state(key) is not None:
            raise ContractError("conflict", f"task {task_id} already exists")
        record = {
            "task": task_id,
            "org": org,
            "gateway": gateway,
            "model_spec_hash": model_spec_hash,
            "aggregation": aggregation,
            "privacy": privacy,
            "initial_model": initial_model_hash,
            "created_at": now,
            "created_by": who.subject,
            "created_tx": ctx.tx_id,
            # The round cursor: rounds committed so far, the open round, the current model.
            "next_round": 0,
            "open_round": None,
            "model": initial_model_hash,
        }
        _put(ctx, key, record)
        _put(ctx, model_key(initial_model_hash, task_id), {"task": task_id, "round": None})
        return record

    @staticmethod
    @submit
    def OpenRound(
        ctx: TxContext, task_id: str, round_: int, base_model_hash: str, deadline: float
    ) -> dict[str, Any]:
        """Open the task's next round on its current model.

        ``deadline`` (seconds since the epoch) is recorded, not compared with the transaction
        time: a gateway that anchors a round late, after a restart, still records it.
        """
        who = _caller(ctx)
        _identifier(task_id, "task_id")
        _round(round_)
        _hex64(base_model_hash, "base_model_hash")
        deadline = _number(deadline, "deadline")
        if deadline < 0:
            raise _invalid("deadline", "must not be negative")
        now = _tx_time(ctx)
        key = task_key(task_id)
        task = _load(ctx, key, f"task {task_id}")
        _require_gateway(who, task, "OpenRound")
        if task.get("ended") is not None:
            raise ContractError(
                "conflict", f"task {task_id} ended ({task['ended']['status']}); no round opens"
            )
        if task["open_round"] is not None:
            raise ContractError(
                "conflict", f"round {task['open_round']} of task {task_id} is still open"
            )
        if round_ != task["next_round"]:
            raise ContractError(
                "conflict",
                f"task {task_id} opens round {task['next_round']} next, not round {round_}",
            )
        if base_model_hash != task["model"]:
            raise ContractError(
                "conflict",
                f"round {round_} of task {task_id} must start from model {task['model']},"
                f" not {base_model_hash}",
            )
        record = {
            "task": task_id,
            "round": round_,
            "status": "open",
            "base_model": base_model_hash,
            "deadline": deadline,
            "opened_at": now,
            "opened_tx": ctx.tx_id,
            "batches": 0,
            "accepted": 0,
            "rejected": 0,
            "rejected_by_reason": {},
            "samples": 0,
            "global_model": None,
            "aggregation": None,
            "contributors": None,
            "updates_root": None,
            "metrics": None,
            "committed_at": None,
            "committed_tx": None,
        }
        task["open_round"] = round_
        _put(ctx, key, task)
        _put(ctx, round_key(task_id, round_), record)
        return record

    @staticmethod
    @submit
    def RecordUpdates(
        ctx: TxContext, task_id: str, round_: int, records: Sequence[dict[str, Any]]
    ) -> dict[str, Any]:
        """Anchor one batch of accept/reject decisions of an open round, with its Merkle root.

        The root is over the batch's update digests in the order given (leaf = SHA-256 of
        ``0x00`` and the 32 digest bytes), so anyone holding the batch can recompute it.
        """
        who = _caller(ctx)
        _identifier(task_id, "task_id")
        _round(round_)
        items = _list(records, "records")
        if not 1 <= len(items) <= MAX_BATCH_RECORDS:
            raise _invalid("records", f"a batch holds 1 to {MAX_BATCH_RECORDS} records")
        batch_records = [_update_record(r, i) for i, r in enumerate(items)]
        now = _tx_time(ctx)
        task = _load(ctx, task_key(task_id), f"task {task_id}")
        _require_gateway(who, task, "RecordUpdates")
        rkey = round_key(task_id, round_)
        rnd = _load(ctx, rkey, f"round {round_} of task {task_id}")
        if rnd["status"] != "open":
            raise ContractError(
                "conflict", f"round {round_} of task {task_id} is committed: no more updates"
            )
        if rnd["batches"] >= MAX_BATCHES:
            raise ContractError(
                "conflict", f"round {round_} of task {task_id} holds {MAX_BATCHES} batches"
            )
        batch = rnd["batches"]
        seen: set[str] = set()
        contribs: list[tuple[str, dict[str, Any]]] = []
        rejected_by_reason = dict(rnd["rejected_by_reason"])
        for index, rec in enumerate(batch_records):
            device = rec["device"]
            if not rec["accepted"]:
                reason = rec["reason"]
                rejected_by_reason[reason] = rejected_by_reason.get(reason, 0) + 1
                continue
            if device in seen:
                raise ContractError(
                    "conflict", f"device {device} is accepted twice in round {round_}"
                )
            seen.add(device)
            registered = _get(ctx, device_key(device))
            if registered is None:
                raise ContractError(
                    "not_found", f"records[{index}]: device {device} is not registered"
                )
            if registered["status"] == "revoked":
                raise ContractError("revoked", f"records[{index}]: device {device} is revoked")
            ckey = contrib_key(device, task_id, round_)
            if ctx.get_state(ckey) is not None:
                raise ContractError(
                    "conflict",
                    f"device {device} already has an accepted update in round {round_}",
                )
            contribs.append(
                (
                    ckey,
                    {
                        "device": device,
                        "task": task_id,
                        "round": round_,
                        "batch": batch,
                        "index": index,
                        "digest": rec["digest"],
                        "samples": rec["samples"],
                        "codec": rec["codec"],
                        "recorded_at": now,
                        "recorded_tx": ctx.tx_id,
                    },
                )
            )
        root = merkle_root(leaf_hash(bytes.fromhex(r["digest"])) for r in batch_records).hex()
        n_accepted = len(contribs)
        n_rejected = len(batch_records) - n_accepted
        _put(
            ctx,
            batch_key(task_id, round_, batch),
            {
                "task": task_id,
                "round": round_,
                "batch": batch,
                "records": batch_records,
                "merkle_root": root,
                "accepted": n_accepted,
                "rejected": n_rejected,
                "recorded_at": now,
                "recorded_tx": ctx.tx_id,
            },
        )
        for ckey, contrib in contribs:
            _put(ctx, ckey, contrib)
        rnd.update(
            batches=batch + 1,
            accepted=rnd["accepted"] + n_accepted,
            rejected=rnd["rejected"] + n_rejected,
            rejected_by_reason=dict(sorted(rejected_by_reason.items())),
            samples=rnd["samples"] + sum(c["samples"] for _, c in contribs),
        )
        _put(ctx, rkey, rnd)
        summary = {
            "task": task_id,
            "round": round_,
            "batch": batch,
            "merkle_root": root,
            "accepted": n_accepted,
            "rejected": n_rejected,
        }
        ctx.set_event(EVENT_UPDATES_RECORDED, canonical_json(summary))
        return summary

    @staticmethod
    @submit
    def CommitRound(
        ctx: TxContext,
        task_id: str,
        round_: int,
        global_model_hash: str,
        aggregation: str,
        contributors: Sequence[str],
        metrics: dict[str, float],
        aggregate_sha256: str | None = None,
    ) -> dict[str, Any]:
        """Close the open round with its new global model.

        The round's ``updates_root`` is the Merkle root over the contributors' update digests
        sorted by device id, the same root the gateway's round record carries. A task with
        secure aggregation (``privacy.secure_aggregation``) must give ``aggregate_sha256``,
        the SHA-256 of the unmasked sum of the masked inputs those digests name (int64
        little-endian), which ``ledger verify --store`` recomputes; other tasks may not.
        """
        who = _caller(ctx)
        _identifier(task_id, "task_id")
        _round(round_)
        _hex64(global_model_hash, "global_model_hash")
        _token(aggregation, "aggregation")
        devices = [
            _identifier(d, f"contributors[{i}]")
            for i, d in enumerate(_list(contributors, "contributors"))
        ]
        if len(set(devices)) != len(devices):
            raise _invalid("contributors", "lists a device more than once")
        metrics = _metrics(metrics)
        if aggregate_sha256 is not None:
            _hex64(aggregate_sha256, "aggregate_sha256")
        now = _tx_time(ctx)
        tkey = task_key(task_id)
        task = _load(ctx, tkey, f"task {task_id}")
        _require_gateway(who, task, "CommitRound")
        secure = bool((task.get("privacy") or {}).get("secure_aggregation"))
        if secure and devices and aggregate_sha256 is None:
            raise _invalid(
                "aggregate_sha256", f"task {task_id} aggregates securely: the sum's hash is due"
            )
        if not secure and aggregate_sha256 is not None:
            raise _invalid("aggregate_sha256", f"task {task_id} does not aggregate securely")
        rkey = round_key(task_id, round_)
        rnd = _load(ctx, rkey, f"round {round_} of task {task_id} (it was never opened)")
        if rnd["status"] != "open":
            raise ContractError(
                "conflict", f"round {round_} of task {task_id} is already committed"
            )
        if aggregation != task["aggregation"]:
            raise ContractError(
                "conflict",
                f"task {task_id} aggregates with {task['aggregation']}, not {aggregation}",
            )
        if len(devices) != rnd["accepted"]:
            raise ContractError(
                "conflict",
                f"round {round_} has {rnd['accepted']} accepted updates,"
                f" {len(devices)} contributors given",
            )
        accepted = []
        for device in sorted(devices):
            contrib = _get(ctx, contrib_key(device, task_id, round_))
            if contrib is None:
                raise ContractError(
                    "conflict", f"device {device} has no accepted update in round {round_}"
                )
            accepted.append(contrib)
        if not accepted and global_model_hash != rnd["base_model"]:
            raise ContractError(
                "conflict", f"round {round_} has no contributors, so its model cannot change"
            )
        root = merkle_root(leaf_hash(bytes.fromhex(c["digest"])) for c in accepted).hex()
        rnd.update(
            status="committed",
            global_model=global_model_hash,
            aggregation=aggregation,
            contributors=[c["device"] for c in accepted],
            updates_root=root,
            metrics=dict(sorted(metrics.items())),
            committed_at=now,
            committed_tx=ctx.tx_id,
        )
        if aggregate_sha256 is not None:
            rnd["aggregate_sha256"] = aggregate_sha256
        task.update(next_round=round_ + 1, open_round=None, model=global_model_hash)
        _put(ctx, rkey, rnd)
        _put(ctx, tkey, task)
        _put(ctx, model_key(global_model_hash, task_id), {"task": task_id, "round": round_})
        event = {
            "task": task_id,
            "round": round_,
            "base_model": rnd["base_model"],
            "global_model": global_model_hash,
            "aggregation": aggregation,
            "contributors": len(accepted),
            "samples": rnd["samples"],
            "updates_root": root,
        }
        ctx.set_event(EVENT_ROUND_COMMITTED, canonical_json(event))
        return rnd

    @staticmethod
    @submit
    def EndTask(
        ctx: TxContext, task_id: str, status: str, detail: dict[str, Any]
    ) -> dict[str, Any]:
        """End a task: ``completed`` after its last round, or ``budget_exhausted`` when its
        privacy budget leaves no room for another round. No round opens after this.

        A task whose privacy terms commit to a sampling seed (``privacy.dp.seed_sha256``)
        must reveal it here (``detail.dp_seed``, hex), and it must hash to the commitment,
        so anyone can recompute which devices each round sampled.
        """
        who = _caller(ctx)
        _identifier(task_id, "task_id")
        if status not in TASK_END_STATUSES:
            raise _invalid("status", f"must be one of {list(TASK_END_STATUSES)}")
        detail = _privacy(detail)
        now = _tx_time(ctx)
        key = task_key(task_id)
        task = _load(ctx, key, f"task {task_id}")
        _require_gateway(who, task, "EndTask")
        if task.get("ended") is not None:
            raise ContractError("conflict", f"task {task_id} already ended")
        if task["open_round"] is not None:
            raise ContractError(
                "conflict", f"round {task['open_round']} of task {task_id} is still open"
            )
        dp = (task.get("privacy") or {}).get("dp") or {}
        committed = dp.get("seed_sha256")
        if committed is not None:
            seed = detail.get("dp_seed")
            if not isinstance(seed, str) or not _is_hex(seed):
                raise _invalid("detail.dp_seed", "the task's sampling seed (hex) must be revealed")
            if hashlib.sha256(bytes.fromhex(seed)).hexdigest() != committed:
                raise _invalid(
                    "detail.dp_seed", f"does not hash to the task's seed_sha256 {committed}"
                )
        task["ended"] = {
            "status": status,
            "detail": detail,
            "rounds": task["next_round"],
            "at": now,
            "tx": ctx.tx_id,
        }
        _put(ctx, key, task)
        return task

    @staticmethod
    @evaluate
    def GetTask(ctx: TxContext, task_id: str) -> dict[str, Any]:
        """The task's record: its terms (privacy included), round cursor and, once it ended,
        how (``ended``)."""
        _caller(ctx)
        _identifier(task_id, "task_id")
        return _load(ctx, task_key(task_id), f"task {task_id}")

    @staticmethod
    @evaluate
    def GetRound(ctx: TxContext, task_id: str, round_: int) -> dict[str, Any]:
        _caller(ctx)
        _identifier(task_id, "task_id")
        _round(round_)
        return _load(ctx, round_key(task_id, round_), f"round {round_} of task {task_id}")

    @staticmethod
    @evaluate
    def GetHistory(ctx: TxContext, model_hash: str, task_id: str | None = None) -> dict[str, Any]:
        """The lineage of ``model_hash`` (or a unique prefix of it, at least
        :data:`MIN_HASH_PREFIX` hex digits): the rounds that built it, newest first.

        ``{"model", "task", "initial_model", "rounds": [...]}``; ``rounds`` is empty for a
        task's initial model. The same hash can sit in several tasks (two tasks started from
        the same initial model); then ``task_id`` must say which one.
        """
        _caller(ctx)
        if task_id is not None:
            _identifier(task_id, "task_id")
        model_hash = _resolve_model(ctx, model_hash, task_id)
        if task_id is None:
            found = {
                key.rsplit("/", 1)[1]: json.loads(value)
                for key, value in ctx.get_state_by_prefix(f"model/{model_hash}/")
            }
        else:
            entry = _get(ctx, model_key(model_hash, task_id))
            found = {} if entry is None else {task_id: entry}
        if not found:
            where = "" if task_id is None else f" in task {task_id}"
            raise ContractError("not_found", f"no model {model_hash}{where}")
        if len(found) > 1:
            raise ContractError(
                "conflict", f"model {model_hash} is in tasks {', '.join(sorted(found))}: name one"
            )
        ((task, entry),) = found.items()
        initial = _load(ctx, task_key(task), f"task {task}")["initial_model"]
        last = entry["round"]
        rounds = []
        for r in range(-1 if last is None else last, -1, -1):
            rounds.append(_history_entry(_load(ctx, round_key(task, r), f"round {r} of {task}")))
        return {"model": model_hash, "task": task, "initial_model": initial, "rounds": rounds}

    @staticmethod
    @evaluate
    def GetDeviceContributions(ctx: TxContext, device_id: str) -> list[dict[str, Any]]:
        """Every accepted update of the device, by task and round, with the round's outcome."""
        _caller(ctx)
        _identifier(device_id, "device_id")
        _load(ctx, device_key(device_id), f"device {device_id}")
        out = []
        for _, value in ctx.get_state_by_prefix(f"contrib/{device_id}/"):
            contrib = json.loads(value)
            rnd = _load(
                ctx,
                round_key(contrib["task"], contrib["round"]),
                f"round {contrib['round']} of task {contrib['task']}",
            )
            contrib["status"] = rnd["status"]
            contrib["global_model"] = rnd["global_model"]
            out.append(contrib)
        return out
