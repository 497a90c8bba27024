"""Runs a federated simulation: ``python scripts/simulate.py [--config configs/X.yaml] [--a.b v]``.

With no arguments it runs the embedded default, ``configs/default.yaml``. Any config key can be
overridden with a dotted flag, e.g. ``--client.lr 0.05 --run.num_rounds 10``.
"""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "default.yaml")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, add_help=False)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="YAML experiment config")
    parser.add_argument("-h", "--help", action="store_true")
    args, overrides = parser.parse_known_args(argv)
    from fedjax_llm import (
        CohortOverflowError,
        ConfigError,
        DivergenceError,
        RunDirectoryError,
        Simulation,
    )
    from fedjax_llm.config import load_config

    if args.help:
        print(__doc__)
        print("Config keys (override any with --key value):")
        import draccus

        from fedjax_llm.config import ExperimentConfig

        draccus.parse(ExperimentConfig, args=["--help"])
        return 0
    try:
        config = load_config(os.path.normpath(args.config), overrides)
        Simulation(config, verbose=True).run()
    except (
        ConfigError,
        DivergenceError,
        RunDirectoryError,
        CohortOverflowError,
        FileNotFoundError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
