"""The pre-train -> instruct -> align chain of the shipped configs, end to end on the example
data: each stage's final model is the next one's frozen base (`trainable.base_run`), and the
last stage is federated DPO with per-client held-out preference metrics."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_llm import ConfigError, Simulation, load_config

ROOT = os.path.join(os.path.dirname(__file__), "..")
# A smaller model than the configs' (every stage must use the same one).
TINY_MODEL = [
    "--model.hidden_size=32",
    "--model.intermediate_size=64",
    "--model.num_layers=1",
    "--model.num_heads=4",
    "--model.num_kv_heads=2",
]


@pytest.fixture(scope="module")
def example_data(tmp_path_factory):
    path = os.path.join(ROOT, "scripts", "make_example_data.py")
    spec = importlib.util.spec_from_file_location("make_example_data_chain", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("example")
    args = ["--out", str(out), "--users", "8", "--examples", "200", "--pairs", "300"]
    assert module.main(args) == 0
    return out


@pytest.fixture(scope="module")
def pretrained_run(example_data, tmp_path_factory):
    """A one-round run of the first stage (the tiny model)."""
    run_dir = tmp_path_factory.mktemp("pretrain") / "run"
    _stage("pretrain_text", example_data / "texts", run_dir, "--run.num_rounds=1").run()
    return run_dir


def _stage(name, data_path, run_dir, *overrides):
    config = load_config(
        os.path.join(ROOT, "configs", f"{name}.yaml"),
        [
            *TINY_MODEL,
            f"--data.path={data_path}",
            f"--run.output_dir={run_dir}",
            "--run.num_clients_per_round=4",
            "--eval.max_new_tokens=2",
            *overrides,
        ],
    ).validate()
    return Simulation(config, verbose=False)


@pytest.mark.slow
def test_pretrain_then_instruct_then_dpo(example_data, tmp_path):
    pretrain = _stage(
        "pretrain_text", example_data / "texts", tmp_path / "pretrain", "--run.num_rounds=2"
    )
    pretrain.run()
    instruct = _stage(
        "chain_instruct",
        example_data / "instructions.jsonl",
        tmp_path / "instruct",
        "--run.num_rounds=2",
        "--eval.every=2",
        f"--trainable.base_run={tmp_path / 'pretrain'}",
    )
    instruct.run()
    dpo = _stage(
        "chain_dpo",
        example_data / "preferences.jsonl",
        tmp_path / "dpo",
        "--run.num_rounds=3",
        "--eval.every=3",
        "--client.lr=0.01",
        f"--trainable.base_run={tmp_path / 'instruct'}",
    )
    # The DPO base is the instruction-tuned model: the pre-trained one with its adapter merged.
    tokens = jnp.asarray(dpo.data.eval["chosen"][:4])
    np.testing.assert_allclose(
        dpo.trainable.apply(dpo.frozen, None, tokens, adapter=False),
        instruct.trainable.apply(instruct.frozen, instruct.params, tokens),
        rtol=1e-4,
        atol=1e-4,
    )
    history = dpo.run()
    first, last = history[0], history[-1]
    # At round 0 the policy is the reference: loss log 2, no reward either way.
    np.testing.assert_allclose(first["eval/loss"], math.log(2), rtol=1e-5)
    assert first["eval/reward_accuracy"] == 0.0 and first["client/reward_margin_mean"] == 0.0
    assert last["eval/loss"] < math.log(2)
    assert last["eval/reward_margin"] > 0
    assert last["eval/reward_accuracy"] > 0.5
    assert "train/reward_accuracy" in last
    rows = [json.loads(line) for line in open(tmp_path / "dpo" / "eval_clients.jsonl")]
    final = [r for r in rows if r["round"] == 3]
    assert len(final) == dpo.data.num_clients
    assert all(r["name"].startswith("user") for r in final)
    assert {"loss", "reward_accuracy", "reward_margin"} <= set(final[0])


def test_a_chain_stage_on_another_model_is_refused(example_data, pretrained_run, tmp_path):
    config = load_config(
        os.path.join(ROOT, "configs", "chain_instruct.yaml"),
        [
            f"--data.path={example_data / 'instructions.jsonl'}",
            f"--trainable.base_run={pretrained_run}",
            f"--run.output_dir={tmp_path / 'instruct'}",
        ],
    ).validate()
    with pytest.raises(ConfigError, match="used another model: .*model.hidden_size"):
        Simulation(config, verbose=False)


def test_a_stage_on_another_tokenizer_is_refused(
    example_data, pretrained_run, smollm2_dir, tmp_path
):
    """The DPO policy and its reference share the base, so they cannot disagree; a base run
    on another tokenizer than this stage's is refused, naming both."""
    config = load_config(
        os.path.join(ROOT, "configs", "chain_dpo.yaml"),
        [
            f"--data.path={example_data / 'preferences.jsonl'}",
            f"--pretrained.path={smollm2_dir}",
            f"--trainable.base_run={pretrained_run}",
            f"--run.output_dir={tmp_path / 'dpo'}",
        ],
    ).validate()
    with pytest.raises(ConfigError, match="started from pretrained.path=None, not .*tokenizer"):
        Simulation(config, verbose=False)
