"""The thin round loop around the compiled round, and `simulate`, the public entry point.

The Python loop only samples client ids, calls the compiled round, fetches a few scalars,
evaluates and checkpoints at their intervals. Everything per client and per local step happens
inside the one compiled program built by `fedjax_llm.round.make_round_fn`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import shutil
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_llm import distributed
from fedjax_llm.algorithms import Algorithm, HyperParams, build_algorithm
from fedjax_llm.checkpoint import Checkpointer, CheckpointMismatchError, config_differences
from fedjax_llm.chunking import activation_bytes_per_client, auto_chunk_size
from fedjax_llm.client_profiles import DEADLINE, build_client_profile
from fedjax_llm.client_store import (
    BatchPrefetcher,
    HostClientData,
    HostStateStore,
    choose_placement,
    to_device,
)
from fedjax_llm.compilation_cache import configure_compilation_cache
from fedjax_llm.compression import BYTES_STAT, compressed_upload_bytes, downlink_bytes
from fedjax_llm.config import (
    DATA_ATTACKS,
    ConfigError,
    DataConfig,
    ExperimentConfig,
    config_to_dict,
    dump_config,
)
from fedjax_llm.contribution import (
    CONTRIBUTIONS,
    ContributionScoring,
    contribution_eval_batch,
    round_records,
    upload_record,
    with_upload_record,
    write_contribution_totals,
)
from fedjax_llm.data import (
    CHATML_TEMPLATE,
    ByteTokenizer,
    ClientArrays,
    LoadedDataset,
    PoisoningSpec,
    TaskData,
    Tokenizer,
    build_file_data,
    build_preference_data,
    build_task_data,
    format_partition_stats,
    load_records,
    load_tokenizer,
    save_partition_report,
)
from fedjax_llm.errors import (
    DeviceMemoryError,
    RunInterrupted,
    UserError,
    first_line,
    interruption,
)
from fedjax_llm.evaluation import (
    array_client_results,
    evaluate_arrays,
    evaluate_examples,
    evaluate_personalized,
    make_arrays_eval_step,
    make_eval_step,
    make_personal_eval_step,
    per_client_results,
    summarize_arrays,
    summarize_clients,
    summarize_global,
    summarize_personal,
    summarize_public,
)
from fedjax_llm.metrics import MetricsWriter, RoundProgress, read_jsonl, summary_table
from fedjax_llm.models.hf_loader import ModelLoadError, load_pretrained
from fedjax_llm.models.llama import LlamaConfig, count_params, init_params
from fedjax_llm.models.lora import merge_lora
from fedjax_llm.models.trainable import Trainable, make_trainable
from fedjax_llm.objectives import LOSS_WEIGHT, OBJECTIVES, Objective, check_fields
from fedjax_llm.optimizers import client_learning_rate, server_learning_rate
from fedjax_llm.pipeline import (
    AGGREGATORS,
    TRANSFORMS,
    AggregationPipeline,
    chain,
    clip_upload,
    merge_hyperparams,
    split_recorded,
)
from fedjax_llm.privacy.audit import canary_audit, membership_inference
from fedjax_llm.privacy.canaries import (
    Canaries,
    canary_scores,
    canary_uploads,
    holdout_clients,
    make_canaries,
)
from fedjax_llm.privacy.mechanisms import (
    NOISE_MULTIPLIER,
    adaptive_clip,
    dp_mean,
    dp_sgd_objective,
)
from fedjax_llm.privacy.plan import PrivacyPlan, RunPrivacy, make_privacy_plan
from fedjax_llm.public_training import (
    WARM_START_STREAM,
    build_public_training,
    describe_public,
    load_public_data,
    trains_on_public,
)
from fedjax_llm.robustness import malicious_clients, with_attack
from fedjax_llm.round import (
    CLIENT_AXIS,
    ClientBatches,
    ClientData,
    LocalSchedule,
    RoundOutput,
    RoundState,
    aggregate_shape,
    init_round_state,
    make_round_fn,
    make_sequential_round,
    round_hparams,
    upload_shape,
)
from fedjax_llm.run_artifacts import LEARNING_CURVES, TensorBoardWriter, write_learning_curves
from fedjax_llm.sampling import (
    AvailabilitySampler,
    ClientSampler,
    Cohort,
    PoissonSampler,
    UniformSampler,
    cohort_slots,
    make_cohort,
)
from fedjax_llm.secure_aggregation import secure_masking, secure_mean
from kernels.pytree import PyTree
from kernels.secure_aggregation import masked_bytes_per_client


class DivergenceError(UserError, RuntimeError):
    """Training produced a NaN or infinite loss; the message names the round and checkpoint."""


class RunDirectoryError(UserError, RuntimeError):
    """The run directory cannot hold this run: it holds an earlier run that this run would
    overwrite, or it cannot be created or written."""


LAYOUT_FIELDS = ("run.clients_per_chunk", "run.devices", "run.engine")
"""Settings of the round's layout: same results up to float rounding, fixed for a resumed run."""


def _divergence(round_num: int, what: str, last_good: str | None) -> DivergenceError:
    return DivergenceError(
        f"round {round_num}: {what}; nothing of this round was saved. The last good checkpoint "
        f"is {last_good or 'none (no checkpoint yet)'}. Lower client.lr or server.lr, or set "
        "client.grad_clip_norm."
    )


def _committed_rounds(ckpt_dir: str) -> list[int]:
    """Rounds of the committed checkpoints in a folder (a save in progress has a suffix)."""
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(int(name) for name in os.listdir(ckpt_dir) if name.isdigit())


def _probe_writable(directory: str) -> None:
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".write-test-")
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as err:
        raise RunDirectoryError(
            f"cannot write in {directory}: {err.strerror or err}. Choose a writable "
            "--run.output_dir (or fix the folder's permissions)."
        ) from None


def check_run_directory(config: ExperimentConfig) -> None:
    """Checks, before any slow work, that ``run.output_dir`` can hold this run.

    Nothing is created. A directory that holds a run (metrics or checkpoints) is only used with
    ``run.resume``; one whose run stopped before its first checkpoint is restarted from round 0
    with ``run.resume``.

    Raises:
      RunDirectoryError: if the directory (or a parent) is a file, cannot be written, or holds
        a run and ``run.resume`` is false; the message says what to do.
    """
    run_dir = config.run.output_dir
    existing = os.path.abspath(run_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise RunDirectoryError(
            f"run.output_dir={run_dir!r} cannot be a folder: {existing} is a file. Choose "
            "another --run.output_dir."
        )
    _probe_writable(existing)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if os.path.exists(ckpt_dir):
        if not os.path.isdir(ckpt_dir):
            raise RunDirectoryError(f"{ckpt_dir} is a file; the run needs a folder there.")
        if config.run.save_checkpoints:
            _probe_writable(ckpt_dir)
    rounds = _committed_rounds(ckpt_dir)
    holds_run = bool(rounds) or os.path.exists(os.path.join(run_dir, "metrics.jsonl"))
    if holds_run and not config.run.resume:
        if rounds:
            raise RunDirectoryError(
                f"{run_dir} already holds a run (newest checkpoint: round {rounds[-1]}); pass "
                "--run.resume true to continue it, or choose another --run.output_dir (nothing "
                "was overwritten)."
            )
        raise RunDirectoryError(
            f"{run_dir} holds a run that stopped before its first checkpoint; pass --run.resume "
            "true to restart it from round 0 (its metrics.jsonl is replaced), or choose another "
            "--run.output_dir (nothing was overwritten)."
        )


def _with_missing_keys(saved: dict, defaults: dict) -> dict:
    """``saved`` with every key of ``defaults`` it lacks (at any depth) set to the default."""
    out = dict(saved)
    for key, value in defaults.items():
        if key not in out:
            out[key] = value
        elif isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = _with_missing_keys(out[key], value)
    return out


def resume_differences(saved: dict, config: ExperimentConfig) -> list[str]:
    """Fields whose change would make a resumed run differ from an uninterrupted one.

    Args:
      saved: the config stored in the checkpoint (as a dict).
      config: the current config.

    Returns:
      ``["client.lr: 0.1 -> 0.2", ...]``: every changed field outside `RESUMABLE_FIELDS`, and
      ``run.num_rounds`` when a learning-rate schedule spans it.
    """
    # How the processes were launched (distributed.*) never changes a result.
    current = {k: v for k, v in config_to_dict(config).items() if k != "distributed"}
    # A key the checkpoint's config lacks was added to the project after it was saved; its
    # default is what that run did.
    defaults = config_to_dict(
        dataclasses.replace(ExperimentConfig(), algorithm=type(config.algorithm)())
    )
    saved = _with_missing_keys(saved, defaults)
    diffs = config_differences({k: v for k, v in saved.items() if k != "distributed"}, current)
    saved_rounds = saved.get("run", {}).get("num_rounds")
    scheduled = [
        name
        for name, section in (("client", config.client), ("server", config.server))
        if section.schedule != "constant"
    ]
    if saved_rounds != config.run.num_rounds and scheduled:
        diffs.append(
            f"run.num_rounds: {saved_rounds!r} -> {config.run.num_rounds!r} (the "
            f"{' and '.join(scheduled)} learning-rate schedule spans run.num_rounds)"
        )
    return diffs


def _as_device_memory_error(err: Exception, what: str) -> Exception:
    """A named error for an accelerator out-of-memory failure; ``err`` itself otherwise."""
    text = str(err)
    if "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text:
        return DeviceMemoryError(
            f"{what} needs more device memory than there is ({first_line(text, 200)}). Lower "
            "run.clients_per_chunk (clients vmapped at once), client.batch_size or "
            "eval.batch_size, or train a smaller part of the model (trainable.mode=lora)."
        )
    return err


CLIENT_RESULTS = "eval_clients.jsonl"
"""Per-client evaluation results in a run directory: one line per client and evaluation."""


def _per_round_writer(run_dir: str, name: str, start_round: int) -> MetricsWriter:
    """The writer of a per-round JSONL file of the run directory (`CLIENT_RESULTS`,
    `CONTRIBUTIONS`; process 0 only), keeping the lines of the rounds up to ``start_round``
    (the restored state's) when a run resumes."""
    if not distributed.is_main_process():
        return distributed.NullMetricsWriter()
    path = os.path.join(run_dir, name)
    kept = []
    if start_round and os.path.exists(path):
        kept = [
            r
            for r in read_jsonl(path, allow_partial_last_line=True)
            if r.get("round", 0) <= start_round
        ]
    return MetricsWriter(path, kept)


@contextlib.contextmanager
def _device_memory(what: str) -> Iterator[None]:
    """Turns an accelerator out-of-memory failure inside the block into `DeviceMemoryError`."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - XLA reports OOM as a runtime error
        converted = _as_device_memory_error(err, what)
        if converted is err:
            raise
        raise converted from err


def tree_bytes(tree: PyTree) -> int:
    """Total bytes of a pytree of arrays or shape structs."""
    return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


class Simulation:
    """A federated training run: data, model, algorithm, pipeline, state and the round loop.

    Build it from a config, then call `run` (or drive it yourself: `compile`, `run_round`,
    `evaluate`). Attributes after construction: ``data`` (a `TaskData` or `ClientArrays`),
    ``trainable``, ``algorithm``, ``pipeline``, ``objective``, ``sampler`` and ``state`` (a
    `RoundState`: server state, pipeline state, client store); ``params`` gives the current
    global trainable parameters; ``contribution`` scores the clients of each round
    (`fedjax_llm.contribution.ContributionScoring`, None without ``contribution.enabled``).

    Every argument after ``config`` replaces what the config would build, so research code can
    bring its own pieces without touching the library.

    Args:
      config: the experiment config (validated here).
      algorithm: a custom `Algorithm`, replacing ``config.algorithm``.
      verbose: print partition statistics, progress and the summary table.
      pipeline: a custom `AggregationPipeline`, replacing ``config.aggregation``.
      objective: a custom `Objective`, replacing ``client.objective``.
      sampler: a custom client sampler (`fedjax_llm.sampling.ClientSampler`, e.g. a
        `ScheduledSampler` of given client ids per round), replacing ``config.sampling``.
      data: a `ClientArrays` of pre-tokenized or other per-example client data, replacing
        ``config.data`` (no tokenizer is loaded when ``pretrained.path`` has none).
      init_params: initial global trainable parameters (e.g. a given LoRA init), replacing
        the seeded init; must match the trainable's structure and shapes.
      hyperparam_schedule: ``(round) -> {name: value}`` overriding declared round
        hyperparameters (``prox_mu``, ``clip_norm``, ...) per round; they are array arguments
        of the compiled round, so a schedule never recompiles.
    """

    def __init__(
        self,
        config: ExperimentConfig,
        algorithm: Algorithm | None = None,
        verbose: bool = True,
        *,
        pipeline: AggregationPipeline | None = None,
        objective: Objective | None = None,
        sampler: ClientSampler | None = None,
        data: ClientArrays | None = None,
        init_params: PyTree | None = None,
        hyperparam_schedule: Callable[[int], dict[str, float]] | None = None,
    ):
        self._started = time.perf_counter()
        self.config = config.validate()
        # Before anything compiles (the model init, evaluation and the round).
        self.compilation_cache_dir = configure_compilation_cache(config.run.compilation_cache_dir)
        distributed.check_launch(config)
        # Over several processes only process 0 prints and writes (see fedjax_llm.distributed).
        self.verbose = verbose and distributed.is_main_process()
        self.run_dir = config.run.output_dir
        init_key, trainable_key, self.train_key = run_keys(config)
        self.mesh = client_mesh(config)
        # Where the wall time goes before the first round (recorded in metrics.jsonl).
        self.timings: dict[str, float] = {}
        t0 = time.perf_counter()
        self.model_config, base, self.tokenizer, self.trainable = build_model(
            config, init_key, need_tokenizer=data is None or bool(config.public.path)
        )
        self.timings["load_time_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.data: TaskData | ClientArrays = (
            data
            if data is not None
            else build_data(config.data, self.tokenizer, poisoning_spec(config))
        )
        self.timings["data_time_s"] = time.perf_counter() - t0
        train = self.data if isinstance(self.data, ClientArrays) else self.data.train
        p = config.privacy
        # Audit canaries are extra clients after the real ones; held-out clients are real ones
        # never sampled. Both are left out of every cohort (see `cohort`).
        self.canaries = (
            make_canaries(train.num_clients, p.audit_canaries, config.run.seed)
            if p.audit_canaries
            else None
        )
        self.holdout = (
            holdout_clients(train.num_clients, p.audit_holdout_clients, config.run.seed)
            if p.audit_holdout_clients
            else None
        )
        self.num_clients = train.num_clients + p.audit_canaries
        self._left_out = np.concatenate(
            [
                self.canaries.excluded_ids if self.canaries is not None else [],
                self.holdout.excluded_ids if self.holdout is not None else [],
            ]
        ).astype(np.int32)
        pad_id = self.tokenizer.pad_id if self.tokenizer is not None else 0
        self.objective = objective or OBJECTIVES[config.client.objective](
            self.trainable.apply, pad_id, config
        )
        # The held-out loss of the contribution scores (never DP-SGD's private gradient).
        self._scored_objective = self.objective
        self.algorithm = algorithm or build_algorithm(config)
        # The server's public text (public.path): evaluated, and trained on by the server with
        # public.server_steps / warm_start_steps (`fedjax_llm.public_training`).
        self.public = load_public_data(config, self.tokenizer)
        self._public_warm_start = None
        self._server_data = None
        if self.public is not None:
            self.algorithm, self._public_warm_start = build_public_training(
                config, self.algorithm, self._scored_objective, self.public
            )
            if trains_on_public(config):
                # A round input (never a constant of the compiled round), on the device once.
                self._server_data = jax.tree.map(jnp.asarray, self.public.train_arrays())
        if sampler is None and config.run.num_clients_per_round > self.num_clients:
            raise ConfigError(
                f"run.num_clients_per_round={config.run.num_clients_per_round} exceeds the "
                f"{self.num_clients} clients of the data; sample fewer clients per round."
            )
        self.sampler = sampler or build_sampler(config, self.num_clients)
        if config.byzantine.attack == "backdoor" and self.tokenizer is not None:
            need = len(self.tokenizer.encode(config.byzantine.target)) + 1
            if config.eval.max_new_tokens < need:
                raise ConfigError(
                    f"eval.max_new_tokens={config.eval.max_new_tokens} cannot generate the "
                    f"backdoor target {config.byzantine.target!r} ({need} tokens with eos), so "
                    f"eval/backdoor_success would always be 0; set it to at least {need}."
                )
        self.privacy_plan = make_privacy_plan(
            config,
            self.sampler,
            self.num_clients,
            np.asarray(train.client_count),
            int(np.max(train.client_count)),
        )
        if self.privacy_plan is not None and self.privacy_plan.level == "sample":
            self.objective = dp_sgd_objective(
                self.objective, self.privacy_plan.clip_norm, self.privacy_plan.noise_multiplier
            )
        # The accountant of the rounds that ran (restored with a checkpoint).
        self.privacy = RunPrivacy(self.privacy_plan) if self.privacy_plan is not None else None
        devices = 1 if self.mesh is None else self.mesh.size
        examples = train.examples
        if not isinstance(examples, dict):
            examples = {"tokens": examples.tokens, "loss_mask": examples.loss_mask}
        self.clients_per_chunk = self._chunk_size(examples, devices)
        # Contribution scores record the uploads, summed chunk by chunk like the round's.
        record_chunk = self.clients_per_chunk if self.mesh is None else None
        if pipeline is not None and config.contribution.enabled:
            pipeline = pipeline._replace(
                aggregator=with_upload_record(pipeline.aggregator, record_chunk)
            )
        self.pipeline = pipeline or build_pipeline(
            config,
            self.num_clients,
            self.sampler,
            self.privacy_plan,
            self.canaries,
            clients_per_chunk=record_chunk,
        )
        self.slots = cohort_slots(self.sampler.max_cohort, self.clients_per_chunk, devices)
        if "tokens" in examples and len(examples["tokens"]):
            top = int(np.max(examples["tokens"]))
            if top >= self.model_config.vocab_size or int(np.min(examples["tokens"])) < 0:
                raise ConfigError(
                    f"data: token ids must lie in [0, {self.model_config.vocab_size}) (the "
                    f"model's vocabulary); the given tokens reach {top}."
                )
        try:
            check_fields(self.objective, examples, "the training data")
            values = merge_hyperparams(self.algorithm.hyperparams, self.pipeline.hyperparams)
        except ValueError as err:
            raise ConfigError(f"client.objective / aggregation: {err}") from None
        if config.system.deadline_s is not None:
            values[DEADLINE] = config.system.deadline_s
        self._hyperparam_defaults = values
        self._hyperparam_schedule = hyperparam_schedule
        params = self.trainable.init(trainable_key, base)
        if init_params is not None:
            params = _checked_init_params(init_params, params)
        # What the canary audit measures the model's change from (a copy: rounds donate the
        # state's buffers).
        self._initial_params = jax.tree.map(jnp.copy, params) if p.audit_canaries else None
        frozen = self.trainable.frozen(base)
        init_state = functools.partial(
            init_round_state,
            self.algorithm,
            params,
            pipeline=self.pipeline,
            frozen=frozen,
            hparams=round_hparams(0.0, values=values),
        )
        # One client's row of the store decides, with the examples, where the population lives.
        one_client = init_state(1)
        population_bytes = sum(int(np.asarray(x).nbytes) for x in examples.values()) + (
            tree_bytes(one_client.clients) * self.num_clients
        )
        self.placement = choose_placement(
            config.run.client_data, population_bytes, device_memory_bytes()
        )
        if self.placement == "host" and distributed.is_multiprocess():
            raise ConfigError(
                "run.client_data=host is single-process; several processes need the "
                "population on the devices (run.client_data=device)."
            )
        # An algorithm that owns the base keeps it in its server state (checkpointed there).
        self._frozen = None if self.algorithm.server_frozen is not None else frozen
        # Canary clients train on client 0's examples (their upload is replaced anyway).
        client_start = np.concatenate([train.client_start, np.full(p.audit_canaries, 0)])
        client_count = np.concatenate(
            [train.client_count, np.full(p.audit_canaries, train.client_count[0])]
        )
        # Capability tiers (step budgets, step times, LoRA ranks): per-client round values.
        profile = build_client_profile(config.system, self.num_clients, config.run.seed)
        self.client_profile = profile
        self.host_data: HostClientData | None = None
        self.host_store: HostStateStore | None = None
        self.client_data: ClientData | None = None
        if self.placement == "host":
            self.state = one_client
            self.host_data = HostClientData(examples, client_start, client_count, profile)
            try:
                self.host_store = HostStateStore(
                    jax.tree.map(lambda x: x[0], one_client.clients),
                    self.num_clients,
                    config.run.client_store_dir,
                )
            except OSError as err:
                raise ConfigError(str(err)) from None
        else:
            self.state = init_state(self.num_clients)
            self.client_data = ClientData(
                examples={
                    name: jnp.asarray(x, jnp.int32 if name == "tokens" else None)
                    for name, x in examples.items()
                },
                client_start=jnp.asarray(client_start, jnp.int32),
                client_count=jnp.asarray(client_count, jnp.int32),
                client_profile={name: jnp.asarray(x) for name, x in profile.items()},
            )
        self._prefetcher: BatchPrefetcher | None = None
        self._example_fields = tuple(examples)
        c = config.client
        self.schedule = LocalSchedule(
            local_steps=c.local_steps,
            batch_size=c.batch_size,
            max_client_examples=int(train.client_count.max()),
            local_epochs=c.local_epochs,
            shuffle=c.shuffle,
        )
        self._check_gathering_memory()
        round_args = dict(
            num_clients_total=self.num_clients,
            pipeline=self.pipeline,
            uniform_weighting=config.algorithm.weighting == "uniform",
        )
        if config.run.engine == "sequential":
            self.round_fn = make_sequential_round(
                self.algorithm, self.objective, self.schedule, **round_args
            )
        else:
            round_fn = make_round_fn(
                self.algorithm,
                self.objective,
                self.schedule,
                clients_per_chunk=self.clients_per_chunk,
                mesh=self.mesh,
                client_store="cohort" if self.placement == "host" else "device",
                **round_args,
            )
            # The pure round, for a `fedjax_llm.replicas.ReplicaGroup` that vmaps it.
            self.round_body = round_fn
            # Donating the state lets XLA update it (and the client store) in place.
            self.round_fn = jax.jit(
                round_fn, donate_argnums=(1,), **distributed.jit_shardings(self.mesh)
            )
        self._compiled: Any = None
        # Set by a `ReplicaGroup` that runs this simulation's rounds with others' in one program.
        self.replica_group: Any = None
        self.replica_index: int | None = None
        generates = True
        if isinstance(self.data, ClientArrays):
            self.eval_step = make_arrays_eval_step(self.objective)
        else:
            # Plain text has no reference answers: evaluation is loss and perplexity only.
            generates = self.data.stats.get("exact_match_meaningful", True)
            self.eval_step = make_eval_step(
                self.trainable,
                config.eval.max_new_tokens if generates else 0,
                self.tokenizer.eos_id,
                pad_id,
                self.objective,
            )
        # Public text, too, is scored by its loss alone (the text runs' step when it fits).
        self._public_eval_step = None
        if self.public is not None:
            self._public_eval_step = (
                self.eval_step
                if not generates and self.objective is self._scored_objective
                else make_eval_step(
                    self.trainable, 0, self.tokenizer.eos_id, pad_id, self._scored_objective
                )
            )
        # An algorithm with personal state is also evaluated client by client with each
        # client's own params (`_evaluate_personal`).
        self.personal_eval_step = (
            make_personal_eval_step(self.eval_step, self.algorithm.personal_params)
            if self.algorithm.personal_params is not None
            and not isinstance(self.data, ClientArrays)
            else None
        )
        # Per-round client contribution scores (``contribution.enabled``), see `run`.
        self.contribution = self._contribution_scoring()
        # The last round's recorded uploads (`fedjax_llm.contribution.UploadRecord`).
        self.upload_record: Any = None
        self.history: list[dict] = []
        # Set when a run stops before its last round because of the privacy budget.
        self.stopped_by_budget: str | None = None
        # The empirical privacy checks of the finished run (see `_audit`).
        self.audit: dict | None = None
        self.start_round = 0
        self.compile_time_s: float | None = None
        self.checkpointer: Checkpointer | None = None
        # Lines for the header: what resuming found, warnings about the run directory.
        self.notes: list[str] = []
        # Every client's held-out results of the newest evaluation (``eval.per_client``).
        self.client_results: list[dict] = []
        # Where the records this process adds start in ``history`` (set by `run`).
        self._first_new_record = 0

    def _chunk_size(self, examples: dict, devices: int) -> int | None:
        """``run.clients_per_chunk``, with ``auto`` resolved (`fedjax_llm.chunking`)."""
        chunk = self.config.run.clients_per_chunk
        if chunk != "auto":
            return chunk
        first = examples.get("tokens", next(iter(examples.values())))
        seq_len = int(np.shape(first)[1]) if np.ndim(first) > 1 else 1
        batch = self.config.client.batch_size
        m = self.model_config
        dtype_bytes = np.dtype(m.compute_dtype).itemsize
        per_client = activation_bytes_per_client(
            batch,
            seq_len,
            m.hidden_size,
            m.intermediate_size,
            m.num_layers,
            m.num_heads,
            m.vocab_size,
            dtype_bytes,
        )
        return auto_chunk_size(
            math.ceil(self.sampler.max_cohort / devices),
            batch * seq_len,
            jax.devices()[0].platform,
            per_client,
            device_memory_bytes(),
        )

    @property
    def params(self) -> PyTree:
        """The current global trainable parameters (over several processes: this process's
        replica)."""
        params = self.algorithm.server_params(self.state.server)
        return distributed.local_view(params) if distributed.is_multiprocess() else params

    @property
    def server_state(self) -> PyTree:
        """The algorithm's server state."""
        return self.state.server

    @property
    def client_store(self) -> PyTree:
        """The per-client state store (`ClientStates` with a leading client axis; host arrays
        when the population is host-resident)."""
        if self.host_store is not None:
            return self.host_store.tree()
        return self.state.clients

    @property
    def frozen(self) -> PyTree:
        """The frozen base the clients train against (from the server state if it owns it)."""
        frozen = (
            self.algorithm.server_frozen(self.state.server)
            if self.algorithm.server_frozen is not None
            else self._frozen
        )
        return distributed.local_view(frozen) if distributed.is_multiprocess() else frozen

    def _check_gathering_memory(self) -> None:
        if not self.pipeline.aggregator.gathers:
            return
        one = jax.tree.map(lambda x: x[0], self.state.clients.algorithm)
        like = upload_shape(
            self.algorithm,
            self.pipeline,
            self.state.server,
            one,
            round_hparams(0.0, values=self._hyperparam_defaults),
        )
        need = tree_bytes(like) * self.slots
        limit = device_memory_bytes()
        if need > limit // 2:
            who, fix = (
                ("contribution.enabled records", "Turn contribution scores off")
                if self.config.contribution.enabled
                else (
                    f"aggregation.aggregator={self.config.aggregation.aggregator!r} gathers",
                    "Use a streaming aggregator (mean)",
                )
            )
            raise ConfigError(
                f"{who} every "
                f"sampled client's upload: {self.slots} x {tree_bytes(like):,} bytes = {need:,}, "
                f"more than half of the device's {limit:,} bytes. {fix}, fewer "
                "run.num_clients_per_round, or a smaller trainable (trainable.mode=lora)."
            )

    def _contribution_scoring(self) -> ContributionScoring | None:
        """The scorer of ``contribution.enabled`` (None when off), after checking that the
        run's uploads and held-out set can be scored."""
        c = self.config.contribution
        if not c.enabled:
            return None
        name = self.config.algorithm.name
        if self.algorithm.server_frozen is not None:
            raise ConfigError(
                f"contribution.enabled measures the held-out loss on a fixed base, but "
                f"algorithm.type={name} changes the base every round; turn one of them off."
            )
        to_params = self.algorithm.params_delta
        if self.algorithm.expand_upload is not None and to_params is None:
            raise ConfigError(
                f"contribution.enabled scores each upload as a step of the global params, but "
                f"algorithm.type={name} aggregates what the server computes from the uploads "
                "(full-size products), which is no step of the adapter; turn one of them off."
            )
        one = jax.tree.map(lambda x: x[0], self.state.clients.algorithm)
        like = upload_shape(
            self.algorithm,
            self.pipeline,
            self.state.server,
            one,
            round_hparams(0.0, values=self._hyperparam_defaults),
        )
        params = self.algorithm.server_params(self.state.server)
        delta = getattr(like, "delta", None)
        if delta is not None and to_params is not None:
            expanded = aggregate_shape(self.algorithm, self.state.server, like)
            delta = jax.eval_shape(to_params, params, expanded)
        if (
            delta is None
            or jax.tree.structure(delta) != jax.tree.structure(params)
            or any(
                tuple(d.shape) != tuple(p.shape)
                for d, p in zip(jax.tree.leaves(delta), jax.tree.leaves(params), strict=True)
            )
        ):
            raise ConfigError(
                f"contribution.enabled moves the global params by the clients' uploaded "
                f"deltas, but algorithm.type={name} uploads something shaped otherwise; turn "
                "one of them off."
            )
        held_out = self.data.eval
        if held_out is None:
            raise ConfigError(
                "contribution.enabled needs a global held-out set; give the ClientArrays an "
                "eval set."
            )
        try:
            batch = contribution_eval_batch(
                held_out, self._scored_objective.fields, c.eval_examples, self.config.run.seed
            )
        except ValueError as err:
            raise ConfigError(f"contribution.eval_examples: {err}") from None
        return ContributionScoring(
            self._scored_objective,
            batch,
            c.shapley_permutations,
            c.truncation,
            batch_size=self.config.eval.batch_size,
            params_delta=to_params,
        )

    # ----------------------------------------------------------------------------- state
    def _state(self) -> dict:
        return {
            "server_state": self.state.server,
            "pipeline_state": self.state.pipeline,
            "client_store": self.client_store,
            "train_key": jax.random.key_data(self.train_key),
        }

    def _metadata(self, round_num: int) -> dict:
        meta = {
            "round": round_num,
            "history": self.history,
            "config": config_to_dict(self.config),
            "trainable_mode": self.config.trainable.mode,
        }
        if self.privacy is not None:
            meta["privacy"] = self.privacy.state()
        return meta

    def _prepare_run_dir(self) -> None:
        if distributed.is_multiprocess():
            self._prepare_run_dir_of_processes()
        else:
            self._prepare_local_run_dir()

    def _prepare_run_dir_of_processes(self) -> None:
        """`_prepare_local_run_dir` over several processes: process 0 prepares the run
        directory and reads the checkpoint to resume from; the others receive its outcome (its
        error, or the restored state), so that every process starts from the same round."""
        failure = None
        if distributed.is_main_process():
            try:
                self._prepare_local_run_dir()
            except Exception as err:  # noqa: BLE001 - told to the other processes, then raised
                failure = err
        else:
            self.checkpointer = distributed.CheckpointNames(
                os.path.join(self.run_dir, "checkpoints")
            )
        message = distributed.broadcast_json(None if failure is None else str(failure))
        if failure is not None:
            raise failure
        if message is not None:
            raise distributed.ProcessError(f"process 0 stopped: {first_line(message)}")
        privacy = self.privacy.state() if self.privacy is not None else None
        meta = distributed.broadcast_json(
            {"round": self.start_round, "history": self.history, "privacy": privacy}
        )
        if meta["round"]:
            state = distributed.broadcast_arrays(self._state())
            if not distributed.is_main_process():
                self._apply_checkpoint(meta["round"], state, meta)

    def _prepare_local_run_dir(self) -> None:
        run = self.config.run
        check_run_directory(self.config)
        ckpt_dir = os.path.join(self.run_dir, "checkpoints")
        try:
            os.makedirs(self.run_dir, exist_ok=True)
        except OSError as err:
            raise RunDirectoryError(
                f"cannot create the run directory {self.run_dir}: {err.strerror or err}. "
                "Choose a writable --run.output_dir."
            ) from None
        self.checkpointer = Checkpointer(ckpt_dir, keep=run.keep_checkpoints)
        found = self.checkpointer.newest_readable(self._read_checkpoint) if run.resume else None
        if found is not None:
            round_num, (state, meta), skipped = found
            for bad, reason in skipped:
                moved = self.checkpointer.set_aside(bad)
                self.notes.append(
                    f"warning: {reason}; using an older checkpoint (the unreadable one is kept "
                    f"as {moved})."
                )
            self._apply_checkpoint(round_num, state, meta)
            self.notes.append(f"resumed from {self.checkpointer.path(round_num)}")
        elif run.resume:
            self.notes.append(
                f"{self.run_dir} holds no committed checkpoint: starting from round 0."
            )
        if run.save_checkpoints:
            need, free = tree_bytes(self._state()), shutil.disk_usage(ckpt_dir).free
            if need > free:
                self.notes.append(
                    f"warning: a checkpoint of this run holds {need / 2**20:,.1f} MiB of arrays "
                    f"(before compression) and the disk of {ckpt_dir} has {free / 2**20:,.1f} "
                    "MiB free; saving may fail."
                )
        with open(os.path.join(self.run_dir, "config.yaml"), "w") as f:
            f.write(dump_config(self.config))
        if run.partition_report:
            with open(os.path.join(self.run_dir, "partition.json"), "w") as f:
                json.dump(self.data.stats, f, indent=1)
            if isinstance(self.data, TaskData):
                save_partition_report(self.data, os.path.join(self.run_dir, "partition.png"))

    def _read_checkpoint(self, round_num: int) -> tuple[PyTree, dict]:
        assert self.checkpointer is not None
        # Compare configs before any array is read: a different model, mode or algorithm is
        # named by its fields, not reported as mismatching arrays.
        meta = self.checkpointer.metadata(round_num)
        diffs = resume_differences(meta.get("config", {}), self.config)
        if diffs:
            layout = [d for d in diffs if d.startswith(LAYOUT_FIELDS)]
            raise ConfigError(
                f"checkpoint {self.checkpointer.path(round_num)} was made with a different "
                f"config; differing fields: {diffs}. Resume with the original values (only "
                "run.num_rounds under a constant schedule, run.stop_after and the logging and "
                "checkpoint settings may change)"
                + (
                    f". {', '.join(LAYOUT_FIELDS)} change the float rounding of the round's "
                    "sums, so a run resumed with other values would not equal an uninterrupted "
                    "one."
                    if layout
                    else "."
                )
            )
        try:
            return self.checkpointer.restore(round_num, self._state())
        except CheckpointMismatchError as err:
            raise ConfigError(
                f"{err} The config matches, so the code that built this run's state differs "
                "(a custom algorithm, pipeline or init passed from Python?)."
            ) from None

    def _apply_checkpoint(self, round_num: int, state: PyTree, meta: dict) -> None:
        self.state = RoundState(
            server=jax.tree.map(jnp.asarray, state["server_state"]),
            pipeline=jax.tree.map(jnp.asarray, state["pipeline_state"]),
            clients=(
                self.state.clients
                if self.host_store is not None
                else jax.tree.map(jnp.asarray, state["client_store"])
            ),
        )
        if self.host_store is not None:
            self.host_store.load(state["client_store"])
        self.train_key = jax.random.wrap_key_data(jnp.asarray(state["train_key"]))
        self.history = meta["history"]
        self.start_round = round_num
        if self.privacy is not None:
            if "privacy" not in meta:
                raise ConfigError(
                    f"checkpoint {self.checkpointer.path(round_num)} holds no privacy "
                    "accountant state, so the epsilon of its rounds is unknown; it was not made "
                    "by a private run of this config."
                )
            self.privacy.load_state(meta["privacy"])

    # ----------------------------------------------------------------------------- eval
    def evaluate(self) -> dict:
        """Evaluates the current global model on the global and per-client held-out sets."""
        bs = self.config.eval.batch_size
        params, frozen = self.params, self.frozen
        if isinstance(self.data, ClientArrays):
            out = self._evaluate_arrays(self.data, frozen, params, bs)
            return {**out, **self._evaluate_public(frozen, params, bs)}
        per_example = evaluate_examples(
            self.eval_step, frozen, params, self.data.eval, self.tokenizer, bs
        )
        out = summarize_global(per_example, self.data.eval)
        out.update(self._evaluate_public(frozen, params, bs))
        backdoor = getattr(self.data, "backdoor_eval", None)
        if backdoor is not None:
            # The attack's success: triggered eval prompts answered with the target exactly.
            triggered = evaluate_examples(
                self.eval_step, frozen, params, backdoor, self.tokenizer, bs
            )
            if "exact_match" in triggered:
                out["eval/backdoor_success"] = float(np.mean(triggered["exact_match"]))
        if self.config.eval.per_client:
            test = self.data.client_test
            per_client = evaluate_examples(
                self.eval_step, frozen, params, test.examples, self.tokenizer, bs
            )
            out.update(summarize_clients(per_client, test))
            self.client_results = per_client_results(
                per_client, test, self.data.stats.get("client_names")
            )
            if self.personal_eval_step is not None:
                out.update(self._evaluate_personal(test, bs))
        return out

    def _evaluate_public(self, frozen: Any, params: Any, batch_size: int) -> dict:
        """``eval/public/loss`` and ``eval/public/perplexity`` on the held-out share of
        ``public.path`` (`summarize_public`); nothing without public data."""
        if self.public is None:
            return {}
        per_example = evaluate_examples(
            self._public_eval_step, frozen, params, self.public.eval, self.tokenizer, batch_size
        )
        return summarize_public(per_example, self.public.eval)

    def _evaluate_arrays(self, data: ClientArrays, frozen: Any, params: Any, bs: int) -> dict:
        """`evaluate` of data given as arrays: the objective's metrics on the global held-out
        set and, with ``eval.per_client`` and per-client held-out sets, on each client's."""
        means = self._scored_objective.means
        out = {}
        if data.eval is not None:
            per_example = evaluate_arrays(self.eval_step, frozen, params, data.eval, bs)
            out.update(summarize_arrays(per_example, "eval", means))
        test = getattr(data, "client_test", None)
        if self.config.eval.per_client and test is not None:
            per_example = evaluate_arrays(self.eval_step, frozen, params, test.examples, bs)
            summary, self.client_results = array_client_results(
                per_example, test.client_count, means, data.stats.get("client_names")
            )
            out.update(summary)
        return out

    def _evaluate_personal(self, test: Any, batch_size: int) -> dict:
        """The personalized evaluation: every client (sampled or not) with its own params
        (`Algorithm.personal_params` of the global params and its client state) on its own
        held-out examples, beside the global model's per-client metrics on the same examples.
        Adds ``personal_*`` fields to `client_results`; returns ``client/personal/*``."""
        store = self.client_store.algorithm
        if distributed.is_multiprocess():
            store = distributed.local_view(store)
        per_example = evaluate_personalized(
            self.personal_eval_step,
            self.frozen,
            self.params,
            store,
            test,
            self.tokenizer,
            batch_size,
        )
        own_results = per_client_results(per_example, test)
        for row, own in zip(self.client_results, own_results, strict=True):
            for key in ("loss", "perplexity", "exact_match"):
                if key in own:
                    row[f"personal_{key}"] = own[key]
        return summarize_personal(per_example, test)

    # ----------------------------------------------------------------------------- loop
    def hyperparams(self, round_num: int) -> HyperParams:
        """The round-varying values of a round: learning rates from their schedules and the
        algorithm's and pipeline's declared hyperparameters."""
        c, run = self.config, self.config.run
        values = dict(self._hyperparam_defaults)
        if self._hyperparam_schedule is not None:
            scheduled = self._hyperparam_schedule(round_num)
            unknown = sorted(set(scheduled) - set(values))
            if unknown:
                raise ConfigError(
                    f"hyperparam_schedule sets {unknown}, which nothing declares; declared: "
                    f"{sorted(values)}."
                )
            if self.privacy is not None and NOISE_MULTIPLIER in scheduled:
                raise ConfigError(
                    f"hyperparam_schedule sets {NOISE_MULTIPLIER!r}, but the privacy "
                    "accountant is told privacy.noise_multiplier for every round; a schedule "
                    "may not change the noise of a private run."
                )
            values.update(scheduled)
        return round_hparams(
            client_learning_rate(c.client, round_num, run.num_rounds),
            server_learning_rate(c.server, round_num, run.num_rounds),
            values,
        )

    def cohort(self, round_num: int) -> Cohort:
        """The clients of a round on the padded client axis (a pure function of the round)."""
        ids = self.sampler.sample(round_num)
        if len(self._left_out):
            ids = ids[~np.isin(ids, self._left_out)]
        return make_cohort(
            ids, self.slots, self.config.sampling.dropout, self.config.run.seed, round_num
        )

    def _round_key(self, round_num: int) -> jax.Array:
        return jax.random.fold_in(self.train_key, round_num)

    def _load_cohort_batches(self, round_num: int) -> ClientBatches:
        """A round's cohort batches gathered on the host and sent to the device."""
        assert self.host_data is not None
        batches = self.host_data.cohort_batches(
            self.cohort(round_num).client_ids, self._round_key(round_num), self.schedule
        )
        examples = {
            name: x.astype(np.int32) if name == "tokens" else x
            for name, x in batches.examples.items()
        }
        return to_device(batches._replace(examples=examples), self._client_sharding())

    def _client_sharding(self) -> jax.sharding.Sharding | None:
        if self.mesh is None:
            return None
        return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(CLIENT_AXIS))

    def _round_inputs(self, round_num: int) -> tuple[Cohort, tuple]:
        """A round's cohort and the compiled round's arguments."""
        cohort = self.cohort(round_num)
        round_key = self._round_key(round_num)
        if distributed.is_multiprocess():
            return cohort, self._global_round_inputs(cohort, round_key, round_num)
        state, data = self.state, self.client_data
        if self.host_store is not None:
            # Host-resident population: the cohort's batches (prefetched during the last
            # round) and the cohort's rows of the state store.
            if self._prefetcher is None:
                self._prefetcher = BatchPrefetcher(self._load_cohort_batches)
            data = self._prefetcher.get(round_num)
            rows = self.host_store.gather(cohort.client_ids)
            state = state._replace(clients=to_device(rows, self._client_sharding()))
        return cohort, (
            self.frozen,
            state,
            data,
            jax.tree.map(jnp.asarray, cohort),
            round_key,
            self.hyperparams(round_num),
        ) + self._server_inputs()

    def _server_inputs(self) -> tuple:
        """The round's optional last argument: the public examples the server trains on
        (`RoundInfo.server_data`); none without public steps, which keeps the round's
        signature and program exactly as they were."""
        return () if self._server_data is None else (self._server_data,)

    def _global_round_inputs(self, cohort: Cohort, round_key: jax.Array, round_num: int) -> tuple:
        """The compiled round's arguments over several processes: global arrays replicated on
        the devices of all of them (`fedjax_llm.distributed`). The base, the data and the
        state become global arrays once; the round returns the state replicated."""
        mesh = self.mesh
        self._frozen = distributed.replicate(self._frozen, mesh)
        self.client_data = distributed.replicate(self.client_data, mesh)
        self.state = distributed.replicate(self.state, mesh)
        return (
            self._frozen,
            self.state,
            self.client_data,
            distributed.replicate(jax.tree.map(jnp.asarray, cohort), mesh),
            distributed.replicate(round_key, mesh),
            distributed.replicate(self.hyperparams(round_num), mesh),
        ) + tuple(distributed.replicate(x, mesh) for x in self._server_inputs())

    def warm_start(self) -> dict:
        """Takes the ``public.warm_start_steps`` server steps on public data from the initial
        model (`fedjax_llm.public_training.make_public_warm_start`, one jitted scan), once:
        `run` calls it before the first round, never on a resumed run (whose restored state
        holds the warm-started model and optimizer).

        Returns:
          ``warm_start_time_s`` and the first and last step's public training loss
          (``public/warm_start_loss_first``, ``public/warm_start_loss_last``); {} when there
          is no warm start or it has run.
        """
        if self._public_warm_start is None:
            return {}
        t0 = time.perf_counter()
        key = jax.random.fold_in(self.train_key, WARM_START_STREAM)
        with _device_memory("the public warm start"):
            server, losses = self._public_warm_start(
                self.state.server, self.frozen, self._server_data, key
            )
            losses = np.asarray(jax.device_get(losses))
        self.state = self.state._replace(server=server)
        self._public_warm_start = None
        return {
            "warm_start_time_s": time.perf_counter() - t0,
            "public/warm_start_loss_first": float(losses[0]),
            "public/warm_start_loss_last": float(losses[-1]),
        }

    def compile(self) -> float:
        """Compiles the round ahead of time; returns the compile time in seconds (0 for the
        sequential engine, whose pieces compile on first use)."""
        _, inputs = self._round_inputs(self.start_round)
        if self.replica_group is not None:
            self.compile_time_s = self.replica_group.compile(self, inputs)
            self._compiled = self.replica_group
            return self.compile_time_s
        t0 = time.perf_counter()
        if self.config.run.engine == "sequential":
            self._compiled = self.round_fn
        else:
            try:
                lowered = self.round_fn.lower(*inputs)
            except (TypeError, ValueError, KeyError, IndexError) as err:
                # Tracing runs every piece once: a transform, aggregator, objective or algorithm
                # that does not fit the trainable or the data fails here, before any round.
                c = self.config
                raise ConfigError(
                    f"the round cannot be built: {type(err).__name__}: {err}. Check that the "
                    f"algorithm ({c.algorithm.name}), aggregation.transforms "
                    f"{list(c.aggregation.transforms)}, aggregation.aggregator "
                    f"({c.aggregation.aggregator}) and the objective fit trainable.mode="
                    f"{c.trainable.mode} and the data's fields {sorted(self._example_fields)}."
                ) from err
            with _device_memory("compiling the round"):
                self._compiled = lowered.compile()
        self.compile_time_s = time.perf_counter() - t0
        return self.compile_time_s

    def run_round(self, round_num: int) -> tuple[RoundOutput, Cohort]:
        """Runs one round (zero-based ``round_num``) and updates ``state``; returns the
        round's output (fetched to the host) and cohort. Uploads recorded for contribution
        scores stay on the device, in ``upload_record``, out of the output."""
        if self._compiled is None:
            self.compile()
        cohort, inputs = self._round_inputs(round_num)
        if self.replica_group is not None:
            with _device_memory(f"round {round_num + 1}"):
                self.state, out = self.replica_group.run_round(self, round_num, cohort, inputs)
            return self._keep_upload_record(out), cohort
        with _device_memory(f"round {round_num + 1}"):
            state, out = self._compiled(*inputs)
            out = self._keep_upload_record(out)
            if self.host_store is None:
                self.state = state
                return jax.device_get(out), cohort
            # The device trains (dispatch is asynchronous) while the host gathers the next
            # round's batches; then the cohort's new states go back into the host store.
            if round_num + 1 < self.config.run.num_rounds:
                self._prefetcher.prefetch(round_num + 1)
            out, rows = jax.device_get((out, state.clients))
            written = np.logical_and(cohort.delivered, cohort.participating)
            self.host_store.scatter(cohort.client_ids, written, rows)
            self.state = state._replace(clients=self.state.clients)
            return out, cohort

    def _keep_upload_record(self, out: RoundOutput) -> RoundOutput:
        """Keeps a round's recorded uploads in ``upload_record`` (where they are, on the
        device) and returns the output without them: only scalars are fetched and recorded."""
        scalars, recorded = split_recorded(out.pipeline)
        self.upload_record = upload_record(recorded)
        return out._replace(pipeline=scalars)

    def _communication(self) -> tuple[int, int]:
        """Bytes one client downloads (the broadcast) and uploads (its `ClientOutput`)."""
        broadcast = jax.eval_shape(self.algorithm.broadcast, self.state.server)
        one = jax.tree.map(lambda x: x[0], self.state.clients.algorithm)
        like = upload_shape(
            self.algorithm, self.pipeline, self.state.server, one, self.hyperparams(0)
        )
        # Values per upload: secure aggregation sends each as one 32-bit ring element.
        self._upload_params = sum(math.prod(x.shape) for x in jax.tree.leaves(like))
        # A compressed upload's exact bytes (a Python int: the float32 stat rounds past 2**24).
        self._compressed_up_bytes = compressed_upload_bytes(self.config, like)
        down = downlink_bytes(self.state.server, broadcast)
        return tree_bytes(broadcast) if down is None else down, tree_bytes(like)

    def run(self) -> list[dict]:
        """Runs the remaining rounds; returns the metric history (one dict per record).

        Raises:
          DivergenceError: on a non-finite training or evaluation loss or global parameters;
            nothing of that round is saved.
          RunDirectoryError: if the run directory cannot be written or would overwrite an
            earlier run.
          ConfigError: if resuming from a checkpoint made with an incompatible config.
          CheckpointWriteError: if a checkpoint cannot be written; earlier ones are intact.
          CheckpointReadError: if a run is resumed and none of its checkpoints can be read.
          CohortOverflowError: if a Poisson draw exceeds the compiled cohort bound.
          DeviceMemoryError: if the round or the evaluation does not fit the device.
          RunInterrupted: on Ctrl-C or SIGTERM; the message names the checkpoint to resume.
        """
        config, run = self.config, self.config.run
        self._prepare_run_dir()
        assert self.checkpointer is not None
        writer = (
            MetricsWriter(os.path.join(self.run_dir, "metrics.jsonl"), self.history)
            if distributed.is_main_process()
            else distributed.NullMetricsWriter()
        )
        client_writer = _per_round_writer(self.run_dir, CLIENT_RESULTS, self.start_round)
        scores_writer = (
            _per_round_writer(self.run_dir, CONTRIBUTIONS, self.start_round)
            if self.contribution is not None
            else distributed.NullMetricsWriter()
        )
        # On resume, TensorBoard hides the earlier process's events from the first new record.
        first_new = self.start_round + 1 if self.start_round else 0
        board = (
            TensorBoardWriter(self.run_dir, purge_step=first_new if run.resume else None)
            if distributed.is_main_process()
            else types.SimpleNamespace(write=lambda record: None, close=lambda: None)
        )
        self._first_new_record = len(self.history)
        progress = RoundProgress(run.num_rounds, self.start_round, enabled=self.verbose)
        evaluates = config.eval.every > 0
        last_good = self.checkpointer.path(self.start_round) if self.start_round else None
        completed = self.start_round
        try:
            self._print_header(progress)
            if self.start_round == 0:
                record = {"round": 0, **self.timings, **self.warm_start()}
                if evaluates:
                    record.update(self._checked_evaluate(0, last_good, client_writer))
                    progress.log_eval(0, {k: v for k, v in record.items() if "/" in k})
                self.history.append(record)
                writer.write(record)
                board.write(record)
            compile_s = self.compile()
            down_bytes, up_bytes = self._communication()
            state_bytes = tree_bytes(self._state())
            progress.log(f"compiled the round in {compile_s:.2f} s")
            end = min(run.num_rounds, run.stop_after or run.num_rounds)
            saved = self.start_round
            budget_stop = None
            with progress:
                for r in range(self.start_round, end):
                    budget_stop = self._budget_exceeded(r)
                    if budget_stop is not None:
                        break
                    before = None
                    if self.contribution is not None:
                        # The round donates the state; the scores need the params before it.
                        before = jax.tree.map(jnp.copy, self.params)
                    t0 = time.perf_counter()
                    out, cohort = self.run_round(r)
                    wall = time.perf_counter() - t0
                    record = self._round_record(r, out, cohort, wall, down_bytes, up_bytes)
                    if r == self.start_round:
                        record["compile_time_s"] = compile_s
                    if not math.isfinite(record["train_loss"]) or not out.params_finite:
                        # Checked before any save: a checkpoint never holds NaN parameters.
                        writer.write(record)
                        board.write(record)
                        what = (
                            f"training loss is {record['train_loss']}"
                            if not math.isfinite(record["train_loss"])
                            else "the global parameters are not finite (NaN or inf)"
                        )
                        raise _divergence(r + 1, what, last_good)
                    if self.contribution is not None:
                        record.update(self._score_contributions(r, cohort, before, scores_writer))
                    if evaluates and ((r + 1) % config.eval.every == 0 or r + 1 == end):
                        record.update(self._checked_evaluate(r + 1, last_good, client_writer))
                        progress.log_eval(r + 1, {k: v for k, v in record.items() if "/" in k})
                    completed = r + 1
                    self.history.append(record)
                    every = run.checkpoint_every
                    if run.save_checkpoints and (
                        (every and completed % every == 0) or completed == end
                    ):
                        self._save(completed, record, state_bytes)
                        saved, last_good = completed, self.checkpointer.path(completed)
                    writer.write(record)
                    board.write(record)
                    if completed % run.log_every == 0:
                        status = f"loss {record['train_loss']:.4f}"
                        if "privacy/epsilon" in record:
                            status += f"  epsilon {record['privacy/epsilon']:.3g}"
                        progress.update(completed, status, round_time_s=wall)
            if budget_stop is not None:
                if run.save_checkpoints and saved != completed:
                    self._save(completed, None, state_bytes)
                    last_good = self.checkpointer.path(completed)
                self.stopped_by_budget = (
                    f"privacy budget reached: round {completed + 1} would take epsilon to "
                    f"{budget_stop:.4g}, above {self.privacy_plan.max_epsilon:g}; stopped after "
                    f"{completed} rounds at epsilon {self.privacy.epsilon():.4g} (delta "
                    f"{self.privacy_plan.delta:.3g})"
                    + (f", checkpoint {last_good}" if last_good else "")
                    + "."
                )
                progress.log(self.stopped_by_budget)
            if self.contribution is not None:
                scores_writer.close()
                write_contribution_totals(self.run_dir)
            self.audit = self._audit(progress)
            self._write_summary(progress)
            if distributed.is_main_process():
                write_learning_curves(self.history, os.path.join(self.run_dir, LEARNING_CURVES))
        except KeyboardInterrupt as err:
            raise RunInterrupted(
                f"{interruption(err)} after {completed} completed rounds; the last committed "
                f"checkpoint is {last_good or 'none (nothing saved yet)'}. Continue with the same "
                "command and --run.resume true."
            ) from None
        finally:
            writer.close()
            board.close()
            client_writer.close()
            scores_writer.close()
            self.checkpointer.close()
            if self._prefetcher is not None:
                self._prefetcher.close()
                self._prefetcher = None
        return self.history

    def _score_contributions(
        self, r: int, cohort: Cohort, before: PyTree, lines: MetricsWriter
    ) -> dict:
        """Scores the sampled clients of round ``r`` (zero-based) from its recorded uploads
        and the params ``before`` it; writes their lines and returns the round's metrics."""
        t0 = time.perf_counter()
        record, self.upload_record = self.upload_record, None
        if record is None:
            raise RuntimeError("contribution.enabled, but the round recorded no uploads.")
        with _device_memory(f"the contribution scores of round {r + 1}"):
            scores = self.contribution.score(
                self.frozen, before, record, self._round_key(r), self.hyperparams(r).server_lr
            )
        weights = np.asarray(jax.device_get(record.weights))
        ids, sampled = np.asarray(cohort.client_ids), np.asarray(cohort.participating)
        if len(weights) != len(ids):  # the sequential engine records the sampled slots only
            ids, sampled = ids[sampled], np.ones(int(sampled.sum()), bool)
        shapley = self.contribution.num_permutations > 0
        for line in round_records(r + 1, ids, sampled, weights, scores, shapley):
            lines.write(line)
        return {
            "contribution/loss_before": -float(scores.value_before),
            "contribution/loss_after": -float(scores.value_after),
            "contribution/evaluations": int(scores.evaluations),
            "contribution/shapley_skipped": bool(scores.shapley_skipped),
            "contribution_time_s": time.perf_counter() - t0,
        }

    def _audit(self, progress: RoundProgress) -> dict | None:
        """The empirical privacy checks of a run: the canary audit's epsilon lower bound and
        the membership-inference attack on held-out clients, next to the accountant's
        epsilon; written to ``privacy_audit.json``."""
        if self.canaries is None and self.holdout is None:
            return None
        out: dict[str, Any] = {}
        if self.privacy is not None:
            out["accountant_epsilon"] = self.privacy.epsilon()
            out["delta"] = self.privacy_plan.delta
        if self.canaries is not None:
            scores = canary_scores(self.canaries, self._initial_params, self.params)
            m = self.canaries.count
            grid = sorted({max(1, m // 20), max(1, m // 10), max(1, m // 4), m // 2} - {0})
            result = canary_audit(
                scores, self.canaries.included, grid, 0.95, delta=self.privacy_plan.delta
            )
            out["canaries"] = {
                "count": m,
                "included": int(self.canaries.included.sum()),
                "guesses": result.num_guesses,
                "correct": result.num_correct,
                "epsilon_lower_bound": result.epsilon_lower_bound,
                "confidence": 0.95,
                "mean_score_included": float(scores[self.canaries.included].mean()),
                "mean_score_excluded": float(scores[~self.canaries.included].mean()),
            }
            if 2 * m * self.privacy_plan.delta > 0.05:
                out["canaries"]["note"] = (
                    f"2 x canaries x delta = {2 * m * self.privacy_plan.delta:.3g}: the one-run "
                    "bound pays this term, so it stays loose; set privacy.delta well below "
                    f"1 / (2 x {m}) for a tight audit."
                )
            progress.log(
                f"privacy audit: {m} canaries, {result.num_correct} of {result.num_guesses} "
                f"guesses right; empirical epsilon >= {result.epsilon_lower_bound:.3g} (95%) "
                f"against the accountant's {out.get('accountant_epsilon', float('nan')):.3g}"
            )
        if self.holdout is not None and isinstance(self.data, TaskData):
            losses = self._client_train_losses(self.holdout.candidates)
            included = self.holdout.included
            out["membership_inference"] = {
                "clients_in": int(included.sum()),
                "clients_out": int((~included).sum()),
                **membership_inference(-losses[included], -losses[~included]),
            }
            progress.log(
                "membership inference on held-in vs held-out clients: AUC "
                f"{out['membership_inference']['auc']:.3f}"
            )
        if distributed.is_main_process():
            with open(os.path.join(self.run_dir, "privacy_audit.json"), "w") as f:
                json.dump(out, f, indent=1)
        return out

    def _client_train_losses(self, client_ids: np.ndarray) -> np.ndarray:
        """Each given client's mean loss on its own training examples (the attack's score)."""
        train = self.data.train
        rows = [
            np.arange(train.client_start[c], train.client_start[c] + train.client_count[c])
            for c in client_ids
        ]
        examples = train.examples
        subset = dataclasses.replace(
            examples,
            tokens=examples.tokens[np.concatenate(rows)],
            loss_mask=examples.loss_mask[np.concatenate(rows)],
            prompt_len=examples.prompt_len[np.concatenate(rows)],
            labels=examples.labels[np.concatenate(rows)],
            responses=tuple(examples.responses[i] for i in np.concatenate(rows))
            if examples.responses
            else examples.responses,
        )
        per_example = evaluate_examples(
            self.eval_step,
            self.frozen,
            self.params,
            subset,
            self.tokenizer,
            self.config.eval.batch_size,
        )
        bounds = np.cumsum([0] + [len(r) for r in rows])
        return np.asarray(
            [
                per_example["loss_sum"][a:b].sum() / max(per_example["target_tokens"][a:b].sum(), 1)
                for a, b in zip(bounds[:-1], bounds[1:], strict=True)
            ]
        )

    def _save(self, completed: int, record: dict | None, state_bytes: int) -> None:
        assert self.checkpointer is not None
        t0 = time.perf_counter()
        if not distributed.is_multiprocess():
            self.checkpointer.save(completed, self._state(), self._metadata(completed))
        elif distributed.is_main_process():
            # Process 0 saves a host copy of the replicated state; the others go on.
            state = jax.device_get(self._state())
            self.checkpointer.save(completed, state, self._metadata(completed))
        if record is not None:
            record["checkpoint_bytes"] = state_bytes
            record["checkpoint_time_s"] = time.perf_counter() - t0

    def _budget_exceeded(self, round_num: int) -> float | None:
        """The epsilon round ``round_num`` would reach if it exceeds the budget, else None."""
        if self.privacy is None or self.privacy_plan.max_epsilon is None:
            return None
        ids = self.sampler.sample(round_num)
        after = self.privacy.epsilon_after(ids)
        return after if after > self.privacy_plan.max_epsilon else None

    def _checked_evaluate(
        self, completed: int, last_good: str | None, client_writer: MetricsWriter
    ) -> dict:
        t0 = time.perf_counter()
        self.client_results = []
        with _device_memory(f"the evaluation after round {completed}"):
            metrics = self.evaluate()
        loss = metrics.get("eval/loss")
        if loss is not None and not math.isfinite(loss):
            raise _divergence(completed, f"the evaluation loss is {loss}", last_good)
        for result in self.client_results:
            client_writer.write({"round": completed, **result})
        return {**metrics, "eval_time_s": time.perf_counter() - t0}

    def _round_record(
        self,
        r: int,
        out: RoundOutput,
        cohort: Cohort,
        wall: float,
        down_bytes: int,
        up_bytes: int,
    ) -> dict:
        sampled = int(cohort.participating.sum())
        delivered = int((out.weights > 0).sum())
        record = {
            "round": r + 1,
            "train_loss": float(out.train_loss),
            "client_lr": float(self.hyperparams(r).client_lr),
            "server_lr": float(self.hyperparams(r).server_lr),
            "round_time_s": wall,
            "client_updates_per_s": sampled / wall,
            "local_steps": int(out.metrics["steps"]),
            "sampled": sampled,
            "participants": delivered,
            "dropped": int((cohort.participating & ~cohort.delivered).sum()),
            "padding_slots": self.slots - sampled,
            "bytes_down": down_bytes * sampled,
            "bytes_up": up_bytes * int(cohort.delivered.sum()),
        }
        if BYTES_STAT in out.pipeline and not self.config.secure_aggregation.enabled:
            # A compressing upload transform reports its messages' bytes (secure aggregation's
            # masked payload is dense whatever was compressed before it).
            record["bytes_up_dense"] = record["bytes_up"]
            record["bytes_up"] = self._compressed_bytes_up(out, cohort)
        if self.config.secure_aggregation.enabled:
            # The masked payload is as large as the float32 one; the protocol's keys and
            # secret shares are extra, for every sampled client (dropped ones included).
            extra = masked_bytes_per_client(self._upload_params, max(sampled - 1, 0))
            record["secagg/extra_bytes_per_client"] = extra["extra_bytes"]
            record["bytes_up"] += extra["extra_bytes"] * sampled
        if "tokens" in out.metrics:
            record["tokens"] = float(out.metrics["tokens"])
            record["tokens_per_s"] = record["tokens"] / wall
        for name in self.objective.means:
            # Per unit of loss weight (per preference pair, say), over the round's clients.
            weight = max(float(out.metrics[LOSS_WEIGHT]), 1.0)
            record[f"train/{name}"] = float(out.metrics[name]) / weight
        for name, value in out.pipeline.items():
            record[f"pipeline/{name}"] = float(value)
        if self.privacy is not None:
            self.privacy.record_round(cohort.client_ids[cohort.participating])
            record["privacy/epsilon"] = self.privacy.epsilon()
            record["privacy/delta"] = self.privacy_plan.delta
        return record

    def _compressed_bytes_up(self, out: RoundOutput, cohort: Cohort) -> int:
        """The round's exact compressed upload bytes, summed over delivered clients."""
        summed = float(out.pipeline[BYTES_STAT])
        per_client = getattr(self, "_compressed_up_bytes", None)
        if per_client is not None:
            exact = per_client * int(cohort.delivered.sum())
            # The config's compressor is the one that ran (not a custom pipeline's) if the
            # float32 sum agrees up to its rounding.
            if abs(summed - exact) <= 1e-4 * exact + 0.5:
                return exact
        return round(summed)

    # ----------------------------------------------------------------------------- output
    def _print_header(self, progress: RoundProgress) -> None:
        if not self.verbose:
            return
        c = self.config
        # Data built from files (a TaskData, or preference pairs) reports its partition.
        if isinstance(self.data, TaskData) or "examples_per_client" in self.data.stats:
            progress.log(format_partition_stats(self.data.stats))
        padding = self.slots - self.sampler.max_cohort
        progress.log(
            f"model: {count_params(init_params_shape(self.model_config))} params, trainable "
            f"({c.trainable.mode}): {count_params(self.params)}; algorithm {c.algorithm.name}; "
            f"{c.sampling.kind} sampling of {c.run.num_clients_per_round} of "
            f"{self.num_clients} clients per round in {self.slots} slots"
            f"{f' ({padding} padding)' if padding else ''}, "
            f"{self.clients_per_chunk or self.slots} per chunk"
            f"{' (auto)' if c.run.clients_per_chunk == 'auto' else ''}; "
            f"clients sharded over {1 if self.mesh is None else self.mesh.size} of "
            f"{jax.device_count()} device(s): {jax.devices()[0].device_kind}"
        )
        if self.host_store is not None:
            progress.log(
                f"client data: host-resident ({self.host_data.nbytes / 2**20:,.1f} MiB of "
                f"examples, {self.host_store.nbytes / 2**20:,.1f} MiB client store"
                + (f" in {c.run.client_store_dir}" if c.run.client_store_dir else "")
                + "); each round's batches and states are sent to the device"
            )
        else:
            progress.log("client data: device-resident")
        if self.public is not None:
            progress.log(describe_public(self.public, c))
        if c.run.save_checkpoints:
            store = tree_bytes(self.state.clients)
            progress.log(
                f"checkpoints: {tree_bytes(self._state()) / 2**20:,.2f} MiB of arrays each"
                + (f" (per-client state store {store / 2**20:,.2f} MiB)" if store else "")
                + f", every {c.run.checkpoint_every or 'last'} round(s), newest "
                f"{c.run.keep_checkpoints} kept"
            )
        if self.privacy_plan is not None:
            progress.log(self.privacy_plan.describe())
        if self.contribution is not None:
            scoring = self.contribution
            progress.log(
                "contribution scores every round: cosine, leave-one-out and GTG-Shapley "
                f"({scoring.num_permutations} permutations) on "
                f"{len(scoring.eval_batch['example_weight'])} held-out examples, in "
                f"{self.run_dir}/contributions.jsonl"
            )
        for note in self.notes:
            progress.log(note)

    def _write_summary(self, progress: RoundProgress) -> None:
        if not distributed.is_main_process():
            return
        evals = [h for h in self.history if "eval/loss" in h]
        rounds = [h for h in self.history if "round_time_s" in h]
        summary = {
            "rounds": self.config.run.num_rounds,
            "compile_time_s": self.compile_time_s,
            "median_round_time_s": float(np.median([h["round_time_s"] for h in rounds]))
            if rounds
            else None,
            "before": evals[0] if evals else {},
            "after": evals[-1] if evals else {},
            "wall_time_s": self.wall_time_breakdown(),
            "client_data": self.placement,
            "clients_per_chunk": self.clients_per_chunk,
        }
        if self.privacy is not None:
            plan = self.privacy_plan
            summary["privacy"] = {
                "level": plan.level,
                "epsilon": self.privacy.epsilon(),
                "delta": plan.delta,
                "noise_multiplier": plan.noise_multiplier,
                "update_noise_multiplier": plan.update_noise_multiplier,
                "clip_norm": plan.clip_norm,
                "accountant": plan.accountant,
                "max_epsilon": plan.max_epsilon,
                "stopped_by_budget": self.stopped_by_budget,
            }
        if self.audit is not None:
            summary["privacy_audit"] = self.audit
        with open(os.path.join(self.run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        if self.verbose and self.privacy is not None:
            progress.console.print(
                f"privacy: epsilon {summary['privacy']['epsilon']:.4g} at delta "
                f"{self.privacy_plan.delta:.3g} ({self.privacy_plan.accountant} accountant)"
            )
        if self.verbose and evals:
            keys = [k for k in evals[-1] if k.startswith(("eval/", "client/"))]
            progress.console.print(
                summary_table(evals[0], evals[-1], keys, f"{self.run_dir}: before vs after")
            )
            progress.console.print(
                f"median round time {summary['median_round_time_s']:.3f} s, compile "
                f"{self.compile_time_s:.2f} s; metrics in {self.run_dir}/metrics.jsonl"
            )

    def wall_time_breakdown(self) -> dict[str, float]:
        """Where this process's wall time went: loading the model and the data, compiling,
        rounds, evaluations, checkpoints, contribution scores, and the rest (setup, output),
        summing to the total."""
        new = self.history[self._first_new_record :]
        spent = {
            "load": self.timings.get("load_time_s", 0.0),
            "data": self.timings.get("data_time_s", 0.0),
            "compile": self.compile_time_s or 0.0,
            "rounds": sum(h.get("round_time_s", 0.0) for h in new),
            "evaluation": sum(h.get("eval_time_s", 0.0) for h in new),
            "checkpoints": sum(h.get("checkpoint_time_s", 0.0) for h in new),
            "contribution": sum(h.get("contribution_time_s", 0.0) for h in new),
        }
        total = time.perf_counter() - self._started
        spent["other"] = max(total - sum(spent.values()), 0.0)
        spent["total"] = total
        return spent


def init_params_shape(model_config: LlamaConfig) -> PyTree:
    """Shapes of the base model's parameters (no allocation)."""
    return jax.eval_shape(lambda: init_params(model_config, jax.random.key(0)))


class RunKeys(NamedTuple):
    """The independent PRNG keys a run derives from ``run.seed``."""

    init: jax.Array  # a random base model's init
    trainable: jax.Array  # the trainable part's init (LoRA A, soft prompt, prefix)
    train: jax.Array  # rounds: fold_in(train, round), then per client


def run_keys(config: ExperimentConfig) -> RunKeys:
    """Splits the root key of ``run.seed``; a run and `load_trained` must agree on it."""
    return RunKeys(*jax.random.split(jax.random.key(config.run.seed), 3))


def build_pipeline(
    config: ExperimentConfig,
    num_clients: int,
    sampler: ClientSampler,
    privacy: PrivacyPlan | None = None,
    canaries: Canaries | None = None,
    *,
    clients_per_chunk: int | None = None,
) -> AggregationPipeline:
    """The aggregation pipeline a config names.

    ``aggregation.transforms`` in order; then, with client-level DP, the clip of each client's
    whole upload (fixed or adaptive) and the noised fixed-denominator mean in place of
    ``aggregation.aggregator``; with ``contribution.enabled`` the recording of the uploads
    (`fedjax_llm.contribution.with_upload_record`) around it; with ``byzantine.fraction`` the
    malicious clients' attack in front of both (so the recorded uploads are the attacked ones).

    Args:
      config: the experiment config.
      num_clients: the population.
      sampler: the run's client sampler (its expected cohort is DP's denominator).
      privacy: the run's `PrivacyPlan` (None: no DP).
      canaries: the audit's canary clients (their uploads are replaced before clipping).
      clients_per_chunk: the one-device round's chunk size, with which the recording sums a
        streaming aggregator's uploads (None: all at once).
    """
    a, b = config.aggregation, config.byzantine
    transforms = [TRANSFORMS[name](config) for name in a.transforms]
    client_dp = privacy is not None and privacy.level == "client"
    if client_dp:
        expected = sampler.expected_cohort
        if canaries is not None:
            transforms.append(canary_uploads(canaries, privacy.clip_norm))
        if privacy.clipped_count_stddev is not None:
            p = config.privacy
            transforms.append(
                adaptive_clip(
                    privacy.clip_norm,
                    p.target_quantile,
                    p.clip_learning_rate,
                    privacy.clipped_count_stddev,
                    expected,
                )
            )
        else:
            transforms.append(clip_upload(default=privacy.clip_norm))
        aggregator = dp_mean(expected, privacy.update_noise_multiplier, privacy.clip_norm)
    else:
        aggregator = AGGREGATORS[a.aggregator](config)
    if config.secure_aggregation.enabled:
        clip = (
            privacy.clip_norm
            if client_dp
            else config.secure_aggregation.clip_norm or config.aggregation.clip_norm
        )
        transforms.append(secure_masking(sampler.max_cohort, clip))
        aggregator = secure_mean(
            sampler.max_cohort,
            clip,
            expected_clients=sampler.expected_cohort if client_dp else None,
            noise_multiplier=privacy.update_noise_multiplier if client_dp else 0.0,
        )
    if config.contribution.enabled:
        aggregator = with_upload_record(aggregator, clients_per_chunk)
    if b.fraction > 0 and b.attack not in DATA_ATTACKS:
        table = malicious_clients(num_clients, b.fraction, config.run.seed)
        aggregator = with_attack(aggregator, table, b.attack, b)
    try:
        transform = chain(*transforms)
        merge_hyperparams(transform.hyperparams, aggregator.hyperparams)
    except ValueError as err:
        raise ConfigError(f"aggregation / privacy: {err}") from None
    return AggregationPipeline(transform, aggregator)


def build_sampler(config: ExperimentConfig, num_clients: int) -> ClientSampler:
    """The client sampler ``config.sampling`` names, for a population of ``num_clients``.

    Raises:
      ConfigError: for settings that do not fit the population.
    """
    s, run = config.sampling, config.run
    try:
        if s.kind == "poisson":
            return PoissonSampler(
                run.seed,
                num_clients,
                run.num_clients_per_round / num_clients,
                s.overflow_probability,
                s.max_cohort,
            )
        if s.kind == "availability":
            return AvailabilitySampler(
                run.seed,
                num_clients,
                run.num_clients_per_round,
                s.availability,
                groups=s.availability_groups,
                period=s.availability_period,
                amplitude=s.availability_amplitude,
            )
        return UniformSampler(run.seed, num_clients, run.num_clients_per_round)
    except ValueError as err:
        raise ConfigError(f"sampling: {err}") from None


def device_memory_bytes() -> int:
    """Memory of one local device: the accelerator's limit, or the host's RAM on a CPU."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _checked_init_params(given: PyTree, like: PyTree) -> PyTree:
    """User-given initial trainable params, checked against the trainable's own."""
    given_paths = jax.tree_util.tree_flatten_with_path(given)[0]
    like_paths = jax.tree_util.tree_flatten_with_path(like)[0]
    names = [jax.tree_util.keystr(p) for p, _ in like_paths]
    if [jax.tree_util.keystr(p) for p, _ in given_paths] != names:
        raise ConfigError(
            f"init_params has entries {[jax.tree_util.keystr(p) for p, _ in given_paths][:6]}, "
            f"the trainable ({names[:6]}...) needs exactly its own structure."
        )
    out = []
    for (path, g), (_, x) in zip(given_paths, like_paths, strict=True):
        if tuple(np.shape(g)) != tuple(x.shape):
            raise ConfigError(
                f"init_params{jax.tree_util.keystr(path)} has shape {np.shape(g)}, the "
                f"trainable needs {x.shape}."
            )
        out.append(jnp.asarray(g, x.dtype))
    return jax.tree_util.tree_unflatten(jax.tree.structure(like), out)


def build_model(
    config: ExperimentConfig, key: jax.Array, need_tokenizer: bool = True
) -> tuple[LlamaConfig, PyTree, Tokenizer | None, Trainable]:
    """The base model, its tokenizer and what clients train on it.

    The base is a local pretrained directory (``pretrained.path``) or a random byte-level Llama,
    replaced by the final params of ``trainable.base_run`` when that is set.

    Args:
      config: the experiment.
      key: init key of a random model.
      need_tokenizer: whether the run tokenizes text; without it a pretrained directory may
        lack tokenizer files (data given as token ids), and the tokenizer is then None.

    Returns:
      (architecture, base params, tokenizer, trainable).

    Raises:
      ConfigError: if the directory cannot be loaded (the message names the file, tensor or
        field), the vocabulary is smaller than the tokenizer's, or the base run does not fit.
    """
    if config.pretrained.path is None:
        model_config = config.model
        base = init_params(model_config, key)
        tokenizer: Tokenizer = ByteTokenizer()
    else:
        try:
            model_config, base = load_pretrained(
                config.pretrained.path,
                max_seq_len=config.data.seq_len,
                dtype=config.model.dtype,
                load_dtype=config.pretrained.load_dtype,
                scan_unroll=config.model.scan_unroll,
            )
        except (ModelLoadError, ValueError, FileNotFoundError) as err:
            raise ConfigError(f"pretrained.path: {err}") from None
        model_config = dataclasses.replace(model_config, remat=config.model.remat)
        try:
            chat_template = _read_chat_template(config.data.chat_template)
            tokenizer = load_tokenizer(config.pretrained.path, chat_template=chat_template)
        except (ModelLoadError, ValueError, FileNotFoundError, OSError) as err:
            if need_tokenizer:
                raise ConfigError(f"pretrained.path: {err}") from None
            tokenizer = None
    if tokenizer is not None and model_config.vocab_size < tokenizer.vocab_size:
        if config.pretrained.path is not None:
            # The embedding's size comes from the weights; model.vocab_size does not apply.
            raise ConfigError(
                f"pretrained.path={config.pretrained.path!r}: its embedding has "
                f"{model_config.vocab_size} rows but its tokenizer has {tokenizer.vocab_size} "
                "tokens, so the tokenizer files belong to another model. Put the tokenizer of "
                "these weights in the folder (or fetch the model again)."
            )
        raise ConfigError(
            f"the model's vocabulary ({model_config.vocab_size}) is smaller than the tokenizer's "
            f"{tokenizer.vocab_size} tokens; set model.vocab_size >= {tokenizer.vocab_size}."
        )
    if config.trainable.base_run is not None:
        base = load_base_params(config.trainable.base_run, config, base)
    return model_config, base, tokenizer, build_trainable(config, model_config)


def client_mesh(config: ExperimentConfig) -> jax.sharding.Mesh | None:
    """The device mesh the sampled clients are sharded over, or None for one device.

    Over several processes (`fedjax_llm.distributed`) it spans the devices of all of them.

    Raises:
      ConfigError: if more devices are asked for than exist (or, over several processes, if
        ``run.devices`` is not all of them).
    """
    if jax.process_count() > 1:
        return distributed.client_mesh(config, CLIENT_AXIS)
    available = jax.local_devices()
    count = config.run.devices or len(available)
    if count > len(available):
        raise ConfigError(
            f"run.devices={count} but this host has {len(available)} device(s): {available}."
        )
    if count == 1:
        return None
    return jax.sharding.Mesh(np.asarray(available[:count]), (CLIENT_AXIS,))


def build_trainable(config: ExperimentConfig, model_config: LlamaConfig) -> Trainable:
    """The `Trainable` that ``config.trainable`` describes, for the given architecture."""
    t = config.trainable
    return make_trainable(
        model_config,
        t.mode,
        lora_rank=t.lora_rank,
        lora_alpha=t.lora_alpha,
        lora_targets=t.lora_targets,
        num_virtual_tokens=t.num_virtual_tokens,
        prompt_init=t.prompt_init,
        lora_soft_prompt=t.lora_soft_prompt if t.mode == "lora" else 0,
    )


def _read_chat_template(value: str | None) -> str | None:
    # A template is ``chatml`` (the built-in ChatML template), given inline, or the path of a
    # file holding it.
    if value == "chatml":
        return CHATML_TEMPLATE
    if value is not None and os.path.isfile(value):
        with open(value) as f:
            return f.read()
    return value


def poisoning_spec(config: ExperimentConfig) -> PoisoningSpec | None:
    """The data-poisoning attack ``config.byzantine`` names (None for none or an upload
    attack); the malicious clients are those of `fedjax_llm.robustness.malicious_clients`."""
    b = config.byzantine
    if b.attack not in DATA_ATTACKS:
        return None
    return PoisoningSpec(
        kind=b.attack,
        malicious=malicious_clients(config.data.num_clients, b.fraction, config.run.seed),
        trigger=b.trigger,
        target=b.target,
        fraction=b.poison_fraction,
        seed=config.run.seed,
    )


def build_data(
    d: DataConfig, tokenizer: Tokenizer, poisoning: PoisoningSpec | None = None
) -> TaskData | ClientArrays:
    """The federated data of a run: the built-in tasks or a local file, partitioned.

    Preference pairs (``data.format: preference``, or ``auto`` with prompt/chosen/rejected
    columns) become a `ClientArrays` of chosen/rejected rows (`build_preference_data`);
    everything else a `TaskData`. With ``auto`` the files are read once and their columns
    choose the builder.

    Args:
      d: the data config.
      tokenizer: the run's tokenizer.
      poisoning: the malicious clients' data poisoning, if any.

    Returns:
      The `TaskData`, or the `ClientArrays` of preference pairs.

    Raises:
      ConfigError: for data that cannot be used (missing columns, empty files, no clients left,
        examples that do not fit, poisoning of preference pairs); the message names the cause.
    """
    try:
        if d.source == "builtin":
            return build_task_data(
                families=d.task_families,
                num_clients=d.num_clients,
                examples_per_client=d.examples_per_client,
                seq_len=d.seq_len,
                partitioner=d.partitioner,
                partitioner_kwargs=d.partitioner_kwargs(),
                test_fraction=d.test_fraction,
                eval_examples_per_family=d.eval_examples_per_family,
                seed=d.seed,
                tokenizer=tokenizer,
                poisoning=poisoning,
            )
        # A pretrained tokenizer was loaded with the template already (see build_model).
        chat_template = (
            None
            if getattr(tokenizer, "has_chat_template", False)
            else _read_chat_template(d.chat_template)
        )
        path: Any = d.path
        if d.format in ("auto", "preference"):
            # Read once; the columns found choose the builder.
            path = load_records(d.path, d.format, text_column=d.text_column, sample_by=d.sample_by)
        if isinstance(path, LoadedDataset) and path.schema == "preference":
            if poisoning is not None:
                raise ConfigError(
                    f"byzantine.attack={poisoning.kind} poisons instruction data; "
                    f"{d.path!r} holds preference pairs, which it cannot poison yet."
                )
            return build_preference_data(
                path,
                tokenizer=tokenizer,
                seq_len=d.seq_len,
                num_clients=d.num_clients,
                partitioner=d.partitioner,
                partitioner_kwargs=d.partitioner_kwargs(),
                label_column=d.label_column,
                client_column=d.client_column,
                test_fraction=d.test_fraction,
                eval_fraction=d.eval_fraction,
                max_examples=d.max_examples,
                seed=d.seed,
                chat_template=chat_template,
            )
        return build_file_data(
            path,
            tokenizer=tokenizer,
            seq_len=d.seq_len,
            format=d.format,
            num_clients=d.num_clients,
            partitioner=d.partitioner,
            partitioner_kwargs=d.partitioner_kwargs(),
            label_column=d.label_column,
            client_column=d.client_column,
            text_column=d.text_column,
            test_fraction=d.test_fraction,
            eval_fraction=d.eval_fraction,
            max_examples=d.max_examples,
            pack=d.pack,
            seed=d.seed,
            loss_on=d.loss_on,
            chat_template=chat_template,
            sample_by=d.sample_by,
            poisoning=poisoning,
        )
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"data: {err}") from None


def _restore_latest(run_dir: str, what: str) -> tuple[dict, dict, int]:
    """The newest readable checkpoint of a run as (flat arrays, metadata, round).

    Nothing is created or changed in ``run_dir``; an unreadable newest checkpoint falls back
    to an older one with a warning on stderr.
    """
    if not os.path.isdir(run_dir):
        raise ConfigError(f"{what}={run_dir!r} does not exist (or is not a folder).")
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    found = None
    if os.path.isdir(ckpt_dir):
        checkpointer = Checkpointer(ckpt_dir, read_only=True)
        try:
            found = checkpointer.newest_readable(checkpointer.restore_raw)
        finally:
            checkpointer.close()
    if found is None:
        raise ConfigError(
            f"{what}={run_dir!r} has no checkpoint; runs save one at the end (and every "
            "run.checkpoint_every rounds)."
        )
    round_num, (raw, meta), skipped = found
    for _, reason in skipped:
        print(f"warning: {reason}; using round {round_num} instead.", file=sys.stderr)
    return raw, meta, round_num


def _global_params(raw: dict, like: PyTree, what: str, run_dir: str) -> PyTree:
    """The global trainable params of a restored checkpoint, in the structure of ``like``.

    They are the server state's ``params``, or its wrapped state's (``inner``: an algorithm
    wrapped by `fedjax_llm.public_training.with_public_steps` or downlink compression)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(like)

    def missing_under(prefix: str) -> list:
        return [p for p, _ in leaves if prefix + jax.tree_util.keystr(p) not in raw]

    prefixes = ["['server_state']" + ".inner" * depth + ".params" for depth in range(4)]
    prefix = next((p for p in prefixes if not missing_under(p)), None)
    if prefix is None:
        missing = missing_under(prefixes[0])
        raise ConfigError(
            f"{what}={run_dir!r}: its checkpoint lacks {jax.tree_util.keystr(missing[0])}; it "
            "was made with another trainable mode or model."
        )
    values = [jnp.asarray(raw[prefix + jax.tree_util.keystr(p)]) for p, _ in leaves]
    return jax.tree_util.tree_unflatten(treedef, values)


def load_base_params(run_dir: str, config: ExperimentConfig, like: PyTree) -> PyTree:
    """Loads the model an earlier run ended with as the frozen base: the final global params
    of a ``full`` run, or a ``lora`` run's base with its final global adapter merged in (so
    stages chain: pre-training, then instruction tuning, then alignment).

    Args:
      run_dir: the earlier run's directory.
      config: the current config (its model and tokenizer must match the earlier run's).
      like: base params of the right structure.

    Returns:
      The base params.

    Raises:
      ConfigError: if the run has no checkpoint, trained a soft prompt or prefix (which no
        weight can hold), or used another model or tokenizer.
    """
    raw, meta, _ = _restore_latest(run_dir, "trainable.base_run")
    mode = meta.get("trainable_mode")
    if mode not in ("full", "lora"):
        raise ConfigError(
            f"trainable.base_run={run_dir!r} trained {mode!r}; a base must come from a 'full' "
            "run or a 'lora' run (whose adapter is merged into its base)."
        )
    saved = meta["config"]
    if saved.get("pretrained", {}).get("path") != config.pretrained.path:
        raise ConfigError(
            f"trainable.base_run={run_dir!r} started from pretrained.path="
            f"{saved.get('pretrained', {}).get('path')!r}, not {config.pretrained.path!r}: "
            "another model and tokenizer (null is the byte-level one), so its weights would "
            "read these token ids wrongly; set pretrained.path to the base run's."
        )
    saved_model = saved["model"]
    current = dataclasses.asdict(config.model)
    # With pretrained.path (the same for both, checked above) the architecture comes from the
    # weights and the model section's sizes are not used.
    diffs = (
        []
        if config.pretrained.path
        else [
            f"model.{k}: {saved_model.get(k)!r} -> {v!r}"
            for k, v in current.items()
            if saved_model.get(k) != v and k not in ("dtype", "scan_unroll")
        ]
    )
    if diffs:
        raise ConfigError(f"trainable.base_run={run_dir!r} used another model: {diffs}.")
    if mode == "lora" and saved.get("trainable", {}).get("lora_soft_prompt"):
        raise ConfigError(
            f"trainable.base_run={run_dir!r} trained a soft prompt beside its LoRA "
            "(trainable.lora_soft_prompt), which no weight of the base can hold."
        )
    if mode == "lora":
        trained = load_trained(run_dir)
        t = trained.config.trainable
        merged = merge_lora(trained.frozen, trained.params, t.lora_alpha / t.lora_rank)
        return jax.tree.map(lambda m, x: jnp.asarray(m, x.dtype), merged, like)
    return _global_params(raw, like, "trainable.base_run", run_dir)


class TrainedModel(NamedTuple):
    """A run's trained model, ready for `Trainable.model_inputs` and generation.

    Attributes:
      config: the run's experiment config.
      model_config: the architecture.
      trainable: what the clients trained.
      frozen: the frozen base.
      params: the global trainable params of the newest checkpoint.
      tokenizer: the run's tokenizer.
      round: the round that checkpoint was taken after.
    """

    config: ExperimentConfig
    model_config: LlamaConfig
    trainable: Trainable
    frozen: PyTree
    params: PyTree
    tokenizer: Tokenizer
    round: int


def load_trained(run_dir: str) -> TrainedModel:
    """Loads a run's base model and its newest global trainable params (LoRA, prompt, prefix
    or all parameters), without building its data.

    Args:
      run_dir: a run directory (``config.yaml`` and ``checkpoints/``).

    Returns:
      The `TrainedModel`.

    Raises:
      ConfigError: if the directory holds no run or no checkpoint.
    """
    config_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(config_path):
        raise ConfigError(f"{run_dir!r} is not a run directory (no config.yaml).")
    from fedjax_llm.config import load_config

    config = load_config(config_path)
    keys = run_keys(config)
    model_config, base, tokenizer, trainable = build_model(config, keys.init)
    like = jax.eval_shape(trainable.init, keys.trainable, base)
    raw, _, round_num = _restore_latest(run_dir, "run directory")
    params = _global_params(raw, like, "run directory", run_dir)
    return TrainedModel(
        config, model_config, trainable, trainable.frozen(base), params, tokenizer, round_num
    )


def simulate(
    config: ExperimentConfig,
    algorithm: Algorithm | None = None,
    verbose: bool = False,
    **pieces: Any,
) -> list[dict]:
    """Runs a federated simulation and returns its metric history.

    Args:
      config: the experiment (see `fedjax_llm.load_config`).
      algorithm: optional custom `Algorithm` (see the README's example).
      verbose: print partition statistics, a progress bar and the summary table.
      **pieces: any of `Simulation`'s keyword arguments (``pipeline``, ``objective``,
        ``sampler``, ``data``, ``init_params``).

    Returns:
      One dict per record: round 0 holds the evaluation before training, every later record
      the round's training metrics, and evaluation metrics at evaluation rounds.
    """
    return Simulation(config, algorithm, verbose=verbose, **pieces).run()
