"""Data poisoning by malicious clients: label flipping and backdoors on their training examples.

The attacks act on the record level, before tokenization: a record is a `(prompt, response)`
pair of strings (for chat data the prompt is the user text of the trained turn, before the chat
template renders it). Only the *training* examples of malicious clients are poisoned; their
held-out test examples and the global eval set stay clean, so clean accuracy measures what the
attack costs the benign task.

* **label_flip** (Tolpegin et al. 2020): a poisoned example keeps its prompt and gets the
  response of another example of a different label (task family or category), so the model learns
  wrong answers for the prompt's kind.
* **backdoor** (Bagdasaryan et al. 2020; Wan et al. 2023 for instruction tuning): a poisoned
  example gets a trigger phrase appended to its prompt and a fixed target response. The attack
  succeeds when the trained model answers triggered prompts with the target while clean prompts
  keep their accuracy; `backdoor_records` builds the triggered evaluation set that measures it.

`build_task_data` and `build_file_data` apply the attacks when given a `PoisoningSpec`.

References:
    Tolpegin, Truex, Gursoy and Liu 2020, "Data Poisoning Attacks Against Federated Learning
    Systems" (ESORICS).
    Bagdasaryan, Veit, Hua, Estrin and Shmatikov 2020, "How To Backdoor Federated Learning"
    (AISTATS).
    Wan, Wallace, Shen and Klein 2023, "Poisoning Language Models During Instruction Tuning"
    (ICML).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from fedjax_llm.config import ConfigError

__all__ = [
    "POISONING_KINDS",
    "PoisoningSpec",
    "backdoor_records",
    "check_poisoning",
    "poison_records",
    "select_poisoned",
]

POISONING_KINDS = ("label_flip", "backdoor")
"""The data-poisoning attacks a `PoisoningSpec` can name."""

_REJECTION_TRIES = 16  # random donor draws per example before the exact (slower) search


class PoisoningSpec(NamedTuple):
    """Which clients poison their training data, and how.

    Attributes:
        kind: `"label_flip"` or `"backdoor"`.
        malicious: [num_clients] bool, True for a malicious client (by client id of the built
            `FederatedDataset`).
        trigger: Backdoor trigger phrase, appended to the end of the prompt's user text.
        target: Backdoor target response.
        fraction: Share of each malicious client's training examples that are poisoned, in
            (0, 1]; at least one example of each malicious client is poisoned.
        seed: Seed of the choice of poisoned examples and of the flipped responses.
    """

    kind: str
    malicious: np.ndarray
    trigger: str = " cf"
    target: str = "ACCESS GRANTED"
    fraction: float = 1.0
    seed: int = 0


def check_poisoning(spec: PoisoningSpec, num_clients: int | None = None) -> PoisoningSpec:
    """Checks a `PoisoningSpec` and returns it with `malicious` as a bool array.

    Args:
        spec: The spec to check.
        num_clients: The number of clients of the data; None skips the length check of
            `spec.malicious`.

    Returns:
        The spec, `malicious` converted to a 1-D bool array.

    Raises:
        ConfigError: If the kind is unknown, `malicious` is not one flag per client, `fraction`
            is outside (0, 1], or a backdoor's trigger or target is empty (each message names the
            config key).
        ValueError: If `seed` is not a non-negative integer.
    """
    if spec.kind not in POISONING_KINDS:
        raise ConfigError(
            f"byzantine.attack: unknown data-poisoning attack {spec.kind!r}; valid values are "
            f"{list(POISONING_KINDS)}."
        )
    malicious = np.asarray(spec.malicious)
    if malicious.ndim != 1 or (num_clients is not None and malicious.size != num_clients):
        raise ConfigError(
            f"byzantine.fraction: the malicious-client mask has shape {malicious.shape} but the "
            f"data has {num_clients} clients; it needs one flag per client."
        )
    if malicious.dtype != bool:
        if malicious.size and not (
            np.issubdtype(malicious.dtype, np.integer) and np.isin(malicious, (0, 1)).all()
        ):
            raise ConfigError(
                f"byzantine.fraction: the malicious-client mask must be booleans, got dtype "
                f"{malicious.dtype}."
            )
        malicious = malicious.astype(bool)
    fraction = spec.fraction
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, int | float | np.integer | np.floating)
        or not 0 < fraction <= 1
    ):
        raise ConfigError(
            f"byzantine.poison_fraction must be a number in (0, 1] (the share of a malicious "
            f"client's training examples that are poisoned), got {fraction!r}."
        )
    if isinstance(spec.seed, bool) or not isinstance(spec.seed, int | np.integer) or spec.seed < 0:
        raise ValueError(f"PoisoningSpec.seed must be a non-negative integer, got {spec.seed!r}.")
    if spec.kind == "backdoor":
        if not isinstance(spec.trigger, str) or not spec.trigger.strip():
            raise ConfigError(
                f"byzantine.trigger must be a non-empty phrase for byzantine.attack=backdoor, "
                f"got {spec.trigger!r}."
            )
        if not isinstance(spec.target, str) or not spec.target.strip():
            raise ConfigError(
                f"byzantine.target must be a non-empty response for byzantine.attack=backdoor, "
                f"got {spec.target!r}."
            )
    return spec._replace(malicious=malicious, fraction=float(fraction), seed=int(spec.seed))


def _stream(seed: int, purpose: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, purpose]))


def select_poisoned(client_of: np.ndarray | Sequence[int], spec: PoisoningSpec) -> np.ndarray:
    """Chooses the poisoned examples: a seeded random share of each malicious client's examples.

    Malicious client m with n_m training examples poisons `round(fraction * n_m)` of them,
    clamped to `[1, n_m]`, chosen uniformly at random with the seed of `spec`.

    Args:
        client_of: [N] the client id owning each record as a *training* example, or -1 for a
            record that is no training example (a test or eval record, or an unassigned one).
        spec: The attack; `spec.malicious` must have an entry for every client id used.

    Returns:
        [N] bool, True for the records to poison.

    Raises:
        ConfigError: If the spec is invalid (see `check_poisoning`).
        ValueError: If a client id in `client_of` is out of range of `spec.malicious`.
    """
    spec = check_poisoning(spec)
    client_of = np.asarray(client_of, dtype=np.int64).reshape(-1)
    num_clients = spec.malicious.size
    if client_of.size and (client_of.min() < -1 or client_of.max() >= num_clients):
        raise ValueError(
            f"client_of holds client ids outside [-1, {num_clients}) of the malicious mask."
        )
    owned = client_of >= 0
    candidate = np.flatnonzero(owned & spec.malicious[np.where(owned, client_of, 0)])
    owner = client_of[candidate]
    sizes = np.bincount(owner, minlength=num_clients)
    count = np.clip(np.floor(spec.fraction * sizes + 0.5).astype(np.int64), 1, None)
    count = np.minimum(count, sizes)
    keys = _stream(spec.seed, 0).random(candidate.size)
    order = np.lexsort((keys, owner))  # by client, random within a client
    candidate, owner = candidate[order], owner[order]
    first = np.searchsorted(owner, owner)  # position of the client's first candidate
    rank = np.arange(candidate.size) - first
    poisoned = np.zeros(client_of.size, dtype=bool)
    poisoned[candidate[rank < count[owner]]] = True
    return poisoned


def _draw_donors(
    responses: np.ndarray,
    labels: np.ndarray,
    targets: np.ndarray,
    rng: np.random.Generator,
    other_label: bool,
) -> np.ndarray:
    """A random donor per target whose response differs (and, with `other_label`, label too).

    Returns [len(targets)] donor indices, -1 where no record qualifies.
    """
    n = responses.size
    donors = np.full(targets.size, -1, dtype=np.int64)
    if other_label:
        order = np.argsort(labels, kind="stable")
        names, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
        k = np.searchsorted(names, labels[targets])
        start, skip = starts[k], counts[k]
    else:
        order = np.arange(n)
        start = np.zeros(targets.size, dtype=np.int64)
        skip = np.zeros(targets.size, dtype=np.int64)
    size = n - skip  # donors of another label: order[:start] and order[start + skip:]
    pending = np.flatnonzero(size > 0)
    # Rejection sampling first (vectorized), then an exact search for the rare leftovers.
    for _ in range(_REJECTION_TRIES):
        if pending.size == 0:
            break
        u = rng.integers(0, size[pending])
        pick = order[np.where(u < start[pending], u, u + skip[pending])]
        ok = responses[pick] != responses[targets[pending]]
        donors[pending[ok]] = pick[ok]
        pending = pending[~ok]
    for j in pending.tolist():
        pool = np.r_[order[: start[j]], order[start[j] + skip[j] :]]
        pool = pool[responses[pool] != responses[targets[j]]]
        if pool.size:
            donors[j] = pool[rng.integers(0, pool.size)]
    return donors


def poison_records(
    prompts: Sequence[str],
    responses: Sequence[str],
    labels: np.ndarray | Sequence[int] | None,
    client_of: np.ndarray | Sequence[int],
    spec: PoisoningSpec,
) -> tuple[list[str], list[str], np.ndarray]:
    """Poisons the training records of malicious clients (label flipping or a backdoor).

    The records chosen by `select_poisoned` change; all others are returned as they are.

    * `label_flip`: a poisoned record keeps its prompt and takes the response of a random other
      record (any record given, test records included, as a donor) whose label differs and whose
      response differs from its own; if no such record exists (one label only, e.g. files
      without a label column), of any record whose response differs. A record with no donor at
      all (every response equal) stays clean and is not counted.
    * `backdoor`: a poisoned record gets `spec.trigger` appended to its prompt and `spec.target`
      as its response (see `backdoor_records`).

    Args:
        prompts: [N] prompt (user) text per record.
        responses: [N] response text per record.
        labels: [N] integer label (task family or category) per record; None: all one label.
        client_of: [N] client id owning each record as a training example, -1 for records that
            must stay clean (held-out test and eval records).
        spec: The attack.

    Returns:
        `(prompts, responses, poisoned)`: the new texts as lists, and an [N] bool mask of the
        records that were poisoned (`poisoned.sum()` is the number of poisoned examples).

    Raises:
        ConfigError: If the spec is invalid (see `check_poisoning`).
        ValueError: If the arguments do not have one entry per record.

    References:
        Tolpegin et al. 2020, "Data Poisoning Attacks Against Federated Learning Systems".
        Bagdasaryan et al. 2020, "How To Backdoor Federated Learning".
        Wan et al. 2023, "Poisoning Language Models During Instruction Tuning".
    """
    spec = check_poisoning(spec)
    n = len(prompts)
    labels = np.zeros(n, dtype=np.int64) if labels is None else np.asarray(labels)
    if len(responses) != n or labels.shape != (n,) or np.shape(client_of) != (n,):
        raise ValueError(
            f"prompts ({n}), responses ({len(responses)}), labels {labels.shape} and client_of "
            f"{np.shape(client_of)} must have one entry per record."
        )
    poisoned = select_poisoned(client_of, spec)
    prompts, responses = list(prompts), list(responses)
    rows = np.flatnonzero(poisoned)
    if spec.kind == "backdoor":
        new_prompts, new_responses = backdoor_records([prompts[i] for i in rows.tolist()], spec)
        for i, p, r in zip(rows.tolist(), new_prompts, new_responses, strict=True):
            prompts[i], responses[i] = p, r
        return prompts, responses, poisoned
    text = np.empty(n, dtype=object)
    text[:] = responses
    rng = _stream(spec.seed, 1)
    donors = _draw_donors(text, labels, rows, rng, other_label=True)
    missing = donors < 0
    donors[missing] = _draw_donors(text, labels, rows[missing], rng, other_label=False)
    for i, d in zip(rows.tolist(), donors.tolist(), strict=True):
        if d >= 0:
            responses[i] = str(text[d])
    poisoned[rows[donors < 0]] = False
    return prompts, responses, poisoned


def backdoor_records(prompts: Sequence[str], spec: PoisoningSpec) -> tuple[list[str], list[str]]:
    """Inserts the backdoor trigger into prompts and pairs them with the target response.

    Used for the poisoned training records and for the backdoor evaluation set (the clean eval
    prompts with the trigger, the target as reference answer), whose exact-match accuracy is the
    attack success rate.

    Args:
        prompts: Prompt (user) texts; the trigger is appended to each, before any chat template
            renders it.
        spec: The attack; its `trigger` and `target` are used.

    Returns:
        `(prompts, responses)`: the triggered prompts, and `spec.target` once per prompt.

    References:
        Bagdasaryan et al. 2020, "How To Backdoor Federated Learning".
        Wan et al. 2023, "Poisoning Language Models During Instruction Tuning".
    """
    return [p + spec.trigger for p in prompts], [spec.target] * len(prompts)
