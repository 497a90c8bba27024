"""Tests of fedjax_llm.compilation_cache: the folder a setting names, an unusable folder, and a
second process that loads the round and evaluation programs from the cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache as jax_cache

from fedjax_llm.compilation_cache import (
    CompilationCacheWarning,
    configure_compilation_cache,
    resolve_cache_dir,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def restore_cache_settings():
    """Puts the process-wide cache settings back (the test session's own cache, see conftest)."""
    saved = {
        name: getattr(jax.config, name)
        for name in (
            "jax_compilation_cache_dir",
            "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes",
        )
    }
    yield
    for name, value in saved.items():
        jax.config.update(name, value)
    jax_cache.reset_cache()


def test_resolve_cache_dir(monkeypatch, tmp_path, restore_cache_settings):
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "set_in_jax"))
    assert resolve_cache_dir("auto") == str(tmp_path / "set_in_jax")
    jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_cache_dir("auto") == str(tmp_path / "xdg" / "fedjax_llm" / "xla")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_cache_dir("auto") == str(tmp_path / "home" / ".cache" / "fedjax_llm" / "xla")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "from_env"))
    assert resolve_cache_dir("auto") == str(tmp_path / "from_env")
    assert resolve_cache_dir("~/c") == str(tmp_path / "home" / "c")
    assert resolve_cache_dir(None) is None
    assert resolve_cache_dir("") is None


def test_configure_sets_the_folder_and_turns_the_cache_off(tmp_path, restore_cache_settings):
    path = configure_compilation_cache(str(tmp_path / "cache"))
    assert path == str(tmp_path / "cache") and os.path.isdir(path)
    assert jax.config.jax_compilation_cache_dir == path
    assert configure_compilation_cache(None) is None
    assert jax.config.jax_compilation_cache_dir is None


def test_an_unwritable_folder_is_a_warning_and_no_cache(tmp_path, restore_cache_settings):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.warns(CompilationCacheWarning, match="compiling without it"):
        path = configure_compilation_cache(str(blocker / "cache"))
    assert path is None
    assert jax.config.jax_compilation_cache_dir is None
    # Compiling still works.
    assert int(jax.jit(lambda x: x + 1)(1)) == 2


_RUN = textwrap.dedent(
    """
    import json, logging, os, sys

    # Set before conftest is imported, so that it leaves the cache settings alone.
    os.environ["JAX_COMPILATION_CACHE_DIR"] = sys.argv[2]
    sys.path.insert(0, sys.argv[1])
    from conftest import tiny_config
    from fedjax_llm.simulation import Simulation

    hits = []

    class Hits(logging.Handler):
        def emit(self, record):
            message = record.getMessage()
            if message.startswith("Persistent compilation cache hit for"):
                hits.append(message.split("'")[1])

    compiler_log = logging.getLogger("jax._src.compiler")
    compiler_log.setLevel(logging.DEBUG)
    compiler_log.addHandler(Hits())
    config = tiny_config(
        sys.argv[3],
        trainable={"mode": "lora"},
        run={"num_rounds": 1, "save_checkpoints": False, "partition_report": False,
             "compilation_cache_dir": sys.argv[2]},
        eval={"every": 1, "per_client": False},
    )
    sim = Simulation(config, verbose=False)
    sim.run()
    print(json.dumps({"hits": hits, "compile_time_s": sim.compile_time_s,
                      "cache_dir": sim.compilation_cache_dir}))
    """
)


@pytest.mark.slow
def test_a_second_process_loads_the_round_and_evaluation_from_the_cache(tmp_path):
    cache = tmp_path / "xla_cache"
    env = {
        k: v
        for k, v in os.environ.items()
        # The test session's own cache settings must not leak into the two runs.
        if k not in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")
    }
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])

    def run(name: str) -> dict:
        result = subprocess.run(
            [sys.executable, "-c", _RUN, str(REPO / "tests"), str(cache), str(tmp_path / name)],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout.strip().splitlines()[-1])

    cold = run("cold")
    assert cold["cache_dir"] == str(cache)
    entries = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert entries, "the first run wrote nothing to the cache"
    assert not any("round_fn" in h or "eval_step" in h for h in cold["hits"])
    warm = run("warm")
    assert any("round_fn" in h for h in warm["hits"]), warm["hits"]
    assert any("eval_step" in h for h in warm["hits"]), warm["hits"]
