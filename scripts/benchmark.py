"""Benchmarks the compiled federated round against a loop of one jitted client update per client.

Usage:
  python scripts/benchmark.py                          # lora-4m and tiny, their default C
  python scripts/benchmark.py --models tiny --clients 8 32 --chunk 8 32 --rounds 10
  python scripts/benchmark.py --mode full --out benchmarks/cpu_full.json
  python scripts/benchmark.py --quick                  # smoke run: tiny, C in {2, 4}, 2 rounds

First the device's matmul peak is measured (a jitted square matrix product in the model's
compute dtype, median of timed runs). Then for every model and clients-per-round C it times
(a) the real round of `fedjax_llm.round.make_round_fn`, jitted as `Simulation` jits it, once
per chunk size given with ``--chunk`` (default one chunk of C), and (b) a Python loop calling
one jitted `make_client_update` per client, followed by one jitted aggregation and server
update over the stacked outputs, so both variants do the same work. Before timing, both
variants must produce the same new global params. The variants then take turns round by round,
so a change of load on a shared machine hits them alike. Each row reports the median wall time
of ``--rounds`` rounds after compilation, the compile time, client updates/s, tokens/s, model
FLOP/s (`fedjax_llm.models.flops`) and MFU against the measured peak (measured again at the end
to expose an unsteady device). The targets of the benchmark issue are checked and printed as
PASS/FAIL lines (the exit status stays 0).

Data are synthetic: random token blocks with all-ones loss masks, ``4 * C`` clients of 32
examples each. The algorithm is FedAvg with a client SGD and server ``sgd(1.0)``.
Results go to a readable table on stdout and to ``--out`` (default
``benchmarks/<backend>.json``, or ``benchmarks/<backend>_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_llm.algorithms import Algorithm, make_fedavg
from fedjax_llm.models.flops import train_flops_per_token
from fedjax_llm.models.llama import LlamaConfig, count_params, init_params
from fedjax_llm.models.trainable import TRAINABLE_MODES, make_trainable
from fedjax_llm.round import (
    ClientData,
    LocalSchedule,
    finish_round,
    make_client_update,
    make_round_fn,
    round_hparams,
)
from fedjax_llm.sampling import sample_clients
from kernels.aggregation import weighted_sum_finalize, weighted_sum_init, weighted_sum_update

PyTree = Any

SCHEMA_VERSION = 1
EXAMPLES_PER_CLIENT = 32
# The population is a few times the sample so rounds draw different clients.
POPULATION_PER_SAMPLED = 4
PAD_ID = 0  # the byte tokenizer's pad; random tokens are drawn above the special ids
FIRST_REAL_TOKEN = 3
CLIENT_LR = 0.05
# Equality of the two variants: float32 with different reduction orders (batched vs single
# matmuls) over a few SGD steps; far above rounding noise, far below any real discrepancy.
CHECK_RTOL, CHECK_ATOL = 1e-5, 1e-6
PEAK_DRIFT_WARNING = 0.10


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
        clients=(8, 32, 128),
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
}
QUICK_CLIENTS = (2, 4)


# ------------------------------------------------------------------------------ device + peak
def describe_device() -> dict:
    """What the numbers were measured on."""
    device = jax.devices()[0]
    try:
        cores_usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores_usable = os.cpu_count()
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
    matmul = jax.jit(jnp.matmul).lower(a, b).compile()
    for _ in range(warmup):
        matmul(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        matmul(a, b).block_until_ready()
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
    """Everything one (model, C) benchmark needs; both variants share it."""

    spec: ModelSpec
    config: LlamaConfig
    mode: str
    apply_fn: Callable
    algorithm: Algorithm
    frozen: PyTree
    server_state: PyTree
    client_store: PyTree
    data: ClientData
    schedule: LocalSchedule
    num_clients_total: int
    base_params: int
    trainable_params: int
    flops_per_token: float


def synthetic_client_data(
    seed: int, num_clients: int, examples_per_client: int, seq_len: int, vocab_size: int
) -> ClientData:
    """Random token blocks with all-ones loss masks, ``examples_per_client`` per client.

    Args:
      seed: numpy seed.
      num_clients: clients M.
      examples_per_client: examples per client.
      seq_len: tokens per example T.
      vocab_size: ids are drawn from ``[3, vocab_size)`` (no pad, bos or eos).

    Returns:
      The `ClientData`, on the default device.
    """
    rng = np.random.default_rng(seed)
    num_examples = num_clients * examples_per_client
    tokens = rng.integers(FIRST_REAL_TOKEN, vocab_size, (num_examples, seq_len), dtype=np.int32)
    return ClientData(
        tokens=jnp.asarray(tokens),
        loss_mask=jnp.ones((num_examples, seq_len), jnp.float32),
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
    """Builds the model, FedAvg, its states and synthetic data for one (model, C).

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
    targets = ("q", "v")
    trainable = make_trainable(
        config,
        mode,
        lora_rank=lora_rank,
        lora_targets=targets,
        num_virtual_tokens=num_virtual_tokens,
    )
    init_key, trainable_key = jax.random.split(jax.random.key(seed))
    base = init_params(config, init_key)
    params = trainable.init(trainable_key, base)
    algorithm = make_fedavg(
        optax.inject_hyperparams(optax.sgd)(learning_rate=CLIENT_LR), optax.sgd(1.0)
    )
    num_total = POPULATION_PER_SAMPLED * num_clients_per_round
    one_state = algorithm.client_state_init(params)
    client_store = jax.tree.map(lambda x: jnp.zeros((num_total,) + x.shape, x.dtype) + x, one_state)
    schedule = LocalSchedule(
        local_steps=spec.local_steps,
        batch_size=spec.batch_size,
        max_client_examples=EXAMPLES_PER_CLIENT,
    )
    virtual = num_virtual_tokens if mode in ("soft_prompt", "prefix") else 0
    return Setup(
        spec=spec,
        config=config,
        mode=mode,
        apply_fn=trainable.apply,
        algorithm=algorithm,
        frozen=trainable.frozen(base),
        server_state=algorithm.server_init(params),
        client_store=client_store,
        data=synthetic_client_data(
            seed, num_total, EXAMPLES_PER_CLIENT, spec.seq_len, config.vocab_size
        ),
        schedule=schedule,
        num_clients_total=num_total,
        base_params=count_params(base),
        trainable_params=count_params(params),
        flops_per_token=train_flops_per_token(
            config, spec.seq_len, mode, lora_rank, targets, virtual
        ),
    )


def tokens_per_round(setup: Setup, num_clients: int) -> int:
    """Tokens every round trains on: C * K * B * T (all clients use their full budget)."""
    spec = setup.spec
    return num_clients * spec.local_steps * spec.batch_size * spec.seq_len


def copy_tree(tree: PyTree) -> PyTree:
    """Fresh buffers, so a donating call cannot invalidate the original."""
    return jax.tree.map(jnp.copy, tree)


class RoundArgs(NamedTuple):
    """The per-round inputs, built before any timing: sampled ids, round key, hparams."""

    client_ids: jax.Array
    client_id_list: list[jax.Array]
    round_key: jax.Array
    hparams: Any


def make_round_args(setup: Setup, num_clients: int, num_rounds: int, seed: int) -> list[RoundArgs]:
    """Per-round arguments for both variants (identical clients, keys and hparams)."""
    root = jax.random.key(seed + 1)
    args = []
    for r in range(num_rounds):
        ids = sample_clients(seed, r, setup.num_clients_total, num_clients)
        args.append(
            RoundArgs(
                client_ids=jnp.asarray(ids),
                client_id_list=[jnp.asarray(i) for i in ids],
                round_key=jax.random.fold_in(root, r),
                hparams=round_hparams(CLIENT_LR),
            )
        )
    return args


# ------------------------------------------------------------------------------ variants
@dataclasses.dataclass
class Variant:
    """One way of running the round, compiled, with its own copy of the state.

    Attributes:
      name: 'vmapped' or 'sequential'.
      chunk: clients per chunk of the vmapped round (None for the loop).
      compile_s: trace + lower + XLA compile time of everything the variant runs.
      run: ``(server_state, client_store, RoundArgs) -> (server_state, client_store,
        RoundOutput)``.
      state: the variant's current ``(server_state, client_store)``.
      params: new global params of the check round, on the host.
      train_loss: training loss of the check round.
      check: agreement of the check round with the loop's (vmapped variants).
      round_s: wall times of the timed rounds.
    """

    name: str
    chunk: int | None
    compile_s: float
    run: Callable
    state: tuple = ()
    params: PyTree = None
    train_loss: float = float("nan")
    check: dict | None = None
    round_s: list[float] = dataclasses.field(default_factory=list)

    def start(self, setup: Setup, args: RoundArgs) -> None:
        """Runs the check round from (copies of) the setup's initial state."""
        # Fresh copies: the round donates its state, and every variant must start alike.
        state = copy_tree(setup.server_state), copy_tree(setup.client_store)
        server_state, client_store, out = self.run(*state, args)
        self.state = (server_state, client_store)
        self.params = jax.device_get(setup.algorithm.server_params(server_state))
        self.train_loss = float(out.train_loss)

    def advance(self, args: RoundArgs) -> float:
        """Runs one round to completion; returns its wall time in seconds."""
        t0 = time.perf_counter()
        server_state, client_store, out = self.run(*self.state, args)
        jax.block_until_ready((server_state, client_store, out))
        self.state = (server_state, client_store)
        return time.perf_counter() - t0


def build_vmapped(setup: Setup, chunk: int, example: RoundArgs) -> Variant:
    """Compiles the real round (`make_round_fn`), jitted with donation as `Simulation` does.

    Args:
      setup: the shared setup.
      chunk: clients per chunk.
      example: round inputs to compile for.

    Returns:
      The `Variant`.
    """
    round_fn = make_round_fn(
        setup.algorithm,
        setup.apply_fn,
        setup.schedule,
        num_clients_total=setup.num_clients_total,
        clients_per_chunk=chunk,
        pad_id=PAD_ID,
    )
    t0 = time.perf_counter()
    compiled = (
        jax.jit(round_fn, donate_argnums=(1, 2))
        .lower(
            setup.frozen,
            setup.server_state,
            setup.client_store,
            setup.data,
            example.client_ids,
            example.round_key,
            example.hparams,
        )
        .compile()
    )
    compile_s = time.perf_counter() - t0

    def run(server_state, client_store, args: RoundArgs):
        return compiled(
            setup.frozen,
            server_state,
            client_store,
            setup.data,
            args.client_ids,
            args.round_key,
            args.hparams,
        )

    return Variant("vmapped", chunk, compile_s, run)


def make_finish(algorithm: Algorithm, num_clients_total: int) -> Callable:
    """The loop variant's tail: aggregation, server update, client-state scatter, metrics.

    It ends with `finish_round`, the same tail as `make_round_fn`, so both variants compute
    the same round.

    Args:
      algorithm: the algorithm.
      num_clients_total: population size.

    Returns:
      ``finish(server_state, client_store, client_ids, results) -> (server_state,
      client_store, RoundOutput)``, where ``results`` is the list of the C client updates'
      outputs, pure and ready for `jax.jit`.
    """

    def finish(server_state, client_store, client_ids, results):
        outputs, new_states, weights, metrics = jax.tree.map(lambda *xs: jnp.stack(xs), *results)
        like = jax.tree.map(lambda x: x[0], outputs)
        sums = weighted_sum_update(weighted_sum_init(like), outputs, weights)
        return finish_round(
            algorithm,
            num_clients_total,
            server_state,
            client_store,
            client_ids,
            weighted_sum_finalize(sums, like),
            new_states,
            weights,
            metrics,
        )

    return finish


def build_sequential(setup: Setup, example: RoundArgs) -> Variant:
    """Compiles the loop variant: one jitted client update, one jitted aggregation + server.

    Args:
      setup: the shared setup.
      example: round inputs to compile for.

    Returns:
      The `Variant`; its round calls the compiled client update once per client.
    """
    algorithm = setup.algorithm
    client_update = make_client_update(algorithm, setup.apply_fn, setup.schedule, PAD_ID)

    def one_client(frozen, broadcast, client_store, data, client_id, round_key, hparams):
        client_state = jax.tree.map(lambda s: s[client_id], client_store)
        return client_update(frozen, broadcast, client_state, data, client_id, round_key, hparams)

    num_clients = len(example.client_id_list)
    t0 = time.perf_counter()
    broadcast = algorithm.broadcast(setup.server_state)
    client_args = (
        setup.frozen,
        broadcast,
        setup.client_store,
        setup.data,
        example.client_id_list[0],
        example.round_key,
        example.hparams,
    )
    client = jax.jit(one_client).lower(*client_args).compile()
    result_shape = jax.eval_shape(one_client, *client_args)
    finish = jax.jit(make_finish(algorithm, setup.num_clients_total), donate_argnums=(0, 1))
    finish = finish.lower(
        setup.server_state, setup.client_store, example.client_ids, [result_shape] * num_clients
    ).compile()
    compile_s = time.perf_counter() - t0

    def run(server_state, client_store, args: RoundArgs):
        # Eager: for FedAvg the broadcast is a field access, nothing to compile.
        broadcast = algorithm.broadcast(server_state)
        # The loop the vmapped round replaces: one compiled client update per client.
        results = [
            client(
                setup.frozen,
                broadcast,
                client_store,
                setup.data,
                client_id,
                args.round_key,
                args.hparams,
            )
            for client_id in args.client_id_list
        ]
        return finish(server_state, client_store, args.client_ids, results)

    return Variant("sequential", None, compile_s, run)


def time_variants(variants: Sequence[Variant], round_args: Sequence[RoundArgs], warmup: int):
    """Runs ``warmup`` untimed rounds, then times the remaining rounds of every variant.

    The variants take turns round by round (in alternating order), so a change in the
    machine's load during the run affects all of them alike.

    Args:
      variants: started variants (their check round, ``round_args[0]``, is done).
      round_args: per-round inputs; rounds ``1..warmup`` are untimed.
      warmup: untimed rounds.
    """
    for args in round_args[1 : 1 + warmup]:
        for variant in variants:
            variant.advance(args)
    for i, args in enumerate(round_args[1 + warmup :]):
        for variant in variants if i % 2 == 0 else variants[::-1]:
            variant.round_s.append(variant.advance(args))


def compare_params(got: PyTree, want: PyTree, before: PyTree) -> dict:
    """Whether two variants' new global params agree.

    Args:
      got: one variant's new params.
      want: the reference variant's new params.
      before: the params both started from.

    Returns:
      ``allclose`` (``np.allclose`` with CHECK_RTOL / CHECK_ATOL on every leaf),
      ``max_abs_diff``, ``max_update`` (the reference's largest change of a parameter this
      round, the scale ``max_abs_diff`` should be judged against) and the tolerances.
    """
    got, want, before = (
        [np.asarray(x, np.float32) for x in jax.tree.leaves(t)] for t in (got, want, before)
    )
    max_diff = max(float(np.max(np.abs(g - w))) for g, w in zip(got, want, strict=True))
    max_update = max(float(np.max(np.abs(w - b))) for w, b in zip(want, before, strict=True))
    close = all(
        np.allclose(g, w, rtol=CHECK_RTOL, atol=CHECK_ATOL) for g, w in zip(got, want, strict=True)
    )
    return {
        "allclose": bool(close),
        "max_abs_diff": max_diff,
        "max_update": max_update,
        "rtol": CHECK_RTOL,
        "atol": CHECK_ATOL,
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
        "compile_s": variant.compile_s,
        "round_s": round_s,
        "round_s_all": variant.round_s,
        "client_updates_per_s": num_clients / round_s,
        "tokens_per_round": tokens,
        "tokens_per_s": tokens / round_s,
        "model_gflops": model_flops / 1e9,
        "mfu": model_flops / (peak["gflops"] * 1e9),
        "train_loss": variant.train_loss,
    }
    if variant.check is not None:
        row["check"] = variant.check
    return row


def benchmark_model_clients(
    spec: ModelSpec,
    num_clients: int,
    chunks: Sequence[int] | None,
    args: argparse.Namespace,
    peak: dict,
    log: Callable[[str], None],
) -> tuple[dict, list[dict], list[str]]:
    """Benchmarks one (model, C): the loop and the vmapped round for every chunk size.

    Args:
      spec: the model.
      num_clients: clients per round C.
      chunks: chunk sizes of the vmapped round (None: one chunk of C); those that do not
        divide C are skipped.
      args: the parsed command line (mode, rounds, warmup, ...).
      peak: the measured matmul peak (for MFU).
      log: where progress lines go.

    Returns:
      ``(model_info, rows, skipped)``: the model's description, the result rows and messages
      for chunk sizes that do not divide C.
    """
    setup = build_setup(
        spec,
        num_clients,
        args.mode,
        args.lora_rank,
        args.num_virtual_tokens,
        args.dtype,
        args.seed,
    )
    info = {
        "config": dataclasses.asdict(setup.config),
        "params": setup.base_params,
        "trainable_params": setup.trainable_params,
        "seq_len": spec.seq_len,
        "local_steps": spec.local_steps,
        "batch_size": spec.batch_size,
        "examples_per_client": EXAMPLES_PER_CLIENT,
        "train_flops_per_token": setup.flops_per_token,
    }
    round_args = make_round_args(setup, num_clients, 1 + args.warmup + args.rounds, args.seed)
    first = round_args[0]
    variants, skipped = [], []
    reference = None
    if not args.no_sequential:
        log(f"{spec.name} C={num_clients}: compiling the loop of one jitted client update")
        reference = build_sequential(setup, first)
        reference.start(setup, first)
        variants.append(reference)
    before = jax.device_get(setup.algorithm.server_params(setup.server_state))
    for chunk in chunks or [num_clients]:
        if chunk <= 0 or chunk > num_clients or num_clients % chunk:
            skipped.append(f"{spec.name} C={num_clients}: chunk {chunk} does not divide C")
            continue
        log(f"{spec.name} C={num_clients}: compiling the vmapped round, chunk {chunk}")
        variant = build_vmapped(setup, chunk, first)
        variant.start(setup, first)
        if reference is not None:
            # Checked before any timing: a fast round that computes something else is no result.
            check = compare_params(variant.params, reference.params, before)
            check["train_loss_diff"] = abs(variant.train_loss - reference.train_loss)
            variant.check = check
            log(
                f"  check vs loop: new global params "
                f"{'equal' if check['allclose'] else 'DIFFERENT'} (max |diff| "
                f"{check['max_abs_diff']:.2e}, largest update {check['max_update']:.2e}, "
                f"train loss diff {check['train_loss_diff']:.2e})"
            )
        variants.append(variant)
    log(f"{spec.name} C={num_clients}: timing {args.rounds} rounds of {len(variants)} variant(s)")
    time_variants(variants, round_args, args.warmup)
    rows = [make_row(setup, num_clients, variant, peak) for variant in variants]
    if reference is not None:
        for row in rows[1:]:
            row["vmapped_over_sequential"] = row["round_s"] / rows[0]["round_s"]
    return info, rows, skipped


# ------------------------------------------------------------------------------ targets
def check_targets(rows: list[dict]) -> list[dict]:
    """The issue's speed targets, each PASS / FAIL / SKIP (not measured in this run).

    MFU targets use the best chunk size of the vmapped round (the benchmark is how a chunk size
    is chosen per device); the vmapped-vs-loop target holds for every (model, C) at its best
    chunk.
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

    targets = []
    for model, clients, minimum in (("lora-4m", 32, 0.50), ("tiny", 256, 0.30)):
        name = f"MFU >= {minimum:.0%} on {model} (LoRA) at C={clients}"
        found = best_vmapped(model, "lora", clients)
        if found is None:
            targets.append({"target": name, "status": "SKIP", "detail": "not measured"})
        else:
            status = "PASS" if found["mfu"] >= minimum else "FAIL"
            targets.append(
                {
                    "target": name,
                    "status": status,
                    "detail": f"{found['mfu']:.1%} (chunk {found['chunk']})",
                }
            )
    groups = {(r["model"], r["mode"], r["clients"]) for r in rows if r["variant"] == "vmapped"}
    best = (best_vmapped(*group) for group in sorted(groups))
    ratios = [row for row in best if "vmapped_over_sequential" in row]
    name = "vmapped never more than 10% slower than sequential (best chunk)"
    if not ratios:
        targets.append({"target": name, "status": "SKIP", "detail": "no sequential rows"})
    else:
        worst = max(ratios, key=lambda r: r["vmapped_over_sequential"])
        status = "PASS" if worst["vmapped_over_sequential"] <= 1.10 else "FAIL"
        targets.append(
            {
                "target": name,
                "status": status,
                "detail": (
                    f"worst {worst['vmapped_over_sequential']:.2f}x at {worst['model']} "
                    f"C={worst['clients']} chunk {worst['chunk']}"
                ),
            }
        )
    return targets


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
            "the vmapped/loop ratios are unreliable."
        )
    for name, info in results["models"].items():
        lines.append(
            f"{name}: {info['params']:,} params, {info['trainable_params']:,} trainable "
            f"({settings['mode']}); {info['local_steps']} local steps of {info['batch_size']} x "
            f"{info['seq_len']} tokens; {info['train_flops_per_token'] / 1e6:.3f} MFLOP per "
            "training token"
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
        "vmap/loop",
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
                "-" if check is None else ("equal" if check["allclose"] else "DIFFERENT"),
            )
        )
    lines += [
        f"\nfederated round ({settings['mode']}, {settings['dtype']}): median of "
        f"{settings['rounds']} timed rounds after compilation",
        format_table(header, body),
        "",
    ]
    lines += [f"skipped: {message}" for message in results["skipped"]]
    lines += [f"{t['status']}: {t['target']}: {t['detail']}" for t in results["targets"]]
    return "\n".join(lines)


def default_out(backend: str, quick: bool) -> str:
    """``benchmarks/<backend>.json`` beside this script's repository (``_quick`` for smoke)."""
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "benchmarks")
    return os.path.normpath(os.path.join(root, f"{backend}{'_quick' if quick else ''}.json"))


def run_benchmark(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict:
    """Runs the whole benchmark described by parsed command-line arguments.

    Args:
      args: the parsed arguments (see `parse_args`).
      log: where progress lines go.

    Returns:
      The results dict (the JSON written to ``--out``).
    """
    backend = jax.default_backend()
    load_start = load_average()
    size = args.peak_size or peak_matmul_size(backend, args.quick)
    log(f"measuring the matmul peak ({size}x{size} {args.dtype})")
    peak = measure_matmul_peak(size, args.dtype, args.peak_repeats)
    models: dict[str, dict] = {}
    rows: list[dict] = []
    skipped: list[str] = []
    for name in args.models:
        spec = MODELS[name]
        for num_clients in args.clients or (QUICK_CLIENTS if args.quick else spec.clients):
            info, model_rows, model_skipped = benchmark_model_clients(
                spec, num_clients, args.chunk, args, peak, log
            )
            models[name] = info
            rows.extend(model_rows)
            skipped.extend(model_skipped)
    # Measured again at the end: if the device's speed changed during the run (other jobs on a
    # shared machine, thermal limits), MFU against the first measurement is not trustworthy.
    log("measuring the matmul peak again")
    peak_end = measure_matmul_peak(size, args.dtype, args.peak_repeats)
    return {
        "schema_version": SCHEMA_VERSION,
        "command": sys.argv,
        "quick": args.quick,
        "device": describe_device(),
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "peak": peak,
        "peak_end": peak_end,
        "peak_drift": peak_end["gflops"] / peak["gflops"] - 1.0,
        "settings": {
            "mode": args.mode,
            "lora_rank": args.lora_rank,
            "lora_targets": ["q", "v"],
            "num_virtual_tokens": args.num_virtual_tokens,
            "dtype": args.dtype,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "seed": args.seed,
            "client_lr": CLIENT_LR,
            "algorithm": "fedavg (client sgd, server sgd(1.0))",
            "population_per_sampled": POPULATION_PER_SAMPLED,
        },
        "models": models,
        "rows": rows,
        "skipped": skipped,
        "targets": check_targets(rows),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models",
        nargs="+",
        choices=sorted(MODELS),
        default=None,
        help="models to run (default: lora-4m tiny; tiny with --quick)",
    )
    parser.add_argument(
        "--clients",
        nargs="+",
        type=int,
        default=None,
        help="clients per round C (default: each model's own list)",
    )
    parser.add_argument(
        "--chunk",
        nargs="+",
        type=int,
        default=None,
        help="clients per chunk of the vmapped round, swept (default: C)",
    )
    parser.add_argument(
        "--mode",
        choices=TRAINABLE_MODES,
        default="lora",
        help="what clients train (default lora, r=--lora-rank on q, v)",
    )
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument(
        "--num-virtual-tokens",
        type=int,
        default=8,
        help="soft prompt / prefix length for those modes",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="compute dtype of the model and of the peak matmul",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="timed rounds per row, median reported (default 5; 2 with --quick)",
    )
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed rounds after the (untimed) check round"
    )
    parser.add_argument(
        "--peak-size", type=int, default=None, help="side of the peak matmul (default by backend)"
    )
    parser.add_argument("--peak-repeats", type=int, default=10)
    parser.add_argument(
        "--no-sequential",
        action="store_true",
        help="skip the loop variant (and so the equality check and ratio)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: tiny model, C in {2, 4}, 2 timed rounds"
    )
    parser.add_argument(
        "--out", default=None, help="JSON results path (default benchmarks/<backend>[_quick].json)"
    )
    args = parser.parse_args(argv)
    if args.models is None:
        args.models = ["tiny"] if args.quick else ["lora-4m", "tiny"]
    if args.rounds is None:
        args.rounds = 2 if args.quick else 5
    if args.rounds < 1 or args.warmup < 0:
        parser.error("--rounds must be >= 1 and --warmup >= 0")
    if args.clients is not None and min(args.clients) < 1:
        parser.error("--clients values must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or default_out(jax.default_backend(), args.quick)
    results = run_benchmark(args, log=lambda message: print(message, flush=True))
    print(format_results(results))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
