"""JAX's persistent compilation cache, shared by every run of a user.

XLA compiles the round and the evaluation programs anew in every process, which for small
models takes longer than the rounds themselves. With the cache on, a compiled program is
written to disk under a key of its HLO, compile options, devices and jax/jaxlib versions, and
a later process that builds the same program (same config, shapes and device) loads it instead
of compiling. `Simulation` calls `configure_compilation_cache` with ``run.compilation_cache_dir``
before it compiles anything; the README's "Compilation cache" has measured cold and warm starts.

The cache is trusted code: anyone who can write to its folder can make a process that reads it
run arbitrary code, so keep it in a folder only its user can write (the default is under the
user's home).
"""

from __future__ import annotations

import os
import tempfile
import warnings

import jax
from jax.experimental.compilation_cache import compilation_cache

AUTO = "auto"
"""``run.compilation_cache_dir`` value for the default folder (see `resolve_cache_dir`)."""
MIN_COMPILE_TIME_S = 0.2
"""Programs that compile faster than this are not written to the cache. The round and the
evaluation step take seconds even for the tiny default model; below the threshold are the many
small programs of eager operations (key folding, casts), which cost about as much to read back
as to compile."""
MIN_ENTRY_SIZE_BYTES = -1
"""No size threshold (-1 also stops JAX from choosing one for the file system)."""
_ENV_DIR = "JAX_COMPILATION_CACHE_DIR"


class CompilationCacheWarning(UserWarning):
    """The cache folder cannot be used; the run goes on without the cache."""


def resolve_cache_dir(setting: str | None) -> str | None:
    """The cache folder a ``run.compilation_cache_dir`` value names.

    Args:
      setting: ``auto`` (the folder JAX is already set to use, by ``jax_compilation_cache_dir``
        or the ``JAX_COMPILATION_CACHE_DIR`` environment variable, else
        ``$XDG_CACHE_HOME/fedjax_llm/xla``, by default ``~/.cache/fedjax_llm/xla``), a folder
        (``~`` is expanded), or None or an empty string for no cache.

    Returns:
      The absolute folder, or None for no cache.
    """
    if setting is None or not setting.strip():
        return None
    if setting == AUTO:
        given = jax.config.jax_compilation_cache_dir or os.environ.get(_ENV_DIR, "").strip()
        if given:
            return os.path.abspath(os.path.expanduser(given))
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return os.path.abspath(os.path.join(base, "fedjax_llm", "xla"))
    return os.path.abspath(os.path.expanduser(setting))


def _unusable(path: str) -> str | None:
    """Why the folder cannot hold the cache (created if missing), or None if it can."""
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        return err.strerror or str(err)
    return None


def configure_compilation_cache(setting: str | None) -> str | None:
    """Points JAX's persistent compilation cache at a folder, or turns it off.

    Sets ``jax_compilation_cache_dir`` and the write thresholds `MIN_COMPILE_TIME_S` and
    `MIN_ENTRY_SIZE_BYTES` (unless the environment sets them:
    ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS``, ``JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES``).
    The settings are process-wide; calling again with the same folder changes nothing, with
    another folder switches the cache over for the programs compiled from then on.

    Args:
      setting: ``run.compilation_cache_dir`` (see `resolve_cache_dir`).

    Returns:
      The folder in use, or None when the cache is off.

    Warns:
      CompilationCacheWarning: if the folder cannot be created or written; the process then
        compiles without the cache.
    """
    path = resolve_cache_dir(setting)
    if path is not None:
        problem = _unusable(path)
        if problem is not None:
            warnings.warn(
                f"run.compilation_cache_dir: cannot use {path} for the compilation cache "
                f"({problem}); compiling without it. Set run.compilation_cache_dir to a writable "
                "folder, or to null for no cache.",
                CompilationCacheWarning,
                stacklevel=2,
            )
            path = None
    if path != jax.config.jax_compilation_cache_dir:
        compilation_cache.set_cache_dir(path)
        # JAX opens its cache once per process; reopen it at the new folder.
        compilation_cache.reset_cache()
    if path is not None:
        if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
            jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_S)
        if "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES" not in os.environ:
            jax.config.update("jax_persistent_cache_min_entry_size_bytes", MIN_ENTRY_SIZE_BYTES)
    return path
