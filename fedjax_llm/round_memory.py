"""Memory of a compiled round as XLA's memory analysis reports it.

`round_temp_bytes` compiles one round of a small SCAFFOLD + LoRA workload (a per-client state
the size of the trainable part, in a population store of ``population`` clients) for a cohort
of a given size and returns the program's temporary bytes: everything it allocates besides its
arguments and outputs. `python scripts/scale.py memory` prints it across cohort sizes; the
tests check that it stays flat.
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
    gather: bool = False,
) -> int | None:
    """Temporary bytes of the compiled round for a cohort of ``num_clients``.

    Args:
      num_clients: clients per round.
      population: clients in the store (at least ``num_clients``).
      chunk: clients per chunk.
      largest_client: examples of one client (the others have 2).
      gather: compile the variant that gathers every slot's state before training and
        scatters after (what a round sharded over a device mesh does), the control.

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
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), (CLIENT_AXIS,)) if gather else None
    round_fn = make_round_fn(
        algorithm,
        next_token_loss(trainable.apply, 0),
        LocalSchedule(local_steps=2, batch_size=2),
        num_clients_total=population,
        clients_per_chunk=chunk,
        mesh=mesh,
    )
    slots = cohort_slots(num_clients, chunk, 1)
    sampled = jnp.arange(slots) < num_clients
    cohort = Cohort(jnp.arange(slots, dtype=jnp.int32), sampled, sampled)
    state = jax.eval_shape(lambda: init_round_state(algorithm, lora, population))
    frozen = jax.eval_shape(lambda: trainable.frozen(base))
    compiled = (
        jax.jit(round_fn, donate_argnums=(1,))
        .lower(frozen, state, data, cohort, jax.random.key(0), round_hparams(0.1))
        .compile()
    )
    analysis = compiled.memory_analysis()
    return None if analysis is None else int(analysis.temp_size_in_bytes)
