"""Partitioners: split a labelled example pool into clients with controlled heterogeneity.

Every partitioner has the signature
`(labels: np.ndarray [N], num_clients: int, seed: int, **kwargs) -> list[np.ndarray]` and returns,
for each client, the sorted indices of its examples. The result is a partition (every example is
used exactly once) and every client gets at least `min_examples` (default 2) examples. The one
exception is `natural`, whose "labels" are the values of a column such as user or file: it makes
one client per value and leaves out the examples of values with fewer than `min_examples` (see
`natural_clients`, which reports them).

They are vectorized numpy: each computes a client id per example and the lists come from one stable
argsort, so splitting 100k examples into 10k clients takes milliseconds. Loops run only over labels
or over a handful of rebalancing rounds, never over examples.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "DIRICHLET_OVER",
    "PARTITIONERS",
    "dirichlet_partition",
    "format_partition_stats",
    "NaturalClients",
    "iid_partition",
    "natural_clients",
    "natural_partition",
    "partition",
    "partition_convention",
    "partition_stats",
    "pathological_partition",
    "quantity_skew_partition",
]

Partitioner = Callable[..., list[np.ndarray]]


# ----------------------------------------------------------------------------------------------
# Shared helpers.
# ----------------------------------------------------------------------------------------------


def _check_common(labels: np.ndarray, num_clients: int, seed: int, min_examples: int) -> np.ndarray:
    """Validates the arguments every partitioner takes and returns labels as an int64 array."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D array, got shape {labels.shape}.")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}.")
    if isinstance(num_clients, bool) or int(num_clients) != num_clients or num_clients < 1:
        raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}.")
    if isinstance(min_examples, bool) or int(min_examples) != min_examples or min_examples < 1:
        raise ValueError(f"min_examples must be a positive integer, got {min_examples!r}.")
    if isinstance(seed, bool) or int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    n = labels.size
    if n < num_clients * min_examples:
        raise ValueError(
            f"num_clients={num_clients} with min_examples={min_examples} needs at least "
            f"{num_clients * min_examples} examples, but there are {n}; lower num_clients "
            f"(at most {n // min_examples}) or min_examples, or generate more examples."
        )
    return labels.astype(np.int64, copy=False)


def _split_by_client(client_of: np.ndarray, num_clients: int) -> list[np.ndarray]:
    """Turns a client id per example into each client's sorted example indices."""
    # A stable sort keeps indices ascending within a client, which makes the output canonical.
    order = np.argsort(client_of, kind="stable")
    counts = np.bincount(client_of, minlength=num_clients)
    return np.split(order, np.cumsum(counts)[:-1])


def _equal_sizes(n: int, num_clients: int, rng: np.random.Generator) -> np.ndarray:
    """Sizes differing by at most one; which clients get the extra example is random."""
    sizes = np.full(num_clients, n // num_clients, dtype=np.int64)
    sizes[rng.permutation(num_clients)[: n % num_clients]] += 1
    return sizes


def _assign_by_sizes(sizes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Client id per example for a uniformly random split with the given client sizes."""
    n = int(sizes.sum())
    client_of = np.empty(n, dtype=np.int64)
    client_of[rng.permutation(n)] = np.repeat(np.arange(sizes.size), sizes)
    return client_of


# ----------------------------------------------------------------------------------------------
# Partitioners.
# ----------------------------------------------------------------------------------------------


def iid_partition(
    labels: np.ndarray, num_clients: int, seed: int, *, min_examples: int = 2
) -> list[np.ndarray]:
    """Uniformly random split into clients of equal size (differing by at most one).

    Args:
        labels: [N] integer labels (only N is used; labels are IID across clients).
        num_clients: Number of clients M.
        seed: Non-negative integer seed.
        min_examples: Minimum number of examples per client.

    Returns:
        M arrays of sorted example indices forming a partition of `range(N)`.

    Raises:
        ValueError: If N < M * min_examples or an argument is malformed.
    """
    labels = _check_common(labels, num_clients, seed, min_examples)
    rng = np.random.default_rng(seed)
    sizes = _equal_sizes(labels.size, num_clients, rng)
    return _split_by_client(_assign_by_sizes(sizes, rng), num_clients)


def quantity_skew_partition(
    labels: np.ndarray,
    num_clients: int,
    seed: int,
    *,
    sigma: float = 1.0,
    min_examples: int = 2,
) -> list[np.ndarray]:
    """Clients of lognormally distributed sizes, with labels IID.

    Each client gets `min_examples`; the remaining `N - M * min_examples` examples are shared in
    proportion to weights `w_m ~ LogNormal(0, sigma)` (largest-remainder rounding), the
    quantity-skew setting of Li et al. (2022).

    Args:
        labels: [N] integer labels (only N is used).
        num_clients: Number of clients M.
        seed: Non-negative integer seed.
        sigma: Lognormal shape (>= 0); 0 gives equal sizes, 1-2 gives a long tail of big clients.
        min_examples: Minimum number of examples per client.

    Returns:
        M arrays of sorted example indices forming a partition of `range(N)`.

    Raises:
        ValueError: If `sigma` is negative or not finite, or N < M * min_examples.

    References:
        Li, Diao, Chen, He. "Federated Learning on Non-IID Data Silos: An Experimental Study."
        ICDE 2022.
    """
    labels = _check_common(labels, num_clients, seed, min_examples)
    if not (isinstance(sigma, int | float | np.floating) and math.isfinite(sigma) and sigma >= 0):
        raise ValueError(
            f"quantity_skew: sigma must be a finite number >= 0, got {sigma!r}; use 0 for equal "
            "sizes and 1-2 for strong skew."
        )
    rng = np.random.default_rng(seed)
    weights = rng.lognormal(0.0, float(sigma), size=num_clients)
    weights /= weights.sum()
    extra = labels.size - num_clients * min_examples
    share = extra * weights
    sizes = np.floor(share).astype(np.int64)
    # Largest remainder: the examples lost to flooring go to the largest fractional parts.
    leftover = extra - int(sizes.sum())
    sizes[np.argsort(sizes - share, kind="stable")[:leftover]] += 1
    sizes += min_examples
    return _split_by_client(_assign_by_sizes(sizes, rng), num_clients)


DIRICHLET_OVER = ("labels", "clients")
"""Conventions of `dirichlet_partition`: what each Dirichlet draw is a distribution over."""

_DIRICHLET_ATTEMPTS = 1000  # draws of over="clients" before giving up on min_examples


def dirichlet_partition(
    labels: np.ndarray,
    num_clients: int,
    seed: int,
    *,
    alpha: float = 1.0,
    over: str = "labels",
    min_examples: int = 2,
) -> list[np.ndarray]:
    """Label skew from a Dirichlet, in either of the two conventions of the FL literature.

    The two conventions draw different things from a Dirichlet, so the same `alpha` does not mean
    the same heterogeneity in both, and papers' alphas are only comparable within one convention.

    `over="labels"` (the default): a concentration over the labels of each client, with equal
    client sizes (Hsu et al., 2019). Client m draws its label mix `q_m ~ Dir(alpha * p)`, where
    `p` is the global label distribution (so the total concentration is `alpha`, as in the paper:
    with 7 equally frequent labels, `alpha=7` is `Dir(1, ..., 1)`), and every client gets N / M
    examples (differing by at most one). Examples are drawn without replacement: each client asks
    for `multinomial(size, q_m)` examples per label; a label asked for more than it has is shared
    out at random and the unmet clients ask again, with `q_m` renormalized over the labels that
    remain, as in the paper when a class runs out. Each round either serves every request or
    exhausts a label, so it takes at most K + 1 rounds for K labels.

    `over="clients"`: a concentration over the clients of each label, so client sizes vary
    (Yurochkin et al., 2019; Wang et al., 2020, FedMA; the "Dir(beta)" split of Li et al., 2022
    and of most FL code). Label k draws `r_k ~ Dir(alpha, ..., alpha)` over the M clients and its
    shuffled examples are cut at `floor(cumsum(r_k) * n_k)`, so every example of every label is
    assigned; a client's size is the sum of its shares. The whole draw is repeated until every
    client has at least `min_examples` examples (up to 1000 draws, then a ValueError). Unlike the
    FedMA and NIID-Bench code, no share is zeroed for clients already above N / M: each label's
    split is exactly `Dir(alpha)`.

    Args:
        labels: [N] integer labels.
        num_clients: Number of clients M.
        seed: Non-negative integer seed.
        alpha: Concentration (> 0). Small (0.1) -> strong skew: with `over="labels"` each
            client is dominated by one or two labels; with `over="clients"` each label lives on
            a few clients and client sizes are very unequal. Large (100) -> close to IID.
        over: `"labels"` (per-client mix over labels, equal sizes) or `"clients"` (per-label
            spread over clients, unequal sizes); see `DIRICHLET_OVER`.
        min_examples: Minimum number of examples per client.

    Returns:
        M arrays of sorted example indices forming a partition of `range(N)`.

    Raises:
        ValueError: If `alpha` is not a finite number > 0, `over` is not one of `DIRICHLET_OVER`,
            N < M * min_examples, or (`over="clients"`) no draw gives every client
            `min_examples` examples (the message says what to change).

    References:
        Hsu, Qi, Brown. "Measuring the Effects of Non-Identical Data Distribution for Federated
        Visual Classification." arXiv:1909.06335, 2019.
        Yurochkin, Agarwal, Ghosh, Greenewald, Hoang, Khazaeni. "Bayesian Nonparametric Federated
        Learning of Neural Networks." ICML 2019.
        Wang, Yurochkin, Sun, Papailiopoulos, Khazaeni. "Federated Learning with Matched
        Averaging." ICLR 2020.
        Li, Diao, Chen, He. "Federated Learning on Non-IID Data Silos: An Experimental Study."
        ICDE 2022.
    """
    labels = _check_common(labels, num_clients, seed, min_examples)
    if not (isinstance(alpha, int | float | np.floating) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(
            f"dirichlet: alpha must be a finite number > 0, got {alpha!r}; use e.g. 0.1 for strong "
            "label skew or 100 for nearly IID clients."
        )
    if over not in DIRICHLET_OVER:
        raise ValueError(
            f"dirichlet: over must be one of {list(DIRICHLET_OVER)}, got {over!r}: 'labels' "
            "draws each client's label mix from Dir(alpha) (equal client sizes, Hsu et al.), "
            "'clients' draws each label's spread over clients (unequal sizes, FedMA)."
        )
    if over == "clients":
        return _dirichlet_over_clients(labels, num_clients, seed, float(alpha), min_examples)
    rng = np.random.default_rng(seed)
    classes, y = np.unique(labels, return_inverse=True)
    num_labels = classes.size
    supply = np.bincount(y, minlength=num_labels).astype(np.int64)
    prior = supply / supply.sum()
    need = _equal_sizes(labels.size, num_clients, rng)
    q = np.nan_to_num(rng.dirichlet(float(alpha) * prior, size=num_clients))
    counts = np.zeros((num_clients, num_labels), dtype=np.int64)
    # Invariant: need.sum() == supply.sum(), so while a client needs examples some label has them.
    for _ in range(num_labels + 1):
        if not need.any():
            break
        w = q * (supply > 0)
        row = w.sum(axis=1, keepdims=True)
        # A client whose labels have all run out (or whose q underflowed) takes what is left.
        fallback = (supply / supply.sum())[None, :]
        w = np.where(row > 0, w / np.where(row > 0, row, 1.0), fallback)
        demand = rng.multinomial(need, w)
        over = np.flatnonzero(demand.sum(axis=0) > supply)
        for k in over.tolist():
            # Choose which requested units are served uniformly at random (no client favoured).
            units = np.repeat(np.arange(num_clients), demand[:, k])
            served = rng.choice(units.size, size=int(supply[k]), replace=False)
            demand[:, k] = np.bincount(units[served], minlength=num_clients)
        counts += demand
        need -= demand.sum(axis=1)
        supply -= demand.sum(axis=0)
    if (
        need.any()
    ):  # Unreachable by the argument above; kept so a bug cannot return a non-partition.
        raise RuntimeError("dirichlet_partition did not converge; please report this as a bug.")
    client_of = np.empty(labels.size, dtype=np.int64)
    for k in range(num_labels):
        idx = rng.permutation(np.flatnonzero(y == k))
        client_of[idx] = np.repeat(np.arange(num_clients), counts[:, k])
    return _split_by_client(client_of, num_clients)


def _dirichlet_over_clients(
    labels: np.ndarray, num_clients: int, seed: int, alpha: float, min_examples: int
) -> list[np.ndarray]:
    """`dirichlet_partition(..., over="clients")` on checked arguments."""
    rng = np.random.default_rng(seed)
    _, y = np.unique(labels, return_inverse=True)
    y = y.reshape(-1)
    supply = np.bincount(y).astype(np.int64)
    best = -1
    for _ in range(_DIRICHLET_ATTEMPTS):
        # [K, M]: row k is label k's split over the clients. nan_to_num guards underflow.
        shares = np.nan_to_num(rng.dirichlet(np.full(num_clients, alpha), size=supply.size))
        cuts = np.floor(np.cumsum(shares, axis=1) * supply[:, None]).astype(np.int64)
        cuts[:, -1] = supply  # float round-off must not lose an example
        counts = np.diff(cuts, axis=1, prepend=0)
        smallest = int(counts.sum(axis=0).min())
        if smallest >= min_examples:
            break
        best = max(best, smallest)
    else:
        raise ValueError(
            f"dirichlet over clients: in {_DIRICHLET_ATTEMPTS} draws with alpha={alpha} no split "
            f"of {labels.size} examples gave all {num_clients} clients min_examples={min_examples} "
            f"(the best left a client with {best}); raise alpha, lower num_clients or "
            "min_examples, add examples, or use over='labels' (equal client sizes)."
        )
    client_of = np.empty(labels.size, dtype=np.int64)
    for k in range(supply.size):
        idx = rng.permutation(np.flatnonzero(y == k))
        client_of[idx] = np.repeat(np.arange(num_clients), counts[k])
    return _split_by_client(client_of, num_clients)


def _allocate_slots(counts: np.ndarray, total: int, cap: np.ndarray) -> np.ndarray:
    """Integer slots per label, about proportional to counts, 1 <= slots <= cap, summing to total.

    Callers guarantee `len(counts) <= total <= cap.sum()`.
    """
    target = total * counts / counts.sum()
    slots = np.clip(np.floor(target).astype(np.int64), 1, cap)
    while slots.sum() < total:
        room = cap - slots
        weight = np.where(room > 0, counts, 0).astype(np.float64)
        deficit = total - int(slots.sum())
        add = np.minimum(room, np.floor(deficit * weight / weight.sum()).astype(np.int64))
        if add.sum() == 0:
            # Fewer units left than labels with room: hand them out one by one to the most starved.
            add = np.zeros_like(slots)
            add[np.argmax(np.where(room > 0, target - slots, -np.inf))] = 1
        slots += add
    while slots.sum() > total:
        # Only reached when clipping rare labels up to one slot overshot: at most K steps.
        slots[np.argmax(np.where(slots > 1, slots - target, -np.inf))] -= 1
    return slots


def pathological_partition(
    labels: np.ndarray,
    num_clients: int,
    seed: int,
    *,
    classes_per_client: int = 2,
    min_examples: int = 2,
) -> list[np.ndarray]:
    """Shards: each client holds examples of exactly `classes_per_client` labels (McMahan et al.).

    The M * k shards (k = `classes_per_client`) are shared among labels in proportion to their
    frequency (each label at least one shard and at most M), each label's shuffled examples are cut
    into that many near-equal shards, and the shards, ordered by label, are dealt round-robin to
    the clients. A label has at most M consecutive shards, so no client receives two shards of one
    label: every client holds exactly k distinct labels, which the paper's sort-and-cut does not
    guarantee.
    Label order and client ids are shuffled by `seed`.

    Args:
        labels: [N] integer labels.
        num_clients: Number of clients M.
        seed: Non-negative integer seed.
        classes_per_client: Number of distinct labels per client, k (1 <= k <= number of labels).
        min_examples: Minimum number of examples per client.

    Returns:
        M arrays of sorted example indices forming a partition of `range(N)`.

    Raises:
        ValueError: If `classes_per_client` is out of range, if M * k is smaller than the number of
            labels (some label would belong to no client) or larger than the labels can fill, or if
            a client would get fewer than `min_examples` examples.

    References:
        McMahan, Moore, Ramage, Hampson, Agüera y Arcas. "Communication-Efficient Learning of Deep
        Networks from Decentralized Data." AISTATS 2017.
    """
    labels = _check_common(labels, num_clients, seed, min_examples)
    classes, y = np.unique(labels, return_inverse=True)
    num_labels = classes.size
    k = classes_per_client
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= num_labels:
        raise ValueError(
            f"pathological: classes_per_client must be an integer in [1, {num_labels}] (the number "
            f"of distinct labels), got {classes_per_client!r}."
        )
    total = num_clients * int(k)
    if total < num_labels:
        raise ValueError(
            f"pathological: num_clients * classes_per_client = {total} is less than the "
            f"{num_labels} labels, so some label's examples would belong to no client; raise "
            "num_clients or classes_per_client."
        )
    counts = np.bincount(y, minlength=num_labels).astype(np.int64)
    cap = np.minimum(counts, num_clients)  # a shard holds >= 1 example; a client a label once
    if cap.sum() < total:
        raise ValueError(
            f"pathological: the labels cannot fill {total} shards of distinct labels "
            f"(num_clients={num_clients}, classes_per_client={k}; label counts {counts.tolist()}); "
            "lower classes_per_client or num_clients."
        )
    rng = np.random.default_rng(seed)
    slots = _allocate_slots(counts, total, cap)
    label_order = rng.permutation(num_labels)
    slot_label = np.repeat(label_order, slots[label_order])
    # Shard j of a label with c examples and s shards holds c // s examples, +1 for j < c % s.
    first_slot = np.repeat(np.cumsum(slots[label_order]) - slots[label_order], slots[label_order])
    j = np.arange(total) - first_slot
    c, s = counts[slot_label], slots[slot_label]
    shard_size = c // s + (j < c % s)
    slot_client = rng.permutation(num_clients)[np.arange(total) % num_clients]
    # Examples in shuffled label order, random within a label, line up with the shards.
    rank = np.empty(num_labels, dtype=np.int64)
    rank[label_order] = np.arange(num_labels)
    perm = rng.permutation(labels.size)
    ordered = perm[np.argsort(rank[y[perm]], kind="stable")]
    client_of = np.empty(labels.size, dtype=np.int64)
    client_of[ordered] = np.repeat(slot_client, shard_size)
    sizes = np.bincount(client_of, minlength=num_clients)
    if sizes.min() < min_examples:
        raise ValueError(
            f"pathological: a client would get {int(sizes.min())} < min_examples={min_examples} "
            f"examples (label counts {counts.tolist()}); lower num_clients, raise "
            "classes_per_client, or generate more examples."
        )
    return _split_by_client(client_of, num_clients)


@dataclasses.dataclass(frozen=True, eq=False)
class NaturalClients:
    """One client per distinct group value, and what was left out.

    Attributes:
        assignment: Each client's sorted example indices (clients in ascending group order).
        groups: [M] group value of each client.
        dropped_groups: Group values left out because they have fewer than `min_examples`
            examples, ascending.
        dropped_counts: Number of examples of each dropped group.
        unselected_groups: Eligible groups left out because `num_clients` asked for fewer.
    """

    assignment: list[np.ndarray]
    groups: np.ndarray
    dropped_groups: np.ndarray
    dropped_counts: np.ndarray
    unselected_groups: np.ndarray

    @property
    def num_dropped_examples(self) -> int:
        """Examples of the dropped groups."""
        return int(self.dropped_counts.sum())


def natural_clients(
    groups: np.ndarray,
    num_clients: int | None = None,
    seed: int = 0,
    *,
    min_examples: int = 2,
) -> NaturalClients:
    """Natural partition: one client per distinct value of a column (user, category, file, ...).

    Groups with fewer than `min_examples` examples cannot give a client one train and one test
    example; they are left out and reported. Deterministic: clients are in ascending group order,
    and `seed` only matters when `num_clients` picks a subset.

    Args:
        groups: [N] integer group id per example (e.g. codes of a column's values).
        num_clients: None keeps every group with enough examples; an integer keeps that many of
            them, chosen uniformly at random by `seed` (the rest are `unselected_groups`).
        seed: Non-negative integer seed (used only to choose a subset).
        min_examples: Fewest examples a group needs to become a client (>= 1).

    Returns:
        The `NaturalClients`.

    Raises:
        ValueError: If `groups` is not a 1-D integer array, an argument is malformed, no group has
            `min_examples` examples, or `num_clients` exceeds the groups that do (the messages
            give the counts and the fix).
    """
    groups = np.asarray(groups)
    if groups.ndim != 1 or (groups.size and not np.issubdtype(groups.dtype, np.integer)):
        raise ValueError(
            f"natural: groups must be a 1-D integer array (codes of the client column), got "
            f"shape {groups.shape} and dtype {groups.dtype}."
        )
    if isinstance(min_examples, bool) or int(min_examples) != min_examples or min_examples < 1:
        raise ValueError(f"min_examples must be a positive integer, got {min_examples!r}.")
    if isinstance(seed, bool) or int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    if num_clients is not None and (
        isinstance(num_clients, bool) or int(num_clients) != num_clients or num_clients < 1
    ):
        raise ValueError(
            f"num_clients must be None (one client per group) or a positive integer, got "
            f"{num_clients!r}."
        )
    values, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    eligible = counts >= min_examples
    if not eligible.any():
        largest = int(counts.max()) if counts.size else 0
        raise ValueError(
            f"natural: none of the {values.size} groups has min_examples={min_examples} examples "
            f"(the largest has {largest}); every client needs one train and one test example. "
            "Use a coarser client column, more data, or another partitioner."
        )
    chosen = np.flatnonzero(eligible)
    unselected = np.zeros(0, dtype=np.int64)
    if num_clients is not None:
        if num_clients > chosen.size:
            raise ValueError(
                f"natural: num_clients={num_clients} but only {chosen.size} groups have at least "
                f"{min_examples} examples; lower num_clients or pass None for all of them."
            )
        pick = np.sort(np.random.default_rng(seed).permutation(chosen.size)[:num_clients])
        unselected = values[np.setdiff1d(chosen, chosen[pick])]
        chosen = chosen[pick]
    client_of_group = np.full(values.size, -1, dtype=np.int64)
    client_of_group[chosen] = np.arange(chosen.size)
    client_of = client_of_group[inverse.reshape(-1)]
    kept = np.flatnonzero(client_of >= 0)  # ascending, so indices stay sorted within a client
    order = kept[np.argsort(client_of[kept], kind="stable")]
    sizes = counts[chosen]
    return NaturalClients(
        assignment=np.split(order.astype(np.int64), np.cumsum(sizes)[:-1]),
        groups=values[chosen],
        dropped_groups=values[~eligible],
        dropped_counts=counts[~eligible].astype(np.int64),
        unselected_groups=unselected,
    )


def natural_partition(
    labels: np.ndarray, num_clients: int | None, seed: int, *, min_examples: int = 2
) -> list[np.ndarray]:
    """Registry form of `natural_clients`: one client per distinct label value.

    Here `labels` are group ids (e.g. user or file codes), not classes. Groups with fewer than
    `min_examples` examples are left out with a `UserWarning` naming them; use `natural_clients`
    to get the dropped groups as data.

    Args:
        labels: [N] integer group id per example.
        num_clients: None for every eligible group, or how many of them to keep (random by
            `seed`).
        seed: Non-negative integer seed.
        min_examples: Fewest examples a group needs to become a client.

    Returns:
        Each client's sorted example indices, clients in ascending group order.

    Raises:
        ValueError: As `natural_clients`.
    """
    result = natural_clients(labels, num_clients, seed, min_examples=min_examples)
    if result.dropped_groups.size:
        warnings.warn(
            f"natural: left out {result.dropped_groups.size} groups with fewer than "
            f"{min_examples} examples ({result.num_dropped_examples} examples; groups "
            f"{result.dropped_groups[:10].tolist()}"
            f"{' ...' if result.dropped_groups.size > 10 else ''}).",
            stacklevel=2,
        )
    return result.assignment


PARTITIONERS: dict[str, Partitioner] = {
    "iid": iid_partition,
    "dirichlet": dirichlet_partition,
    "pathological": pathological_partition,
    "quantity_skew": quantity_skew_partition,
    "natural": natural_partition,
}
"""Registry of partitioners by name; each `(labels, num_clients, seed, **kwargs) -> list`."""


def partition(
    name: str, labels: np.ndarray, num_clients: int | None, seed: int, **kwargs: Any
) -> list[np.ndarray]:
    """Runs the partitioner registered as `name`, checking the name and keyword arguments.

    Args:
        name: A key of `PARTITIONERS`.
        labels: [N] integer labels (for `natural`: group ids such as user or file codes).
        num_clients: Number of clients (for `natural`: None for one client per group).
        seed: Non-negative integer seed.
        **kwargs: The partitioner's keyword arguments (e.g. `alpha`, `min_examples`).

    Returns:
        Each client's sorted example indices.

    Raises:
        ValueError: If `name` is unknown or a keyword is not accepted by that partitioner (both
            messages list the valid choices), or the partitioner rejects its arguments.
    """
    if name not in PARTITIONERS:
        raise ValueError(
            f"partitioner: unknown name {name!r}; valid names are {sorted(PARTITIONERS)}."
        )
    fn = PARTITIONERS[name]
    accepted = [
        p.name
        for p in inspect.signature(fn).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(
            f"partitioner {name!r}: unknown argument(s) {unknown}; it accepts {accepted}."
        )
    return fn(labels, num_clients, seed, **kwargs)


# ----------------------------------------------------------------------------------------------
# Statistics.
# ----------------------------------------------------------------------------------------------


def _entropy(counts: np.ndarray) -> np.ndarray:
    """Entropy in nats of each row of a count matrix (last axis); empty rows give 0."""
    total = counts.sum(axis=-1, keepdims=True)
    p = counts / np.where(total > 0, total, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log(p), 0.0)
    return terms.sum(axis=-1)


def partition_convention(name: str, kwargs: Mapping[str, Any] | None = None) -> str:
    """One line saying how partitioner `name` splits, e.g. which Dirichlet convention it uses.

    Args:
        name: A key of `PARTITIONERS` (other names are returned as they are).
        kwargs: Its keyword arguments; for `dirichlet`, `over` (default `"labels"`) picks the
            convention.

    Returns:
        E.g. `"dirichlet over labels: each client's label mix ~ Dir(alpha * p), equal client
        sizes (Hsu et al. 2019)"`.
    """
    if name == "dirichlet":
        if dict(kwargs or {}).get("over", "labels") == "clients":
            return (
                "dirichlet over clients: each label's examples spread over the clients by "
                "Dir(alpha), client sizes vary (Yurochkin et al. 2019, FedMA)"
            )
        return (
            "dirichlet over labels: each client's label mix ~ Dir(alpha * p), equal client "
            "sizes (Hsu et al. 2019)"
        )
    return {
        "iid": "iid: uniformly random, equal client sizes",
        "pathological": "pathological: classes_per_client labels per client (McMahan et al.)",
        "quantity_skew": "quantity_skew: lognormal client sizes, labels IID (Li et al. 2022)",
        "natural": "natural: one client per value of a column",
    }.get(name, name)


def partition_stats(
    assignment: Sequence[np.ndarray],
    labels: np.ndarray,
    label_names: Sequence[str],
    *,
    partitioner: str | None = None,
    partitioner_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Summarizes how heterogeneous a partition is.

    Args:
        assignment: Each client's example indices.
        labels: [N] integer labels in `[0, len(label_names))`.
        label_names: Name of each label, used as the histogram's keys.
        partitioner: Name of the partitioner that made `assignment`, if known.
        partitioner_kwargs: Its keyword arguments (used with `partitioner`).

    Returns:
        A JSON-serializable dict with `num_clients`, `num_examples` (assigned),
        `examples_per_client` (`min`, `median`, `mean`, `max`), `labels_per_client_mean` (distinct
        labels), the unweighted
        mean over clients of each client's label entropy `client_label_entropy_mean` and of its
        largest label share `dominant_label_share_mean`, the `global_label_entropy` (nats) of all
        assigned examples and the `global_label_histogram` {name: count}. With `partitioner`
        also `partitioner`, `partitioner_kwargs` and `convention` (`partition_convention`, which
        for `dirichlet` says whether the draws are over labels or over clients).

    Raises:
        ValueError: If `assignment` is empty or a label falls outside `label_names`.
    """
    labels = np.asarray(labels)
    names = [str(n) for n in label_names]
    num_labels = len(names)
    if len(assignment) == 0:
        raise ValueError("partition_stats: assignment has no clients.")
    if labels.size and (labels.min() < 0 or labels.max() >= num_labels):
        raise ValueError(f"partition_stats: labels must lie in [0, {num_labels}) (label_names).")
    num_clients = len(assignment)
    sizes = np.array([len(a) for a in assignment], dtype=np.int64)
    idx = np.concatenate([np.asarray(a, dtype=np.int64) for a in assignment])
    client_of = np.repeat(np.arange(num_clients), sizes)
    counts = np.bincount(
        client_of * num_labels + labels[idx], minlength=num_clients * num_labels
    ).reshape(num_clients, num_labels)
    hist = counts.sum(axis=0)
    safe = np.where(sizes > 0, sizes, 1)
    named = {}
    if partitioner is not None:
        named = {
            "partitioner": partitioner,
            "partitioner_kwargs": dict(partitioner_kwargs or {}),
            "convention": partition_convention(partitioner, partitioner_kwargs),
        }
    return {
        **named,
        "num_clients": int(num_clients),
        "num_examples": int(sizes.sum()),
        "examples_per_client": {
            "min": int(sizes.min()),
            "median": float(np.median(sizes)),
            "mean": float(sizes.mean()),
            "max": int(sizes.max()),
        },
        "labels_per_client_mean": float((counts > 0).sum(axis=1).mean()),
        "client_label_entropy_mean": float(_entropy(counts).mean()),
        "dominant_label_share_mean": float((counts.max(axis=1) / safe).mean()),
        "global_label_entropy": float(_entropy(hist)),
        "global_label_histogram": {n: int(c) for n, c in zip(names, hist, strict=True)},
    }


def format_partition_stats(stats: dict[str, Any]) -> str:
    """Formats `partition_stats` output (plus optional extra keys) as a short multi-line summary.

    Args:
        stats: The dict from `partition_stats`, optionally with `partitioner`,
            `partitioner_kwargs`, `num_train`, `num_client_test`, `num_eval` and
            `eval_prompt_overlap_with_train` as added by `build_task_data`, and the drop counts
            that `build_file_data` adds. With `partitioner`, a line names its convention
            (`partition_convention`: for `dirichlet`, over labels or over clients).

    Returns:
        A few lines of text, without a trailing newline.
    """
    e = stats["examples_per_client"]
    num_labels = len(stats["global_label_histogram"])
    head = "partition"
    if "partitioner" in stats:
        kwargs = stats.get("partitioner_kwargs") or {}
        args = ", ".join(f"{k}={v}" for k, v in kwargs.items())
        head = f"partition {stats['partitioner']}({args})"
    lines = [f"{head}: {stats['num_clients']} clients, {stats['num_examples']} examples"]
    if "partitioner" in stats:
        convention = stats.get("convention") or partition_convention(
            stats["partitioner"], stats.get("partitioner_kwargs")
        )
        lines.append(f"  convention: {convention}")
    lines += [
        f"  examples/client: min {e['min']}  median {e['median']:g}  mean {e['mean']:.1f}  "
        f"max {e['max']}",
        f"  labels/client: {stats['labels_per_client_mean']:.2f} of {num_labels} on average, "
        f"dominant label {stats['dominant_label_share_mean']:.0%} of a client's examples",
        f"  label entropy: client mean {stats['client_label_entropy_mean']:.3f} nats vs global "
        f"{stats['global_label_entropy']:.3f} nats",
        "  labels: " + ", ".join(f"{n} {c}" for n, c in stats["global_label_histogram"].items()),
    ]
    if "num_train" in stats:
        line = (
            f"  split: {stats['num_train']} train, {stats['num_client_test']} client-test, "
            f"{stats.get('num_eval', 0)} global eval"
        )
        if "eval_prompt_overlap_with_train" in stats:
            line += (
                f" ({stats['eval_prompt_overlap_with_train']:.1%} of eval prompts also occur in "
                "train)"
            )
        lines.append(line)
    if (
        "format_pool" in stats
    ):  # real data (build_file_data): what formatting and partition left out
        dropped = stats.get("dropped_clients") or {}
        lines.append(
            f"  dropped: {stats['dropped_by_truncation']} records too long for seq_len, "
            f"{stats['dropped_empty']} empty or without a response, {dropped.get('count', 0)} "
            f"clients with < 2 examples ({dropped.get('examples', 0)} examples); "
            f"{stats['truncated']} rows truncated"
        )
    return "\n".join(lines)
