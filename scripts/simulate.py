"""Runs a federated simulation: ``python scripts/simulate.py [--config configs/X.yaml] [--a.b v]``.

With no arguments it runs the embedded default, ``configs/default.yaml``. Any config key can be
overridden with a dotted flag, e.g. ``--client.lr 0.05 --run.num_rounds 10``. A mistake in the
config or the input is one line naming the key or file and the fix (exit code 2); Ctrl-C or
SIGTERM stops with the checkpoint to continue from (``--run.resume true``, exit code 130).
With ``--distributed.*`` keys each of several processes runs this same command (see
``scripts/launch_local.py`` and the README's "Several hosts").
"""

from __future__ import annotations

import argparse
import os

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "default.yaml")


def _simulate(argv: list[str] | None, context) -> int:
    parser = argparse.ArgumentParser(description=__doc__, add_help=False)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="YAML experiment config")
    parser.add_argument("-h", "--help", action="store_true")
    args, overrides = parser.parse_known_args(argv)
    if args.help:
        from fedjax_llm.config_help import config_help

        print(__doc__)
        print(config_help())
        return 0
    from fedjax_llm import distributed
    from fedjax_llm.config import load_config
    from fedjax_llm.simulation import Simulation, check_run_directory

    config = load_config(os.path.normpath(args.config), overrides)
    # Before any other JAX call: a run over several processes joins them here.
    distributed.initialize(config)
    # Before the model and data load: an unwritable or occupied run directory fails at once.
    check_run_directory(config)
    context.log_dir = config.run.output_dir
    Simulation(config, verbose=True).run()
    return 0


def main(argv: list[str] | None = None) -> int:
    from fedjax_llm.cli import run_script

    return run_script("simulate", _simulate, argv)


if __name__ == "__main__":
    from fedjax_llm.cli import exit_process

    exit_process(main())
