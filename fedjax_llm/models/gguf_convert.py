"""Conversion of a llama.cpp GGUF checkpoint of a Llama-family model to a Hugging Face directory.

A GGUF file holds everything a model needs (hyper-parameters, weights, often quantized, and the
tokenizer with its chat template) under llama.cpp's names and layouts. `convert_gguf_to_hf`
turns it into the directory layout every Llama loader reads (``config.json``,
``model.safetensors``, ``generation_config.json`` and the tokenizer files), so a model that is
only available as a GGUF (for instance from a package registry, when the Hugging Face hub cannot
be reached) serves like any other local checkpoint.

Weights are dequantized with the `gguf` package (numpy only) and the tokenizer is rebuilt from
the metadata with the `tokenizers` library (`build_gguf_tokenizer`), so the conversion needs
neither PyTorch nor transformers, whose GGUF reader imports PyTorch. Two details of llama.cpp's
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

from fedjax_llm.errors import UserError

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

# llama.cpp token types (``tokenizer.ggml.token_type``, gguf.TokenType).
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

# How a byte-level BPE vocabulary ("gpt2") splits text before merging, by ``tokenizer.ggml.pre``:
# llama.cpp's grouping of the names (llama-vocab.cpp), with the regular expressions as the models'
# original tokenizer.json files spell them (the same ones transformers' GGUF support uses).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_FAMILY = ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral")
_LLAMA3_FAMILY += ("midm-2.0", "lfm2", "jina-v5-nano")
_REGEX_SPLITS = {
    **dict.fromkeys(_LLAMA3_FAMILY + ("dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    **dict.fromkeys(
        ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2"), _QWEN2_SPLIT
    ),
    "qwen35": _QWEN35_SPLIT,
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie"), _GPT4O_SPLIT),
}
# Every digit on its own, then GPT-2's split (llama.cpp's ``\p{N}`` first; SmolLM2's original
# tokenizer.json has the same Digits + ByteLevel pair).
_DIGIT_SPLIT_PRE_TOKENIZERS = frozenset(
    {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b", "mellum2"}
)
# GPT-2's own split, the regular expression built into `pre_tokenizers.ByteLevel`.
_GPT2_SPLIT_PRE_TOKENIZERS = frozenset(
    {"gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0"}
    | {"mellum", "modern-bert", "exaone4", "mpt", "olmo", "jais", "trillion", "granite-docling"}
)
# llama.cpp looks a whole pre-token up in the vocabulary before merging for these (the
# ``ignore_merges`` of their original tokenizer.json files).
_IGNORE_MERGES_PRE_TOKENIZERS = frozenset(_LLAMA3_FAMILY + ("tekken",))


class GGUFConversionError(UserError, ValueError):
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


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet of byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    table = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in table)
    table.update({b: chr(256 + n) for n, b in enumerate(shifted)})
    return dict(sorted(table.items()))


def _merges_from_metadata(merges: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for merge in merges:
        cut = merge.find(" ", 1)  # llama.cpp's split: the first space after the first character
        if cut < 0:
            raise GGUFConversionError(
                f"GGUF merge {merge!r} is not two tokens separated by a space; the file's "
                "tokenizer.ggml.merges is corrupt"
            )
        pairs.append((merge[:cut], merge[cut + 1 :]))
    return pairs


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Merges implied by a SentencePiece vocabulary: every split of a piece into two pieces,
    best score first (transformers' ``generate_merges``, which its GGUF support uses)."""
    vocab = {token: i for i, token in enumerate(tokens)}
    candidates = []
    for piece, score in zip(tokens, scores, strict=True):
        local = [
            (piece[:i], piece[i:], score)
            for i in range(1, len(piece))
            if piece[:i] in vocab and piece[i:] in vocab
        ]
        candidates += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    candidates.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in candidates]


def _byte_level_pre_tokenizer(pre: str | None) -> tuple[Any, bool]:
    from tokenizers import Regex, pre_tokenizers

    if pre in _REGEX_SPLITS:
        split = pre_tokenizers.Split(Regex(_REGEX_SPLITS[pre]), behavior="isolated")
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        return pre_tokenizers.Sequence([split, byte_level]), pre in _IGNORE_MERGES_PRE_TOKENIZERS
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_SPLIT_PRE_TOKENIZERS:
        digits = pre_tokenizers.Digits(individual_digits=True)
        return pre_tokenizers.Sequence([digits, byte_level]), False
    if pre in _GPT2_SPLIT_PRE_TOKENIZERS:
        return byte_level, False
    known = sorted({*_REGEX_SPLITS, *_DIGIT_SPLIT_PRE_TOKENIZERS, *_GPT2_SPLIT_PRE_TOKENIZERS})
    raise GGUFConversionError(
        f"GGUF pre-tokenizer tokenizer.ggml.pre={pre!r} is not one this converter knows how to "
        f"reproduce ({known}); convert with tokenizer=False and bring the model's original "
        "tokenizer files"
    )


def build_gguf_tokenizer(metadata: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Builds the Hugging Face fast tokenizer a GGUF file's metadata describes.

    Only the `tokenizers` library is used (no transformers, no PyTorch). Two vocabulary types are
    understood, as llama.cpp reads them and as transformers' GGUF support builds them:

    - ``tokenizer.ggml.model == "gpt2"``: byte-level BPE (SmolLM2, Llama 3, Mistral Nemo, ...)
      with the file's merges, split before merging as ``tokenizer.ggml.pre`` names (SmolLM2's
      ``smollm`` isolates every digit, as its original tokenizer.json does; transformers' GGUF
      support drops that split).
    - ``"llama"``: SentencePiece BPE with byte fallback (Llama 2, Mistral 7B), merges derived
      from the token scores, a ``▁`` prefix unless ``tokenizer.ggml.add_space_prefix`` is false.

    Tokens typed CONTROL and the bos/eos/unk/pad tokens become special added tokens (matched
    whole, skipped by ``decode(..., skip_special_tokens=True)``); USER_DEFINED tokens are matched
    whole but are not special. BOS/EOS are added to encodings as ``tokenizer.ggml.add_bos_token``
    and ``add_eos_token`` say (by default BOS for SentencePiece, nothing for byte-level).

    Args:
      metadata: `read_gguf_metadata` output.

    Returns:
      ``(tokenizer, tokenizer_config)``: a `tokenizers.Tokenizer` and the contents of
      ``tokenizer_config.json`` (special token strings, chat template, BOS/EOS flags, maximum
      length).

    Raises:
      GGUFConversionError: no tokenizer in the metadata, an unsupported vocabulary or
        pre-tokenizer type, duplicate tokens, or malformed merges.

    References:
      llama.cpp ``src/llama-vocab.cpp`` (pre-tokenizer names, token types);
      transformers ``integrations/gguf/gguf_tokenizer_mapping.py``.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens = metadata.get("tokenizer.ggml.tokens")
    if not tokens:
        raise GGUFConversionError(
            "the GGUF holds no tokenizer (no tokenizer.ggml.tokens); convert with "
            "tokenizer=False and bring the model's tokenizer files yourself"
        )
    tokens = [str(t) for t in tokens]
    kind = metadata.get("tokenizer.ggml.model")
    types = list(metadata.get("tokenizer.ggml.token_type") or [])
    if types and len(types) != len(tokens):
        raise GGUFConversionError(
            f"GGUF metadata lists {len(types)} token types for {len(tokens)} tokens; the "
            "file's tokenizer is corrupt"
        )
    if kind == "gpt2":
        alphabet = _bytes_to_unicode()
        letters = set(alphabet.values())
        # llama.cpp's converter writes byte-level tokens spelled in GPT-2's alphabet; one that
        # is not (a few files write added tokens as plain UTF-8) is spelled into it.
        vocab_tokens = [
            t if set(t) <= letters else "".join(alphabet[b] for b in t.encode("utf-8"))
            for t in tokens
        ]
        if "tokenizer.ggml.merges" not in metadata:
            raise GGUFConversionError(
                "the GGUF's byte-level BPE tokenizer has no tokenizer.ggml.merges; the file is "
                "incomplete"
            )
        merges = _merges_from_metadata(metadata["tokenizer.ggml.merges"])
        pre_tokenizer, ignore_merges = _byte_level_pre_tokenizer(metadata.get("tokenizer.ggml.pre"))
        model_kwargs = dict(continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
        decoder = decoders.ByteLevel()
        # A CONTROL token outside the byte alphabet is a llama.cpp mislabel; adding it as a
        # special token would grow the vocabulary past the model's embedding.
        can_be_special = [set(t) <= letters for t in tokens]
        add_bos_default = False
    elif kind == "llama":
        vocab_tokens = tokens
        if "tokenizer.ggml.merges" in metadata:
            merges = _merges_from_metadata(metadata["tokenizer.ggml.merges"])
        else:
            scores = metadata.get("tokenizer.ggml.scores")
            if scores is None or len(scores) != len(tokens):
                raise GGUFConversionError(
                    "the GGUF's SentencePiece tokenizer has neither merges nor one score per "
                    "token (tokenizer.ggml.scores); the file is incomplete"
                )
            merges = _merges_from_scores(tokens, [float(s) for s in scores])
        prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
        pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="▁", prepend_scheme="first" if prefix else "never", split=False
        )
        ignore_merges = False
        model_kwargs = dict(fuse_unk=True, byte_fallback=True)
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if prefix:
            steps.append(decoders.Strip(" ", 1, 0))  # the prefix space the encoder added
        decoder = decoders.Sequence(steps)
        can_be_special = [True] * len(tokens)
        add_bos_default = True
    else:
        raise GGUFConversionError(
            f"GGUF tokenizer type tokenizer.ggml.model={kind!r} is not supported (only 'gpt2', "
            "byte-level BPE, and 'llama', SentencePiece BPE); convert with tokenizer=False and "
            "bring the model's tokenizer files"
        )
    vocab: dict[str, int] = {}
    for i, token in enumerate(vocab_tokens):
        if vocab.setdefault(token, i) != i:
            raise GGUFConversionError(
                f"GGUF token {token!r} appears twice in the vocabulary (ids {vocab[token]} and "
                f"{i}); the file's tokenizer is corrupt"
            )
    tokenizer = Tokenizer(
        models.BPE(vocab, merges, dropout=None, ignore_merges=ignore_merges, **model_kwargs)
    )
    tokenizer.normalizer = None
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoder

    special_ids = {i for i, t in enumerate(types) if t == _TOKEN_CONTROL}
    names: dict[str, str] = {}
    for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        token_id = metadata.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is None:
            continue
        token_id = int(token_id)
        if not 0 <= token_id < len(tokens):
            raise GGUFConversionError(
                f"GGUF tokenizer.ggml.{key}_token_id={token_id} is outside the vocabulary of "
                f"{len(tokens)} tokens"
            )
        if can_be_special[token_id]:
            names[f"{name}_token"] = tokens[token_id]
            special_ids.add(token_id)
    tokenizer.add_special_tokens(
        [
            AddedToken(tokens[i], normalized=False, special=True)
            for i in sorted(special_ids)
            if can_be_special[i]
        ]
    )
    tokenizer.add_tokens(
        [
            AddedToken(tokens[i], normalized=False, special=False)
            for i, t in enumerate(types)
            if t == _TOKEN_USER_DEFINED and i not in special_ids and tokens[i] in vocab
        ]
    )
    if tokenizer.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise GGUFConversionError(  # pragma: no cover - guarded above, kept as an invariant
            "building the GGUF tokenizer changed its vocabulary size; report this file"
        )

    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", add_bos_default))
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
    for flag, name in ((add_bos, "bos_token"), (add_eos, "eos_token")):
        if flag and name not in names:
            raise GGUFConversionError(
                f"the GGUF asks to add {name} to every sequence but names no {name} id"
            )
    # What transformers' fast tokenizers build from add_bos_token / add_eos_token, written out
    # so that every reader of tokenizer.json adds the same tokens.
    bos, eos = names.get("bos_token"), names.get("eos_token")
    single = [f"{bos}:0"] * add_bos + ["$A:0"] + [f"{eos}:0"] * add_eos
    pair = single + [f"{bos}:1"] * add_bos + ["$B:1"] + [f"{eos}:1"] * add_eos
    specials = [(bos, tokenizer.token_to_id(bos))] * add_bos
    specials += [(eos, tokenizer.token_to_id(eos))] * add_eos
    tokenizer.post_processor = processors.TemplateProcessing(
        single=" ".join(single), pair=" ".join(pair), special_tokens=specials
    )

    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", **names}
    template = metadata.get("tokenizer.chat_template")
    if template is not None:
        config["chat_template"] = template
    arch = metadata.get("general.architecture")
    if f"{arch}.context_length" in metadata:
        config["model_max_length"] = int(metadata[f"{arch}.context_length"])
    # Decoding is the exact inverse of encoding; llama.cpp's "clean spaces" is not applied.
    config.update(clean_up_tokenization_spaces=False, add_bos_token=add_bos, add_eos_token=add_eos)
    return tokenizer, config


def save_gguf_tokenizer(
    gguf_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Writes the tokenizer of a GGUF file as Hugging Face tokenizer files.

    Builds it with `build_gguf_tokenizer` (the `tokenizers` library only: no transformers and no
    PyTorch) and writes ``tokenizer.json``, ``tokenizer_config.json`` (naming
    ``PreTrainedTokenizerFast``, so transformers 4 and 5 both load ``tokenizer.json`` as is, and
    holding the chat template from ``tokenizer.chat_template``) and ``special_tokens_map.json``.

    Args:
      gguf_path: the ``.gguf`` file.
      out_dir: existing directory to write the files into.
      metadata: `read_gguf_metadata` output, if already read.

    Raises:
      ImportError: the `tokenizers` package is not installed.
      GGUFConversionError: the file has no tokenizer, or one `build_gguf_tokenizer` refuses.
    """
    try:
        import tokenizers  # noqa: F401
    except ImportError as e:  # pragma: no cover - tokenizers is a declared dependency
        raise ImportError(
            "converting a GGUF tokenizer needs the `tokenizers` package: pip install tokenizers"
        ) from e
    metadata = read_gguf_metadata(gguf_path) if metadata is None else metadata
    try:
        tokenizer, config = build_gguf_tokenizer(metadata)
    except GGUFConversionError as e:
        raise GGUFConversionError(f"{str(gguf_path)!r}: {e}") from None
    out_dir = Path(out_dir)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    )
    special = {k: v for k, v in config.items() if k.endswith("_token") and isinstance(v, str)}
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps(special, indent=2, ensure_ascii=False) + "\n"
    )


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
      tokenizer: also write the tokenizer (built with the `tokenizers` library).
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
