"""Model FLOPs of the Llama decoder per training token, for throughput and MFU reporting.

Only matrix products are counted, each as ``2 * m * n * k`` (a multiply and an add): the q/k/v/o
and gate/up/down projections, the LM head (``D * V``, tied to the embedding or not), the LoRA
factors where present, and attention's scores and weighted values. Norms, rotary embeddings,
softmax, SiLU, the loss and the optimizer are not counted; they are small next to the matrix
products and are not what a matmul peak measures. Attention is counted over the full key length
of every query: causal masking is *not* subtracted, as in PaLM's MFU accounting (Chowdhery et
al. 2022, appendix B). The model computes that much up to `llama.ATTENTION_QUERY_BLOCK`
positions; beyond, its query blocks skip the keys after each block, so at long sequences the
count includes attention products the model does not run.

The counts are *model* FLOPs: what the mathematics of one training step needs, independent of
how it is implemented (no rematerialization). They are exact closed forms of the shapes, so MFU
computed from them is comparable across devices and implementations.

References:
  Chowdhery et al. 2022, "PaLM: Scaling Language Modeling with Pathways" (MFU, appendix B).
  Kaplan et al. 2020, "Scaling Laws for Neural Language Models" (the 2N / 6N per-token rule).
  Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models".
"""

from __future__ import annotations

from collections.abc import Sequence

from fedjax_llm.models.llama import LlamaConfig, lora_target_dims

FLOP_MODES = ("full", "lora", "soft_prompt", "prefix")
_FIRST_LAYER_INPUT_TARGETS = ("q", "k", "v")


def matmul_params(config: LlamaConfig) -> int:
    """Number of weights that take part in a matrix product for every token.

    The q/k/v/o and gate/up/down kernels of every layer plus the LM head (``D * V``, counted once
    whether or not it is tied to the embedding). The embedding lookup is a gather, not a matrix
    product, and norm scales and biases are elementwise, so neither is counted.

    Args:
      config: The architecture.

    Returns:
      The count N of the ``2 N`` forward FLOPs per token rule (attention excluded).
    """
    dims = lora_target_dims(config)
    per_layer = sum(d_in * d_out for d_in, d_out in dims.values())
    return config.num_layers * per_layer + config.hidden_size * config.vocab_size


def _check_mode(mode: str, num_virtual_tokens: int) -> None:
    if mode not in FLOP_MODES:
        raise ValueError(f"Unknown trainable mode {mode!r}; choose one of {FLOP_MODES}.")
    if num_virtual_tokens < 0:
        raise ValueError(f"num_virtual_tokens must be >= 0, got {num_virtual_tokens}.")


def _lora_forward_per_position(
    config: LlamaConfig, lora_rank: int, lora_targets: Sequence[str]
) -> int:
    # (x @ a) @ b per layer and target: 2 * d_in * r + 2 * r * d_out.
    dims = lora_target_dims(config)
    unknown = [t for t in lora_targets if t not in dims]
    if unknown:
        raise ValueError(f"Unknown LoRA targets {unknown}; valid targets are {tuple(dims)}.")
    per_layer = sum(2 * lora_rank * (dims[t][0] + dims[t][1]) for t in dict.fromkeys(lora_targets))
    return config.num_layers * per_layer


def _shapes(config: LlamaConfig, seq_len: int, mode: str, num_virtual_tokens: int):
    """Positions the layers run over and keys each query attends to."""
    positions, keys = seq_len, seq_len
    if mode == "soft_prompt":
        # The prompt vectors are prepended: every layer runs (and attends) over T + P positions.
        positions = keys = seq_len + num_virtual_tokens
    elif mode == "prefix":
        # Prefix keys/values are prepended to each layer's keys only.
        keys = seq_len + num_virtual_tokens
    return positions, keys


def _attention_forward_per_position(config: LlamaConfig, keys: int) -> int:
    # Scores q.k and the weighted sum of values: 2 products of 2 * keys * H * hd per query.
    hd = config.resolved_head_dim
    return config.num_layers * 2 * 2 * keys * config.num_heads * hd


def forward_flops_per_token(
    config: LlamaConfig,
    seq_len: int,
    mode: str = "full",
    lora_rank: int = 8,
    lora_targets: Sequence[str] = ("q", "v"),
    num_virtual_tokens: int = 0,
) -> float:
    """FLOPs of the forward pass per real token of a ``seq_len`` sequence.

    ``2 * matmul_params`` plus attention (``4 * keys * H * hd`` per layer per position), plus
    the unmerged LoRA factors in 'lora' mode. A soft prompt of P vectors makes every layer run
    over ``T + P`` positions (the LM head still only over the T real ones); a prefix adds P keys
    to every query. The total per sequence is divided by the T real tokens.

    Args:
      config: The architecture.
      seq_len: Real tokens per sequence T.
      mode: One of FLOP_MODES ('full', 'lora', 'soft_prompt', 'prefix').
      lora_rank: LoRA rank r ('lora' only).
      lora_targets: Projections LoRA adapts ('lora' only).
      num_virtual_tokens: Soft prompt or prefix length P ('soft_prompt' / 'prefix' only).

    Returns:
      Forward FLOPs per real token.

    Raises:
      ValueError: For an unknown mode or LoRA target, or a negative P.
    """
    _check_mode(mode, num_virtual_tokens)
    positions, keys = _shapes(config, seq_len, mode, num_virtual_tokens)
    head = 2 * config.hidden_size * config.vocab_size
    layers = 2 * (matmul_params(config) - config.hidden_size * config.vocab_size)
    layers += _attention_forward_per_position(config, keys)
    if mode == "lora":
        layers += _lora_forward_per_position(config, lora_rank, lora_targets)
    return (positions * layers + seq_len * head) / seq_len


def train_flops_per_token(
    config: LlamaConfig,
    seq_len: int,
    mode: str,
    lora_rank: int = 8,
    lora_targets: Sequence[str] = ("q", "v"),
    num_virtual_tokens: int = 0,
) -> float:
    """FLOPs of one training step (forward + backward) per real token.

    The backward pass of ``y = x @ W`` has two products of the forward's size: the activation
    gradient ``dy @ W.T`` and the weight gradient ``x.T @ dy``. Activation gradients are
    counted for every product, as the gradient must flow back through the frozen base to reach
    any trainable part; weight gradients only for trainable weights:

    - 'full': all weights are trained, so the step costs 3x the forward pass.
    - 'lora': forward + activation gradients, with no weight gradient for the frozen base
      matrices; the LoRA factors add their own forward and both their gradients (2x their
      forward), counted in full.
    - 'soft_prompt' / 'prefix': forward + activation gradients only; the prompt's gradient is
      an activation gradient, and the prefix's is part of attention's backward over its P keys.

    Attention's two products have activations on both sides, so its backward is counted as 2x its
    forward in every mode. When the token embedding is frozen (every mode but 'full'), no gradient
    is needed with respect to the real tokens' embeddings, so the first layer's q/k/v input
    gradients at the T real positions (base and LoRA factors) are not counted: our layers are a
    `jax.lax.scan` and do compute them, but they are not model FLOPs. Other first-layer
    gradients that no trainable tensor needs, which depend on the LoRA targets (e.g. the key
    gradient when k is frozen), are still counted: a small overcount, at most the first layer's
    share of the activation gradients.

    Args:
      config: The architecture.
      seq_len: Real tokens per sequence T.
      mode: One of FLOP_MODES ('full', 'lora', 'soft_prompt', 'prefix').
      lora_rank: LoRA rank r ('lora' only).
      lora_targets: Projections LoRA adapts ('lora' only).
      num_virtual_tokens: Soft prompt or prefix length P ('soft_prompt' / 'prefix' only).

    Returns:
      Training FLOPs per real token.

    Raises:
      ValueError: For an unknown mode or LoRA target, or a negative P.
    """
    forward = forward_flops_per_token(
        config, seq_len, mode, lora_rank, lora_targets, num_virtual_tokens
    )
    if mode == "full":
        return 3.0 * forward
    positions, keys = _shapes(config, seq_len, mode, num_virtual_tokens)
    head = 2 * config.hidden_size * config.vocab_size
    base = 2 * (matmul_params(config) - config.hidden_size * config.vocab_size)
    attention = _attention_forward_per_position(config, keys)
    # Activation gradients: as large as the forward base products, twice attention's forward.
    layers = base + 2 * attention
    dims = lora_target_dims(config)
    d = config.hidden_size
    # First-layer q/k/v input gradient at real positions: dead when the embedding is frozen.
    dead = 2 * d * sum(dims[t][1] for t in _FIRST_LAYER_INPUT_TARGETS)
    if mode == "lora":
        # LoRA factors: activation gradients (du = dy b.T, dx = du a.T) and weight gradients
        # (db = u.T dy, da = x.T du), each pair the size of the factors' forward.
        layers += 2 * _lora_forward_per_position(config, lora_rank, lora_targets)
        first_layer_inputs = set(lora_targets) & set(_FIRST_LAYER_INPUT_TARGETS)
        dead += 2 * d * lora_rank * len(first_layer_inputs)
    backward = (positions * layers + seq_len * (head - dead)) / seq_len
    return forward + backward
