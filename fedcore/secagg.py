"""Secure aggregation (SecAgg+, Bell et al., 2020, after Bonawitz et al., 2017): the part
devices and the gateway share. The gateway learns the sum of a round's updates, never one
device's update.

One round, for the devices ``U1`` that advertised keys:

1. Each device makes two X25519 key pairs (``c``: to encrypt shares to its neighbours;
   ``s``: to agree pairwise masks) and a random self-mask seed ``b``.
2. The neighbours of a device are its ``k`` nearest on a ring of ``U1`` shuffled by a public
   seed (a Harary graph, SecAgg+'s sparse k-regular graph): no party chooses them. Each
   device Shamir-shares ``s_sk`` and ``b`` (threshold ``t``) among its neighbours, each
   share encrypted to one neighbour with AES-256-GCM under the ``c`` key they agree.
3. A device whose shares were relayed (``U2``) sends its update quantized to integers
   (``[-127, 127]``, stochastic rounding, a range the task sets) plus ``PRG(b)`` plus, for
   each neighbour j in ``U2``, ``+PRG(s_ij)`` when it sorts before j and ``-PRG(s_ij)``
   after, all modulo ``2**bits``. PRG is ChaCha20 keyed by HKDF-SHA256 of the secret.
4. The gateway names the devices whose masked input arrived (``U3``) and those that dropped
   after sharing (``U2 - U3``). Each survivor reveals, for each neighbour, the share of
   ``b`` (a survivor) or of ``s_sk`` (a dropped device), never both. With ``t`` shares of
   each, the gateway removes the self masks and the dropped devices' pairwise masks; the
   survivors' pairwise masks cancel in the sum.

``bits`` is what the sum of the survivors' int8 values needs without wrapping:
``ceil(log2(254 * n + 1))`` for ``n`` devices (15 for 100, 18 for 1,000), so a device
uploads ``bits / 8`` bytes per parameter, under 2x int8 up to 129 devices (Flower's
default 32-bit modulus is 4x).

Shamir sharing is over the prime field GF(2**256 + 297), the smallest above every 32-byte
secret, so a share is 33 bytes: a small implementation (``pycryptodome``'s takes 16-byte
secrets only), pinned by tests.
"""

from __future__ import annotations

import base64
import hashlib
import math
import secrets
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import Field

from ._codec import _pack_residues, _unpack_residues
from ._config import StrictModel
from ._errors import FedledgerError

#: The prime of the Shamir field: the smallest prime above every 32-byte secret.
PRIME = (1 << 256) + 297
#: The int8 levels a quantized update takes: ``[-LEVELS, LEVELS]``.
LEVELS = 127
#: Bytes of a secret (an X25519 private key, a self-mask seed).
SECRET_BYTES = 32
#: Bytes of a share (a field element).
SHARE_BYTES = 33


class SecAggError(FedledgerError):
    """A secure aggregation step cannot go on (too few shares, a bad share, a bad key)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# ---------------------------------------------------------------- parameters


class SecAggSection(StrictModel):
    """``[secagg]`` of a task: the gateway learns only the sum of each round's updates."""

    clip: float | None = Field(
        None,
        gt=0,
        le=1e6,
        description="C: each device clips its update (the model delta) to this L2 norm before"
        " masking (the gateway cannot clip what it cannot see). Unset: the `[dp]` clip;"
        " one of the two is required.",
    )
    range: float | None = Field(
        None,
        gt=0,
        le=1e6,
        description="Each update value is clipped to [-range, range] and rounded"
        " (stochastically, unbiased) to the int8 levels -127..127 before masking. Unset: the"
        " clip (no value of a clipped update exceeds it).",
    )
    neighbours: int | None = Field(
        None,
        ge=1,
        le=1000,
        description="k: how many neighbours each device shares its mask secrets with"
        " (SecAgg+'s sparse graph). Unset: 2 * ceil(2 * log2 n) for n devices, at least 6.",
    )
    threshold: float = Field(
        0.5,
        gt=0,
        le=1,
        description="The share of a device's neighbours whose shares rebuild its secrets"
        " (t = ceil(threshold * k)): the dropouts a round survives, and how many neighbours"
        " must collude with the gateway to unmask a device.",
    )
    stage_timeout: float = Field(
        30.0,
        gt=0,
        le=86400,
        description="Seconds a stage (keys, shares, masked inputs, reveals) waits for the"
        " devices still expected before going on with those it has (at least the quorum).",
    )

    def ledger_terms(self) -> dict:
        return self.model_dump(mode="json")


def modulus_bits(devices: int) -> int:
    """Bits of the modulus in which ``devices`` int8 updates sum without wrapping."""
    return max(8, math.ceil(math.log2(2 * LEVELS * max(devices, 1) + 1)))


def default_neighbours(devices: int) -> int:
    """SecAgg+'s k = O(log n): ``2 * ceil(2 * log2 n)`` (at least 6), at most everyone
    else."""
    if devices <= 1:
        return 0
    k = max(6, 2 * math.ceil(2 * math.log2(devices)))
    return min(k, devices - 1)


def share_threshold(neighbours: int, fraction: float) -> int:
    """``t``: shares needed to rebuild a secret, ``fraction`` of the neighbours (at least 1)."""
    return max(1, min(neighbours, math.ceil(fraction * neighbours)))


def neighbour_graph(devices: Iterable[str], k: int, seed: bytes) -> dict[str, tuple[str, ...]]:
    """Each device's ``k`` neighbours (a symmetric relation): the ring of ``devices`` sorted
    by SHA-256(seed || id), each linked to the ``k // 2`` on either side (and, for odd
    ``k``, to the one opposite when the ring is even). ``k >= n - 1``: everyone."""
    ring = sorted(set(devices), key=lambda d: hashlib.sha256(seed + d.encode()).digest())
    n = len(ring)
    links: dict[str, set[str]] = {d: set() for d in ring}
    if k >= n - 1:
        for d in ring:
            links[d] = set(ring) - {d}
    else:
        for i, d in enumerate(ring):
            for step in range(1, k // 2 + 1):
                for other in (ring[(i + step) % n], ring[(i - step) % n]):
                    links[d].add(other)
                    links[other].add(d)
            if k % 2 and n % 2 == 0:
                other = ring[(i + n // 2) % n]
                links[d].add(other)
                links[other].add(d)
    return {d: tuple(sorted(links[d])) for d in sorted(ring)}


def graph_seed(task: str, round_: int, base: str, devices: Iterable[str]) -> bytes:
    """The public seed the ring is shuffled by: nobody picks the graph."""
    text = "\n".join([task, str(round_), base, *sorted(devices)])
    return hashlib.sha256(b"fedledger secagg graph\n" + text.encode()).digest()


# ---------------------------------------------------------------- Shamir


def shamir_split(secret: bytes, xs: Sequence[int], threshold: int) -> dict[int, bytes]:
    """Shares of ``secret`` at the points ``xs`` (distinct, 1..2**16): any ``threshold``
    of them rebuild it, fewer tell nothing."""
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} for {len(xs)} shares")
    if len(set(xs)) != len(xs) or not all(0 < x < 1 << 16 for x in xs):
        raise ValueError("share points must be distinct, in 1..65535")
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for x in xs:
        y = 0
        for c in reversed(coefficients):
            y = (y * x + c) % PRIME
        shares[x] = y.to_bytes(SHARE_BYTES, "big")
    return shares


def shamir_combine(shares: Mapping[int, bytes], threshold: int, size: int = SECRET_BYTES) -> bytes:
    """The secret from at least ``threshold`` shares (the first ``threshold`` by point)."""
    if len(shares) < threshold:
        raise SecAggError("too_few_shares", f"{len(shares)} shares, {threshold} needed")
    points = sorted(shares)[:threshold]
    ys = {x: int.from_bytes(shares[x], "big") for x in points}
    if any(y >= PRIME for y in ys.values()):
        raise SecAggError("bad_share", "a share is not a field element")
    secret = 0
    for x in points:
        num, den = 1, 1
        for other in points:
            if other != x:
                num = num * (-other) % PRIME
                den = den * (x - other) % PRIME
        secret = (secret + ys[x] * num * pow(den, -1, PRIME)) % PRIME
    if secret >> (8 * size):
        raise SecAggError("bad_share", "the shares do not rebuild a secret")
    return secret.to_bytes(size, "big")


# ---------------------------------------------------------------- keys and masks


def _raw_public(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _raw_private(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )


def _kdf(secret: bytes, info: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info.encode()).derive(secret)


def prg(seed: bytes, count: int, bits: int) -> np.ndarray:
    """``count`` pseudo-random integers below ``2**bits`` (uint32), ChaCha20 keyed by
    ``seed`` (32 bytes)."""
    cipher = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor()
    stream = np.frombuffer(cipher.update(bytes(4 * count)), dtype="<u4")
    return stream & np.uint32((1 << bits) - 1)


@dataclass(frozen=True)
class RoundContext:
    """What binds a round's keys and masks to it."""

    task: str
    round: int

    def label(self, kind: str, *parts: str) -> str:
        return "/".join(["fedledger secagg", kind, self.task, str(self.round), *parts])


class DeviceKeys:
    """One device's secrets for one round (never reused, never stored)."""

    def __init__(self):
        self.c = X25519PrivateKey.generate()
        self.s = X25519PrivateKey.generate()
        self.b = secrets.token_bytes(SECRET_BYTES)
        #: AES-GCM keys agreed with neighbours, by (label, their key): see ``_share_key``.
        self.share_keys: dict[tuple[str, bytes], AESGCM] = {}

    def public(self) -> tuple[bytes, bytes]:
        return _raw_public(self.c.public_key()), _raw_public(self.s.public_key())

    @property
    def s_private(self) -> bytes:
        return _raw_private(self.s)


def usable_public_key(raw: bytes) -> bool:
    """Whether ``raw`` is an X25519 public key a key agreement can use (not of low order:
    a device sending one would make its pairwise masks predictable)."""
    try:
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(raw))
    except ValueError:
        return False
    return True


def pair_seed(
    ctx: RoundContext, own_s: bytes | X25519PrivateKey, peer_s_public: bytes, a: str, b: str
) -> bytes:
    """The pairwise mask seed of devices ``a`` and ``b`` (either side computes it)."""
    if not isinstance(own_s, X25519PrivateKey):
        own_s = X25519PrivateKey.from_private_bytes(own_s)
    shared = own_s.exchange(X25519PublicKey.from_public_bytes(peer_s_public))
    low, high = sorted((a, b))
    return _kdf(shared, ctx.label("mask", low, high))


def self_seed(ctx: RoundContext, b: bytes, device: str) -> bytes:
    return _kdf(b, ctx.label("self", device))


def _share_key(ctx: RoundContext, keys: DeviceKeys, peer_c: bytes, a: str, b: str) -> AESGCM:
    """The AES-GCM key ``a`` and ``b`` seal shares with (one key agreement per pair: the
    device seals to a neighbour and opens what it sent with the same key)."""
    low, high = sorted((a, b))
    label = ctx.label("share", low, high)
    cached = keys.share_keys.get((label, peer_c))
    if cached is None:
        shared = keys.c.exchange(X25519PublicKey.from_public_bytes(peer_c))
        cached = keys.share_keys[(label, peer_c)] = AESGCM(_kdf(shared, label))
    return cached


def seal_shares(
    ctx: RoundContext,
    keys: DeviceKeys,
    sender: str,
    recipient: str,
    recipient_c: bytes,
    x: int,
    s_share: bytes,
    b_share: bytes,
) -> bytes:
    """Shares of ``sender``'s two secrets for ``recipient``: nonce || AES-GCM ciphertext."""
    nonce = secrets.token_bytes(12)
    aad = ctx.label("shares", sender, recipient).encode()
    body = struct.pack(">H", x) + s_share + b_share
    return nonce + _share_key(ctx, keys, recipient_c, sender, recipient).encrypt(nonce, body, aad)


def open_shares(
    ctx: RoundContext, keys: DeviceKeys, sender: str, sender_c: bytes, recipient: str, blob: bytes
) -> tuple[int, bytes, bytes]:
    """``(x, s_share, b_share)`` that ``sender`` sealed for ``recipient`` (this device)."""
    aad = ctx.label("shares", sender, recipient).encode()
    try:
        body = _share_key(ctx, keys, sender_c, sender, recipient).decrypt(blob[:12], blob[12:], aad)
        if len(body) != 2 + 2 * SHARE_BYTES:
            raise ValueError("a share body of the wrong size")
        (x,) = struct.unpack(">H", body[:2])
        return x, body[2 : 2 + SHARE_BYTES], body[2 + SHARE_BYTES :]
    except (InvalidTag, ValueError, KeyError, TypeError):
        raise SecAggError("bad_share", f"the shares from {sender} do not open") from None


# ---------------------------------------------------------------- quantized updates


def quantize(values: np.ndarray, value_range: float, rng: np.random.Generator) -> np.ndarray:
    """``values`` clipped to ``[-range, range]`` and stochastically rounded to the int8
    levels ``[-127, 127]`` (unbiased), as int64."""
    scaled = np.clip(np.asarray(values, np.float64), -value_range, value_range)
    scaled *= LEVELS / value_range
    low = np.floor(scaled)
    q = low + (rng.random(scaled.shape) < (scaled - low))
    return np.clip(q, -LEVELS, LEVELS).astype(np.int64)


def to_ring(q: np.ndarray, bits: int) -> np.ndarray:
    """Signed integers as residues modulo ``2**bits`` (uint32)."""
    return (np.asarray(q, np.int64) % (1 << bits)).astype(np.uint32)


def from_ring(r: np.ndarray, bits: int) -> np.ndarray:
    """Residues modulo ``2**bits`` back to signed integers (the upper half is negative)."""
    v = np.asarray(r, np.int64)
    return np.where(v >= 1 << (bits - 1), v - (1 << bits), v)


def mask_vector(
    ctx: RoundContext,
    device: str,
    keys: DeviceKeys,
    peers_s: Mapping[str, bytes],
    count: int,
    bits: int,
) -> np.ndarray:
    """What ``device`` adds to its update: ``PRG(b) + sum(+-PRG(s_ij))`` mod ``2**bits``
    over ``peers_s`` (neighbour -> its ``s`` public key: the neighbours whose shares were
    relayed)."""
    modulus = np.uint64(1 << bits)
    total = prg(self_seed(ctx, keys.b, device), count, bits).astype(np.uint64)
    for peer in sorted(peers_s):
        stream = prg(pair_seed(ctx, keys.s, peers_s[peer], device, peer), count, bits)
        stream = stream.astype(np.uint64)
        total = total + stream if device < peer else total + (modulus - stream)
        total %= modulus
    return total.astype(np.uint32)


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """``values`` (each below ``2**bits``) as a little-endian bit string of ``bits`` each."""
    return _pack_residues(np.ascontiguousarray(values, dtype="<u4").reshape(-1), bits)


def unpack_bits(raw: bytes | memoryview, bits: int, count: int) -> np.ndarray:
    """The inverse of :func:`pack_bits` (``len(raw)`` must be ``ceil(count * bits / 8)``)."""
    return _unpack_residues(raw, bits, count).copy()


def packed_size(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


# ---------------------------------------------------------------- unmasking


@dataclass(frozen=True)
class Reveal:
    """One survivor's answer to the unmasking request: for each neighbour, the share of its
    self-mask seed (a survivor) or of its mask key (a dropped device), at the point ``x``."""

    b: Mapping[str, tuple[int, bytes]]
    s: Mapping[str, tuple[int, bytes]]


def unmask_sum(
    ctx: RoundContext,
    masked_sum: np.ndarray,
    *,
    survivors: Sequence[str],
    dropped: Sequence[str],
    neighbours: Mapping[str, Sequence[str]],
    s_public: Mapping[str, bytes],
    reveals: Mapping[str, Reveal],
    threshold: int,
    bits: int,
) -> np.ndarray:
    """The survivors' plain sum (signed int64) from the sum of their masked inputs mod
    ``2**bits``: rebuild each survivor's ``b`` and each dropped device's ``s_sk`` from
    ``threshold`` revealed shares, remove the self masks and the dropped devices' pairwise
    masks with survivors. Raises :class:`SecAggError` when shares are missing."""
    count = len(masked_sum)
    modulus = np.uint64(1 << bits)
    total = np.asarray(masked_sum, np.uint64) % modulus
    alive = set(survivors)

    def gathered(kind: str, device: str) -> dict[int, bytes]:
        out = {}
        for reveal in reveals.values():
            item = getattr(reveal, kind).get(device)
            if item is not None:
                out[item[0]] = item[1]
        return out

    for device in sorted(survivors):
        b = shamir_combine(gathered("b", device), threshold)
        total = (total + (modulus - prg(self_seed(ctx, b, device), count, bits))) % modulus
    for device in sorted(dropped):
        s_sk = shamir_combine(gathered("s", device), threshold)
        for peer in neighbours.get(device, ()):
            if peer not in alive:
                continue
            stream = prg(pair_seed(ctx, s_sk, s_public[peer], device, peer), count, bits)
            stream = stream.astype(np.uint64)
            # the survivor added +PRG when it sorts first, -PRG otherwise: take that back
            total = (
                (total + (modulus - stream)) % modulus
                if peer < device
                else (total + stream) % modulus
            )
    return from_ring(total.astype(np.uint32), bits)


def aggregate_digest(plain: np.ndarray) -> str:
    """The SHA-256 the ledger records of an unmasked sum (int64, little-endian)."""
    return hashlib.sha256(np.ascontiguousarray(plain, "<i8").tobytes()).hexdigest()


def _b64decode(value: str) -> bytes:
    return base64.b64decode(value, validate=True)


def recompute_aggregate(
    task: str,
    round_: int,
    base: str,
    decisions: Mapping[str, Mapping],
    masked_inputs: Sequence[np.ndarray] | None = None,
) -> tuple[str, list[str]]:
    """An auditor's unmasking of a round from the gateway's stored decisions (``roster``,
    ``unmask``, ``sum``: what it published and what it was revealed) and, when they are
    readable, the masked inputs themselves: ``(aggregate sha256, problems)``."""
    problems: list[str] = []
    roster, unmask, total = (decisions.get(k) for k in ("roster", "unmask", "sum"))
    if roster is None or unmask is None or total is None:
        missing = [k for k in ("roster", "unmask", "sum") if decisions.get(k) is None]
        return "", [f"the store lacks the round's {', '.join(missing)} record"]
    devices = sorted(roster["devices"])
    bits, k, t = int(roster["bits"]), int(roster["neighbours"]), int(roster["threshold"])
    graph = neighbour_graph(devices, k, graph_seed(task, round_, base, devices))
    s_public = {d: _b64decode(keys[1]) for d, keys in roster["devices"].items()}
    count = int(total["count"])
    masked_sum = unpack_bits(_b64decode(total["masked_sum"]), bits, count)
    if masked_inputs is not None:
        summed = np.zeros(count, np.uint64)
        for vector in masked_inputs:
            summed = (summed + np.asarray(vector, np.uint64)) % np.uint64(1 << bits)
        if not np.array_equal(summed.astype(np.uint32), masked_sum):
            problems.append("the stored masked inputs do not sum to the recorded masked sum")
    reveals = {
        device: Reveal(
            b={p: (int(x), _b64decode(v)) for p, (x, v) in item["b"].items()},
            s={p: (int(x), _b64decode(v)) for p, (x, v) in item["s"].items()},
        )
        for device, item in total["reveals"].items()
    }
    for device, reveal in reveals.items():
        if set(reveal.b) & set(reveal.s):
            problems.append(f"{device} revealed both secrets of a neighbour")
    plain = unmask_sum(
        RoundContext(task, round_), masked_sum, survivors=unmask["survivors"],
        dropped=unmask["dropped"], neighbours=graph, s_public=s_public, reveals=reveals,
        threshold=t, bits=bits,
    )  # fmt: skip
    return aggregate_digest(plain), problems
