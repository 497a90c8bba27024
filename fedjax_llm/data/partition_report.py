"""A picture of a partition: how much data each client has and which labels it holds.

`save_partition_report` draws three panels into one PNG: a histogram of examples per client, a
client-by-label heatmap of label shares, and the global label counts. It uses matplotlib's
object API (`matplotlib.figure.Figure`, rendered by Agg), so it needs no display and changes no
global backend state. Large populations stay readable: heatmap rows are clients sorted by their
dominant label and, beyond `max_rows`, averaged in consecutive bins; beyond `max_labels`, the
rarest labels are merged into "other".
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedjax_llm.data.federated_dataset import TaskData

__all__ = ["client_label_counts", "save_partition_report"]


def client_label_counts(
    assignment: Sequence[np.ndarray], labels: np.ndarray, num_labels: int | None = None
) -> np.ndarray:
    """Counts each client's examples per label.

    Args:
        assignment: Each client's example indices.
        labels: [N] non-negative integer label per example.
        num_labels: Number of labels K (default: `max(labels) + 1`).

    Returns:
        [M, K] int64 counts.

    Raises:
        ValueError: If `assignment` is empty, or `labels` are not integers in `[0, K)`.
    """
    labels = np.asarray(labels)
    if len(assignment) == 0:
        raise ValueError("client_label_counts: assignment has no clients.")
    if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(f"labels must be a 1-D integer array, got shape {labels.shape}.")
    if labels.size and labels.min() < 0:
        raise ValueError("labels must be non-negative.")
    k = int(num_labels if num_labels is not None else (labels.max() + 1 if labels.size else 1))
    if labels.size and labels.max() >= k:
        raise ValueError(
            f"labels must lie in [0, {k}) for {k} labels (label_names), but the largest is "
            f"{int(labels.max())}; give a name for every label."
        )
    sizes = np.array([len(a) for a in assignment], dtype=np.int64)
    idx = np.concatenate([np.asarray(a, dtype=np.int64).reshape(-1) for a in assignment])
    client = np.repeat(np.arange(sizes.size), sizes)
    return np.bincount(client * k + labels[idx], minlength=sizes.size * k).reshape(sizes.size, k)


def _counts_of_task_data(data: TaskData) -> np.ndarray:
    k = len(data.eval.label_names)
    counts = np.zeros((data.train.num_clients, k), dtype=np.int64)
    for fd in (data.train, data.client_test):
        flat = fd.client_ids * k + fd.examples.labels.astype(np.int64)
        counts += np.bincount(flat, minlength=counts.size).reshape(counts.shape)
    return counts


def _heatmap_rows(
    shares: np.ndarray, full_shares: np.ndarray, max_rows: int
) -> tuple[np.ndarray, int]:
    """Clients sorted by dominant label (then its share), averaged into at most `max_rows`.

    The order comes from `full_shares` (every label), so merging rare labels into "other" does
    not make "other" look like a dominant label.
    """
    order = np.lexsort((-full_shares.max(axis=1), full_shares.argmax(axis=1)))
    shares = shares[order]
    m = shares.shape[0]
    if m <= max_rows:
        return shares, 1
    edges = np.linspace(0, m, max_rows + 1).astype(np.int64)
    sums = np.add.reduceat(shares, edges[:-1], axis=0)
    return sums / np.diff(edges)[:, None], int(np.ceil(m / max_rows))


def save_partition_report(
    data: TaskData | Sequence[np.ndarray],
    path: str | os.PathLike[str],
    *,
    labels: np.ndarray | None = None,
    label_names: Sequence[str] | None = None,
    title: str | None = None,
    max_rows: int = 100,
    max_labels: int = 30,
) -> str:
    """Saves a PNG showing examples per client and a client-by-label heatmap.

    Args:
        data: A `TaskData` (clients' train plus test examples are counted, labels named by
            `data.eval.label_names`, and the title taken from `data.stats`), or an assignment
            (each client's example indices) together with `labels`.
        path: Output file, e.g. `run/partition.png`; its folder is created.
        labels: [N] integer labels, required with an assignment.
        label_names: Name of each label (default: the label ids, or the TaskData's names).
        title: Figure title (default: a summary of the partition).
        max_rows: Heatmap rows at most; more clients are averaged in consecutive bins of
            clients sorted by dominant label.
        max_labels: Heatmap columns at most; rarer labels are merged into "other".

    Returns:
        `path` as a string.

    Raises:
        ValueError: If `labels` are missing with an assignment, shapes disagree, or `max_rows` /
            `max_labels` are below 1 / 2.
    """
    from matplotlib.figure import Figure  # lazy: only reports need matplotlib
    from matplotlib.ticker import MaxNLocator

    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
        raise ValueError(f"max_rows must be an integer >= 1, got {max_rows!r}.")
    if isinstance(max_labels, bool) or not isinstance(max_labels, int) or max_labels < 2:
        raise ValueError(f"max_labels must be an integer >= 2, got {max_labels!r}.")
    stats: dict[str, Any] = {}
    if isinstance(data, TaskData):
        counts = _counts_of_task_data(data)
        names = list(label_names or data.eval.label_names)
        stats = data.stats
    else:
        if labels is None:
            raise ValueError(
                "save_partition_report: pass labels (one per example) with an assignment, or "
                "pass a TaskData."
            )
        counts = client_label_counts(data, labels, len(label_names) if label_names else None)
        names = list(label_names) if label_names else [str(i) for i in range(counts.shape[1])]
    if len(names) != counts.shape[1]:
        raise ValueError(
            f"label_names has {len(names)} names but the labels need {counts.shape[1]}."
        )
    num_clients, num_labels = counts.shape
    sizes = counts.sum(axis=1)
    totals = counts.sum(axis=0)

    full_shares = counts / np.maximum(sizes, 1)[:, None]
    # Columns: the most frequent labels, the rest merged into "other".
    if num_labels > max_labels:
        top = np.sort(np.argsort(-totals, kind="stable")[: max_labels - 1])
        rest = np.setdiff1d(np.arange(num_labels), top)
        counts = np.concatenate([counts[:, top], counts[:, rest].sum(1, keepdims=True)], axis=1)
        names = [names[i] for i in top.tolist()] + [f"other ({rest.size})"]
        totals = counts.sum(axis=0)
    shares = counts / np.maximum(sizes, 1)[:, None]
    rows, per_row = _heatmap_rows(shares, full_shares, max_rows)

    fig = Figure(figsize=(16, 5.5), layout="constrained")
    ax_hist, ax_heat, ax_bar = fig.subplots(1, 3, width_ratios=[1.0, 1.4, 1.0])
    bins = min(50, max(1, int(np.unique(sizes).size)))
    ax_hist.hist(sizes, bins=bins, color="#4477aa")
    ax_hist.set_xlabel("examples per client")
    ax_hist.set_ylabel("clients")
    ax_hist.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax_hist.set_title(
        f"{num_clients} clients: min {sizes.min()}, median {np.median(sizes):g}, max {sizes.max()}",
        fontsize=10,
    )
    if sizes.size > 1 and sizes.max() > 20 * max(np.median(sizes), 1):
        ax_hist.set_yscale("log")

    image = ax_heat.imshow(
        rows, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0, vmax=1.0
    )
    fig.colorbar(image, ax=ax_heat, label="share of the client's examples")
    ax_heat.set_xlabel("label")
    ax_heat.set_ylabel(
        "clients, sorted by dominant label"
        + (f" (mean of ~{per_row} per row)" if per_row > 1 else "")
    )
    ax_heat.set_xticks(range(len(names)))
    ax_heat.set_xticklabels([n[:18] for n in names], rotation=60, ha="right", fontsize=7)
    ax_heat.set_title("label shares per client", fontsize=10)

    ax_bar.barh(range(len(names)), totals, color="#cc6677")
    ax_bar.set_yticks(range(len(names)))
    ax_bar.set_yticklabels([n[:18] for n in names], fontsize=7)
    ax_bar.invert_yaxis()
    ax_bar.set_xlabel("examples")
    ax_bar.set_title(f"label counts ({int(totals.sum())} examples)", fontsize=10)

    if title is None:
        title = "partition"
        if "partitioner" in stats:
            args = ", ".join(f"{k}={v}" for k, v in (stats.get("partitioner_kwargs") or {}).items())
            title = f"partition {stats['partitioner']}({args})"
        if stats.get("source"):
            title += f" of {stats['source']}"
    fig.suptitle(title)
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path
