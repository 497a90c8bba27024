"""Benchmark harness: the compiled round against the library's sequential reference round and
against the same round written as a PyTorch loop over clients.

First the device's matmul peak is measured (a jitted square matrix product in the model's
compute dtype, median of timed runs). Then for every model and clients-per-round C it times
these variants of the same round, the first two built exactly as
`fedjax_llm.simulation.Simulation` builds its engines:

- **vmapped**: `fedjax_llm.round.make_round_fn`, jitted with the `RoundState` donated, once per
  chunk size (default one chunk of C). Its compile time is the ahead-of-time
  ``lower(...).compile()`` of the whole round, as `Simulation.compile` measures it.
- **sequential**: `fedjax_llm.round.make_sequential_round`, the library's reference loop of one
  jitted client update per client followed by the jitted tail of the round. Its pieces compile on
  first use, so its compile time is the wall time of its first round minus its median
  steady-state round time (see `Variant.compile_time`).
- **torch loop** (LoRA only, when PyTorch is installed): `fedjax_llm.torch_reference`, the round
  as PyTorch federated fine-tuning frameworks run it: one transformers `LlamaForCausalLM` with
  LoRA built once, then per client: load the global LoRA weights, a fresh SGD optimizer, K local
  steps, add the weighted delta. Same weights, batches, optimizer, loss and FedAvg weighting, so
  the same new global params. It runs with as many intra-op threads as JAX's CPU client uses
  (every usable core), on the GPU when JAX's backend is a GPU and PyTorch sees CUDA, and under
  bfloat16 autocast when the benchmark's dtype is bfloat16. Its "compile" time is its first
  round minus its median round (first-use allocations and kernel selection).

Before timing, every variant runs the same first round from the same state and must give the
same new global params as the reference (`compare_params`; the sequential round, or the first
vmapped one without it). The variants then take turns round by round, so a change of load on a
shared machine hits them alike. Each row reports the median wall time of the timed rounds after
compilation and warm-up, the compile time, client updates/s, tokens/s, model FLOP/s
(`fedjax_llm.models.flops`), MFU against the measured peak (measured again at the end to expose
an unsteady device) and ``vs_torch``, the torch loop's round time over the row's. The speed
targets are checked by `check_targets`.

Data are synthetic: random token blocks with all-ones loss masks, ``POPULATION_PER_SAMPLED * C``
clients of ``EXAMPLES_PER_CLIENT`` examples each. The algorithm is FedAvg with a client SGD and
server ``sgd(1.0)``, the objective `fedjax_llm.objectives.next_token_loss`, the aggregation the
default pipeline (weighted mean).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_llm.algorithms import Algorithm, HyperParams, make_fedavg
from fedjax_llm.models.flops import train_flops_per_token
from fedjax_llm.models.llama import LlamaConfig, count_params, init_params
from fedjax_llm.models.matmul import matmul
from fedjax_llm.models.trainable import TRAINABLE_MODES, make_trainable
from fedjax_llm.objectives import Objective, next_token_loss
from fedjax_llm.pipeline import default_pipeline, merge_hyperparams
from fedjax_llm.round import (
    ClientData,
    LocalSchedule,
    RoundOutput,
    RoundState,
    init_round_state,
    make_round_fn,
    make_sequential_round,
    round_hparams,
)
from fedjax_llm.sampling import Cohort, cohort_slots, make_cohort, sample_clients
from kernels.pytree import PyTree

SCHEMA_VERSION = 2
"""Version of the results' JSON layout (`run_benchmark`); bumped whenever the layout changes."""
EXAMPLES_PER_CLIENT = 32
POPULATION_PER_SAMPLED = 4
"""The population is a few times the sample, so rounds draw different clients."""
PAD_ID = 0
"""The byte tokenizer's pad; random tokens are drawn from ``FIRST_REAL_TOKEN`` up."""
FIRST_REAL_TOKEN = 3
CLIENT_LR = 0.05
# Equality of the two variants: float32 with different reduction orders (batched vs single
# matmuls) over a few SGD steps; far above rounding noise, far below any real discrepancy.
CHECK_RTOL, CHECK_ATOL = 1e-5, 1e-6
# In bfloat16 every product is rounded to 8 significant bits, so two ways of computing the same
# round (batched vs single matmuls, or PyTorch's autocast) differ by about 1% of the round's
# largest parameter change (0.8-1.5% measured on lora-4m, on a CPU and on a GPU): a bfloat16
# round agrees when every difference is within this share of that change.
BF16_CHECK_UPDATE_SHARE = 0.03
PEAK_DRIFT_WARNING = 0.10
"""Relative change of the matmul peak during a run above which its results are flagged."""
SETTLE_S = 0.1
"""Untimed pause between rounds of different variants (see `time_variants`)."""
BUSY_LOAD_PER_CORE = 0.5
"""1-minute load average per usable core at the start of a CPU run above which it is flagged."""
LORA_TARGETS = ("q", "v")
LORA_ALPHA = 16.0
"""LoRA alpha; the update is scaled by ``LORA_ALPHA / lora_rank``."""
TORCH_VARIANT = "torch loop"
"""Name of the PyTorch variant in the rows."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A benchmarked model and its local-training shape.

    Attributes:
      name: the name used on the command line and in results.
      config: the architecture.
      seq_len: tokens per example T.
      local_steps: local steps K per client.
      batch_size: examples per local step B.
      clients: default clients-per-round values C.
    """

    name: str
    config: LlamaConfig
    seq_len: int
    local_steps: int
    batch_size: int
    clients: tuple[int, ...]


MODELS: dict[str, ModelSpec] = {
    # ~3.95M params: 4 layers of 0.73M plus a tied 4096 x 256 embedding.
    "lora-4m": ModelSpec(
        "lora-4m",
        LlamaConfig(
            vocab_size=4096,
            hidden_size=256,
            intermediate_size=688,
            num_layers=4,
            num_heads=8,
            num_kv_heads=4,
            max_seq_len=64,
        ),
        seq_len=64,
        local_steps=4,
        batch_size=4,
        clients=(16, 64),
    ),
    # ~109k params: the library's default tiny Llama with the byte vocabulary.
    "tiny": ModelSpec(
        "tiny",
        LlamaConfig(
            vocab_size=259,
            hidden_size=64,
            intermediate_size=176,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            max_seq_len=32,
        ),
        seq_len=32,
        local_steps=2,
        batch_size=2,
        clients=(8, 32, 128, 256),
    ),
    # SmolLM2-135M's architecture (random weights: the speed does not depend on them), for
    # accelerators: bfloat16 with --dtype bfloat16, 2 local steps of 4 x 256 tokens.
    "smollm2-135m": ModelSpec(
        "smollm2-135m",
        LlamaConfig(
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_layers=30,
            num_heads=9,
            num_kv_heads=3,
            max_seq_len=256,
            rope_theta=100000.0,
        ),
        seq_len=256,
        local_steps=2,
        batch_size=4,
        clients=(16, 64, 256),
    ),
}
"""The benchmarked models by name."""
QUICK_CLIENTS = (2, 4)
"""Clients-per-round values of a quick (smoke) run."""


@dataclasses.dataclass(frozen=True)
class BenchmarkSettings:
    """What one benchmark run measures.

    Attributes:
      models: names of `MODELS` to run.
      clients: clients-per-round values C (None: each model's own list, `QUICK_CLIENTS` when
        ``quick``).
      chunks: chunk sizes of the vmapped round, swept (None: one chunk of C); those that do not
        divide C are skipped.
      mode: what clients train (one of `TRAINABLE_MODES`; LoRA targets q and v).
      lora_rank: LoRA rank.
      num_virtual_tokens: soft prompt / prefix length.
      dtype: compute dtype of the model and of the peak matmul ('float32' or 'bfloat16').
      rounds: timed rounds per row (the median is reported).
      warmup: untimed rounds after the (untimed) check round.
      peak_size: side of the peak matmul (None: by backend, see `peak_matmul_size`).
      peak_repeats: timed products of the peak measurement.
      sequential: run the sequential variant (and so the equality check and the ratio).
      torch: run the PyTorch loop (`fedjax_llm.torch_reference`; LoRA mode only) when PyTorch
        and transformers can be imported (otherwise it is skipped with a message).
      seed: seed of the init, the data and the client sampling.
      quick: a smoke run (smaller defaults for ``clients`` and ``peak_size``).
      seq_len: tokens per example T of every model (None: each model's own; see
        `with_seq_len`).

    Raises:
      ValueError: for an unknown model or mode, or a non-positive count.
    """

    models: tuple[str, ...] = ("lora-4m", "tiny")
    clients: tuple[int, ...] | None = None
    chunks: tuple[int, ...] | None = None
    mode: str = "lora"
    lora_rank: int = 8
    num_virtual_tokens: int = 8
    dtype: str = "float32"
    rounds: int = 5
    warmup: int = 1
    peak_size: int | None = None
    peak_repeats: int = 10
    sequential: bool = True
    torch: bool = True
    seed: int = 0
    quick: bool = False
    seq_len: int | None = None

    def __post_init__(self):
        unknown = [m for m in self.models if m not in MODELS]
        if unknown:
            raise ValueError(f"unknown benchmark model(s) {unknown}; choose from {sorted(MODELS)}.")
        if self.mode not in TRAINABLE_MODES:
            raise ValueError(
                f"unknown trainable mode {self.mode!r}; choose from {TRAINABLE_MODES}."
            )
        if self.rounds < 1 or self.warmup < 0 or self.peak_repeats < 1:
            raise ValueError("rounds and peak_repeats must be >= 1 and warmup >= 0.")
        if self.clients is not None and min(self.clients, default=1) < 1:
            raise ValueError(f"clients per round must be positive, got {self.clients}.")
        if self.seq_len is not None and self.seq_len < 2:
            raise ValueError(
                f"seq_len must be at least 2 (one next-token target), got {self.seq_len}."
            )


def with_seq_len(spec: ModelSpec, seq_len: int) -> ModelSpec:
    """``spec`` with ``seq_len`` tokens per example, its position limit raised to fit."""
    config = dataclasses.replace(spec.config, max_seq_len=max(spec.config.max_seq_len, seq_len))
    return dataclasses.replace(spec, config=config, seq_len=seq_len)


# ------------------------------------------------------------------------------ device + peak
def usable_cores() -> int:
    """CPU cores this process may run on (JAX's CPU client uses all of them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def describe_device() -> dict:
    """What the numbers were measured on."""
    device = jax.devices()[0]
    cores_usable = usable_cores()
    return {
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "num_devices": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "cpu_usable": cores_usable,
        "processor": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "default_matmul_precision": jax.config.jax_default_matmul_precision,
    }


def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages (a busy machine makes every number slower)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def peak_matmul_size(backend: str, quick: bool) -> int:
    """Side of the square matrices of the peak measurement.

    Large enough to reach the device's matmul throughput, small enough to time quickly: a CPU
    saturates around 2048, an accelerator needs much more work per call to hide dispatch.
    """
    if backend == "cpu":
        return 1024 if quick else 2048
    return 4096 if quick else 8192


def measure_matmul_peak(size: int, dtype: str, repeats: int, warmup: int = 2) -> dict:
    """Measures the matmul throughput of the default device.

    Args:
      size: side N of the two N x N matrices.
      dtype: element type ('float32' or 'bfloat16'), the model's compute dtype.
      repeats: timed runs; the median is the peak.
      warmup: untimed runs after compilation.

    Returns:
      ``size``, ``dtype``, ``repeats``, ``flops`` (one product, 2 N^3), ``median_s``,
      ``gflops`` (from the median, the peak used for MFU) and ``best_gflops``.
    """
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (size, size), dtype)
    b = jax.random.normal(key_b, (size, size), dtype)
    # The product as the model writes it (for bfloat16 on CPUs, a float32-result product
    # rounded once: `fedjax_llm.models.matmul`), so that MFU compares like with like.
    product = jax.jit(matmul).lower(a, b).compile()
    for _ in range(warmup):
        product(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        product(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    flops = 2.0 * size**3
    median = statistics.median(times)
    return {
        "size": size,
        "dtype": dtype,
        "repeats": repeats,
        "flops": flops,
        "median_s": median,
        "gflops": flops / median / 1e9,
        "best_gflops": flops / min(times) / 1e9,
    }


# ------------------------------------------------------------------------------ setup
class Setup(NamedTuple):
    """Everything one (model, C) benchmark needs; every variant starts from it.

    Attributes:
      spec: the model.
      config: its architecture in the benchmark's dtype.
      mode: the trainable mode.
      algorithm: FedAvg (client SGD, server ``sgd(1.0)``).
      objective: next-token loss.
      frozen: the frozen base.
      state: the `RoundState` before the first round (variants start from copies).
      data: the synthetic `ClientData` of the whole population.
      schedule: the local-training shape.
      num_clients_total: population size.
      base_params: parameters of the base model.
      trainable_params: parameters clients train.
      flops_per_token: model FLOPs of one training step per token.
      lora_rank: LoRA rank ('lora' mode).
      lora_scaling: LoRA scaling ``LORA_ALPHA / lora_rank`` ('lora' mode).
    """

    spec: ModelSpec
    config: LlamaConfig
    mode: str
    algorithm: Algorithm
    objective: Objective
    frozen: PyTree
    state: RoundState
    data: ClientData
    schedule: LocalSchedule
    num_clients_total: int
    base_params: int
    trainable_params: int
    flops_per_token: float
    lora_rank: int
    lora_scaling: float


def synthetic_client_data(
    seed: int, num_clients: int, examples_per_client: int, seq_len: int, vocab_size: int
) -> ClientData:
    """Random token blocks with all-ones loss masks, ``examples_per_client`` per client.

    Args:
      seed: numpy seed.
      num_clients: clients M.
      examples_per_client: examples per client.
      seq_len: tokens per example T.
      vocab_size: ids are drawn from ``[FIRST_REAL_TOKEN, vocab_size)`` (no pad, bos or eos).

    Returns:
      The `ClientData`, on the default device.
    """
    rng = np.random.default_rng(seed)
    num_examples = num_clients * examples_per_client
    tokens = rng.integers(FIRST_REAL_TOKEN, vocab_size, (num_examples, seq_len), dtype=np.int32)
    return ClientData(
        examples={
            "tokens": jnp.asarray(tokens),
            "loss_mask": jnp.ones((num_examples, seq_len), jnp.float32),
        },
        client_start=jnp.arange(num_clients, dtype=jnp.int32) * examples_per_client,
        client_count=jnp.full((num_clients,), examples_per_client, jnp.int32),
    )


def build_setup(
    spec: ModelSpec,
    num_clients_per_round: int,
    mode: str,
    lora_rank: int,
    num_virtual_tokens: int,
    dtype: str,
    seed: int,
) -> Setup:
    """Builds the model, FedAvg, the round state and synthetic data for one (model, C).

    Args:
      spec: the model.
      num_clients_per_round: C; the population is ``POPULATION_PER_SAMPLED * C``.
      mode: trainable mode (one of TRAINABLE_MODES).
      lora_rank: LoRA rank ('lora'; targets q and v).
      num_virtual_tokens: soft prompt / prefix length ('soft_prompt' / 'prefix').
      dtype: compute dtype of the model.
      seed: seed of the init and the data.

    Returns:
      The `Setup`.
    """
    config = dataclasses.replace(spec.config, dtype=dtype)
    trainable = make_trainable(
        config,
        mode,
        lora_rank=lora_rank,
        lora_alpha=LORA_ALPHA,
        lora_targets=LORA_TARGETS,
        num_virtual_tokens=num_virtual_tokens,
    )
    init_key, trainable_key = jax.random.split(jax.random.key(seed))
    base = init_params(config, init_key)
    params = trainable.init(trainable_key, base)
    algorithm = make_fedavg(
        optax.inject_hyperparams(optax.sgd)(learning_rate=CLIENT_LR), optax.sgd(1.0)
    )
    num_total = POPULATION_PER_SAMPLED * num_clients_per_round
    schedule = LocalSchedule(
        local_steps=spec.local_steps,
        batch_size=spec.batch_size,
        max_client_examples=EXAMPLES_PER_CLIENT,
    )
    virtual = num_virtual_tokens if mode in ("soft_prompt", "prefix") else 0
    frozen = trainable.frozen(base)
    return Setup(
        spec=spec,
        config=config,
        mode=mode,
        algorithm=algorithm,
        objective=next_token_loss(trainable.apply, PAD_ID),
        frozen=frozen,
        state=init_round_state(algorithm, params, num_total, frozen=frozen),
        data=synthetic_client_data(
            seed, num_total, EXAMPLES_PER_CLIENT, spec.seq_len, config.vocab_size
        ),
        schedule=schedule,
        num_clients_total=num_total,
        base_params=count_params(base),
        trainable_params=count_params(params),
        flops_per_token=train_flops_per_token(
            config, spec.seq_len, mode, lora_rank, LORA_TARGETS, virtual
        ),
        lora_rank=lora_rank,
        lora_scaling=LORA_ALPHA / lora_rank,
    )


def tokens_per_round(setup: Setup, num_clients: int) -> int:
    """Tokens every round trains on: C * K * B * T (all clients use their full budget)."""
    spec = setup.spec
    return num_clients * spec.local_steps * spec.batch_size * spec.seq_len


def copy_tree(tree: PyTree) -> PyTree:
    """Fresh buffers, so a donating call cannot invalidate the original."""
    return jax.tree.map(jnp.copy, tree)


class RoundArgs(NamedTuple):
    """The per-round inputs of both variants, built before any timing.

    Attributes:
      cohort: the sampled clients as a `Cohort` of device arrays (C slots, no padding).
      round_key: the round's key.
      hparams: the round's `HyperParams`.
    """

    cohort: Cohort
    round_key: jax.Array
    hparams: HyperParams


def make_round_args(setup: Setup, num_clients: int, num_rounds: int, seed: int) -> list[RoundArgs]:
    """Per-round arguments shared by every variant (identical clients, keys and hparams)."""
    root = jax.random.key(seed + 1)
    values = merge_hyperparams(setup.algorithm.hyperparams, default_pipeline().hyperparams)
    args = []
    for r in range(num_rounds):
        ids = sample_clients(seed, r, setup.num_clients_total, num_clients)
        args.append(
            RoundArgs(
                cohort=jax.tree.map(jnp.asarray, make_cohort(ids, num_clients)),
                round_key=jax.random.fold_in(root, r),
                hparams=round_hparams(CLIENT_LR, values=values),
            )
        )
    return args


# ------------------------------------------------------------------------------ variants
@dataclasses.dataclass
class Variant:
    """One way of running the round, with its own copy of the state.

    Attributes:
      name: 'vmapped', 'sequential' or `TORCH_VARIANT`.
      chunk: clients per chunk of the vmapped round (None for the others).
      run: ``(state, RoundArgs) -> (state, output)``, one round; ``output`` has a
        ``train_loss``. It returns once the round's work is done or queued on the device (the
        result is waited for with `jax.block_until_ready`).
      compile_s: trace + lower + XLA compile time when compiled ahead of time (None when the
        variant compiles on first use; see `compile_time`).
      init: ``setup -> state``, the variant's own state before the first round (None: a copy
        of ``setup.state``).
      params_of: ``state -> new global params on the host`` in the library's layout (None: the
        algorithm's server params of a `RoundState`).
      state: the variant's current state (a `RoundState` unless ``init`` says otherwise).
      first_round_s: wall time of the check round (the variant's first call).
      params: new global params of the check round, on the host.
      train_loss: training loss of the check round.
      check: agreement of the check round with the reference variant's (the others).
      round_s: wall times of the timed rounds.
    """

    name: str
    chunk: int | None
    run: Callable[[Any, RoundArgs], tuple[Any, Any]]
    compile_s: float | None = None
    init: Callable[[Setup], Any] | None = None
    params_of: Callable[[Any], PyTree] | None = None
    state: Any = None
    first_round_s: float = float("nan")
    params: PyTree = None
    train_loss: float = float("nan")
    check: dict | None = None
    round_s: list[float] = dataclasses.field(default_factory=list)

    def start(self, setup: Setup, args: RoundArgs) -> None:
        """Runs (and times) the check round from a copy of the setup's initial state."""
        # A fresh copy: the vmapped round donates its state, and every variant must start alike.
        state = copy_tree(setup.state) if self.init is None else self.init(setup)
        t0 = time.perf_counter()
        state, out = self.run(state, args)
        jax.block_until_ready((state, out))
        self.first_round_s = time.perf_counter() - t0
        self.state = state
        if self.params_of is None:
            self.params = jax.device_get(setup.algorithm.server_params(state.server))
        else:
            self.params = self.params_of(state)
        self.train_loss = float(out.train_loss)

    def advance(self, args: RoundArgs) -> float:
        """Runs one round to completion; returns its wall time in seconds."""
        t0 = time.perf_counter()
        state, out = self.run(self.state, args)
        jax.block_until_ready((state, out))
        self.state = state
        return time.perf_counter() - t0

    def compile_time(self) -> float:
        """The variant's compile time in seconds.

        For a variant compiled ahead of time, the measured trace + lower + XLA compile time.
        For one that compiles on first use (the sequential round: its client update, the
        aggregator's start and accumulate and the round's tail are each jitted separately and
        compile on their first call, inside the check round), the wall time of its first round
        minus its median timed round: the one-time cost of tracing and compiling, estimated.
        It carries the noise of two wall times, so it is only meaningful when compilation
        dominates a round (it does at the benchmarked sizes).
        """
        if self.compile_s is not None:
            return self.compile_s
        return self.first_round_s - statistics.median(self.round_s)


def setup_round_fn(setup: Setup, chunk: int) -> Callable:
    """The library's round (`make_round_fn`) for a setup, in chunks of ``chunk`` clients."""
    return make_round_fn(
        setup.algorithm,
        setup.objective,
        setup.schedule,
        num_clients_total=setup.num_clients_total,
        clients_per_chunk=chunk,
    )


def build_vmapped(setup: Setup, chunk: int, example: RoundArgs) -> Variant:
    """Compiles the real round (`make_round_fn`), jitted with donation as `Simulation` does.

    Args:
      setup: the shared setup.
      chunk: clients per chunk (must divide the cohort's slots).
      example: round inputs to compile for.

    Returns:
      The `Variant`, with its ahead-of-time compile time.
    """
    round_fn = setup_round_fn(setup, chunk)
    t0 = time.perf_counter()
    compiled = (
        jax.jit(round_fn, donate_argnums=(1,))
        .lower(setup.frozen, setup.state, setup.data, *example)
        .compile()
    )
    compile_s = time.perf_counter() - t0

    def run(state: RoundState, args: RoundArgs) -> tuple[RoundState, RoundOutput]:
        return compiled(setup.frozen, state, setup.data, *args)

    return Variant("vmapped", chunk, run, compile_s=compile_s)


def build_sequential(setup: Setup) -> Variant:
    """The library's reference round (`make_sequential_round`): one jitted client update per
    client in a Python loop, then the jitted tail of the round.

    Args:
      setup: the shared setup.

    Returns:
      The `Variant`; it compiles on first use (see `Variant.compile_time`).
    """
    round_fn = make_sequential_round(
        setup.algorithm,
        setup.objective,
        setup.schedule,
        num_clients_total=setup.num_clients_total,
    )

    def run(state: RoundState, args: RoundArgs) -> tuple[RoundState, RoundOutput]:
        return round_fn(setup.frozen, state, setup.data, *args)

    return Variant("sequential", None, run)


def torch_importable() -> bool:
    """Whether PyTorch and transformers can be imported (the torch loop needs both)."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def torch_device() -> str:
    """The torch loop's device: 'cuda' when JAX runs on a GPU and PyTorch sees CUDA, else 'cpu'."""
    import torch

    return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def make_torch_round(setup: Setup):
    """The torch loop of a setup: `fedjax_llm.torch_reference.TorchFedAvgRound`, as timed.

    PyTorch gets as many intra-op threads as JAX's CPU client uses (`usable_cores`); the loop
    runs on `torch_device` (with TF32 float32 matmuls on a GPU, as JAX's default precision
    there) and under bfloat16 autocast when the setup's dtype is bfloat16.

    Args:
      setup: the shared setup (LoRA mode).

    Returns:
      The `TorchFedAvgRound`.

    Raises:
      ValueError: if the setup's mode is not LoRA.
    """
    if setup.mode != "lora":
        raise ValueError(f"the torch loop trains LoRA only, not mode {setup.mode!r}.")
    import torch

    from fedjax_llm.torch_reference import TorchFedAvgRound

    torch.set_num_threads(usable_cores())
    device = torch_device()
    if device == "cuda" and jax.config.jax_default_matmul_precision is None:
        # JAX's default float32 matmuls on a GPU use TF32 tensor cores; let PyTorch do the same.
        torch.set_float32_matmul_precision("high")
    return TorchFedAvgRound(
        setup.config,
        setup.frozen,
        setup.data,
        setup.schedule,
        lora_targets=LORA_TARGETS,
        lora_rank=setup.lora_rank,
        lora_scaling=setup.lora_scaling,
        device=device,
        autocast_dtype=torch.bfloat16 if setup.config.dtype == "bfloat16" else None,
    )


def build_torch_loop(setup: Setup) -> Variant:
    """The round as a PyTorch loop over clients (`make_torch_round`) as a `Variant`.

    The variant's state is the loop's global LoRA params as torch tensors, updated in place; a
    round returns after reading its training loss, which waits for the device.

    Args:
      setup: the shared setup (LoRA mode).

    Returns:
      The `Variant` (its compile time is its first round's overhead, see `compile_time`).

    Raises:
      ValueError: if the setup's mode is not LoRA.
    """
    loop = make_torch_round(setup)

    def init(setup: Setup) -> list:
        return loop.lora_from_jax(setup.algorithm.server_params(setup.state.server))

    def run(global_lora: list, args: RoundArgs) -> tuple[list, Any]:
        lr = float(args.hparams.client_lr)
        return global_lora, loop(global_lora, args.cohort, args.round_key, lr)

    return Variant(TORCH_VARIANT, None, run, init=init, params_of=loop.lora_to_jax)


def time_variants(variants: Sequence[Variant], round_args: Sequence[RoundArgs], warmup: int):
    """Runs ``warmup`` untimed rounds, then times the remaining rounds of every variant.

    The variants take turns round by round (in alternating order), so a change in the
    machine's load during the run affects all of them alike. Between two variants' rounds the
    harness waits `SETTLE_S` (untimed), so that the worker threads one runtime leaves spinning
    after its work (XLA's, PyTorch's OpenMP) do not take cores from the next variant's round.

    Args:
      variants: started variants (their check round, ``round_args[0]``, is done).
      round_args: per-round inputs; rounds ``1..warmup`` are untimed.
      warmup: untimed rounds.
    """

    def settle():
        if len(variants) > 1:
            time.sleep(SETTLE_S)

    for args in round_args[1 : 1 + warmup]:
        for variant in variants:
            settle()
            variant.advance(args)
    for i, args in enumerate(round_args[1 + warmup :]):
        for variant in variants if i % 2 == 0 else variants[::-1]:
            settle()
            variant.round_s.append(variant.advance(args))


def compare_params(got: PyTree, want: PyTree, before: PyTree, dtype: str = "float32") -> dict:
    """Whether two variants' new global params agree.

    Args:
      got: one variant's new params.
      want: the reference variant's new params.
      before: the params both started from.
      dtype: the rounds' compute dtype: for 'bfloat16' the absolute tolerance is
        ``BF16_CHECK_UPDATE_SHARE`` of the largest update (float32 params, bfloat16 products).

    Returns:
      ``allclose`` (``np.allclose`` with CHECK_RTOL and the absolute tolerance on every leaf),
      ``max_abs_diff``, ``max_update`` (the reference's largest change of a parameter this
      round, the scale ``max_abs_diff`` should be judged against) and the tolerances.
    """
    got, want, before = (
        [np.asarray(x, np.float32) for x in jax.tree.leaves(t)] for t in (got, want, before)
    )
    max_diff = max(float(np.max(np.abs(g - w))) for g, w in zip(got, want, strict=True))
    max_update = max(float(np.max(np.abs(w - b))) for w, b in zip(want, before, strict=True))
    atol = CHECK_ATOL
    if dtype == "bfloat16":
        atol = max(CHECK_ATOL, BF16_CHECK_UPDATE_SHARE * max_update)
    close = all(
        np.allclose(g, w, rtol=CHECK_RTOL, atol=atol) for g, w in zip(got, want, strict=True)
    )
    return {
        "allclose": bool(close),
        "max_abs_diff": max_diff,
        "max_update": max_update,
        "rtol": CHECK_RTOL,
        "atol": atol,
    }


# ------------------------------------------------------------------------------ rows
def make_row(setup: Setup, num_clients: int, variant: Variant, peak: dict) -> dict:
    """One result row from a timed variant."""
    round_s = statistics.median(variant.round_s)
    tokens = tokens_per_round(setup, num_clients)
    model_flops = tokens * setup.flops_per_token / round_s
    row = {
        "model": setup.spec.name,
        "mode": setup.mode,
        "clients": num_clients,
        "variant": variant.name,
        "chunk": variant.chunk,
        "compile_s": variant.compile_time(),
        "round_s": round_s,
        "round_s_all": variant.round_s,
        "client_updates_per_s": num_clients / round_s,
        "tokens_per_round": tokens,
        "tokens_per_s": tokens / round_s,
        "model_gflops": model_flops / 1e9,
        "mfu": model_flops / (peak["gflops"] * 1e9),
        "train_loss": variant.train_loss,
        "vs_torch": None,
    }
    if variant.check is not None:
        row["check"] = variant.check
    return row


def model_info(setup: Setup) -> dict:
    """The description of a model in the results (``models.<name>``)."""
    spec = setup.spec
    return {
        "config": dataclasses.asdict(setup.config),
        "params": setup.base_params,
        "trainable_params": setup.trainable_params,
        "seq_len": spec.seq_len,
        "local_steps": spec.local_steps,
        "batch_size": spec.batch_size,
        "examples_per_client": EXAMPLES_PER_CLIENT,
        "train_flops_per_token": setup.flops_per_token,
    }


def benchmark_model_clients(
    spec: ModelSpec,
    num_clients: int,
    settings: BenchmarkSettings,
    peak: dict,
    log: Callable[[str], None],
) -> tuple[dict, list[dict], list[str]]:
    """Benchmarks one (model, C): the sequential round, the vmapped round per chunk size and
    the torch loop.

    Every variant's first round is checked against the reference's (the sequential round, or
    the first vmapped one without it) before any timing.

    Args:
      spec: the model.
      num_clients: clients per round C.
      settings: the run's settings (chunk sizes, mode, rounds, warm-up, ...); the torch loop
        runs when ``settings.torch`` (the caller makes sure PyTorch is importable).
      peak: the measured matmul peak (for MFU).
      log: where progress lines go.

    Returns:
      ``(model_info, rows, skipped)``: the model's description, the result rows (sequential,
      vmapped per chunk, torch loop) and messages for chunk sizes that do not divide C.
    """
    setup = build_setup(
        spec,
        num_clients,
        settings.mode,
        settings.lora_rank,
        settings.num_virtual_tokens,
        settings.dtype,
        settings.seed,
    )
    round_args = make_round_args(
        setup, num_clients, 1 + settings.warmup + settings.rounds, settings.seed
    )
    first = round_args[0]
    variants, skipped = [], []
    reference = None
    if settings.sequential:
        log(f"{spec.name} C={num_clients}: first round of the sequential round (compiles)")
        reference = build_sequential(setup)
        reference.start(setup, first)
        variants.append(reference)
    before = jax.device_get(setup.algorithm.server_params(setup.state.server))
    for chunk in settings.chunks or [num_clients]:
        # Chunks that do not divide C would pad the cohort, and the padded round does other work.
        if chunk <= 0 or cohort_slots(num_clients, chunk, 1) != num_clients:
            skipped.append(f"{spec.name} C={num_clients}: chunk {chunk} does not divide C")
            continue
        log(f"{spec.name} C={num_clients}: compiling the vmapped round, chunk {chunk}")
        variant = build_vmapped(setup, chunk, first)
        variant.start(setup, first)
        if reference is None:
            reference = variant
        else:
            _check(variant, reference, before, settings.dtype, log)
        variants.append(variant)
    if settings.torch:
        log(f"{spec.name} C={num_clients}: first round of the torch loop")
        torch_loop = build_torch_loop(setup)
        torch_loop.start(setup, first)
        if reference is not None:
            _check(torch_loop, reference, before, settings.dtype, log)
        variants.append(torch_loop)
    log(
        f"{spec.name} C={num_clients}: timing {settings.rounds} rounds of {len(variants)} "
        "variant(s)"
    )
    time_variants(variants, round_args, settings.warmup)
    rows = [make_row(setup, num_clients, variant, peak) for variant in variants]
    sequential = next((r for r in rows if r["variant"] == "sequential"), None)
    torch_row = next((r for r in rows if r["variant"] == TORCH_VARIANT), None)
    for row in rows:
        if sequential is not None and row["variant"] == "vmapped":
            row["vmapped_over_sequential"] = row["round_s"] / sequential["round_s"]
        if torch_row is not None:
            row["vs_torch"] = torch_row["round_s"] / row["round_s"]
    return model_info(setup), rows, skipped


def _check(
    variant: Variant,
    reference: Variant,
    before: PyTree,
    dtype: str,
    log: Callable[[str], None],
):
    # Checked before any timing: a fast round that computes something else is no result.
    check = compare_params(variant.params, reference.params, before, dtype)
    check["train_loss_diff"] = abs(variant.train_loss - reference.train_loss)
    check["reference"] = reference.name
    variant.check = check
    log(
        f"  check of the {variant.name} round vs {reference.name}: new global params "
        f"{'equal' if check['allclose'] else 'DIFFERENT'} (max |diff| "
        f"{check['max_abs_diff']:.2e}, largest update {check['max_update']:.2e}, "
        f"train loss diff {check['train_loss_diff']:.2e})"
    )


# ------------------------------------------------------------------------------ targets
MFU_TARGETS = (("lora-4m", 16, 0.80), ("lora-4m", 64, 0.80), ("tiny", 256, 0.60))
"""(model, C, minimum MFU) of LoRA rounds on any device, at the best chunk size."""
ACCELERATOR_MFU_TARGETS = (("smollm2-135m", 64, 0.40),)
"""(model, C, minimum MFU) measured on a GPU or TPU (bfloat16)."""
MIN_SPEEDUP_OVER_SEQUENTIAL = 1.3
"""The best chunk's round must be this much faster than the loop of jitted client updates."""
TORCH_SPEEDUP_TARGETS = (("smollm2-135m", 64, 20.0),)
"""(model, C, minimum ratio of the torch loop's round time to the vmapped round's)."""


def check_targets(rows: list[dict]) -> list[dict]:
    """The speed targets, each PASS / FAIL / SKIP (not measured in this run).

    Every target uses the best chunk size of the vmapped round for its (model, C): the
    benchmark is how a chunk size is chosen per device.

    Args:
      rows: result rows (`make_row`, with ``vmapped_over_sequential`` and ``vs_torch`` where
        measured).

    Returns:
      ``[{"target", "status", "detail"}]``, in this order: `MFU_TARGETS`,
      `ACCELERATOR_MFU_TARGETS`, the best chunk at least `MIN_SPEEDUP_OVER_SEQUENTIAL` times
      faster than the sequential loop at every measured (model, C), vmapped at least as fast as
      the torch loop at every measured (model, C), then `TORCH_SPEEDUP_TARGETS`.
    """

    def best_vmapped(model: str, mode: str, clients: int) -> dict | None:
        candidates = [
            r
            for r in rows
            if r["variant"] == "vmapped"
            and r["model"] == model
            and r["mode"] == mode
            and r["clients"] == clients
        ]
        return min(candidates, key=lambda r: r["round_s"], default=None)

    def outcome(name: str, passed: bool, detail: str) -> dict:
        return {"target": name, "status": "PASS" if passed else "FAIL", "detail": detail}

    def skipped(name: str, why: str) -> dict:
        return {"target": name, "status": "SKIP", "detail": why}

    targets = []
    for model, clients, minimum in MFU_TARGETS + ACCELERATOR_MFU_TARGETS:
        name = f"MFU >= {minimum:.0%} on {model} (LoRA) at C={clients}"
        found = best_vmapped(model, "lora", clients)
        if found is None:
            targets.append(skipped(name, "not measured"))
        else:
            detail = f"{found['mfu']:.1%} (chunk {found['chunk']})"
            targets.append(outcome(name, found["mfu"] >= minimum, detail))
    groups = sorted(
        {(r["model"], r["mode"], r["clients"]) for r in rows if r["variant"] == "vmapped"}
    )
    best = [row for row in (best_vmapped(*group) for group in groups) if row is not None]

    name = (
        f"best chunk at least {MIN_SPEEDUP_OVER_SEQUENTIAL}x faster than the sequential loop "
        "at every C"
    )
    ratios = [row for row in best if "vmapped_over_sequential" in row]
    if not ratios:
        targets.append(skipped(name, "no sequential rows"))
    else:
        worst = max(ratios, key=lambda r: r["vmapped_over_sequential"])
        speedup = 1.0 / worst["vmapped_over_sequential"]
        detail = (
            f"worst {speedup:.2f}x at {worst['model']} C={worst['clients']} chunk {worst['chunk']}"
        )
        targets.append(outcome(name, speedup >= MIN_SPEEDUP_OVER_SEQUENTIAL, detail))

    versus = [row for row in best if row.get("vs_torch") is not None]
    name = "vmapped (best chunk) at least as fast as the torch loop at every C (vs torch >= 1.0x)"
    if not versus:
        targets.append(skipped(name, "no torch loop rows"))
    else:
        worst = min(versus, key=lambda r: r["vs_torch"])
        detail = (
            f"worst {worst['vs_torch']:.2f}x at {worst['model']} C={worst['clients']} "
            f"chunk {worst['chunk']}"
        )
        targets.append(outcome(name, worst["vs_torch"] >= 1.0, detail))
    for model, clients, minimum in TORCH_SPEEDUP_TARGETS:
        name = f"vs torch >= {minimum:g}x on {model} (LoRA) at C={clients}"
        found = best_vmapped(model, "lora", clients)
        if found is None or found.get("vs_torch") is None:
            targets.append(skipped(name, "not measured"))
        else:
            detail = f"{found['vs_torch']:.1f}x (chunk {found['chunk']})"
            targets.append(outcome(name, found["vs_torch"] >= minimum, detail))
    return targets


# ------------------------------------------------------------------------------ run
def run_benchmark(
    settings: BenchmarkSettings,
    command: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Runs a whole benchmark: the peak, every (model, C, variant) row, the peak again, targets.

    Args:
      settings: what to measure.
      command: the command line that asked for it (recorded in the results).
      log: where progress lines go.

    Returns:
      The results, JSON-serializable, in the layout of ``SCHEMA_VERSION`` (documented in
      ``benchmarks/README.md``).
    """
    backend = jax.default_backend()
    load_start = load_average()
    torch_info = None
    if settings.torch and settings.mode != "lora":
        log(f"the torch loop trains LoRA only; skipped for mode {settings.mode!r}")
        settings = dataclasses.replace(settings, torch=False)
    elif settings.torch and not torch_importable():
        log(
            "PyTorch (or transformers) cannot be imported: the torch loop is skipped "
            "(pip install torch==2.13.0 to compare with it)"
        )
        settings = dataclasses.replace(settings, torch=False)
    if settings.torch:
        import torch

        torch_info = {
            "torch": torch.__version__,
            "device": torch_device(),
            "num_threads": usable_cores(),
            "autocast": "bfloat16" if settings.dtype == "bfloat16" else None,
        }
        if backend == "gpu" and torch_info["device"] == "cpu":
            log("WARNING: JAX runs on a GPU but PyTorch sees no CUDA: the torch loop runs on CPU")
    size = settings.peak_size or peak_matmul_size(backend, settings.quick)
    log(f"measuring the matmul peak ({size}x{size} {settings.dtype})")
    peak = measure_matmul_peak(size, settings.dtype, settings.peak_repeats)
    models: dict[str, dict] = {}
    rows: list[dict] = []
    skipped: list[str] = []
    for name in settings.models:
        spec = MODELS[name]
        if settings.seq_len is not None:
            spec = with_seq_len(spec, settings.seq_len)
        for num_clients in settings.clients or (QUICK_CLIENTS if settings.quick else spec.clients):
            info, model_rows, model_skipped = benchmark_model_clients(
                spec, num_clients, settings, peak, log
            )
            models[name] = info
            rows.extend(model_rows)
            skipped.extend(model_skipped)
    # Measured again at the end: if the device's speed changed during the run (other jobs on a
    # shared machine, thermal limits), MFU against the first measurement is not trustworthy.
    log("measuring the matmul peak again")
    peak_end = measure_matmul_peak(size, settings.dtype, settings.peak_repeats)
    return {
        "schema_version": SCHEMA_VERSION,
        "command": list(command) if command is not None else None,
        "quick": settings.quick,
        "device": describe_device(),
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "peak": peak,
        "peak_end": peak_end,
        "peak_drift": peak_end["gflops"] / peak["gflops"] - 1.0,
        "settings": {
            "mode": settings.mode,
            "lora_rank": settings.lora_rank,
            "lora_targets": list(LORA_TARGETS),
            "num_virtual_tokens": settings.num_virtual_tokens,
            "dtype": settings.dtype,
            "seq_len": settings.seq_len,
            "rounds": settings.rounds,
            "warmup": settings.warmup,
            "seed": settings.seed,
            "client_lr": CLIENT_LR,
            "algorithm": "fedavg (client sgd, server sgd(1.0))",
            "population_per_sampled": POPULATION_PER_SAMPLED,
            "lora_alpha": LORA_ALPHA,
            "torch_loop": torch_info,
        },
        "models": models,
        "rows": rows,
        "skipped": skipped,
        "targets": check_targets(rows),
    }


# ------------------------------------------------------------------------------ output
def format_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """Plain-text table, first two columns left-aligned (readable in logs and pipes)."""
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        pairs = enumerate(zip(row, widths, strict=True))
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in pairs).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(row) for row in body)])


def format_results(results: dict) -> str:
    """The peak, the models, the table of rows, the skipped chunk sizes and the targets."""
    dev, peak, settings = results["device"], results["peak"], results["settings"]
    lines = [
        f"device: {dev['device_kind']} ({dev['backend']}, {dev['num_devices']} device(s), "
        f"{dev['cpu_usable']}/{dev['cpu_count']} CPU cores usable); load average at start "
        f"{results['load_average_start']}, at end {results['load_average_end']}",
        f"matmul peak: {peak['gflops']:.1f} GFLOP/s median (best {peak['best_gflops']:.1f}) "
        f"of {peak['repeats']} products of {peak['size']}x{peak['size']} {peak['dtype']}; "
        f"{results['peak_end']['gflops']:.1f} when measured again at the end",
    ]
    if abs(results["peak_drift"]) > PEAK_DRIFT_WARNING:
        lines.append(
            f"WARNING: the matmul peak changed by {results['peak_drift']:+.0%} during the run; "
            "the device's speed was not steady (a shared or throttled machine), so MFU and "
            "the vmapped/sequential ratios are unreliable."
        )
    load = results["load_average_start"]
    if dev["backend"] == "cpu" and load and load[0] > BUSY_LOAD_PER_CORE * dev["cpu_usable"]:
        lines.append(
            f"WARNING: the machine was busy at the start (1-minute load {load[0]} on "
            f"{dev['cpu_usable']} cores): other jobs slow every round, the torch loop's most "
            "(PyTorch's OpenMP threads can slow down tenfold on oversubscribed cores), so "
            "vs torch and the other ratios are unreliable."
        )
    for name, info in results["models"].items():
        lines.append(
            f"{name}: {info['params']:,} params, {info['trainable_params']:,} trainable "
            f"({settings['mode']}); {info['local_steps']} local steps of {info['batch_size']} x "
            f"{info['seq_len']} tokens; {info['train_flops_per_token'] / 1e6:.3f} MFLOP per "
            "training token"
        )
    torch_loop = settings.get("torch_loop")
    if torch_loop is not None:
        lines.append(
            f"torch loop: PyTorch {torch_loop['torch']} on {torch_loop['device']}, "
            f"{torch_loop['num_threads']} thread(s), autocast {torch_loop['autocast']}"
        )
    header = (
        "model",
        "variant",
        "chunk",
        "C",
        "compile s",
        "round s",
        "clients/s",
        "tokens/s",
        "GFLOP/s",
        "MFU",
        "vmap/seq",
        "vs torch",
        "check",
    )
    body = []
    for row in results["rows"]:
        check = row.get("check")
        body.append(
            (
                row["model"],
                row["variant"],
                "-" if row["chunk"] is None else str(row["chunk"]),
                str(row["clients"]),
                f"{row['compile_s']:.2f}",
                f"{row['round_s']:.4f}",
                f"{row['client_updates_per_s']:.1f}",
                f"{row['tokens_per_s']:,.0f}",
                f"{row['model_gflops']:.2f}",
                f"{row['mfu']:.1%}",
                f"{row['vmapped_over_sequential']:.2f}"
                if "vmapped_over_sequential" in row
                else "-",
                "-" if row.get("vs_torch") is None else f"{row['vs_torch']:.2f}",
                "-" if check is None else ("equal" if check["allclose"] else "DIFFERENT"),
            )
        )
    lines += [
        f"\nfederated round ({settings['mode']}, {settings['dtype']}): median of "
        f"{settings['rounds']} timed rounds after compilation (sequential and torch loop "
        "compile s: the first round minus the median round); vs torch: the torch loop's round "
        "time over the row's",
        format_table(header, body),
        "",
    ]
    lines += [f"skipped: {message}" for message in results["skipped"]]
    lines += [f"{t['status']}: {t['target']}: {t['detail']}" for t in results["targets"]]
    return "\n".join(lines)
