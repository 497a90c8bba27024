"""bfloat16 compute with float32 trainable weights, gradients and optimizer states.

``model.dtype: bfloat16`` runs the model's matmuls in bfloat16; every trainable weight, its
gradient, the client and server optimizer states and the uploads stay float32 (the model casts
the float32 weights to bfloat16 where it uses them, so their gradients come back float32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_llm.algorithms.base import ClientTrainState
from fedjax_llm.models import llama
from fedjax_llm.models.trainable import TRAINABLE_MODES, make_trainable
from fedjax_llm.simulation import Simulation

MAX_RELATIVE_LOSS_DIFFERENCE = 0.01
"""Band of `test_bfloat16_lora_loss_curve_tracks_float32`: per round, |bf16 - f32| / f32 of the
training loss. Measured on this tiny LoRA run (2 local AdamW steps, lr 0.02, five targets) over
8 rounds and 3 seeds: at most 0.15% (the difference grows with the rounds as the two
trajectories drift apart; at lr 0.05 it reached 1.0% by round 5). bfloat16 rounds each value to
8 significant bits (0.4%); the loss is a mean of many such values, so a 1% band after 5 rounds
leaves a margin of about 6x and still fails on a real precision fault (bfloat16 weights or
optimizer states, or a bfloat16 softmax)."""


def _floating_leaves(tree) -> list:
    return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]


def _assert_float32(tree, what: str) -> None:
    dtypes = {str(x.dtype) for x in _floating_leaves(tree)}
    assert dtypes <= {"float32"}, f"{what} holds {sorted(dtypes)} leaves"


def _lora_config(make_config, dtype: str, **run):
    return make_config(
        model={"dtype": dtype},
        trainable={"mode": "lora", "lora_targets": ("q", "v", "o", "up", "down")},
        client={"optimizer": "adamw", "lr": 0.02},
        server={"optimizer": "adam", "lr": 0.01},
        run={"save_checkpoints": False, "partition_report": False, **run},
        eval={"every": 0},
    )


def _one_client_step(sim: Simulation):
    """Shapes and dtypes of a client's gradient and train state after one local step."""
    algorithm, objective = sim.algorithm, sim.objective
    broadcast = algorithm.broadcast(sim.state.server)
    client_state = jax.tree.map(lambda x: x[0], sim.state.clients.algorithm)
    hparams = sim.hyperparams(0)
    batch_size = sim.config.client.batch_size
    batch = {
        name: jax.ShapeDtypeStruct((batch_size, *x.shape[1:]), x.dtype)
        for name, x in sim.client_data.examples.items()
    }
    batch["example_weight"] = jax.ShapeDtypeStruct((batch_size,), jnp.float32)
    frozen = sim.frozen

    def loss_fn(params, batch, key):
        return objective.loss(frozen, params, batch, key)

    def step(batch, key):
        train = algorithm.client_init(broadcast, client_state, hparams)
        grads = jax.grad(lambda p: loss_fn(p, batch, key)[0])(train.params)
        train, _ = algorithm.client_step(
            broadcast, client_state, train, batch, key, loss_fn, hparams
        )
        return grads, train

    return jax.eval_shape(step, batch, jax.random.key(0))


@pytest.mark.parametrize("mode", TRAINABLE_MODES)
@pytest.mark.parametrize("algorithm", ["fedavg", "scaffold"])
def test_bfloat16_compute_keeps_trainables_gradients_and_optimizer_states_float32(
    make_config, mode, algorithm
):
    client = {"optimizer": "sgd"} if algorithm == "scaffold" else {"optimizer": "adamw"}
    config = make_config(
        model={"dtype": "bfloat16"},
        trainable={"mode": mode},
        client=client,
        server={"optimizer": "adam"},
        algorithm={"type": algorithm},
    )
    sim = Simulation(config, verbose=False)
    _assert_float32(sim.params, "the global trainable params")
    _assert_float32(sim.state.server, "the server state (params and optimizer state)")
    _assert_float32(sim.state.clients, "the client store")
    grads, train = _one_client_step(sim)
    assert isinstance(train, ClientTrainState)
    _assert_float32(grads, "the client gradient")
    _assert_float32(train.params, "the client params after a step")
    _assert_float32(train.opt_state, "the client optimizer state")
    assert _floating_leaves(train.opt_state) or algorithm == "scaffold"


def test_full_training_of_a_bfloat16_stored_base_trains_float32_weights():
    config = llama.LlamaConfig(hidden_size=16, intermediate_size=24, num_layers=1, dtype="bfloat16")
    base = jax.tree.map(
        lambda x: x.astype(jnp.bfloat16), llama.init_params(config, jax.random.key(0))
    )
    params = make_trainable(config, "full").init(jax.random.key(1), base)
    _assert_float32(params, "full-mode trainable params of a bfloat16 base")
    np.testing.assert_array_equal(
        np.asarray(params["embed"]["embedding"]),
        np.asarray(base["embed"]["embedding"].astype(jnp.float32)),
    )


@pytest.mark.slow
def test_bfloat16_lora_loss_curve_tracks_float32(make_config):
    """The same 5-round federated LoRA run in float32 and in bfloat16 compute: per round the
    training losses differ by at most `MAX_RELATIVE_LOSS_DIFFERENCE` (1%), and after training
    every trainable and optimizer-state leaf of the bfloat16 run is still float32."""
    curves = {}
    for dtype in ("float32", "bfloat16"):
        sim = Simulation(_lora_config(make_config, dtype, num_rounds=5), verbose=False)
        history = sim.run()
        curves[dtype] = np.array([r["train_loss"] for r in history if "train_loss" in r])
        _assert_float32(sim.state, f"the {dtype} run's state after training")
    f32, bf16 = curves["float32"], curves["bfloat16"]
    assert len(f32) == len(bf16) == 5 and np.isfinite(bf16).all()
    # The runs are not the same: bfloat16 changes the losses (else the dtype had no effect).
    assert not np.array_equal(f32, bf16)
    relative = np.abs(bf16 - f32) / f32
    assert relative.max() <= MAX_RELATIVE_LOSS_DIFFERENCE, (f32, bf16, relative)
