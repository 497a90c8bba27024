"""In-process A/B of the round engine: an earlier checkout's ``fedjax_llm/round.py`` (the engine
before the aggregation pipeline, commit 96b37a7) against the current round, on the same model,
data, clients and keys, alternating round by round in one process so load changes hit both.

Usage:
  git worktree add /tmp/old_engine 96b37a7
  python benchmarks/compare_engine.py /tmp/old_engine

Prints per workload the median round time of each engine, their ratio, and the largest
difference of the global params after all rounds (0 when the default pipeline reproduces the
old round bit for bit).
"""

import importlib.util
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from fedjax_llm import benchmarking as B
from fedjax_llm.algorithms.base import RoundInfo
from fedjax_llm.models.trainable import make_trainable
from fedjax_llm.round import make_round_fn, round_hparams
from fedjax_llm.sampling import Cohort, sample_clients

OLD = sys.argv[1] if len(sys.argv) > 1 else "/tmp/old_engine"
spec = importlib.util.spec_from_file_location(
    "old_round", os.path.join(OLD, "fedjax_llm", "round.py")
)
old = importlib.util.module_from_spec(spec)
spec.loader.exec_module(old)


def run(model, C, chunk, rounds):
    s = B.build_setup(B.MODELS[model], C, "lora", 8, 8, "float32", 0)
    apply = make_trainable(s.config, "lora", lora_rank=8, lora_targets=("q", "v")).apply
    alg = s.algorithm
    old_alg = alg._replace(
        server_update=lambda st, m, i: alg.server_update(
            st, m, RoundInfo(i.num_participants, i.num_clients_total, None), None
        )
    )
    ex = s.data.examples
    old_data = old.ClientData(
        ex["tokens"], ex["loss_mask"], s.data.client_start, s.data.client_count
    )
    old_fn = jax.jit(
        old.make_round_fn(
            old_alg,
            apply,
            s.schedule,
            num_clients_total=s.num_clients_total,
            clients_per_chunk=chunk,
            pad_id=0,
        ),
        donate_argnums=(1, 2),
    )
    new_fn = jax.jit(
        make_round_fn(
            alg,
            s.objective,
            s.schedule,
            num_clients_total=s.num_clients_total,
            clients_per_chunk=chunk,
        ),
        donate_argnums=(1,),
    )

    def copy(t):
        return jax.tree.map(jnp.copy, t)

    old_state = (copy(s.state.server), copy(s.state.clients.algorithm))
    new_state = copy(s.state)
    times = {"old": [], "new": []}
    for r in range(rounds + 2):
        ids = jnp.asarray(sample_clients(0, r, s.num_clients_total, C))
        key = jax.random.fold_in(jax.random.key(1), r)
        hp = round_hparams(B.CLIENT_LR)
        cohort = Cohort(ids, jnp.ones(C, bool), jnp.ones(C, bool))
        order = ("old", "new") if r % 2 else ("new", "old")
        for which in order:
            t0 = time.perf_counter()
            if which == "old":
                a, b, out = old_fn(s.frozen, *old_state, old_data, ids, key, hp)
                jax.block_until_ready((a, b, out))
                old_state = (a, b)
            else:
                st, out = new_fn(s.frozen, new_state, s.data, cohort, key, hp)
                jax.block_until_ready((st, out))
                new_state = st
            if r >= 2:
                times[which].append(time.perf_counter() - t0)
    diff = max(
        float(jnp.abs(x - y).max())
        for x, y in zip(
            jax.tree.leaves(old_state[0].params),
            jax.tree.leaves(new_state.server.params),
            strict=True,
        )
    )
    mo, mn = statistics.median(times["old"]), statistics.median(times["new"])
    ratios = [n / o for o, n in zip(times["old"], times["new"], strict=True)]
    print(
        f"{model} C={C} chunk={chunk}: old {mo:.4f} s, new {mn:.4f} s, new/old {mn / mo:.3f} "
        f"(median of per-round ratios {statistics.median(ratios):.3f}); "
        f"max |param diff| {diff:.2e}",
        flush=True,
    )


WORKLOADS = [
    ("tiny", 32, 8, 40),
    ("tiny", 32, 32, 40),
    ("tiny", 256, 32, 10),
    ("lora-4m", 16, 8, 8),
    ("lora-4m", 32, 8, 6),
]
for model, C, chunk, rounds in WORKLOADS:
    run(model, C, chunk, rounds)
