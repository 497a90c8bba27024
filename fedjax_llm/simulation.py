"""The thin round loop around the compiled round, and `simulate`, the public entry point.

The Python loop only samples client ids, calls the compiled round, fetches a few scalars,
evaluates and checkpoints at their intervals. Everything per client and per local step happens
inside the one compiled program built by `fedjax_llm.round.make_round_fn`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_llm.algorithms import Algorithm, build_algorithm
from fedjax_llm.checkpoint import Checkpointer, config_differences
from fedjax_llm.config import (
    ConfigError,
    DataConfig,
    ExperimentConfig,
    check_client_split,
    config_to_dict,
    dump_config,
)
from fedjax_llm.data import (
    ByteTokenizer,
    TaskData,
    Tokenizer,
    build_file_data,
    build_task_data,
    format_partition_stats,
    load_tokenizer,
    save_partition_report,
)
from fedjax_llm.evaluation import (
    evaluate_examples,
    make_eval_step,
    summarize_clients,
    summarize_global,
)
from fedjax_llm.metrics import MetricsWriter, RoundProgress, summary_table
from fedjax_llm.models.hf_loader import ModelLoadError, load_pretrained
from fedjax_llm.models.llama import LlamaConfig, count_params, init_params
from fedjax_llm.models.trainable import Trainable, make_trainable
from fedjax_llm.optimizers import client_learning_rate
from fedjax_llm.round import CLIENT_AXIS, ClientData, LocalSchedule, make_round_fn, round_hparams
from fedjax_llm.sampling import sample_clients

PyTree = Any


class DivergenceError(RuntimeError):
    """Training produced a NaN or infinite loss; the message names the round and checkpoint."""


class RunDirectoryError(RuntimeError):
    """The run directory holds an earlier run that this run would overwrite."""


def tree_bytes(tree: PyTree) -> int:
    """Total bytes of a pytree of arrays or shape structs."""
    return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


class Simulation:
    """A federated training run: data, model, algorithm, state and the round loop.

    Build it from a config, then call `run`. Attributes after construction: ``data`` (the
    `TaskData`), ``trainable``, ``algorithm``, ``server_state``, ``client_store`` and
    ``history``; after `run`, ``params`` gives the final global trainable parameters.

    Args:
      config: the experiment config (validated here).
      algorithm: optional custom `Algorithm`, replacing ``config.algorithm``.
      verbose: print partition statistics, progress and the summary table.
    """

    def __init__(
        self, config: ExperimentConfig, algorithm: Algorithm | None = None, verbose: bool = True
    ):
        self.config = config.validate()
        self.verbose = verbose
        self.run_dir = config.run.output_dir
        init_key, trainable_key, self.train_key = run_keys(config)
        self.mesh = client_mesh(config)
        self.model_config, base, self.tokenizer, self.trainable = build_model(config, init_key)
        self.data: TaskData = build_data(config.data, self.tokenizer)
        self.num_clients = self.data.train.num_clients
        if config.run.num_clients_per_round > self.num_clients:
            raise ConfigError(
                f"run.num_clients_per_round={config.run.num_clients_per_round} exceeds the "
                f"{self.num_clients} clients of the data; sample fewer clients per round."
            )
        params = self.trainable.init(trainable_key, base)
        self.frozen = self.trainable.frozen(base)
        self.algorithm = algorithm or build_algorithm(config)
        self.server_state = self.algorithm.server_init(params)
        one_state = self.algorithm.client_state_init(params)
        self.client_store = jax.tree.map(
            lambda x: jnp.zeros((self.num_clients,) + x.shape, x.dtype) + x, one_state
        )
        train = self.data.train
        self.client_data = ClientData(
            tokens=jnp.asarray(train.examples.tokens, jnp.int32),
            loss_mask=jnp.asarray(train.examples.loss_mask, jnp.float32),
            client_start=jnp.asarray(train.client_start, jnp.int32),
            client_count=jnp.asarray(train.client_count, jnp.int32),
        )
        c = config.client
        self.schedule = LocalSchedule(
            local_steps=c.local_steps,
            batch_size=c.batch_size,
            max_client_examples=int(train.client_count.max()),
            local_epochs=c.local_epochs,
        )
        round_fn = make_round_fn(
            self.algorithm,
            self.trainable.apply,
            self.schedule,
            num_clients_total=self.num_clients,
            clients_per_chunk=config.run.clients_per_chunk,
            mesh=self.mesh,
            pad_id=self.tokenizer.pad_id,
            uniform_weighting=config.algorithm.weighting == "uniform",
        )
        # Donating the server state and the client store lets XLA update them in place.
        self.round_fn = jax.jit(round_fn, donate_argnums=(1, 2))
        # Plain text has no reference answers: evaluation is loss and perplexity only.
        generates = self.data.stats.get("exact_match_meaningful", True)
        self.eval_step = make_eval_step(
            self.trainable,
            config.eval.max_new_tokens if generates else 0,
            self.tokenizer.eos_id,
            self.tokenizer.pad_id,
        )
        self.history: list[dict] = []
        self.start_round = 0
        self.compile_time_s: float | None = None
        self.checkpointer: Checkpointer | None = None

    @property
    def params(self) -> PyTree:
        """The current global trainable parameters."""
        return self.algorithm.server_params(self.server_state)

    # ----------------------------------------------------------------------------- state
    def _state(self) -> dict:
        return {
            "server_state": self.server_state,
            "client_store": self.client_store,
            "train_key": jax.random.key_data(self.train_key),
        }

    def _metadata(self, round_num: int) -> dict:
        return {
            "round": round_num,
            "history": self.history,
            "config": config_to_dict(self.config),
            "trainable_mode": self.config.trainable.mode,
        }

    def _prepare_run_dir(self) -> None:
        run = self.config.run
        os.makedirs(self.run_dir, exist_ok=True)
        ckpt_dir = os.path.join(self.run_dir, "checkpoints")
        existing = os.path.exists(os.path.join(self.run_dir, "metrics.jsonl")) or (
            os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir)
        )
        if existing and not run.resume:
            raise RunDirectoryError(
                f"{self.run_dir} already holds a run; pass --run.resume true to continue it, "
                "or choose another --run.output_dir (nothing was overwritten)."
            )
        self.checkpointer = Checkpointer(ckpt_dir, keep=run.keep_checkpoints)
        latest = self.checkpointer.latest_round() if run.resume else None
        if latest is not None:
            self._restore(latest)
        elif run.resume and existing:
            raise RunDirectoryError(
                f"{self.run_dir} has no checkpoint to resume from; remove the directory or "
                "choose another --run.output_dir."
            )
        with open(os.path.join(self.run_dir, "config.yaml"), "w") as f:
            f.write(dump_config(self.config))
        with open(os.path.join(self.run_dir, "partition.json"), "w") as f:
            json.dump(self.data.stats, f, indent=1)
        save_partition_report(self.data, os.path.join(self.run_dir, "partition.png"))

    def _restore(self, round_num: int) -> None:
        assert self.checkpointer is not None
        state, meta = self.checkpointer.restore(round_num, self._state())
        diffs = config_differences(meta["config"], config_to_dict(self.config))
        if diffs:
            raise ConfigError(
                f"checkpoint {self.checkpointer.path(round_num)} was made with a different "
                f"config; differing fields: {diffs}. Resume with the original config (only "
                "run.num_rounds and logging/checkpoint settings may change)."
            )
        self.server_state = jax.tree.map(jnp.asarray, state["server_state"])
        self.client_store = jax.tree.map(jnp.asarray, state["client_store"])
        self.train_key = jax.random.wrap_key_data(jnp.asarray(state["train_key"]))
        self.history = meta["history"]
        self.start_round = round_num

    # ----------------------------------------------------------------------------- eval
    def evaluate(self) -> dict:
        """Evaluates the current global model on the global and per-client held-out sets."""
        bs = self.config.eval.batch_size
        params = self.params
        per_example = evaluate_examples(
            self.eval_step, self.frozen, params, self.data.eval, self.tokenizer, bs
        )
        out = summarize_global(per_example, self.data.eval)
        if self.config.eval.per_client:
            test = self.data.client_test
            per_client = evaluate_examples(
                self.eval_step, self.frozen, params, test.examples, self.tokenizer, bs
            )
            out.update(summarize_clients(per_client, test))
        return out

    # ----------------------------------------------------------------------------- loop
    def _round_args(self, round_num: int) -> tuple:
        run = self.config.run
        ids = sample_clients(run.seed, round_num, self.num_clients, run.num_clients_per_round)
        lr = client_learning_rate(self.config.client, round_num, run.num_rounds)
        round_key = jax.random.fold_in(self.train_key, round_num)
        return ids, round_key, round_hparams(lr), lr

    def compile(self) -> float:
        """Compiles the round ahead of time; returns the compile time in seconds."""
        ids, round_key, hparams, _ = self._round_args(self.start_round)
        t0 = time.perf_counter()
        self._compiled = self.round_fn.lower(
            self.frozen,
            self.server_state,
            self.client_store,
            self.client_data,
            jnp.asarray(ids),
            round_key,
            hparams,
        ).compile()
        self.compile_time_s = time.perf_counter() - t0
        return self.compile_time_s

    def _communication(self) -> tuple[int, int]:
        """Bytes one client downloads (the broadcast) and uploads (its `ClientOutput`)."""
        broadcast = jax.eval_shape(self.algorithm.broadcast, self.server_state)
        one_state = jax.tree.map(lambda x: x[0], self.client_store)
        hparams = round_hparams(0.0)

        def upload(broadcast):
            train_state = self.algorithm.client_init(broadcast, one_state, hparams)
            return self.algorithm.client_final(broadcast, train_state, one_state, hparams)[0]

        return tree_bytes(broadcast), tree_bytes(jax.eval_shape(upload, broadcast))

    def run(self) -> list[dict]:
        """Runs the remaining rounds; returns the metric history (one dict per record).

        Raises:
          DivergenceError: on a NaN or infinite training loss.
          RunDirectoryError: if the run directory would overwrite an earlier run.
          ConfigError: if resuming from a checkpoint made with an incompatible config.
        """
        config, run = self.config, self.config.run
        self._prepare_run_dir()
        assert self.checkpointer is not None
        writer = MetricsWriter(os.path.join(self.run_dir, "metrics.jsonl"), self.history)
        progress = RoundProgress(run.num_rounds, self.start_round, enabled=self.verbose)
        try:
            self._print_header(progress)
            if self.start_round == 0:
                record = {"round": 0, **self.evaluate()}
                self.history.append(record)
                writer.write(record)
            compile_s = self.compile()
            down_bytes, up_bytes = self._communication()
            progress.log(f"compiled the round in {compile_s:.2f} s")
            last_good = None
            end = min(run.num_rounds, run.stop_after or run.num_rounds)
            with progress:
                for r in range(self.start_round, end):
                    ids, round_key, hparams, lr = self._round_args(r)
                    t0 = time.perf_counter()
                    self.server_state, self.client_store, out = self._compiled(
                        self.frozen,
                        self.server_state,
                        self.client_store,
                        self.client_data,
                        jnp.asarray(ids),
                        round_key,
                        hparams,
                    )
                    out = jax.device_get(out)
                    wall = time.perf_counter() - t0
                    completed = r + 1
                    participants = int((out.weights > 0).sum())
                    record = {
                        "round": completed,
                        "train_loss": float(out.train_loss),
                        "client_lr": lr,
                        "round_time_s": wall,
                        "tokens": float(out.metrics.tokens),
                        "tokens_per_s": float(out.metrics.tokens) / wall,
                        "client_updates_per_s": len(ids) / wall,
                        "local_steps": int(out.metrics.steps),
                        "participants": participants,
                        "bytes_down": down_bytes * len(ids),
                        "bytes_up": up_bytes * participants,
                    }
                    if r == self.start_round:
                        record["compile_time_s"] = compile_s
                    if not math.isfinite(record["train_loss"]):
                        writer.write(record)
                        raise DivergenceError(
                            f"round {completed}: training loss is {record['train_loss']}. The "
                            f"last good checkpoint is {last_good or 'none (no checkpoint yet)'}. "
                            "Lower client.lr or server.lr, or set client.grad_clip_norm."
                        )
                    if completed % config.eval.every == 0 or completed == end:
                        record.update(self.evaluate())
                    self.history.append(record)
                    writer.write(record)
                    every = run.checkpoint_every
                    if (every and completed % every == 0) or completed == end:
                        self.checkpointer.save(completed, self._state(), self._metadata(completed))
                        last_good = self.checkpointer.path(completed)
                    if completed % run.log_every == 0:
                        progress.update(completed, f"loss {record['train_loss']:.4f}")
            self._write_summary(progress)
        finally:
            writer.close()
            self.checkpointer.close()
        return self.history

    # ----------------------------------------------------------------------------- output
    def _print_header(self, progress: RoundProgress) -> None:
        if not self.verbose:
            return
        c = self.config
        progress.log(format_partition_stats(self.data.stats))
        progress.log(
            f"model: {count_params(init_params_shape(self.model_config))} params, trainable "
            f"({c.trainable.mode}): {count_params(self.params)}; algorithm {c.algorithm.name}; "
            f"{c.run.num_clients_per_round} of {self.num_clients} clients per round; "
            f"clients sharded over {1 if self.mesh is None else self.mesh.size} of "
            f"{jax.device_count()} device(s): {jax.devices()[0].device_kind}"
        )

    def _write_summary(self, progress: RoundProgress) -> None:
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
        }
        with open(os.path.join(self.run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        if self.verbose and evals:
            keys = [k for k in evals[-1] if k.startswith(("eval/", "client/"))]
            progress.console.print(
                summary_table(evals[0], evals[-1], keys, f"{self.run_dir}: before vs after")
            )
            progress.console.print(
                f"median round time {summary['median_round_time_s']:.3f} s, compile "
                f"{self.compile_time_s:.2f} s; metrics in {self.run_dir}/metrics.jsonl"
            )


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


def build_model(
    config: ExperimentConfig, key: jax.Array
) -> tuple[LlamaConfig, PyTree, Tokenizer, Trainable]:
    """The base model, its tokenizer and what clients train on it.

    The base is a local pretrained directory (``pretrained.path``) or a random byte-level Llama,
    replaced by the final params of ``trainable.base_run`` when that is set.

    Args:
      config: the experiment.
      key: init key of a random model.

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
            chat_template = _read_chat_template(config.data.chat_template)
            tokenizer = load_tokenizer(config.pretrained.path, chat_template=chat_template)
        except (ModelLoadError, ValueError, FileNotFoundError) as err:
            raise ConfigError(f"pretrained.path: {err}") from None
    if model_config.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"the model's vocabulary ({model_config.vocab_size}) is smaller than the tokenizer's "
            f"{tokenizer.vocab_size} tokens; set model.vocab_size >= {tokenizer.vocab_size}."
        )
    if config.trainable.base_run is not None:
        base = load_base_params(config.trainable.base_run, config, base)
    return model_config, base, tokenizer, build_trainable(config, model_config)


def client_mesh(config: ExperimentConfig) -> jax.sharding.Mesh | None:
    """The device mesh the sampled clients are sharded over, or None for one device.

    Raises:
      ConfigError: if more devices are asked for than exist, or they do not divide the clients
        of a round into whole chunks.
    """
    available = jax.local_devices()
    count = config.run.devices or len(available)
    if count > len(available):
        raise ConfigError(
            f"run.devices={count} but this host has {len(available)} device(s): {available}."
        )
    check_client_split(config.run, count)
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
    )


def _read_chat_template(value: str | None) -> str | None:
    # A template is either given inline or as the path of a file holding it.
    if value is not None and os.path.isfile(value):
        with open(value) as f:
            return f.read()
    return value


def build_data(d: DataConfig, tokenizer: Tokenizer) -> TaskData:
    """The federated data of a run: the built-in tasks or a local file, partitioned.

    Args:
      d: the data config.
      tokenizer: the run's tokenizer.

    Returns:
      The `TaskData`.

    Raises:
      ConfigError: for data that cannot be used (missing columns, empty files, no clients left,
        examples that do not fit); the message names the cause.
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
            )
        return build_file_data(
            d.path,
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
            # A pretrained tokenizer was loaded with the template already (see build_model).
            chat_template=None
            if getattr(tokenizer, "has_chat_template", False)
            else _read_chat_template(d.chat_template),
            sample_by=d.sample_by,
        )
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"data: {err}") from None


def _restore_latest(run_dir: str, what: str) -> tuple[dict, dict, int]:
    """The newest checkpoint of a run as (flat arrays, metadata, round)."""
    checkpointer = Checkpointer(os.path.join(run_dir, "checkpoints"))
    try:
        latest = checkpointer.latest_round()
        if latest is None:
            raise ConfigError(
                f"{what}={run_dir!r} has no checkpoint; runs save one at the end (and every "
                "run.checkpoint_every rounds)."
            )
        raw, meta = checkpointer.restore_raw(latest)
    finally:
        checkpointer.close()
    return raw, meta, latest


def _global_params(raw: dict, like: PyTree, what: str, run_dir: str) -> PyTree:
    """The global trainable params of a restored checkpoint, in the structure of ``like``."""
    prefix = "['server_state'].params"
    leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
    missing = [p for p, _ in leaves if prefix + jax.tree_util.keystr(p) not in raw]
    if missing:
        raise ConfigError(
            f"{what}={run_dir!r}: its checkpoint lacks {jax.tree_util.keystr(missing[0])}; it "
            "was made with another trainable mode or model."
        )
    values = [jnp.asarray(raw[prefix + jax.tree_util.keystr(p)]) for p, _ in leaves]
    return jax.tree_util.tree_unflatten(treedef, values)


def load_base_params(run_dir: str, config: ExperimentConfig, like: PyTree) -> PyTree:
    """Loads the final global params of an earlier ``full`` run as the frozen base.

    Args:
      run_dir: the earlier run's directory.
      config: the current config (its model must match the earlier run's).
      like: base params of the right structure.

    Returns:
      The base params.

    Raises:
      ConfigError: if the run has no checkpoint, was not a ``full`` run, or used another model.
    """
    raw, meta, _ = _restore_latest(run_dir, "trainable.base_run")
    if meta.get("trainable_mode") != "full":
        raise ConfigError(
            f"trainable.base_run={run_dir!r} trained {meta.get('trainable_mode')!r}, not 'full'; "
            "a base must come from a full-parameter run."
        )
    saved = meta["config"]
    if saved.get("pretrained", {}).get("path") != config.pretrained.path:
        raise ConfigError(
            f"trainable.base_run={run_dir!r} started from pretrained.path="
            f"{saved.get('pretrained', {}).get('path')!r}, not {config.pretrained.path!r}."
        )
    saved_model = saved["model"]
    current = dataclasses.asdict(config.model)
    diffs = [
        f"model.{k}: {saved_model.get(k)!r} -> {v!r}"
        for k, v in current.items()
        if saved_model.get(k) != v and k not in ("dtype", "scan_unroll")
    ]
    if diffs:
        raise ConfigError(f"trainable.base_run={run_dir!r} used another model: {diffs}.")
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
    config: ExperimentConfig, algorithm: Algorithm | None = None, verbose: bool = False
) -> list[dict]:
    """Runs a federated simulation and returns its metric history.

    Args:
      config: the experiment (see `fedjax_llm.load_config`).
      algorithm: optional custom `Algorithm` (see the README's example).
      verbose: print partition statistics, a progress bar and the summary table.

    Returns:
      One dict per record: round 0 holds the evaluation before training, every later record
      the round's training metrics, and evaluation metrics at evaluation rounds.
    """
    return Simulation(config, algorithm, verbose=verbose).run()
