"""Variants of one config run and tabulated (`fedjax_llm.comparisons`), and every shipped
privacy and Byzantine config building and running a round."""

from __future__ import annotations

import glob
import os

import pytest
import yaml
from conftest import tiny_config

from fedjax_llm import Simulation
from fedjax_llm.comparisons import markdown_table, run_variants, variant_config
from fedjax_llm.config import config_to_dict, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_yaml(tmp_path) -> str:
    path = tmp_path / "base.yaml"
    data = config_to_dict(tiny_config(str(tmp_path / "unused")))
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_variants_run_with_their_overrides_and_directories(tmp_path):
    base = tiny_yaml(tmp_path)
    config = variant_config(base, ["client.lr=0.5"], str(tmp_path / "runs"), "lr 0.5")
    assert config.client.lr == 0.5
    assert config.run.output_dir == str(tmp_path / "runs" / "lr_0.5")
    rows = run_variants(
        base,
        {
            "plain": ["run.num_rounds=1", "eval.every=1", "eval.max_new_tokens=0"],
            "dp": [
                "run.num_rounds=1",
                "eval.every=1",
                "eval.max_new_tokens=0",
                "privacy.level=client",
                "privacy.noise_multiplier=1.0",
                "sampling.kind=poisson",
            ],
        },
        str(tmp_path / "runs"),
    )
    assert [r["name"] for r in rows] == ["plain", "dp"]
    assert rows[0]["rounds"] == rows[1]["rounds"] == 1
    assert "epsilon" not in rows[0] and rows[1]["epsilon"] > 0
    assert rows[1]["eval_loss"] > 0 and rows[1]["median_round_time_s"] > 0


def test_markdown_table():
    text = markdown_table([{"a": "x", "b": 0.123456, "c": None}], {"a": "A", "b": "B", "c": "C"})
    assert text.splitlines() == ["| A | B | C |", "|---|---|---|", "| x | 0.1235 | - |"]


SHIPPED = sorted(
    glob.glob(os.path.join(ROOT, "configs", "dp_*.yaml"))
    + glob.glob(os.path.join(ROOT, "configs", "byzantine_*.yaml"))
)


def shipped(path: str, tmp_path, *extra: str):
    return load_config(
        path,
        [
            "--run.num_rounds=1",
            "--eval.every=0",
            "--run.save_checkpoints=false",
            f"--run.output_dir={tmp_path / 'run'}",
            *extra,
        ],
    )


@pytest.mark.parametrize("path", SHIPPED, ids=os.path.basename)
def test_shipped_privacy_and_byzantine_configs_build(path, tmp_path):
    """Each config's data, model, sampler, privacy plan (solving its noise) and pipeline build;
    the round itself is what the other tests compile."""
    sim = Simulation(shipped(path, tmp_path), verbose=False)
    if sim.privacy_plan is not None:
        assert sim.privacy_plan.noise_multiplier > 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["dp_secure_aggregation.yaml", "byzantine_backdoor_norm_bounding.yaml"]
)
def test_shipped_configs_run_a_round(name, tmp_path):
    path = os.path.join(ROOT, "configs", name)
    config = shipped(
        path,
        tmp_path,
        "--model.num_layers=1",
        "--client.local_steps=1",
        "--data.num_clients=32",
        "--run.num_clients_per_round=8",
    )
    history = Simulation(config, verbose=False).run()
    assert history[-1]["round"] == 1
