"""Byzantine attacks on a stack of client uploads, for robustness experiments.

Every attack takes a per-client pytree ``stacked`` with leaves ``[C, *shape]`` and a ``[C]``
``malicious`` mask (bool or 0/1), and returns the stack with only the malicious rows replaced:
every other row, benign or padding, is returned bit for bit, and every leaf keeps its dtype.
Attacks that look at the honest uploads take a ``[C]`` ``benign`` mask too; rows outside it
are ignored even if they hold NaN. Strengths may be traced arrays, so changing them never
recompiles.

References:
  Bagdasaryan et al. 2020, "How To Backdoor Federated Learning" (model replacement by scaling).
  Baruch, Baruch, Goldberg 2019, "A Little Is Enough: Circumventing Defenses For Distributed
  Learning" (ALIE).
  Xie, Koyejo, Gupta 2020, "Fall of Empires: Breaking Byzantine-tolerant SGD by Inner Product
  Manipulation" (IPM).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.stats import norm
from jax.typing import ArrayLike

from kernels.pytree import PyTree


def _rows(mask: jax.Array, x: jax.Array) -> jax.Array:
    """``mask`` reshaped to broadcast against a ``[C, *shape]`` leaf."""
    return mask.reshape((-1,) + (1,) * (x.ndim - 1))


def _replace(
    stacked: PyTree, malicious: ArrayLike, attack: Callable[[jax.Array], jax.Array]
) -> PyTree:
    """Replaces the malicious rows of every leaf ``x`` by ``attack(x)`` (float32, broadcast to
    ``x``'s shape, cast to ``x``'s dtype); the other rows are kept bit for bit."""
    malicious = jnp.asarray(malicious) > 0
    return jax.tree.map(
        lambda x: jnp.where(
            _rows(malicious, x), jnp.broadcast_to(attack(x), x.shape).astype(x.dtype), x
        ),
        stacked,
    )


def _benign_moments(x: jax.Array, benign: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-coordinate mean and population standard deviation over the benign rows (float32);
    zeros where no row is benign."""
    b = _rows(benign, x)
    count = jnp.maximum(jnp.sum(benign), 1).astype(jnp.float32)
    x = jnp.where(b, x.astype(jnp.float32), 0.0)
    mean = jnp.sum(x, axis=0) / count
    var = jnp.sum(jnp.where(b, jnp.square(x - mean), 0.0), axis=0) / count
    return mean, jnp.sqrt(var)


def sign_flip(stacked: PyTree, malicious: ArrayLike, scale: ArrayLike = 1.0) -> PyTree:
    """Sign flipping: each malicious client uploads ``-scale * x`` instead of its own ``x``.

    Args:
      stacked: per-client pytree ``[C, *shape]``.
      malicious: ``[C]`` bool or 0/1, which clients attack.
      scale: the factor applied after flipping (>= 0); may be a traced array.

    Returns:
      The stack with the malicious rows replaced.
    """
    scale = jnp.asarray(scale, jnp.float32)
    return _replace(stacked, malicious, lambda x: -scale * x.astype(jnp.float32))


def scaling(stacked: PyTree, malicious: ArrayLike, factor: ArrayLike) -> PyTree:
    """Scaling (model replacement): each malicious client uploads ``factor * x``.

    Args:
      stacked: per-client pytree ``[C, *shape]``.
      malicious: ``[C]`` bool or 0/1, which clients attack.
      factor: the boost, e.g. the number of clients per round over the server learning rate so
        that the malicious update replaces the average; may be a traced array.

    Returns:
      The stack with the malicious rows replaced.

    References:
      Bagdasaryan et al. 2020, "How To Backdoor Federated Learning", Section 4.2 (constrain
      and scale, model replacement).
    """
    factor = jnp.asarray(factor, jnp.float32)
    return _replace(stacked, malicious, lambda x: factor * x.astype(jnp.float32))


def gaussian_noise_attack(
    stacked: PyTree, malicious: ArrayLike, key: jax.Array, stddev: ArrayLike
) -> PyTree:
    """Gaussian attack: each malicious client uploads ``N(0, stddev^2)`` noise.

    Leaf ``j`` (in `jax.tree.leaves` order) draws from ``jax.random.fold_in(key, j)``, so no two
    leaves share a key and ``key`` itself is never drawn from.

    Args:
      stacked: per-client pytree ``[C, *shape]``.
      malicious: ``[C]`` bool or 0/1, which clients attack.
      key: a PRNG key, used for nothing else.
      stddev: the noise standard deviation; may be a traced array.

    Returns:
      The stack with the malicious rows replaced by independent noise.
    """
    stddev = jnp.asarray(stddev, jnp.float32)
    leaves, treedef = jax.tree.flatten(stacked)
    noise = [
        stddev * jax.random.normal(jax.random.fold_in(key, j), x.shape, jnp.float32)
        for j, x in enumerate(leaves)
    ]
    malicious = jnp.asarray(malicious) > 0
    out = [
        jnp.where(_rows(malicious, x), e.astype(x.dtype), x)
        for x, e in zip(leaves, noise, strict=True)
    ]
    return jax.tree.unflatten(treedef, out)


def alie_z(n: ArrayLike, f: ArrayLike) -> jax.Array:
    """The ALIE deviation ``z_max`` for ``n`` clients of which ``f`` are malicious.

    ``s = floor(n / 2 + 1) - f`` benign clients must be swayed, and
    ``z = Phi^{-1}((n - s) / n)``, clamped to ``[0, Phi^{-1}(1 - 2^-24)]`` (about 5.3) so that
    a malicious majority gives a large finite ``z`` rather than inf or NaN.

    Args:
      n: the number of counted clients, benign and malicious; may be a traced array.
      f: the number of malicious clients; may be a traced array.

    Returns:
      The float32 scalar ``z``.

    References:
      Baruch, Baruch, Goldberg 2019, "A Little Is Enough: Circumventing Defenses For
      Distributed Learning", Section 4 (Algorithm 3, the choice of z_max).
    """
    n = jnp.asarray(n, jnp.float32)
    f = jnp.asarray(f, jnp.float32)
    s = jnp.floor(n / 2.0 + 1.0) - f
    p = (n - s) / jnp.maximum(n, 1.0)
    p = jnp.clip(p, 0.5, 1.0 - float(np.finfo(np.float32).epsneg))
    return jnp.maximum(norm.ppf(p), 0.0).astype(jnp.float32)


def alie(
    stacked: PyTree,
    malicious: ArrayLike,
    benign: ArrayLike,
    z: ArrayLike | None = None,
) -> PyTree:
    """A Little Is Enough: each malicious client uploads ``mu - z * sigma``.

    ``mu`` and ``sigma`` are the per-coordinate mean and population standard deviation of the
    benign rows; the malicious clients all upload the same vector, which stays within the
    spread of the honest uploads yet shifts every coordinate the same way.

    Args:
      stacked: per-client pytree ``[C, *shape]``.
      malicious: ``[C]`` bool or 0/1, which clients attack.
      benign: ``[C]`` bool or 0/1, the honest clients whose statistics the attackers know
        (disjoint from ``malicious``).
      z: the deviation in standard deviations; None computes it by `alie_z` with ``n`` the
        number of benign and malicious clients and ``f`` the number of malicious ones. May be a
        traced array.

    Returns:
      The stack with the malicious rows replaced.

    References:
      Baruch, Baruch, Goldberg 2019, "A Little Is Enough: Circumventing Defenses For
      Distributed Learning", Section 4 (Algorithm 3).
    """
    malicious = jnp.asarray(malicious) > 0
    benign = jnp.asarray(benign) > 0
    if z is None:
        z = alie_z(jnp.sum(benign | malicious), jnp.sum(malicious))
    z = jnp.asarray(z, jnp.float32)

    def attack(x):
        mean, std = _benign_moments(x, benign)
        return mean - z * std

    return _replace(stacked, malicious, attack)


def ipm(stacked: PyTree, malicious: ArrayLike, benign: ArrayLike, epsilon: ArrayLike) -> PyTree:
    """Inner product manipulation: each malicious client uploads ``-epsilon * mean(benign)``.

    Args:
      stacked: per-client pytree ``[C, *shape]``.
      malicious: ``[C]`` bool or 0/1, which clients attack.
      benign: ``[C]`` bool or 0/1, the honest clients whose mean the attackers know.
      epsilon: the strength (small, e.g. 0.1, to defeat median-like rules; large, e.g. 100,
        against the mean); may be a traced array.

    Returns:
      The stack with the malicious rows replaced (by zeros where no client is benign).

    References:
      Xie, Koyejo, Gupta 2020, "Fall of Empires: Breaking Byzantine-tolerant SGD by Inner
      Product Manipulation", Section 4.
    """
    benign = jnp.asarray(benign) > 0
    epsilon = jnp.asarray(epsilon, jnp.float32)
    return _replace(stacked, malicious, lambda x: -epsilon * _benign_moments(x, benign)[0])
