"""Tests of the simulated secure aggregation kernels (kernels/secure_aggregation.py): the ring
grid of `ring_scale`, unbiased `quantize`, `dequantize_sum`, and pairwise masks that cancel
bit for bit, dropped clients included."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import (
    client_mask,
    dequantize_sum,
    dropout_correction,
    mask_upload,
    masked_bytes_per_client,
    pair_mask,
    quantize,
    ring_scale,
)

RING = 2**32


def half_range(max_clients: int) -> int:
    """The documented offset ``H = ((2**32 - 1) // max_clients) // 2``."""
    return ((RING - 1) // max_clients) // 2


def update_like(rng: np.random.Generator, lead: tuple[int, ...] = ()) -> dict:
    """A pytree with float32, bfloat16 and scalar leaves, values in about [-2, 2]."""
    return {
        "w": jnp.asarray(rng.uniform(-2, 2, size=lead + (2, 5)), jnp.float32),
        "b": {"c": jnp.asarray(rng.uniform(-2, 2, size=lead + (3,)), jnp.bfloat16)},
        "s": jnp.asarray(rng.uniform(-2, 2, size=lead), jnp.float32),
    }


def ring_sum(stacked: dict, keep: np.ndarray) -> dict:
    """The uint32 (mod 2**32) sum over the leading axis of the slots with ``keep``."""
    keep = jnp.asarray(keep)
    return jax.tree.map(
        lambda x: jnp.sum(
            jnp.where(keep.reshape((-1,) + (1,) * (x.ndim - 1)), x, jnp.uint32(0)),
            axis=0,
            dtype=jnp.uint32,
        ),
        stacked,
    )


def as_int(tree: dict) -> list[np.ndarray]:
    return [np.asarray(x).astype(np.int64) for x in jax.tree.leaves(tree)]


# --- the grid ---------------------------------------------------------------------------------


GRIDS = [(1.0, 1), (0.37, 1000), (2.5, 3), (3.0, 7), (1.0, 2**24), (1e-3, 500)]


def test_ring_scale_is_the_smallest_power_of_two_that_covers_clip_norm():
    steps = jax.jit(lambda clips: [ring_scale(clips[k], m) for k, (_, m) in enumerate(GRIDS)])
    traced = steps([jnp.float32(c) for c, _ in GRIDS])
    for (clip_norm, max_clients), step_traced in zip(GRIDS, traced, strict=True):
        step = ring_scale(clip_norm, max_clients)
        assert isinstance(step, float) and float(step_traced) == step
        half = half_range(max_clients)
        assert np.log2(step) == np.round(np.log2(step))  # a power of two
        assert half * step >= float(np.float32(clip_norm)) > half * step / 2  # covers, smallest
        assert max_clients * 2 * half < RING  # a full cohort's sum never wraps


def test_ring_scale_rejects_a_ring_too_small():
    with pytest.raises(ValueError):
        ring_scale(1.0, 2**31)
    with pytest.raises(ValueError):
        ring_scale(1.0, 10, bits=33)
    with pytest.raises(ValueError):
        ring_scale(0.0, 10)
    assert ring_scale(1.0, 4, bits=8) == 2.0**-4  # H = (255 // 4) // 2 = 31, step 1/16


def test_no_wrap_around_at_the_max_clients_bound():
    # Row 0: every coordinate at +clip_norm, row 1: at -clip_norm (and one beyond, clamped).
    signs = np.array([1.0, -1.0], np.float32)
    unit = {
        "w": np.broadcast_to(signs[:, None, None], (2, 2, 5)).copy(),
        "s": signs,
        "c": np.broadcast_to(signs[:, None], (2, 3)).astype(jnp.bfloat16),
    }
    unit["w"][:, 0, 0] *= 10.0
    for clip_norm, max_clients in GRIDS[:3]:
        extreme = {name: (clip_norm * x).astype(x.dtype) for name, x in unit.items()}

        @jax.jit
        def full_cohort(extreme, key, clip_norm=clip_norm, max_clients=max_clients):
            q = quantize(extreme, key, clip_norm, max_clients)  # coordinate-wise: rows apart
            copies = jax.tree.map(lambda u: jnp.broadcast_to(u, (max_clients, *u.shape)), q)
            total = ring_sum(copies, jnp.ones(max_clients, bool))
            out = jax.vmap(dequantize_sum, in_axes=(0, None, None, None, None))(
                total, jnp.int32(max_clients), clip_norm, max_clients, extreme
            )
            return q, total, out

        q, total, out = full_cohort(extreme, jax.random.key(1))
        half, step = half_range(max_clients), ring_scale(clip_norm, max_clients)
        for leaf in as_int(q):
            assert np.all((0 <= leaf) & (leaf <= 2 * half))
            assert np.all(leaf * max_clients < RING)  # the exact integer sum fits the ring
        for got, leaf in zip(as_int(total), as_int(q), strict=True):
            np.testing.assert_array_equal(got, leaf * max_clients)  # no wrap-around
        chex.assert_trees_all_equal_dtypes(out, extreme)
        for leaf in jax.tree.leaves(out):
            rtol = 1e-2 if leaf.dtype == jnp.bfloat16 else 1e-6
            for sign, row in zip(signs, np.asarray(leaf, np.float64), strict=True):
                expected = sign * max_clients * float(np.float32(clip_norm))
                np.testing.assert_allclose(row, expected, rtol=rtol, atol=max_clients * step)


# --- quantize / dequantize_sum ----------------------------------------------------------------


def test_quantize_is_unbiased_and_within_one_step():
    clip_norm, max_clients = 1.0, 2**24  # step 1/64: coarse, so the rounding shows
    step, half = ring_scale(clip_norm, max_clients), half_range(max_clients)
    assert step == 2.0**-6
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=64).astype(np.float32)
    x[:4] = [1.0, -1.0, 0.0, 3 * step + step / 3]
    tree = {"a": jnp.asarray(x), "b": jnp.asarray(x)}
    num_keys = 4000
    keys = jax.random.split(jax.random.key(0), num_keys)
    q = jax.jit(jax.vmap(lambda k: quantize(tree, k, clip_norm, max_clients)))(keys)
    values = {name: (leaf - half) * step for name, leaf in zip("ab", as_int(q), strict=True)}
    for v in values.values():
        assert np.all(np.abs(v - x) < step)  # rounds to a neighbouring grid point
        # Var <= step^2 / 4 per draw: the mean is within 5 standard errors.
        np.testing.assert_allclose(v.mean(0), x, rtol=0, atol=5 * step / 2 / np.sqrt(num_keys))
    # The leaves draw from different keys: equal inputs, different roundings.
    assert not np.array_equal(values["a"], values["b"])


def test_quantize_of_bfloat16_nan_and_out_of_range():
    clip_norm, max_clients = 2.0, 100
    half, step = half_range(max_clients), ring_scale(clip_norm, max_clients)
    tree = {"x": jnp.array([0.5, -7.0, 7.0, np.nan], jnp.bfloat16)}
    q = jax.jit(lambda t, k: quantize(t, k, clip_norm, max_clients))(tree, jax.random.key(3))
    assert q["x"].dtype == jnp.uint32
    got = (as_int(q)[0] - half) * step
    np.testing.assert_array_equal(got, [0.5, -2.0, 2.0, 0.0])  # grid points round exactly


def test_dequantize_sum_is_within_one_step_per_client_and_traces_num_clients():
    clip_norm, max_clients, num_slots = 1.5, 64, 10
    step = ring_scale(clip_norm, max_clients)

    @jax.jit
    def encode(stacked, key, keep):
        return ring_sum(quantize(stacked, key, clip_norm, max_clients), keep)

    decode = jax.jit(lambda total, n, like: dequantize_sum(total, n, clip_norm, max_clients, like))
    for seed in range(3):
        rng = np.random.default_rng(seed)
        stacked = update_like(rng, (num_slots,))
        like = jax.tree.map(lambda x: x[0], stacked)
        for n in (num_slots, 3, 1):  # the same compiled program for every num_clients
            total = encode(stacked, jax.random.key(seed), np.arange(num_slots) < n)
            out = decode(total, jnp.int32(n), like)
            chex.assert_trees_all_equal_dtypes(out, like)
            for got, x in zip(jax.tree.leaves(out), jax.tree.leaves(stacked), strict=True):
                expected = np.clip(np.asarray(x[:n], np.float64), -clip_norm, clip_norm).sum(0)
                slack = 1e-2 * np.abs(expected) if got.dtype == jnp.bfloat16 else 1e-6
                assert np.all(np.abs(np.asarray(got, np.float64) - expected) <= n * step + slack)
    assert decode._cache_size() == 1  # num_clients was traced


# --- masks ------------------------------------------------------------------------------------


def cohort(rng: np.random.Generator, num_slots: int) -> tuple[np.ndarray, ...]:
    """Distinct ids, a masking cohort with padding slots, and a delivered subset of it."""
    ids = rng.choice(2**31 - 1, size=num_slots, replace=False).astype(np.int32)
    masked_in = rng.random(num_slots) < 0.75
    delivered = masked_in & (rng.random(num_slots) < 0.6)
    return ids, masked_in, delivered


SLOT_CLIP_NORM, SLOT_MAX_CLIENTS = 1.0, 16


@jax.jit
def secure_round(stacked, quant_key, round_key, ids, masked_in, delivered):
    """One simulated round; returns (corrected masked sum, plain sum, uncorrected masked sum)."""
    # Rounding is per coordinate: one key for the whole stack (a vmap over per-client keys
    # gives the same kind of uploads, at a higher compile cost).
    q = quantize(stacked, quant_key, SLOT_CLIP_NORM, SLOT_MAX_CLIENTS)
    masked = jax.vmap(mask_upload, in_axes=(0, None, 0, None, None))(
        q, round_key, ids, ids, masked_in
    )
    like = jax.tree.map(lambda x: x[0], q)
    correction = dropout_correction(round_key, ids, masked_in, delivered, like)
    uncorrected = ring_sum(masked, delivered)
    return jax.tree.map(jnp.add, uncorrected, correction), ring_sum(q, delivered), uncorrected


@pytest.mark.parametrize("num_slots", [1, 3, 8])
def test_masked_sum_plus_dropout_correction_equals_the_quantized_sum_bit_for_bit(num_slots):
    for seed in range(4):
        rng = np.random.default_rng(100 * num_slots + seed)
        ids, masked_in, delivered = cohort(rng, num_slots)
        if seed == 0:  # everyone masks; every other slot delivers
            masked_in[:] = True
            delivered = np.arange(num_slots) % 2 == 0
        elif seed == 1:  # everyone delivers: nothing to correct
            delivered = masked_in.copy()
        stacked = update_like(rng, (num_slots,))
        quant_key, round_key = jax.random.split(jax.random.key(seed))
        recovered, plain, uncorrected = secure_round(
            stacked, quant_key, round_key, ids, masked_in, delivered
        )
        for got, want in zip(jax.tree.leaves(recovered), jax.tree.leaves(plain), strict=True):
            assert got.dtype == want.dtype == jnp.uint32
            assert np.array_equal(got, want)
        if delivered.any() and (masked_in & ~delivered).any():
            # Masks were left over: without the correction the sum is wrong.
            assert not np.array_equal(uncorrected["w"], plain["w"])


def test_masks_of_a_full_cohort_sum_to_zero():
    rng = np.random.default_rng(7)
    ids = jnp.asarray(rng.choice(10_000, size=6, replace=False).astype(np.int32))
    like = {"w": jax.ShapeDtypeStruct((4, 3), jnp.float32), "b": jnp.zeros((), jnp.bfloat16)}
    everyone = jnp.ones(6, bool)

    # Rows 0-5: each client of the full cohort; row 6: client 0 with only padding for peers.
    clients = jnp.concatenate([ids, ids[:1]])
    peer_masks = jnp.stack([everyone] * 6 + [everyone.at[1:].set(False)])
    # Nothing to correct when everybody or nobody delivered.
    deliveries = jnp.stack([everyone, ~everyone])

    @jax.jit
    def masks_and_corrections(key):
        masks = jax.vmap(client_mask, in_axes=(None, 0, None, 0, None))(
            key, clients, ids, peer_masks, like
        )
        corrections = jax.vmap(dropout_correction, in_axes=(None, None, None, 0, None))(
            key, ids, everyone, deliveries, like
        )
        cohort_masks = jax.tree.map(lambda x: x[:6], masks)
        zeros = [
            ring_sum(cohort_masks, everyone),  # the masks cancel
            jax.tree.map(lambda x: x[6], masks),  # alone: no mask
            jax.tree.map(lambda x: x[0], corrections),
            jax.tree.map(lambda x: x[1], corrections),
        ]
        return cohort_masks, zeros

    cohort_masks, zeros = masks_and_corrections(jax.random.key(11))
    assert all(np.any(x) for x in jax.tree.leaves(cohort_masks))  # no client's mask is zero
    for tree in zeros:
        chex.assert_trees_all_equal_shapes(tree, like)
        assert all(x.dtype == jnp.uint32 and not np.any(x) for x in jax.tree.leaves(tree))


def test_a_single_masked_upload_looks_uniform():
    num_params, clip_norm, max_clients = 8192, 1.0, 32
    rng = np.random.default_rng(1)
    update = {"w": jnp.asarray(rng.normal(0, 0.01, size=num_params), jnp.float32)}
    ids = jnp.array([3, 17, 40], jnp.int32)

    @jax.jit
    def upload(update, quant_key, round_key):
        q = quantize(update, quant_key, clip_norm, max_clients)
        return q, mask_upload(q, round_key, ids[1], ids, jnp.ones(3, bool))

    q, masked = upload(update, jax.random.key(0), jax.random.key(1))
    words = np.asarray(masked["w"]).astype(np.int64)
    assert np.mean(words == np.asarray(q["w"])) < 1e-3
    # Chi-square of the top 4 bits against uniform (15 degrees of freedom; loose bound).
    counts = np.bincount(words >> 28, minlength=16)
    expected = num_params / 16
    assert np.sum((counts - expected) ** 2 / expected) < 60
    np.testing.assert_allclose(words.mean() / RING, 0.5, atol=5 / np.sqrt(12 * num_params))
    # The quantized values alone are far from uniform: all near the offset H.
    assert np.bincount(np.asarray(q["w"]).astype(np.int64) >> 28, minlength=16).max() == num_params


def test_pair_mask_is_symmetric_and_distinct_across_pairs_and_leaves():
    like = {"a": jnp.zeros(256), "b": jnp.zeros(256)}
    pairs = jnp.array([[2, 9], [9, 2], [2, 8]], jnp.int32)
    masks = jax.jit(jax.vmap(pair_mask, in_axes=(None, 0, 0, None)))(
        jax.random.key(5), pairs[:, 0], pairs[:, 1], like
    )
    m_ij, m_ji, m_other = (jax.tree.map(lambda x, r=r: x[r], masks) for r in range(3))
    chex.assert_trees_all_equal(m_ij, m_ji)
    assert m_ij["a"].dtype == jnp.uint32
    assert not np.array_equal(m_ij["a"], m_ij["b"])  # one stream cut into leaves
    assert not np.array_equal(m_ij["a"], m_other["a"])


def test_masked_bytes_per_client_closed_form():
    cost = masked_bytes_per_client(num_params=1_000_000, num_peers=99)
    assert cost["payload_bytes"] == cost["float32_bytes"] == 4_000_000
    assert cost["public_key_bytes"] == 99 * 64
    assert cost["encrypted_share_bytes"] == 99 * 80
    assert cost["unmasking_share_bytes"] == 99 * 32
    assert cost["extra_bytes"] == 99 * 176
    assert cost["total_bytes"] == 4_000_000 + 99 * 176
    assert masked_bytes_per_client(10, 0)["extra_bytes"] == 0
