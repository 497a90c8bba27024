"""Initialization of LoRA factors for the Llama decoder.

References:
  Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models".
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from fedjax_llm.models.llama import LlamaConfig, lora_target_dims

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def check_lora_targets(targets: Sequence[str]) -> tuple[str, ...]:
    """Validates LoRA target names.

    Args:
      targets: Names from LORA_TARGETS.

    Returns:
      The targets as a tuple, duplicates removed, in the order given.

    Raises:
      ValueError: If `targets` is a bare string, empty, or names an unknown target.
    """
    if isinstance(targets, str):
        raise ValueError(
            f"LoRA targets must be a sequence of names, got the string {targets!r}; "
            f"write e.g. [{targets!r}]. Valid targets: {LORA_TARGETS}."
        )
    targets = tuple(dict.fromkeys(targets))
    if not targets:
        raise ValueError(f"LoRA needs at least one target; valid targets: {LORA_TARGETS}.")
    for target in targets:
        if target not in LORA_TARGETS:
            raise ValueError(f"Unknown LoRA target {target!r}; valid targets: {LORA_TARGETS}.")
    return targets


def init_lora(
    config: LlamaConfig, key: jax.Array, rank: int, targets: Sequence[str]
) -> dict[str, dict[str, jax.Array]]:
    """Initializes LoRA factors for every layer of the chosen projections.

    As in PEFT's default, `a` is Kaiming-uniform with a = sqrt(5) (uniform on
    [-1/sqrt(d_in), 1/sqrt(d_in)]) and `b` is zero, so the adapted model equals the base model at
    init. Each target draws from its own `fold_in` of `key` (by its index in LORA_TARGETS), so
    adding a target does not change the others' init.

    Args:
      config: The architecture.
      key: PRNG key.
      rank: LoRA rank r > 0.
      targets: Projections to adapt, names from LORA_TARGETS.

    Returns:
      {target: {'a': [L, d_in, r], 'b': [L, r, d_out]}}, float32.

    Raises:
      ValueError: For rank <= 0 or an unknown or empty target list.
    """
    targets = check_lora_targets(targets)
    if not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}.")
    dims = lora_target_dims(config)
    lora = {}
    for target in targets:
        d_in, d_out = dims[target]
        bound = 1.0 / math.sqrt(d_in)
        target_key = jax.random.fold_in(key, LORA_TARGETS.index(target))
        a = jax.random.uniform(
            target_key, (config.num_layers, d_in, rank), jnp.float32, -bound, bound
        )
        b = jnp.zeros((config.num_layers, rank, d_out), jnp.float32)
        lora[target] = {"a": a, "b": b}
    return lora


LORA_MODULES = {"q": "attn", "k": "attn", "v": "attn", "o": "attn"}
"""The base-model module of each LoRA target (the others live in ``mlp``)."""


def merge_into_base(base: dict, products: dict, scaling: float) -> dict:
    """The base with ``scaling * product`` added to each adapted projection's kernel.

    Args:
      base: the Llama params (``layers/{attn,mlp}/{target}_proj/kernel`` stacked ``[L, ...]``).
      products: ``{target: [L, d_in, d_out]}``.
      scaling: the LoRA scaling alpha / R.

    Returns:
      The merged base (kernels keep their dtype).
    """
    layers = dict(base["layers"])
    for target, product in products.items():
        module = LORA_MODULES.get(target, "mlp")
        block = dict(layers[module])
        proj = dict(block[f"{target}_proj"])
        kernel = proj["kernel"]
        proj["kernel"] = (kernel.astype(jnp.float32) + scaling * product).astype(kernel.dtype)
        block[f"{target}_proj"] = proj
        layers[module] = block
    return {**base, "layers": layers}


def merge_lora(base: dict, lora: dict, scaling: float) -> dict:
    """The base with a LoRA adapter merged in: ``W + scaling * A @ B`` for each target.

    Args:
      base: the Llama params.
      lora: ``{target: {'a': [L, d_in, r], 'b': [L, r, d_out]}}`` (`init_lora`'s layout).
      scaling: the adapter's alpha / rank.

    Returns:
      The merged params; the model with them computes what the base with the adapter does (up
      to float rounding), with no adapter.
    """
    products = {
        target: jnp.einsum("lir,lro->lio", f["a"].astype(jnp.float32), f["b"].astype(jnp.float32))
        for target, f in lora.items()
    }
    return merge_into_base(base, products, scaling)
