"""Federated data given directly as arrays: pre-tokenized text or any per-example fields.

For research code that already has its clients' data (token ids from its own tokenizer,
features and targets, preference pairs): no tokenizer, no partitioner, no held-out split is
needed. Each client is a dict of per-example arrays with the same fields; they are stored
contiguously, one row range per client, as the compiled round reads them.

Builders of non-token data from files return it too (`build_preference_data`: chosen/rejected
rows), with per-client held-out examples (`client_test`) and what the build did (`info`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class ClientArrays:
    """Every client's examples as arrays, plus an optional global evaluation set.

    Attributes:
      examples: ``{field: [N, ...]}``; client m's examples are rows
        ``client_start[m] : client_start[m] + client_count[m]``.
      client_start: ``[M]`` int64 offset of each client's first example.
      client_count: ``[M]`` int64 number of examples of each client (>= 1).
      eval: optional ``{field: [E, ...]}`` global held-out set (same fields).
      client_test: optional per-client held-out examples: a `ClientArrays` with the same
        fields and one client per client here, in the same order (built from files, e.g. by
        `fedjax_llm.data.build_preference_data`).
      info: optional JSON-serializable facts about how the data was built (source, partition
        statistics, ...), merged into `stats`.
    """

    examples: dict[str, np.ndarray]
    client_start: np.ndarray
    client_count: np.ndarray
    eval: dict[str, np.ndarray] | None = None
    client_test: ClientArrays | None = None
    info: dict | None = None

    def __post_init__(self) -> None:
        test = self.client_test
        if test is None:
            return
        if test.num_clients != self.num_clients:
            raise ValueError(
                f"client arrays: client_test has {test.num_clients} clients, the training data "
                f"{self.num_clients}; it needs one per training client, in the same order."
            )
        if sorted(test.examples) != sorted(self.examples):
            raise ValueError(
                f"client arrays: client_test has fields {sorted(test.examples)}, the training "
                f"data {sorted(self.examples)}."
            )

    @property
    def num_clients(self) -> int:
        """Number of clients M."""
        return int(self.client_count.shape[0])

    @property
    def stats(self) -> dict:
        """Partition statistics of the run directory's ``partition.json`` (with `info`)."""
        base = {
            "source": "arrays",
            "num_clients": self.num_clients,
            "num_train": int(self.client_count.sum()),
            "client_sizes": {
                "min": int(self.client_count.min()),
                "mean": float(self.client_count.mean()),
                "max": int(self.client_count.max()),
            },
            "fields": sorted(self.examples),
            "num_eval": 0 if self.eval is None else len(next(iter(self.eval.values()))),
        }
        if self.client_test is not None:
            base["num_client_test"] = int(self.client_test.client_count.sum())
        return {**base, **(self.info or {})}

    @classmethod
    def from_clients(
        cls,
        clients: Sequence[Mapping[str, np.ndarray]],
        eval: Mapping[str, np.ndarray] | None = None,
    ) -> ClientArrays:
        """Stacks per-client dicts of arrays.

        Args:
          clients: one ``{field: [n_m, ...]}`` per client; every client needs >= 1 example and
            the same fields with the same trailing shapes and dtypes.
          eval: optional global held-out ``{field: [E, ...]}``.

        Returns:
          The `ClientArrays`.

        Raises:
          ValueError: naming the client and field that does not fit.
        """
        if not clients:
            raise ValueError("client arrays: no clients given.")
        fields = sorted(clients[0])
        if not fields:
            raise ValueError("client arrays: client 0 has no fields.")
        counts = []
        for m, client in enumerate(clients):
            if sorted(client) != fields:
                raise ValueError(
                    f"client arrays: client {m} has fields {sorted(client)}, client 0 has {fields}."
                )
            sizes = {f: len(np.asarray(client[f])) for f in fields}
            if len(set(sizes.values())) != 1 or min(sizes.values()) < 1:
                raise ValueError(
                    f"client arrays: client {m} needs the same number (>= 1) of rows in every "
                    f"field; got {sizes}."
                )
            counts.append(next(iter(sizes.values())))
        examples = {}
        for f in fields:
            parts = [np.asarray(c[f]) for c in clients]
            shapes = {p.shape[1:] for p in parts}
            if len(shapes) != 1:
                raise ValueError(f"client arrays: field {f!r} has differing shapes {shapes}.")
            examples[f] = np.concatenate(parts)
        counts = np.asarray(counts, np.int64)
        start = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        eval_arrays = None
        if eval is not None:
            eval_arrays = {f: np.asarray(v) for f, v in eval.items()}
            missing = [f for f in fields if f not in eval_arrays]
            if missing:
                raise ValueError(f"client arrays: the eval set lacks fields {missing}.")
        return cls(examples, start, counts, eval_arrays)
