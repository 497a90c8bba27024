"""Scale checks: memory of a round across clients per round, and a million-client population.

Usage:
  python scripts/scale.py memory                  # XLA temp bytes at 256, 1,000, 10,000 clients
  python scripts/scale.py memory --devices 4      # ... and per device, sharded over 4 devices
  python scripts/scale.py population              # 1,000,000 clients, host-resident SCAFFOLD
  python scripts/scale.py population --clients 1000000 --per-round 1000 --rounds 5
  python scripts/scale.py replicas --seeds 3     # 3 seeds: one by one, then as one program

``memory`` compiles one round of a SCAFFOLD + LoRA workload per cohort size and prints XLA's
temporary bytes (`fedjax_llm.round_memory`): on one device, per device of the round sharded
over ``--devices`` devices (host CPU devices here), and with the coordinate median, which
gathers every slot's upload (memory that grows with the cohort, for contrast). ``population``
runs a federated simulation of a population of clients with one short example each and a
per-client SCAFFOLD control variate for every client, the examples and the control store on the
host (the store memory-mapped in a temporary folder), and prints the round times, the host's
peak memory and the disk the store's touched rows take.
``replicas`` runs the default config (``configs/default.yaml``, LoRA) for several seeds one
after another and then as one `fedjax_llm.replicas.ReplicaGroup`, and prints the wall time of
each way (setup, compile, rounds and evaluation included; a fresh compilation cache shared
by both, so the runs one by one compile once) and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import tempfile
import time

import numpy as np


def memory(args: argparse.Namespace) -> dict:
    # Before JAX starts: the host platform's device count for the mesh.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
    )
    from fedjax_llm.round_memory import round_temp_bytes

    rows = []
    for clients in args.clients or (256, 1000, 10_000):
        streamed = round_temp_bytes(clients)
        sharded = round_temp_bytes(clients, devices=args.devices)
        median = round_temp_bytes(clients, median=True)
        rows.append(
            {
                "clients": clients,
                "temp_bytes": streamed,
                "mesh_devices": args.devices,
                "mesh_temp_bytes": sharded,
                "median_temp_bytes": median,
            }
        )
        print(
            f"{clients:>6} clients/round: {streamed / 2**20:8.2f} MiB temporary, "
            f"{sharded / 2**20:8.2f} MiB per device sharded over {args.devices} "
            f"(coordinate median, every upload gathered: {median / 2**20:8.2f} MiB)",
            flush=True,
        )
    base = rows[0]["temp_bytes"]
    print(f"largest / smallest cohort: {max(r['temp_bytes'] for r in rows) / base:.3f}")
    return {"memory": rows}


def population(args: argparse.Namespace) -> dict:
    from fedjax_llm import Simulation
    from fedjax_llm.config import load_config
    from fedjax_llm.data import ClientArrays

    n, seq = args.clients, 32
    rng = np.random.default_rng(0)
    data = ClientArrays(
        examples={
            "tokens": rng.integers(3, 200, (n, seq), dtype=np.int32),
            "loss_mask": np.ones((n, seq), np.float32),
        },
        client_start=np.arange(n, dtype=np.int64),
        client_count=np.ones(n, np.int64),
    )
    work = tempfile.mkdtemp(prefix="fedjax_llm_scale_")
    config = load_config(
        None,
        [
            "--algorithm.type",
            "scaffold",
            "--trainable.mode",
            "lora",
            "--client.optimizer",
            "sgd",
            "--client.lr",
            "0.5",
            "--client.local_steps",
            "2",
            "--client.batch_size",
            "2",
            "--data.num_clients",
            str(n),
            "--run.client_data",
            "host",
            "--run.client_store_dir",
            os.path.join(work, "store"),
            "--run.num_rounds",
            str(args.rounds),
            "--run.num_clients_per_round",
            str(args.per_round),
            "--run.save_checkpoints",
            "false",
            "--run.partition_report",
            "false",
            "--run.output_dir",
            os.path.join(work, "run"),
            "--eval.every",
            "0",
        ],
    )
    t0 = time.perf_counter()
    sim = Simulation(config, data=data, verbose=False)
    setup = time.perf_counter() - t0
    history = sim.run()
    times = [h["round_time_s"] for h in history if "round_time_s" in h]
    store_dir = os.path.join(work, "store")
    disk = subprocess.run(
        ["du", "-s", "--block-size=1", store_dir], capture_output=True, text=True
    ).stdout
    result = {
        "clients": n,
        "per_round": args.per_round,
        "placement": sim.placement,
        "clients_per_chunk": sim.clients_per_chunk,
        "store_bytes": sim.host_store.nbytes,
        "store_disk_bytes": int(disk.split()[0]) if disk else None,
        "setup_s": setup,
        "compile_s": sim.compile_time_s,
        "median_round_s": float(np.median(times[1:] if len(times) > 1 else times)),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    print(json.dumps(result, indent=1))
    return {"population": result}


def replicas(args: argparse.Namespace) -> dict:
    from fedjax_llm import Simulation
    from fedjax_llm.config import load_config
    from fedjax_llm.replicas import ReplicaGroup

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
    work = tempfile.mkdtemp(prefix="fedjax_llm_replicas_")

    def configs(tag: str) -> list:
        return [
            load_config(
                os.path.join(root, "configs", "default.yaml"),
                [
                    "--trainable.mode",
                    "lora",
                    "--run.seed",
                    str(seed),
                    "--run.num_rounds",
                    str(args.rounds),
                    "--run.save_checkpoints",
                    "false",
                    "--run.partition_report",
                    "false",
                    "--run.compilation_cache_dir",
                    "",
                    "--eval.every",
                    str(args.rounds),
                    "--eval.max_new_tokens",
                    "0",
                    "--run.output_dir",
                    os.path.join(work, f"{tag}{seed}"),
                ],
            )
            for seed in range(args.seeds)
        ]

    t0 = time.perf_counter()
    for config in configs("alone"):
        Simulation(config, verbose=False).run()
    alone = time.perf_counter() - t0
    t0 = time.perf_counter()
    group = ReplicaGroup([Simulation(c, verbose=False) for c in configs("group")])
    group.run()
    together = time.perf_counter() - t0
    assert all(err is None for err in group.errors), group.errors
    result = {
        "seeds": args.seeds,
        "rounds": args.rounds,
        "one_by_one_s": alone,
        "one_program_s": together,
        "speedup": alone / together,
        "group_compile_s": group.compile_time_s,
        "group_median_round_s": float(np.median(group.round_times[1:] or group.round_times)),
    }
    print(json.dumps(result, indent=1))
    return {"replicas": result}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="what", required=True)
    m = sub.add_parser("memory")
    m.add_argument("--clients", type=int, nargs="+")
    m.add_argument("--devices", type=int, default=2, help="devices of the sharded round")
    p = sub.add_parser("population")
    p.add_argument("--clients", type=int, default=1_000_000)
    p.add_argument("--per-round", type=int, default=100)
    p.add_argument("--rounds", type=int, default=5)
    r = sub.add_parser("replicas")
    r.add_argument("--seeds", type=int, default=3)
    r.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()
    result = {"memory": memory, "population": population, "replicas": replicas}[args.what](args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
