"""The privacy budget of a task, recomputed from the ledger alone (``fedledger ledger
privacy``): the task's DP terms (``CreateTask``), each committed round's DP event (its
``CommitRound`` metrics) and, once the task ended, the revealed sampling seed, with which
every round's contributors are checked to have been sampled.

Works on any backend (only ``GetTask`` and ``GetRound`` are evaluated), and uses the same
accountant as the gateway (:func:`fedcore.epsilon`), so the figures match exactly.
"""

from __future__ import annotations

import hashlib
from typing import Any

from fedcore import DPRoundEvent, epsilon, sampled_devices

from ._backend import LedgerBackend
from ._context import Identity
from ._contract import ContractError


def privacy_report(ledger: LedgerBackend, task_id: str, *, identity: Identity) -> dict[str, Any]:
    """What the ledger says about ``task_id``'s privacy; ``ok`` is False when a check fails
    (``problems`` says which)."""
    task = ledger.evaluate("GetTask", task_id, identity=identity)
    terms = (task.get("privacy") or {}).get("dp")
    report: dict[str, Any] = {
        "task": task_id,
        "dp": terms,
        "rounds": [],
        "ended": task.get("ended"),
        "problems": [],
    }
    if terms is None:
        report.update(ok=True, epsilon=None, recorded_epsilon=None)
        return report
    delta = float(terms["target_delta"])
    seed = _revealed_seed(task, terms, report["problems"])
    events: list[DPRoundEvent] = []
    recorded = None
    for round_ in range(int(task["next_round"])):
        try:
            record = ledger.evaluate("GetRound", task_id, round_, identity=identity)
        except ContractError:
            report["problems"].append(f"round {round_} is missing")
            continue
        if record.get("status") != "committed":
            continue
        event = DPRoundEvent.from_metrics(record.get("metrics") or {})
        if event is None:
            report["problems"].append(f"round {round_} carries no DP event")
            continue
        if (event.noise_multiplier, event.sampling_rate) != (
            float(terms["noise_multiplier"]),
            float(terms["sampling"]),
        ):
            report["problems"].append(f"round {round_}'s DP event differs from the task's terms")
        events.append(event)
        eps = epsilon(events, delta)
        recorded = record["metrics"].get("dp_epsilon")
        entry = {
            "round": round_,
            "noise_multiplier": event.noise_multiplier,
            "sampling_rate": event.sampling_rate,
            "noised": record["metrics"].get("dp_noised"),
            "epsilon": eps,
            "recorded_epsilon": recorded,
        }
        if recorded is None or abs(eps - float(recorded)) > 1e-6:
            report["problems"].append(
                f"round {round_}: epsilon recomputes to {eps:.9f}, the gateway recorded {recorded}"
            )
        if seed is not None:
            contributors = sorted(record.get("contributors") or [])
            chosen = set(
                sampled_devices(seed, task_id, round_, contributors, float(terms["sampling"]))
            )
            unsampled = [d for d in contributors if d not in chosen]
            entry["contributors_sampled"] = not unsampled
            if unsampled:
                report["problems"].append(
                    f"round {round_}: {', '.join(unsampled)} contributed but were not sampled"
                )
        report["rounds"].append(entry)
    final = epsilon(events, delta)
    report.update(
        epsilon=final,
        epsilon_without_amplification=epsilon(events, delta, amplified=False),
        recorded_epsilon=recorded,
        budget_epsilon=float(terms["budget_epsilon"]),
        within_budget=final <= float(terms["budget_epsilon"]),
    )
    if not report["within_budget"]:
        report["problems"].append(f"epsilon {final:.6f} is over the budget")
    report["ok"] = not report["problems"]
    return report


def _revealed_seed(task: dict[str, Any], terms: dict[str, Any], problems: list[str]):
    committed = terms.get("seed_sha256")
    ended = task.get("ended")
    if committed is None or ended is None:
        return None
    revealed = (ended.get("detail") or {}).get("dp_seed")
    if not isinstance(revealed, str):
        problems.append("the task ended without revealing its sampling seed")
        return None
    seed = bytes.fromhex(revealed)
    if hashlib.sha256(seed).hexdigest() != committed:
        problems.append("the revealed sampling seed does not hash to the committed one")
        return None
    return seed
