"""Loading HF-format checkpoints: logits equal transformers' PyTorch models; clear load errors."""

import json
import os
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from fedjax_llm.models import hf_loader, llama
from fedjax_llm.models.hf_loader import ModelLoadError

# Every test here saves a transformers PyTorch model; without torch they all skip.
torch = pytest.importorskip("torch")

SMALL = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

CASES = {
    "llama_untied": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": False}),
    "llama_tied_theta": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {"tie_word_embeddings": True, "rope_theta": 500.0},
    ),
    # Llama 3.1 rope scaling; a short original context so all three frequency bands occur.
    "llama3_rope_scaling": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {"rope_scaling": {**LLAMA3_ROPE, "rope_theta": 10000.0}, "head_dim": 16},
    ),
    "llama_linear_rope": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {"rope_scaling": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}},
    ),
    "smollm2_like": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {
            "tie_word_embeddings": True,
            "num_attention_heads": 6,
            "num_key_value_heads": 2,
            "hidden_size": 48,
        },
    ),
    "qwen2_bias": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 4096, "head_dim": 12}),
}


def _save_hf_model(directory: pathlib.Path, case: str, max_shard_size=None, seed=0):
    config_cls, model_cls, extra = CASES[case]
    hf_config = getattr(transformers, config_cls)(**{**SMALL, **extra})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(hf_config).eval()
    with torch.no_grad():  # Random norms and biases, so a wrong mapping cannot hide behind 1s/0s.
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(0.3 * torch.randn_like(p))
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(directory, **kwargs)
    return model


def _torch_logits(model, tokens, mask=None):
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(np.asarray(tokens), dtype=torch.long),
            attention_mask=None if mask is None else torch.tensor(np.asarray(mask)),
        )
    return out.logits.float().numpy()


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
    model = _save_hf_model(tmp_path, case)
    config, params = hf_loader.load_pretrained(tmp_path, max_seq_len=32)
    tokens = np.random.default_rng(1).integers(0, SMALL["vocab_size"], (2, 23))
    want = _torch_logits(model, tokens)
    got = np.asarray(jax.jit(llama.apply, static_argnums=0)(config, params, jnp.asarray(tokens)))
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_left_padded_batch_matches_transformers(tmp_path):
    model = _save_hf_model(tmp_path, "llama_untied")
    config, params = hf_loader.load_pretrained(tmp_path, max_seq_len=32)
    tokens = np.random.default_rng(2).integers(0, SMALL["vocab_size"], (2, 12))
    mask = np.ones_like(tokens)
    mask[1, :4] = 0  # Left padding of the second row.
    want = _torch_logits(model, tokens, mask)
    got = np.asarray(llama.apply(config, params, jnp.asarray(tokens), attention_mask=mask > 0))
    np.testing.assert_allclose(got[0], want[0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(got[1, 4:], want[1, 4:], atol=1e-4, rtol=0)


def test_sharded_checkpoint_and_bfloat16_loading(tmp_path):
    model = _save_hf_model(tmp_path, "llama_untied")
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    config, single = hf_loader.load_pretrained(tmp_path, max_seq_len=16)
    _, params = hf_loader.load_pretrained(sharded, max_seq_len=16)
    jax.tree.map(np.testing.assert_array_equal, params, single)
    _, half = hf_loader.load_pretrained(sharded, max_seq_len=16, load_dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(half)} == {jnp.dtype(jnp.bfloat16)}
    tokens = jnp.arange(10)[None] % SMALL["vocab_size"]
    np.testing.assert_allclose(
        llama.apply(config, half, tokens), llama.apply(config, single, tokens), atol=0.05
    )


def _edit_config(directory, **changes):
    path = directory / "config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "GPT2LMHeadModel"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"max_position_embeddings": 16}, "max_position_embeddings"),
        ({"num_hidden_layers": 3}, r"model\.layers\.2"),
        ({"intermediate_size": 40}, r"mlp\.(gate|up|down)_proj\.weight has shape"),
    ],
)
def test_unsupported_or_mismatched_config_names_the_field(tmp_path, changes, match):
    _save_hf_model(tmp_path, "llama_untied")
    _edit_config(tmp_path, **changes)
    with pytest.raises(ModelLoadError, match=match):
        hf_loader.load_pretrained(tmp_path, max_seq_len=32)


def test_sliding_window_shorter_than_sequence(tmp_path):
    _save_hf_model(tmp_path, "mistral")
    _edit_config(tmp_path, sliding_window=16)
    with pytest.raises(ModelLoadError, match="sliding_window=16"):
        hf_loader.load_pretrained(tmp_path, max_seq_len=32)
    hf_loader.load_pretrained(tmp_path, max_seq_len=16)


def test_missing_directory_or_weights(tmp_path):
    with pytest.raises(ModelLoadError, match="fetch_model.py"):
        hf_loader.load_pretrained(tmp_path / "nope", max_seq_len=8)
    _save_hf_model(tmp_path, "llama_untied")
    for file in tmp_path.glob("*.safetensors"):
        os.remove(file)
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        hf_loader.load_pretrained(tmp_path, max_seq_len=8)


def test_tied_config_with_untied_weights_is_refused(tmp_path):
    _save_hf_model(tmp_path, "llama_untied")
    _edit_config(tmp_path, tie_word_embeddings=True)
    with pytest.raises(ModelLoadError, match="lm_head.weight"):
        hf_loader.load_pretrained(tmp_path, max_seq_len=8)


def test_legacy_rope_fields_are_read(tmp_path):
    """Configs written before transformers 5 keep rope_theta and rope_scaling at the top level."""
    model = _save_hf_model(tmp_path, "llama_linear_rope")
    data = json.loads((tmp_path / "config.json").read_text())
    data.pop("rope_parameters")
    data.update(rope_theta=10000.0, rope_scaling={"type": "linear", "factor": 2.0})
    (tmp_path / "config.json").write_text(json.dumps(data))
    config, params = hf_loader.load_pretrained(tmp_path, max_seq_len=32)
    assert (config.rope_type, config.rope_factor) == ("linear", 2.0)
    tokens = np.random.default_rng(3).integers(0, SMALL["vocab_size"], (1, 20))
    got = np.asarray(llama.apply(config, params, jnp.asarray(tokens)))
    np.testing.assert_allclose(got, _torch_logits(model, tokens), atol=1e-4, rtol=0)


def _header(tensors: dict) -> bytes:
    """A safetensors header: 8-byte little-endian length, then the JSON."""
    body = json.dumps(tensors).encode()
    return len(body).to_bytes(8, "little") + body


# Each damages the bytes of a valid weight file the way a failed download or copy can.
CORRUPTIONS = {
    "empty": lambda data: b"",
    "truncated_in_tensor_data": lambda data: data[: len(data) // 2],
    "truncated_in_header": lambda data: data[:20],
    "garbage": lambda data: b"<html>503 Service Unavailable</html>" * 8,
    "header_not_json": lambda data: (9).to_bytes(8, "little") + b"{not json" + b"\0" * 64,
    "offsets_past_end_of_file": lambda data: (
        _header({"model.norm.weight": {"dtype": "F32", "shape": [32], "data_offsets": [0, 128]}})
        + b"\0" * 16
    ),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_unreadable_weight_file_names_the_file_and_the_fix(tmp_path, corruption):
    _save_hf_model(tmp_path, "llama_untied")
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(CORRUPTIONS[corruption](weights.read_bytes()))
    with pytest.raises(ModelLoadError, match=r"model\.safetensors.*fetch_model\.py") as info:
        hf_loader.load_pretrained(tmp_path, max_seq_len=8)
    assert str(tmp_path) in str(info.value)
    if corruption == "empty":
        assert "empty (0 bytes)" in str(info.value)


def test_truncated_shard_names_that_shard(tmp_path):
    model = _save_hf_model(tmp_path, "llama_untied")
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="20KB")
    shards = sorted(sharded.glob("*.safetensors"))
    bad = shards[len(shards) // 2]
    bad.write_bytes(bad.read_bytes()[:-100])
    with pytest.raises(ModelLoadError, match=re.escape(bad.name)) as info:
        hf_loader.load_pretrained(sharded, max_seq_len=8)
    others = [s.name for s in shards if s != bad]
    assert not any(name in str(info.value) for name in others)


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"metadata": {}, "weight_map": {"model.norm.weight": "model-0', "not JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"metadata": {}}', "weight_map"),
    ],
)
def test_corrupt_shard_index_names_the_index(tmp_path, content, match):
    model = _save_hf_model(tmp_path, "llama_untied")
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="20KB")
    (sharded / "model.safetensors.index.json").write_text(content)
    with pytest.raises(ModelLoadError, match=match) as info:
        hf_loader.load_pretrained(sharded, max_seq_len=8)
    assert "model.safetensors.index.json" in str(info.value)
    assert "fetch_model.py" in str(info.value)


@pytest.mark.parametrize(
    "content", [b'{"architectures": ["LlamaForCausalLM"', b'{"name": "caf\xe9"}']
)
def test_damaged_config_json_is_a_model_load_error(tmp_path, content):
    _save_hf_model(tmp_path, "llama_untied")
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(ModelLoadError, match=r"config\.json is not valid JSON.*fetch_model\.py"):
        hf_loader.load_pretrained(tmp_path, max_seq_len=8)
