"""Runs a sweep: ``python scripts/sweep.py configs/sweeps/heterogeneity.yaml``.

The spec (YAML) names a base config, the sweep directory, the metric to tabulate, values per
config key (``grid:``, a cartesian product) and/or explicit runs (``runs:``); see
`fedjax_llm.sweep` for the format. Every key and every run's config is checked before the first
run. Fresh runs that differ only in seeds or learning rates run together as one compiled
program (``--no-replicas``: one by one); the others one after another. Each run has its
directory ``<output_dir>/runs/<key=value,...>`` and one progress line per start and finish;
the results go to ``<output_dir>/results.csv`` and the plots beside it. Running the same
command again skips finished runs and retries failed ones.
Exit code 0 when every run finished, 1 when a run failed, 2 for a bad spec.
"""

from __future__ import annotations

import argparse


def _sweep(argv: list[str] | None, context) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", help="the sweep spec, e.g. configs/sweeps/heterogeneity.yaml")
    parser.add_argument(
        "--list", action="store_true", help="check the spec and list its runs, run nothing"
    )
    parser.add_argument("--verbose", action="store_true", help="show each run's own progress")
    parser.add_argument(
        "--no-replicas",
        action="store_true",
        help="run every run on its own (default: seeds and learning rates as one program)",
    )
    args = parser.parse_args(argv)
    from fedjax_llm.sweep import build_runs, load_spec, run_sweep

    spec = load_spec(args.spec)
    context.log_dir = spec.output_dir
    if args.list:
        for index, run in enumerate(build_runs(spec)):
            state = "finished" if run.finished else "to run"
            print(f"{index + 1:>3}  {run.name}  ({state})")
        return 0
    result = run_sweep(spec, verbose=args.verbose, replicas=not args.no_replicas)
    ok = len(result.rows) - len(result.failed)
    print(
        f"sweep: {ok} of {len(result.rows)} runs finished, {len(result.failed)} failed "
        f"({result.wall_time_s / 60:.1f} min); results in {result.results_path}"
        + (f", plots: {', '.join(result.plots)}" if result.plots else "")
        + (
            ". Failed runs are listed with their errors in the results; the same command "
            "retries them."
            if result.failed
            else "."
        )
    )
    return 1 if result.failed else 0


def main(argv: list[str] | None = None) -> int:
    from fedjax_llm.cli import run_script

    return run_script("sweep", _sweep, argv)


if __name__ == "__main__":
    from fedjax_llm.cli import exit_process

    exit_process(main())
