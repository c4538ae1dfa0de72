"""Secure aggregation rounds (SecAgg+): the round protocol of a task with a ``[secagg]``
section. The gateway relays the devices' keys and encrypted shares, sums their masked
inputs, and unmasks only the sum (the cryptography is :mod:`fedcore.secagg`).

A round, after the model message (``docs/privacy.md`` has the picture):

``keys``
    each expected device (the sampled ones, else every live one) sends two X25519 public
    keys; when all have, or ``stage_timeout`` passed with at least the quorum, the gateway
    freezes ``U1`` and publishes the ``roster`` (every key, the modulus bits, k and t);
``shares``
    each device of ``U1`` sends its secrets' shares, sealed to each of its neighbours;
    then the gateway freezes ``U2`` and ``relay``s to each device the shares sealed for it;
``masked``
    each device of ``U2`` sends its masked input as its update (codec ``secagg``: stored,
    acknowledged and recorded on the ledger like any update); with ``U3`` frozen (all of
    ``U2``, or the quorum at the timeout) the gateway asks to ``unmask``;
``reveal``
    each survivor reveals its neighbours' shares (self-mask seed of a survivor, mask key of
    a dropped device); once every secret has ``t`` shares, the sum is unmasked and the
    round is due.

Every device message is signed, checked against the registry like an update, and replay-
protected (its counter must grow; one per device, stage and round); it is stored before
it is acknowledged, and the gateway's own decisions (``U1``, ``U2``, ``U3``) are stored
before they are published, so a restarted gateway resumes the round where it stood. A
device that restarts mid-round has lost its round secrets: it counts as dropped.

With a ``[dp]`` section, the protocol also draws the DP sample, checks the budget and adds
the Gaussian noise to the unmasked sum (central DP on a sum the gateway alone sees).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import secrets
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from fedcore import (
    Message,
    Signer,
    StageHeader,
    TensorView,
    Transport,
    UpdateHeader,
    canonical_json,
    encode_stage,
    inbox_topic,
    secagg_subscription,
    stage_topic,
)
from fedcore import secagg as sa

from ._dp import DPRounds
from ._errors import Rejected
from ._protocol import RoundProtocol, register_protocol
from ._round import OpenRound

log = logging.getLogger(__name__)

#: The device messages of each stage (their update header's codec).
_STAGE_OF = {"secagg-keys": "keys", "secagg-shares": "shares", "secagg-reveal": "reveal"}
#: Bytes of a sealed share blob: 12 nonce, the point (2) and two shares, 16 tag.
_BLOB = 12 + 2 + 2 * sa.SHARE_BYTES + 16
_MAX_BLOB = 512


class SecAggAggregator:
    """The sum of the masked inputs modulo ``2**bits`` (memory O(model)); :meth:`result`
    needs the unmasking (:meth:`unmasked`)."""

    streaming = True

    def __init__(
        self,
        shapes: Mapping[str, tuple[int, ...]],
        *,
        value_range: float,
        noise_std: float = 0.0,
        denominator: Callable[[int], float] = float,
    ):
        self._shapes = dict(shapes)
        self._size = sum(int(np.prod(s)) for s in self._shapes.values())
        self._sum = np.zeros(self._size, dtype=np.uint64)
        self.bits = 32
        self.value_range = value_range
        self.noise_std = noise_std
        self._denominator = denominator
        self.plain: np.ndarray | None = None
        self.total_samples = 0
        self.count = 0
        self.clipped = 0
        self.dropped = 0

    def add(self, views: Sequence[TensorView], n_samples: int) -> None:
        flat = np.concatenate([v.data.astype(np.uint64) for v in self._ordered(views)])
        self._sum = (self._sum + flat) % np.uint64(1 << self.bits)
        self.total_samples += n_samples
        self.count += 1

    def _ordered(self, views: Sequence[TensorView]) -> list[TensorView]:
        by_name = {v.name: v for v in views}
        return [by_name[name] for name in self._shapes]

    @property
    def masked_sum(self) -> np.ndarray:
        return self._sum

    def unmasked(self, plain: np.ndarray) -> None:
        """The survivors' plain integer sum, from the unmasking."""
        self.plain = plain

    def result(self) -> dict[str, np.ndarray]:
        assert self.plain is not None, "a secure aggregation round closes once unmasked"
        total = self.plain.astype(np.float64) * (self.value_range / sa.LEVELS)
        if self.noise_std > 0:
            total = total + np.random.default_rng(secrets.randbits(128)).normal(
                0.0, self.noise_std, size=total.shape
            )
        total /= self._denominator(self.count)
        out, at = {}, 0
        for name, shape in self._shapes.items():
            size = int(np.prod(shape))
            out[name] = total[at : at + size].astype(np.float32).reshape(shape)
            at += size
        return out


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _unb64(value: object, size: int | None = None, *, limit: int = _MAX_BLOB) -> bytes:
    if not isinstance(value, str) or len(value) > 2 * limit:
        raise ValueError("expected a base64 string")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64") from None
    if size is not None and len(raw) != size:
        raise ValueError(f"{len(raw)} bytes, expected {size}")
    return raw


@register_protocol
class SecAggRounds(RoundProtocol):
    name = "secagg"

    def __init__(
        self,
        *,
        transport: Transport,
        signer: Signer,
        authenticate: Callable[[str, bytes, frozenset[str]], tuple[UpdateHeader, bytes]],
        plaintext: Callable[[bytes], bytes],
        revoked: Callable[[], frozenset[str]],
        clock: Callable[[], float],
        rejected: Counter | None = None,
        dp_seed: bytes | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if self.task.secagg is None:
            raise ValueError("the secagg round protocol needs a task with a [secagg] section")
        self.section = self.task.secagg
        self.transport = transport
        self._signer = signer
        self._authenticate = authenticate
        self._plaintext = plaintext
        self._revoked = revoked
        self._clock = clock
        #: Refused secure aggregation messages by reason (the gateway's rejection counts).
        self.rejected = rejected if rejected is not None else Counter()
        self.privacy = None
        if self.task.dp is not None:
            self.privacy = DPRounds(dp_seed=dp_seed, **kwargs)
        self._counters = self.store.secagg_counters(self.task.id)
        self._held: list[Message] = []
        self._population: tuple[str, ...] = ()
        self._aggregator: SecAggAggregator | None = None
        self._reset(None, "")

    def _reset(self, round_: int | None, base: str) -> None:
        self._round, self._base = round_, base
        self._stage = "keys"
        self._since = self._clock()
        self._keys: dict[str, tuple[bytes, bytes]] = {}
        self._shares: dict[str, dict[str, str]] = {}
        self._reveals: dict[str, sa.Reveal] = {}
        #: Shares revealed so far of each secret: ("b", survivor) or ("s", dropped device).
        self._revealed: Counter[tuple[str, str]] = Counter()
        self._u1: tuple[str, ...] = ()
        self._u2: tuple[str, ...] = ()
        self._u3: tuple[str, ...] = ()
        self._dropped: tuple[str, ...] = ()
        self._graph: dict[str, tuple[str, ...]] = {}
        self._bits = 32
        self._k = 0
        self._t = 1
        self._current: OpenRound | None = None
        self._digest: str | None = None

    # ------------------------------------------------------------ what the loop asks
    def subscriptions(self, task_id: str) -> list[tuple[str, int]]:
        return [(secagg_subscription(task_id), 1)]

    def may_open(self, round_: int) -> str | None:
        return None if self.privacy is None else self.privacy.may_open(round_)

    def sample(self, round_: int, population: Sequence[str]) -> tuple[str, ...] | None:
        self._population = tuple(sorted(population))
        return None if self.privacy is None else self.privacy.sample(round_, population)

    @property
    def sampled(self) -> tuple[str, ...] | None:
        return None if self.privacy is None else self.privacy.sampled

    @property
    def quorum(self) -> int:
        q = self.task_quorum if self.privacy is None else self.privacy.quorum
        return max(q, 2)  # one device's "sum" is its update

    def aggregator(self, shapes: Mapping[str, tuple[int, ...]], live: int) -> SecAggAggregator:
        dp = self.task.dp
        if dp is None:
            noise, fixed = 0.0, None
        else:  # DP-FedAvg's fixed denominator: the expected number of participants
            noise = dp.noise_multiplier * dp.clip
            fixed = dp.sampling * max(len(self._population), 1) if dp.sampling < 1 else live
        self._aggregator = SecAggAggregator(
            shapes, value_range=self.task.secagg_range, noise_std=noise,
            denominator=lambda count: float(max(count if fixed is None else fixed, 1)),
        )  # fmt: skip
        self._aggregator.bits = self._bits
        return self._aggregator

    def opened(self, round_: int, base_hash: str, *, resume: bool) -> bool:
        self._reset(round_, base_hash)
        if resume:
            self._restore()
        for message in self._held:
            self.on_message(message)
        self._held = []
        return resume

    def place(self, header: UpdateHeader, current: int) -> int:
        if self.privacy is not None:
            self.privacy.place(header, current)
        if self._stage != "masked":
            raise Rejected(
                "stage_closed", f"round {current} is at stage {self._stage}", device=header.device
            )
        if header.device not in self._u2:
            raise Rejected(
                "not_in_round",
                f"{header.device}'s shares were not relayed in round {current}",
                device=header.device,
            )
        return current

    def due(self, current: OpenRound, live: int) -> bool:
        self._current = current
        self._advance()
        return self._stage == "done"

    def closable(self, current: OpenRound) -> bool:
        """At the round deadline: only an unmasked round closes (stages keep their own
        timeouts)."""
        return self._stage == "done"

    def dropped(self, round_: int, devices: set[str]) -> None:
        log.error(
            "round %d: devices %s were revoked after their masked inputs were summed; the"
            " sum cannot drop them, and the ledger will refuse the round", round_,
            sorted(devices),
        )  # fmt: skip

    def record_metrics(self, current: OpenRound) -> dict[str, float]:
        metrics = {
            "secagg_shared": float(len(self._u2)),
            "secagg_dropped": float(len(self._dropped)),
            "secagg_bits": float(self._bits),
            "secagg_neighbours": float(self._k),
            "secagg_threshold": float(self._t),
        }
        if self.privacy is not None:
            metrics.update(self.privacy.record_metrics(current))
        return metrics

    def end_detail(self) -> dict[str, object] | None:
        return None if self.privacy is None else self.privacy.end_detail()

    # ------------------------------------------------------------ device messages
    def on_message(self, message: Message) -> bool:
        if not message.topic.startswith(secagg_subscription(self.task.id)[:-1]):
            return False
        if self._round is None:
            self._held.append(message)  # acknowledged once the round is rebuilt
            return True
        header = None
        try:
            header, payload = self._authenticate(message.topic, message.payload, self._revoked())
            stage = _STAGE_OF[header.codec]
            if self._stage == "done" and stage == "reveal" and header.round == self._round:
                # a reveal after the sum was unmasked: not needed, not a fault
                log.debug("round %s: a late reveal from %s", self._round, header.device)
                message.acknowledge()
                return True
            self._check_fresh(header, stage)
            data = json.loads(payload)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            apply = {"keys": self._take_keys, "shares": self._take_shares,
                     "reveal": self._take_reveal}[stage]  # fmt: skip
            apply(header.device, data, check=True)
        except Rejected as exc:
            self._refuse(exc)
        except (ValueError, TypeError, KeyError) as exc:
            device = None if header is None else header.device
            self._refuse(Rejected("bad_payload", f"{type(exc).__name__}: {exc}", device=device))
        else:
            self.store.put_secagg(
                self.task.id, header.round, stage, header.device, header.counter,
                message.payload,
            )  # fmt: skip
            self._counters[header.device] = header.counter
            self._advance()
        message.acknowledge()
        return True

    def _refuse(self, exc: Rejected) -> None:
        self.rejected[exc.reason] += 1
        log.info("refused a secure aggregation message from %s: %s", exc.device or "?", exc)

    def _check_fresh(self, header: UpdateHeader, stage: str) -> None:
        device = header.device
        if header.round != self._round or header.base != self._base:
            raise Rejected("stale_round", f"round {header.round}, not {self._round}", device=device)
        if header.counter <= self._counters.get(device, -1):
            raise Rejected("replayed", f"counter {header.counter} already seen", device=device)
        if self._stage != stage:
            raise Rejected(
                "stage_closed", f"{stage} while the round is at {self._stage}", device=device
            )

    def _take_keys(self, device: str, data: dict, *, check: bool) -> None:
        if check and device in self._keys:
            raise Rejected("duplicate", "keys already sent this round", device=device)
        if check and self.sampled is not None and device not in self.sampled:
            raise Rejected("not_sampled", f"{device} is not sampled", device=device)
        keys = (_unb64(data["c"], 32), _unb64(data["s"], 32))
        if check:
            for raw in keys:
                if not sa.usable_public_key(raw):
                    raise Rejected("bad_payload", "a key of low order", device=device)
        self._keys[device] = keys

    def _take_shares(self, device: str, data: dict, *, check: bool) -> None:
        shares = data["shares"]
        if check:
            if device in self._shares:
                raise Rejected("duplicate", "shares already sent this round", device=device)
            if device not in self._u1:
                raise Rejected("not_in_round", "no keys in the roster", device=device)
            if not isinstance(shares, dict) or set(shares) != set(self._graph[device]):
                raise Rejected("bad_payload", "shares must go to its neighbours", device=device)
            for blob in shares.values():
                _unb64(blob, _BLOB)
        self._shares[device] = dict(shares)

    def _take_reveal(self, device: str, data: dict, *, check: bool) -> None:
        def points(kind: str) -> dict[str, tuple[int, bytes]]:
            out = {}
            for peer, (x, share) in data[kind].items():
                if not isinstance(x, int) or not 0 < x < 1 << 16:
                    raise ValueError("a share point is out of range")
                out[str(peer)] = (x, _unb64(share, sa.SHARE_BYTES))
            return out

        b, s = points("b"), points("s")
        if check:
            if device in self._reveals:
                raise Rejected("duplicate", "already revealed this round", device=device)
            if device not in self._u3:
                raise Rejected("not_in_round", "not a survivor of this round", device=device)
            mine = set(self._graph[device])
            if not set(b) <= mine & set(self._u3) or not set(s) <= mine & set(self._dropped):
                raise Rejected("bad_payload", "reveals shares it was not asked for", device=device)
        self._reveals[device] = sa.Reveal(b=b, s=s)
        self._revealed.update([("b", d) for d in b] + [("s", d) for d in s])

    # ------------------------------------------------------------ stages
    def _expected(self) -> set[str]:
        if self._stage == "keys":
            base = self.sampled if self.sampled is not None else self._population
            return set(base) - self._revoked()
        if self._stage == "shares":
            return set(self._u1)
        if self._stage == "masked":
            return set(self._u2)
        return set(self._u3)

    def _advance(self) -> None:
        """Move on while a stage is complete (or timed out with enough devices)."""
        if self._round is None:
            return
        while self._stage != "done":
            timed_out = self._clock() - self._since >= self.section.stage_timeout
            if self._stage == "keys":
                have = set(self._keys)
            elif self._stage == "shares":
                have = set(self._shares)
            elif self._stage == "masked":
                have = set() if self._current is None else set(self._current.devices)
            else:
                if not self._try_unmask():
                    if timed_out:
                        self._waiting("reveal", len(self._reveals))
                    return
                continue
            if not (have >= self._expected() or (timed_out and len(have) >= self.quorum)):
                if timed_out:
                    self._waiting(self._stage, len(have))
                return
            {"keys": self._publish_roster, "shares": self._publish_relay,
             "masked": self._publish_unmask}[self._stage](sorted(have))  # fmt: skip

    def _waiting(self, stage: str, have: int) -> None:
        log.warning(
            "round %s: stage %s has %d of %d devices after %gs (quorum %d); waiting",
            self._round, stage, have, len(self._expected()), self.section.stage_timeout,
            self.quorum,
        )  # fmt: skip
        self._since = self._clock()

    def _decide(self, stage: str, payload: dict) -> bytes:
        """Store one of the gateway's decisions (before anything is published)."""
        raw = canonical_json(payload)
        assert self._round is not None
        self.store.put_secagg(self.task.id, self._round, stage, "", 0, raw)
        return raw

    def _publish_roster(self, devices: list[str], *, stored: bytes | None = None) -> None:
        if stored is None:
            n = len(devices)
            k = self.section.neighbours or sa.default_neighbours(n)
            k = min(k, n - 1)
            payload = {
                "devices": {d: [_b64(self._keys[d][0]), _b64(self._keys[d][1])] for d in devices},
                "bits": sa.modulus_bits(n),
                "neighbours": k,
                "threshold": sa.share_threshold(k, self.section.threshold),
            }
            stored = self._decide("roster", payload)
        data = json.loads(stored)
        self._u1 = tuple(sorted(data["devices"]))
        self._bits, self._k, self._t = data["bits"], data["neighbours"], data["threshold"]
        if self._aggregator is not None:
            self._aggregator.bits = self._bits
        seed = sa.graph_seed(self.task.id, self._round or 0, self._base, self._u1)
        self._graph = sa.neighbour_graph(self._u1, self._k, seed)
        self._publish("roster", stored)
        self._stage, self._since = "shares", self._clock()
        log.info(
            "round %s: %d devices keyed; k = %d, t = %d, %d-bit sums", self._round,
            len(self._u1), self._k, self._t, self._bits,
        )  # fmt: skip

    def _publish_relay(self, devices: list[str], *, stored: bytes | None = None) -> None:
        if stored is None:
            stored = self._decide("relay", {"shared": devices})
        self._u2 = tuple(json.loads(stored)["shared"])
        for device in self._u2:
            inbox = {
                sender: self._shares[sender][device]
                for sender in self._u2
                if device in self._shares[sender]
            }
            self._publish("relay", canonical_json({"shared": self._u2, "shares": inbox}), device)
        self._stage, self._since = "masked", self._clock()

    def _publish_unmask(self, devices: list[str], *, stored: bytes | None = None) -> None:
        if stored is None:
            survivors = sorted(set(devices) - self._revoked())
            dropped = sorted(set(self._u2) - set(survivors))
            stored = self._decide("unmask", {"survivors": survivors, "dropped": dropped})
        data = json.loads(stored)
        self._u3, self._dropped = tuple(data["survivors"]), tuple(data["dropped"])
        self._publish("unmask", stored)
        self._stage, self._since = "reveal", self._clock()
        log.info(
            "round %s: %d masked inputs, %d devices dropped after sharing; unmasking",
            self._round, len(self._u3), len(self._dropped),
        )  # fmt: skip

    def _publish(self, stage: str, payload: bytes, to: str = "") -> None:
        assert self._round is not None
        header = StageHeader(
            task=self.task.id, round=self._round, stage=stage, base=self._base, to=to
        )
        frame = encode_stage(header, payload, self._signer)
        topic = inbox_topic(self.task.id, to) if to else stage_topic(self.task.id)
        self.transport.publish(topic, frame, qos=1, retain=True)

    def _try_unmask(self) -> bool:
        """Unmask once every secret has ``t`` revealed shares; False while some lack them."""
        secrets_ = [("b", d) for d in self._u3] + [("s", d) for d in self._dropped]
        if any(self._revealed[secret] < self._t for secret in secrets_):
            return False
        aggregator = self._aggregator
        assert aggregator is not None and self._round is not None
        ctx = sa.RoundContext(self.task.id, self._round)
        try:
            plain = sa.unmask_sum(
                ctx, aggregator.masked_sum, survivors=self._u3, dropped=self._dropped,
                neighbours=self._graph, s_public={d: k[1] for d, k in self._keys.items()},
                reveals=self._reveals, threshold=self._t, bits=self._bits,
            )  # fmt: skip
        except sa.SecAggError as exc:
            log.error("round %s: unmasking failed: %s; waiting for more reveals", self._round, exc)
            return False
        digest = sa.aggregate_digest(plain)
        # What an auditor unmasks the sum again from (``ledger verify --store``): the masked
        # sum and the revealed shares, nothing the gateway did not need to know.
        self._decide("sum", {
            "count": len(aggregator.masked_sum),
            "masked_sum": _b64(sa.pack_bits(aggregator.masked_sum.astype(np.uint32), self._bits)),
            "reveals": {
                device: {
                    "b": {p: [x, _b64(v)] for p, (x, v) in sorted(reveal.b.items())},
                    "s": {p: [x, _b64(v)] for p, (x, v) in sorted(reveal.s.items())},
                }
                for device, reveal in sorted(self._reveals.items())
            },
            "aggregate_sha256": digest,
        })  # fmt: skip
        aggregator.unmasked(plain)
        self._digest = digest
        log.info("round %s: unmasked the sum of %d inputs (%s)", self._round, len(self._u3),
                 digest[:12])  # fmt: skip
        self._stage = "done"
        return True

    def record_extra(self, current: OpenRound) -> dict[str, object]:
        return {"aggregate_sha256": self._digest}

    # ------------------------------------------------------------ restart
    def _restore(self) -> None:
        """Rebuild the open round's stages from the store, then publish the gateway's last
        decision again (a retained message the broker may have lost)."""
        assert self._round is not None
        last: tuple[str, bytes] | None = None
        for stage, device, _counter, frame in self.store.secagg_messages(self.task.id, self._round):
            if device == "" and stage == "sum":
                continue  # unmasked again from the reveals restored here
            if device == "":
                {"roster": self._publish_roster, "relay": self._publish_relay,
                 "unmask": self._publish_unmask}[stage]([], stored=frame)  # fmt: skip
                last = (stage, frame)
                continue
            take = {"keys": self._take_keys, "shares": self._take_shares,
                    "reveal": self._take_reveal}[stage]  # fmt: skip
            take(device, json.loads(self._plaintext(frame)), check=False)
        if last is not None:
            log.info("round %s: resumed at stage %s", self._round, self._stage)
