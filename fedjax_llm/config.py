"""Typed experiment configuration, loaded from YAML with dotted command-line overrides.

A config is a tree of dataclasses. `load_config` reads a YAML file and applies overrides such as
``--client.lr 3e-4`` through `draccus` (the library levanter uses), then `ExperimentConfig.validate`
checks values that types alone cannot express. Every mistake raises `ConfigError` naming the key,
the bad value and the valid choices, before any work starts.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Sequence
from typing import Any, Literal

import draccus
import yaml

from fedjax_llm.models.llama import LlamaConfig

TrainableMode = Literal["full", "lora", "soft_prompt", "prefix"]
ClientOptimizerName = Literal["sgd", "momentum", "adamw"]
ServerOptimizerName = Literal["sgd", "momentum", "adam", "yogi", "adagrad"]
ScheduleName = Literal["constant", "cosine", "linear", "warmup_cosine"]
PartitionerName = Literal["iid", "dirichlet", "pathological", "quantity_skew", "natural"]
DataSource = Literal["builtin", "file"]
DataFormat = Literal["auto", "alpaca", "dolly", "messages", "text"]
LossOn = Literal["last", "all"]
SampleBy = Literal["document", "paragraph", "line"]
LoadDtype = Literal["float32", "bfloat16"]
WeightingName = Literal["num_examples", "uniform"]
SamplerName = Literal["uniform", "poisson", "availability"]
EngineName = Literal["compiled", "sequential"]


class ConfigError(ValueError):
    """A configuration value is unknown, missing or invalid; the message names the key and fix."""


@dataclasses.dataclass(frozen=True)
class TrainableConfig:
    """Which part of the model the clients train.

    Attributes:
      mode: ``full`` (all parameters: fine-tuning, or pre-training from a random init),
        ``lora``, ``soft_prompt`` or ``prefix``.
      lora_rank: LoRA rank r.
      lora_alpha: LoRA alpha; the update is scaled by alpha / r.
      lora_targets: projections that get LoRA factors, from q, k, v, o, gate, up, down.
      num_virtual_tokens: length of the soft prompt or of each layer's prefix.
      prompt_init: ``vocab`` (copy random vocabulary embeddings) or ``random``.
      base_run: optional run directory of an earlier ``full`` run whose final global
        parameters become the frozen base (federated pre-training, then fine-tuning).
    """

    mode: TrainableMode = "full"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q", "v")
    num_virtual_tokens: int = 8
    prompt_init: Literal["vocab", "random"] = "vocab"
    base_run: str | None = None


@dataclasses.dataclass(frozen=True)
class PretrainedConfig:
    """A pretrained base model from a local Hugging Face-format directory.

    Attributes:
      path: directory with config.json, *.safetensors and the tokenizer files (Llama 2/3,
        SmolLM2, Qwen2/2.5, Mistral). None trains the `model` architecture from random init
        with the byte tokenizer. With a path, the architecture comes from the directory: only
        ``model.dtype`` and ``model.scan_unroll`` still apply.
      load_dtype: storage dtype of the loaded weights (bfloat16 halves a frozen base's memory).
    """

    path: str | None = None
    load_dtype: LoadDtype = "float32"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The training data and how it is split across clients.

    Attributes:
      source: ``builtin`` (the offline instruction tasks) or ``file`` (``path``).
      path: a local JSON/JSONL/Parquet/CSV/text file, a folder or glob of them, or a hub
        dataset name (online only); ``source: file``.
      format: ``auto`` (detected from the columns), ``alpaca`` (instruction/input/output),
        ``dolly`` (instruction/context/response/category), ``messages`` (chat) or ``text``
        (pre-training).
      label_column: column whose values label examples (categories) for the dirichlet and
        pathological partitioners and per-category evaluation; null: one label.
      client_column: column whose values are the clients of the ``natural`` partitioner
        (user, source, language, ...); ``__file__`` makes one client per file.
      text_column: the text column of ``format: text``.
      eval_fraction: share of the records held out as the global evaluation set (``file``).
      max_examples: keep a seeded random subset of this many records (``file``); null: all.
      pack: pack plain-text documents into full rows (``format: text``).
      sample_by: a record of a .txt file is the whole ``document``, a ``paragraph`` or a
        ``line``. Held-out evaluation records are whole records.
      loss_on: ``last`` trains on the last assistant turn of a chat, ``all`` on every one.
      chat_template: a Jinja chat template (text, or a path to a file holding it) for
        tokenizers without one.
      task_families: families of prompt/response tasks (see `fedjax_llm.data.TASK_FAMILIES`).
      num_clients: total client population (``builtin``); with ``natural``, the number of
        natural clients kept (a seeded subset), null for all of them.
      examples_per_client: mean number of examples per client (train plus test; ``builtin``).
      test_fraction: share of each client's examples held out for per-client evaluation.
      seq_len: padded sequence length in tokens.
      partitioner: ``iid``, ``dirichlet``, ``pathological``, ``quantity_skew`` or ``natural``.
      dirichlet_alpha: concentration for ``dirichlet`` (smaller = more heterogeneous).
      classes_per_client: labels per client for ``pathological``.
      quantity_skew_sigma: lognormal sigma of client sizes for ``quantity_skew``.
      eval_examples_per_family: size of the global held-out set, per family (``builtin``).
      seed: seed of data generation and partitioning.
    """

    source: DataSource = "builtin"
    path: str | None = None
    format: DataFormat = "auto"
    label_column: str | None = None
    client_column: str = "__file__"
    text_column: str = "text"
    eval_fraction: float = 0.1
    max_examples: int | None = None
    pack: bool = True
    sample_by: SampleBy = "document"
    loss_on: LossOn = "last"
    chat_template: str | None = None
    task_families: tuple[str, ...] = ("add", "reverse", "sort", "count", "lookup", "copy", "max")
    num_clients: int | None = 64
    examples_per_client: int = 64
    test_fraction: float = 0.125
    seq_len: int = 32
    partitioner: PartitionerName = "iid"
    dirichlet_alpha: float = 0.5
    classes_per_client: int = 2
    quantity_skew_sigma: float = 1.0
    eval_examples_per_family: int = 64
    seed: int = 0

    def partitioner_kwargs(self) -> dict[str, Any]:
        """Returns the keyword arguments of the chosen partitioner."""
        return {
            "iid": {},
            "dirichlet": {"alpha": self.dirichlet_alpha},
            "pathological": {"classes_per_client": self.classes_per_client},
            "quantity_skew": {"sigma": self.quantity_skew_sigma},
            "natural": {},
        }[self.partitioner]


@dataclasses.dataclass(frozen=True)
class ClientConfig:
    """Local training on each client.

    Attributes:
      optimizer: ``sgd``, ``momentum`` or ``adamw``.
      lr: peak local learning rate.
      momentum: momentum for ``momentum``; b1 for ``adamw``.
      weight_decay: decoupled weight decay for ``adamw``.
      schedule: schedule of the client learning rate over rounds (every local step of a round
        uses that round's rate): ``constant``; ``cosine`` and ``linear`` decay toward 0, which
        they would reach after the last round (optax's convention); ``warmup_cosine`` warms
        up linearly over ``warmup_steps`` rounds first.
      warmup_steps: warmup rounds of ``warmup_cosine``.
      local_steps: maximum local steps per round (the scan length).
      local_epochs: if set, a client takes ceil(local_epochs * n_i / batch_size) steps, at
        most ``local_steps``, so clients with less data do less work (masked steps).
      batch_size: examples per local step.
      grad_clip_norm: optional clipping of each local gradient by global norm.
      shuffle: shuffle each client's examples every round; false streams them in their stored
        order (to reproduce a loop that iterates client data in order).
      objective: the training loss by name: ``next_token`` (language modelling) or one added
        with `fedjax_llm.register_objective`.
    """

    optimizer: ClientOptimizerName = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: ScheduleName = "constant"
    warmup_steps: int = 0
    local_steps: int = 4
    local_epochs: float | None = None
    batch_size: int = 8
    grad_clip_norm: float | None = None
    shuffle: bool = True
    objective: str = "next_token"


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """The server optimizer, applied to the pseudo-gradient ``-mean(delta)``.

    Attributes:
      optimizer: ``sgd``, ``momentum``, ``adam``, ``yogi`` or ``adagrad``; None takes the
        algorithm's own (``fedadam`` -> adam, ``fedavg`` -> sgd, ...).
      lr: server learning rate (1.0 with sgd is plain FedAvg).
      momentum: server momentum (FedAvgM) and b1 of adam/yogi.
      b2: second-moment decay of adam/yogi.
      eps: adaptivity of adam/yogi/adagrad, passed to optax as ``eps``. For adam and yogi it is
        the tau of Reddi et al. 2021 (added to the root of the second moment); optax's adagrad
        adds it under the root, so there it acts like tau = sqrt(eps). optax also
        bias-corrects adam/yogi's moments, which the paper does not.
      schedule: schedule of the server learning rate over rounds (``constant``, ``cosine``,
        ``linear``, ``warmup_cosine``), passed to the round as an array.
      warmup_rounds: warmup rounds of ``warmup_cosine``.
    """

    optimizer: ServerOptimizerName | None = None
    lr: float = 1.0
    momentum: float = 0.9
    b2: float = 0.99
    eps: float = 1e-3
    schedule: ScheduleName = "constant"
    warmup_rounds: int = 0


@dataclasses.dataclass(frozen=True)
class AlgorithmConfig(draccus.ChoiceRegistry):
    """The federated algorithm, chosen by ``algorithm.type``; each type has its own settings.

    Types: ``fedavg``, ``fedavgm``, ``fedadam``, ``fedyogi``, ``fedadagrad`` (FedAvg with that
    server optimizer), ``fedprox`` (``mu``), ``scaffold``, or a type added with
    `fedjax_llm.register_algorithm`. In YAML: ``algorithm: {type: fedprox, mu: 0.01}``; on the
    command line: ``--algorithm.type fedprox --algorithm.mu 0.01``.

    Attributes:
      weighting: aggregate client uploads weighted by ``num_examples`` or ``uniform``.
    """

    weighting: WeightingName = "num_examples"

    @property
    def name(self) -> str:
        """The registered type name of this algorithm config."""
        return AlgorithmConfig.get_choice_name(type(self))


@AlgorithmConfig.register_subclass("fedavg")
@dataclasses.dataclass(frozen=True)
class FedAvgConfig(AlgorithmConfig):
    """FedAvg (McMahan et al. 2017) with the server optimizer of ``server.optimizer``."""


@AlgorithmConfig.register_subclass("fedavgm")
@dataclasses.dataclass(frozen=True)
class FedAvgMConfig(AlgorithmConfig):
    """FedAvg with server momentum (Hsu et al. 2019)."""


@AlgorithmConfig.register_subclass("fedadam")
@dataclasses.dataclass(frozen=True)
class FedAdamConfig(AlgorithmConfig):
    """FedAdam (Reddi et al. 2021)."""


@AlgorithmConfig.register_subclass("fedyogi")
@dataclasses.dataclass(frozen=True)
class FedYogiConfig(AlgorithmConfig):
    """FedYogi (Reddi et al. 2021)."""


@AlgorithmConfig.register_subclass("fedadagrad")
@dataclasses.dataclass(frozen=True)
class FedAdagradConfig(AlgorithmConfig):
    """FedAdagrad (Reddi et al. 2021)."""


@AlgorithmConfig.register_subclass("fedprox")
@dataclasses.dataclass(frozen=True)
class FedProxConfig(AlgorithmConfig):
    """FedProx (Li et al. 2020).

    Attributes:
      mu: proximal coefficient (>= 0), a round hyperparameter (``prox_mu``).
    """

    mu: float = 0.01


@AlgorithmConfig.register_subclass("scaffold")
@dataclasses.dataclass(frozen=True)
class ScaffoldConfig(AlgorithmConfig):
    """SCAFFOLD (Karimireddy et al. 2020, option II); needs plain SGD clients."""


def register_algorithm_config(name: str, config_class: type | None = None) -> type:
    """Registers the config type of a custom algorithm (an empty one if none is given).

    Args:
      name: the ``algorithm.type`` configs use.
      config_class: a frozen dataclass subclassing `AlgorithmConfig` with the algorithm's own
        settings, or None for an algorithm without settings.

    Returns:
      The registered class.
    """
    if config_class is None:
        config_class = dataclasses.make_dataclass(
            f"{name.title().replace('_', '')}Config", [], bases=(AlgorithmConfig,), frozen=True
        )
    if not issubclass(config_class, AlgorithmConfig):
        raise TypeError(f"{config_class} must subclass fedjax_llm.config.AlgorithmConfig.")
    AlgorithmConfig._choice_registry[name] = config_class
    return config_class


@dataclasses.dataclass(frozen=True)
class AggregationConfig:
    """What happens to client uploads between local training and the server update.

    Attributes:
      transforms: upload transforms applied to each client's update in order, by name:
        ``clip`` (L2-clip the whole update to ``clip_norm``) or names added with
        `fedjax_llm.register_transform`.
      aggregator: ``mean`` (streaming weighted mean, FedAvg), ``median`` (coordinate-wise
        median; gathers every upload) or a name added with `fedjax_llm.register_aggregator`.
      clip_norm: the clip norm of ``clip`` (a round hyperparameter).
    """

    transforms: tuple[str, ...] = ()
    aggregator: str = "mean"
    clip_norm: float = 1.0


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the clients of a round are drawn (a pure function of ``run.seed`` and the round).

    Attributes:
      kind: ``uniform`` (``run.num_clients_per_round`` clients without replacement),
        ``poisson`` (each client independently with rate num_clients_per_round / population;
        the round is compiled for a static bound on the cohort, see ``overflow_probability``)
        or ``availability`` (each client online with probability ``availability``, then
        ``num_clients_per_round`` of the online ones; fewer if fewer are online).
      availability: per-client probability of being online (``availability``).
      dropout: probability that a sampled client's upload is lost after it trained; its
        update and state change are discarded.
      overflow_probability: ``poisson``: per-round chance that the cohort exceeds the static
        bound; the bound is the smallest with at most this chance (an overflow stops the run
        with an error, nothing is truncated).
      max_cohort: ``poisson``: an explicit bound instead (at least the expected cohort).
    """

    kind: SamplerName = "uniform"
    availability: float = 1.0
    dropout: float = 0.0
    overflow_probability: float = 1e-9
    max_cohort: int | None = None


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The round loop, output and checkpoints.

    Attributes:
      num_rounds: rounds to run in total (a resumed run continues up to this round).
      num_clients_per_round: clients per round (the expected number with Poisson sampling).
      clients_per_chunk: clients vmapped together on one device; chunks run in a scan, so
        memory is that of one chunk. None runs all of a device's sampled clients in one vmap.
        The round's client axis is padded to whole chunks on every device; padding costs no
        result and is reported.
      devices: local devices the sampled clients are sharded over (a `clients` mesh axis).
        0 uses every local device.
      engine: ``compiled`` (the whole round one XLA program) or ``sequential`` (the reference:
        one jitted client update per client in a Python loop; same results up to float
        rounding, for checking the compiled round).
      seed: root seed of model init, client sampling and local training.
      output_dir: run directory (see the README for its layout).
      save_checkpoints: save checkpoints at all (false: none, e.g. for timing runs).
      partition_report: write partition.json and partition.png into the run directory.
      checkpoint_every: save the global state every this many rounds (0: only at the end).
      keep_checkpoints: keep the last this many checkpoints.
      resume: continue from the latest checkpoint in ``output_dir``.
      log_every: print and fetch progress every this many rounds.
      stop_after: stop after this many rounds (with a checkpoint) although the schedule runs
        to ``num_rounds``: splits a long run across time-limited jobs, each continued with
        ``--run.resume true``.
    """

    num_rounds: int = 60
    num_clients_per_round: int = 16
    clients_per_chunk: int | None = None
    devices: int = 1
    engine: EngineName = "compiled"
    seed: int = 0
    output_dir: str = "runs/default"
    save_checkpoints: bool = True
    partition_report: bool = True
    checkpoint_every: int = 20
    keep_checkpoints: int = 2
    resume: bool = False
    log_every: int = 1
    stop_after: int | None = None


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Evaluation of the global model.

    Attributes:
      every: evaluate every this many rounds (and always before the first and after the last);
        0 never evaluates.
      max_new_tokens: greedy decoding budget for exact-match accuracy (0 skips generation).
      batch_size: evaluation batch size.
      per_client: also evaluate on every client's held-out examples.
    """

    every: int = 20
    max_new_tokens: int = 8
    batch_size: int = 256
    per_client: bool = True


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """A whole experiment. Load with `load_config`; every field has a runnable default."""

    model: LlamaConfig = dataclasses.field(default_factory=LlamaConfig)
    pretrained: PretrainedConfig = dataclasses.field(default_factory=PretrainedConfig)
    trainable: TrainableConfig = dataclasses.field(default_factory=TrainableConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    client: ClientConfig = dataclasses.field(default_factory=ClientConfig)
    server: ServerConfig = dataclasses.field(default_factory=ServerConfig)
    algorithm: AlgorithmConfig = dataclasses.field(default_factory=FedAvgConfig)
    aggregation: AggregationConfig = dataclasses.field(default_factory=AggregationConfig)
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)

    def validate(self) -> ExperimentConfig:
        """Checks values that the types cannot express.

        Returns:
          self, so that ``config = load_config(...).validate()`` reads naturally.

        Raises:
          ConfigError: naming the key, the value and how to fix it.
        """
        _positive(
            self,
            "client.lr",
            "client.local_steps",
            "client.batch_size",
            "server.lr",
            "run.num_rounds",
            "run.num_clients_per_round",
            "data.examples_per_client",
            "data.seq_len",
            "eval.batch_size",
            "run.keep_checkpoints",
            "run.log_every",
        )
        if self.eval.every < 0:
            raise ConfigError(f"eval.every={self.eval.every} must be >= 0 (0: no evaluation).")
        if self.trainable.mode == "lora":
            _positive(self, "trainable.lora_rank", "trainable.lora_alpha")
            from fedjax_llm.models.lora import LORA_TARGETS

            bad = [t for t in self.trainable.lora_targets if t not in LORA_TARGETS]
            if bad or not self.trainable.lora_targets:
                raise ConfigError(
                    f"trainable.lora_targets={list(self.trainable.lora_targets)}: each must be "
                    f"one of {list(LORA_TARGETS)} (and at least one is needed)."
                )
        if self.trainable.mode in ("soft_prompt", "prefix"):
            _positive(self, "trainable.num_virtual_tokens")
        d = self.data
        if d.num_clients is None:
            if not (d.source == "file" and d.partitioner == "natural"):
                raise ConfigError(
                    "data.num_clients=null (all natural clients) needs data.source=file and "
                    "data.partitioner=natural; set a number of clients."
                )
        else:
            _positive(self, "data.num_clients")
        if d.source == "file":
            if not d.path:
                raise ConfigError(
                    "data.source=file needs data.path (a JSON/JSONL/Parquet/CSV/text file, folder "
                    "or glob)."
                )
            if not 0.0 < d.eval_fraction < 1.0:
                raise ConfigError(f"data.eval_fraction={d.eval_fraction} must be in (0, 1).")
            if d.max_examples is not None:
                _positive(self, "data.max_examples")
            if d.partitioner in ("dirichlet", "pathological") and d.label_column is None:
                raise ConfigError(
                    f"data.partitioner={d.partitioner} splits by label: set data.label_column "
                    "(e.g. category)."
                )
        elif d.partitioner == "natural":
            raise ConfigError(
                "data.partitioner=natural splits real data by a column; it needs data.source=file."
            )
        if d.num_clients is not None and self.run.num_clients_per_round > d.num_clients:
            raise ConfigError(
                f"run.num_clients_per_round={self.run.num_clients_per_round} exceeds "
                f"data.num_clients={self.data.num_clients}: sample at most as many clients as "
                "exist, or raise data.num_clients."
            )
        if self.run.devices < 0:
            raise ConfigError(f"run.devices={self.run.devices} must be >= 0 (0: all devices).")
        chunk = self.run.clients_per_chunk
        if chunk is not None and chunk <= 0:
            raise ConfigError(
                f"run.clients_per_chunk={chunk} must be positive (or null for one chunk of all "
                "of a device's clients)."
            )
        self._validate_sampling_and_aggregation()
        if self.run.stop_after is not None and self.run.stop_after <= 0:
            raise ConfigError(f"run.stop_after={self.run.stop_after} must be positive or null.")
        if self.client.local_epochs is not None and self.client.local_epochs <= 0:
            raise ConfigError(f"client.local_epochs={self.client.local_epochs} must be > 0.")
        if not 0.0 < self.data.test_fraction < 1.0:
            raise ConfigError(f"data.test_fraction={self.data.test_fraction} must be in (0, 1).")
        if self.run.checkpoint_every < 0:
            raise ConfigError(f"run.checkpoint_every={self.run.checkpoint_every} must be >= 0.")
        if isinstance(self.algorithm, FedProxConfig) and self.algorithm.mu < 0:
            raise ConfigError(f"algorithm.mu={self.algorithm.mu} must be >= 0.")
        client = self.client
        if isinstance(self.algorithm, ScaffoldConfig) and (
            client.optimizer != "sgd" or client.grad_clip_norm is not None or client.weight_decay
        ):
            raise ConfigError(
                "algorithm.type=scaffold needs plain SGD local steps: its control update "
                f"(x - y_i) / (K lr) is wrong for client.optimizer={client.optimizer!r}"
                f"{', client.grad_clip_norm' if client.grad_clip_norm is not None else ''}"
                f"{', client.weight_decay' if client.weight_decay else ''}. Set "
                "client.optimizer=sgd (without grad_clip_norm or weight_decay), or use fedavg or "
                "fedprox with that optimizer."
            )
        if self.data.partitioner == "dirichlet" and self.data.dirichlet_alpha <= 0:
            raise ConfigError(f"data.dirichlet_alpha={self.data.dirichlet_alpha} must be > 0.")
        if self.pretrained.path is None and self.model.max_seq_len < self.data.seq_len:
            raise ConfigError(
                f"model.max_seq_len={self.model.max_seq_len} is shorter than "
                f"data.seq_len={self.data.seq_len}; raise model.max_seq_len."
            )
        try:
            self.model.validate()
        except ValueError as e:
            raise ConfigError(f"model: {e}") from None
        from fedjax_llm.objectives import OBJECTIVES

        if self.client.objective not in OBJECTIVES:
            raise ConfigError(
                f"client.objective={self.client.objective!r}; valid choices: {sorted(OBJECTIVES)} "
                "(custom objectives: fedjax_llm.register_objective)."
            )
        from fedjax_llm.data import TASK_FAMILIES

        bad = [f for f in self.data.task_families if f not in TASK_FAMILIES]
        if bad or not self.data.task_families:
            raise ConfigError(
                f"data.task_families: unknown {bad}; valid choices are {sorted(TASK_FAMILIES)}."
            )
        return self

    def _validate_sampling_and_aggregation(self) -> None:
        sampling, aggregation = self.sampling, self.aggregation
        if not 0.0 <= sampling.dropout < 1.0:
            raise ConfigError(f"sampling.dropout={sampling.dropout} must be in [0, 1).")
        if not 0.0 < sampling.availability <= 1.0:
            raise ConfigError(f"sampling.availability={sampling.availability} must be in (0, 1].")
        if not 0.0 < sampling.overflow_probability < 1.0:
            raise ConfigError(
                f"sampling.overflow_probability={sampling.overflow_probability} must be in (0, 1)."
            )
        if sampling.max_cohort is not None:
            if sampling.kind != "poisson":
                raise ConfigError(
                    f"sampling.max_cohort is the static bound of Poisson sampling; with "
                    f"sampling.kind={sampling.kind!r} the bound is run.num_clients_per_round. "
                    "Remove it or set sampling.kind=poisson."
                )
            if sampling.max_cohort < self.run.num_clients_per_round:
                raise ConfigError(
                    f"sampling.max_cohort={sampling.max_cohort} is below the expected cohort "
                    f"run.num_clients_per_round={self.run.num_clients_per_round}; raise it or "
                    "leave it null (computed from sampling.overflow_probability)."
                )
        from fedjax_llm.pipeline import AGGREGATORS, TRANSFORMS

        if aggregation.aggregator not in AGGREGATORS:
            raise ConfigError(
                f"aggregation.aggregator={aggregation.aggregator!r}; valid choices: "
                f"{sorted(AGGREGATORS)} (custom: fedjax_llm.register_aggregator)."
            )
        bad = [t for t in aggregation.transforms if t not in TRANSFORMS]
        if bad:
            raise ConfigError(
                f"aggregation.transforms: unknown {bad}; valid choices: {sorted(TRANSFORMS)} "
                "(custom: fedjax_llm.register_transform)."
            )
        if "clip" in aggregation.transforms and not aggregation.clip_norm > 0:
            raise ConfigError(f"aggregation.clip_norm={aggregation.clip_norm} must be > 0.")


def _positive(config: ExperimentConfig, *keys: str) -> None:
    for key in keys:
        value = get_field(config, key)
        if value is None or not value > 0 or (isinstance(value, float) and math.isnan(value)):
            raise ConfigError(f"{key}={value} must be positive.")


def get_field(config: Any, dotted_key: str) -> Any:
    """Returns the value at a dotted key such as ``client.lr``."""
    value = config
    for part in dotted_key.split("."):
        value = getattr(value, part)
    return value


def load_config(path: str | None = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Loads a YAML config with dotted overrides and validates it.

    Args:
      path: YAML file; None starts from the defaults.
      overrides: command-line style overrides, e.g. ``["--client.lr", "3e-4"]``.

    Returns:
      The validated `ExperimentConfig`.

    Raises:
      ConfigError: unknown key, bad value or inconsistent settings, named in the message.
      FileNotFoundError: if ``path`` does not exist.
    """
    args = list(overrides)
    if path is not None:
        with open(path) as f:  # fail here, with the path, rather than inside the parser
            f.read(0)
        args = ["--config_path", path, *args]
    try:
        config = draccus.parse(ExperimentConfig, args=args, exit_on_error=False)
    except draccus.utils.DecodingError as e:
        raise ConfigError(f"{path}: {e}") from None
    except SystemExit as e:  # argparse reports bad command-line values by exiting
        raise ConfigError(f"invalid command-line override in {args}: {e}") from None
    except Exception as e:  # noqa: BLE001 - argparse/draccus raise assorted types for bad input
        if "'type' key" in str(e) and "AlgorithmConfig" in str(e):
            raise ConfigError(
                "algorithm settings need the algorithm's type: set algorithm.type (one of "
                f"{sorted(AlgorithmConfig._choice_registry)}) with them, e.g. "
                "--algorithm.type fedprox --algorithm.mu 0.1."
            ) from None
        raise ConfigError(f"invalid configuration: {e}") from None
    return config.validate()


def config_to_dict(config: ExperimentConfig) -> dict[str, Any]:
    """Returns the config as plain JSON/YAML-serializable data."""
    return yaml.safe_load(dump_config(config))


def dump_config(config: ExperimentConfig) -> str:
    """Returns the config as YAML text that `load_config` reads back."""
    out = io.StringIO()
    draccus.dump(config, out)
    return out.getvalue()


def config_from_dict(data: dict[str, Any]) -> ExperimentConfig:
    """Rebuilds a config from `config_to_dict` output (used to compare with a checkpoint)."""
    return draccus.decode(ExperimentConfig, data)
