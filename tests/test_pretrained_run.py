"""End to end: federated LoRA / prompt tuning of an HF-format model on a local data file."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import transformers
from hf_fixtures import write_tiny_tokenizer

from fedjax_llm.config import ConfigError
from fedjax_llm.data import load_tokenizer
from fedjax_llm.simulation import Simulation

CATEGORIES = ("open_qa", "brainstorming", "classification")
USERS = ("ann", "bob", "cid", "dee", "eve", "fay")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama in HF format with the tiny ChatML tokenizer (built with PyTorch)."""
    torch = pytest.importorskip("torch")
    directory = tmp_path_factory.mktemp("tiny_llama")
    write_tiny_tokenizer(directory)
    vocab = load_tokenizer(directory).vocab_size
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def dolly_file(tmp_path_factory):
    """Dolly-schema JSONL with a category and a user column."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "dolly.jsonl"
    with open(path, "w") as f:
        for i in range(120):
            category = CATEGORIES[i % 3]
            word = ["one", "two", "three", "four"][rng.integers(4)]
            record = {
                "instruction": f"say {word} for {category}",
                "context": "" if i % 2 else "the quick brown fox",
                "response": f"{word} {word}",
                "category": category,
                "user": USERS[i % len(USERS)],
            }
            f.write(json.dumps(record) + "\n")
    return str(path)


def _real_config(make_config, model_dir, dolly_file, **sections):
    data = {
        "source": "file",
        "path": dolly_file,
        "label_column": "category",
        "client_column": "user",
        "partitioner": "natural",
        "num_clients": None,
        "seq_len": 48,
        **sections.pop("data", {}),
    }
    return make_config(
        pretrained={"path": model_dir},
        data=data,
        trainable=sections.pop("trainable", {"mode": "lora", "lora_rank": 4}),
        client=sections.pop(
            "client", {"optimizer": "adamw", "lr": 0.01, "local_steps": 2, "batch_size": 2}
        ),
        eval={"every": 100, "max_new_tokens": 4, "batch_size": 16},
        **sections,
    )


@pytest.mark.parametrize("mode", ["lora", "soft_prompt", "prefix", "full"])
def test_federated_tuning_of_a_pretrained_model_on_a_file(make_config, model_dir, dolly_file, mode):
    trainable = {"mode": mode, "lora_rank": 4, "num_virtual_tokens": 4}
    config = _real_config(
        make_config, model_dir, dolly_file, trainable=trainable, run={"num_rounds": 4}
    )
    sim = Simulation(config, verbose=False)
    assert sim.model_config.vocab_size == sim.tokenizer.vocab_size
    assert sim.num_clients == len(USERS)  # one client per user
    history = sim.run()
    before, after = history[0], history[-1]
    assert after["eval/loss"] < before["eval/loss"]
    for name in CATEGORIES:
        assert np.isfinite(after[f"eval/perplexity/{name}"])
    for key in ("client/perplexity_mean", "client/perplexity_worst10", "eval/exact_match"):
        assert key in after
    assert os.path.getsize(os.path.join(config.run.output_dir, "partition.png")) > 1000
    stats = json.load(open(os.path.join(config.run.output_dir, "partition.json")))
    assert stats["num_clients"] == len(USERS)


def test_dirichlet_split_over_categories(make_config, model_dir, dolly_file):
    config = _real_config(
        make_config,
        model_dir,
        dolly_file,
        data={"partitioner": "dirichlet", "dirichlet_alpha": 0.3, "num_clients": 5},
        run={"num_rounds": 1},
    )
    sim = Simulation(config, verbose=False)
    assert sim.num_clients == 5
    assert sim.data.train.examples.label_names == tuple(sorted(CATEGORIES))


def test_pretraining_on_text_files_with_the_byte_model(make_config, tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    for i, topic in enumerate(["sea", "fire", "cats"]):
        lines = [f"the {topic} is here {j}." for j in range(40 + 10 * i)]
        (folder / f"{topic}.txt").write_text("\n".join(lines))
    config = make_config(
        data={
            "source": "file",
            "path": str(folder),
            "format": "text",
            "partitioner": "natural",
            "num_clients": None,
            "seq_len": 32,
            "sample_by": "line",
        },
        run={"num_rounds": 3, "num_clients_per_round": 3},
    )
    sim = Simulation(config, verbose=False)
    assert sim.num_clients == 3  # one client per file
    history = sim.run()
    assert history[-1]["eval/loss"] < history[0]["eval/loss"]
    assert "eval/exact_match" not in history[-1]  # plain text has no reference answers


def test_bad_real_inputs_fail_before_training(make_config, model_dir, dolly_file, tmp_path):
    with pytest.raises(ConfigError, match="fetch_model.py"):
        Simulation(_real_config(make_config, str(tmp_path / "none"), dolly_file), verbose=False)
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        Simulation(
            _real_config(make_config, model_dir, dolly_file, data={"seq_len": 256}),
            verbose=False,
        )
    with pytest.raises(ConfigError, match="speaker"):
        Simulation(
            _real_config(make_config, model_dir, dolly_file, data={"client_column": "speaker"}),
            verbose=False,
        )
    with pytest.raises(ConfigError, match="exceeds"):
        Simulation(
            _real_config(make_config, model_dir, dolly_file, run={"num_clients_per_round": 7}),
            verbose=False,
        )
    # A tokenizer from another model, larger than the weights' embedding: model.vocab_size
    # cannot help with pretrained.path, so the message must not suggest it.
    mixed = tmp_path / "mixed"
    shutil.copytree(model_dir, mixed)
    write_tiny_tokenizer(mixed, vocab_size=512)
    assert load_tokenizer(mixed).vocab_size > load_tokenizer(model_dir).vocab_size
    with pytest.raises(ConfigError, match="belong to another model") as err:
        Simulation(_real_config(make_config, str(mixed), dolly_file), verbose=False)
    assert "model.vocab_size" not in str(err.value)


def _generate_script():
    import importlib.util
    import sys

    path = os.path.join(os.path.dirname(__file__), "..", "scripts", "generate.py")
    spec = importlib.util.spec_from_file_location("generate_script", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_generate_script_answers_with_the_trained_adapter(
    make_config, model_dir, dolly_file, capsys
):
    import jax

    from fedjax_llm.models.generation import generate
    from fedjax_llm.simulation import load_trained

    config = _real_config(make_config, model_dir, dolly_file, run={"num_rounds": 2})
    sim = Simulation(config, verbose=False)
    sim.run()
    trained = load_trained(config.run.output_dir)
    assert trained.round == 2
    jax.tree.map(np.testing.assert_array_equal, trained.params, sim.params)

    script = _generate_script()
    prompt = "say two for open_qa"
    argv = ["--run", config.run.output_dir, "--prompt", prompt, "--max-new-tokens", "5"]
    assert script.main([*argv, "--compare"]) == 0
    printed = capsys.readouterr().out
    # The printed answer is what the trained adapter generates for the chat-formatted prompt.
    ids = sim.tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True
    )
    base, kwargs = sim.trainable.model_inputs(sim.frozen, sim.params)
    want = generate(
        sim.model_config,
        base,
        np.asarray([ids]),
        np.ones((1, len(ids)), bool),
        max_new_tokens=5,
        eos_id=sim.tokenizer.eos_id,
        pad_id=sim.tokenizer.pad_id,
        model_kwargs=kwargs,
    )
    assert f"(lora, round 2)] {sim.tokenizer.decode(np.asarray(want)[0].tolist())}\n" in printed
    assert "[base] " in printed

    assert (
        script.main(
            [
                "--model",
                model_dir,
                "--prompt",
                "hello",
                "--temperature",
                "1.0",
                "--top-p",
                "0.9",
                "--max-new-tokens",
                "3",
            ]
        )
        == 0
    )
    assert script.main(["--run", str(model_dir), "--prompt", "x"]) == 2
    assert "not a run directory" in capsys.readouterr().err


@pytest.fixture(scope="module")
def example_data(tmp_path_factory):
    import importlib.util
    import sys

    path = os.path.join(os.path.dirname(__file__), "..", "scripts", "make_example_data.py")
    spec = importlib.util.spec_from_file_location("make_example_data", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("example")
    assert module.main(["--out", str(out), "--users", "12", "--examples", "300"]) == 0
    return out


@pytest.mark.parametrize(
    "name", ["smollm2_lora_instruct", "smollm2_prompt_tuning", "pretrain_text", "diloco_pretrain"]
)
def test_shipped_real_data_configs_run(name, example_data, model_dir, tmp_path):
    from fedjax_llm.config import load_config

    root = os.path.join(os.path.dirname(__file__), "..")
    shrink = [
        "--run.num_rounds",
        "1",
        "--run.output_dir",
        str(tmp_path / "run"),
        "--run.num_clients_per_round",
        "4",
        "--eval.max_new_tokens",
        "2",
    ]
    if name in ("pretrain_text", "diloco_pretrain"):
        shrink += [
            "--data.path",
            str(example_data / "texts"),
            "--model.num_layers",
            "1",
            "--data.max_examples",
            "300",
        ]
    else:
        shrink += [
            "--data.path",
            str(example_data / "instructions.jsonl"),
            "--pretrained.path",
            model_dir,
            "--data.seq_len",
            "64",
        ]
    config = load_config(os.path.join(root, "configs", f"{name}.yaml"), shrink)
    history = Simulation(config, verbose=False).run()
    assert np.isfinite(history[-1]["train_loss"])
    labels = [k for k in history[-1] if k.startswith("eval/perplexity/")]
    assert len(labels) >= 5  # categories or source files


def test_dpo_config_on_a_pretrained_hf_model_and_its_chat_template(
    example_data, model_dir, tmp_path
):
    """configs/chain_instruct.yaml then configs/chain_dpo.yaml on a Hugging Face model (the tiny
    one, with its own ChatML template) instead of the chain's byte-level base: pairs rendered by
    the tokenizer's template, the reference is the instruction-tuned model with the new adapter
    off (loss log 2 before training)."""
    import math

    from fedjax_llm.config import load_config

    root = os.path.join(os.path.dirname(__file__), "..")
    # Stage 2 of the chain on the HF model, then DPO on its merged model: the configs' model
    # sections differ, which does not matter when the weights define the architecture.
    instruct = load_config(
        os.path.join(root, "configs", "chain_instruct.yaml"),
        [
            f"--pretrained.path={model_dir}",
            "--trainable.base_run=null",
            "--data.chat_template=null",
            "--model.hidden_size=64",
            f"--data.path={example_data / 'instructions.jsonl'}",
            "--data.seq_len=64",
            "--run.num_rounds=1",
            "--eval.every=0",
            "--run.num_clients_per_round=4",
            f"--run.output_dir={tmp_path / 'instruct'}",
        ],
    )
    Simulation(instruct, verbose=False).run()
    config = load_config(
        os.path.join(root, "configs", "chain_dpo.yaml"),
        [
            f"--pretrained.path={model_dir}",
            f"--trainable.base_run={tmp_path / 'instruct'}",
            "--data.chat_template=null",
            f"--data.path={example_data / 'preferences.jsonl'}",
            "--data.max_examples=200",
            "--data.seq_len=64",
            "--run.num_rounds=2",
            "--eval.every=2",
            "--run.num_clients_per_round=4",
            f"--run.output_dir={tmp_path / 'run'}",
        ],
    )
    history = Simulation(config, verbose=False).run()
    np.testing.assert_allclose(history[0]["eval/loss"], math.log(2), rtol=1e-5)
    assert np.isfinite(history[-1]["eval/loss"]) and history[-1]["eval/loss"] != math.log(2)
    assert 0.0 <= history[-1]["client/reward_accuracy_mean"] <= 1.0


RANK_TIERS = {"system": {"tier_fractions": (0.5, 0.5), "tier_lora_ranks": (2, 4)}}
FAMILIES = {
    "hetlora": {"algorithm": {"type": "hetlora"}, **RANK_TIERS},
    "flexlora": {"algorithm": {"type": "flexlora"}, **RANK_TIERS},
    "flora": {"algorithm": {"type": "flora"}, **RANK_TIERS},
    "ffa_lora_dp": {
        "algorithm": {"type": "ffa_lora"},
        "privacy": {"level": "client", "noise_multiplier": 0.1, "clip_norm": 1.0},
        "sampling": {"kind": "poisson"},
        **RANK_TIERS,
    },
    "fednova_deadline": {
        "algorithm": {"type": "fednova"},
        "client": {"optimizer": "sgd", "lr": 0.5, "local_steps": 4, "batch_size": 2},
        "system": {
            "tier_fractions": (0.5, 0.5),
            "tier_step_time_s": (0.5, 0.1),
            "deadline_s": 0.5,
        },
    },
    "fedsa_lora": {"algorithm": {"type": "fedsa_lora"}},
    "fedper": {"algorithm": {"type": "fedper", "personal_layers": 1}},
    "ditto": {"algorithm": {"type": "ditto", "lam": 0.1}},
    "personal_prompt": {
        "algorithm": {"type": "personal_prompt"},
        "trainable": {"mode": "lora", "lora_rank": 4, "lora_soft_prompt": 2},
    },
    "topk": {"aggregation": {"transforms": ("topk",), "compression_ratio": 0.1}},
    "qsgd": {"aggregation": {"transforms": ("qsgd",), "quantization_bits": 4}},
    "contribution": {"contribution": {"enabled": True, "shapley_permutations": 2}},
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_method_family_runs_on_a_pretrained_hf_model(
    make_config, model_dir, dolly_file, family
):
    """Heterogeneous ranks, system heterogeneity, personalization, compression and client
    scores on an HF checkpoint (its own tokenizer, chat template and tied embeddings)."""
    sections = {name: dict(fields) for name, fields in FAMILIES[family].items()}
    run = {"num_rounds": 3, "num_clients_per_round": 4}
    config = _real_config(make_config, model_dir, dolly_file, run=run, **sections)
    history = Simulation(config, verbose=False).run()
    rounds = [h for h in history if "train_loss" in h]
    assert all(np.isfinite(h["train_loss"]) for h in rounds)
    assert rounds[-1]["train_loss"] < rounds[0]["train_loss"]
    out = config.run.output_dir
    if "tier_lora_ranks" in sections.get("system", {}):
        assert all(np.isfinite(h["pipeline/lora/aggregation_error"]) for h in rounds)
    if family == "ffa_lora_dp":
        assert history[-1]["privacy/epsilon"] > 0
    if family == "fednova_deadline":
        assert rounds[-1]["pipeline/fednova/tau_eff"] > 0
    if family in ("fedsa_lora", "fedper", "ditto", "personal_prompt"):
        # Each client evaluated with its own params beside the global model.
        assert np.isfinite(history[-1]["client/personal/loss_mean"])
    if family in ("topk", "qsgd"):
        dense = 4 * sum(x.size for x in jax.tree.leaves(Simulation(config, verbose=False).params))
        assert rounds[-1]["bytes_up"] < 0.5 * dense * rounds[-1]["participants"]
    if family == "contribution":
        assert os.path.getsize(os.path.join(out, "contributions.json")) > 0
