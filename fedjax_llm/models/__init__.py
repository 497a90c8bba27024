"""Llama-family decoder, its trainable parts, loading of HF checkpoints, and generation."""

from fedjax_llm.models.generation import generate, left_align_prompts, sample_next_token
from fedjax_llm.models.llama import (
    COMPUTE_DTYPES,
    KVCache,
    Llama,
    LlamaConfig,
    RMSNorm,
    apply,
    apply_rotary,
    count_params,
    init_cache,
    init_params,
    lora_target_dims,
    rotary_cos_sin,
)
from fedjax_llm.models.lora import LORA_TARGETS, check_lora_targets, init_lora
from fedjax_llm.models.prefix import init_prefix
from fedjax_llm.models.soft_prompt import PROMPT_INITS, init_soft_prompt
from fedjax_llm.models.trainable import TRAINABLE_MODES, Trainable, make_trainable

__all__ = [
    "COMPUTE_DTYPES",
    "LORA_TARGETS",
    "PROMPT_INITS",
    "TRAINABLE_MODES",
    "KVCache",
    "Llama",
    "LlamaConfig",
    "RMSNorm",
    "Trainable",
    "apply",
    "apply_rotary",
    "check_lora_targets",
    "count_params",
    "generate",
    "init_cache",
    "init_lora",
    "init_params",
    "init_prefix",
    "init_soft_prompt",
    "left_align_prompts",
    "lora_target_dims",
    "make_trainable",
    "rotary_cos_sin",
    "sample_next_token",
]
