"""Measures what the persistent compilation cache saves at the start of a run.

Usage:
  python scripts/compile_cache_timing.py                        # default config and lora.yaml
  python scripts/compile_cache_timing.py --configs configs/lora.yaml --pairs 5

For each config and each of ``--pairs`` repetitions it runs ``scripts/simulate.py --run.num_rounds
1`` as separate processes: once with the cache off, then twice with a fresh, empty cache folder
(``cold``: compiles and writes the cache; ``warm``: the same command again, loading the round,
the evaluation step and the model init from it). Each process is timed from start to exit (a
1-round run: model and data setup, the evaluation before training, the first round, the final
evaluation); the round's compile time is read from the run's metrics.jsonl. It prints the
medians, the CPU model and the 1-minute load average before and after (compare only numbers
measured on an idle machine), and writes them as JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIGS = ("configs/default.yaml", "configs/lora.yaml")
KINDS = ("off", "cold", "warm")


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo), or the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_once(config: str, cache_dir: str | None, output_dir: str) -> dict:
    """One ``simulate.py`` process of one round; returns its wall time and round compile time."""
    cmd = [
        sys.executable,
        os.path.join(REPO, "scripts", "simulate.py"),
        "--config",
        config,
        "--run.num_rounds",
        "1",
        "--run.output_dir",
        output_dir,
        "--run.compilation_cache_dir",
        cache_dir if cache_dir is not None else "null",
    ]
    env = dict(os.environ)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    t0 = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stdout[-2000:]}{result.stderr}")
    compile_s = None
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if "compile_time_s" in record:
                compile_s = record["compile_time_s"]
    return {"process_s": wall, "round_compile_s": compile_s}


def measure(config: str, pairs: int) -> dict:
    """Median process and round-compile times of ``off``, ``cold`` and ``warm`` runs."""
    samples: dict[str, list[dict]] = {kind: [] for kind in KINDS}
    with tempfile.TemporaryDirectory(prefix="compile_cache_timing-") as tmp:
        for i in range(pairs):
            samples["off"].append(run_once(config, None, os.path.join(tmp, f"off{i}")))
            cache = os.path.join(tmp, f"cache{i}")  # fresh and empty for every pair
            for kind in ("cold", "warm"):
                samples[kind].append(run_once(config, cache, os.path.join(tmp, f"{kind}{i}")))
    out = {}
    for kind, runs in samples.items():
        out[kind] = {
            key: {
                "median": statistics.median(r[key] for r in runs),
                "samples": [round(r[key], 3) for r in runs],
            }
            for key in ("process_s", "round_compile_s")
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS))
    parser.add_argument("--pairs", type=int, default=3, help="cold/warm pairs per config")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    results = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "load_1min_before": os.getloadavg()[0],
        "configs": {},
    }
    for config in args.configs:
        results["configs"][config] = measure(config, args.pairs)
    results["load_1min_after"] = os.getloadavg()[0]
    print(
        f"{results['cpu']}, {results['cores']} cores; 1-min load average "
        f"{results['load_1min_before']:.2f} before, {results['load_1min_after']:.2f} after"
    )
    print(
        f"{'config':<22} {'cache':<5} {'process s':>10} {'round compile s':>16}  (medians of "
        f"{args.pairs})"
    )
    for config, by_kind in results["configs"].items():
        for kind in KINDS:
            row = by_kind[kind]
            print(
                f"{config:<22} {kind:<5} {row['process_s']['median']:>10.2f} "
                f"{row['round_compile_s']['median']:>16.2f}"
            )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
