"""The plots of a sweep (`fedjax_llm.sweep`), drawn from its results rows and run histories.

Each plot needs certain keys to be swept and is drawn only when they are:

- ``final_vs_alpha.png`` (``data.dirichlet_alpha`` swept): the final metric against the
  Dirichlet alpha on a log axis, one line per configuration of the other swept keys (per
  algorithm in a heterogeneity study), the mean over seeds with a min-max band.
- ``learning_curves.png`` (always): the metric and the training loss against the round, one
  panel per alpha when alpha is swept, one line per configuration, the mean over seeds with a
  min-max band.
- ``round_time_vs_clients.png`` (``run.num_clients_per_round`` swept): the median round time
  against the clients per round.

Seeds are the swept values of ``run.seed`` and ``data.seed``: runs that differ only in them are
one configuration. Failed runs are left out. The figures use matplotlib's object API rendered by
Agg, so they need no display and change no global matplotlib state.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

ALPHA_KEY = "data.dirichlet_alpha"
CLIENTS_KEY = "run.num_clients_per_round"
SEED_KEYS = ("run.seed", "data.seed")
ALPHA_PLOT = "final_vs_alpha.png"
CURVES_PLOT = "learning_curves.png"
ROUND_TIME_PLOT = "round_time_vs_clients.png"

Row = Mapping[str, Any]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _groups(rows: Sequence[Row], keys: Sequence[str]) -> dict[tuple, list[Row]]:
    """Rows grouped by their values of ``keys``, in first-seen order."""
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(key) for key in keys), []).append(row)
    return groups


def _label(keys: Sequence[str], values: tuple) -> str:
    return ", ".join(str(v) for v in values) if keys else "all runs"


def _band(ax: Any, xs: Sequence[float], samples: Sequence[Sequence[float]], label: str) -> None:
    """Draws the mean of each x's samples as a line and their min-max as a band."""
    mean = [float(np.mean(s)) for s in samples]
    (line,) = ax.plot(xs, mean, marker="o", markersize=4, label=label)
    if any(len(s) > 1 for s in samples):
        low = [min(s) for s in samples]
        high = [max(s) for s in samples]
        ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.2, linewidth=0)


def _seeds_note(seed_keys: Sequence[str], rows: Sequence[Row]) -> str:
    n = len(_groups(rows, seed_keys)) if seed_keys else 1
    if n < 2:
        return ""
    return f"mean over {n} seeds ({', '.join(seed_keys)}), band: min-max"


def _save(fig: Any, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path


def _x_by_key(
    rows: Sequence[Row],
    x_key: str,
    y_key: str,
    swept: Sequence[str],
    path: str,
    *,
    log_x: bool,
    x_label: str,
    title: str,
) -> str | None:
    """One line per configuration of the other swept keys: y (mean over seeds, min-max band)
    against x."""
    from matplotlib.figure import Figure  # lazy: only plots need matplotlib

    seed_keys = [k for k in swept if k in SEED_KEYS]
    line_keys = [k for k in swept if k != x_key and k not in SEED_KEYS]
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for values, group in _groups(rows, line_keys).items():
        by_x: dict[float, list[float]] = {}
        for row in group:
            x, y = _number(row.get(x_key)), _number(row.get(y_key))
            if x is not None and y is not None:
                by_x.setdefault(x, []).append(y)
        if by_x:
            xs = sorted(by_x)
            _band(ax, xs, [by_x[x] for x in xs], _label(line_keys, values))
    if not ax.lines:
        return None
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_key)
    ax.grid(alpha=0.3, which="both")
    note = _seeds_note(seed_keys, rows)
    ax.set_title(title + (f"\n{note}" if note else ""), fontsize="medium")
    if line_keys:
        ax.legend(title=", ".join(line_keys), fontsize="small")
    return _save(fig, path)


def plot_final_vs_alpha(
    rows: Sequence[Row], metric: str, swept: Sequence[str], path: str
) -> str | None:
    """The final ``metric`` against ``data.dirichlet_alpha`` (log axis; smaller alpha is more
    heterogeneous), one line per configuration of the other swept keys, mean over seeds with a
    min-max band.

    Args:
      rows: the sweep's results rows (finished runs).
      metric: the row key of the final metric.
      swept: the sweep's swept keys.
      path: the PNG file.

    Returns:
      ``path``, or None if no row has both an alpha and the metric.
    """
    return _x_by_key(
        rows,
        ALPHA_KEY,
        metric,
        swept,
        path,
        log_x=True,
        x_label=f"{ALPHA_KEY} (smaller: more heterogeneous clients)",
        title=f"final {metric} against the Dirichlet alpha",
    )


def plot_round_time_vs_clients(rows: Sequence[Row], swept: Sequence[str], path: str) -> str | None:
    """The median round time against ``run.num_clients_per_round``, one line per configuration
    of the other swept keys, mean over seeds with a min-max band (log axis over a wide range).

    Returns:
      ``path``, or None if no row has both values.
    """
    counts = [c for row in rows if (c := _number(row.get(CLIENTS_KEY))) is not None]
    wide = bool(counts) and min(counts) > 0 and max(counts) / min(counts) >= 8
    return _x_by_key(
        rows,
        CLIENTS_KEY,
        "median_round_time_s",
        swept,
        path,
        log_x=wide,
        x_label=CLIENTS_KEY,
        title="median round time against the clients per round",
    )


def _curve(history: Sequence[Mapping[str, Any]], key: str) -> dict[int, float]:
    return {
        int(h["round"]): v
        for h in history
        if "round" in h and (v := _number(h.get(key))) is not None
    }


def plot_learning_curves(
    rows: Sequence[Row],
    histories: Mapping[str, Sequence[Mapping[str, Any]]],
    metric: str,
    swept: Sequence[str],
    path: str,
) -> str | None:
    """The metric (top) and the training loss (bottom) against the round, one panel per alpha
    when alpha is swept, one line per configuration of the other swept keys, mean over seeds
    (at the rounds every seed recorded) with a min-max band.

    Args:
      rows: the sweep's results rows (finished runs), with ``run`` naming the history.
      histories: run name -> its records (``metrics.jsonl``).
      metric: the metric of the top row.
      swept: the sweep's swept keys.
      path: the PNG file.

    Returns:
      ``path``, or None if no run recorded the metric or the training loss.
    """
    from matplotlib.figure import Figure  # lazy: only plots need matplotlib

    if not rows:
        return None
    seed_keys = [k for k in swept if k in SEED_KEYS]
    panel_keys = [ALPHA_KEY] if ALPHA_KEY in swept else []
    line_keys = [k for k in swept if k not in SEED_KEYS and k not in panel_keys]
    metrics = [metric] if metric == "train_loss" else [metric, "train_loss"]
    panels = _groups(rows, panel_keys)
    if panel_keys:
        panels = dict(sorted(panels.items(), key=lambda item: _number(item[0][0]) or 0.0))
    fig = Figure(figsize=(3.6 * len(panels) + 1.0, 3.2 * len(metrics) + 0.6), layout="constrained")
    axes = fig.subplots(len(metrics), len(panels), squeeze=False, sharex=True, sharey="row")
    colors: dict[tuple, str] = {}
    drawn = False
    for column, (panel, panel_rows) in enumerate(panels.items()):
        for row_index, key in enumerate(metrics):
            ax = axes[row_index][column]
            for values, group in _groups(panel_rows, line_keys).items():
                curves = [_curve(histories.get(r["run"], ()), key) for r in group]
                curves = [c for c in curves if c]
                if not curves:
                    continue
                rounds = sorted(set.intersection(*(set(c) for c in curves)))
                if not rounds:
                    continue
                samples = [[c[r] for c in curves] for r in rounds]
                mean = [float(np.mean(s)) for s in samples]
                kwargs = {"color": colors[values]} if values in colors else {}
                marker = "o" if len(rounds) <= 12 else None
                (line,) = ax.plot(
                    rounds,
                    mean,
                    marker=marker,
                    markersize=3,
                    label=_label(line_keys, values),
                    **kwargs,
                )
                colors.setdefault(values, line.get_color())
                if len(curves) > 1:
                    low = [min(s) for s in samples]
                    high = [max(s) for s in samples]
                    ax.fill_between(rounds, low, high, color=line.get_color(), alpha=0.2, lw=0)
                drawn = True
            if row_index == 0 and panel_keys:
                ax.set_title(f"{ALPHA_KEY}={panel[0]}", fontsize="medium")
            if column == 0:
                ax.set_ylabel(key)
            if row_index == len(metrics) - 1:
                ax.set_xlabel("round")
            ax.grid(alpha=0.3)
    if not drawn:
        return None
    handles, labels = [], []
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    if line_keys and handles:
        fig.legend(handles, labels, title=", ".join(line_keys), loc="outside right upper")
    note = _seeds_note(seed_keys, rows)
    fig.suptitle("learning curves" + (f" ({note})" if note else ""), fontsize="medium")
    return _save(fig, path)


def save_sweep_plots(
    rows: Sequence[Row],
    histories: Mapping[str, Sequence[Mapping[str, Any]]],
    metric: str,
    swept: Sequence[str],
    out_dir: str,
) -> list[str]:
    """Draws every plot whose keys are swept into ``out_dir``; returns the files written.

    Args:
      rows: the results rows; only those with status ``ok`` are drawn.
      histories: run name -> its records.
      metric: the sweep's metric.
      swept: the sweep's swept keys.
      out_dir: the sweep directory.
    """
    done = [row for row in rows if row.get("status") == "ok"]
    paths = []
    if ALPHA_KEY in swept:
        paths.append(plot_final_vs_alpha(done, metric, swept, os.path.join(out_dir, ALPHA_PLOT)))
    paths.append(
        plot_learning_curves(done, histories, metric, swept, os.path.join(out_dir, CURVES_PLOT))
    )
    if CLIENTS_KEY in swept:
        paths.append(
            plot_round_time_vs_clients(done, swept, os.path.join(out_dir, ROUND_TIME_PLOT))
        )
    return [p for p in paths if p is not None]
