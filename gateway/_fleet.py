"""The fleet as the ledger knows it: who is revoked, which certificate each device signs
with, and (first start of an embedded ledger) the registrations and the task itself.

Revocation is read in one ``GetDevices`` query per round (per ``MAX_BATCH_RECORDS``
devices), never one query per device; if the ledger cannot be read, the last known set
stays in force.
"""

from __future__ import annotations

import logging

from fedcore import TaskSpec, ledger_privacy
from ledger import ContractError, Identity, LedgerBackend, LedgerError

from ._anchor import read_fleet
from ._errors import GatewayError
from ._registry import DeviceRegistry
from ._stats import GatewayStats

log = logging.getLogger(__name__)


class FleetLedger:
    def __init__(
        self,
        *,
        task: TaskSpec,
        ledger: LedgerBackend,
        registry: DeviceRegistry,
        identity: Identity,
        admin: Identity | None,
        stats: GatewayStats,
    ):
        self.task = task
        self.ledger = ledger
        self.registry = registry
        self.identity = identity
        self.admin = admin
        #: Registered devices the ledger said were revoked, at the last :meth:`refresh`.
        self.revoked: frozenset[str] = frozenset()
        self.stats = stats
        #: The certificate each device signs with, as the ledger records it.
        self._fingerprints: dict[str, str] = {}

    @property
    def live(self) -> int:
        """Registered devices not revoked."""
        return len(self.registry) - len(self.revoked)

    def refresh(self) -> frozenset[str]:
        """Read the revoked set (and the fingerprints) from the ledger: one query.

        The contract refuses a revoked device's accepted update, so the gateway must refuse
        it first."""
        try:
            status = read_fleet(self.ledger, self.registry, self.identity)
        except (LedgerError, OSError) as exc:
            log.error("could not read device status from the ledger: %s", exc)
            return self.revoked
        self._fingerprints.update(status.fingerprints)
        self.revoked = status.revoked
        return self.revoked

    def note_certificate(self, device: str, fingerprint: str) -> None:
        """A device that signs with a new certificate of the CA (a rotation) keeps its id,
        history and counter; the ledger records which certificate it signs with now.

        A failed ``RotateDeviceKey`` is retried after the next round opens (the fingerprint
        is read back from the ledger then).
        """
        known = self._fingerprints.get(device)
        if known is None or known == fingerprint:
            return
        self._fingerprints[device] = fingerprint
        try:
            self.ledger.submit(
                "RotateDeviceKey", device, self.identity.msp_id, known, fingerprint,
                identity=self.identity,
            )  # fmt: skip
        except (LedgerError, OSError) as exc:
            self.stats.ledger_failures += 1
            log.error("ledger could not record the new certificate of %s: %s", device, exc)
            return
        log.info("device %s signs with a new certificate %s", device, fingerprint[:12])

    def register(self, initial_hash: str) -> None:
        """First start: admit the fleet and declare the task (already there is fine). Only
        with an ``admin`` identity (the embedded ledger); on Fabric an operator does it."""
        if self.admin is None:
            return
        org = self.admin.msp_id
        calls = [
            ("RegisterDevice", (d, org, "default", self.registry.fingerprint(d)))
            for d in self.registry
        ]
        spec_hash = self.task.model_spec().spec_hash()
        task_args = (self.task.id, org, self.identity.subject, spec_hash)
        rule = self.task.aggregation_label()
        calls.append(("CreateTask", (*task_args, rule, ledger_privacy(self.task), initial_hash)))
        for fn, args in calls:
            try:
                self.ledger.submit(fn, *args, identity=self.admin)
            except ContractError as exc:
                if exc.code != "conflict":
                    raise GatewayError(f"ledger refused {fn} {args[0]}: {exc}") from None
