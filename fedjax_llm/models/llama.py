"""Llama-family decoder-only transformer in Flax linen.

The model follows the Hugging Face `LlamaForCausalLM` conventions (RMSNorm, rotary embeddings in
the "rotate_half" layout, grouped-query attention, SwiGLU MLP, optionally tied embeddings, optional
q/k/v biases as in Qwen2) so that checkpoints load with a plain renaming of weights.

Besides the frozen base parameters, `Llama.__call__` accepts the parameter-efficient trainable parts
a federated client may carry: LoRA factors, a soft prompt and per-layer prefix keys/values. They
enter as call arguments, not as Flax variables, so the base `params` can be closed over (shared by
every client) while the trainable parts carry a client axis under `jax.vmap`.

References:
  Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language Models".
  Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding".
  Ainslie et al. 2023, "GQA: Training Generalized Multi-Query Transformer Models".
  Shazeer 2020, "GLU Variants Improve Transformer".
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_llm.models import matmul

COMPUTE_DTYPES = ("float32", "bfloat16")
# Rotary frequency schemes, named as in Hugging Face configs' `rope_scaling.rope_type`.
ROPE_TYPES = ("default", "linear", "llama3")
# Models with at most this many layers have their scan over layers fully unrolled by default.
UNROLL_LAYERS_UP_TO = 4
# Rematerialization of the decoder layers (`LlamaConfig.remat`): what the backward pass keeps of
# a layer's forward pass. 'layer' keeps nothing but the layer's input (the scan carry) and
# recomputes the rest; 'layer_dots' also keeps the outputs of the projections against shared
# weights (matmuls without batch dimensions: with the client axis vmapped, these are the
# frozen-weight projections), trading some memory for skipping their recomputation.
REMAT_MODES = ("none", "layer", "layer_dots")


def _dots_with_no_batch_dims_saveable(prim, *avals, **params) -> bool:
    # JAX's policy, plus the float32-result bfloat16 products of `matmul.matmul` (which have no
    # batch dimensions), which a policy sees as custom-VJP calls rather than dots.
    return matmul.is_rounded_product(
        prim, params
    ) or jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *avals, **params)


_REMAT_POLICIES = {
    "layer": jax.checkpoint_policies.nothing_saveable,
    "layer_dots": _dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture of a Llama-family decoder.

    Only simple field types are used so the class can be a node of a draccus (YAML / CLI) config.

    Attributes:
      vocab_size: Number of token ids (259 = 256 bytes + 3 special tokens by default).
      hidden_size: Model width D.
      intermediate_size: Width F of the SwiGLU MLP.
      num_layers: Number of decoder layers L.
      num_heads: Number of query heads H.
      num_kv_heads: Number of key/value heads KV (grouped-query attention when KV < H).
      head_dim: Per-head width; None means hidden_size // num_heads.
      rope_theta: Base of the rotary embedding frequencies.
      rope_type: Frequency scheme, one of ROPE_TYPES: 'default' (plain RoPE), 'linear' (position
        interpolation: frequencies divided by `rope_factor`) or 'llama3' (Llama 3.1's
        wavelength-dependent scaling with `rope_factor`, `rope_low_freq_factor`,
        `rope_high_freq_factor` and `rope_original_max_position`).
      rope_factor: Scaling factor of 'linear' and 'llama3'.
      rope_low_freq_factor: 'llama3' only.
      rope_high_freq_factor: 'llama3' only.
      rope_original_max_position: 'llama3' only: the context length the model was pre-trained at.
      rms_norm_eps: Epsilon inside the RMSNorm square root.
      tie_embeddings: If True the output projection is the transposed input embedding.
      attention_bias: If True q/k/v projections have biases (Qwen2).
      max_seq_len: Sequence length the data pipeline and decoding buffers are built for. The model
        itself has no learned position table, so it does not enforce this length.
      dtype: Compute dtype, one of COMPUTE_DTYPES. Parameters are always stored in float32.
      initializer_range: Standard deviation of the normal init of kernels and embeddings.
      scan_unroll: Layers unrolled per iteration of the scan over layers. None unrolls models of
        at most UNROLL_LAYERS_UP_TO layers completely (for small models, XLA fuses across layers
        and skips the loop's per-iteration slicing: 28% -> 40% MFU for the tiny benchmark model
        on a 2-core CPU) and keeps deeper models rolled, so compile time does not grow with depth;
        with `remat` on, None keeps every model rolled (see `resolved_scan_unroll`).
      remat: Rematerialization of each decoder layer under differentiation, one of REMAT_MODES:
        'none' keeps every activation the backward pass needs; 'layer' wraps each layer's body
        in `jax.checkpoint` saving nothing (only the layer inputs stay in memory, the rest is
        recomputed in the backward pass: about one more forward pass of compute); 'layer_dots'
        saves the matmuls without batch dimensions. Values and gradients are unchanged.
    """

    vocab_size: int = 259
    hidden_size: int = 64
    intermediate_size: int = 176
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = True
    attention_bias: bool = False
    max_seq_len: int = 64
    dtype: str = "float32"
    initializer_range: float = 0.02
    scan_unroll: int | None = None
    remat: str = "none"

    @property
    def resolved_scan_unroll(self) -> int:
        """Layers per scan iteration: `scan_unroll` if set, else all layers for shallow models
        (one with `remat`: in unrolled straight-line code XLA schedules the recomputation next
        to the forward pass, which keeps the activations alive and saves nothing)."""
        if self.scan_unroll is not None:
            return self.scan_unroll
        if self.remat != "none":
            return 1
        return self.num_layers if self.num_layers <= UNROLL_LAYERS_UP_TO else 1

    @property
    def resolved_head_dim(self) -> int:
        """Per-head width: `head_dim` if set, else `hidden_size // num_heads`."""
        if self.head_dim is not None:
            return self.head_dim
        return self.hidden_size // self.num_heads

    @property
    def compute_dtype(self) -> jnp.dtype:
        """The JAX dtype named by `dtype`."""
        return jnp.dtype(self.dtype)

    def validate(self) -> None:
        """Checks that the fields describe a buildable model.

        Raises:
          ValueError: If a size is not positive, the heads do not divide evenly, the head width is
            odd (rotary embeddings rotate pairs), or `dtype` is not one of COMPUTE_DTYPES.
        """
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "max_seq_len",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive integer, got {value!r}.")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"LlamaConfig.hidden_size ({self.hidden_size}) must be divisible by num_heads "
                    f"({self.num_heads}), or set head_dim explicitly."
                )
        elif not isinstance(self.head_dim, int) or self.head_dim <= 0:
            raise ValueError(
                f"LlamaConfig.head_dim must be a positive integer or None, got {self.head_dim!r}."
            )
        if self.scan_unroll is not None and (
            not isinstance(self.scan_unroll, int) or self.scan_unroll <= 0
        ):
            raise ValueError(
                f"LlamaConfig.scan_unroll must be a positive integer or None, got "
                f"{self.scan_unroll!r}."
            )
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(
                f"LlamaConfig.rope_type {self.rope_type!r} is not supported; choose one of "
                f"{ROPE_TYPES}."
            )
        if self.rope_type != "default" and self.rope_factor <= 0:
            raise ValueError(f"LlamaConfig.rope_factor must be positive, got {self.rope_factor}.")
        if self.rope_type == "llama3" and not (
            0 < self.rope_low_freq_factor < self.rope_high_freq_factor
            and self.rope_original_max_position > 0
        ):
            raise ValueError(
                "LlamaConfig llama3 rope scaling needs 0 < rope_low_freq_factor < "
                "rope_high_freq_factor and a positive rope_original_max_position; got "
                f"{self.rope_low_freq_factor}, {self.rope_high_freq_factor}, "
                f"{self.rope_original_max_position}."
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"LlamaConfig.num_heads ({self.num_heads}) must be divisible by num_kv_heads "
                f"({self.num_kv_heads})."
            )
        if self.resolved_head_dim % 2:
            raise ValueError(
                f"LlamaConfig head dimension must be even for rotary embeddings, got "
                f"{self.resolved_head_dim}."
            )
        if self.rope_theta <= 0:
            raise ValueError(f"LlamaConfig.rope_theta must be positive, got {self.rope_theta}.")
        if self.rms_norm_eps <= 0:
            raise ValueError(f"LlamaConfig.rms_norm_eps must be positive, got {self.rms_norm_eps}.")
        if self.initializer_range <= 0:
            raise ValueError(
                f"LlamaConfig.initializer_range must be positive, got {self.initializer_range}."
            )
        if self.dtype not in COMPUTE_DTYPES:
            raise ValueError(
                f"LlamaConfig.dtype must be one of {COMPUTE_DTYPES}, got {self.dtype!r}."
            )
        if self.remat not in REMAT_MODES:
            raise ValueError(f"LlamaConfig.remat must be one of {REMAT_MODES}, got {self.remat!r}.")


# ---------------------------------------------------------------------------------------------
# Rotary embeddings.


def rotary_inv_freq(head_dim: int, theta: float, config: LlamaConfig | None = None) -> jax.Array:
    """Rotary frequencies, with the rope scaling of `config` applied (as Hugging Face computes it).

    Args:
      head_dim: Even per-head width hd.
      theta: Frequency base.
      config: Supplies `rope_type` and its parameters; None means plain RoPE.

    Returns:
      float32 [hd / 2] inverse frequencies.
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if config is None or config.rope_type == "default":
        return inv_freq
    factor = config.rope_factor
    if config.rope_type == "linear":
        return inv_freq / factor
    # llama3: long wavelengths are interpolated by `factor`, short ones kept, and the band between
    # the two cut-offs blended smoothly (Llama 3.1 model card / HF `_compute_llama3_parameters`).
    old_len = config.rope_original_max_position
    low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
    wavelen = 2 * jnp.pi / inv_freq
    scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return jnp.where(medium, smoothed, scaled)


def rotary_cos_sin(
    positions: jax.Array, head_dim: int, theta: float, config: LlamaConfig | None = None
) -> tuple[jax.Array, jax.Array]:
    """Cosine and sine tables of rotary embeddings in the Hugging Face layout.

    Args:
      positions: Integer positions, shape [..., T].
      head_dim: Even per-head width hd.
      theta: Frequency base.
      config: Supplies the rope scaling (see `rotary_inv_freq`); None means plain RoPE.

    Returns:
      (cos, sin), each float32 of shape [..., T, hd]; the hd/2 frequencies are repeated as
      [f_0..f_{hd/2-1}, f_0..f_{hd/2-1}] to match `rotate_half`.
    """
    inv_freq = rotary_inv_freq(head_dim, theta, config)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def _rotate_half(x: jax.Array) -> jax.Array:
    # HF pairs dimension i with i + hd/2 (not adjacent dims as in the interleaved RoFormer layout).
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def _apply_cos_sin(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    # x: [B, T, N, hd]; cos/sin: [T, hd] or [B, T, hd] (per-row positions). Rotation in float32:
    # bf16 angles lose position detail.
    x32 = x.astype(jnp.float32)
    if cos.ndim == 2:
        cos, sin = cos[None], sin[None]
    cos = cos[:, :, None, :]
    sin = sin[:, :, None, :]
    return (x32 * cos + _rotate_half(x32) * sin).astype(x.dtype)


def apply_rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotates query or key vectors by their positions (HF "rotate_half" convention).

    Args:
      x: Vectors of shape [B, T, N, hd] (N heads).
      positions: Integer positions of shape [T].
      theta: Frequency base.

    Returns:
      The rotated vectors, same shape and dtype as `x`.
    """
    cos, sin = rotary_cos_sin(positions, x.shape[-1], theta)
    return _apply_cos_sin(x, cos, sin)


# ---------------------------------------------------------------------------------------------
# Modules.


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in float32.

    Attributes:
      eps: Epsilon inside the square root.
      dtype: Output dtype.

    References:
      Zhang & Sennrich 2019, "Root Mean Square Layer Normalization".
    """

    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalizes the last axis of `x` and scales it by a learned vector.

        Args:
          x: Input of shape [..., D].

        Returns:
          Normalized input of the same shape, in `dtype`.
        """
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (x32 * scale).astype(self.dtype)


def _dense(config: LlamaConfig, features: int, name: str, use_bias: bool = False) -> nn.Dense:
    """A float32-parameter projection computing in the config's dtype."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=config.compute_dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.initializers.normal(config.initializer_range),
        name=name,
        dot_general=matmul.dense_dot_general,
    )


def _lora_project(dense: nn.Dense, x: jax.Array, factors: dict | None, scaling: Any) -> jax.Array:
    """Applies `dense` plus an unmerged low-rank update `scaling * (x @ a) @ b`."""
    y = dense(x)
    if factors is None:
        return y
    # Never merge a @ b into the kernel: the kernel is shared by all vmapped clients, a merge would
    # materialize one copy of it per client.
    a = factors["a"].astype(y.dtype)
    b = factors["b"].astype(y.dtype)
    delta = matmul.matmul(matmul.matmul(x.astype(y.dtype), a), b)
    return y + (scaling * delta).astype(y.dtype)


class _Attention(nn.Module):
    """Grouped-query self-attention with rotary embeddings and optional prefix keys/values."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask, lora, lora_scaling, prefix, layer_cache, cache_index):
        cfg = self.config
        dtype = cfg.compute_dtype
        hd = cfg.resolved_head_dim
        num_groups = cfg.num_heads // cfg.num_kv_heads
        batch, length, _ = x.shape

        def proj(inp, features, name, target, use_bias=False):
            factors = None if lora is None else lora.get(target)
            return _lora_project(_dense(cfg, features, name, use_bias), inp, factors, lora_scaling)

        bias = cfg.attention_bias
        q = proj(x, cfg.num_heads * hd, "q_proj", "q", bias)
        k = proj(x, cfg.num_kv_heads * hd, "k_proj", "k", bias)
        v = proj(x, cfg.num_kv_heads * hd, "v_proj", "v", bias)
        q = _apply_cos_sin(q.reshape(batch, length, cfg.num_heads, hd), cos, sin)
        k = _apply_cos_sin(k.reshape(batch, length, cfg.num_kv_heads, hd), cos, sin)
        v = v.reshape(batch, length, cfg.num_kv_heads, hd)
        if layer_cache is not None:
            # Write this call's keys/values at their absolute positions; attend over the buffer.
            cached_k, cached_v = layer_cache
            start = (0, cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(cached_k, k.astype(cached_k.dtype), start)
            v = jax.lax.dynamic_update_slice(cached_v, v.astype(cached_v.dtype), start)
            layer_cache = (k, v)

        if prefix is not None:
            # Prefix slots carry no position: they are learned keys/values, not rotated tokens.
            pk = jnp.broadcast_to(prefix["key"].astype(dtype), (batch, *prefix["key"].shape))
            pv = jnp.broadcast_to(prefix["value"].astype(dtype), (batch, *prefix["value"].shape))
            k = jnp.concatenate([pk, k], axis=1)
            v = jnp.concatenate([pv, v], axis=1)

        # Query head h = kv * num_groups + g uses kv head `kv` (HF repeat_kv order). Grouping the
        # query heads avoids materializing repeated keys/values.
        kv = cfg.num_kv_heads
        q = q.reshape(batch, length, kv, num_groups, hd).transpose(0, 2, 3, 1, 4)
        k = k.transpose(0, 2, 1, 3)
        v = v.transpose(0, 2, 1, 3)
        # Without a cache the keys after a query block's last position are masked for all of
        # it (causal): each block attends only to the keys up to its end.
        blocks = (
            [(0, length, k.shape[2])]
            if layer_cache is not None
            else query_blocks(length, k.shape[2] - length, ATTENTION_QUERY_BLOCK)
        )
        out = _attend_blocks(q, k, v, mask, blocks, dtype).transpose(0, 3, 1, 2, 4)
        out = out.reshape(batch, length, cfg.num_heads * hd)
        return proj(out, cfg.hidden_size, "o_proj", "o"), layer_cache


ATTENTION_QUERY_BLOCK = 128
"""Query positions per block of causal attention without a cache.

Each block attends only to the keys up to its last position (the prefix slots included), so
the scores of later keys, masked for the whole block, are neither computed nor stored: 56% of
the full score matrix at 1,024 positions (see `query_blocks`). Sequences of at most this many
positions are one block, the plain attention. One lora-4m local-step gradient of 16 x 1,024
tokens (`python scripts/attention_blocks.py`, 2-core Xeon with AVX-512 and AMX) took 0.87 of
the one-block time with blocks of 128 in float32 (512: 0.95, 256: 0.87, 64: 0.95) and 0.52 in
bfloat16 (512: 0.62, 256: 0.54, 64: 0.63); `benchmarks/cpu_attention_blocks_*.json`."""


def query_blocks(length: int, num_prefix: int, block: int) -> list[tuple[int, int, int]]:
    """Causal attention's query blocks, ``(start, end, keys)`` each.

    Queries ``start:end`` attend to the first ``keys`` keys: the ``num_prefix`` prefix slots
    and the positions before ``end``; every later key is causally masked for all of them.

    Args:
      length: positions T (the soft prompt included).
      num_prefix: prefix-tuning slots before the positions' keys.
      block: query positions per block (the last block may be shorter).

    Returns:
      The blocks in order; their queries tile ``0:length``.
    """
    return [
        (start, min(start + block, length), num_prefix + min(start + block, length))
        for start in range(0, length, block)
    ]


def _attend_blocks(q, k, v, mask, blocks, dtype):
    """Attention of q [b, kv, g, t, d] over k, v [b, kv, s, d] in query blocks (`query_blocks`)."""
    return jnp.concatenate(
        [
            _attend_block(
                q[:, :, :, start:end],
                k[:, :, :keys],
                v[:, :, :keys],
                mask[:, start:end, :keys],
                dtype,
            )
            for start, end, keys in blocks
        ],
        axis=3,
    )


def _attend_block(q, k, v, mask, dtype):
    """Softmax attention of grouped queries q [b, kv, g, t, d] over k, v [b, kv, s, d].

    Head-major: the group's queries are rows of one [g*t, s] block per kv head, so both
    products and their gradients are plain batched matmuls over (batch, kv head) and the
    [.., t, s] scores are never transposed (only the small q/k/v/out are). The weights
    ``exp(score - row max)`` multiply the values unnormalized and the [t, d] result is divided
    by their row sums, which saves a pass over the [t, s] weights in each direction.
    """
    batch, kv, groups, length, hd = q.shape
    rows = (batch, kv, groups * length)
    scores = matmul.einsum("bkqd,bksd->bkqs", q.reshape(*rows, hd), k, jnp.float32)
    scores = scores.reshape(batch, kv, groups, length, scores.shape[-1]) * (hd**-0.5)
    # A finite fill keeps fully masked rows (e.g. leading pads) free of NaNs (their weights
    # are uniform), which would otherwise leak into gradients even at a zero loss weight.
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    # The result does not depend on the subtracted maximum: no gradient flows through it.
    top = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
    weights = jnp.exp(scores - top)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    weights = weights.astype(dtype).reshape(*rows, weights.shape[-1])
    out = matmul.einsum("bkqs,bksd->bkqd", weights, v, jnp.float32)
    return (out.reshape(batch, kv, groups, length, hd) / total).astype(dtype)


class _MLP(nn.Module):
    """SwiGLU feed-forward block: down(silu(gate(x)) * up(x))."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, lora, lora_scaling):
        cfg = self.config

        def proj(inp, features, name, target):
            factors = None if lora is None else lora.get(target)
            return _lora_project(_dense(cfg, features, name), inp, factors, lora_scaling)

        gate = proj(x, cfg.intermediate_size, "gate_proj", "gate")
        up = proj(x, cfg.intermediate_size, "up_proj", "up")
        return proj(nn.silu(gate) * up, cfg.hidden_size, "down_proj", "down")


class _DecoderLayer(nn.Module):
    """Pre-norm decoder layer; the body of the `nn.scan` over layers."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, layer_inputs, cos, sin, mask, lora_scaling, cache_index):
        cfg = self.config
        lora, prefix, layer_cache = layer_inputs
        norm = functools.partial(RMSNorm, eps=cfg.rms_norm_eps, dtype=cfg.compute_dtype)
        h = norm(name="attn_norm")(x)
        attn, layer_cache = _Attention(cfg, name="attn")(
            h, cos, sin, mask, lora, lora_scaling, prefix, layer_cache, cache_index
        )
        x = x + attn
        h = norm(name="mlp_norm")(x)
        x = x + _MLP(cfg, name="mlp")(h, lora, lora_scaling)
        return x, layer_cache


class KVCache(NamedTuple):
    """Keys and values of earlier positions, for incremental decoding.

    Attributes:
      key: [L, B, S, KV, hd] rotated keys of every layer, in the compute dtype.
      value: [L, B, S, KV, hd] values.
      index: int32 scalar, the number of positions filled (the next call writes there).
      valid: bool [B, S], True at filled positions that are real tokens (not padding).
    """

    key: jax.Array
    value: jax.Array
    index: jax.Array
    valid: jax.Array


def init_cache(config: LlamaConfig, batch: int, length: int) -> KVCache:
    """An empty cache for `batch` sequences of up to `length` positions (soft prompt included).

    Args:
      config: The architecture.
      batch: Batch size B.
      length: Capacity S in positions.

    Returns:
      A `KVCache` with nothing filled.
    """
    shape = (config.num_layers, batch, length, config.num_kv_heads, config.resolved_head_dim)
    zeros = jnp.zeros(shape, config.compute_dtype)
    return KVCache(zeros, zeros, jnp.zeros((), jnp.int32), jnp.zeros((batch, length), bool))


def _check_cache(config: LlamaConfig, cache: KVCache, batch: int, total: int) -> None:
    want = (config.num_layers, batch, None, config.num_kv_heads, config.resolved_head_dim)
    got = tuple(cache.key.shape)
    if len(got) != 5 or any(w is not None and w != g for w, g in zip(want, got, strict=True)):
        raise ValueError(f"cache.key has shape {got}; expected [L, B, S, KV, hd] = {want}.")
    if total > got[2]:
        raise ValueError(f"{total} new positions do not fit a cache of {got[2]} positions.")


class _OutputProjection(nn.Module):
    """The untied output projection's kernel [D, V] (stored as `nn.Dense` stores it)."""

    vocab_size: int
    initializer_range: float

    @nn.compact
    def __call__(self, hidden_size: int) -> jax.Array:
        init = nn.initializers.normal(self.initializer_range)
        return self.param("kernel", init, (hidden_size, self.vocab_size), jnp.float32)


class Llama(nn.Module):
    """Llama-family decoder returning next-token logits.

    Layers are stacked with `nn.scan` (parameters carry a leading layer axis), so compile time does
    not grow with depth.

    Attributes:
      config: The architecture.
    """

    config: LlamaConfig

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        attention_mask: jax.Array | None = None,
        lora: dict | None = None,
        lora_scaling: float = 1.0,
        prompt_embeddings: jax.Array | None = None,
        prefix: dict | None = None,
        cache: KVCache | None = None,
        head: Callable[[jax.Array, jax.Array], Any] | None = None,
    ) -> Any:
        """Computes logits for every position.

        Args:
          tokens: Token ids, int32 [B, T].
          attention_mask: Bool [B, T], True for real tokens; None means all real. Masked positions
            are never attended to (as keys) and take no rotary position: a token's position is
            the number of real tokens before it, as HF derives position_ids from the mask. Their
            own logits are unspecified but finite.
          lora: Optional LoRA factors, a dict with keys from ('q', 'k', 'v', 'o', 'gate', 'up',
            'down'), each {'a': [L, d_in, r], 'b': [L, r, d_out]}.
            The projection becomes `x @ W + lora_scaling * (x @ a) @ b` (never merged).
          lora_scaling: Multiplier of the LoRA update (alpha / rank).
          prompt_embeddings: Optional soft prompt [P, D] prepended to the token embeddings. Prompt
            positions are always attended to and take rotary positions 0..P-1; real tokens start
            at P. Only the T real positions' logits are returned.
          prefix: Optional prefix-tuning keys/values {'key': [L, P, KV, hd], 'value': [L, P, KV,
            hd]} prepended to each layer's keys and values, without rotary embedding. Every query
            attends to all P slots; real tokens keep positions 0..T-1.
          cache: Optional key/value cache (see `KVCache`, `init_cache`) for incremental decoding.
            This call's P + T positions are written at `cache.index` onwards and attend to every
            valid earlier cache position; `attention_mask` then marks this call's tokens only.
            Pass `prompt_embeddings` only with the first call that fills the cache.
          head: Optional ``head(hidden, kernel)`` called in place of the output projection,
            with the final normalized hidden states [B, T, D] and the projection [D, V] (the
            transposed embedding when tied), both in the compute dtype; its result is returned.
            A loss can so fuse the projection with itself (`kernels.linear_cross_entropy`)
            instead of receiving the whole [B, T, V] logits. Not with a cache.

        Returns:
          Logits, float32 [B, T, V]; with a cache, (logits, the updated cache); with a head,
          what the head returns.

        Raises:
          ValueError: If the config is invalid or an input has the wrong shape or keys.
        """
        cfg = self.config
        cfg.validate()
        dtype = cfg.compute_dtype
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape [batch, length], got {tokens.shape}.")
        batch, length = tokens.shape
        _check_lora(cfg, lora)
        _check_prefix(cfg, prefix)

        embed = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=dtype,
            param_dtype=jnp.float32,
            embedding_init=nn.initializers.normal(cfg.initializer_range),
            name="embed",
        )
        x = embed(tokens)
        if attention_mask is None:
            key_valid = jnp.ones((batch, length), dtype=bool)
        else:
            if attention_mask.shape != tokens.shape:
                raise ValueError(
                    f"attention_mask shape {attention_mask.shape} must equal tokens shape "
                    f"{tokens.shape}."
                )
            key_valid = attention_mask.astype(bool)

        num_prompt = 0
        if prompt_embeddings is not None:
            if prompt_embeddings.ndim != 2 or prompt_embeddings.shape[1] != cfg.hidden_size:
                raise ValueError(
                    f"prompt_embeddings must have shape [P, {cfg.hidden_size}], got "
                    f"{prompt_embeddings.shape}."
                )
            num_prompt = prompt_embeddings.shape[0]
            prompt = prompt_embeddings.astype(dtype)
            prompt = jnp.broadcast_to(prompt, (batch, *prompt.shape))
            x = jnp.concatenate([prompt, x], axis=1)
            key_valid = jnp.concatenate([jnp.ones((batch, num_prompt), bool), key_valid], axis=1)

        total = num_prompt + length
        # A token's rotary position counts the real tokens before it (as HF derives position_ids
        # from the attention mask), so left padding and a soft prompt before it shift nothing.
        if cache is None:
            cache_index = 0
            positions = (
                jnp.arange(total)[None]
                if attention_mask is None
                else jnp.cumsum(key_valid, axis=1) - 1
            )
            causal = jnp.tril(jnp.ones((total, total), dtype=bool))
            mask = causal[None] & key_valid[:, None, :]  # [B, T_q, T_k]
            layer_caches = None
        else:
            _check_cache(cfg, cache, batch, total)
            cache_index = cache.index
            seen = jnp.sum(cache.valid, axis=1, keepdims=True)
            positions = seen + jnp.cumsum(key_valid, axis=1) - 1
            key_valid = jax.lax.dynamic_update_slice(cache.valid, key_valid, (0, cache_index))
            slots = cache_index + jnp.arange(total)
            causal = jnp.arange(cache.valid.shape[1])[None, :] <= slots[:, None]
            mask = causal[None] & key_valid[:, None, :]  # [B, T_q, S]
            layer_caches = (cache.key, cache.value)
        positions = jnp.maximum(positions, 0)  # pads before the first real token
        cos, sin = rotary_cos_sin(positions, cfg.resolved_head_dim, cfg.rope_theta, cfg)
        if prefix is not None:
            num_prefix = prefix["key"].shape[1]
            mask = jnp.concatenate([jnp.ones((batch, total, num_prefix), bool), mask], axis=-1)

        layer = _DecoderLayer
        if cfg.remat != "none":
            # Inside the scan over layers: the backward pass keeps each layer's input (the scan
            # carry) and recomputes the layer. `prevent_cse` stays on in case `scan_unroll`
            # unrolls the scan, where XLA could otherwise merge the recomputation back into the
            # forward pass.
            layer = nn.remat(_DecoderLayer, policy=_REMAT_POLICIES[cfg.remat])
        layers = nn.scan(
            layer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.num_layers,
            unroll=cfg.resolved_scan_unroll,
        )(cfg, name="layers")
        x, layer_caches = layers(
            x, (lora, prefix, layer_caches), cos, sin, mask, lora_scaling, cache_index
        )

        x = RMSNorm(cfg.rms_norm_eps, dtype=dtype, name="final_norm")(x)
        x = x[:, num_prompt:]
        if cfg.tie_embeddings:
            kernel = embed.embedding.astype(dtype).T
        else:
            kernel = _OutputProjection(cfg.vocab_size, cfg.initializer_range, name="lm_head")(
                cfg.hidden_size
            ).astype(dtype)
        if head is not None:
            if cache is not None:
                raise ValueError("head replaces the logits of a forward pass; not with a cache.")
            return head(x, kernel)
        # Accumulated and returned in float32 even under bfloat16 compute.
        logits = jnp.einsum("btd,dv->btv", x, kernel, preferred_element_type=jnp.float32)
        if cache is None:
            return logits
        new_cache = KVCache(*layer_caches, index=cache_index + total, valid=key_valid)
        return logits, new_cache


def lora_target_dims(config: LlamaConfig) -> dict[str, tuple[int, int]]:
    """Input and output widths of every projection LoRA can adapt.

    Args:
      config: The architecture.

    Returns:
      A dict from target name ('q', 'k', 'v', 'o', 'gate', 'up', 'down') to (d_in, d_out).
    """
    hd = config.resolved_head_dim
    d, f = config.hidden_size, config.intermediate_size
    return {
        "q": (d, config.num_heads * hd),
        "k": (d, config.num_kv_heads * hd),
        "v": (d, config.num_kv_heads * hd),
        "o": (config.num_heads * hd, d),
        "gate": (d, f),
        "up": (d, f),
        "down": (f, d),
    }


def _check_lora(config: LlamaConfig, lora: dict | None) -> None:
    if lora is None:
        return
    dims = lora_target_dims(config)
    for target, factors in lora.items():
        if target not in dims:
            raise ValueError(f"Unknown LoRA target {target!r}; valid targets are {tuple(dims)}.")
        if not isinstance(factors, dict) or set(factors) != {"a", "b"}:
            raise ValueError(f"LoRA factors of {target!r} must be a dict with keys 'a' and 'b'.")
        a, b = factors["a"], factors["b"]
        d_in, d_out = dims[target]
        rank = a.shape[-1] if a.ndim else -1
        want_a = (config.num_layers, d_in, rank)
        want_b = (config.num_layers, rank, d_out)
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            raise ValueError(
                f"LoRA factors of {target!r} have shapes a={tuple(a.shape)}, b={tuple(b.shape)}; "
                f"expected a=[L, d_in, r]={want_a} and b=[L, r, d_out]={want_b} for this config."
            )


def _check_prefix(config: LlamaConfig, prefix: dict | None) -> None:
    if prefix is None:
        return
    if not isinstance(prefix, dict) or set(prefix) != {"key", "value"}:
        raise ValueError("prefix must be a dict with keys 'key' and 'value'.")
    shape = tuple(prefix["key"].shape)
    if (
        len(shape) != 4
        or shape[0] != config.num_layers
        or shape[2:] != (config.num_kv_heads, config.resolved_head_dim)
        or tuple(prefix["value"].shape) != shape
    ):
        raise ValueError(
            f"prefix key/value must both have shape [L, P, KV, hd] = [{config.num_layers}, P, "
            f"{config.num_kv_heads}, {config.resolved_head_dim}], got key {shape} and value "
            f"{tuple(prefix['value'].shape)}."
        )


# ---------------------------------------------------------------------------------------------
# Pure helpers.


def init_params(config: LlamaConfig, key: jax.Array) -> dict:
    """Randomly initializes the base parameters.

    Kernels and the embedding are normal(config.initializer_range), norm scales are ones, biases
    zeros; all float32.

    Args:
      config: The architecture.
      key: PRNG key.

    Returns:
      The parameter dict (without the outer {'params': ...} wrapper).

    Raises:
      ValueError: If the config is invalid.
    """
    config.validate()
    tokens = jnp.zeros((1, 1), jnp.int32)
    # Jitted: the eager init would dispatch the dummy forward pass op by op.
    return jax.jit(lambda key: Llama(config).init(key, tokens)["params"])(key)


def apply(config: LlamaConfig, params: dict, tokens: jax.Array, **kwargs: Any) -> jax.Array:
    """Runs the model: `Llama(config).apply({'params': params}, tokens, **kwargs)`.

    Args:
      config: The architecture.
      params: Base parameters as returned by `init_params`.
      tokens: Token ids, int32 [B, T].
      **kwargs: Further arguments of `Llama.__call__` (attention_mask, lora, lora_scaling,
        prompt_embeddings, prefix).

    Returns:
      Logits, float32 [B, T, V].
    """
    return Llama(config).apply({"params": params}, tokens, **kwargs)


def count_params(tree: Any) -> int:
    """Counts the scalar entries of all array leaves in a pytree.

    Args:
      tree: Any pytree of arrays (or of `jax.ShapeDtypeStruct`s).

    Returns:
      The total number of elements.
    """
    # `.shape` also covers jax.ShapeDtypeStruct leaves from `jax.eval_shape`.
    return sum(
        math.prod(getattr(leaf, "shape", jnp.shape(leaf)))
        for leaf in jax.tree_util.tree_leaves(tree)
    )
