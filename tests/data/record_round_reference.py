"""Records round outputs of the engine before the aggregation-pipeline change (commit 96b37a7).

Kept for the record: it calls that engine's API and does not run against later versions.
"""
import sys, os
sys.path.insert(0, "/work/main/tests"); sys.path.insert(0, "/work/main")
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, jax.numpy as jnp, numpy as np, optax
from fedjax_llm.algorithms import make_fedavg, make_fedprox, make_scaffold
from fedjax_llm.models.llama import LlamaConfig, init_params
from fedjax_llm.models.trainable import make_trainable
from fedjax_llm.round import ClientData, LocalSchedule, make_round_fn, round_hparams

def sgd(lr=0.1):
    return optax.inject_hyperparams(optax.sgd)(learning_rate=lr)

cfg = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2, max_seq_len=16)
trainable = make_trainable(cfg, "lora", lora_rank=4, lora_targets=("q", "v", "down"))
base = init_params(cfg, jax.random.key(0))
lora = jax.tree.map(lambda x: x + 0.05, trainable.init(jax.random.key(1), base))
sizes = [3 + (i % 4) for i in range(8)]
rng = np.random.default_rng(2)
n = sum(sizes)
tokens = rng.integers(1, 32, size=(n, 8)).astype(np.int32)
loss_mask = np.ones((n, 8), np.float32); loss_mask[:, 0] = 0
starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32)
data = ClientData(jnp.asarray(tokens), jnp.asarray(loss_mask), jnp.asarray(starts), jnp.asarray(np.asarray(sizes, np.int32)))
out = {"tokens": tokens, "loss_mask": loss_mask, "sizes": np.asarray(sizes)}
ids = jnp.asarray([5, 0, 3, 6], jnp.int32)
cases = {
  "fedavg": (make_fedavg(sgd(), optax.sgd(1.0)), 2, None),
  "fedavg_epochs": (make_fedavg(sgd(), optax.sgd(1.0)), 2, 1.0),
  "fedadam": (make_fedavg(sgd(), optax.adam(0.01, eps=1e-3)), None, 1.0),
  "fedprox": (make_fedprox(sgd(), optax.sgd(1.0), mu=0.5), 1, None),
  "scaffold": (make_scaffold(sgd(), optax.sgd(1.0)), 2, 1.0),
}
for name, (alg, chunk, epochs) in cases.items():
    sched = LocalSchedule(3, 2, max(sizes), local_epochs=epochs)
    store = jax.tree.map(lambda x: jnp.stack([x] * 8), alg.client_state_init(lora))
    if name == "scaffold":
        store = jax.tree.map(lambda x: x + 0.01 * jnp.arange(8).reshape((-1,) + (1,) * (x.ndim - 1)), store)
    fn = jax.jit(make_round_fn(alg, trainable.apply, sched, num_clients_total=8, clients_per_chunk=chunk, pad_id=0))
    state = alg.server_init(lora)
    for r in range(2):
        state, store, o = fn(trainable.frozen(base), state, store, data, jnp.roll(ids, r), jax.random.fold_in(jax.random.key(7), r), round_hparams(0.1))
    for i, leaf in enumerate(jax.tree.leaves(state.params)):
        out[f"{name}/params/{i}"] = np.asarray(leaf)
    for i, leaf in enumerate(jax.tree.leaves(store)):
        out[f"{name}/store/{i}"] = np.asarray(leaf)
    out[f"{name}/train_loss"] = np.asarray(o.train_loss)
    out[f"{name}/client_loss"] = np.asarray(o.client_loss)
    out[f"{name}/weights"] = np.asarray(o.weights)
# A whole simulation on the test suite's tiny config.
from conftest import tiny_config
import fedjax_llm, tempfile
for name, sections in {"sim_fedavg": {}, "sim_scaffold_lora": {"algorithm": {"name": "scaffold"}, "trainable": {"mode": "lora"}, "client": {"optimizer": "sgd", "lr": 0.5, "local_steps": 2, "batch_size": 4}}}.items():
    config = tiny_config(tempfile.mkdtemp(), **sections)
    sim = fedjax_llm.Simulation(config, verbose=False)
    hist = sim.run()
    out[f"{name}/train_loss"] = np.asarray([h["train_loss"] for h in hist if "train_loss" in h])
    out[f"{name}/eval_loss"] = np.asarray([h["eval/loss"] for h in hist if "eval/loss" in h])
    for i, leaf in enumerate(jax.tree.leaves(sim.params)):
        out[f"{name}/params/{i}"] = np.asarray(leaf)
np.savez_compressed("/work/main/tests/data/round_reference.npz", **out)
print(sorted(out))
