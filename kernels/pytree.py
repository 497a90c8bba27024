"""The one pytree alias of the project."""

from typing import Any

PyTree = Any
"""A nested structure of arrays (dicts, lists, tuples, NamedTuples) that `jax.tree` maps over."""
