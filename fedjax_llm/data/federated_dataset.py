"""Tokenized examples, the federated dataset container and the built-in task-data builder.

Everything here is host-side numpy with fixed shapes (`[N, seq_len]`), so the simulator can gather a
round's client batches with one fancy index and move them to the device itself. A client's examples
are one contiguous row range of `FederatedDataset.examples`, described by `client_start` and
`client_count`, which keeps per-client gathers cheap even for 10k+ clients.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedjax_llm.config import ConfigError
from fedjax_llm.data.partitioners import PARTITIONERS, partition, partition_stats
from fedjax_llm.data.poisoning import (
    PoisoningSpec,
    backdoor_records,
    check_poisoning,
    poison_records,
)
from fedjax_llm.data.tasks import Example, generate_examples, generate_examples_for_labels
from fedjax_llm.data.tokenizer import Tokenizer

__all__ = [
    "FederatedDataset",
    "TaskData",
    "TokenizedExamples",
    "build_task_data",
    "make_federated_dataset",
    "tokenize_examples",
]


@dataclasses.dataclass(frozen=True, eq=False)
class TokenizedExamples:
    """Fixed-shape tokenized instruction examples.

    Position `t` of `loss_mask` is 1 where `tokens[t]` is a target the model predicts from position
    `t - 1`: the response tokens and the final eos. So the training loss of a causal LM is
    `sum(mask[:, 1:] * nll(logits[:, :-1], tokens[:, 1:])) / sum(mask[:, 1:])`.

    Attributes:
        tokens: [N, T] int32, `bos + prompt + response + eos`, right-padded with the pad id (no bos
            for tokenizers without one; for chat data the prompt and response are the chat
            template's rendering, see `fedjax_llm.data.formatting`).
        loss_mask: [N, T] float32, 1.0 at response tokens and the final eos, 0 elsewhere (at
            every real token for packed plain text).
        prompt_len: [N] int32, number of tokens of `bos + prompt` (where generation starts).
        labels: [N] int32, task-family (or category) id.
        label_names: Name of each label id.
        responses: Reference response text per example, for exact-match evaluation (empty for
            plain text, where exact match means nothing).
    """

    tokens: np.ndarray
    loss_mask: np.ndarray
    prompt_len: np.ndarray
    labels: np.ndarray
    label_names: tuple[str, ...]
    responses: tuple[str, ...]

    def __post_init__(self) -> None:
        n = self.tokens.shape[0]
        if self.tokens.ndim != 2 or self.loss_mask.shape != self.tokens.shape:
            raise ValueError(
                f"tokens and loss_mask must both be [N, T]; got {self.tokens.shape} and "
                f"{self.loss_mask.shape}."
            )
        if self.prompt_len.shape != (n,) or self.labels.shape != (n,) or len(self.responses) != n:
            raise ValueError(
                f"prompt_len, labels and responses must have one entry per example ({n}); got "
                f"{self.prompt_len.shape}, {self.labels.shape} and {len(self.responses)}."
            )

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_examples(self) -> int:
        """Number of examples N."""
        return len(self)

    @property
    def seq_len(self) -> int:
        """Padded sequence length T."""
        return int(self.tokens.shape[1])

    def take(self, indices: np.ndarray | Sequence[int]) -> TokenizedExamples:
        """Selects examples by index (copies the arrays).

        Args:
            indices: 1-D integer indices into the examples; repeats are allowed.

        Returns:
            The selected examples, in the order of `indices`.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return TokenizedExamples(
            tokens=self.tokens[idx],
            loss_mask=self.loss_mask[idx],
            prompt_len=self.prompt_len[idx],
            labels=self.labels[idx],
            label_names=self.label_names,
            responses=tuple(self.responses[i] for i in idx.tolist()),
        )


def tokenize_examples(
    examples: Sequence[Example],
    tokenizer: Tokenizer,
    seq_len: int,
    label_names: Sequence[str],
) -> TokenizedExamples:
    """Tokenizes examples into fixed-shape arrays with a loss mask on the response.

    Prompt and response are encoded separately, so the mask boundary is exact for any tokenizer.

    Args:
        examples: Examples with `prompt`, `response` and `label`.
        tokenizer: Provides `encode`, `pad_id`, `bos_id` and `eos_id` (e.g. `ByteTokenizer`).
        seq_len: Padded length T; every `bos + prompt + response + eos` must fit.
        label_names: Name of each label id; labels must lie in `[0, len(label_names))`.

    Returns:
        The `TokenizedExamples`.

    Raises:
        ValueError: If `seq_len` < 2, a label is out of range, or an example does not fit in
            `seq_len` (responses are never truncated silently; the message says which example, how
            long it is and what `seq_len` would fit).
    """
    if isinstance(seq_len, bool) or int(seq_len) != seq_len or seq_len < 2:
        raise ValueError(
            f"seq_len must be an integer >= 2 (room for bos and eos), got {seq_len!r}."
        )
    seq_len = int(seq_len)
    names = tuple(str(n) for n in label_names)
    n = len(examples)
    tokens = np.full((n, seq_len), tokenizer.pad_id, dtype=np.int32)
    loss_mask = np.zeros((n, seq_len), dtype=np.float32)
    prompt_len = np.zeros(n, dtype=np.int32)
    labels = np.zeros(n, dtype=np.int32)
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    head = [] if bos is None else [bos]  # tokenizers without bos (Qwen2) start with the prompt
    for i, ex in enumerate(examples):
        if not 0 <= ex.label < len(names):
            raise ValueError(
                f"example {i} has label {ex.label}, outside [0, {len(names)}) of "
                f"label_names {names}."
            )
        prompt_ids = head + tokenizer.encode(ex.prompt)
        if not prompt_ids:
            raise ValueError(
                f"example {i} has an empty prompt and the tokenizer has no bos token, so "
                "generation would have no token to start from; give every example a prompt."
            )
        response_ids = tokenizer.encode(ex.response)
        p = len(prompt_ids)
        length = p + len(response_ids) + 1
        if length > seq_len:
            longest = max(
                len(head) + 1 + len(tokenizer.encode(e.prompt)) + len(tokenizer.encode(e.response))
                for e in examples
            )
            raise ValueError(
                f"example {i} ({ex.prompt!r} -> {ex.response!r}) is {length} tokens with bos and "
                f"eos, longer than seq_len={seq_len}; raise seq_len to at least {longest} (the "
                "longest example). Responses are never truncated."
            )
        tokens[i, :p] = prompt_ids
        tokens[i, p : length - 1] = response_ids
        tokens[i, length - 1] = eos
        loss_mask[i, p:length] = 1.0
        prompt_len[i] = p
        labels[i] = ex.label
    return TokenizedExamples(
        tokens=tokens,
        loss_mask=loss_mask,
        prompt_len=prompt_len,
        labels=labels,
        label_names=names,
        responses=tuple(ex.response for ex in examples),
    )


@dataclasses.dataclass(frozen=True, eq=False)
class FederatedDataset:
    """Examples of all clients, stored so each client's examples are one contiguous row range.

    Attributes:
        examples: All examples; client m's are rows
            `client_start[m] : client_start[m] + client_count[m]`.
        client_start: [M] int64 offset of each client's first example.
        client_count: [M] int64 number of examples of each client (>= 1).
    """

    examples: TokenizedExamples
    client_start: np.ndarray
    client_count: np.ndarray

    @property
    def num_clients(self) -> int:
        """Number of clients M."""
        return int(self.client_count.shape[0])

    @property
    def num_examples(self) -> int:
        """Total number of examples over all clients."""
        return len(self.examples)

    @property
    def client_ids(self) -> np.ndarray:
        """[N] int64 client id of each row of `examples`."""
        return np.repeat(np.arange(self.num_clients, dtype=np.int64), self.client_count)

    def _check_client(self, m: int) -> int:
        if not 0 <= int(m) < self.num_clients:
            raise IndexError(f"client {m} is out of range for {self.num_clients} clients.")
        return int(m)

    def client_indices(self, m: int) -> np.ndarray:
        """Rows of `examples` that belong to client `m`.

        Args:
            m: Client id in `[0, num_clients)`.

        Returns:
            [client_count[m]] int64 row indices.

        Raises:
            IndexError: If `m` is out of range.
        """
        m = self._check_client(m)
        start = int(self.client_start[m])
        return np.arange(start, start + int(self.client_count[m]), dtype=np.int64)

    def client_slice(self, m: int) -> TokenizedExamples:
        """The examples of client `m`.

        Args:
            m: Client id in `[0, num_clients)`.

        Returns:
            Client m's `TokenizedExamples`.

        Raises:
            IndexError: If `m` is out of range.
        """
        return self.examples.take(self.client_indices(m))


def make_federated_dataset(
    examples: TokenizedExamples, assignment: Sequence[np.ndarray]
) -> FederatedDataset:
    """Groups examples by client.

    Args:
        examples: The example pool.
        assignment: `assignment[m]` holds the indices into `examples` of client m's examples. Every
            client needs at least one; an example may belong to at most one client, and examples in
            no client are dropped (so a train/test split can reuse one pool).

    Returns:
        A `FederatedDataset` whose rows are client 0's examples, then client 1's, and so on, each in
        the order given by `assignment`.

    Raises:
        ValueError: If there are no clients, a client has no examples, an index is out of range or
            an example is assigned twice.
    """
    if len(assignment) == 0:
        raise ValueError("assignment has no clients; it needs one index array per client.")
    parts = [np.asarray(a, dtype=np.int64).reshape(-1) for a in assignment]
    counts = np.array([p.size for p in parts], dtype=np.int64)
    if counts.min() < 1:
        empty = np.flatnonzero(counts == 0)
        raise ValueError(
            f"assignment: clients {empty[:10].tolist()} have no examples; every client needs at "
            "least one (use fewer clients or a partitioner min_examples >= 1)."
        )
    idx = np.concatenate(parts)
    n = len(examples)
    if idx.min() < 0 or idx.max() >= n:
        raise ValueError(f"assignment: example indices must lie in [0, {n}).")
    if np.bincount(idx, minlength=n).max() > 1:
        raise ValueError("assignment: an example is assigned to more than one client (or twice).")
    start = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    return FederatedDataset(examples=examples.take(idx), client_start=start, client_count=counts)


@dataclasses.dataclass(frozen=True, eq=False)
class TaskData:
    """Everything the simulator needs from the built-in tasks.

    Attributes:
        train: Each client's training examples.
        client_test: Each client's held-out examples (same client ids; every client has >= 1).
        eval: Global held-out set, class-balanced over families, generated from its own seed stream.
        stats: JSON-serializable partition statistics (see `partition_stats`) plus `partitioner`,
            `partitioner_kwargs`, `seed`, `test_fraction`, `num_train`, `num_client_test`,
            `num_eval`, and the fractions of eval and client-test prompts that also occur among the
            training prompts (`eval_prompt_overlap_with_train`,
            `client_test_prompt_overlap_with_train`). Small task spaces (`max` has ~10^5 prompts)
            make some overlap unavoidable; it is reported rather than hidden. With data poisoning
            also `poisoning` (the attack) and `poisoned_examples` (how many training examples it
            changed), and for a backdoor `num_backdoor_eval`.
        backdoor_eval: With a backdoor attack (see `fedjax_llm.data.poisoning`): the global eval
            examples with the trigger in their prompts and the attack's target as the reference
            response, so exact match on it is the attack success rate; else None.
    """

    train: FederatedDataset
    client_test: FederatedDataset
    eval: TokenizedExamples
    stats: dict[str, Any]
    backdoor_eval: TokenizedExamples | None = None


def _derive_seed(seed: int, purpose: int) -> int:
    """Independent integer seed for one purpose, so streams of one user seed do not correlate."""
    return int(np.random.SeedSequence([seed, purpose]).generate_state(1, np.uint64)[0])


def _json_value(value: Any) -> Any:
    """Converts numpy scalars so stats stay JSON-serializable."""
    return value.item() if isinstance(value, np.generic) else value


def _split_train_test(
    assignment: Sequence[np.ndarray], test_fraction: float, seed: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Splits each client's examples at random into train and test, vectorized.

    Client m with n_m >= 2 examples gets `round(test_fraction * n_m)` test examples, clamped to
    `[1, n_m - 1]`. Within a client both parts keep pool order (ascending index), so rows do not
    depend on the random split keys.

    Args:
        assignment: Each client's example indices (every client has >= 2).
        test_fraction: Share of each client's examples held out, in (0, 1).
        seed: Seed of the split's random stream.

    Returns:
        `(train_assignment, test_assignment)`, one sorted index array per client each.
    """
    split_rng = np.random.default_rng(seed)
    sizes = np.array([len(a) for a in assignment], dtype=np.int64)
    idx = np.concatenate([np.asarray(a, dtype=np.int64) for a in assignment])
    client_of = np.repeat(np.arange(sizes.size), sizes)
    order = np.lexsort((split_rng.random(idx.size), client_of))  # by client, random within client
    idx, client_of = idx[order], client_of[order]
    rank = np.arange(idx.size) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    num_test = np.clip(np.floor(test_fraction * sizes + 0.5).astype(np.int64), 1, sizes - 1)
    is_test = rank < num_test[client_of]
    test_assign = np.split(idx[is_test], np.cumsum(num_test)[:-1])
    train_assign = np.split(idx[~is_test], np.cumsum(sizes - num_test)[:-1])
    return [np.sort(a) for a in train_assign], [np.sort(a) for a in test_assign]


def _replace_rows(
    examples: TokenizedExamples, rows: np.ndarray, new: TokenizedExamples
) -> TokenizedExamples:
    """`examples` with rows `rows` replaced by the rows of `new`, in order (copies the arrays)."""
    rows = np.asarray(rows, dtype=np.int64)
    tokens, loss_mask = examples.tokens.copy(), examples.loss_mask.copy()
    prompt_len, labels = examples.prompt_len.copy(), examples.labels.copy()
    responses = list(examples.responses)
    tokens[rows], loss_mask[rows] = new.tokens, new.loss_mask
    prompt_len[rows], labels[rows] = new.prompt_len, new.labels
    for r, text in zip(rows.tolist(), new.responses, strict=True):
        responses[r] = text
    return TokenizedExamples(
        tokens=tokens,
        loss_mask=loss_mask,
        prompt_len=prompt_len,
        labels=labels,
        label_names=examples.label_names,
        responses=tuple(responses),
    )


def _training_owner(train_assign: Sequence[np.ndarray], num_rows: int) -> np.ndarray:
    """[num_rows] client id of each row that is a training example of that client, else -1."""
    owner = np.full(num_rows, -1, dtype=np.int64)
    for m, idx in enumerate(train_assign):
        owner[np.asarray(idx, dtype=np.int64)] = m
    return owner


def _check_fits(examples: Sequence[Example], tokenizer: Tokenizer, seq_len: int, kind: str) -> None:
    """Raises a `ConfigError` naming `data.seq_len` if a poisoned example does not fit."""
    head = 0 if tokenizer.bos_id is None else 1
    longest = max(
        (head + len(tokenizer.encode(e.prompt)) + len(tokenizer.encode(e.response)) + 1)
        for e in examples
    )
    if longest > seq_len:
        raise ConfigError(
            f"data.seq_len={seq_len} is too short for byzantine.attack={kind}: a poisoned example "
            f"is {longest} tokens with bos and eos; raise data.seq_len to at least {longest} (or "
            "shorten the trigger and target)."
        )


def _poison_task_pool(
    pool_examples: Sequence[Example],
    pool: TokenizedExamples,
    train_assign: Sequence[np.ndarray],
    eval_examples: Sequence[Example],
    spec: PoisoningSpec,
    tokenizer: Tokenizer,
    seq_len: int,
    label_names: Sequence[str],
) -> tuple[TokenizedExamples, int, TokenizedExamples | None]:
    """Poisons the malicious clients' training rows of the built-in pool (see `poison_records`).

    Returns:
        `(train_pool, num_poisoned, backdoor_eval)`: the pool with the poisoned training rows
        replaced (test rows untouched), the number of poisoned rows, and the backdoor
        evaluation set (None for label flipping).
    """
    owner = _training_owner(train_assign, len(pool_examples))
    prompts, responses, poisoned = poison_records(
        [e.prompt for e in pool_examples],
        [e.response for e in pool_examples],
        np.array([e.label for e in pool_examples], dtype=np.int64),
        owner,
        spec,
    )
    rows = np.flatnonzero(poisoned)
    changed = [Example(prompts[i], responses[i], pool_examples[i].label) for i in rows.tolist()]
    backdoor = []
    if spec.kind == "backdoor":
        triggered, targets = backdoor_records([e.prompt for e in eval_examples], spec)
        backdoor = [
            Example(p, r, e.label)
            for p, r, e in zip(triggered, targets, eval_examples, strict=True)
        ]
    if changed or backdoor:
        _check_fits(changed + backdoor, tokenizer, seq_len, spec.kind)
    train_pool = pool
    if rows.size:
        new = tokenize_examples(changed, tokenizer, seq_len, label_names)
        train_pool = _replace_rows(pool, rows, new)
    backdoor_eval = (
        tokenize_examples(backdoor, tokenizer, seq_len, label_names) if backdoor else None
    )
    return train_pool, int(rows.size), backdoor_eval


def partitioner_arguments(partitioner_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """A partitioner's keyword arguments as JSON values, with `min_examples` defaulting to 2.

    Raises:
        ValueError: If `min_examples` is below 2 (every client needs a train and a test example).
    """
    kwargs = {k: _json_value(v) for k, v in dict(partitioner_kwargs or {}).items()}
    kwargs.setdefault("min_examples", 2)
    if not isinstance(kwargs["min_examples"], int) or kwargs["min_examples"] < 2:
        raise ValueError(
            f"partitioner_kwargs.min_examples must be an integer >= 2 so every client gets a train "
            f"and a test example, got {kwargs['min_examples']!r}."
        )
    return kwargs


def build_task_data(
    families: Sequence[str],
    num_clients: int,
    examples_per_client: int,
    seq_len: int,
    partitioner: str,
    partitioner_kwargs: Mapping[str, Any] | None,
    test_fraction: float,
    eval_examples_per_family: int,
    seed: int,
    tokenizer: Tokenizer,
    poisoning: PoisoningSpec | None = None,
) -> TaskData:
    """Builds the built-in federated instruction data: pool, partition, per-client split, eval.

    Generates `num_clients * examples_per_client` examples (uniform over families), partitions them
    into clients by family label with the chosen partitioner, then splits each client's examples at
    random into train and test with `round(test_fraction * n)` test examples, clamped to
    `[1, n - 1]`. The partitioner is always run with `min_examples >= 2`, which guarantees every
    client at least one train and one test example. Generation, partition, split and eval use
    independent streams derived from `seed`, so the result is deterministic.

    With `poisoning`, the training examples of the malicious clients are poisoned after the split
    and before they are tokenized (`fedjax_llm.data.poisoning.poison_records`); their test
    examples and the eval set stay clean. A backdoor also builds `TaskData.backdoor_eval`.

    Args:
        families: Task family names (see `TASK_FAMILIES`); their order defines the labels.
        num_clients: Number of clients M (>= 1).
        examples_per_client: Average examples per client (>= 2); the pool has M times as many.
        seq_len: Padded sequence length (32 fits every built-in family).
        partitioner: A key of `PARTITIONERS` (`iid`, `dirichlet`, `pathological`,
            `quantity_skew`).
        partitioner_kwargs: Keyword arguments of the partitioner, e.g. `{"alpha": 0.3}`;
            `min_examples` defaults to 2 and may not be lower.
        test_fraction: Share of each client's examples held out for its test set, in (0, 1).
        eval_examples_per_family: Examples per family in the global eval set (>= 1).
        seed: Non-negative integer seed.
        tokenizer: Tokenizer, e.g. `ByteTokenizer()`.
        poisoning: Data poisoning by malicious clients (one `malicious` flag per client); None
            (the default) builds clean data.

    Returns:
        The `TaskData`.

    Raises:
        ConfigError: If `poisoning` is invalid (e.g. not one flag per client) or a poisoned
            example does not fit `seq_len` (the message names the config key).
        ValueError: If an argument is out of range (the message names it), a family or partitioner
            is unknown, the partitioner rejects its arguments, or an example does not fit `seq_len`.
    """
    families = list(families) if not isinstance(families, str) else families
    for name, value, low in (
        ("num_clients", num_clients, 1),
        ("examples_per_client", examples_per_client, 2),
        ("eval_examples_per_family", eval_examples_per_family, 1),
        ("seed", seed, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
            hint = " (each client needs one train and one test example)" if low == 2 else ""
            raise ValueError(f"{name} must be an integer >= {low}{hint}, got {value!r}.")
    if not (isinstance(test_fraction, int | float | np.floating) and 0 < test_fraction < 1):
        raise ValueError(
            f"test_fraction must be a number in (0, 1), got {test_fraction!r}; e.g. 0.2 holds out "
            "a fifth of each client's examples."
        )
    if partitioner not in PARTITIONERS:
        raise ValueError(
            f"partitioner: unknown name {partitioner!r}; valid names are {sorted(PARTITIONERS)}."
        )
    kwargs = partitioner_arguments(partitioner_kwargs)
    if poisoning is not None:
        poisoning = check_poisoning(poisoning, int(num_clients))

    pool_examples = generate_examples(
        families, int(num_clients) * int(examples_per_client), _derive_seed(seed, 0)
    )
    pool = tokenize_examples(pool_examples, tokenizer, seq_len, families)
    assignment = partition(
        partitioner, pool.labels, int(num_clients), _derive_seed(seed, 1), **kwargs
    )

    train_assign, test_assign = _split_train_test(assignment, test_fraction, _derive_seed(seed, 2))

    eval_rng = np.random.default_rng(_derive_seed(seed, 3))
    # Families interleaved, so any prefix of the eval set is also close to balanced.
    eval_labels = np.tile(np.arange(len(families)), int(eval_examples_per_family))
    eval_examples = generate_examples_for_labels(families, eval_labels, eval_rng)
    eval_set = tokenize_examples(eval_examples, tokenizer, seq_len, families)

    train_pool, num_poisoned, backdoor_eval = pool, 0, None
    if poisoning is not None:
        train_pool, num_poisoned, backdoor_eval = _poison_task_pool(
            pool_examples,
            pool,
            train_assign,
            eval_examples,
            poisoning,
            tokenizer,
            seq_len,
            families,
        )
    train = make_federated_dataset(train_pool, train_assign)
    client_test = make_federated_dataset(pool, test_assign)

    train_prompts = {pool_examples[i].prompt for i in np.concatenate(train_assign).tolist()}
    test_idx = np.concatenate(test_assign).tolist()
    stats = partition_stats(
        assignment, pool.labels, families, partitioner=partitioner, partitioner_kwargs=kwargs
    )
    stats.update(
        partitioner=partitioner,
        partitioner_kwargs=kwargs,
        seed=int(seed),
        test_fraction=float(test_fraction),
        num_train=train.num_examples,
        num_client_test=client_test.num_examples,
        num_eval=len(eval_set),
        eval_prompt_overlap_with_train=float(
            np.mean([e.prompt in train_prompts for e in eval_examples])
        ),
        client_test_prompt_overlap_with_train=float(
            np.mean([pool_examples[i].prompt in train_prompts for i in test_idx])
        ),
    )
    if poisoning is not None:
        stats.update(poisoning=poisoning.kind, poisoned_examples=num_poisoned)
        if backdoor_eval is not None:
            stats.update(num_backdoor_eval=len(backdoor_eval))
    return TaskData(
        train=train,
        client_test=client_test,
        eval=eval_set,
        stats=stats,
        backdoor_eval=backdoor_eval,
    )
