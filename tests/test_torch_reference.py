"""Tests of fedjax_llm/torch_reference.py: the PyTorch loop computes the compiled round.

The transformers model built from our params (with hand-made LoRA) gives our logits, and FedAvg
rounds of the torch loop give the new global LoRA params of `make_round_fn`'s round.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from fedjax_llm import benchmarking  # noqa: E402
from fedjax_llm import torch_reference as tr  # noqa: E402
from fedjax_llm.models import llama  # noqa: E402
from fedjax_llm.models.lora import LORA_TARGETS, init_lora  # noqa: E402
from fedjax_llm.round import make_round_fn  # noqa: E402
from fedjax_llm.sampling import Cohort  # noqa: E402

# The round's new params may differ from the compiled round's by float32 rounding only: at most
# this fraction of the round's largest parameter update.
UPDATE_RTOL = 1e-4

SMALL = llama.LlamaConfig(
    vocab_size=61,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    max_seq_len=16,
    initializer_range=0.2,  # large enough that every block changes the logits
)
CONFIGS = {
    "tied": SMALL,
    "untied_theta": dataclasses.replace(SMALL, tie_embeddings=False, rope_theta=500.0),
    "llama3_rope": dataclasses.replace(
        SMALL,
        head_dim=16,
        rope_type="llama3",
        rope_factor=8.0,
        rope_original_max_position=8,
    ),
    "linear_rope": dataclasses.replace(SMALL, rope_type="linear", rope_factor=2.0),
}


@pytest.fixture(autouse=True)
def _one_torch_thread():
    # Tests run in several worker processes on few cores: PyTorch's OpenMP threads spin at
    # barriers and slow to a crawl when the cores are oversubscribed.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _random_lora(config, key, rank):
    lora = init_lora(config, key, rank, LORA_TARGETS)
    # Nonzero b, so that a wrong placement or layout of any factor shows in the logits.
    return {
        target: {
            "a": f["a"],
            "b": 0.3 * jax.random.normal(jax.random.fold_in(key, i), f["b"].shape),
        }
        for i, (target, f) in enumerate(lora.items())
    }


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_model_with_lora_gives_our_logits(case):
    config = CONFIGS[case]
    params = llama.init_params(config, jax.random.key(0))
    lora = _random_lora(config, jax.random.key(1), rank=4)
    scaling = 1.5
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 13))
    apply = jax.jit(llama.apply, static_argnums=0, static_argnames="lora_scaling")
    want = apply(config, params, jnp.asarray(tokens), lora=lora, lora_scaling=scaling)

    model = tr.build_hf_model(config, params)
    assert not any(p.requires_grad for p in model.parameters())
    wrappers = tr.add_lora(model, LORA_TARGETS, rank=4, scaling=scaling)
    with torch.no_grad():
        base = model(input_ids=torch.from_numpy(tokens)).logits.numpy()  # zero LoRA factors
        for target, layers in wrappers.items():
            for i, module in enumerate(layers):
                module.lora_A.copy_(torch.from_numpy(np.array(lora[target]["a"][i]).T))
                module.lora_B.copy_(torch.from_numpy(np.array(lora[target]["b"][i]).T))
        got = model(input_ids=torch.from_numpy(tokens)).logits.numpy()
    assert np.abs(np.asarray(want) - base).max() > 0.1  # LoRA matters here
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


def test_state_dict_round_trips_the_layout():
    config = CONFIGS["untied_theta"]
    params = llama.init_params(config, jax.random.key(0))
    state = tr.hf_state_dict(config, params)
    assert len(state) == 3 + 9 * config.num_layers  # embed, norm, lm_head + 9 per layer
    np.testing.assert_array_equal(
        state["model.layers.1.self_attn.k_proj.weight"],
        np.asarray(params["layers"]["attn"]["k_proj"]["kernel"][1]).T,
    )
    np.testing.assert_array_equal(
        state["lm_head.weight"], np.asarray(params["lm_head"]["kernel"]).T
    )


def test_refuses_qkv_biases():
    with pytest.raises(ValueError, match="attention_bias"):
        tr.hf_config(dataclasses.replace(SMALL, attention_bias=True))


def _max_update_and_diff(got, want, before):
    leaves = [jax.tree.leaves(t) for t in (got, want, before)]
    diff = max(float(np.max(np.abs(g - w))) for g, w, _ in zip(*leaves, strict=True))
    update = max(float(np.max(np.abs(w - b))) for _, w, b in zip(*leaves, strict=True))
    return diff, update


def test_rounds_equal_the_compiled_round():
    # The benchmark's tiny model: 2 clients, 2 local steps of 2 x 32 tokens, client SGD.
    setup = benchmarking.build_setup(benchmarking.MODELS["tiny"], 2, "lora", 8, 8, "float32", 0)
    assert setup.schedule.local_steps == 2
    args = benchmarking.make_round_args(setup, 2, 2, seed=0)
    # Round 2: the second client's upload is lost, so only the first one's delta counts (its
    # loss still does).
    lost = Cohort(
        args[1].cohort.client_ids, args[1].cohort.participating, jnp.asarray([True, False])
    )
    args[1] = args[1]._replace(cohort=lost)
    round_fn = jax.jit(
        make_round_fn(
            setup.algorithm,
            setup.objective,
            setup.schedule,
            num_clients_total=setup.num_clients_total,
            clients_per_chunk=None,
        )
    )
    loop = tr.TorchFedAvgRound(
        setup.config,
        setup.frozen,
        setup.data,
        setup.schedule,
        lora_targets=benchmarking.LORA_TARGETS,
        lora_rank=setup.lora_rank,
        lora_scaling=setup.lora_scaling,
    )
    state = setup.state
    global_lora = loop.lora_from_jax(setup.algorithm.server_params(state.server))
    for round_args in args:
        before = jax.device_get(setup.algorithm.server_params(state.server))
        state, out = round_fn(setup.frozen, state, setup.data, *round_args)
        torch_out = loop(
            global_lora,
            round_args.cohort,
            round_args.round_key,
            float(round_args.hparams.client_lr),
        )
        want = jax.device_get(setup.algorithm.server_params(state.server))
        got = loop.lora_to_jax(global_lora)
        diff, update = _max_update_and_diff(got, want, before)
        assert update > 1e-4  # the round moved the params
        assert diff <= UPDATE_RTOL * update, (diff, update)
        np.testing.assert_array_equal(torch_out.weights, np.asarray(out.weights))
        assert torch_out.train_loss == pytest.approx(float(out.train_loss), rel=1e-6)
    assert list(torch_out.weights) == [32.0, 0.0]


def test_benchmark_variant_uses_every_core_and_the_setup_dtype():
    setup = benchmarking.build_setup(benchmarking.MODELS["tiny"], 2, "lora", 8, 8, "bfloat16", 0)
    loop = benchmarking.make_torch_round(setup)
    assert torch.get_num_threads() == benchmarking.usable_cores()
    assert loop.autocast_dtype == torch.bfloat16 and loop.device.type == "cpu"
    variant = benchmarking.build_torch_loop(setup)
    assert variant.name == benchmarking.TORCH_VARIANT
    args = benchmarking.make_round_args(setup, 2, 1, seed=0)
    variant.start(setup, args[0])
    assert np.isfinite(variant.train_loss)
    assert jax.tree.structure(variant.params) == jax.tree.structure(
        jax.device_get(setup.algorithm.server_params(setup.state.server))
    )
    with pytest.raises(ValueError, match="LoRA"):
        benchmarking.make_torch_round(
            benchmarking.build_setup(benchmarking.MODELS["tiny"], 2, "prefix", 8, 8, "float32", 0)
        )
