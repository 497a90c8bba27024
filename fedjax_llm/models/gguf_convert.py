"""Conversion of a llama.cpp GGUF checkpoint of a Llama-family model to a Hugging Face directory.

A GGUF file holds everything a model needs (hyper-parameters, weights, often quantized, and the
tokenizer with its chat template) under llama.cpp's names and layouts. `convert_gguf_to_hf`
turns it into the directory layout every Llama loader reads (``config.json``,
``model.safetensors``, ``generation_config.json`` and the tokenizer files), so a model that is
only available as a GGUF (for instance from a package registry, when the Hugging Face hub cannot
be reached) serves like any other local checkpoint.

Weights are dequantized with the `gguf` package (numpy only). Two details of llama.cpp's
HF-to-GGUF converter must be undone:

- Its ``llama`` architecture permutes the rows of the query and key projections (and their
  biases) so that rotary pairs are interleaved, as llama.cpp's RoPE kernel expects, where the
  Hugging Face Llama pairs dimension ``i`` with ``i + head_dim / 2`` ("rotate half");
  `unpermute_rotary` inverts it, per query head for q and per key/value head for k.
- GGUF lists tensor dimensions fastest-varying first; the arrays the reader returns are already in
  numpy (row-major) order, i.e. ``[out_features, in_features]`` like a ``torch.nn.Linear``.

References:
  llama.cpp ``convert_hf_to_gguf.py``, ``LlamaModel.permute`` and ``LlamaModel.modify_tensors``.
  GGUF format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

DTYPES = ("float32", "bfloat16", "float16")
"""Floating-point types `convert_gguf_to_hf` can write the weights in."""

SUPPORTED_ARCHITECTURES = ("llama",)
"""Values of ``general.architecture`` that `convert_gguf_to_hf` understands."""

# GGUF per-layer tensor name -> Hugging Face Llama module name (without ``model.layers.N.``).
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSOR_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")

# llama.cpp pre-tokenizers that isolate every digit before the GPT-2 split (``\p{N}`` first, see
# llama-vocab.cpp). transformers' GGUF tokenizer builder does not know these names and falls back
# to the plain GPT-2 split, so the converted tokenizer adds the digit split back, as the models'
# original tokenizer.json files have it.
_DIGIT_SPLIT_PRE_TOKENIZERS = frozenset(
    {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
)


class GGUFConversionError(ValueError):
    """A GGUF file cannot be converted: unsupported architecture, tensor or metadata."""


def unpermute_rotary(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's interleaving of the rotary pairs in a q or k projection.

    llama.cpp's converter applies, per head of ``head_dim`` rows,
    ``w.reshape(num_heads, 2, head_dim // 2, ...).swapaxes(1, 2)``; this applies the inverse,
    ``w.reshape(num_heads, head_dim // 2, 2, ...).swapaxes(1, 2)``.

    Args:
      weight: GGUF-layout q or k projection, ``[num_heads * head_dim, in_features]``, or its bias
        ``[num_heads * head_dim]``.
      num_heads: number of query heads for q, of key/value heads for k.

    Returns:
      The Hugging Face-layout array, same shape and dtype.

    Raises:
      GGUFConversionError: the leading dimension is not ``num_heads`` times an even head size.
    """
    rows = weight.shape[0]
    if num_heads <= 0 or rows % (2 * num_heads):
        raise GGUFConversionError(
            f"cannot un-permute a q/k projection of {rows} rows into {num_heads} heads of an even "
            "size; the head counts in the GGUF metadata do not match its tensors"
        )
    half = rows // num_heads // 2
    return (
        weight.reshape(num_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def _gguf():
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - gguf is a declared dependency
        raise ImportError("reading GGUF files needs the `gguf` package: pip install gguf") from e
    return gguf


def _open(gguf_path: str | os.PathLike) -> Any:
    path = Path(gguf_path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist; check the path")
    try:
        return _gguf().GGUFReader(path)
    except Exception as e:
        raise GGUFConversionError(
            f"{str(path)!r} is not a readable GGUF file ({type(e).__name__}: {e}); "
            "download it again"
        ) from e


def read_gguf_metadata(gguf_path: str | os.PathLike) -> dict[str, Any]:
    """Reads the key-value metadata of a GGUF file as plain Python values.

    Float32 values are given as the shortest decimal that rounds to the same float32 (so
    ``1e-05`` rather than ``9.999999747378752e-06``). Token lists are included as read.

    Args:
      gguf_path: the ``.gguf`` file.

    Returns:
      ``{key: value}``, e.g. ``{"general.architecture": "llama", "llama.block_count": 30, ...}``.

    Raises:
      FileNotFoundError: the file does not exist.
      GGUFConversionError: it is not a GGUF file.
    """
    return _metadata(_open(gguf_path))


def _metadata(reader: Any) -> dict[str, Any]:
    gguf = _gguf()
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        if field.types and field.types[-1] == gguf.GGUFValueType.FLOAT32:
            value = (
                [float(str(np.float32(v))) for v in value]
                if isinstance(value, list)
                else float(str(np.float32(value)))
            )
        elif isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    return out


def gguf_to_hf_config(
    metadata: Mapping[str, Any], tensor_names: set[str], dtype: str = "float32"
) -> dict[str, Any]:
    """Builds a Hugging Face ``LlamaForCausalLM`` ``config.json`` from GGUF metadata.

    Args:
      metadata: `read_gguf_metadata` output.
      tensor_names: names of the tensors in the file; ``output.weight`` missing means the output
        projection is tied to the token embedding, ``blk.0.attn_q.bias`` present means biased
        attention projections.
      dtype: the dtype the weights are written in, one of `DTYPES`.

    Returns:
      The config as a JSON-serializable dict.

    Raises:
      GGUFConversionError: unsupported architecture, a missing or inconsistent hyper-parameter,
        or a RoPE variant the Hugging Face config cannot express from GGUF metadata alone.
    """
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFConversionError(
            f"GGUF architecture {arch!r} is not supported; this converter handles "
            f"{list(SUPPORTED_ARCHITECTURES)} (Llama-family models such as SmolLM2, Llama 2/3, "
            "Mistral). Use an original Hugging Face checkpoint of this model instead"
        )

    def get(key: str, default: Any = ..., kind: type = int) -> Any:
        full = f"{arch}.{key}"
        if full not in metadata:
            if default is ...:
                raise GGUFConversionError(
                    f"GGUF metadata lacks {full!r}, which the Llama config needs; the file is "
                    "incomplete or was not written by llama.cpp's converter"
                )
            return default
        value = metadata[full]
        if isinstance(value, list):
            raise GGUFConversionError(
                f"GGUF metadata {full!r} varies per layer ({value[:4]}...); models whose layers "
                "differ in shape are not supported"
            )
        return kind(value)

    num_layers = get("block_count")
    hidden_size = get("embedding_length")
    num_heads = get("attention.head_count")
    num_kv_heads = get("attention.head_count_kv", num_heads)
    head_dim = get("attention.key_length", hidden_size // num_heads)
    if get("attention.value_length", head_dim) != head_dim:
        raise GGUFConversionError("GGUF key and value head sizes differ; Llama needs them equal")
    rope_dim = get("rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise GGUFConversionError(
            f"GGUF rotary dimension {rope_dim} differs from the head size {head_dim} (partial "
            "rotary embedding), which Llama does not support"
        )
    if num_heads % num_kv_heads:
        raise GGUFConversionError(
            f"{num_heads} attention heads are not a multiple of {num_kv_heads} key/value heads"
        )
    if "rope_freqs.weight" in tensor_names:
        raise GGUFConversionError(
            "this GGUF carries per-frequency RoPE factors (rope_freqs, Llama 3.1-style scaling), "
            "whose Hugging Face parameters cannot be recovered from the file; use the original "
            "Hugging Face checkpoint of this model"
        )
    rope_scaling = None
    scaling_type = metadata.get(f"{arch}.rope.scaling.type", "none")
    if scaling_type == "linear":
        rope_scaling = {"rope_type": "linear", "factor": get("rope.scaling.factor", kind=float)}
    elif scaling_type not in ("none", None):
        raise GGUFConversionError(
            f"RoPE scaling type {scaling_type!r} is not supported (only 'linear'); use the "
            "original Hugging Face checkpoint of this model"
        )

    vocab_size = metadata.get(f"{arch}.vocab_size")
    if vocab_size is None and "tokenizer.ggml.tokens" in metadata:
        vocab_size = len(metadata["tokenizer.ggml.tokens"])
    if vocab_size is None:
        raise GGUFConversionError("GGUF metadata gives no vocabulary size (vocab_size or tokens)")

    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(vocab_size),
        "hidden_size": hidden_size,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": get("context_length"),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", kind=float),
        "rope_theta": get("rope.freq_base", 10000.0, kind=float),
        "rope_scaling": rope_scaling,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": dtype,
    }
    for name in ("bos", "eos", "pad"):
        token_id = metadata.get(f"tokenizer.ggml.{'padding' if name == 'pad' else name}_token_id")
        if token_id is not None:
            config[f"{name}_token_id"] = int(token_id)
    return config


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    match = _LAYER_TENSOR_RE.match(gguf_name)
    if match and match.group(2) in _LAYER_TENSORS:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{_LAYER_TENSORS[part]}.{kind}"
    return None


def _expected_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q = config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    shapes = {
        "model.embed_tokens.weight": (v, d),
        "model.norm.weight": (d,),
        "lm_head.weight": (v, d),
    }
    per_layer = {
        "input_layernorm.weight": (d,),
        "post_attention_layernorm.weight": (d,),
        "self_attn.q_proj.weight": (q, d),
        "self_attn.k_proj.weight": (kv, d),
        "self_attn.v_proj.weight": (kv, d),
        "self_attn.o_proj.weight": (d, q),
        "self_attn.q_proj.bias": (q,),
        "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.bias": (kv,),
        "self_attn.o_proj.bias": (d,),
        "mlp.gate_proj.weight": (f, d),
        "mlp.up_proj.weight": (f, d),
        "mlp.down_proj.weight": (d, f),
    }
    for i in range(config["num_hidden_layers"]):
        shapes.update({f"model.layers.{i}.{k}": s for k, s in per_layer.items()})
    return shapes


def _numpy_dtype(dtype: str) -> Any:
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; choose one of {list(DTYPES)}")
    if dtype == "bfloat16":
        import ml_dtypes  # a dependency of jax; safetensors writes its bfloat16 arrays as BF16

        return ml_dtypes.bfloat16
    return np.dtype(dtype)


def _state_dict(reader: Any, config: Mapping[str, Any], dtype: str) -> dict[str, np.ndarray]:
    gguf = _gguf()
    np_dtype = _numpy_dtype(dtype)
    expected = _expected_shapes(config)
    unknown = [t.name for t in reader.tensors if _hf_name(t.name) is None]
    if unknown:
        raise GGUFConversionError(
            f"GGUF tensors {unknown[:8]} have no counterpart in a Hugging Face Llama; the file "
            "holds a different architecture than its metadata says, or a variant this converter "
            "does not support"
        )
    state: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dims fastest first
        if name not in expected or expected[name] != shape:
            raise GGUFConversionError(
                f"GGUF tensor {tensor.name!r} has shape {shape}, but the metadata implies "
                f"{expected.get(name)}; the file's metadata and tensors disagree"
            )
        try:
            weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as e:
            raise GGUFConversionError(
                f"GGUF tensor {tensor.name!r} is stored as {tensor.tensor_type.name}, which the "
                f"installed gguf package cannot dequantize ({e}); upgrade gguf or use a file with "
                "another quantization"
            ) from e
        weight = np.asarray(weight, dtype=np.float32).reshape(shape)
        if ".attn_q." in tensor.name:
            weight = unpermute_rotary(weight, config["num_attention_heads"])
        elif ".attn_k." in tensor.name:
            weight = unpermute_rotary(weight, config["num_key_value_heads"])
        state[name] = np.ascontiguousarray(weight.astype(np_dtype))
    required = {
        n
        for n in expected
        if not n.endswith(".bias") and (n != "lm_head.weight" or not config["tie_word_embeddings"])
    }
    if config["attention_bias"]:
        # A Hugging Face Llama with attention_bias has biases on q, k, v and o alike.
        required |= {n for n in expected if re.search(r"\.[qkvo]_proj\.bias$", n)}
    missing = sorted(required - state.keys())
    if missing:
        raise GGUFConversionError(
            f"GGUF file lacks tensors for {missing[:8]} ({len(missing)} in all); it is truncated "
            "or its block_count is wrong"
        )
    return state


def save_gguf_tokenizer(
    gguf_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Writes the tokenizer of a GGUF file as Hugging Face tokenizer files.

    The vocabulary, merges and special tokens are read by transformers' GGUF support; this adds
    the chat template from ``tokenizer.chat_template`` (checking it survived), llama.cpp's
    digit-isolating pre-tokenizer where transformers drops it, and a ``tokenizer_config.json``
    naming ``PreTrainedTokenizerFast`` so both transformers 4 and 5 load ``tokenizer.json`` as is.

    Args:
      gguf_path: the ``.gguf`` file.
      out_dir: existing directory to write ``tokenizer.json``, ``tokenizer_config.json`` and
        ``special_tokens_map.json`` into.
      metadata: `read_gguf_metadata` output, if already read.

    Raises:
      ImportError: transformers is not installed.
      GGUFConversionError: the file has no tokenizer, or one transformers cannot build.
    """
    try:
        from tokenizers import pre_tokenizers
        from transformers import AutoTokenizer
    except ImportError as e:
        raise ImportError(
            "converting a GGUF tokenizer needs transformers and tokenizers: "
            "pip install transformers"
        ) from e
    gguf_path = Path(gguf_path)
    metadata = read_gguf_metadata(gguf_path) if metadata is None else metadata
    if "tokenizer.ggml.tokens" not in metadata:
        raise GGUFConversionError(
            f"{str(gguf_path)!r} holds no tokenizer (no tokenizer.ggml.tokens); convert with "
            "tokenizer=False and bring the model's tokenizer files yourself"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True
        )
    except Exception as e:
        raise GGUFConversionError(
            f"transformers could not build the tokenizer of {str(gguf_path)!r} "
            f"({type(e).__name__}: {e}); upgrade transformers or bring the tokenizer files"
        ) from e

    backend = tokenizer.backend_tokenizer
    pre = metadata.get("tokenizer.ggml.pre")
    if (
        metadata.get("tokenizer.ggml.model") == "gpt2"
        and pre in _DIGIT_SPLIT_PRE_TOKENIZERS
        and isinstance(backend.pre_tokenizer, pre_tokenizers.ByteLevel)
    ):
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    template = metadata.get("tokenizer.chat_template")
    if template is not None:
        tokenizer.chat_template = template

    out_dir = Path(out_dir)
    # The template goes into tokenizer_config.json, where every transformers version finds it.
    tokenizer.save_pretrained(str(out_dir), save_jinja_files=False)
    config_path = out_dir / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    for key in ("is_local", "local_files_only", "name_or_path", "vocab_file"):
        tok_config.pop(key, None)
    arch = metadata.get("general.architecture")
    tok_config.update(
        tokenizer_class="PreTrainedTokenizerFast",
        clean_up_tokenization_spaces=False,
        add_bos_token=bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        add_eos_token=bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
    )
    if f"{arch}.context_length" in metadata:
        tok_config["model_max_length"] = int(metadata[f"{arch}.context_length"])
    if template is not None:
        tok_config["chat_template"] = template
    config_path.write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")
    special = {
        k: getattr(tokenizer, k)
        for k in ("bos_token", "eos_token", "unk_token", "pad_token")
        if getattr(tokenizer, k, None) is not None
    }
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def convert_gguf_to_hf(
    gguf_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: str = "float32",
    *,
    tokenizer: bool = True,
    overwrite: bool = False,
) -> Path:
    """Converts a Llama-family GGUF file into a Hugging Face model directory.

    Writes ``config.json`` (``LlamaForCausalLM``), ``generation_config.json``,
    ``model.safetensors`` with Hugging Face tensor names (``model.embed_tokens.weight``,
    ``model.layers.N.self_attn.q_proj.weight``, ..., ``lm_head.weight`` only when the output
    projection is not tied) and, with ``tokenizer=True``, the tokenizer files with the chat
    template. Quantized tensors are dequantized (the values the quantized model computes with);
    q and k rows are put back in Hugging Face order. The directory is assembled under a temporary
    name beside ``out_dir`` and renamed at the end, so an interrupted conversion never leaves a
    directory that looks complete.

    Args:
      gguf_path: the ``.gguf`` file.
      out_dir: the directory to create.
      dtype: dtype of the written weights, one of `DTYPES`.
      tokenizer: also write the tokenizer (needs transformers).
      overwrite: replace ``out_dir`` if it exists.

    Returns:
      ``out_dir`` as a `Path`.

    Raises:
      FileNotFoundError: ``gguf_path`` does not exist.
      FileExistsError: ``out_dir`` exists and ``overwrite`` is false.
      ValueError: unsupported ``dtype``.
      GGUFConversionError: the file is not a Llama-family GGUF this converter supports.
    """
    _numpy_dtype(dtype)  # validate before any work
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(
            f"{str(out_dir)!r} already exists; pass overwrite=True (--force) to replace it"
        )
    from safetensors.numpy import save_file

    reader = _open(gguf_path)
    metadata = _metadata(reader)
    config = gguf_to_hf_config(metadata, {t.name for t in reader.tensors}, dtype)
    state = _state_dict(reader, config, dtype)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary directory
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "model.safetensors").chmod(0o644)  # safetensors creates it owner-only
        del state
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        generation = {
            k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config
        }
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if tokenizer:
            save_gguf_tokenizer(gguf_path, tmp, metadata=metadata)
        if out_dir.exists():
            # Move the old directory aside first, so a failure here loses nothing.
            old = out_dir.with_name(f".{out_dir.name}.old-{time.time_ns()}")
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
