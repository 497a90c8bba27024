"""Runs one simulation as several processes on this machine, joined by `jax.distributed`.

``python scripts/launch_local.py --processes 2 [--cpu-devices 2] -- --config configs/X.yaml``
starts ``scripts/simulate.py`` once per process with the ``--distributed.*`` keys of a local
launch (coordinator ``localhost:<free port>``, process ids 0 to N-1) and ``--run.devices 0``
(the clients are sharded over the devices of all processes); everything after ``--`` goes to
every process unchanged. Process 0 prints and writes the run directory; the others are silent.
If one process fails, the others are stopped; the exit code is the first failure's (or 0).

``--cpu-devices K`` runs every process on the CPU with K devices (a way to try a multi-host
run on a laptop); ``--gpus-per-process K`` gives process i the accelerators i*K to i*K+K-1.
On a cluster, start ``scripts/simulate.py`` on every host instead (see the README's
"Several hosts").
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time

SIMULATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "simulate.py")


def free_port() -> int:
    """A TCP port that is free on this machine now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def process_commands(
    num_processes: int,
    port: int,
    simulate_args: list[str],
    *,
    cpu_devices: int | None = None,
    gpus_per_process: int | None = None,
) -> list[tuple[list[str], dict[str, str]]]:
    """The command line and environment of each local process.

    Args:
      num_processes: how many processes.
      port: the coordinator's port on localhost.
      simulate_args: arguments of ``scripts/simulate.py`` shared by all processes.
      cpu_devices: run on the CPU with this many devices per process.
      gpus_per_process: give process i the accelerators ``i*K .. i*K+K-1``.

    Returns:
      ``[(argv, env), ...]``, process 0 first.
    """
    out = []
    for i in range(num_processes):
        argv = [
            sys.executable,
            SIMULATE,
            *simulate_args,
            "--distributed.coordinator_address",
            f"localhost:{port}",
            "--distributed.num_processes",
            str(num_processes),
            "--distributed.process_id",
            str(i),
            "--run.devices",
            "0",
        ]
        env = dict(os.environ)
        if cpu_devices is not None:
            env["JAX_PLATFORMS"] = "cpu"
            flags = env.get("XLA_FLAGS", "").split()
            flags = [f for f in flags if not f.startswith("--xla_force_host_platform_device_count")]
            env["XLA_FLAGS"] = " ".join(
                [*flags, f"--xla_force_host_platform_device_count={cpu_devices}"]
            )
        if gpus_per_process is not None:
            ids = range(i * gpus_per_process, (i + 1) * gpus_per_process)
            argv += ["--distributed.local_device_ids", ",".join(map(str, ids))]
        out.append((argv, env))
    return out


def run_processes(commands: list[tuple[list[str], dict[str, str]]], poll_s: float = 0.2) -> int:
    """Starts the processes and waits for all of them.

    When one fails the others are stopped (they would otherwise wait for it until JAX's
    heartbeat timeout); Ctrl-C is passed on to all of them.

    Returns:
      The exit code of the first process that failed, else 0.
    """
    procs = [subprocess.Popen(argv, env=env) for argv, env in commands]
    failed = 0
    try:
        while any(p.poll() is None for p in procs):
            bad = [p.returncode for p in procs if p.returncode not in (None, 0)]
            if bad and not failed:
                failed = bad[0]
                for p in procs:
                    if p.poll() is None:
                        p.terminate()
            time.sleep(poll_s)
    except KeyboardInterrupt:
        # Ctrl-C reached every process of the terminal's group; give them time to stop cleanly.
        deadline = time.monotonic() + 30
        for p in procs:
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGTERM)
                p.wait()
    if not failed:
        failed = next((p.returncode for p in procs if p.returncode != 0), 0)
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--processes", type=int, default=2, help="number of processes")
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: free)")
    parser.add_argument("--cpu-devices", type=int, default=None, help="CPU devices per process")
    parser.add_argument(
        "--gpus-per-process", type=int, default=None, help="accelerators per process"
    )
    args, rest = parser.parse_known_args(argv)
    if rest and rest[0] == "--":
        rest = rest[1:]
    if args.processes < 1:
        parser.error("--processes must be at least 1")
    commands = process_commands(
        args.processes,
        args.port or free_port(),
        rest,
        cpu_devices=args.cpu_devices,
        gpus_per_process=args.gpus_per_process,
    )
    return run_processes(commands)


if __name__ == "__main__":
    sys.exit(main())
