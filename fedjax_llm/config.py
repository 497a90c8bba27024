"""Typed experiment configuration, loaded from YAML with dotted command-line overrides.

A config is a tree of dataclasses. `load_config` reads a YAML file, applies overrides such as
``--client.lr 3e-4``, checks the keys (an unknown one is named with its file line and the valid
keys of its section) and decodes the values with `draccus` (the library levanter uses). Then
`ExperimentConfig.validate` checks the type and range of every field in one loop, the ranges
declared in `FIELD_RANGES` (custom sections: `declare_ranges`), and after it the settings that
must agree. Every mistake raises `ConfigError` naming the key, the bad value and the valid
values, before any work starts. `fedjax_llm.config_help.config_help` renders every key for
``--help``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import io
import math
import numbers
import os
import types
import typing
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import draccus
import yaml

from fedjax_llm.errors import UserError
from fedjax_llm.models.llama import LlamaConfig

TrainableMode = Literal["full", "lora", "soft_prompt", "prefix"]
ClientOptimizerName = Literal["sgd", "momentum", "adamw"]
ServerOptimizerName = Literal["sgd", "momentum", "nesterov", "adam", "yogi", "adagrad"]
ScheduleName = Literal["constant", "cosine", "linear", "warmup_cosine"]
PartitionerName = Literal["iid", "dirichlet", "pathological", "quantity_skew", "natural"]
DataSource = Literal["builtin", "file"]
DataFormat = Literal["auto", "alpaca", "dolly", "messages", "text", "preference"]
LossOn = Literal["last", "all"]
SampleBy = Literal["document", "paragraph", "line"]
LoadDtype = Literal["float32", "bfloat16"]
WeightingName = Literal["num_examples", "uniform"]
SamplerName = Literal["uniform", "poisson", "availability"]
EngineName = Literal["compiled", "sequential"]
ClientDataPlacement = Literal["auto", "device", "host"]
PrivacyLevel = Literal["none", "client", "sample"]
AccountantName = Literal["rdp", "pld"]
AttackName = Literal[
    "none", "sign_flip", "scaling", "gaussian", "alie", "ipm", "label_flip", "backdoor"
]
DATA_ATTACKS = ("label_flip", "backdoor")
"""Attacks that poison the malicious clients' training data instead of their uploads."""
COMPRESSION_TRANSFORMS = ("topk", "randk", "qsgd", "sign", "lowrank")
"""The upload transforms that compress (`fedjax_llm.compression`); a config names at most one."""


class ConfigError(UserError, ValueError):
    """A configuration value is unknown, missing or invalid; the message names the key and fix."""


class _FieldError(ConfigError):
    """A `ConfigError` about one key, so that `load_config` can add the key's file line."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key

    def __reduce__(self) -> tuple[type, tuple[str]]:  # pickles (to another process) as its base
        return ConfigError, (str(self),)


@dataclasses.dataclass(frozen=True)
class Range:
    """The valid values of a numeric config field, checked by `ExperimentConfig.validate`.

    Every numeric field of a config section has one in `FIELD_RANGES` (a custom section adds its
    own with `declare_ranges`). Whatever the range, NaN and infinite values are rejected, and
    null is accepted exactly where the field's type allows it (``int | None``).

    Attributes:
      low: smallest valid value; None: no lower bound.
      high: largest valid value; None: no upper bound.
      low_open: exclude ``low`` itself (``> low`` instead of ``>= low``).
      high_open: exclude ``high`` itself.
      note: what special values mean, shown with the error (e.g. ``0: never evaluates``).
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    note: str = ""

    def __contains__(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or value < self.high or (not self.high_open and value == self.high)

    def describe(self) -> str:
        """Returns the range in words: ``positive``, ``>= 0``, ``in [0, 1)``, ..."""
        low, high = _number_text(self.low), _number_text(self.high)
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{low}, {high}{right}"
        if self.low == 0 and self.low_open:
            return "positive"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {low}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {high}"
        return "any finite number"


def positive(note: str = "") -> Range:
    """Returns the range ``> 0``."""
    return Range(low=0, low_open=True, note=note)


def at_least(low: float, note: str = "") -> Range:
    """Returns the range ``>= low``."""
    return Range(low=low, note=note)


def between(
    low: float, high: float, *, low_open: bool = False, high_open: bool = False, note: str = ""
) -> Range:
    """Returns the interval from ``low`` to ``high``, each end included unless marked open."""
    return Range(low=low, high=high, low_open=low_open, high_open=high_open, note=note)


def _number_text(value: float | None) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


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
      lora_soft_prompt: ``lora`` only: a soft prompt of this many virtual tokens trained beside
        the LoRA factors (``algorithm.type: personal_prompt`` keeps it per client: a personal
        soft prompt on a shared LoRA); 0: none.
      base_run: optional run directory of an earlier run whose final model becomes the frozen
        base: a ``full`` run's parameters, or a ``lora`` run's base with its adapter merged in
        (pre-training, then instruction tuning, then DPO; the model must be the same).
    """

    mode: TrainableMode = "full"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q", "v")
    num_virtual_tokens: int = 8
    prompt_init: Literal["vocab", "random"] = "vocab"
    lora_soft_prompt: int = 0
    base_run: str | None = None


@dataclasses.dataclass(frozen=True)
class PretrainedConfig:
    """A pretrained base model from a local Hugging Face-format directory.

    Attributes:
      path: directory with config.json, *.safetensors and the tokenizer files (Llama 2/3,
        SmolLM2, Qwen2/2.5, Mistral). None trains the `model` architecture from random init
        with the byte tokenizer. With a path, the architecture comes from the directory: only
        ``model.dtype``, ``model.scan_unroll`` and ``model.remat`` still apply.
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
        ``dolly`` (instruction/context/response/category), ``messages`` (chat), ``text``
        (pre-training) or ``preference`` (prompt/chosen/rejected pairs for
        ``client.objective: dpo``, see `fedjax_llm.data.build_preference_data`).
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
      chat_template: a Jinja chat template (text, a path to a file holding it, or ``chatml``
        for the built-in ChatML template) for tokenizers without one, such as the byte-level
        tokenizer of a model pre-trained here.
      task_families: families of prompt/response tasks (see `fedjax_llm.data.TASK_FAMILIES`).
      num_clients: total client population (``builtin``); with ``natural``, the number of
        natural clients kept (a seeded subset), null for all of them.
      examples_per_client: mean number of examples per client (train plus test; ``builtin``).
      test_fraction: share of each client's examples held out for per-client evaluation.
      seq_len: padded sequence length in tokens.
      partitioner: ``iid``, ``dirichlet``, ``pathological``, ``quantity_skew`` or ``natural``.
      dirichlet_alpha: concentration for ``dirichlet`` (smaller = more heterogeneous).
      dirichlet_over: the ``dirichlet`` convention: ``labels`` draws each client's label mix
        from Dir(alpha * label shares), equal client sizes (Hsu et al. 2019); ``clients``
        spreads each label over the clients by Dir(alpha, ..., alpha), client sizes vary
        (FedMA). The same alpha gives different heterogeneity in the two.
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
    dirichlet_over: Literal["labels", "clients"] = "labels"
    classes_per_client: int = 2
    quantity_skew_sigma: float = 1.0
    eval_examples_per_family: int = 64
    seed: int = 0

    def partitioner_kwargs(self) -> dict[str, Any]:
        """Returns the keyword arguments of the chosen partitioner."""
        return {
            "iid": {},
            "dirichlet": {"alpha": self.dirichlet_alpha, "over": self.dirichlet_over},
            "pathological": {"classes_per_client": self.classes_per_client},
            "quantity_skew": {"sigma": self.quantity_skew_sigma},
            "natural": {},
        }[self.partitioner]


@dataclasses.dataclass(frozen=True)
class PublicDataConfig:
    """Public data on the server, beside the clients' private data (`fedjax_llm.public_training`):
    federated pre-training on both.

    The server's text is read like ``data.source: file`` with ``format: text`` and packed into
    rows of ``data.seq_len`` tokens; ``eval_fraction`` of its records are held out, and every
    evaluation reports ``eval/public/loss`` and ``eval/public/perplexity`` on them (the subset
    and the split are seeded by ``data.seed``). The server trains on the rest with its own
    optimizer: ``warm_start_steps`` steps before round 1, and ``server_steps`` steps in every
    round after the aggregated update of the clients (any algorithm; with ``trainable.mode:
    lora`` the steps train the global LoRA params). With both at 0 (the default) nothing is
    trained on it, and a path alone only adds the public evaluation.

    Attributes:
      path: a local text file, folder or glob of them (``.txt``; JSON/JSONL/Parquet/CSV records
        with ``text_column``); null: no public data.
      sample_by: a record of a .txt file is the whole ``document``, a ``paragraph`` or a
        ``line`` (held-out records are whole records).
      text_column: the text column of JSON/JSONL/Parquet/CSV public files.
      eval_fraction: share of the public records held out for the public perplexity.
      warm_start_steps: server optimizer steps on public data before round 1 (not repeated when
        a run resumes); needs ``path``.
      server_steps: server optimizer steps on public data in every round, after the aggregated
        update; needs ``path``.
      batch_size: public rows per server step.
      lr: learning rate of the server's public steps.
      optimizer: ``adamw`` (b1 0.9, no weight decay), ``sgd`` or ``momentum`` (0.9) for the
        public steps; its state is kept across rounds (and in checkpoints).
      max_examples: keep a seeded random subset of this many public records; null: all.
    """

    path: str | None = None
    sample_by: SampleBy = "paragraph"
    text_column: str = "text"
    eval_fraction: float = 0.1
    warm_start_steps: int = 0
    server_steps: int = 0
    batch_size: int = 8
    lr: float = 0.003
    optimizer: ClientOptimizerName = "adamw"
    max_examples: int | None = None


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
      objective: the training loss by name: ``next_token`` (language modelling), ``dpo``
        (preference pairs, settings in the ``dpo`` section) or one added with
        `fedjax_llm.register_objective`.
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
      optimizer: ``sgd``, ``momentum``, ``nesterov`` (Nesterov momentum, DiLoCo's outer
        optimizer), ``adam``, ``yogi`` or ``adagrad``; None takes the algorithm's own
        (``fedadam`` -> adam, ``fedavg`` -> sgd, ``diloco`` -> nesterov, ...).
      lr: server learning rate (1.0 with sgd is plain FedAvg; DiLoCo uses 0.7).
      momentum: server momentum (FedAvgM, nesterov) and b1 of adam/yogi.
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
    server optimizer), ``fedprox`` (``mu``), ``scaffold``, ``fednova``, ``diloco``
    (``keep_inner_state``); LoRA at a rank per
    client: ``hetlora``, ``flexlora``, ``flora``, ``ffa_lora``; personalized: ``fedsa_lora``,
    ``fedper``, ``ditto``, ``personal_prompt``; or a type added with
    `fedjax_llm.register_algorithm`. In YAML:
    ``algorithm: {type: fedprox, mu: 0.01}``; on the command line: ``--algorithm.type fedprox
    --algorithm.mu 0.01``.

    Attributes:
      weighting: aggregate client uploads weighted by ``num_examples`` or ``uniform``.
    """

    weighting: WeightingName = "num_examples"

    rank_tiers: ClassVar[bool] = False
    """Whether the algorithm trains LoRA at a rank per client (``system.tier_lora_ranks``)."""

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


@AlgorithmConfig.register_subclass("fednova")
@dataclasses.dataclass(frozen=True)
class FedNovaConfig(AlgorithmConfig):
    """FedNova (Wang et al. 2020): normalized averaging for clients that take different
    numbers of local steps (compute tiers, deadlines, ``client.local_epochs``)."""


@AlgorithmConfig.register_subclass("diloco")
@dataclasses.dataclass(frozen=True)
class DiLoCoConfig(AlgorithmConfig):
    """DiLoCo (Douillard et al. 2023): many local AdamW steps per round, Nesterov momentum on
    the pseudo-gradient as the outer optimizer (``server.lr: 0.7``, ``server.momentum: 0.9``
    in their experiments; see configs/diloco_pretrain.yaml).

    Attributes:
      keep_inner_state: each client keeps its inner optimizer's state (AdamW's moments and
        step count) from one round it takes part in to the next, as the paper's workers do;
        false (the default) starts it afresh every round. Kept, it costs one optimizer state
        per client in the client store, and in our pre-training comparison
        (scripts/pretraining_tables.py diloco) it trained worse than a fresh state: AdamW's
        slowly decaying second moment carries the large gradients of earlier rounds, from
        before the outer step moved the model, into every later step.
    """

    keep_inner_state: bool = False


@AlgorithmConfig.register_subclass("personal_prompt")
@dataclasses.dataclass(frozen=True)
class PersonalPromptConfig(AlgorithmConfig):
    """A personal soft prompt on a shared LoRA: FedAvg on the LoRA factors while each client
    keeps its own soft prompt (``trainable.lora_soft_prompt`` tokens) in the client store."""


@AlgorithmConfig.register_subclass("hetlora")
@dataclasses.dataclass(frozen=True)
class HetLoRAConfig(AlgorithmConfig):
    """HetLoRA (Cho et al. 2024): LoRA at a rank per client (``system.tier_lora_ranks``),
    sparsity-weighted zero-padded aggregation, optional rank self-pruning.

    Attributes:
      prune_lambda: regularizer on each client's last rank component (0: none).
      prune_threshold: a client drops its last component when its norm falls below this share
        of its components' mean norm (0: no pruning).
    """

    prune_lambda: float = 0.0
    prune_threshold: float = 0.0
    rank_tiers: ClassVar[bool] = True


@AlgorithmConfig.register_subclass("flexlora")
@dataclasses.dataclass(frozen=True)
class FlexLoRAConfig(AlgorithmConfig):
    """FlexLoRA (Bai et al. 2024): average the clients' LoRA products, redistribute by SVD."""

    rank_tiers: ClassVar[bool] = True


@AlgorithmConfig.register_subclass("flora")
@dataclasses.dataclass(frozen=True)
class FLoRAConfig(AlgorithmConfig):
    """FLoRA (Wang et al. 2024): stacked adapters, their exact average merged into the base."""

    rank_tiers: ClassVar[bool] = True


@AlgorithmConfig.register_subclass("ffa_lora")
@dataclasses.dataclass(frozen=True)
class FFALoRAConfig(AlgorithmConfig):
    """FFA-LoRA (Sun et al. 2024): LoRA ``a`` frozen, only ``b`` trained and averaged."""

    rank_tiers: ClassVar[bool] = True


@AlgorithmConfig.register_subclass("scaffold")
@dataclasses.dataclass(frozen=True)
class ScaffoldConfig(AlgorithmConfig):
    """SCAFFOLD (Karimireddy et al. 2020, option II); needs plain SGD clients."""


@AlgorithmConfig.register_subclass("fedsa_lora")
@dataclasses.dataclass(frozen=True)
class FedSALoRAConfig(AlgorithmConfig):
    """FedSA-LoRA (Guo et al. 2024): the LoRA A factors are averaged, each client keeps its own
    B factors in the client store (never uploaded); needs ``trainable.mode: lora``."""


@AlgorithmConfig.register_subclass("fedper")
@dataclasses.dataclass(frozen=True)
class FedPerConfig(AlgorithmConfig):
    """FedPer (Arivazhagan et al. 2019): the last layers stay on each client (client store),
    the rest is averaged; for ``trainable.mode`` full, lora or prefix.

    Attributes:
      personal_layers: how many of the last layers are personal (1 to the model's layers).
      personal_modules: further parameters kept personal, as path patterns of the trainable
        (e.g. ``[lm_head, final_norm]`` of full params; ``q`` for LoRA's q factors).
    """

    personal_layers: int = 1
    personal_modules: tuple[str, ...] = ()


@AlgorithmConfig.register_subclass("ditto")
@dataclasses.dataclass(frozen=True)
class DittoConfig(AlgorithmConfig):
    """Ditto (Li et al. 2021): each client keeps a personal model in the client store, trained
    beside the global copy toward it.

    Attributes:
      lam: regularization strength lambda toward the global model (a round hyperparameter,
        ``ditto_lambda``); 0 trains each personal model alone.
      proximal: take the regularizer's step as an exact proximal step (stable for any lambda)
        instead of the paper's gradient step (which diverges once client lr * lam >= 2).
    """

    lam: float = 0.1
    proximal: bool = False


def register_algorithm_config(name: str, config_class: type | None = None) -> type:
    """Registers the config type of a custom algorithm (an empty one if none is given).

    The numeric settings of ``config_class`` are checked for NaN and infinity; declare their
    valid ranges with `declare_ranges`. Its docstring's ``Attributes:`` section describes them
    in `fedjax_llm.config_help.config_help`.

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
        ``clip`` (L2-clip the whole update to ``clip_norm``); the compressors (at most one;
        `fedjax_llm.compression`) ``topk`` (global top-k sparsification), ``randk`` (random-k),
        ``qsgd`` (stochastic quantization), ``sign`` (scaled sign), ``lowrank`` (PowerSGD); or
        names added with `fedjax_llm.register_transform`.
      aggregator: ``mean`` (streaming weighted mean, FedAvg), ``median`` (coordinate-wise
        median), ``trimmed_mean``, ``krum``, ``multi_krum``, ``geometric_median``,
        ``centered_clipping`` (these gather every upload), ``norm_bounding`` (streams) or a name
        added with `fedjax_llm.register_aggregator`.
      clip_norm: the clip norm of ``clip`` (a round hyperparameter).
      trim_fraction: ``trimmed_mean``: the share of values dropped at each end per coordinate.
      byzantine_bound: ``krum``/``multi_krum``: the number f of Byzantine clients assumed per
        round; null: byzantine.fraction of the cohort, rounded up.
      multi_krum_selected: ``multi_krum``: how many lowest-score uploads are averaged.
      norm_bound: ``norm_bounding``: each upload's L2 norm bound.
      center_clip_radius: ``centered_clipping``: the clipping radius around the last aggregate.
      center_clip_iters: ``centered_clipping``: iterations per round.
      geometric_median_iters: ``geometric_median``: Weiszfeld iterations.
      compression_ratio: ``topk``/``randk``: the share of an upload's values sent, k =
        ceil(ratio * n) over the whole upload.
      quantization_bits: ``qsgd``: bits per value (sign and level; one float32 scale per leaf).
      lowrank_rank: ``lowrank``: the rank of each matrix's factors (smaller matrices and
        vectors are sent dense).
      error_feedback: compressors keep each client's residual (what compression left out) in
        the client store and add it to the next upload; ``randk`` scales its values by n / k
        (unbiased) only when this is off.
      downlink: compress the broadcast too: the server sends each round a compressed change
        of the model with ``topk``, ``randk``, ``qsgd``, ``sign`` or ``lowrank`` (the same
        settings as the upload's), keeping what it left out as server-side error feedback
        (`fedjax_llm.compression.with_downlink_compression`); ``bytes_down`` counts the
        compressed message. Null: the dense model.
    """

    transforms: tuple[str, ...] = ()
    aggregator: str = "mean"
    clip_norm: float = 1.0
    trim_fraction: float = 0.1
    byzantine_bound: int | None = None
    multi_krum_selected: int | None = None
    norm_bound: float = 1.0
    center_clip_radius: float = 1.0
    center_clip_iters: int = 3
    geometric_median_iters: int = 10
    compression_ratio: float = 0.1
    quantization_bits: int = 8
    lowrank_rank: int = 4
    error_feedback: bool = True
    downlink: Literal["topk", "randk", "qsgd", "sign", "lowrank"] | None = None


@dataclasses.dataclass(frozen=True)
class PrivacyConfig:
    """Differential privacy, with its accounting (see the README's "Privacy and robustness").

    Attributes:
      level: ``none``; ``client`` (DP-FedAvg for any algorithm: each client's whole upload
        clipped to ``clip_norm``, Gaussian noise on the sum, a fixed denominator; needs
        ``sampling.kind`` ``poisson`` or ``uniform``); ``sample`` (DP-SGD inside every client:
        per-example clipping and noise at every local step; accounted per client).
      clip_norm: the L2 clip norm C (client level: of a client's upload; sample level: of one
        example's gradient). With ``adaptive_clipping`` the initial value.
      noise_multiplier: z, the noise standard deviation over C. Null: solved from
        ``target_epsilon`` before training.
      target_epsilon: the epsilon the run may reach after ``run.num_rounds`` (solves for
        ``noise_multiplier`` when that is null).
      delta: the delta of the reported (epsilon, delta); null: 1 / population^1.1. At most
        1 / population (client level) or 1 / the largest client's examples (sample level).
      accountant: ``rdp`` (Renyi DP; Poisson or fixed-size sampling) or ``pld`` (privacy loss
        distributions, tighter; Poisson sampling only).
      max_epsilon: stop (with a checkpoint) before a round would take epsilon above this;
        null: ``target_epsilon`` if set, else no budget.
      adaptive_clipping: track a quantile of the update norms (Andrew et al. 2021; client
        level only); its noisy count is charged to the accountant.
      target_quantile: the quantile adaptive clipping tracks.
      clip_learning_rate: adaptive clipping's geometric step size.
      clipped_count_stddev: noise on the clipped count; null: expected cohort / 20.
      audit_canaries: canary clients for an empirical lower bound on epsilon in the same run
        (client level, Poisson sampling; 0: no audit); each is included with probability 1/2.
        They are extra clients: the population (and q) grows by this many.
      audit_holdout_clients: real clients of which each is held out of training with
        probability 1/2, for a loss-based membership-inference attack on held-in vs held-out
        clients (0: none).
    """

    level: PrivacyLevel = "none"
    clip_norm: float = 1.0
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float | None = None
    accountant: AccountantName = "rdp"
    max_epsilon: float | None = None
    adaptive_clipping: bool = False
    target_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    clipped_count_stddev: float | None = None
    audit_canaries: int = 0
    audit_holdout_clients: int = 0


@dataclasses.dataclass(frozen=True)
class SecureAggregationConfig:
    """Simulated secure aggregation (Bonawitz et al. 2017): each client's upload is clipped,
    quantized into the ring of 32-bit integers and hidden by pairwise masks that cancel in the
    sum; the server removes the masks of clients that drop out after masking.

    Attributes:
      enabled: turn it on (the aggregate is then the unweighted mean of delivered clients, or
        the DP mean at ``privacy.level=client``).
      clip_norm: the bound on each client's upload that fixes the quantization range (null:
        ``privacy.clip_norm`` with DP, else ``aggregation.clip_norm``).
    """

    enabled: bool = False
    clip_norm: float | None = None


@dataclasses.dataclass(frozen=True)
class ByzantineConfig:
    """Malicious clients: a fixed fraction of the population, chosen once per run.

    Attributes:
      fraction: share of the population that is malicious.
      attack: ``sign_flip`` (upload -scale x its update), ``scaling`` (scale x: model
        replacement), ``gaussian`` (noise of std ``noise_stddev``), ``alie`` (Baruch et al.
        2019: mean - z std of the benign uploads), ``ipm`` (Xie et al. 2020: -epsilon x the
        benign mean), ``label_flip`` (their training responses replaced by responses of other
        labels), ``backdoor`` (their training prompts get ``trigger`` and the response
        ``target``; eval/backdoor_success measures it), ``none``.
      scale: the factor of ``sign_flip`` and ``scaling``.
      noise_stddev: the standard deviation of ``gaussian``.
      alie_z: ``alie``'s z; null: from the cohort and malicious counts as in the paper.
      ipm_epsilon: ``ipm``'s epsilon.
      poison_fraction: ``label_flip``/``backdoor``: share of a malicious client's training
        examples poisoned.
      trigger: ``backdoor``: the phrase appended to poisoned prompts.
      target: ``backdoor``: the response poisoned prompts are trained to give.
    """

    fraction: float = 0.0
    attack: AttackName = "none"
    scale: float = 10.0
    noise_stddev: float = 1.0
    alie_z: float | None = None
    ipm_epsilon: float = 0.5
    poison_fraction: float = 1.0
    trigger: str = " cf"
    target: str = "HACKED"


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
      availability_groups: ``availability``: clients split into this many groups (time
        zones) by a seeded permutation; each group's availability follows the cycle below,
        shifted by its share of the period.
      availability_period: ``availability``: rounds of one day/night cycle (0: constant
        availability).
      availability_amplitude: ``availability``: the cycle's relative swing: a client's
        availability in round r is ``availability * (1 + amplitude * cos(2 pi (r / period +
        group / groups)))``, clipped to [0, 1].
    """

    kind: SamplerName = "uniform"
    availability: float = 1.0
    availability_groups: int = 1
    availability_period: int = 0
    availability_amplitude: float = 0.0
    dropout: float = 0.0
    overflow_probability: float = 1e-9
    max_cohort: int | None = None


@dataclasses.dataclass(frozen=True)
class SystemConfig:
    """System heterogeneity: clients in capability tiers (`fedjax_llm.client_profiles`).

    Clients are split into tiers by a seeded permutation, in proportion to
    ``tier_fractions``; each ``tier_*`` list gives one value per tier (empty: no such limit).
    All of it acts through per-client masks in the compiled round, so nothing recompiles when
    the tiers or the deadline change.

    Attributes:
      tier_fractions: each tier's share of the clients (summing to 1); empty: one tier.
      tier_local_steps: the most local steps a client of each tier takes per round (at most
        ``client.local_steps``): slow devices do less work.
      tier_step_time_s: seconds one local step takes a client of each tier; with
        ``deadline_s`` a client stops at ``floor(deadline_s / step_time)`` steps.
      deadline_s: the round's deadline in seconds (a round hyperparameter, ``deadline_s``):
        stragglers' work is cut short (FedNova, ``algorithm.type: fednova``, corrects the
        objective inconsistency this causes). Null: no deadline.
      tier_lora_ranks: the LoRA rank of each tier's clients, from 1 to ``trainable.lora_rank``
        (the compiled maximum); needs a heterogeneous-rank algorithm (``hetlora``,
        ``flexlora``, ``flora``, ``ffa_lora``).
    """

    tier_fractions: tuple[float, ...] = ()
    tier_local_steps: tuple[int, ...] = ()
    tier_step_time_s: tuple[float, ...] = ()
    deadline_s: float | None = None
    tier_lora_ranks: tuple[int, ...] = ()

    @property
    def num_tiers(self) -> int:
        """The number of tiers (1 without ``tier_fractions``)."""
        return len(self.tier_fractions) or 1


@dataclasses.dataclass(frozen=True)
class ContributionConfig:
    """Scores of each sampled client's contribution to each round (`fedjax_llm.contribution`),
    written to contributions.jsonl and contributions.json in the run directory.

    Attributes:
      enabled: score every round: the cosine of each client's update with the aggregate, its
        first-order leave-one-out influence on the held-out loss and its GTG-Shapley value.
        The round then gathers every sampled client's upload (slots x upload bytes).
      eval_examples: size of the fixed, seeded subset of the global held-out examples that
        the scores' held-out loss is measured on.
      shapley_permutations: Monte Carlo permutations of the round's clients per round for
        the Shapley values (each client first in turn); 0 computes no Shapley values.
      truncation: GTG-Shapley's relative tolerance: a permutation stops once its prefix's
        value is within truncation x the whole round's value, and a round whose update
        changes the value by less than that is not scored; 0: no truncation.
    """

    enabled: bool = False
    eval_examples: int = 64
    shapley_permutations: int = 8
    truncation: float = 0.01


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """Direct Preference Optimization (``client.objective: dpo``, `fedjax_llm.dpo`): the policy
    is the base with what clients train, the reference the same base with it switched off.

    Attributes:
      beta: inverse temperature: how strongly the policy is held near the reference.
      loss: ``sigmoid`` (Rafailov et al. 2023) or ``ipo`` (Azar et al. 2023).
    """

    beta: float = 0.1
    loss: Literal["sigmoid", "ipo"] = "sigmoid"


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The round loop, output and checkpoints.

    Attributes:
      num_rounds: rounds to run in total (a resumed run continues up to this round).
      num_clients_per_round: clients per round (the expected number with Poisson sampling).
      clients_per_chunk: clients vmapped together on one device; chunks run in a scan, so
        memory is that of one chunk. ``auto`` (the default) picks the chunk from the step's
        token rows, the platform and the device's memory (`fedjax_llm.chunking`); the choice
        is printed and recorded in summary.json. None runs all of a device's sampled clients
        in one vmap. The round's client axis is padded to whole chunks on every device;
        padding costs no result and is reported.
      devices: devices the sampled clients are sharded over (a `clients` mesh axis). 0 uses
        every local device; a run over several processes (``distributed``) needs 0, all
        devices of all processes.
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
      compilation_cache_dir: folder of the persistent XLA compilation cache, so a later process
        loads the compiled round and evaluation instead of compiling them again; ``auto``: the
        folder JAX is already set to (JAX_COMPILATION_CACHE_DIR), else ~/.cache/fedjax_llm/xla
        (under XDG_CACHE_HOME if set); null or an empty string: no cache. A folder that cannot
        be written is a warning, and the run compiles without the cache.
      client_data: where the population's examples and per-client states live. ``device``:
        on the device, each client draws its batches there (fastest). ``host``: in host
        memory; each round the host gathers the cohort's batches and states and sends only
        those, the next round's batches prepared while the device trains (populations larger
        than the device's memory, e.g. a million clients). ``auto``: ``device`` while the
        examples and client states take at most half of the device's memory, else ``host``;
        the choice is printed and recorded in summary.json.
      client_store_dir: with host-resident client data, keep the per-client state store in
        memory-mapped files in this folder instead of RAM (stores larger than RAM); null: RAM.
    """

    num_rounds: int = 60
    num_clients_per_round: int = 16
    clients_per_chunk: int | Literal["auto"] | None = "auto"
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
    compilation_cache_dir: str | None = "auto"
    client_data: ClientDataPlacement = "auto"
    client_store_dir: str | None = None


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
class DistributedConfig:
    """One run on several processes (hosts) joined by `jax.distributed` (see
    `fedjax_llm.distributed`): the sampled clients are sharded over the devices of all of them.
    These keys say how the processes were launched and never change a result.

    Attributes:
      coordinator_address: ``host:port`` of process 0, which every process connects to;
        ``auto`` lets JAX detect the cluster (SLURM, Open MPI, Cloud TPU pods, Kubernetes or
        the JAX_COORDINATOR_ADDRESS environment variable); null runs one process.
      num_processes: how many processes take part (null: detected from the cluster).
      process_id: this process's index, 0 to num_processes - 1 (null: detected).
      local_device_ids: comma-separated ids of the accelerators this process uses, e.g.
        ``0,1`` (null: JAX's choice, all local ones or one GPU per SLURM / Open MPI task).
      timeout_s: seconds each process waits for all of them to connect.
    """

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: str | None = None
    timeout_s: int = 300


# The valid range of every numeric config field, checked in one loop by `ExperimentConfig.validate`
# before anything is built. A new numeric field gets its entry here (tests/test_config.py fails for
# one without); a field without bounds says so with ``Range()``. Ranges are checked whatever the
# other settings (``data.dirichlet_alpha`` even with ``data.partitioner: iid``): the defaults are
# valid, so only a mistyped value fails.
FIELD_RANGES: dict[type, dict[str, Range]] = {
    LlamaConfig: {
        "vocab_size": positive(),
        "hidden_size": positive(),
        "intermediate_size": positive(),
        "num_layers": positive(),
        "num_heads": positive(),
        "num_kv_heads": positive(),
        "head_dim": positive("null: hidden_size // num_heads"),
        "rope_theta": positive(),
        "rope_factor": positive(),
        "rope_low_freq_factor": positive(),
        "rope_high_freq_factor": positive(),
        "rope_original_max_position": positive(),
        "rms_norm_eps": positive(),
        "max_seq_len": positive(),
        "initializer_range": positive(),
        "scan_unroll": positive("null: shallow models fully unrolled, deeper ones rolled"),
    },
    TrainableConfig: {
        "lora_soft_prompt": at_least(0, "0: no soft prompt beside the LoRA factors"),
        "lora_rank": positive(),
        "lora_alpha": positive(),
        "num_virtual_tokens": positive(),
    },
    DataConfig: {
        "eval_fraction": between(0, 1, low_open=True, high_open=True),
        "max_examples": positive("null: every record"),
        "num_clients": positive("null: every natural client, with data.partitioner=natural"),
        "examples_per_client": at_least(2, "each client needs a train and a test example"),
        "test_fraction": between(0, 1, low_open=True, high_open=True),
        "seq_len": positive(),
        "dirichlet_alpha": positive("smaller is more heterogeneous"),
        "classes_per_client": positive(),
        "quantity_skew_sigma": at_least(0, "0: equal client sizes"),
        "eval_examples_per_family": positive(),
        "seed": at_least(0),
    },
    PublicDataConfig: {
        "eval_fraction": between(0, 1, low_open=True, high_open=True),
        "warm_start_steps": at_least(0, "0: no warm start"),
        "server_steps": at_least(0, "0: no public steps in the rounds"),
        "batch_size": positive(),
        "lr": positive(),
        "max_examples": at_least(2, "null: every record"),
    },
    ClientConfig: {
        "lr": positive(),
        "momentum": between(0, 1, high_open=True),
        "weight_decay": at_least(0),
        "warmup_steps": at_least(0, "in rounds"),
        "local_steps": positive(),
        "local_epochs": positive("null: every client takes client.local_steps steps"),
        "batch_size": positive(),
        "grad_clip_norm": positive("null: no clipping"),
    },
    ServerConfig: {
        "lr": positive(),
        "momentum": between(0, 1, high_open=True),
        "b2": between(0, 1, high_open=True),
        "eps": positive(),
        "warmup_rounds": at_least(0),
    },
    FedProxConfig: {"mu": at_least(0, "0 is FedAvg")},
    FedPerConfig: {"personal_layers": positive()},
    DittoConfig: {"lam": at_least(0, "0: personal models trained alone")},
    HetLoRAConfig: {
        "prune_lambda": at_least(0, "0: no regularizer"),
        "prune_threshold": between(0, 1, note="0: no rank self-pruning"),
    },
    AggregationConfig: {
        "clip_norm": positive(),
        "trim_fraction": between(0, 0.5, high_open=True),
        "byzantine_bound": at_least(0, "null: byzantine.fraction of the cohort, rounded up"),
        "multi_krum_selected": positive("null: cohort - byzantine_bound"),
        "norm_bound": positive(),
        "center_clip_radius": positive(),
        "center_clip_iters": positive(),
        "geometric_median_iters": positive(),
        "compression_ratio": between(0, 1, low_open=True, note="1 sends every value"),
        "quantization_bits": between(2, 16, note="1 bit: use the sign transform"),
        "lowrank_rank": positive(),
    },
    PrivacyConfig: {
        "clip_norm": positive(),
        "noise_multiplier": positive("null: solved from privacy.target_epsilon"),
        "target_epsilon": positive(),
        "delta": between(0, 1, low_open=True, high_open=True),
        "max_epsilon": positive("null: privacy.target_epsilon, or no budget"),
        "target_quantile": between(0, 1, low_open=True, high_open=True),
        "clip_learning_rate": positive(),
        "clipped_count_stddev": positive("null: expected cohort / 20"),
        "audit_canaries": at_least(0, "0: no audit"),
        "audit_holdout_clients": at_least(0, "0: no membership-inference attack"),
    },
    SecureAggregationConfig: {"clip_norm": positive("null: the privacy or aggregation clip")},
    ByzantineConfig: {
        "fraction": between(0, 1, high_open=True),
        "scale": Range(),
        "noise_stddev": positive(),
        "alie_z": at_least(0, "null: from the cohort and malicious counts"),
        "ipm_epsilon": positive(),
        "poison_fraction": between(0, 1, low_open=True),
    },
    SamplingConfig: {
        "availability": between(0, 1, low_open=True),
        "dropout": between(0, 1, high_open=True),
        "overflow_probability": between(0, 1, low_open=True, high_open=True),
        "max_cohort": positive("null: computed from sampling.overflow_probability"),
        "availability_groups": positive(),
        "availability_period": at_least(0, "0: constant availability"),
        "availability_amplitude": between(0, 1),
    },
    SystemConfig: {"deadline_s": positive("null: no deadline")},
    ContributionConfig: {
        "eval_examples": positive(),
        "shapley_permutations": at_least(0, "0: no Shapley values"),
        "truncation": between(0, 1, high_open=True, note="0: no truncation"),
    },
    DPOConfig: {"beta": positive()},
    RunConfig: {
        "num_rounds": positive(),
        "num_clients_per_round": positive(),
        "devices": at_least(0, "0: every device (of every process in a multi-process run)"),
        # jax.random.key keeps 32 bits of a seed: 2**32 would silently repeat seed 0.
        "seed": between(0, 2**32 - 1, note="JAX PRNG keys hold 32-bit seeds"),
        "checkpoint_every": at_least(0, "0: only at the end"),
        "keep_checkpoints": positive(),
        "log_every": positive(),
        "stop_after": positive("null: run to run.num_rounds"),
    },
    EvalConfig: {
        "every": at_least(0, "0: no evaluation"),
        "max_new_tokens": at_least(0, "0 skips generation"),
        "batch_size": positive(),
    },
    DistributedConfig: {
        "num_processes": positive("null: detected from the cluster"),
        "process_id": at_least(0, "null: detected from the cluster"),
        "timeout_s": positive(),
    },
}


def declare_ranges(config_class: type, **ranges: Range) -> None:
    """Declares the valid ranges of numeric fields of a custom config section.

    For example, for a custom algorithm config registered with `register_algorithm_config`:
    ``declare_ranges(MyAlgorithmConfig, beta=between(0, 1), steps=positive())``. The ranges
    apply to subclasses too, and `ExperimentConfig.validate` checks them with the built-in ones.

    Args:
      config_class: a dataclass used as (part of) a config section.
      **ranges: field name -> its `Range`.

    Raises:
      TypeError: if ``config_class`` is not a dataclass or a name is not one of its fields.
    """
    if not dataclasses.is_dataclass(config_class):
        raise TypeError(f"{config_class} is not a dataclass.")
    names = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(ranges) - names)
    if unknown:
        raise TypeError(
            f"{config_class.__name__} has no fields {unknown}; fields: {sorted(names)}."
        )
    FIELD_RANGES.setdefault(config_class, {}).update(ranges)


def field_range(config_class: type, name: str) -> Range | None:
    """Returns the declared `Range` of a field (looked up along the class's bases), or None."""
    for klass in config_class.__mro__:
        if name in FIELD_RANGES.get(klass, {}):
            return FIELD_RANGES[klass][name]
    return None


@dataclasses.dataclass(frozen=True)
class FieldType:
    """What a config field holds, read from its type annotation.

    Attributes:
      base: ``int``, ``float``, ``bool``, ``str``, ``tuple`` (a list of strings), ``Literal``
        (one of ``choices``), a section's dataclass, or None for a type not described here.
      optional: null is allowed.
      choices: the values of a ``Literal``.
      item: what a ``tuple`` holds: ``str``, ``int`` or ``float``.
    """

    base: Any
    optional: bool = False
    choices: tuple[Any, ...] = ()
    item: type = str

    @property
    def is_section(self) -> bool:
        """Whether the field is a nested section (a dataclass)."""
        return isinstance(self.base, type) and dataclasses.is_dataclass(self.base)

    @property
    def is_number(self) -> bool:
        """Whether the field holds an int or a float."""
        return self.base in (int, float)

    def describe(self) -> str:
        """Returns the type in words: ``int``, ``float or null``, ``a|b``, ``list of str``..."""
        if self.base is Literal:
            text = "|".join(str(c) for c in self.choices)
        elif self.base is tuple:
            text = f"list of {self.item.__name__}"
        elif isinstance(self.base, type):
            text = self.base.__name__
        else:
            text = "any"
        return f"{text} or null" if self.optional else text


@functools.cache
def _type_hints(config_class: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(config_class)
    except Exception:  # noqa: BLE001 - an unresolvable annotation: check what can be checked
        return {}


def field_types(config_class: type) -> dict[str, FieldType]:
    """Returns the user-settable fields of a config dataclass and their `FieldType`s, in order.

    Fields whose name starts with ``_`` or that are not ``__init__`` arguments are internal and
    left out.
    """
    hints = _type_hints(config_class)
    return {
        f.name: _field_type(hints.get(f.name))
        for f in dataclasses.fields(config_class)
        if f.init and not f.name.startswith("_")
    }


def _field_type(hint: Any) -> FieldType:
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        rest = [a for a in args if a is not type(None)]
        optional = len(rest) < len(args)
        if len(rest) != 1:
            return FieldType(None, optional)
        hint = rest[0]
    if typing.get_origin(hint) is Literal:
        return FieldType(Literal, optional, typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        item = args[0] if args and args[0] in (int, float) else str
        return FieldType(tuple, optional, item=item)
    if hint in (int, float, bool, str) or (
        isinstance(hint, type) and dataclasses.is_dataclass(hint)
    ):
        return FieldType(hint, optional)
    return FieldType(None, optional)


def _kind_text(field: FieldType) -> str:
    """The expected kind of value, for messages: ``an integer``, ``a number``, ..."""
    if field.base is Literal:
        return "one of " + ", ".join(str(c) for c in field.choices)
    return {
        int: "an integer",
        float: "a number",
        bool: "true or false",
        str: "a string",
        tuple: {
            str: "a list of strings, e.g. [a,b]",
            int: "a list of integers, e.g. [2,8]",
            float: "a list of numbers, e.g. [0.5,0.5]",
        }[field.item],
    }.get(field.base, "a value")


def check_fields(config: Any, prefix: str = "") -> None:
    """Checks the type and range of every field of a config tree, sections included.

    Numbers must be finite and inside their `Range` (see `FIELD_RANGES`); null is accepted
    only where the type allows it; a ``Literal`` field must hold one of its choices. Fields of
    subclasses (an ``algorithm.type``'s own settings) are checked like any other.

    Args:
      config: a config dataclass instance (an `ExperimentConfig` or one of its sections).
      prefix: the dotted key of ``config`` followed by a dot, for messages.

    Raises:
      ConfigError: for the first bad field, naming its key, value and valid range.
    """
    for name, field in field_types(type(config)).items():
        key, value = prefix + name, getattr(config, name)
        if field.is_section:
            if not isinstance(value, field.base):
                raise _FieldError(key, f"{key} must be a {field.base.__name__} section.")
            check_fields(value, key + ".")
            continue
        valid = field_range(type(config), name) if field.is_number else None
        _check_value(key, value, field, valid)


def _wanted(field: FieldType, valid: Range | None) -> str:
    """The valid values of a field in words: ``a positive integer, or null (null: ...)``."""
    bounds = valid.describe() if valid is not None else "any finite number"
    null = ", or null" if field.optional else ""
    note = f" ({valid.note})" if valid is not None and valid.note else ""
    if bounds == "positive" and field.is_number:
        return f"a positive {'integer' if field.base is int else 'number'}{null}{note}"
    bounds = "" if bounds == "any finite number" else f" {bounds}"
    return f"{_kind_text(field)}{bounds}{null}{note}"


def _is_item(value: Any, item: type) -> bool:
    """Whether ``value`` is one element of a list field holding ``item``s."""
    if isinstance(value, bool):
        return False
    if item is int:
        return isinstance(value, numbers.Integral)
    if item is float:
        return isinstance(value, numbers.Real) and math.isfinite(value)
    return isinstance(value, str)


def _check_value(key: str, value: Any, field: FieldType, valid: Range | None) -> None:
    if field.base is None:
        return
    wanted = _wanted(field, valid)
    bounds = valid.describe() if valid is not None else ""
    null = ", or null" if field.optional else ""
    note = f" ({valid.note})" if valid is not None and valid.note else ""
    if value is None:
        if field.optional:
            return
        raise _FieldError(key, f"{key}=null is not allowed; it must be {wanted}.")
    if field.base is Literal:
        if value not in field.choices:
            choices = ", ".join(str(c) for c in field.choices)
            raise _FieldError(key, f"{key}={value!r}; valid choices: {choices}{null}.")
        return
    ok = {
        int: isinstance(value, numbers.Integral) and not isinstance(value, bool),
        float: isinstance(value, numbers.Real) and not isinstance(value, bool),
        bool: isinstance(value, bool),
        str: isinstance(value, str),
        tuple: isinstance(value, tuple | list) and all(_is_item(v, field.item) for v in value),
    }.get(field.base, True)
    if not ok:
        quote = " (quote it in YAML)" if field.base is str else ""
        raise _FieldError(
            key, f"{key}={value!r} is a {type(value).__name__}; it must be {wanted}{quote}."
        )
    if not field.is_number:
        return
    if not math.isfinite(value):
        raise _FieldError(key, f"{key}={value} is not a finite number; it must be {wanted}.")
    if valid is not None and value not in valid:
        raise _FieldError(key, f"{key}={value} must be {bounds}{null}{note}.")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """A whole experiment. Load with `load_config`; every field has a runnable default."""

    model: LlamaConfig = dataclasses.field(default_factory=LlamaConfig)
    pretrained: PretrainedConfig = dataclasses.field(default_factory=PretrainedConfig)
    trainable: TrainableConfig = dataclasses.field(default_factory=TrainableConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    public: PublicDataConfig = dataclasses.field(default_factory=PublicDataConfig)
    client: ClientConfig = dataclasses.field(default_factory=ClientConfig)
    server: ServerConfig = dataclasses.field(default_factory=ServerConfig)
    algorithm: AlgorithmConfig = dataclasses.field(default_factory=FedAvgConfig)
    aggregation: AggregationConfig = dataclasses.field(default_factory=AggregationConfig)
    privacy: PrivacyConfig = dataclasses.field(default_factory=PrivacyConfig)
    secure_aggregation: SecureAggregationConfig = dataclasses.field(
        default_factory=SecureAggregationConfig
    )
    byzantine: ByzantineConfig = dataclasses.field(default_factory=ByzantineConfig)
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
    system: SystemConfig = dataclasses.field(default_factory=SystemConfig)
    contribution: ContributionConfig = dataclasses.field(default_factory=ContributionConfig)
    dpo: DPOConfig = dataclasses.field(default_factory=DPOConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)

    @property
    def uploads_hidden(self) -> bool:
        """Whether the server must not learn who sent what: client-level DP (each upload
        clipped and the sum noised) or secure aggregation (only the sum is revealed)."""
        return self.privacy.level == "client" or self.secure_aggregation.enabled

    def validate(self) -> ExperimentConfig:
        """Checks values that the types cannot express.

        First the type and range of every field (`check_fields`, with the ranges of
        `FIELD_RANGES`), then the settings that only make sense together.

        Returns:
          self, so that ``config = load_config(...).validate()`` reads naturally.

        Raises:
          ConfigError: naming the key, the value and how to fix it.
        """
        check_fields(self)
        if self.trainable.mode == "lora":
            from fedjax_llm.models.lora import LORA_TARGETS

            bad = [t for t in self.trainable.lora_targets if t not in LORA_TARGETS]
            if bad or not self.trainable.lora_targets:
                raise ConfigError(
                    f"trainable.lora_targets={list(self.trainable.lora_targets)}: each must be "
                    f"one of {list(LORA_TARGETS)} (and at least one is needed)."
                )
        d = self.data
        if d.num_clients is None and not (d.source == "file" and d.partitioner == "natural"):
            raise ConfigError(
                "data.num_clients=null (all natural clients) needs data.source=file and "
                "data.partitioner=natural; set a number of clients."
            )
        if d.source == "file":
            if not d.path:
                raise ConfigError(
                    "data.source=file needs data.path (a JSON/JSONL/Parquet/CSV/text file, folder "
                    "or glob)."
                )
            if d.partitioner in ("dirichlet", "pathological") and d.label_column is None:
                raise ConfigError(
                    f"data.partitioner={d.partitioner} splits by label: set data.label_column "
                    "(e.g. category)."
                )
        elif d.partitioner == "natural":
            raise ConfigError(
                "data.partitioner=natural splits real data by a column; it needs data.source=file."
            )
        canaries = self.privacy.audit_canaries
        if d.num_clients is not None and self.run.num_clients_per_round > d.num_clients + canaries:
            raise ConfigError(
                f"run.num_clients_per_round={self.run.num_clients_per_round} exceeds "
                f"data.num_clients={self.data.num_clients}"
                + (f" plus privacy.audit_canaries={canaries}" if canaries else "")
                + ": sample at most as many clients as exist, or raise data.num_clients."
            )
        self._validate_public()
        self._validate_sampling_and_aggregation()
        self._validate_distributed()
        self._validate_system()
        self._validate_contribution()
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
        if self.trainable.lora_soft_prompt and self.trainable.mode != "lora":
            raise ConfigError(
                f"trainable.lora_soft_prompt={self.trainable.lora_soft_prompt} adds a soft prompt "
                f"beside LoRA factors; it needs trainable.mode=lora (got {self.trainable.mode}; "
                "trainable.mode=soft_prompt trains a prompt alone)."
            )
        if isinstance(self.algorithm, PersonalPromptConfig) and not (
            self.trainable.mode == "lora" and self.trainable.lora_soft_prompt
        ):
            raise ConfigError(
                "algorithm.type=personal_prompt keeps a soft prompt per client on a shared LoRA: "
                "set trainable.mode=lora and trainable.lora_soft_prompt to its number of tokens."
            )
        if type(self.algorithm).rank_tiers and self.trainable.lora_soft_prompt:
            raise ConfigError(
                f"algorithm.type={self.algorithm.name} aggregates LoRA factors of several ranks; "
                "it takes no soft prompt beside them (trainable.lora_soft_prompt=0)."
            )
        if type(self.algorithm).rank_tiers and self.trainable.mode != "lora":
            raise ConfigError(
                f"algorithm.type={self.algorithm.name} aggregates LoRA adapters; it needs "
                f"trainable.mode=lora (got {self.trainable.mode})."
            )
        if (
            type(self.algorithm).rank_tiers
            and not isinstance(self.algorithm, FFALoRAConfig)
            and self.uploads_hidden
        ):
            raise ConfigError(
                f"algorithm.type={self.algorithm.name} aggregates what the server computes from "
                "each client's adapter (products, norm weights), which client-level DP's clip "
                "and secure aggregation's masks do not cover; use ffa_lora (whose upload is "
                "a plain average) or fedavg with LoRA for those."
            )
        if isinstance(self.algorithm, FLoRAConfig) and self.server.optimizer not in (None, "sgd"):
            raise ConfigError(
                "algorithm.type=flora merges the averaged adapters into the base with plain SGD "
                f"(server.lr scales the merge); server.optimizer={self.server.optimizer!r} "
                "cannot apply; set it to null or sgd."
            )
        self._validate_personalization()
        if isinstance(self.algorithm, FedNovaConfig) and client.optimizer == "adamw":
            raise ConfigError(
                "algorithm.type=fednova normalizes each client's change by its effective number "
                "of SGD or momentum steps, which adamw's adaptive steps do not have; set "
                "client.optimizer=sgd or momentum."
            )
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
        if self.client.objective == "dpo" and self.trainable.mode == "full":
            raise ConfigError(
                "client.objective=dpo compares the policy with the frozen base (the adapter "
                "switched off), which trainable.mode=full does not have; train lora, "
                "soft_prompt or prefix on the model to align (a full-parameter base comes in "
                "through trainable.base_run)."
            )
        from fedjax_llm.data import TASK_FAMILIES

        bad = [f for f in self.data.task_families if f not in TASK_FAMILIES]
        if bad or not self.data.task_families:
            raise ConfigError(
                f"data.task_families: unknown {bad}; valid choices are {sorted(TASK_FAMILIES)}."
            )
        return self

    def _validate_public(self) -> None:
        p = self.public
        for name in ("server_steps", "warm_start_steps"):
            steps = getattr(p, name)
            if steps and not p.path:
                raise _FieldError(
                    f"public.{name}",
                    f"public.{name}={steps} trains the server on public data, which needs "
                    "public.path (a local text file, folder or glob); set public.path or "
                    f"public.{name}=0.",
                )

    def _validate_personalization(self) -> None:
        # The personal part must name parameters the trainable has; what only the loaded model
        # knows (a pretrained model's layers) is checked when the algorithm first sees params.
        algorithm, mode = self.algorithm, self.trainable.mode
        if isinstance(algorithm, FedSALoRAConfig) and mode != "lora":
            raise ConfigError(
                f"algorithm.type=fedsa_lora keeps the LoRA B factors personal; it needs "
                f"trainable.mode=lora (got {mode})."
            )
        if isinstance(algorithm, FedSALoRAConfig | FedPerConfig) and self.privacy.audit_canaries:
            # Canaries are planted in the upload's shape (the shared part only) but scored
            # against the whole model's change, so their scores would mean nothing.
            raise _FieldError(
                "privacy.audit_canaries",
                f"privacy.audit_canaries needs the whole model uploaded; algorithm.type="
                f"{algorithm.name} keeps a part of it on the clients. Set privacy.audit_canaries "
                "to 0 or use ditto or fedavg.",
            )
        if isinstance(algorithm, FedPerConfig):
            if mode == "soft_prompt":
                raise ConfigError(
                    "algorithm.type=fedper makes the last layers personal, but "
                    "trainable.mode=soft_prompt has no per-layer parameters; use lora, prefix "
                    "or full."
                )
            layers = self.model.num_layers
            if self.pretrained.path is None and algorithm.personal_layers > layers:
                raise _FieldError(
                    "algorithm.personal_layers",
                    f"algorithm.personal_layers={algorithm.personal_layers} must be from 1 to "
                    f"model.num_layers={layers}.",
                )

    def _validate_contribution(self) -> None:
        # Per-client uploads and scores show exactly what the server must not learn there.
        if not self.contribution.enabled:
            return
        if self.privacy.level == "client":
            raise ConfigError(
                "contribution.enabled scores each client's own upload, which client-level DP "
                "(privacy.level=client) hides; turn one of them off."
            )
        if self.secure_aggregation.enabled:
            raise ConfigError(
                "contribution.enabled scores each client's own upload, but with "
                "secure_aggregation.enabled the server only learns their sum; turn one off."
            )

    def _validate_system(self) -> None:
        system, tiers = self.system, self.system.num_tiers
        fractions = system.tier_fractions
        if fractions and (min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6):
            raise _FieldError(
                "system.tier_fractions",
                f"system.tier_fractions={list(fractions)} must be shares >= 0 summing to 1.",
            )
        per_tier = {
            "tier_local_steps": system.tier_local_steps,
            "tier_step_time_s": system.tier_step_time_s,
            "tier_lora_ranks": system.tier_lora_ranks,
        }
        for name, values in per_tier.items():
            if values and len(values) != tiers:
                raise _FieldError(
                    f"system.{name}",
                    f"system.{name}={list(values)} gives {len(values)} values for {tiers} "
                    f"tier(s) (system.tier_fractions={list(fractions)}); give one per tier.",
                )
        steps = self.client.local_steps
        if any(not 1 <= k <= steps for k in system.tier_local_steps):
            raise _FieldError(
                "system.tier_local_steps",
                f"system.tier_local_steps={list(system.tier_local_steps)}: each must be from 1 to "
                f"client.local_steps={steps} (the compiled number of local steps).",
            )
        if any(t <= 0 for t in system.tier_step_time_s):
            raise _FieldError(
                "system.tier_step_time_s",
                f"system.tier_step_time_s={list(system.tier_step_time_s)}: each must be positive.",
            )
        if system.deadline_s is not None:
            if not system.tier_step_time_s:
                raise _FieldError(
                    "system.deadline_s",
                    "system.deadline_s needs system.tier_step_time_s (how long a local step "
                    "takes each tier) to know when clients stop.",
                )
            slowest = max(system.tier_step_time_s)
            if system.deadline_s < slowest:
                raise _FieldError(
                    "system.deadline_s",
                    f"system.deadline_s={system.deadline_s} is shorter than one local step of "
                    f"the slowest tier ({slowest} s), whose clients could never contribute; "
                    f"set it to at least {slowest}.",
                )
        ranks = system.tier_lora_ranks
        if ranks:
            top = self.trainable.lora_rank
            if self.trainable.mode != "lora":
                raise _FieldError(
                    "system.tier_lora_ranks",
                    "system.tier_lora_ranks gives clients LoRA ranks; it needs "
                    f"trainable.mode=lora (got {self.trainable.mode}).",
                )
            if any(not 1 <= r <= top for r in ranks):
                raise _FieldError(
                    "system.tier_lora_ranks",
                    f"system.tier_lora_ranks={list(ranks)}: each rank must be from 1 to "
                    f"trainable.lora_rank={top} (the maximum rank the round is compiled for).",
                )
            if not type(self.algorithm).rank_tiers:
                raise _FieldError(
                    "system.tier_lora_ranks",
                    f"system.tier_lora_ranks needs an algorithm that trains LoRA at a rank per "
                    f"client (hetlora, flexlora, flora, ffa_lora); algorithm.type="
                    f"{self.algorithm.name} would ignore the ranks.",
                )
            if isinstance(self.algorithm, FFALoRAConfig) and self.uploads_hidden:
                from fedjax_llm.algorithms.hetero_lora import holder_shares

                try:
                    holder_shares(top, ranks, system.tier_fractions)
                except ValueError as e:
                    raise _FieldError(
                        "system.tier_lora_ranks",
                        "with client-level DP or secure aggregation, ffa_lora divides each rank "
                        f"component by the expected share of clients holding it, but {e}",
                    ) from None
        s = self.sampling
        if s.availability_period and s.kind != "availability":
            raise _FieldError(
                "sampling.availability_period",
                "sampling.availability_period sets a day/night availability cycle; it needs "
                f"sampling.kind=availability (got {s.kind}).",
            )

    def _validate_sampling_and_aggregation(self) -> None:
        sampling, aggregation = self.sampling, self.aggregation
        chunk = self.run.clients_per_chunk
        if isinstance(chunk, str) and chunk != "auto":
            raise _FieldError(
                "run.clients_per_chunk",
                f"run.clients_per_chunk={chunk!r}; it must be auto, a positive integer or null.",
            )
        if not isinstance(chunk, str | None) and (
            isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0
        ):
            raise _FieldError(
                "run.clients_per_chunk",
                f"run.clients_per_chunk={chunk!r}; it must be auto, a positive integer or null.",
            )
        if self.run.client_data == "host" and self.run.engine == "sequential":
            raise ConfigError(
                "run.client_data=host needs run.engine=compiled (the sequential reference "
                "engine reads a device-resident population); use run.client_data=device."
            )
        if self.run.client_store_dir and self.run.client_data == "device":
            raise ConfigError(
                "run.client_store_dir keeps a host-resident client store on disk; it needs "
                "run.client_data=host or auto."
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
        compressors = [t for t in aggregation.transforms if t in COMPRESSION_TRANSFORMS]
        if len(compressors) > 1:
            raise ConfigError(
                f"aggregation.transforms names {len(compressors)} compressors {compressors}; "
                "an upload is compressed once: keep one."
            )
        self._validate_privacy()
        self._validate_byzantine()

    def _validate_privacy(self) -> None:
        p, kind = self.privacy, self.sampling.kind
        if p.level == "none":
            set_keys = [
                f"privacy.{name}"
                for name, unset in (
                    ("noise_multiplier", None),
                    ("target_epsilon", None),
                    ("max_epsilon", None),
                    ("adaptive_clipping", False),
                    ("audit_canaries", 0),
                )
                if getattr(p, name) != unset
            ]
            if set_keys:
                raise ConfigError(
                    f"{', '.join(set_keys)} only apply with privacy.level client or sample; "
                    "set privacy.level or remove them."
                )
        else:
            if p.noise_multiplier is None and p.target_epsilon is None:
                raise ConfigError(
                    f"privacy.level={p.level} needs privacy.noise_multiplier (> 0) or "
                    "privacy.target_epsilon (> 0, solves for the noise multiplier)."
                )
            if kind == "availability":
                raise ConfigError(
                    "privacy.level needs a sampling the accountant can model: "
                    "sampling.kind=availability draws clients by their availability, which no "
                    "accountant here covers. Use sampling.kind=poisson (or uniform with "
                    "privacy.accountant=rdp)."
                )
            if p.accountant == "pld" and kind == "uniform":
                raise ConfigError(
                    "privacy.accountant=pld models Poisson sampling, but sampling.kind=uniform "
                    "draws a fixed number of clients (accounted under replace-one with rdp). "
                    "Set sampling.kind=poisson or privacy.accountant=rdp."
                )
        if p.level == "client" and self.aggregation.aggregator != "mean":
            raise ConfigError(
                f"privacy.level=client adds noise calibrated to the sum of clipped updates; "
                f"aggregation.aggregator={self.aggregation.aggregator!r} has another "
                "sensitivity that the accountant cannot account for. Use aggregation.aggregator="
                "mean with client-level DP."
            )
        if p.audit_canaries and kind != "poisson":
            raise ConfigError(
                "privacy.audit_canaries: the one-run audit includes each canary independently "
                "with probability 1/2, which matches the accounting only under Poisson "
                f"sampling; set sampling.kind=poisson (not {kind})."
            )
        if (
            p.audit_holdout_clients
            and self.data.num_clients is not None
            and (p.audit_holdout_clients > self.data.num_clients // 2)
        ):
            raise ConfigError(
                f"privacy.audit_holdout_clients={p.audit_holdout_clients} must be at most half "
                f"of data.num_clients={self.data.num_clients}."
            )
        if p.level != "client" and (p.adaptive_clipping or p.audit_canaries):
            raise ConfigError(
                "privacy.adaptive_clipping and privacy.audit_canaries apply to client-level DP "
                "only; set privacy.level=client or turn them off."
            )
        if self.secure_aggregation.enabled and self.aggregation.aggregator != "mean":
            raise ConfigError(
                "secure_aggregation.enabled: the server only learns the sum of the uploads, so "
                f"aggregation.aggregator={self.aggregation.aggregator!r} (which needs each "
                "upload) cannot run; use aggregation.aggregator=mean."
            )

    def _validate_distributed(self) -> None:
        d = self.distributed
        address = d.coordinator_address
        if address is None:
            given = [
                f"distributed.{name}"
                for name in ("num_processes", "process_id", "local_device_ids")
                if getattr(d, name) is not None
            ]
            if given:
                raise ConfigError(
                    f"{', '.join(given)} describe a multi-process run: set "
                    "distributed.coordinator_address too (host:port of process 0, or auto), or "
                    "remove them."
                )
        elif address != "auto":
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(
                    f"distributed.coordinator_address={address!r} must be host:port (e.g. "
                    "10.0.0.1:1234, process 0's address and a free port), auto (JAX detects "
                    "the cluster) or null (one process)."
                )
        if d.num_processes is not None and d.process_id is not None:
            if d.process_id >= d.num_processes:
                raise ConfigError(
                    f"distributed.process_id={d.process_id} is out of range for "
                    f"distributed.num_processes={d.num_processes}: ids run from 0 to "
                    f"{d.num_processes - 1}."
                )
        if d.local_device_ids is not None:
            ids = d.local_device_ids.split(",")
            if not all(i.strip().isdigit() for i in ids):
                raise ConfigError(
                    f"distributed.local_device_ids={d.local_device_ids!r} must be "
                    "comma-separated device ids, e.g. 0,1."
                )

    def _validate_byzantine(self) -> None:
        b, a = self.byzantine, self.aggregation
        if (b.fraction > 0) != (b.attack != "none"):
            raise ConfigError(
                f"byzantine.fraction={b.fraction} with byzantine.attack={b.attack!r}: set both "
                "(a fraction in (0, 1) and an attack) or neither."
            )
        n = self.run.num_clients_per_round
        f = a.byzantine_bound if a.byzantine_bound is not None else math.ceil(b.fraction * n)
        needs = {
            "krum": (n > 2 * f + 2, "n > 2f + 2 (Krum's condition)"),
            "multi_krum": (n > 2 * f + 2, "n > 2f + 2 (Krum's condition)"),
            "median": (2 * f < n, "f < n / 2"),
            "geometric_median": (2 * f < n, "f < n / 2"),
            "trimmed_mean": (
                math.floor(a.trim_fraction * n) >= f,
                "floor(aggregation.trim_fraction x n) >= f trimmed on each side",
            ),
        }
        if a.aggregator in needs and f > 0:
            ok, condition = needs[a.aggregator]
            if not ok:
                raise ConfigError(
                    f"aggregation.aggregator={a.aggregator} cannot tolerate f={f} malicious of "
                    f"n={n} clients per round (byzantine.fraction={b.fraction}, "
                    f"aggregation.byzantine_bound={a.byzantine_bound}): it needs {condition}. "
                    "Sample more clients per round or lower the fraction."
                )
        if b.attack in DATA_ATTACKS and self.data.num_clients is None:
            raise ConfigError(
                f"byzantine.attack={b.attack} poisons a fraction of the clients, chosen before "
                "the data are partitioned; set data.num_clients (natural partitions with "
                "data.num_clients=null are counted only while loading)."
            )
        if b.attack == "backdoor" and not b.target.strip():
            raise ConfigError("byzantine.target must be a non-empty response for a backdoor.")
        if a.multi_krum_selected is not None and a.multi_krum_selected > n - f:
            raise ConfigError(
                f"aggregation.multi_krum_selected={a.multi_krum_selected} must be at most "
                f"n - f = {n - f} (run.num_clients_per_round minus the Byzantine bound)."
            )


def get_field(config: Any, dotted_key: str) -> Any:
    """Returns the value at a dotted key such as ``client.lr``."""
    value = config
    for part in dotted_key.split("."):
        value = getattr(value, part)
    return value


def load_config(
    path: str | os.PathLike | None = None, overrides: Sequence[str] = ()
) -> ExperimentConfig:
    """Loads a YAML config with dotted overrides and validates it.

    The file holds sections of keys, e.g. ``client: {lr: 0.1}``; every key left out keeps its
    default, so an empty (or comment-only) file, or a section left empty (``client:``), means
    the defaults. The overrides replace values of the file. Before anything is built, the keys
    are checked against the config (an unknown key is named with its file line and the valid
    keys of its section), draccus decodes the values, and `ExperimentConfig.validate` checks
    every value's range and the settings that must agree.

    Args:
      path: YAML file; None starts from the defaults.
      overrides: command-line style overrides, ``["--client.lr", "3e-4"]`` or
        ``["--client.lr=3e-4"]``: one YAML value per key (a list is written ``[q,v]``, none
        ``null``).

    Returns:
      The validated `ExperimentConfig`.

    Raises:
      ConfigError: a file that is a directory, not UTF-8, not valid YAML (with its line and
        column) or not a mapping of sections; an unknown key, a bad value or inconsistent
        settings, named in the message (with the file line where the key is in the file).
      FileNotFoundError: if ``path`` does not exist.
    """
    tree: dict[Any, Any] = {}
    sources = _Sources(None if path is None else os.fspath(path))
    if sources.path is not None:
        tree = _read_yaml(sources)
    for key, value, text in _parse_overrides(overrides):
        _set_dotted(tree, key.split("."), value)
        sources.overrides[key] = text
    _check_tree(tree, ExperimentConfig, "", sources)
    try:
        config = draccus.decode(ExperimentConfig, tree)
    except draccus.utils.DecodingError as e:
        key = ".".join(e.key_path)
        raise ConfigError(f"{sources.where(key)}{key}: {e.message}") from None
    except Exception as e:  # noqa: BLE001 - draccus raises assorted types for bad input
        raise ConfigError(f"{sources.where('')}invalid configuration: {e}") from None
    try:
        return config.validate()
    except _FieldError as e:
        where = sources.where(e.key)
        raise ConfigError(f"{where}{e}" if where != "command line: " else str(e)) from None


class _Sources:
    """Where each key of a config tree was set: a file line or the command line."""

    def __init__(self, path: str | None):
        self.path = path
        self.lines: dict[str, str] = {}  # dotted key -> "file:line:column"
        self.texts: dict[str, str] = {}  # dotted key -> its scalar value as written in the file
        self.overrides: dict[str, str] = {}  # dotted key -> the override's text

    def where(self, key: str) -> str:
        """Returns ``"file:line:column: "``, ``"command line: "`` or the file's name for a key."""
        parts = key.split(".") if key else []
        for n in range(len(parts), 0, -1):
            prefix = ".".join(parts[:n])
            if prefix in self.overrides:
                return "command line: "
            if prefix in self.lines:
                return f"{self.lines[prefix]}: "
        return f"{self.path}: " if self.path is not None else ""


def _yaml_loader() -> type:
    # The loader draccus itself reads config files with (YAML plus its ``!include`` tag).
    try:
        from draccus.parsers.yaml_loader import FullLoaderWithInclusion
    except ImportError:  # a draccus without it: plain safe YAML
        return yaml.SafeLoader
    return FullLoaderWithInclusion


def _read_yaml(sources: _Sources) -> dict[Any, Any]:
    """Reads a YAML config file into a dict and records each key's line in ``sources``."""
    path = sources.path
    if os.path.isdir(path):
        raise ConfigError(
            f"{path} is a directory; pass a YAML config file, e.g. configs/default.yaml."
        )
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - raw.rfind(b"\n", 0, e.start)
        raise ConfigError(
            f"{path}:{line}:{column}: not UTF-8 text (byte 0x{raw[e.start]:02x}); save the "
            "file as UTF-8."
        ) from None
    loader = _yaml_loader()
    try:
        data = yaml.load(_named_stream(text, path), loader)
        root = yaml.compose(_named_stream(text, path), loader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{mark.name}:{mark.line + 1}:{mark.column + 1}" if mark else path
        context = ""
        if e.context and e.context_mark and e.problem_mark:
            context = f" ({e.context}, line {e.context_mark.line + 1})"
        raise ConfigError(f"{where}: invalid YAML: {e.problem or e.context}{context}.") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    except OSError as e:  # an !include of a missing file
        raise ConfigError(f"{path}: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level of a config must be a mapping of sections, e.g. "
            f"'run: {{num_rounds: 10}}'; found a {type(data).__name__}."
        )
    _record_lines(root, "", path, sources)
    return data


def _named_stream(text: str, path: str) -> io.StringIO:
    stream = io.StringIO(text)
    stream.name = path  # the loader resolves !include relative to it and names it in errors
    return stream


def _record_lines(node: Any, prefix: str, path: str, sources: _Sources) -> None:
    """Records the line (and scalar text) of every key of a composed YAML mapping; rejects a key
    set twice."""
    if not isinstance(node, yaml.MappingNode):
        return
    seen: dict[str, int] = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
            continue
        mark = key_node.start_mark
        key = prefix + key_node.value
        if key_node.value in seen:
            raise ConfigError(
                f"{path}:{mark.line + 1}:{mark.column + 1}: {key} is set twice (also on line "
                f"{seen[key_node.value]}); keep one."
            )
        seen[key_node.value] = mark.line + 1
        sources.lines[key] = f"{path}:{mark.line + 1}:{mark.column + 1}"
        if isinstance(value_node, yaml.ScalarNode):
            sources.texts[key] = value_node.value
        _record_lines(value_node, key + ".", path, sources)


def _parse_overrides(overrides: Sequence[str]) -> list[tuple[str, Any, str]]:
    """Splits ``--key value`` / ``--key=value`` overrides into (key, YAML value, text)."""
    tokens, pairs, i = list(overrides), [], 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or len(token) == 2:
            after = f" after {' '.join(tokens[max(i - 2, 0) : i])}" if i else ""
            raise ConfigError(
                f"command line: unexpected {token!r}{after}; overrides are --section.key VALUE "
                "pairs with one value each (write a list as [a,b])."
            )
        key, has_value, text = token[2:].partition("=")
        if not has_value:
            if i + 1 == len(tokens) or tokens[i + 1].startswith("--"):
                raise ConfigError(
                    f"command line: --{key} needs a value, e.g. --{key} VALUE (null for none)."
                )
            text = tokens[i + 1]
        i += 1 if has_value else 2
        try:
            value = yaml.safe_load(text) if text else text
        except yaml.YAMLError:  # not YAML (e.g. "a: b: c"): the plain text
            value = text
        pairs.append((key, value, text))
    return pairs


def _set_dotted(tree: dict[Any, Any], parts: list[str], value: Any) -> None:
    """Sets ``tree[a][b]... = value``, merging a mapping value into what is there."""
    for part in parts[:-1]:
        if not isinstance(tree.get(part), dict):
            tree[part] = {}
        tree = tree[part]
    if isinstance(value, dict) and isinstance(tree.get(parts[-1]), dict):
        for key, item in value.items():
            _set_dotted(tree[parts[-1]], [key], item)
    else:
        tree[parts[-1]] = value


def _check_tree(tree: dict[Any, Any], config_class: type, prefix: str, sources: _Sources) -> None:
    """Checks the keys of a raw config tree, and the values that decoding would hide.

    Unknown keys (with the valid keys of their section), sections that are not mappings,
    ``algorithm.type``, choices of ``Literal`` fields, true/false for numbers, a string for a
    list, and null for a required value fail here, with the file line of the key. An empty
    section means its defaults; a number given for a text field (``output_dir: 2024``) is
    that text.
    """
    fields = field_types(config_class)
    section = prefix[:-1] or "the top level"
    for key in list(tree):
        dotted = f"{prefix}{key}"
        if key == "type" and issubclass(config_class, draccus.ChoiceRegistry):
            continue
        if key not in fields:
            valid = list(fields)
            if issubclass(config_class, draccus.ChoiceRegistry):
                valid = ["type", *valid]
                section += f" (type {config_class.get_choice_name(config_class)})"
            close = difflib.get_close_matches(str(key), valid, n=1)
            did_you_mean = f" Did you mean {prefix}{close[0]}?" if close else ""
            raise ConfigError(
                f"{sources.where(dotted)}unknown key {dotted}.{did_you_mean} Valid keys of "
                f"{section}: {', '.join(valid)}."
            )
        field, value = fields[key], tree[key]
        if field.is_section:
            if value is None:
                tree[key] = value = {}
            if not isinstance(value, dict):
                raise ConfigError(
                    f"{sources.where(dotted)}{dotted} is a section: give its keys, e.g. "
                    f"'{dotted}: {{key: value}}' or --{dotted}.key value; found {value!r}."
                )
            _check_section(tree, key, field.base, dotted, sources)
        else:
            valid = field_range(config_class, key) if field.is_number else None
            tree[key] = _check_raw_value(dotted, value, field, valid, sources)


def _check_section(
    tree: dict[Any, Any], key: str, section_class: type, dotted: str, sources: _Sources
) -> None:
    value = tree[key]
    if not issubclass(section_class, draccus.ChoiceRegistry):
        _check_tree(value, section_class, dotted + ".", sources)
        return
    # A choice section (algorithm): its keys are those of the class its ``type`` names.
    choices = section_class.get_known_choices()
    if "type" not in value:
        if value:
            raise ConfigError(
                f"{sources.where(dotted)}{dotted} settings need the algorithm's type: set "
                f"{dotted}.type (one of {list(choices)}) with them, e.g. "
                f"--{dotted}.type fedprox --{dotted}.mu 0.1."
            )
        del tree[key]  # an empty section: the default
        return
    if not isinstance(value["type"], str) or value["type"] not in choices:
        raise ConfigError(
            f"{sources.where(dotted + '.type')}{dotted}.type={value['type']!r}; valid choices: "
            f"{', '.join(choices)} (custom: fedjax_llm.register_algorithm)."
        )
    _check_tree(value, choices[value["type"]], dotted + ".", sources)


def _check_raw_value(
    key: str, value: Any, field: FieldType, valid: Range | None, sources: _Sources
) -> Any:
    """Returns a raw (YAML) value to decode, or raises for one decoding would silently change."""
    if field.base is None:
        return value
    where = sources.where(key)
    if value is None:
        if not field.optional:
            raise ConfigError(
                f"{where}{key}=null is not allowed; it must be {_wanted(field, valid)}."
            )
        return value
    if field.base is Literal and value not in field.choices:
        choices = ", ".join(str(c) for c in field.choices)
        null = ", or null" if field.optional else ""
        raise ConfigError(f"{where}{key}={value!r}; valid choices: {choices}{null}.")
    if field.is_number and isinstance(value, bool):
        raise ConfigError(f"{where}{key}={str(value).lower()}; it must be {_wanted(field, valid)}.")
    if field.base is tuple and not isinstance(value, list | tuple):
        raise ConfigError(f"{where}{key}={value!r} must be a list, e.g. [{value}].")
    if field.base is str and not isinstance(value, str):
        if isinstance(value, bool | list | dict):
            raise ConfigError(
                f"{where}{key}={value!r} is a {type(value).__name__}; it must be a string "
                "(quote it in YAML)."
            )
        # output_dir: 2024 (or 2024-01-31, a date to YAML) means the folder of that name: the
        # text as written, not the number.
        written = sources.overrides if where == "command line: " else sources.texts
        return written.get(key, str(value))
    return value


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
