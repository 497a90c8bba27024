"""Memory of a compiled round does not grow with the clients per round or the largest client.

XLA's memory analysis of the compiled round (its temporary buffers: everything the program
allocates besides its arguments and outputs) is compared across cohorts of 256 and 10,000
clients of SCAFFOLD, which keeps a per-client state: chunks read their clients' rows of the
store and write them back before the next chunk runs, and each client draws its batches in
O(K * B) (`fedjax_llm.round.random_permutation_at`), so only per-slot scalars (losses, weights)
grow with the cohort. Gathering every slot's state up front (what a mesh round does) is the
control that shows the measurement can fail.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

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

POPULATION = 10_240
CHUNK = 16
SEQ = 32


@functools.cache
def _setup():
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


def round_temp_bytes(num_clients: int, largest_client: int = 2, gather: bool = False) -> int:
    """Temporary bytes of the compiled round for a cohort of ``num_clients``."""
    trainable, base, lora, algorithm = _setup()
    sizes = np.full(POPULATION, 2)
    sizes[5] = largest_client
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rows = int(sizes.sum())
    data = ClientData(
        {"tokens": jnp.zeros((rows, SEQ), jnp.int32), "loss_mask": jnp.ones((rows, SEQ))},
        jnp.asarray(starts, jnp.int32),
        jnp.asarray(sizes, jnp.int32),
    )
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), (CLIENT_AXIS,)) if gather else None
    round_fn = make_round_fn(
        algorithm,
        next_token_loss(trainable.apply, 0),
        LocalSchedule(local_steps=2, batch_size=2),
        num_clients_total=POPULATION,
        clients_per_chunk=CHUNK,
        mesh=mesh,
    )
    slots = cohort_slots(num_clients, CHUNK, 1)
    sampled = jnp.arange(slots) < num_clients
    cohort = Cohort(jnp.arange(slots, dtype=jnp.int32), sampled, sampled)
    state = jax.eval_shape(lambda: init_round_state(algorithm, lora, POPULATION))
    compiled = (
        jax.jit(round_fn, donate_argnums=(1,))
        .lower(trainable.frozen(base), state, data, cohort, jax.random.key(0), round_hparams(0.1))
        .compile()
    )
    analysis = compiled.memory_analysis()
    if analysis is None:
        pytest.skip("this backend reports no memory analysis")
    return int(analysis.temp_size_in_bytes)


@pytest.mark.slow
def test_round_memory_is_flat_in_clients_per_round():
    small, large = round_temp_bytes(256), round_temp_bytes(10_000)
    assert large <= 1.10 * small, (small, large)
    # The control: one copy of every slot's state grows with the cohort, and is caught.
    assert round_temp_bytes(10_000, gather=True) > 1.5 * small


def test_round_memory_does_not_grow_with_the_largest_client():
    assert round_temp_bytes(256, largest_client=50_000) == round_temp_bytes(256)
