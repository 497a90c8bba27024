"""Llama-family decoder, its parameter-efficient trainable parts, and decoding."""

from fedjax_llm.models.decoding import greedy_decode
from fedjax_llm.models.llama import (
    COMPUTE_DTYPES,
    Llama,
    LlamaConfig,
    RMSNorm,
    apply,
    apply_rotary,
    count_params,
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
    "Llama",
    "LlamaConfig",
    "RMSNorm",
    "Trainable",
    "apply",
    "apply_rotary",
    "check_lora_targets",
    "count_params",
    "greedy_decode",
    "init_lora",
    "init_params",
    "init_prefix",
    "init_soft_prompt",
    "lora_target_dims",
    "make_trainable",
    "rotary_cos_sin",
]
