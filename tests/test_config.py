"""Config loading: YAML plus dotted overrides, and clear errors for every bad input."""

from __future__ import annotations

import glob
import os

import pytest

from fedjax_llm.algorithms import build_algorithm
from fedjax_llm.config import ConfigError, config_from_dict, config_to_dict, load_config

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))))
def test_every_shipped_config_loads(path):
    config = load_config(path)
    build_algorithm(config)
    assert config_from_dict(config_to_dict(config)) == config


def test_overrides_apply_to_nested_keys():
    config = load_config(
        None,
        [
            "--client.lr",
            "3e-4",
            "--trainable.mode",
            "lora",
            "--trainable.lora_targets",
            "[q,k,v]",
            "--run.num_rounds",
            "7",
        ],
    )
    assert config.client.lr == 3e-4
    assert config.trainable.lora_targets == ("q", "k", "v")
    assert config.run.num_rounds == 7


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["--client.optimizr", "sgd"], "client.optimizr"),
        (["--trainable.mode", "adapter"], "full.*lora.*soft_prompt.*prefix"),
        (["--algorithm.type", "fedsgd"], "fedavg.*scaffold"),
        (["--algorithm.mu", "0.1"], "algorithm.type"),
        (["--algorithm.type", "fedprox", "--algorithm.mu", "-1"], "algorithm.mu"),
        (["--algorithm.type", "scaffold", "--client.optimizer", "adamw"], "plain SGD"),
        (["--aggregation.aggregator", "krum"], "mean.*median"),
        (["--aggregation.transforms", "[clip,zip]"], "zip"),
        (["--client.objective", "dpo"], "next_token"),
        (["--client.lr", "0"], "client.lr=0.0 must be positive"),
        (["--client.lr", "-1"], "client.lr"),
        (["--trainable.mode", "lora", "--trainable.lora_rank", "0"], "trainable.lora_rank"),
        (["--trainable.mode", "lora", "--trainable.lora_targets", "[q,qq]"], "lora_targets"),
        (
            ["--run.num_clients_per_round", "100", "--data.num_clients", "10"],
            "num_clients_per_round=100 exceeds data.num_clients=10",
        ),
        (["--run.clients_per_chunk", "0"], "clients_per_chunk"),
        (["--data.task_families", "[add,poetry]"], "poetry"),
        (["--model.hidden_size", "30"], "model"),
        (["--data.partitioner", "zipf"], "iid.*dirichlet"),
        (["--algorithm.type", "fedadam", "--server.optimizer", "sgd"], "server.optimizer"),
    ],
)
def test_bad_values_name_the_key_and_choices(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config = load_config(None, overrides)
        build_algorithm(config)


def test_unknown_yaml_key_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("client:\n  lr: 0.1\n  learning_rate: 0.2\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        load_config(str(path))


def test_missing_file_is_reported():
    with pytest.raises(FileNotFoundError):
        load_config("/nonexistent/config.yaml")
