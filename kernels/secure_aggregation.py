"""Simulated secure aggregation: fixed-point quantization onto the ring Z_{2^32} and pairwise
additive masks that cancel in the server's sum.

The protocol of Bonawitz et al. is simulated for its arithmetic and its cost, not for its
security: every pair seed is derived from one ``round_key`` that the simulator holds, where
the real protocol agrees it by Diffie-Hellman and secret-shares the secret key behind it
(Shamir, t-of-n), so that the server learns the seeds of dropped clients only. The sums are bit
for bit those of the real protocol, so an honest run can be checked exactly against the plain
sum.

Ring: ``uint32`` with its natural wrap-around, i.e. arithmetic modulo ``2**32`` (fixed in this
version). A round goes:

1. each client clips its update to L2 norm ``clip_norm`` (so every coordinate lies in
   ``[-clip_norm, clip_norm]``) and calls `quantize`;
2. it adds its pairwise masks with `mask_upload` (``peer_mask`` = the masking cohort);
3. the server sums the delivered uploads in ``uint32``, adds `dropout_correction` for the
   clients that masked but never delivered, and calls `dequantize_sum`.

Only the pairwise masks are simulated. The self masks ``b_u`` of the protocol's double
masking (which protect a client whose upload arrives after the server declared it dropped)
cancel in an honest run and do not change the sum; their secret shares are counted by
`masked_bytes_per_client`.

References:
  Bonawitz et al. 2017, "Practical Secure Aggregation for Privacy-Preserving Machine
  Learning" (pairwise masks over the complete graph of clients, seed recovery for dropped
  clients, the cost summary of Table 1); Bell et al. 2020, "Secure Single-Server
  Aggregation with (Poly)Logarithmic Overhead" (the sparse-graph variant, not used here);
  Kairouz et al. 2021, "The Distributed Discrete Gaussian Mechanism for Federated Learning with
  Secure Aggregation" (unbiased stochastic rounding onto the ring before masking).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from kernels.pytree import PyTree

RING_BITS = 32
"""Bits of the ring: uploads, masks and sums are ``uint32`` modulo ``2**32``."""

PUBLIC_KEY_BYTES = 32
"""One public key of the key agreement (X25519 / a 256-bit elliptic curve point)."""

SHARE_BYTES = 32
"""One Shamir share of a 256-bit secret (a seed or a secret key)."""

AEAD_OVERHEAD_BYTES = 16
"""Authentication tag of the authenticated encryption of one peer's shares (AES-GCM)."""

_MINUS_ONE = np.uint32(0xFFFFFFFF)


def _half_range(max_clients: int, bits: int = RING_BITS) -> int:
    """``H = ((2**bits - 1) // max_clients) // 2``; a client's integer is ``k + H``, |k| <= H."""
    if not 1 <= bits <= RING_BITS:
        raise ValueError(f"bits must be in [1, {RING_BITS}], got {bits}")
    max_clients = int(max_clients)
    if max_clients < 1:
        raise ValueError(f"max_clients must be >= 1, got {max_clients}")
    half = ((2**bits - 1) // max_clients) // 2
    if half < 1:
        raise ValueError(f"max_clients={max_clients} leaves no quantization level in {bits} bits")
    return half


def _step(clip_norm, half: int, xp):
    """The smallest power of two ``2^s`` with ``clip_norm <= half * 2^s``, exactly.

    With ``clip_norm = m * 2^e`` (``m`` in ``[0.5, 1)``, `frexp`, exact) and
    ``2^p <= half < 2^(p+1)``: ``s = e - p`` always fits (``m * 2^p < 2^p``), ``s = e - p - 1``
    fits iff ``m <= half / 2^(p+1)`` and ``s = e - p - 2`` never does. The threshold is rounded
    down to float32, so the test never accepts a step that does not fit.
    """
    p = half.bit_length() - 1
    threshold = np.float32(half / 2 ** (p + 1))
    if float(threshold) > half / 2 ** (p + 1):
        threshold = np.nextafter(threshold, np.float32(0))
    mantissa, exponent = xp.frexp(xp.asarray(clip_norm, xp.float32))
    exponent = exponent - p - (mantissa <= threshold).astype(exponent.dtype)
    return xp.ldexp(xp.asarray(1.0, xp.float32), exponent)


def ring_scale(
    clip_norm: float | jax.Array, max_clients: int, bits: int = RING_BITS
) -> float | jax.Array:
    """The quantization step of a cohort of at most ``max_clients`` clients.

    Representation (exact): with ``M = (2**bits - 1) // max_clients`` and ``H = M // 2``, a
    coordinate ``x`` in ``[-clip_norm, clip_norm]`` is rounded to ``k * step`` with ``|k| <= H``
    and uploaded as the integer ``q = k + H`` in ``[0, 2H]``, within ``[0, M]``, itself within
    ``[0, 2**bits / max_clients)``.
    The offset is thus the integer ``H`` (the shift by ``clip_norm``, rounded up to a grid
    point) and the server subtracts ``n * H`` (mod ``2**32``) from the ring sum of ``n``
    uploads. A sum of ``n <= max_clients`` uploads is at most ``max_clients * M < 2**bits``, so
    it never wraps, and its centered value ``sum k`` lies in ``[-n H, n H]``, within
    ``(-2**31, 2**31)``: an exact ``int32``.

    The step is the smallest power of two with ``H * step >= clip_norm``: dividing a float32
    by it is exact, so the stochastic rounding of `quantize` sees the exact fractional part (no
    float rounding biases it) and the reconstruction is an exact integer times the step; the
    price is at most one bit of resolution (``step < 2 * clip_norm / H``).

    Args:
      clip_norm: the bound C (> 0, a normal float32) on every coordinate (implied by a global
        L2 norm <= C); a Python number or a scalar array (then traced: no recompilation).
      max_clients: the most uploads a sum may hold (a Python int: it fixes ``H``).
      bits: the bits of the ring a client's sum of ``max_clients`` uploads may use (<= 32).

    Returns:
      The step: a Python float for a Python ``clip_norm``, else a float32 scalar array.

    References:
      Bonawitz et al. 2017 (inputs as elements of Z_R, R large enough that the sum of all
      inputs never wraps).
    """
    half = _half_range(max_clients, bits)
    if isinstance(clip_norm, int | float | np.floating | np.integer):
        if not clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
        return float(_step(clip_norm, half, np))
    return _step(clip_norm, half, jnp)


def quantize(
    tree: PyTree, key: jax.Array, clip_norm: float | jax.Array, max_clients: int
) -> PyTree:
    """Unbiased stochastic rounding of one client's update onto the ring grid.

    Each coordinate is cast to float32, NaN is replaced by 0, the value is clamped to
    ``[-clip_norm, clip_norm]`` and rounded to ``k * step`` (``step = ring_scale(clip_norm,
    max_clients)``), up with probability ``x / step - floor(x / step)``, so that
    ``E[k * step] = x`` (up to the 2^-23 resolution of the uniform draw) and
    ``|k * step - x| < step``. The upload is ``k + H`` in ``uint32`` (see `ring_scale`).

    Args:
      tree: one client's update (no client axis; `jax.vmap` for a stack), float32 or bfloat16
        leaves.
      key: a key used for nothing else (not the masking ``round_key``); leaf ``i`` draws from
        ``fold_in(key, i)``, so no key is used twice.
      clip_norm: the coordinate bound C (> 0), a Python number or a scalar array.
      max_clients: the most uploads a ring sum may hold (a Python int).

    Returns:
      A ``uint32`` pytree shaped like ``tree``, every value in ``[0, 2H]``.

    References:
      Kairouz et al. 2021 (unbiased randomized rounding onto the integer grid).
    """
    half = _half_range(max_clients)
    clip = jnp.asarray(clip_norm, jnp.float32)
    step = _step(clip, half, jnp)
    leaves, treedef = jax.tree.flatten(tree)

    def one(i, x):
        x = jnp.nan_to_num(x.astype(jnp.float32), nan=0.0)
        z = jnp.clip(x, -clip, clip) / step  # exact: step is a power of two
        low = jnp.floor(z)
        u = jax.random.uniform(jax.random.fold_in(key, i), z.shape, jnp.float32)
        k = (low + (u < z - low).astype(jnp.float32)).astype(jnp.int32)  # |k| <= half
        return lax.bitcast_convert_type(k, jnp.uint32) + jnp.uint32(half)

    return treedef.unflatten([one(i, x) for i, x in enumerate(leaves)])


def dequantize_sum(
    ring_sum_tree: PyTree,
    num_clients: jax.Array,
    clip_norm: float | jax.Array,
    max_clients: int,
    like: PyTree,
) -> PyTree:
    """The float sum of ``num_clients`` quantized uploads from their ring sum.

    Computes ``(ring_sum - num_clients * H) mod 2**32``, reads it as ``int32`` (exact while
    ``num_clients <= max_clients``, see `ring_scale`) and multiplies by the step. It is within
    ``num_clients * step`` of the float sum of the clamped inputs (one step per upload), plus
    float32 rounding of the result.

    Args:
      ring_sum_tree: ``uint32`` pytree, the ring sum of the uploads (masks already cancelled).
      num_clients: how many uploads the sum holds (<= ``max_clients``); an array, traced.
      clip_norm: the bound used by `quantize`.
      max_clients: the bound used by `quantize`.
      like: pytree whose dtypes the result takes.

    Returns:
      The float sum, shaped like ``ring_sum_tree`` with the dtypes of ``like``.
    """
    half = _half_range(max_clients)
    step = _step(jnp.asarray(clip_norm, jnp.float32), half, jnp)
    offset = jnp.asarray(num_clients).astype(jnp.uint32) * jnp.uint32(half)

    def one(s, x):
        centered = lax.bitcast_convert_type(s.astype(jnp.uint32) - offset, jnp.int32)
        return (centered.astype(jnp.float32) * step).astype(x.dtype)

    return jax.tree.map(one, ring_sum_tree, like)


def pair_mask(round_key: jax.Array, i: jax.Array, j: jax.Array, like: PyTree) -> PyTree:
    """The mask of the pair ``{i, j}``, uniform in ``uint32`` and symmetric in ``i, j``.

    The pair seed is ``fold_in(fold_in(round_key, min(i, j)), max(i, j))`` (the simulated
    outcome of the pair's key agreement). It is expanded into one stream of
    ``P = sum of leaf sizes`` words, cut into the leaves in `jax.tree.flatten` order: one PRG
    call per pair whatever the number of leaves, so the compiled loop bodies of `client_mask`
    and `dropout_correction` do not grow with the depth of the model.

    Args:
      round_key: the round's masking key, used for nothing else.
      i: a client id (int32).
      j: another client id (``j != i``).
      like: pytree whose leaf shapes the mask takes (arrays or shape structs).

    Returns:
      A ``uint32`` pytree shaped like ``like``.
    """
    i = jnp.asarray(i, jnp.int32)
    j = jnp.asarray(j, jnp.int32)
    seed = jax.random.fold_in(jax.random.fold_in(round_key, jnp.minimum(i, j)), jnp.maximum(i, j))
    leaves, treedef = jax.tree.flatten(like)
    shapes = [tuple(jnp.shape(x)) for x in leaves]
    sizes = [math.prod(shape) for shape in shapes]
    stream = jax.random.bits(seed, (sum(sizes),), jnp.uint32)
    starts = np.cumsum([0, *sizes])[:-1].tolist()
    masks = [
        stream[start : start + size].reshape(shape)
        for start, size, shape in zip(starts, sizes, shapes, strict=True)
    ]
    return treedef.unflatten(masks)


def _zeros_u32(like: PyTree) -> PyTree:
    return jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.uint32), like)


def client_mask(
    round_key: jax.Array,
    client_id: jax.Array,
    peer_ids: jax.Array,
    peer_mask: jax.Array,
    like: PyTree,
) -> PyTree:
    """The total pairwise mask of one client: ``sum_j s_ij * pair_mask(i, j)`` mod ``2**32``.

    The sum runs over the slots ``j`` with ``peer_mask[j]`` and ``peer_ids[j] != client_id``;
    ``s_ij = +1`` if ``i < j`` else ``-1`` (add the masks shared with larger ids, subtract
    those shared with smaller ones), so the masks of a pair cancel in the sum of both uploads.
    Every client masks with every other client of the cohort, the complete graph of Bonawitz
    et al. (not the sparse O(log C)-regular graph of Bell et al. 2020).

    Cost: a `lax.fori_loop` over the ``C`` slots expands one mask per slot, O(C * P) PRG words
    and additions per client for ``P`` parameters and O(C^2 * P) for a round, in O(P) memory
    (a vmap over peers would hold C masks at once).

    Args:
      round_key: the round's masking key.
      client_id: this client's id (int32).
      peer_ids: ``[C]`` int32 ids of the cohort's slots (may include ``client_id``); the ids of
        the active slots must be distinct.
      peer_mask: ``[C]`` bool, the slots that take part in masking (false for padding).
      like: pytree whose leaf shapes the mask takes.

    Returns:
      A ``uint32`` pytree shaped like ``like``.
    """
    client_id = jnp.asarray(client_id, jnp.int32)
    peer_ids = jnp.asarray(peer_ids, jnp.int32)
    peer_mask = jnp.asarray(peer_mask, bool)

    def body(slot, acc):
        peer = peer_ids[slot]
        active = peer_mask[slot] & (peer != client_id)
        sign = jnp.where(client_id < peer, jnp.uint32(1), _MINUS_ONE)  # -1 mod 2^32
        coef = jnp.where(active, sign, jnp.uint32(0))
        mask = pair_mask(round_key, client_id, peer, like)
        return jax.tree.map(lambda a, m: a + coef * m, acc, mask)

    return lax.fori_loop(0, peer_ids.shape[0], body, _zeros_u32(like))


def mask_upload(
    quantized: PyTree,
    round_key: jax.Array,
    client_id: jax.Array,
    peer_ids: jax.Array,
    peer_mask: jax.Array,
) -> PyTree:
    """One client's masked upload ``quantized + client_mask`` mod ``2**32``.

    Args:
      quantized: the client's `quantize` output (``uint32``).
      round_key: the round's masking key.
      client_id: this client's id.
      peer_ids: ``[C]`` ids of the cohort's slots.
      peer_mask: ``[C]`` bool, the masking cohort (see `client_mask`).

    Returns:
      A ``uint32`` pytree, uniformly distributed on its own whenever the client has an active
      peer.
    """
    mask = client_mask(round_key, client_id, peer_ids, peer_mask, quantized)
    return jax.tree.map(lambda q, m: q.astype(jnp.uint32) + m, quantized, mask)


def dropout_correction(
    round_key: jax.Array,
    peer_ids: jax.Array,
    masked_in: jax.Array,
    delivered: jax.Array,
    like: PyTree,
) -> PyTree:
    """What the server adds to the ring sum of delivered uploads so that all masks cancel.

    The masks of pairs of delivered clients cancel in the sum; what is left is
    ``sum_{i delivered, j dropped} s_ij * pair_mask(i, j)``, dropped meaning
    ``masked_in & ~delivered``. The server reconstructs the dropped clients' pair seeds (from
    the survivors' secret shares in the real protocol) and returns minus that sum, computed as
    ``sum_{j dropped} client_mask(j, peer_mask=delivered)`` since ``s_ji = -s_ij``.

    Cost: O(D * C * P) for ``D`` dropped clients (a `lax.cond` skips the others; under `vmap`
    it would cost O(C^2 * P)).

    Args:
      round_key: the round's masking key.
      peer_ids: ``[C]`` ids of the cohort's slots.
      masked_in: ``[C]`` bool, the cohort the clients masked with (their ``peer_mask``).
      delivered: ``[C]`` bool, the slots whose upload reached the sum (within ``masked_in``).
      like: pytree whose leaf shapes the correction takes.

    Returns:
      A ``uint32`` pytree; ``ring sum of delivered uploads + correction`` equals the ring sum
      of their quantized values exactly.

    References:
      Bonawitz et al. 2017, round 4 of the protocol (Unmasking).
    """
    peer_ids = jnp.asarray(peer_ids, jnp.int32)
    masked_in = jnp.asarray(masked_in, bool)
    delivered = jnp.asarray(delivered, bool) & masked_in
    dropped = masked_in & ~delivered

    def body(slot, acc):
        def add(acc):
            mask = client_mask(round_key, peer_ids[slot], peer_ids, delivered, like)
            return jax.tree.map(jnp.add, acc, mask)

        return lax.cond(dropped[slot], add, lambda acc: acc, acc)

    return lax.fori_loop(0, peer_ids.shape[0], body, _zeros_u32(like))


def masked_bytes_per_client(num_params: int, num_peers: int) -> dict[str, int]:
    """Bytes one client exchanges in a round of secure aggregation, against a float32 upload.

    A simple, explicit model of the rounds of Bonawitz et al. (Table 1: O(n + m) per client):

    * payload: the masked ``uint32`` vector, ``4 * num_params`` bytes, the size of a float32
      upload (0 extra at 32 bits);
    * public keys: the key pairs ``(c^PK, s^PK)`` every peer advertises, received by the
      client, ``2 * PUBLIC_KEY_BYTES`` per peer;
    * encrypted shares: one ciphertext per peer holding two shares (of ``s^SK`` and of the
      self-mask seed ``b``), ``2 * SHARE_BYTES + AEAD_OVERHEAD_BYTES`` per peer;
    * unmasking shares: one share per peer (of ``b`` or of ``s^SK``) sent to the server in
      the last round, ``SHARE_BYTES`` per peer.

    Each term is counted once per peer in the direction named (keys received, ciphertexts and
    unmasking shares sent). Not counted: the client's own two public keys, the ``n - 1``
    ciphertexts it receives from its peers, ids and framing, signatures (the actively-secure
    variant) and the consistency-check round.

    Args:
      num_params: number of parameters of the upload.
      num_peers: number of other clients in the cohort (``n - 1``).

    Returns:
      Integer byte counts: ``payload_bytes``, ``float32_bytes``, ``public_key_bytes``,
      ``encrypted_share_bytes``, ``unmasking_share_bytes``, ``extra_bytes`` (the three
      protocol terms) and ``total_bytes`` (``payload_bytes + extra_bytes``).
    """
    if num_params < 0 or num_peers < 0:
        raise ValueError(f"counts must be >= 0, got {num_params=}, {num_peers=}")
    payload = (RING_BITS // 8) * num_params
    keys = 2 * PUBLIC_KEY_BYTES * num_peers
    shares = (2 * SHARE_BYTES + AEAD_OVERHEAD_BYTES) * num_peers
    unmasking = SHARE_BYTES * num_peers
    extra = keys + shares + unmasking
    return {
        "payload_bytes": payload,
        "float32_bytes": 4 * num_params,
        "public_key_bytes": keys,
        "encrypted_share_bytes": shares,
        "unmasking_share_bytes": unmasking,
        "extra_bytes": extra,
        "total_bytes": payload + extra,
    }
