"""Loading local Hugging Face-format Llama-family checkpoints into the Flax `Llama`.

A model directory holds `config.json` and its weights as `*.safetensors` (one file, or shards with
a `model.safetensors.index.json`). Llama 2/3 (including Llama 3.1 rope scaling), SmolLM/SmolLM2,
Qwen2/2.5 (q/k/v biases) and Mistral load with one renaming of tensors; anything the Flax model
does not implement (another architecture, activation, rope scheme, biases elsewhere, a sliding
window shorter than the sequence) is refused with an error that names the field.

Hugging Face's `nn.Linear` stores weights as [out, in]; Flax kernels are [in, out], and the
decoder layers are stacked on a leading layer axis for `nn.scan`.
"""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_llm.errors import UserError
from fedjax_llm.models import llama
from fedjax_llm.models.llama import LlamaConfig

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "ModelLoadError",
    "hf_to_llama_config",
    "load_hf_config",
    "load_hf_params",
    "load_pretrained",
]

# Architectures (config.json `architectures[0]`) and their `model_type`.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
LOAD_DTYPES = ("float32", "bfloat16")

# HF layer tensor name -> (our path under params['layers'], is a Linear weight to transpose).
_LAYER_TENSORS = {
    "self_attn.q_proj.weight": (("attn", "q_proj", "kernel"), True),
    "self_attn.k_proj.weight": (("attn", "k_proj", "kernel"), True),
    "self_attn.v_proj.weight": (("attn", "v_proj", "kernel"), True),
    "self_attn.o_proj.weight": (("attn", "o_proj", "kernel"), True),
    "self_attn.q_proj.bias": (("attn", "q_proj", "bias"), False),
    "self_attn.k_proj.bias": (("attn", "k_proj", "bias"), False),
    "self_attn.v_proj.bias": (("attn", "v_proj", "bias"), False),
    "mlp.gate_proj.weight": (("mlp", "gate_proj", "kernel"), True),
    "mlp.up_proj.weight": (("mlp", "up_proj", "kernel"), True),
    "mlp.down_proj.weight": (("mlp", "down_proj", "kernel"), True),
    "input_layernorm.weight": (("attn_norm", "scale"), False),
    "post_attention_layernorm.weight": (("mlp_norm", "scale"), False),
}
_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# Buffers some older checkpoints saved; they are recomputed, never loaded.
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


class ModelLoadError(UserError, ValueError):
    """A model directory that cannot be loaded: missing files, unsupported fields, bad tensors."""


def load_hf_config(path: str | pathlib.Path) -> dict[str, Any]:
    """Reads `config.json` of a model directory.

    Args:
      path: The model directory.

    Returns:
      The parsed config dict.

    Raises:
      ModelLoadError: If the directory or its config.json is missing or not JSON.
    """
    directory = pathlib.Path(path)
    if not directory.is_dir():
        raise ModelLoadError(
            f"model directory {str(directory)!r} does not exist; point pretrained.path at a local "
            "Hugging Face-format directory (config.json + *.safetensors), or run "
            "`python scripts/fetch_model.py smollm2-135m-instruct` to make one."
        )
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{str(directory)!r} has no config.json; it is not a HF model dir.")
    try:
        return json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelLoadError(
            f"{config_file} is not valid JSON ({err}); it is damaged: {_refetch_hint(directory)}."
        ) from None


def _rope_fields(hf: dict[str, Any]) -> dict[str, Any]:
    # transformers >= 5 writes `rope_parameters` (with rope_theta inside); older configs have
    # `rope_theta` plus an optional `rope_scaling` dict whose type key is `rope_type` or `type`.
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type not in llama.ROPE_TYPES:
        raise ModelLoadError(
            f"config.json rope scaling type {rope_type!r} is not supported; supported types are "
            f"{llama.ROPE_TYPES}."
        )
    fields: dict[str, Any] = {"rope_theta": float(theta), "rope_type": rope_type}
    if rope_type in ("linear", "llama3"):
        fields["rope_factor"] = float(merged["factor"])
    if rope_type == "llama3":
        fields["rope_low_freq_factor"] = float(merged["low_freq_factor"])
        fields["rope_high_freq_factor"] = float(merged["high_freq_factor"])
        fields["rope_original_max_position"] = int(merged["original_max_position_embeddings"])
    return fields


def hf_to_llama_config(
    hf: dict[str, Any], *, max_seq_len: int, dtype: str = "float32", scan_unroll: int | None = None
) -> LlamaConfig:
    """Translates a Hugging Face config dict into a `LlamaConfig`.

    Args:
      hf: The parsed config.json.
      max_seq_len: Sequence length the run uses; must fit the model's context.
      dtype: Compute dtype, one of `llama.COMPUTE_DTYPES`.
      scan_unroll: `LlamaConfig.scan_unroll`.

    Returns:
      The architecture.

    Raises:
      ModelLoadError: For an unsupported architecture or field (named in the message), or a
        sequence length the model cannot take.
    """
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type")
    arch = archs[0] if archs else None
    if arch not in SUPPORTED_ARCHITECTURES or SUPPORTED_ARCHITECTURES[arch] != model_type:
        raise ModelLoadError(
            f"unsupported architecture {arch!r} (model_type {model_type!r}); supported are "
            f"{sorted(SUPPORTED_ARCHITECTURES)}."
        )
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ModelLoadError(f"config.json hidden_act {act!r} is not supported (only 'silu').")
    if hf.get("mlp_bias"):
        raise ModelLoadError("config.json mlp_bias=true is not supported (MLP without biases).")
    if model_type == "llama" and hf.get("attention_bias"):
        raise ModelLoadError(
            "config.json attention_bias=true is not supported for llama (it adds an o_proj bias)."
        )
    max_positions = hf.get("max_position_embeddings")
    if max_positions is not None and max_seq_len > max_positions:
        raise ModelLoadError(
            f"sequence length {max_seq_len} exceeds the model's max_position_embeddings "
            f"({max_positions}); lower data.seq_len."
        )
    window = hf.get("sliding_window")
    uses_window = hf.get("use_sliding_window", model_type == "mistral")
    if uses_window and window is not None and max_seq_len > window:
        raise ModelLoadError(
            f"config.json sliding_window={window} is shorter than the sequence length "
            f"{max_seq_len}; sliding-window attention is not implemented, lower data.seq_len to "
            f"at most {window}."
        )
    try:
        config = LlamaConfig(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=int(hf["num_attention_heads"]),
            num_kv_heads=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
            head_dim=hf.get("head_dim"),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=model_type == "qwen2",
            max_seq_len=int(max_seq_len),
            dtype=dtype,
            scan_unroll=scan_unroll,
            **_rope_fields(hf),
        )
    except KeyError as err:
        raise ModelLoadError(f"config.json lacks the field {err.args[0]!r}.") from None
    try:
        config.validate()
    except ValueError as err:
        raise ModelLoadError(
            f"config.json describes a model this loader cannot build: {err}"
        ) from None
    return config


def _refetch_hint(directory: pathlib.Path) -> str:
    return (
        "re-download the model, or, for a directory made by scripts/fetch_model.py, run "
        f"`python scripts/fetch_model.py <name> --force --out {directory}` again"
    )


def _weight_files(directory: pathlib.Path) -> list[pathlib.Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
            reason = "not a JSON object" if isinstance(err, AttributeError) else f"not JSON ({err})"
            raise ModelLoadError(
                f"the shard index {index} is {reason}; it is damaged or was cut short by an "
                f"interrupted download or copy: {_refetch_hint(directory)}."
            ) from None
        if not isinstance(weight_map, dict) or not all(
            isinstance(name, str) for name in weight_map.values()
        ):
            raise ModelLoadError(
                f"the shard index {index} has no 'weight_map' of tensor name -> shard file; it "
                f"is not a safetensors index: {_refetch_hint(directory)}."
            )
        files = sorted({directory / name for name in weight_map.values()})
        missing = [str(f.name) for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{index} names shard(s) that do not exist: {missing}.")
        return files
    files = sorted(p for p in directory.glob("*.safetensors") if p.is_file())
    if not files:
        found = sorted(p.name for p in directory.iterdir())
        raise ModelLoadError(
            f"{str(directory)!r} has no *.safetensors weights (found {found}); PyTorch .bin "
            "checkpoints are not read, save the model with safe_serialization=True."
        )
    return files


def _unreadable(file: pathlib.Path, err: BaseException) -> ModelLoadError:
    size = file.stat().st_size if file.is_file() else None
    what = "is empty (0 bytes)" if size == 0 else f"is not a readable safetensors file ({err})"
    return ModelLoadError(
        f"weight file {file} {what}; it is truncated or damaged, e.g. by an interrupted "
        f"download or copy: {_refetch_hint(file.parent)}."
    )


def _tensors(files: list[pathlib.Path]) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (name, tensor) of every file; an unreadable file raises `ModelLoadError`."""
    from safetensors import SafetensorError, safe_open

    for file in files:
        try:
            # The flax framework reads bfloat16 too (numpy has no bfloat16).
            handle = safe_open(str(file), framework="flax")
        except (SafetensorError, OSError) as err:
            raise _unreadable(file, err) from None
        with handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                try:
                    tensor = handle.get_tensor(name)
                except (SafetensorError, OSError) as err:
                    raise _unreadable(file, err) from None
                yield name, tensor


def load_hf_params(
    path: str | pathlib.Path, config: LlamaConfig, dtype: str = "float32"
) -> dict[str, Any]:
    """Loads the weights of a model directory into the `Llama` parameter tree.

    Args:
      path: The model directory.
      config: Its architecture (from `hf_to_llama_config`).
      dtype: Storage dtype of the loaded params, one of LOAD_DTYPES ('bfloat16' halves the memory
        of a frozen base).

    Returns:
      The params, shaped like `llama.init_params(config, key)`.

    Raises:
      ModelLoadError: If weights are missing, a weight file or the shard index is empty,
        truncated or otherwise unreadable (the file is named, with how to fetch it again), a
        tensor is missing or unexpected, or a shape does not match the config (the tensor is
        named).
    """
    if dtype not in LOAD_DTYPES:
        raise ModelLoadError(f"load dtype {dtype!r} is not one of {LOAD_DTYPES}.")
    directory = pathlib.Path(path)
    files = _weight_files(directory)
    expected = jax.eval_shape(lambda: llama.init_params(config, jax.random.key(0)))
    layers: dict[tuple[str, ...], list[Any]] = {}
    flat: dict[tuple[str, ...], Any] = {}
    unexpected = []
    lm_head = None
    for name, tensor in _tensors(files):
        tensor = tensor.astype(dtype)
        match = _LAYER_NAME.match(name)
        if match and match.group(2) in _LAYER_TENSORS:
            layer = int(match.group(1))
            target, transpose = _LAYER_TENSORS[match.group(2)]
            if not config.attention_bias and target[-1] == "bias":
                unexpected.append(name)
                continue
            slots = layers.setdefault(target, [None] * config.num_layers)
            if layer >= config.num_layers:
                unexpected.append(name)
                continue
            slots[layer] = (name, tensor.T if transpose else tensor)
        elif name == "model.embed_tokens.weight":
            flat[("embed", "embedding")] = (name, tensor)
        elif name == "model.norm.weight":
            flat[("final_norm", "scale")] = (name, tensor)
        elif name == "lm_head.weight":
            lm_head = (name, tensor.T)
        elif not _IGNORED.search(name):
            unexpected.append(name)
    if unexpected:
        raise ModelLoadError(
            f"{str(directory)!r} has tensors the architecture does not use: {unexpected[:5]}"
            + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
            + "; is config.json the one these weights belong to?"
        )
    if not config.tie_embeddings:
        if lm_head is None:
            raise ModelLoadError(
                f"{str(directory)!r} has no lm_head.weight but config.json has "
                "tie_word_embeddings=false."
            )
        flat[("lm_head", "kernel")] = lm_head
    elif lm_head is not None and ("embed", "embedding") in flat:
        embedding = flat[("embed", "embedding")][1]
        if lm_head[1].shape != embedding.T.shape or not bool(jnp.all(lm_head[1] == embedding.T)):
            raise ModelLoadError(
                f"{str(directory)!r} has an lm_head.weight that differs from the input embedding, "
                "but config.json has tie_word_embeddings=true; which one is right?"
            )

    params: dict[str, Any] = {}

    def put(path: tuple[str, ...], name: str, value: Any) -> None:
        want = expected
        for key in path:
            want = want[key]
        if tuple(value.shape) != tuple(want.shape):
            raise ModelLoadError(
                f"tensor {name} has shape {tuple(value.shape)}, but config.json implies "
                f"{tuple(want.shape)} (as {'/'.join(path)})."
            )
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value

    for target, slots in sorted(layers.items()):
        missing = [i for i, slot in enumerate(slots) if slot is None]
        if missing:
            raise ModelLoadError(
                f"tensor model.layers.{missing[0]} for {'/'.join(target)} is missing from "
                f"{str(directory)!r}."
            )
        shapes = {tuple(slot[1].shape) for slot in slots}
        if len(shapes) > 1:
            raise ModelLoadError(f"layer tensors for {'/'.join(target)} differ in shape: {shapes}.")
        put(("layers", *target), slots[0][0], jnp.stack([slot[1] for slot in slots]))
    for target, (name, value) in flat.items():
        put(target, name, jnp.asarray(value))

    missing = []

    def check(path: tuple[Any, ...], _: Any) -> None:
        keys = tuple(k.key for k in path)
        node = params
        for key in keys:
            if not isinstance(node, dict) or key not in node:
                missing.append("/".join(keys))
                return
            node = node[key]

    jax.tree_util.tree_map_with_path(check, expected)
    if missing:
        raise ModelLoadError(
            f"{str(directory)!r} lacks weights for {missing}; the file set is incomplete."
        )
    return params


def load_pretrained(
    path: str | pathlib.Path,
    *,
    max_seq_len: int,
    dtype: str = "float32",
    load_dtype: str = "float32",
    scan_unroll: int | None = None,
) -> tuple[LlamaConfig, dict[str, Any]]:
    """Loads a local Hugging Face-format Llama-family model: architecture and weights.

    The tokenizer of the same directory loads with `fedjax_llm.data.load_tokenizer(path)`.

    Args:
      path: The model directory (config.json + *.safetensors).
      max_seq_len: Sequence length of the run.
      dtype: Compute dtype.
      load_dtype: Storage dtype of the params.
      scan_unroll: `LlamaConfig.scan_unroll`.

    Returns:
      (config, params).

    Raises:
      ModelLoadError: See `hf_to_llama_config` and `load_hf_params`.
    """
    config = hf_to_llama_config(
        load_hf_config(path), max_seq_len=max_seq_len, dtype=dtype, scan_unroll=scan_unroll
    )
    return config, load_hf_params(path, config, load_dtype)
