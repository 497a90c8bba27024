"""Memory of a compiled round as XLA's memory analysis reports it.

`round_temp_bytes` compiles one round of a small SCAFFOLD + LoRA workload (a per-client state
the size of the trainable part, in a population store of ``population`` clients) for a cohort
of a given size and returns the program's temporary bytes: everything it allocates besides its
arguments and outputs. `python scripts/scale.py memory` prints it across cohort sizes, on one
device and through the sharded round of a device mesh; the tests check that it stays flat, and
that a gathering aggregator (the coordinate median, which needs every upload at once) grows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_llm.algorithms import make_scaffold
from fedjax_llm.models.llama import LlamaConfig, init_params
from fedjax_llm.models.trainable import make_trainable
from fedjax_llm.objectives import next_token_loss
from fedjax_llm.pipeline import (
    AggregationPipeline,
    coordinate_median_aggregator,
    default_pipeline,
    identity,
)
from fedjax_llm.round import (
    CLIENT_AXIS,
    ClientData,
    LocalSchedule,
    init_round_state,
    make_round_fn,
    round_hparams,
)
from fedjax_llm.sampling import Cohort, cohort_slots

SEQ = 32


def client_mesh(devices: int) -> jax.sharding.Mesh:
    """A mesh of this process's first ``devices`` devices along the client axis."""
    if devices > jax.device_count():
        raise ValueError(f"{devices} devices asked for; this process has {jax.device_count()}.")
    return jax.sharding.Mesh(np.array(jax.devices()[:devices]), (CLIENT_AXIS,))


@functools.cache
def _workload():
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        max_seq_len=SEQ,
    )
    trainable = make_trainable(cfg, "lora", lora_rank=4, lora_targets=("q", "v"))
    base = init_params(cfg, jax.random.key(0))
    lora = trainable.init(jax.random.key(1), base)
    algorithm = make_scaffold(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1), optax.sgd(1))
    return trainable, base, lora, algorithm


def round_temp_bytes(
    num_clients: int,
    *,
    population: int = 10_240,
    chunk: int = 16,
    largest_client: int = 2,
    devices: int | None = None,
    median: bool = False,
) -> int | None:
    """Temporary bytes of the compiled round for a cohort of ``num_clients``.

    Args:
      num_clients: clients per round.
      population: clients in the store (at least ``num_clients``).
      chunk: clients per chunk.
      largest_client: examples of one client (the others have 2).
      devices: compile the round sharded over a device mesh of this process's first
        ``devices`` devices (None: no mesh); the bytes are one device's.
      median: aggregate with the coordinate median, which gathers every slot's upload (the
        control: memory that grows with the cohort, and is caught).

    Returns:
      The bytes, or None where the backend reports no memory analysis.
    """
    trainable, base, lora, algorithm = _workload()
    sizes = np.full(population, 2)
    sizes[min(5, population - 1)] = largest_client
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rows = int(sizes.sum())
    data = ClientData(
        {
            "tokens": jax.ShapeDtypeStruct((rows, SEQ), jnp.int32),
            "loss_mask": jax.ShapeDtypeStruct((rows, SEQ), jnp.float32),
        },
        jnp.asarray(starts, jnp.int32),
        jnp.asarray(sizes, jnp.int32),
    )
    pipeline = (
        AggregationPipeline(identity(), coordinate_median_aggregator())
        if median
        else default_pipeline()
    )
    round_fn = make_round_fn(
        algorithm,
        next_token_loss(trainable.apply, 0),
        LocalSchedule(local_steps=2, batch_size=2),
        num_clients_total=population,
        clients_per_chunk=chunk,
        pipeline=pipeline,
        mesh=None if devices is None else client_mesh(devices),
    )
    slots = cohort_slots(num_clients, chunk, devices or 1)
    sampled = jnp.arange(slots) < num_clients
    cohort = Cohort(jnp.arange(slots, dtype=jnp.int32), sampled, sampled)
    state = jax.eval_shape(lambda: init_round_state(algorithm, lora, population, pipeline))
    frozen = jax.eval_shape(lambda: trainable.frozen(base))
    compiled = (
        jax.jit(round_fn, donate_argnums=(1,))
        .lower(frozen, state, data, cohort, jax.random.key(0), round_hparams(0.1))
        .compile()
    )
    analysis = compiled.memory_analysis()
    return None if analysis is None else int(analysis.temp_size_in_bytes)
