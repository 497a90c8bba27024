"""Sweeps: many runs of one base config, from a YAML spec, tabulated and plotted.

A spec names a base config, the sweep directory, the metric to tabulate and the runs::

    base: configs/default.yaml        # a config file, or a mapping of config keys (inline)
    output_dir: runs/sweeps/heterogeneity
    metric: eval/loss                 # the final value of this metric is tabulated and plotted
    overrides:                        # applied to every run
      run.num_rounds: 20
    grid:                             # the cartesian product of these values
      data.dirichlet_alpha: [0.01, 0.1, 1]
      algorithm.type: [fedavg, scaffold]
    runs:                             # and/or explicit runs; with a grid, each crosses it
      - {client.optimizer: sgd, client.lr: 0.5}

Keys are dotted config keys (as on the command line of ``scripts/simulate.py``; nested
mappings are flattened to them). Every key is checked against the config before anything runs,
and every run's config is loaded and validated by `fedjax_llm.config.load_config`, so a typo or
a bad combination stops the sweep before its first run. Each run's own values (from the grid
and its ``runs`` item) name its directory, ``<output_dir>/runs/<key=value,...>``; a value of a
run replaces the same key of ``overrides``.

The sweep directory holds ``sweep.yaml`` (the resolved spec, itself a spec that continues the
sweep), one directory per run, ``results.csv`` (one row per run, rewritten after each run) and
the plots of `fedjax_llm.sweep_plots`. A sweep is resumable: a run whose directory holds a
``summary.json`` (written at the end of a run) is skipped, an unfinished one is continued from
its newest checkpoint (or restarted). A failed run (any exception, divergence included) is
recorded with its one-line error and the sweep goes on. Runs execute one after another in this
process, so their round times compare.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import difflib
import hashlib
import itertools
import json
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

import draccus
import yaml

from fedjax_llm.config import (
    ConfigError,
    ExperimentConfig,
    config_to_dict,
    field_types,
    load_config,
)
from fedjax_llm.errors import RunInterrupted, UserError, first_line

SPEC_KEYS = ("base", "output_dir", "metric", "overrides", "grid", "runs")
"""The top-level keys of a sweep spec."""

SWEEP_FILE = "sweep.yaml"
RESULTS_FILE = "results.csv"
RUNS_DIR = "runs"
SUMMARY_FILE = "summary.json"
"""What `fedjax_llm.Simulation` writes at the end of a run: its presence marks a finished run."""

SWEEP_MANAGED_KEYS = ("run.output_dir", "run.resume")
"""Config keys the sweep sets itself (each run's directory, and resuming unfinished runs)."""

_MAX_NAME = 120


class SweepError(UserError, ValueError):
    """A sweep spec or sweep directory is unusable; the message names the cause and the fix."""


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """A parsed sweep spec (see the module docstring for the YAML form).

    Attributes:
      output_dir: the sweep directory.
      base: path of the base YAML config; None starts from the config defaults.
      base_overrides: an inline base config as dotted key -> value (applied first).
      metric: the metric whose final value is tabulated and plotted, e.g. ``eval/loss``.
      overrides: dotted key -> value applied to every run (after the base).
      grid: dotted key -> the values it takes; the runs are the cartesian product.
      runs: explicit runs, each a mapping of dotted key -> value; crossed with the grid.
      source: the spec file it was read from, for messages.
    """

    output_dir: str
    base: str | None = None
    base_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    metric: str = "eval/loss"
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    grid: Mapping[str, Sequence[Any]] = dataclasses.field(default_factory=dict)
    runs: Sequence[Mapping[str, Any]] = ()
    source: str = "sweep spec"

    @property
    def swept_keys(self) -> list[str]:
        """The keys that vary over the runs: the grid's, then those of ``runs`` items."""
        keys = dict.fromkeys(self.grid)
        for item in self.runs:
            keys.update(dict.fromkeys(item))
        return list(keys)

    def to_dict(self) -> dict[str, Any]:
        """The spec as YAML-ready data (what ``sweep.yaml`` holds; it loads back as a spec)."""
        data: dict[str, Any] = {}
        if self.base is not None:
            data["base"] = self.base
        elif self.base_overrides:
            data["base"] = dict(self.base_overrides)
        data["output_dir"] = self.output_dir
        data["metric"] = self.metric
        data["overrides"] = dict(self.overrides)
        data["grid"] = {key: list(values) for key, values in self.grid.items()}
        data["runs"] = [dict(item) for item in self.runs]
        return data


@dataclasses.dataclass(frozen=True)
class SweepRun:
    """One run of a sweep.

    Attributes:
      name: the run's directory name, derived from ``values``.
      values: the run's own values (grid and ``runs`` item), dotted key -> value.
      config: the run's validated config (its ``run.output_dir`` is its directory).
    """

    name: str
    values: Mapping[str, Any]
    config: ExperimentConfig

    @property
    def run_dir(self) -> str:
        """The run's directory."""
        return self.config.run.output_dir

    @property
    def finished(self) -> bool:
        """Whether the run's directory holds a finished run (its ``summary.json``)."""
        return os.path.isfile(os.path.join(self.run_dir, SUMMARY_FILE))


@dataclasses.dataclass
class SweepResult:
    """What a sweep ended with.

    Attributes:
      rows: one row per run (the rows of ``results.csv``).
      results_path: the CSV file.
      plots: the PNG files drawn.
      failed: names of the runs that failed.
      wall_time_s: the wall time of this invocation.
    """

    rows: list[dict[str, Any]]
    results_path: str
    plots: list[str]
    failed: list[str]
    wall_time_s: float


# ----------------------------------------------------------------------------- the spec
def _flatten(mapping: Mapping[Any, Any], prefix: str = "") -> dict[str, Any]:
    """``{a: {b: 1}, c.d: 2}`` -> ``{"a.b": 1, "c.d": 2}``."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _flatten_grid(mapping: Mapping[Any, Any], source: str, prefix: str = "") -> dict[str, list]:
    grid: dict[str, list] = {}
    for key, values in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(values, Mapping):
            grid.update(_flatten_grid(values, source, dotted + "."))
            continue
        if not isinstance(values, list) or not values:
            raise SweepError(
                f"{source}: grid.{dotted} must be a non-empty list of values, e.g. "
                f"'{dotted}: [{values!r}]'; found {values!r}."
            )
        grid[dotted] = values
    return grid


def spec_from_dict(data: Any, source: str = "sweep spec") -> SweepSpec:
    """Builds a `SweepSpec` from parsed YAML, checking its shape (not yet its config keys).

    Args:
      data: the spec's top-level mapping.
      source: the spec file, for messages.

    Returns:
      The spec.

    Raises:
      SweepError: for an unknown top-level key, a missing ``output_dir`` or ``metric`` of the
        wrong type, a grid value that is not a list, ``runs`` that is not a list of mappings,
        or a spec with neither ``grid`` nor ``runs``.
    """
    if not isinstance(data, Mapping):
        raise SweepError(
            f"{source}: a sweep spec is a mapping with keys {', '.join(SPEC_KEYS)}; found "
            f"{type(data).__name__}."
        )
    unknown = [key for key in data if key not in SPEC_KEYS]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), SPEC_KEYS, n=1)
        hint = f" Did you mean {close[0]}?" if close else ""
        raise SweepError(
            f"{source}: unknown spec key {unknown[0]!r}.{hint} Valid keys: {', '.join(SPEC_KEYS)}."
        )
    output_dir = data.get("output_dir")
    if not isinstance(output_dir, str) or not output_dir:
        raise SweepError(f"{source}: set output_dir, the sweep directory (e.g. runs/sweeps/x).")
    metric = data.get("metric", "eval/loss")
    if not isinstance(metric, str) or not metric:
        raise SweepError(f"{source}: metric must be a metric name such as eval/loss.")
    base, base_overrides = data.get("base"), {}
    if isinstance(base, Mapping):
        base, base_overrides = None, _flatten(base)
    elif base is not None and not isinstance(base, str):
        raise SweepError(
            f"{source}: base must be a config path (e.g. configs/default.yaml) or a mapping of "
            f"config keys; found {base!r}."
        )
    for key in ("overrides", "grid"):
        if not isinstance(data.get(key) or {}, Mapping):
            raise SweepError(f"{source}: {key} must be a mapping of config keys.")
    runs = data.get("runs") or []
    if not isinstance(runs, list) or not all(isinstance(item, Mapping) for item in runs):
        raise SweepError(
            f"{source}: runs must be a list of mappings of config keys, e.g. "
            "'runs: [{client.lr: 0.1}, {client.lr: 0.5}]'."
        )
    grid = _flatten_grid(data.get("grid") or {}, source)
    if not grid and not runs:
        raise SweepError(f"{source}: a sweep needs grid: (values per key) or runs: (a list).")
    return SweepSpec(
        output_dir=output_dir,
        base=None if base is None else os.path.normpath(base),
        base_overrides=base_overrides,
        metric=metric,
        overrides=_flatten(data.get("overrides") or {}),
        grid=grid,
        runs=tuple(_flatten(item) for item in runs),
        source=source,
    )


def load_spec(path: str | os.PathLike[str]) -> SweepSpec:
    """Reads a sweep spec from a YAML file.

    A relative ``base`` path is looked up from the current directory, then from the spec's
    folder.

    Raises:
      SweepError: if the file is missing or not valid YAML, or for the errors of
        `spec_from_dict`.
    """
    path = os.fspath(path)
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise SweepError(f"sweep spec {path} not found.") from None
    except IsADirectoryError:
        raise SweepError(f"{path} is a directory; pass a sweep spec file.") from None
    except yaml.YAMLError as e:
        raise SweepError(f"{path}: invalid YAML: {first_line(str(e))}") from None
    spec = spec_from_dict(data, path)
    if spec.base is not None and not os.path.isabs(spec.base) and not os.path.exists(spec.base):
        beside = os.path.join(os.path.dirname(path), spec.base)
        if os.path.exists(beside):
            spec = dataclasses.replace(spec, base=os.path.normpath(beside))
    return spec


# ----------------------------------------------------------------------------- keys
def _config_keys() -> list[str]:
    """Every dotted key a config has (sections included; the algorithm's keys of every
    registered type)."""
    keys: list[str] = []

    def walk(config_class: type, prefix: str) -> None:
        classes = [config_class]
        if issubclass(config_class, draccus.ChoiceRegistry):
            keys.append(prefix + "type")
            classes = list(config_class.get_known_choices().values())
        for klass in classes:
            for name, field in field_types(klass).items():
                if prefix + name in keys:
                    continue
                keys.append(prefix + name)
                if field.is_section:
                    walk(field.base, f"{prefix}{name}.")

    walk(ExperimentConfig, "")
    return keys


def _closest_key(key: str, valid: Sequence[str]) -> str | None:
    """The valid key a mistyped one most likely meant: in the same section, one whose name
    contains the typed name (``data.alpha`` -> ``data.dirichlet_alpha``) or looks like it;
    else the closest key overall."""
    section, _, name = key.rpartition(".")
    siblings = [v.rpartition(".")[2] for v in valid if v.rpartition(".")[0] == section]
    containing = [s for s in siblings if name and name in s]
    close = difflib.get_close_matches(name, containing or siblings, n=1, cutoff=0.5)
    if close or containing:
        leaf = close[0] if close else containing[0]
        return f"{section}.{leaf}" if section else leaf
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return close[0] if close else None


def check_keys(spec: SweepSpec) -> None:
    """Checks every config key of the spec against the config, before anything runs.

    Raises:
      SweepError: naming the first unknown key, where it is and the closest valid key; or a
        key the sweep sets itself (``run.output_dir``, ``run.resume``); or a key both in the
        grid and in a ``runs`` item.
    """
    valid = _config_keys()
    places: list[tuple[str, Sequence[str]]] = [
        ("base", list(spec.base_overrides)),
        ("overrides", list(spec.overrides)),
        ("grid", list(spec.grid)),
    ]
    places += [(f"runs[{i}]", list(item)) for i, item in enumerate(spec.runs)]
    for where, keys in places:
        for key in keys:
            if key in SWEEP_MANAGED_KEYS:
                raise SweepError(
                    f"{spec.source}: {where} sets {key}, which the sweep sets itself (each run "
                    f"is in <output_dir>/{RUNS_DIR}/<name> and unfinished runs are resumed); "
                    "remove it."
                )
            if key not in valid:
                close = _closest_key(key, valid)
                hint = f" Did you mean {close}?" if close else ""
                raise SweepError(
                    f"{spec.source}: unknown config key {key} in {where}.{hint} "
                    "(python scripts/simulate.py --help lists every key.)"
                )
    for i, item in enumerate(spec.runs):
        both = [key for key in item if key in spec.grid]
        if both:
            raise SweepError(
                f"{spec.source}: {both[0]} is both in grid and in runs[{i}]; set it in one."
            )


# ----------------------------------------------------------------------------- runs
def expand(spec: SweepSpec) -> list[dict[str, Any]]:
    """The runs' own values: the grid's cartesian product (in the grid's key order, the last
    key varying fastest), crossed with each ``runs`` item."""
    keys = list(spec.grid)
    combos = [
        dict(zip(keys, values, strict=True)) for values in itertools.product(*spec.grid.values())
    ]
    items = list(spec.runs) or [{}]
    return [{**item, **combo} for item in items for combo in combos]


def _value_text(value: Any) -> str:
    """A value as written in a run name: ``0.1``, ``fedavg``, ``true``, ``null``, ``q+v``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, list | tuple):
        return "+".join(_value_text(v) for v in value)
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}={_value_text(v)}" for k, v in value.items()) + "}"
    return str(value)


def run_name(values: Mapping[str, Any]) -> str:
    """The directory name of a run: its values as ``key=value`` joined by commas, keys sorted.

    ``{"run.seed": 1, "algorithm.type": "scaffold"}`` -> ``algorithm.type=scaffold,run.seed=1``.
    Characters outside ``[A-Za-z0-9._=,+-]`` become ``_``; a name that had any, or is longer
    than 120 characters, is cut and ends with a hash of the full text, so names stay unique.
    A run without values is ``base``.
    """
    text = ",".join(f"{key}={_value_text(values[key])}" for key in sorted(values)) or "base"
    safe = re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)
    if safe == text and len(text) <= _MAX_NAME:
        return text
    digest = hashlib.sha1(text.encode()).hexdigest()[:10]
    return f"{safe[: _MAX_NAME - 11]}_{digest}"


def _override_args(values: Mapping[str, Any]) -> list[str]:
    """Dotted values as `load_config` overrides, ``--key=<YAML text>``."""
    args = []
    for key, value in values.items():
        text = yaml.safe_dump(value, default_flow_style=True, width=math.inf).strip()
        text = text.removesuffix("\n...").removesuffix("...").strip()
        args.append(f"--{key}={text}")
    return args


def build_runs(spec: SweepSpec) -> list[SweepRun]:
    """Checks the keys, expands the runs and loads and validates every run's config.

    Nothing is run or written.

    Returns:
      The runs, in the order they run.

    Raises:
      SweepError: for an unknown key (see `check_keys`), two runs with the same values, or a
        run whose config is invalid (the message names the run and the config's error).
    """
    check_keys(spec)
    runs, seen = [], {}
    runs_dir = os.path.join(spec.output_dir, RUNS_DIR)
    for values in expand(spec):
        name = run_name(values)
        if name in seen:
            raise SweepError(
                f"{spec.source}: two runs have the same values ({name}); remove the repeated "
                "grid value or runs item."
            )
        seen[name] = values
        merged = {**spec.base_overrides, **spec.overrides, **values}
        args = _override_args(merged) + [f"--run.output_dir={os.path.join(runs_dir, name)}"]
        try:
            config = load_config(spec.base, args)
        except FileNotFoundError as err:
            raise SweepError(f"{spec.source}: base config {err.filename} not found.") from None
        except ConfigError as err:
            message = str(err).removeprefix("command line: ")
            raise SweepError(f"{spec.source}: run {name}: {message}") from None
        runs.append(SweepRun(name=name, values=values, config=config))
    return runs


# ----------------------------------------------------------------------------- the directory
def _identity(data: Mapping[str, Any]) -> dict[str, Any]:
    """What defines a sweep's runs (a different metric, or a moved directory, is the same
    sweep)."""
    return {key: data.get(key) for key in ("base", "overrides", "grid", "runs")}


def prepare_output_dir(spec: SweepSpec) -> None:
    """Makes the sweep directory and writes ``sweep.yaml``, or refuses one of another sweep.

    Raises:
      SweepError: if the directory holds the ``sweep.yaml`` of a different spec (other base,
        overrides, grid or runs), or run directories but no ``sweep.yaml``.
    """
    path = os.path.join(spec.output_dir, SWEEP_FILE)
    resolved = spec.to_dict()
    fresh = f"choose another output_dir (or delete {spec.output_dir}) to start afresh"
    if os.path.exists(path):
        try:
            with open(path) as f:
                saved = yaml.safe_load(f)
        except (OSError, yaml.YAMLError) as err:
            raise SweepError(f"{path} is unreadable ({first_line(str(err))}); {fresh}.") from None
        saved = saved if isinstance(saved, Mapping) else {}
        ours = _identity(yaml.safe_load(yaml.safe_dump(resolved)))
        differs = [key for key, value in _identity(saved).items() if value != ours[key]]
        if differs:
            raise SweepError(
                f"{spec.output_dir} holds another sweep ({', '.join(differs)} differ from its "
                f"{SWEEP_FILE}): to continue it, run the same spec (e.g. python scripts/sweep.py "
                f"{path}); to start a new sweep, {fresh}."
            )
    else:
        runs_dir = os.path.join(spec.output_dir, RUNS_DIR)
        if os.path.isdir(runs_dir) and os.listdir(runs_dir):
            raise SweepError(
                f"{runs_dir} holds runs but {spec.output_dir} has no {SWEEP_FILE}, so it is not "
                f"known which sweep made them; {fresh}."
            )
    os.makedirs(spec.output_dir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"# The resolved sweep spec; `python scripts/sweep.py {path}` continues it.\n")
        yaml.safe_dump(resolved, f, sort_keys=False, default_flow_style=None)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- results
def _read_history(run_dir: str) -> list[dict]:
    from fedjax_llm.metrics import read_jsonl

    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    try:
        return read_jsonl(path, allow_partial_last_line=True)
    except (OSError, ValueError):
        return []


def _final(history: Sequence[Mapping[str, Any]], key: str) -> Any:
    """The value of ``key`` in the last record that has it, or None."""
    for record in reversed(history):
        if key in record:
            return record[key]
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def result_row(
    run: SweepRun,
    swept_keys: Sequence[str],
    metric: str,
    history: Sequence[Mapping[str, Any]],
    status: str,
    error: str = "",
    wall_time_s: float | None = None,
) -> dict[str, Any]:
    """One row of ``results.csv``: the run's swept values, status, final metrics and times.

    Final metrics come from the run's records: ``metric`` and every ``eval/*`` and
    ``client/*`` number of its last evaluation, the last ``train_loss``; times from its
    ``summary.json`` (wall time: the run's total there, else ``wall_time_s`` as measured).
    """
    row: dict[str, Any] = {"run": run.name}
    for key in swept_keys:
        value = run.values.get(key, "")
        row[key] = value if not isinstance(value, list | tuple | Mapping) else _value_text(value)
    row["status"] = status
    row[metric] = _final(history, metric)
    row["train_loss"] = _final(history, "train_loss")
    rounds = [h for h in history if "round_time_s" in h]
    row["rounds"] = rounds[-1]["round"] if rounds else 0
    times = [h["round_time_s"] for h in rounds]
    row["median_round_time_s"] = statistics.median(times) if times else None
    row["compile_time_s"] = _final(history, "compile_time_s")
    summary_path = os.path.join(run.run_dir, SUMMARY_FILE)
    if os.path.isfile(summary_path):
        try:
            with open(summary_path) as f:
                summary = json.load(f)
            wall_time_s = summary.get("wall_time_s", {}).get("total", wall_time_s)
        except (OSError, ValueError, AttributeError):
            pass
    row["wall_time_s"] = wall_time_s
    last_eval = next((h for h in reversed(history) if any(k.startswith("eval/") for k in h)), {})
    for key in sorted(last_eval):
        if key.startswith(("eval/", "client/")) and key not in row and _is_number(last_eval[key]):
            row[key] = last_eval[key]
    row["error"] = error
    return row


def write_results(path: str, rows: Sequence[Mapping[str, Any]]) -> str:
    """Writes rows as CSV (columns: the union of the rows' keys, ``error`` last)."""
    columns = list(dict.fromkeys(key for row in rows for key in row if key != "error"))
    columns.append("error")
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------- running
def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


class _SweepProgress:
    """One line per run start and finish: index/total, elapsed time and the ETA (the mean
    wall time of the runs executed so far times the runs still to execute)."""

    def __init__(self, total: int, to_run: int, stream: TextIO | None):
        self.total, self.to_run = total, to_run
        self.stream = stream
        self.started = time.perf_counter()
        self.walls: list[float] = []

    def _print(self, index: int, name: str, text: str) -> None:
        if self.stream is None:
            return
        width = len(str(self.total))
        elapsed = time.perf_counter() - self.started
        remaining = self.to_run - len(self.walls)
        eta = "-:--:--"
        if self.walls:
            eta = _duration(sum(self.walls) / len(self.walls) * remaining)
        print(
            f"[{index + 1:>{width}}/{self.total}] {name}: {text}  "
            f"(elapsed {_duration(elapsed)}, eta {eta})",
            file=self.stream,
            flush=True,
        )

    def start(self, index: int, name: str) -> None:
        self._print(index, name, "started")

    def skip(self, index: int, name: str) -> None:
        self._print(index, name, "finished earlier, skipped")

    def finish(self, index: int, name: str, wall: float, final: str | None, error: str) -> None:
        self.walls.append(wall)
        if error:
            self._print(index, name, f"FAILED after {wall:.1f} s: {error}")
        else:
            self._print(index, name, f"done in {wall:.1f} s{f', {final}' if final else ''}")


def _format_value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _replica_key(config: ExperimentConfig) -> str:
    from fedjax_llm.replicas import REPLICA_KEYS

    flat = _flatten(config_to_dict(config))
    return json.dumps({k: v for k, v in flat.items() if k not in REPLICA_KEYS}, sort_keys=True)


def _replica_groups(pending: Sequence[SweepRun]) -> list[list[SweepRun]]:
    """Fresh runs (no directory yet) that differ only in replica keys, in groups of >= 2."""
    groups: dict[str, list[SweepRun]] = {}
    for run in pending:
        if not os.path.isdir(run.run_dir):
            groups.setdefault(_replica_key(run.config), []).append(run)
    return [group for group in groups.values() if len(group) > 1]


def _run_replicas(
    group: Sequence[SweepRun], simulation: Callable[..., Any], verbose: bool
) -> dict[str, tuple[str, str, float]] | None:
    """Runs ``group`` as one `fedjax_llm.replicas.ReplicaGroup`; returns each run's (status,
    error, wall time: the group's), or None if the group cannot run as one (nothing written)."""
    from fedjax_llm.replicas import ReplicaGroup

    t0 = time.perf_counter()
    try:
        sims = [simulation(run.config, verbose=False) for run in group]
        replica_group = ReplicaGroup(sims)
    except Exception:  # noqa: BLE001 - not groupable (privacy, host data, ...): one by one
        return None
    del verbose
    replica_group.run()
    wall = time.perf_counter() - t0
    out = {}
    for run, err in zip(group, replica_group.errors, strict=True):
        if err is None:
            out[run.name] = ("ok", "", wall)
        else:
            out[run.name] = ("failed", first_line(str(err)) or type(err).__name__, wall)
    return out


def run_sweep(
    spec: SweepSpec,
    *,
    verbose: bool = False,
    progress: bool = True,
    stream: TextIO | None = None,
    simulation: Callable[..., Any] | None = None,
    replicas: bool = True,
) -> SweepResult:
    """Runs every run of a sweep not finished before, then writes the results and plots.

    Every key and every run's config is checked before the first run and before anything is
    written. Runs execute one after another in this process.

    Args:
      spec: the sweep.
      verbose: show each run's own progress (partition statistics, rounds, summary table).
      progress: print one line per run start and finish (with elapsed time and ETA).
      stream: where those lines go; None: standard output.
      simulation: the class that runs a config, `fedjax_llm.Simulation` by default (research
        code may pass a subclass).
      replicas: run fresh runs that differ only in seeds or round-varying values (``run.seed``,
        ``client.lr``, ``server.lr``) as one compiled program (`fedjax_llm.replicas`); a group
        that cannot run so runs one by one.

    Returns:
      The rows, the CSV and plot paths and the failed runs.

    Raises:
      SweepError: for a bad spec (see `build_runs`) or a directory of another sweep (see
        `prepare_output_dir`).
      RunInterrupted: on Ctrl-C or SIGTERM; finished runs are kept and skipped when the same
        command runs again.
    """
    from fedjax_llm.cli import ScriptContext, write_error_log
    from fedjax_llm.sweep_plots import save_sweep_plots

    if simulation is None:
        from fedjax_llm.simulation import Simulation

        simulation = Simulation
    stream = (stream or sys.stdout) if progress else None
    started = time.perf_counter()
    runs = build_runs(spec)
    prepare_output_dir(spec)
    swept = spec.swept_keys
    results_path = os.path.join(spec.output_dir, RESULTS_FILE)
    pending = [run for run in runs if not run.finished]
    lines = _SweepProgress(len(runs), len(pending), stream)
    if stream is not None:
        print(
            f"sweep {spec.output_dir}: {len(runs)} runs, {len(runs) - len(pending)} finished "
            f"earlier, {len(pending)} to run",
            file=stream,
            flush=True,
        )
    rows: list[dict[str, Any]] = []
    histories: dict[str, list[dict]] = {}
    failed: list[str] = []
    grouped: dict[str, tuple[str, str, float]] = {}
    for group in _replica_groups(pending) if replicas else []:
        indices = [runs.index(r) for r in group]
        for index, r in zip(indices, group, strict=True):
            lines.start(index, r.name)
        outcome = _run_replicas(group, simulation, verbose)
        if outcome is None:
            continue  # they run one by one below
        grouped.update(outcome)
        for index, r in zip(indices, group, strict=True):
            status, error, wall = grouped[r.name]
            history = _read_history(r.run_dir)
            row = result_row(r, swept, spec.metric, history, status, error, wall)
            final = row.get(spec.metric)
            final_text = None if final is None else f"{spec.metric} {_format_value(final)}"
            lines.finish(index, r.name, wall, final_text, error)
    for index, run in enumerate(runs):
        if run.name in grouped:
            status, error, wall = grouped[run.name]
            histories[run.name] = _read_history(run.run_dir)
            row = result_row(run, swept, spec.metric, histories[run.name], status, error, wall)
            rows.append(row)
            if status == "failed":
                failed.append(run.name)
            continue
        if run.finished:
            lines.skip(index, run.name)
            histories[run.name] = _read_history(run.run_dir)
            rows.append(result_row(run, swept, spec.metric, histories[run.name], "ok"))
            continue
        lines.start(index, run.name)
        config = run.config
        if os.path.isdir(run.run_dir):  # an earlier attempt: continue or restart it
            config = dataclasses.replace(config, run=dataclasses.replace(config.run, resume=True))
        t0 = time.perf_counter()
        status, error = "ok", ""
        try:
            simulation(config, verbose=verbose).run()
        except RunInterrupted as err:
            write_results(results_path, rows)
            what = str(err).split(";")[0]  # "interrupted after N completed rounds"
            raise RunInterrupted(
                f"sweep stopped in run {index + 1}/{len(runs)} ({run.name}), {what}; finished "
                "runs are kept, and the same command continues the sweep (this run from its "
                "newest checkpoint, if it saved one)."
            ) from None
        except Exception as err:  # noqa: BLE001 - a failed run is recorded, the sweep goes on
            status = "failed"
            error = first_line(str(err)) or type(err).__name__
            if not isinstance(err, UserError):
                context = ScriptContext("sweep")
                context.log_dir = run.run_dir
                log = write_error_log(context, None, err)
                error = f"unexpected {type(err).__name__}: {error} (traceback in {log})"
        wall = time.perf_counter() - t0
        histories[run.name] = _read_history(run.run_dir)
        row = result_row(run, swept, spec.metric, histories[run.name], status, error, wall)
        rows.append(row)
        if status == "failed":
            failed.append(run.name)
        final = row.get(spec.metric)
        final_text = None if final is None else f"{spec.metric} {_format_value(final)}"
        lines.finish(index, run.name, wall, final_text, error)
        write_results(results_path, rows)
    write_results(results_path, rows)
    try:
        plots = save_sweep_plots(rows, histories, spec.metric, swept, spec.output_dir)
    except Exception as err:  # noqa: BLE001 - the results are written; a plot must not lose them
        plots = []
        if stream is not None:
            print(f"warning: the plots failed ({type(err).__name__}: {err})", file=stream)
    if stream is not None and rows and all(row.get(spec.metric) is None for row in rows):
        print(
            f"warning: no run recorded the metric {spec.metric!r}; check the spec's metric "
            "(e.g. eval/loss, which needs eval.every > 0, or train_loss).",
            file=stream,
        )
    return SweepResult(
        rows=rows,
        results_path=results_path,
        plots=plots,
        failed=failed,
        wall_time_s=time.perf_counter() - started,
    )
