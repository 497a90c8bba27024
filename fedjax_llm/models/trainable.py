"""What a federated client trains, and how the model uses it.

A `Trainable` splits the model into a frozen part, shared by every client (closed over or
`in_axes=None` under `jax.vmap`), and a trainable pytree that carries the client axis. The four
modes cover federated pre-training / full fine-tuning, LoRA fine-tuning and prompt tuning.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_llm.models import llama
from fedjax_llm.models.llama import LlamaConfig
from fedjax_llm.models.lora import check_lora_targets, init_lora
from fedjax_llm.models.prefix import init_prefix
from fedjax_llm.models.soft_prompt import PROMPT_INITS, init_soft_prompt

TRAINABLE_MODES = ("full", "lora", "soft_prompt", "prefix")
PROMPT_KEY = "prompt"
"""Where a LoRA trainable holds its soft prompt (``lora_soft_prompt``)."""
PROMPT_STREAM = 1000
"""The ``fold_in`` of the LoRA init key that draws that soft prompt."""


class Trainable(NamedTuple):
    """What a client trains and how the model uses it.

    Attributes:
      mode: One of TRAINABLE_MODES.
      config: The architecture.
      init: (key, base_params) -> the initial trainable pytree.
      frozen: base_params -> the frozen pytree shared by all clients ({} for 'full', the base
        params otherwise).
      model_inputs: (frozen, trainable) -> (base params, keyword arguments of `Llama.__call__`
        such as `lora`/`lora_scaling`, `prompt_embeddings` or `prefix`). Everything that runs the
        model (training, evaluation, generation) goes through it.
      apply: (frozen, trainable, tokens [B, T], attention_mask=None, adapter=True, head=None) ->
        logits [B, T, V] float32. `attention_mask` is an optional bool [B, T] (True = real
        token); right padding needs none, since causal attention never lets real tokens see the
        pads after them. `adapter=False` runs the frozen base without the trainable part (LoRA,
        prompt or prefix switched off; not for 'full'): the reference model of DPO. With
        ``head=fn`` the output projection is replaced by ``fn(hidden, kernel)`` and its result
        returned (see `Llama.__call__`): how the next-token loss fuses it with the cross entropy.
    """

    mode: str
    config: LlamaConfig
    init: Callable[[jax.Array, dict], Any]
    frozen: Callable[[dict], Any]
    model_inputs: Callable[[Any, Any], tuple[dict, dict[str, Any]]]
    apply: Callable[..., jax.Array]


def make_trainable(
    model_config: LlamaConfig,
    mode: str,
    *,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_targets: Sequence[str] = ("q", "v"),
    num_virtual_tokens: int = 8,
    prompt_init: str = "vocab",
    lora_soft_prompt: int = 0,
) -> Trainable:
    """Builds the `Trainable` for a mode.

    Args:
      model_config: The architecture.
      mode: 'full' trains all base params (fine-tuning, or pre-training from a random init);
        'lora' trains LoRA factors (Hu et al. 2021) with scaling lora_alpha / lora_rank;
        'soft_prompt' trains prepended input vectors (Lester et al. 2021); 'prefix' trains
        per-layer key/value prefixes (Li & Liang 2021).
      lora_rank: LoRA rank ('lora' only).
      lora_alpha: LoRA alpha ('lora' only).
      lora_targets: Projections LoRA adapts, names from LORA_TARGETS ('lora' only).
      num_virtual_tokens: Soft prompt or prefix length P ('soft_prompt' / 'prefix' only).
      prompt_init: Soft prompt init, one of PROMPT_INITS ('soft_prompt', and the soft prompt
        of ``lora_soft_prompt``).
      lora_soft_prompt: 'lora' only: also train a soft prompt of this many virtual tokens,
        held beside the factors under `PROMPT_KEY` (kept per client by the ``personal_prompt``
        algorithm: a personal soft prompt on a shared LoRA); 0 trains none.

    Returns:
      The Trainable.

    Raises:
      ValueError: For an unknown mode, an invalid model config, or invalid options of the chosen
        mode (checked here, so mistakes surface before any training starts).
    """
    model_config.validate()
    config = model_config
    if mode not in TRAINABLE_MODES:
        raise ValueError(f"Unknown trainable mode {mode!r}; choose one of {TRAINABLE_MODES}.")
    if mode in ("soft_prompt", "prefix") and (
        not isinstance(num_virtual_tokens, int) or num_virtual_tokens <= 0
    ):
        raise ValueError(
            f"num_virtual_tokens must be a positive integer, got {num_virtual_tokens!r}."
        )

    uses_prompt = mode == "soft_prompt" or (mode == "lora" and lora_soft_prompt)
    if uses_prompt and prompt_init not in PROMPT_INITS:
        raise ValueError(f"Unknown prompt_init {prompt_init!r}; choose one of {PROMPT_INITS}.")

    frozen: Callable[[dict], Any] = _identity
    if mode == "full":

        def init(key: jax.Array, base_params: dict) -> Any:
            del key  # The trainable part is the base itself,
            # in float32 whatever its storage dtype (`pretrained.load_dtype`): bfloat16 weights
            # would round away updates smaller than 1/256 of a weight, and the optimizer states
            # built from them would be bfloat16 too.
            if all(x.dtype == jnp.float32 for x in jax.tree.leaves(base_params)):
                return base_params
            return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), base_params)

        def model_inputs(frozen_params: Any, trainable: Any) -> tuple[dict, dict[str, Any]]:
            del frozen_params
            return trainable, {}

        frozen = _nothing

    elif mode == "lora":
        targets = check_lora_targets(lora_targets)
        if not isinstance(lora_rank, int) or lora_rank <= 0:
            raise ValueError(f"lora_rank must be a positive integer, got {lora_rank!r}.")
        scaling = lora_alpha / lora_rank
        if not isinstance(lora_soft_prompt, int) or lora_soft_prompt < 0:
            raise ValueError(
                f"lora_soft_prompt must be a non-negative integer, got {lora_soft_prompt!r}."
            )

        def init(key: jax.Array, base_params: dict) -> Any:
            lora = init_lora(config, key, lora_rank, targets)
            if lora_soft_prompt:
                # Its own stream (LoRA's targets fold in their indices in LORA_TARGETS).
                prompt_key = jax.random.fold_in(key, PROMPT_STREAM)
                lora[PROMPT_KEY] = init_soft_prompt(
                    config, base_params, prompt_key, lora_soft_prompt, prompt_init
                )
            return lora

        def model_inputs(frozen_params: Any, trainable: Any) -> tuple[dict, dict[str, Any]]:
            if PROMPT_KEY not in trainable:
                return frozen_params, {"lora": trainable, "lora_scaling": scaling}
            factors = {k: v for k, v in trainable.items() if k != PROMPT_KEY}
            return frozen_params, {
                "lora": factors,
                "lora_scaling": scaling,
                "prompt_embeddings": trainable[PROMPT_KEY],
            }

    elif mode == "soft_prompt":

        def init(key: jax.Array, base_params: dict) -> Any:
            return init_soft_prompt(config, base_params, key, num_virtual_tokens, prompt_init)

        def model_inputs(frozen_params: Any, trainable: Any) -> tuple[dict, dict[str, Any]]:
            return frozen_params, {"prompt_embeddings": trainable}

    else:  # prefix

        def init(key: jax.Array, base_params: dict) -> Any:
            del base_params
            return init_prefix(config, key, num_virtual_tokens)

        def model_inputs(frozen_params: Any, trainable: Any) -> tuple[dict, dict[str, Any]]:
            return frozen_params, {"prefix": trainable}

    def apply(
        frozen_params: Any,
        trainable: Any,
        tokens: jax.Array,
        attention_mask: jax.Array | None = None,
        adapter: bool = True,
        head: Callable[[jax.Array, jax.Array], Any] | None = None,
    ) -> Any:
        if not adapter:
            # The frozen base alone (the adapter switched off): the reference model of
            # preference losses, at no extra copy of the weights.
            if mode == "full":
                raise ValueError(
                    "trainable.mode='full' has no frozen base apart from what clients train, so "
                    "the model cannot run with the adapter switched off."
                )
            return llama.apply(
                config, frozen_params, tokens, attention_mask=attention_mask, head=head
            )
        params, kwargs = model_inputs(frozen_params, trainable)
        return llama.apply(
            config, params, tokens, attention_mask=attention_mask, head=head, **kwargs
        )

    return Trainable(mode, config, init, frozen, model_inputs, apply)


def _identity(base_params: dict) -> dict:
    # The whole base is frozen and shared; it is never copied per client.
    return base_params


def _nothing(base_params: dict) -> dict:
    # Full training: the base is the trainable part, nothing stays frozen.
    del base_params
    return {}
