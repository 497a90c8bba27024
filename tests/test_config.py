"""Config loading: YAML plus dotted overrides, and clear errors for every bad input."""

from __future__ import annotations

import collections
import dataclasses
import glob
import math
import os
import re

import pytest

from fedjax_llm.algorithms import build_algorithm
from fedjax_llm.config import (
    FIELD_RANGES,
    AlgorithmConfig,
    ConfigError,
    ExperimentConfig,
    between,
    config_from_dict,
    config_to_dict,
    declare_ranges,
    dump_config,
    field_range,
    field_types,
    load_config,
    register_algorithm_config,
)
from fedjax_llm.config_help import attribute_docs, config_help

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
        (["--aggregation.aggregator", "bulyan"], "krum.*mean.*median"),
        (["--aggregation.transforms", "[clip,zip]"], "zip"),
        (["--client.objective", "kto"], "next_token"),
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


# --------------------------------------------------------------------- ranges of every field
def _numeric_fields():
    """(algorithm type, dotted key, section class, field name, FieldType) of every numeric
    field of the default config, and of the own settings of every built-in algorithm type."""
    out = []
    default = ExperimentConfig()
    for section_name in field_types(ExperimentConfig):
        classes = [(None, type(getattr(default, section_name)))]
        if section_name == "algorithm":
            classes = [
                (name, cls)
                for name, cls in AlgorithmConfig.get_known_choices().items()
                if cls.__module__ == "fedjax_llm.config"
            ]
        for kind, cls in classes:
            for name, field in field_types(cls).items():
                key = f"{section_name}.{name}"
                if field.is_number:
                    out.append(pytest.param(kind, key, cls, name, field, id=key))
    return out


def _out_of_range(valid, field):
    """Values outside a Range (NaN and +-inf for floats), as the field's type."""
    bad = [math.nan, math.inf, -math.inf] if field.base is float else []
    step = 1 if field.base is int else 0.5
    if valid.low is not None:
        bad.append(valid.low if valid.low_open else valid.low - step)
    if valid.high is not None:
        bad.append(valid.high if valid.high_open else valid.high + step)
    return [field.base(v) if math.isfinite(v) else v for v in bad]


@pytest.mark.parametrize("kind,key,cls,name,field", _numeric_fields())
def test_every_numeric_field_rejects_values_out_of_its_range(kind, key, cls, name, field):
    valid = field_range(cls, name)
    assert valid is not None, (
        f"{key} has no range: add it to fedjax_llm.config.FIELD_RANGES (Range() if unbounded)."
    )
    bad_values = _out_of_range(valid, field)
    assert bad_values, f"{key} is an unbounded int: nothing to check; is that right?"
    section_name = key.split(".")[0]
    base = ExperimentConfig()
    section = cls() if kind is not None else getattr(base, section_name)
    default = getattr(section, name)
    assert default is None or default in valid, f"the default {key}={default} is out of range"
    for bad in bad_values:
        config = dataclasses.replace(
            base, **{section_name: dataclasses.replace(section, **{name: bad})}
        )
        with pytest.raises(ConfigError, match=re.escape(f"{key}={bad}")):
            config.validate()
    # The same through load_config and the command line, for the first bad value.
    overrides = ["--algorithm.type", kind] if kind is not None else []
    with pytest.raises(ConfigError, match=re.escape(f"{key}=")):
        load_config(None, [*overrides, f"--{key}", str(bad_values[-1])])


def test_range_messages_name_the_range_and_what_special_values_mean():
    with pytest.raises(ConfigError, match=r"eval\.max_new_tokens=-3 must be >= 0 \(0 skips"):
        load_config(None, ["--eval.max_new_tokens", "-3"])
    with pytest.raises(ConfigError, match=r"client\.momentum=1\.0 must be in \[0, 1\)"):
        load_config(None, ["--client.momentum", "1"])
    with pytest.raises(ConfigError, match=r"run\.seed=4294967296 must be in \[0, 4294967295\]"):
        load_config(None, ["--run.seed", str(2**32)])  # jax.random.key(2**32) == key(0)
    with pytest.raises(ConfigError, match=r"client\.lr=nan is not a finite number"):
        load_config(None, ["--client.lr", "nan"])
    chunk_error = r"run\.clients_per_chunk=.*it must be auto, a positive integer or null"
    with pytest.raises(ConfigError, match=chunk_error):
        load_config(None, ["--run.clients_per_chunk", "0"])
    with pytest.raises(ConfigError, match=r"(?s)run\.clients_per_chunk: .*'fast'.* auto"):
        load_config(None, ["--run.clients_per_chunk", "fast"])
    assert load_config(None, ["--run.clients_per_chunk", "8"]).run.clients_per_chunk == 8
    assert load_config(None, []).run.clients_per_chunk == "auto"


@pytest.mark.parametrize(
    "section,fields,message",
    [
        ("run", {"num_rounds": None}, r"run\.num_rounds=null is not allowed.*positive integer"),
        ("run", {"num_rounds": 2.5}, r"run\.num_rounds=2\.5 is a float; it must be .*integer"),
        ("run", {"resume": "yes"}, r"run\.resume='yes' is a str; it must be true or false"),
        ("run", {"output_dir": 5}, r"run\.output_dir=5 is a int; it must be a string"),
        ("trainable", {"mode": "adapter"}, r"trainable\.mode='adapter'; valid choices: full"),
        ("trainable", {"lora_targets": ("q", 1)}, r"trainable\.lora_targets"),
    ],
)
def test_validate_checks_types_of_configs_built_in_code(section, fields, message):
    base = ExperimentConfig()
    config = dataclasses.replace(
        base, **{section: dataclasses.replace(getattr(base, section), **fields)}
    )
    with pytest.raises(ConfigError, match=message):
        config.validate()


def test_custom_algorithm_config_fields_are_checked_and_documented():
    @dataclasses.dataclass(frozen=True)
    class TestDecayConfig(AlgorithmConfig):
        """Test algorithm.

        Attributes:
          decay: per-round decay of the test algorithm.
          temperature: an undeclared range: only finiteness is checked.
        """

        decay: float = 0.5
        temperature: float = 1.0

    name = "test_config_decay"
    register_algorithm_config(name, TestDecayConfig)
    try:
        declare_ranges(TestDecayConfig, decay=between(0, 1, high_open=True))
        select = ["--algorithm.type", name]
        assert load_config(None, [*select, "--algorithm.decay", "0.9"]).algorithm.decay == 0.9
        with pytest.raises(ConfigError, match=r"algorithm\.decay=1\.0 must be in \[0, 1\)"):
            load_config(None, [*select, "--algorithm.decay", "1"])
        with pytest.raises(ConfigError, match=r"algorithm\.temperature=inf is not a finite"):
            load_config(None, [*select, "--algorithm.temperature", "inf"])
        with pytest.raises(ConfigError, match="Did you mean algorithm.decay"):
            load_config(None, [*select, "--algorithm.decy", "0.1"])
        text = " ".join(config_help(width=80).split())
        assert f"algorithm.type {name}: Test algorithm." in text
        assert "--algorithm.decay (float, default 0.5, in [0, 1)) per-round decay" in text
        with pytest.raises(TypeError, match="no fields"):
            declare_ranges(TestDecayConfig, dcay=between(0, 1))
    finally:
        AlgorithmConfig.get_known_choices().pop(name)
        FIELD_RANGES.pop(TestDecayConfig, None)


# ------------------------------------------------------------------------------ YAML files
@pytest.mark.parametrize("text", ["", "\n", "# nothing set yet\n", "---\n", "client:\n"])
def test_empty_file_or_section_means_the_defaults(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    assert load_config(str(path)) == load_config(None)
    assert load_config(str(path), ["--client.lr", "0.5"]).client.lr == 0.5


@pytest.mark.parametrize(
    "text,message",
    [
        ("- client\n- run\n", r"top level .* mapping of sections.*found a list"),
        ("just words\n", r"top level .* mapping of sections.*found a str"),
        ("client:\n  lr: 0.1\n lr: 2\n", r":3:2: invalid YAML"),
        ("run:\n  num_rounds: [1,\n", r":3:1: invalid YAML: expected the node content"),
        ("client:\n\tlr: 0.1\n", r":2:1: invalid YAML: found character '\\t'"),
        ("client: {lr: 0.1}\nclient: {lr: 0.2}\n", r":2:1: client is set twice \(also on line 1\)"),
        ("client: 3\n", r":1:1: client is a section: give its keys"),
        (
            "client:\n  lr: 0.1\n  learning_rate: 0.2\n",
            r":3:3: unknown key client\.learning_rate\. Valid keys of client: optimizer, lr,",
        ),
        ("clientt:\n  lr: 0.1\n", r":1:1: unknown key clientt\. Did you mean client\?"),
        (
            "algorithm:\n  type: fedprox\n  muu: 1\n",
            r":3:3: unknown key algorithm\.muu\. Did you mean algorithm\.mu\? .*type fedprox",
        ),
        ("algorithm:\n  type: fedsgd\n", r":2:3: algorithm\.type='fedsgd'; valid choices: fedavg"),
        ("run: {num_rounds: abc}\n", r":1:7: run\.num_rounds: Couldn't parse 'abc' into an int"),
        ("run:\n  num_rounds: true\n", r":2:3: run\.num_rounds=true; it must be a positive int"),
        ("run:\n  num_rounds: null\n", r":2:3: run\.num_rounds=null is not allowed"),
        ("data:\n  task_families: add\n", r":2:3: data\.task_families='add' must be a list"),
        ("trainable:\n  mode: adapter\n", r":2:3: trainable\.mode='adapter'; valid choices"),
        ("eval:\n  max_new_tokens: -3\n", r":2:3: eval\.max_new_tokens=-3 must be >= 0"),
    ],
)
def test_yaml_problems_name_the_file_line_and_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(str(path)) + ".*" + message):
        load_config(str(path))


def test_number_for_a_text_key_is_that_text(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  output_dir: 0100\n")  # YAML 1.1 reads 0100 as octal 64
    assert load_config(str(path)).run.output_dir == "0100"
    assert load_config(None, ["--run.output_dir", "0100"]).run.output_dir == "0100"


def test_file_that_is_not_utf8_or_a_directory_is_named(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("run:\n  output_dir: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=re.escape(f"{path}:2:18: not UTF-8 text")):
        load_config(str(path))
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path} is a directory")):
        load_config(str(tmp_path))


def test_shipped_config_dumped_and_reloaded_is_equal(tmp_path):
    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))):
        config = load_config(path)
        out = tmp_path / os.path.basename(path)
        out.write_text(dump_config(config))
        assert load_config(str(out)) == config, path


# --------------------------------------------------------------------- command-line overrides
@pytest.mark.parametrize(
    "overrides,message",
    [
        (["--data.task_families", "add", "sort"], r"unexpected 'sort' after .*write a list"),
        (["--client.lr"], r"--client\.lr needs a value"),
        (["--client.lr", "--run.num_rounds", "3"], r"--client\.lr needs a value"),
        (["client.lr", "0.1"], r"unexpected 'client\.lr'"),
        (
            ["--data.task_families", "add"],
            r"data\.task_families='add' must be a list, e\.g\. \[add\]",
        ),
        (["--client.lr", "abc"], r"command line: client\.lr: Couldn't parse 'abc'"),
        (["--client.optimizr", "sgd"], r"Did you mean client\.optimizer\?"),
    ],
)
def test_bad_overrides_are_explained(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_override_forms():
    config = load_config(None, ["--client.lr=0.5", "--data.task_families", "[add,sort]"])
    assert config.client.lr == 0.5 and config.data.task_families == ("add", "sort")
    assert load_config(None, ["--server.optimizer", "null"]).server.optimizer is None


# -------------------------------------------------------------------------------------- help
def _leaf_keys(config, prefix=""):
    keys = []
    for name, field in field_types(type(config)).items():
        if field.is_section:
            keys += _leaf_keys(getattr(config, name), f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def test_help_lists_every_key_once():
    text = config_help()
    entries = collections.Counter(re.findall(r"^ +--([\w.]+)  \(", text, re.M))
    # Every algorithm type's own keys (FedProx's mu, HetLoRA's pruning, ...), each listed once.
    own = {
        f"algorithm.{name}"
        for cls in AlgorithmConfig.get_known_choices().values()
        for name in field_types(cls)
        if name not in field_types(AlgorithmConfig)
    }
    keys = [*_leaf_keys(ExperimentConfig()), "algorithm.type", *sorted(own)]
    assert len(keys) > 80
    for key in keys:
        assert entries[key] == 1, f"--{key} is listed {entries[key]} times"
    assert set(entries) == set(keys)
    assert "--run.seed  (int, default 0, in [0, 4294967295])" in text
    for name in AlgorithmConfig.get_known_choices():
        assert f"  algorithm.type {name}" in text


def test_help_has_every_description_and_no_reprs():
    text = config_help(width=80)
    assert all(len(line) <= 80 or " " not in line.strip() for line in text.splitlines())
    for bad in ("<function", "<class", "def ", "dataclass", "Attributes:", "Optional["):
        assert bad not in text
    flat = " ".join(text.split())
    classes = [type(getattr(ExperimentConfig(), name)) for name in field_types(ExperimentConfig)]
    classes += list(AlgorithmConfig.get_known_choices().values())
    for cls in classes:
        if not cls.__module__.startswith("fedjax_llm"):
            continue
        docs = attribute_docs(cls)
        for name in field_types(cls):
            assert docs.get(name), f"{cls.__name__}.{name} has no Attributes: description"
            plain = " ".join(re.sub(r"`{1,2}([^`]+)`{1,2}", r"\1", docs[name]).split())
            assert plain in flat, f"{cls.__name__}.{name}"
