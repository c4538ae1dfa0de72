"""SecAgg+ primitives: Shamir, the neighbour graph, masks that cancel, exact unmasking with
devices dropping after sharing."""

from __future__ import annotations

import numpy as np
import pytest

from fedcore.secagg import (
    LEVELS,
    DeviceKeys,
    Reveal,
    RoundContext,
    SecAggError,
    default_neighbours,
    from_ring,
    graph_seed,
    mask_vector,
    modulus_bits,
    neighbour_graph,
    open_shares,
    pack_bits,
    quantize,
    seal_shares,
    shamir_combine,
    shamir_split,
    share_threshold,
    to_ring,
    unmask_sum,
    unpack_bits,
)


def test_any_threshold_shares_rebuild_and_fewer_do_not():
    secret = bytes(range(32))
    shares = shamir_split(secret, [1, 2, 3, 4, 5], 3)
    assert shamir_combine({x: shares[x] for x in (5, 1, 3)}, 3) == secret
    assert shamir_combine({x: shares[x] for x in (2, 4, 5)}, 3) == secret
    with pytest.raises(SecAggError, match="2 shares, 3 needed"):
        shamir_combine({x: shares[x] for x in (2, 4)}, 3)
    # two shares read as a threshold-2 sharing rebuild another number, not the secret
    assert shamir_combine({x: shares[x] for x in (2, 4)}, 2) != secret
    # a share changed by one bit rebuilds another number (shares carry no integrity of
    # their own: they travel AES-GCM sealed, and revealed ones in signed frames)
    bad = dict(shares)
    bad[1] = (int.from_bytes(bad[1], "big") ^ 1).to_bytes(33, "big")
    assert shamir_combine({x: bad[x] for x in (1, 2, 3)}, 3) != secret


def test_graph_is_symmetric_regular_and_seeded():
    devices = [f"d{i:03d}" for i in range(40)]
    graph = neighbour_graph(devices, 8, b"seed")
    assert all(len(n) == 8 for n in graph.values())
    assert all(a in graph[b] for a, ns in graph.items() for b in ns)
    assert neighbour_graph(reversed(devices), 8, b"seed") == graph
    assert neighbour_graph(devices, 8, b"other") != graph
    assert neighbour_graph(devices[:5], 8, b"s")["d000"] == ("d001", "d002", "d003", "d004")
    odd = neighbour_graph(devices, 7, b"seed")
    assert all(len(n) == 7 for n in odd.values())


def test_parameters():
    assert modulus_bits(100) == 15 and modulus_bits(1000) == 18 and modulus_bits(1) == 8
    # the sum of n extreme int8 values never wraps
    for n in (1, 10, 100, 129, 1000):
        bits = modulus_bits(n)
        assert 2 * LEVELS * n < 1 << bits
    assert default_neighbours(10) == 9 and default_neighbours(100) == 28
    assert share_threshold(28, 0.5) == 14 and share_threshold(3, 0.01) == 1


@pytest.mark.parametrize("bits", [8, 12, 15, 18, 32])
def test_bit_packing_round_trips(bits):
    rng = np.random.default_rng(bits)
    values = rng.integers(0, 1 << bits, size=1001, dtype=np.uint64).astype(np.uint32)
    raw = pack_bits(values, bits)
    assert len(raw) == (1001 * bits + 7) // 8
    assert np.array_equal(unpack_bits(raw, bits, 1001), values)


def test_quantization_is_unbiased_and_bounded():
    rng = np.random.default_rng(0)
    x = np.full(200_000, 0.013)
    q = quantize(x, 0.5, rng)
    assert q.min() >= -LEVELS and q.max() <= LEVELS
    assert abs(q.mean() * 0.5 / LEVELS - 0.013) < 2e-4
    assert set(np.unique(quantize(np.array([9.0, -9.0]), 0.5, rng))) == {-LEVELS, LEVELS}
    assert np.array_equal(from_ring(to_ring(q, 15), 15), q)


def run_round(updates, dropped=(), *, k=None, fraction=0.5, task="t", round_=3):
    """The whole protocol in memory; returns (unmasked sum, plain sum of survivors)."""
    ctx = RoundContext(task, round_)
    devices = sorted(updates)
    n = len(devices)
    bits = modulus_bits(n)
    k = default_neighbours(n) if k is None else k
    t = share_threshold(k, fraction)
    graph = neighbour_graph(devices, k, graph_seed(task, round_, "base", devices))
    keys = {d: DeviceKeys() for d in devices}
    public = {d: keys[d].public() for d in devices}
    inbox = {d: {} for d in devices}
    for d in devices:
        xs = list(range(1, len(graph[d]) + 1))
        s_sh = shamir_split(keys[d].s_private, xs, t)
        b_sh = shamir_split(keys[d].b, xs, t)
        for x, peer in zip(xs, graph[d], strict=True):
            inbox[peer][d] = seal_shares(
                ctx, keys[d], d, peer, public[peer][0], x, s_sh[x], b_sh[x]
            )
    survivors = [d for d in devices if d not in set(dropped)]
    count = len(next(iter(updates.values())))
    total = np.zeros(count, np.uint64)
    for d in survivors:
        masks = mask_vector(ctx, d, keys[d], {p: public[p][1] for p in graph[d]}, count, bits)
        y = (to_ring(updates[d], bits).astype(np.uint64) + masks) % (1 << bits)
        total = (total + y) % (1 << bits)
    reveals = {}
    for d in survivors:
        opened = {p: open_shares(ctx, keys[d], p, public[p][0], d, inbox[d][p]) for p in graph[d]}
        reveals[d] = Reveal(
            b={p: (x, b) for p, (x, _s, b) in opened.items() if p in survivors},
            s={p: (x, s) for p, (x, s, _b) in opened.items() if p not in survivors},
        )
    got = unmask_sum(
        ctx, total, survivors=survivors, dropped=list(dropped), neighbours=graph,
        s_public={d: public[d][1] for d in devices}, reveals=reveals, threshold=t, bits=bits,
    )  # fmt: skip
    plain = sum(updates[d].astype(np.int64) for d in survivors)
    return got, plain


@pytest.mark.parametrize("drop_fraction", [0.0, 0.1, 0.3])
def test_unmasked_sum_is_exact_with_dropouts(drop_fraction):
    rng = np.random.default_rng(7)
    devices = [f"dev-{i:02d}" for i in range(20)]
    updates = {d: rng.integers(-LEVELS, LEVELS + 1, size=300) for d in devices}
    dropped = devices[: int(drop_fraction * len(devices))]
    got, plain = run_round(updates, dropped)
    assert np.array_equal(got, plain)


def test_one_masked_input_alone_looks_random():
    rng = np.random.default_rng(1)
    devices = [f"d{i}" for i in range(6)]
    updates = {d: np.zeros(4000, dtype=np.int64) for d in devices}
    ctx = RoundContext("t", 0)
    keys = {d: DeviceKeys() for d in devices}
    bits = modulus_bits(6)
    masks = mask_vector(
        ctx, "d0", keys["d0"], {p: keys[p].public()[1] for p in devices[1:]}, 4000, bits
    )
    # an all-zero update masked: spread over the whole ring, nothing like zeros
    assert np.count_nonzero(masks) > 3900
    assert abs(masks.mean() / (1 << bits) - 0.5) < 0.03
    assert np.array_equal(run_round(updates)[0], np.zeros(4000))
    del rng


def test_too_many_dropped_neighbours_cannot_unmask():
    devices = [f"d{i:02d}" for i in range(12)]
    updates = {d: np.ones(10, dtype=np.int64) for d in devices}
    with pytest.raises(SecAggError, match="needed"):
        run_round(updates, devices[:9], k=4, fraction=1.0)


def test_shares_open_only_for_their_recipient():
    ctx = RoundContext("t", 1)
    a, b, c = DeviceKeys(), DeviceKeys(), DeviceKeys()
    blob = seal_shares(ctx, a, "a", "b", b.public()[0], 2, b"s" * 33, b"b" * 33)
    assert open_shares(ctx, b, "a", a.public()[0], "b", blob) == (2, b"s" * 33, b"b" * 33)
    with pytest.raises(SecAggError, match="do not open"):
        open_shares(ctx, c, "a", a.public()[0], "c", blob)
    with pytest.raises(SecAggError, match="do not open"):
        open_shares(RoundContext("t", 2), b, "a", a.public()[0], "b", blob)
