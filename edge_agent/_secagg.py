"""A device's side of secure aggregation (SecAgg+): one round's secrets, and the messages
that answer the gateway's stages (``fedcore.secagg`` has the cryptography, ``gateway._secagg``
the other side).

Per round: on the model, send two public keys; on the ``roster``, share the mask key and
the self-mask seed among the neighbours the public graph gives (each share sealed to its
neighbour); on the ``relay`` of the neighbours' shares, send the masked update; on the
``unmask`` request, reveal for each neighbour the share of its self-mask seed (it survived)
or of its mask key (it dropped), never both. The secrets live in memory only: a device that
restarts mid-round drops out of it, which the protocol survives.

The device checks what it can without trusting the gateway: the signed roster holds its own
keys, its neighbours are the public graph's, the relayed shares come from those neighbours
and open, a survivor is never also dropped, and at least ``t`` neighbours stay in.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Mapping

import numpy as np

from fedcore import StageHeader, encode_masked
from fedcore import secagg as sa

log = logging.getLogger(__name__)


class SecAggAbort(Exception):
    """This device leaves the round (the gateway's message breaks the protocol)."""


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


class DeviceRound:
    """One device's secure aggregation round, from its keys to its reveal."""

    def __init__(
        self,
        *,
        task: str,
        round_: int,
        base: str,
        device: str,
        shapes: Mapping[str, tuple[int, ...]],
        quantized: np.ndarray,
    ):
        self.task, self.round, self.base, self.device = task, round_, base, device
        self.ctx = sa.RoundContext(task, round_)
        self.shapes = dict(shapes)
        self.quantized = quantized  # int64, the model's order, in [-127, 127]
        self.keys = sa.DeviceKeys()
        #: What the device has done: keys, shared, masked, revealed (or left).
        self.stage = "keys"
        self.bits = 0
        self.threshold = 1
        self.graph: dict[str, tuple[str, ...]] = {}
        self.roster: dict[str, tuple[bytes, bytes]] = {}
        self.shared: tuple[str, ...] = ()
        #: The neighbours' shares relayed to this device: sender -> (x, s share, b share).
        self.held: dict[str, tuple[int, bytes, bytes]] = {}

    def matches(self, header: StageHeader) -> bool:
        return (header.task, header.round, header.base) == (self.task, self.round, self.base)

    # ------------------------------------------------------------ the stages
    def keys_payload(self) -> bytes:
        c, s = self.keys.public()
        return json.dumps({"c": _b64(c), "s": _b64(s)}, separators=(",", ":")).encode()

    def on_roster(self, data: dict) -> bytes | None:
        """The shares payload, or None: this device is not in the roster."""
        if self.stage != "keys":
            return None
        devices = data["devices"]
        if self.device not in devices:
            self.stage = "left"
            log.info("round %d: not in the secure aggregation roster", self.round)
            return None
        roster = {
            str(device): (base64.b64decode(c, validate=True), base64.b64decode(s, validate=True))
            for device, (c, s) in devices.items()
        }
        if roster[self.device] != self.keys.public():
            raise SecAggAbort("the roster does not hold this device's keys")
        n, k, t, bits = len(roster), int(data["neighbours"]), int(data["threshold"]), data["bits"]
        if not (1 <= k <= n - 1 and 1 <= t <= k and bits == sa.modulus_bits(n)):
            raise SecAggAbort(f"roster parameters k={k}, t={t}, bits={bits} for {n} devices")
        if t < sa.share_threshold(k, 0.5) and n > 2:
            raise SecAggAbort(f"threshold {t} of {k} neighbours is under half")
        self.roster, self.bits, self.threshold = roster, int(bits), t
        seed = sa.graph_seed(self.task, self.round, self.base, roster)
        self.graph = sa.neighbour_graph(roster, k, seed)
        mine = self.graph[self.device]
        xs = list(range(1, len(mine) + 1))
        s_shares = sa.shamir_split(self.keys.s_private, xs, t)
        b_shares = sa.shamir_split(self.keys.b, xs, t)
        sealed = {}
        for x, peer in zip(xs, mine, strict=True):
            blob = sa.seal_shares(self.ctx, self.keys, self.device, peer, roster[peer][0], x,
                                  s_shares[x], b_shares[x])  # fmt: skip
            sealed[peer] = _b64(blob)
        self.stage = "shared"
        return json.dumps({"shares": sealed}, separators=(",", ":")).encode()

    def on_relay(self, data: dict) -> bytes | None:
        """The masked update's payload (codec ``secagg``), or None: not relayed."""
        if self.stage != "shared":
            return None
        shared = tuple(data["shared"])
        if self.device not in shared:
            self.stage = "left"
            log.info("round %d: this device's shares were not relayed", self.round)
            return None
        if not set(shared) <= set(self.roster):
            raise SecAggAbort("the relay names devices outside the roster")
        peers = sorted(set(self.graph[self.device]) & set(shared))
        if len(peers) < self.threshold:
            raise SecAggAbort(
                f"{len(peers)} neighbours left, {self.threshold} needed to keep the masks"
            )
        blobs = data["shares"]
        if set(blobs) != set(peers):
            raise SecAggAbort("the relayed shares are not from this device's neighbours")
        for sender in peers:
            x, s_share, b_share = sa.open_shares(
                self.ctx, self.keys, sender, self.roster[sender][0], self.device,
                base64.b64decode(blobs[sender], validate=True),
            )  # fmt: skip
            if x != self.graph[sender].index(self.device) + 1:
                raise SecAggAbort(f"the share from {sender} is at the wrong point")
            self.held[sender] = (x, s_share, b_share)
        self.shared = shared
        count = int(self.quantized.size)
        masks = sa.mask_vector(
            self.ctx, self.device, self.keys, {p: self.roster[p][1] for p in peers},
            count, self.bits,
        )  # fmt: skip
        masked = (sa.to_ring(self.quantized, self.bits).astype(np.uint64) + masks) % np.uint64(
            1 << self.bits
        )
        tensors, at = {}, 0
        for name, shape in self.shapes.items():
            size = int(np.prod(shape))
            tensors[name] = masked[at : at + size].astype(np.uint32)
            at += size
        self.quantized = np.zeros(0, np.int64)  # the plaintext is not kept past masking
        self.stage = "masked"
        return encode_masked(tensors, self.shapes, self.bits)

    def on_unmask(self, data: dict) -> bytes | None:
        """The reveal payload, or None: this device is not a survivor (or answered)."""
        if self.stage != "masked":
            return None
        survivors, dropped = set(data["survivors"]), set(data["dropped"])
        if self.device not in survivors:
            self.stage = "left"
            return None
        if survivors & dropped:
            raise SecAggAbort("the unmask request names a device both survived and dropped")
        if not (survivors | dropped) <= set(self.shared):
            raise SecAggAbort("the unmask request names devices that did not share")
        b = {p: [x, _b64(bs)] for p, (x, _s, bs) in self.held.items() if p in survivors}
        s = {p: [x, _b64(ss)] for p, (x, ss, _b) in self.held.items() if p in dropped}
        self.stage = "revealed"
        self.held = {}
        return json.dumps({"b": b, "s": s}, separators=(",", ":")).encode()
