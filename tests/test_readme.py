"""The README's custom-algorithm example runs as written."""

from __future__ import annotations

import os
import re

import jax
import numpy as np
import optax

import fedjax_llm
from fedjax_llm.algorithms import ALGORITHMS
from fedjax_llm.round import make_client_update

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))


def _python_blocks():
    text = open(os.path.join(ROOT, "README.md")).read()
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_custom_algorithm_example_runs(tmp_path, monkeypatch):
    block = next(b for b in _python_blocks() if "make_clipped_fedavg" in b)
    monkeypatch.chdir(ROOT)
    # Keep the example's own code; only shrink the run and send output to a temp directory.
    block, count = re.subn(
        r'"--run.num_rounds",\s*"3"',
        '"--run.num_rounds", "1", '
        '"--data.num_clients", "16", "--run.num_clients_per_round", "4", '
        '"--eval.per_client", "false"',
        block,
    )
    assert count == 1, "the README example no longer sets --run.num_rounds 3"
    block = block.replace('"runs/clipped"', repr(str(tmp_path / "clipped")))
    namespace = {}
    try:
        exec(compile(block, "README.md", "exec"), namespace)
        _check_example(namespace)
    finally:
        ALGORITHMS.pop("clipped_fedavg", None)


def _check_example(namespace):
    history = namespace["history"]
    assert history[-1]["round"] == 1 and np.isfinite(history[-1]["train_loss"])

    # The clipping really bounds every client's upload.
    algorithm = namespace["algorithm"]
    config = namespace["config"]
    sim = fedjax_llm.Simulation(config, algorithm=algorithm, verbose=False)
    update = jax.jit(make_client_update(algorithm, sim.objective, sim.schedule))
    hparams = fedjax_llm.round.round_hparams(1.0)  # a large step so clipping must act
    out = update(
        sim.frozen,
        algorithm.broadcast(sim.server_state),
        sim.state.pipeline.transform,
        jax.tree.map(lambda s: s[0], sim.client_store),
        sim.client_data,
        np.int32(0),
        True,
        True,
        jax.random.key(0),
        hparams,
    ).upload
    assert 0.0 < float(optax.tree.norm(out.delta)) <= 0.5 + 1e-5


def _simulate_commands():
    """Every `python scripts/simulate.py ...` command of the README's bash blocks."""
    import shlex

    text = open(os.path.join(ROOT, "README.md")).read()
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#")[0].split("&&")[-1].strip()
            if line.startswith("python scripts/simulate.py") and "--help" not in line:
                yield shlex.split(line)[2:]


def test_readme_simulate_commands_parse():
    commands = list(_simulate_commands())
    assert len(commands) >= 5
    for args in commands:
        config_path = os.path.join(ROOT, "configs", "default.yaml")
        if "--config" in args:
            i = args.index("--config")
            config_path = os.path.join(ROOT, args[i + 1])
            args = args[:i] + args[i + 2 :]
        fedjax_llm.load_config(config_path, args)  # raises on an unknown key or bad value


def test_upload_transform_example_runs(tmp_path, monkeypatch):
    from fedjax_llm.pipeline import TRANSFORMS

    block = next(b for b in _python_blocks() if "make_quantizer" in b)
    monkeypatch.chdir(ROOT)
    block, count = re.subn(
        r'"--run.num_rounds", "3"',
        '"--run.num_rounds", "1", "--data.num_clients", "16", "--run.num_clients_per_round", '
        '"4", "--eval.per_client", "false"',
        block,
    )
    assert count == 1, "the README example no longer sets --run.num_rounds 3"
    block = block.replace('"runs/quantized"', repr(str(tmp_path / "quantized")))
    namespace = {}
    try:
        exec(compile(block, "README.md", "exec"), namespace)
    finally:
        TRANSFORMS.pop("quantize16", None)
    assert np.isfinite(namespace["history"][-1]["train_loss"])
    # The transform quantizes to 16 levels and is unbiased (mean over many keys).
    quantizer = namespace["make_quantizer"](16)
    x = {"w": jax.numpy.linspace(-1.0, 2.0, 101) ** 3}

    def one(key):
        return quantizer.apply(x, (), (), key, None)[0]["w"]

    draws = jax.vmap(one)(jax.random.split(jax.random.key(0), 4000))
    assert len(np.unique(np.asarray(draws[0]))) <= 16
    # 4000 draws: the standard error of the mean is at most step / (2 sqrt(4000)) ~ 0.004.
    np.testing.assert_allclose(np.asarray(draws.mean(0)), np.asarray(x["w"]), atol=0.03)
