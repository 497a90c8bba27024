"""Server steps on public data: closed form against an optax loop, bit-identity when off, the
public perplexity of a run, resume, bad input, LoRA, and the shipped config end to end."""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_llm.algorithms import make_fedavg
from fedjax_llm.config import ConfigError, load_config
from fedjax_llm.models.llama import LlamaConfig, init_params
from fedjax_llm.models.trainable import make_trainable
from fedjax_llm.objectives import next_token_loss
from fedjax_llm.public_training import (
    PUBLIC_STREAM,
    PublicTrainingState,
    public_batch_indices,
    with_public_steps,
)
from fedjax_llm.round import (
    ClientData,
    LocalSchedule,
    init_round_state,
    make_round_fn,
    round_hparams,
    round_keys,
)
from fedjax_llm.sampling import Cohort
from fedjax_llm.simulation import Simulation

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)
WORDS = (
    "the server holds public text about rivers mountains and weather while every client "
    "writes about its own topic and the model learns both from many small steps"
).split()
QUIET = {"save_checkpoints": False, "partition_report": False}


def write_public_text(folder, files=3, paragraphs=12, seed=0):
    """Paragraphs of seeded sentences over a small vocabulary (learnable by a byte model)."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for f in range(files):
        text = "\n\n".join(
            " ".join(rng.choice(WORDS, size=int(rng.integers(8, 20)))) + "."
            for _ in range(paragraphs)
        )
        with open(os.path.join(folder, f"topic{f}.txt"), "w") as out:
            out.write(text + "\n")
    return str(folder)


@pytest.fixture
def public_dir(tmp_path):
    return write_public_text(tmp_path / "public")


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _assert_equal(a, b):
    for x, y in zip(_leaves(a), _leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


# ------------------------------------------------------------------------------ the mechanism
def _tiny_model():
    return LlamaConfig(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=64,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        max_seq_len=16,
    )


def _client_data(rng, num_clients=4, per_client=4, seq_len=8):
    tokens = rng.integers(1, 32, (num_clients * per_client, seq_len)).astype(np.int32)
    return ClientData(
        {"tokens": jnp.asarray(tokens), "loss_mask": jnp.ones(tokens.shape, jnp.float32)},
        jnp.arange(0, num_clients * per_client, per_client, dtype=jnp.int32),
        jnp.full(num_clients, per_client, jnp.int32),
    )


def _public_examples(rng, n=10, seq_len=8):
    tokens = rng.integers(1, 32, (n, seq_len)).astype(np.int32)
    mask = np.ones(tokens.shape, np.float32)
    mask[:, -2:] = 0.0  # padded tails count nothing
    return {"tokens": jnp.asarray(tokens), "loss_mask": jnp.asarray(mask)}


def _setup(mode, seed=0):
    config = _tiny_model()
    trainable = make_trainable(config, mode, lora_rank=4)
    base = init_params(config, jax.random.key(seed))
    params = trainable.init(jax.random.key(seed + 1), base)
    if mode == "lora":
        # A nonzero B factor, so every LoRA factor has a gradient from the first step.
        params = jax.tree.map(lambda x: x + 0.01, params)
    objective = next_token_loss(trainable.apply, pad_id=0)
    return trainable, trainable.frozen(base), params, objective


def _clients(num_clients=4):
    ids = jnp.arange(num_clients, dtype=jnp.int32)
    return Cohort(ids, jnp.ones(num_clients, bool), jnp.ones(num_clients, bool))


PUBLIC_LR, MOMENTUM, STEPS, BATCH = 0.1, 0.9, 3, 4


def _public_optimizer():
    # Heavy-ball momentum: its state carries across rounds, and its update is linear in the
    # gradients, so the compiled round and the loop agree to float32 rounding.
    return optax.inject_hyperparams(optax.sgd)(learning_rate=PUBLIC_LR, momentum=MOMENTUM)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_server_steps_with_zero_client_lr_equal_an_optax_loop_on_the_public_batches(mode):
    """With the clients' learning rate 0 their uploads are exactly 0, so FedAvg (server SGD at
    lr 1) leaves the model as it was and the round's change is the public steps alone:
    momentum SGD on the public batches the round's key draws, continued across rounds with one
    optimizer state. In LoRA mode the steps run on the frozen base given to the round."""
    rng = np.random.default_rng(0)
    trainable, frozen, params, objective = _setup(mode)
    client_opt = optax.inject_hyperparams(optax.adamw)(learning_rate=0.1)
    inner = make_fedavg(client_opt, optax.inject_hyperparams(optax.sgd)(learning_rate=1.0))
    algorithm = with_public_steps(
        inner, objective, _public_optimizer(), server_steps=STEPS, batch_size=BATCH
    )
    data, public = _client_data(rng), _public_examples(rng)
    schedule = LocalSchedule(local_steps=2, batch_size=2)
    round_fn = jax.jit(
        make_round_fn(algorithm, objective, schedule, num_clients_total=4, clients_per_chunk=2)
    )
    state = init_round_state(algorithm, params, 4)
    assert isinstance(state.server, PublicTrainingState)
    frozen_before = jax.tree.map(np.array, frozen)
    hparams = round_hparams(0.0)

    # The hand-written loop: plain optax momentum SGD on the same batches.
    optimizer = optax.sgd(PUBLIC_LR, momentum=MOMENTUM)
    expected, opt_state = params, optimizer.init(params)

    def loss(p, batch):
        return objective.loss(frozen, p, batch, None)[0]

    for r in range(2):
        round_key = jax.random.fold_in(jax.random.key(7), r)
        state, out = round_fn(frozen, state, data, _clients(), round_key, hparams, public)
        assert np.isfinite(float(out.train_loss))
        key = jax.random.fold_in(round_keys(round_key)[2], PUBLIC_STREAM)
        batch_key, _ = jax.random.split(key)
        rows = np.asarray(public_batch_indices(batch_key, 10, STEPS, BATCH))
        for step_rows in rows:
            batch = {name: x[step_rows] for name, x in public.items()}
            batch["example_weight"] = jnp.ones(BATCH, jnp.float32)
            grads = jax.grad(loss)(expected, batch)
            updates, opt_state = optimizer.update(grads, opt_state, expected)
            expected = optax.apply_updates(expected, updates)
    got = algorithm.server_params(state.server)
    chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not all(np.array_equal(a, b) for a, b in zip(_leaves(got), _leaves(params), strict=True))
    # The frozen base is a round input: the steps read it and never change it.
    _assert_equal(frozen, frozen_before)
    if mode == "lora":
        assert set(got) == set(params)  # the LoRA factors, nothing of the base


def test_public_batches_read_every_row_before_repeating_one():
    rows = np.asarray(public_batch_indices(jax.random.key(3), 10, 5, 4)).reshape(-1)
    assert sorted(rows[:10]) == list(range(10))
    assert sorted(rows[10:20]) == list(range(10))


def test_zero_server_steps_round_is_bit_identical_to_the_plain_round():
    rng = np.random.default_rng(1)
    _, frozen, params, objective = _setup("full")
    plain = make_fedavg(
        optax.inject_hyperparams(optax.adamw)(learning_rate=0.05),
        optax.inject_hyperparams(optax.sgd)(learning_rate=1.0),
    )
    wrapped = with_public_steps(
        plain, objective, _public_optimizer(), server_steps=0, batch_size=BATCH
    )
    data, public = _client_data(rng), _public_examples(rng)
    schedule = LocalSchedule(local_steps=2, batch_size=2)
    results = []
    for algorithm, extra in ((plain, ()), (wrapped, (public,))):
        round_fn = jax.jit(
            make_round_fn(algorithm, objective, schedule, num_clients_total=4, clients_per_chunk=2)
        )
        state = init_round_state(algorithm, params, 4)
        for r in range(2):
            key = jax.random.fold_in(jax.random.key(0), r)
            state, out = round_fn(frozen, state, data, _clients(), key, round_hparams(0.05), *extra)
        results.append((algorithm.server_params(state.server), out.train_loss))
    _assert_equal(results[0], results[1])


# -------------------------------------------------------------------------- runs from configs
EVAL = {"every": 1, "max_new_tokens": 0, "batch_size": 32}


def _public_config(make_config, public_dir, **sections):
    public = {"path": public_dir, "batch_size": 4, "lr": 0.01, **sections.pop("public", {})}
    return make_config(public=public, eval=EVAL, **sections)


def test_public_path_alone_leaves_the_run_bit_identical_and_reports_public_perplexity(
    make_config, public_dir
):
    run = {"num_rounds": 2, **QUIET}
    plain = Simulation(make_config(run=run, eval=EVAL), verbose=False)
    with_path = Simulation(_public_config(make_config, public_dir, run=run), verbose=False)
    assert not isinstance(with_path.state.server, PublicTrainingState)
    history = [plain.run(), with_path.run()]
    _assert_equal(plain.state, with_path.state)
    for a, b in zip(*history, strict=True):
        assert a.get("train_loss") == b.get("train_loss")
        assert a["eval/loss"] == b["eval/loss"]
        assert "eval/public/perplexity" in b and "eval/public/perplexity" not in a
    # The private per-client evaluation sits beside the public one.
    assert {"client/perplexity_mean", "eval/public/loss"} <= set(history[1][-1])


def test_server_steps_lower_the_public_perplexity(make_config, public_dir):
    def final_public_perplexity(server_steps):
        config = _public_config(
            make_config,
            public_dir,
            public={"server_steps": server_steps},
            run={"num_rounds": 2, **QUIET},
        )
        history = Simulation(config, verbose=False).run()
        assert history[0]["eval/public/perplexity"] > 0
        return history[-1]["eval/public/perplexity"]

    without, with_steps = final_public_perplexity(0), final_public_perplexity(8)
    assert with_steps < 0.9 * without


def test_resumed_run_equals_uninterrupted_run(make_config, public_dir):
    """The public optimizer state is checkpointed with the server state, the batches come from
    the round's key and the warm start is not repeated: stop after 1 round, resume, and the
    result equals 3 rounds in one go, bit for bit."""
    sections = {"public": {"server_steps": 2, "warm_start_steps": 3}}
    run = {"num_rounds": 3, "checkpoint_every": 1, "partition_report": False}
    whole_sim = Simulation(
        _public_config(make_config, public_dir, run=run, **sections), verbose=False
    )
    whole = whole_sim.run()
    assert "public/warm_start_loss_last" in whole[0]
    split = _public_config(make_config, public_dir, run={**run, "stop_after": 1}, **sections)
    Simulation(split, verbose=False).run()
    resumed_config = dataclasses.replace(
        split, run=dataclasses.replace(split.run, resume=True, stop_after=None)
    )
    resumed_sim = Simulation(resumed_config, verbose=False)
    resumed = resumed_sim.run()
    _assert_equal(whole_sim.state.server, resumed_sim.state.server)
    assert isinstance(resumed_sim.state.server, PublicTrainingState)
    assert [h.get("train_loss") for h in whole] == [h.get("train_loss") for h in resumed]
    assert whole[-1]["eval/public/loss"] == resumed[-1]["eval/public/loss"]


def test_warm_start_trains_the_initial_model(make_config, public_dir):
    config = _public_config(
        make_config,
        public_dir,
        public={"warm_start_steps": 6, "lr": 0.02},
        run={"num_rounds": 1, **QUIET},
    )
    cold_public = dataclasses.replace(config.public, warm_start_steps=0)
    cold = Simulation(dataclasses.replace(config, public=cold_public), verbose=False)
    warm = Simulation(config, verbose=False)
    before = cold.evaluate()["eval/public/loss"]
    record = warm.warm_start()
    assert record["public/warm_start_loss_last"] < record["public/warm_start_loss_first"]
    assert warm.evaluate()["eval/public/loss"] < before
    assert warm.warm_start() == {}  # once only


def test_a_run_with_public_steps_is_a_base_for_fine_tuning(make_config, public_dir):
    """Its checkpoint holds the params inside the wrapped server state; trainable.base_run
    finds them there."""
    pretrain = _public_config(
        make_config,
        public_dir,
        public={"server_steps": 2},
        run={"num_rounds": 1, "partition_report": False},
    )
    pretrained = Simulation(pretrain, verbose=False)
    pretrained.run()
    finetune = make_config(
        trainable={"mode": "lora", "base_run": pretrain.run.output_dir}, run=QUIET
    )
    _assert_equal(Simulation(finetune, verbose=False).frozen, pretrained.params)


# ---------------------------------------------------------------------------------- bad input
def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_missing_public_path_is_a_config_error(make_config, tmp_path):
    config = make_config(public={"path": str(tmp_path / "nowhere"), "server_steps": 1})
    with pytest.raises(ConfigError) as err:
        Simulation(config, verbose=False)
    assert "public.path" in _one_line(err) and "does not exist" in str(err.value)


@pytest.mark.parametrize("key", ["server_steps", "warm_start_steps"])
def test_public_steps_without_a_path_are_a_config_error(key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"--public.{key}", "2"])
    assert f"public.{key}=2" in _one_line(err) and "public.path" in str(err.value)


@pytest.mark.parametrize(
    "contents", [{"empty.txt": ""}, {"blank.txt": "\n\n   \n"}, {"one.jsonl": '{"body": "x"}\n'}]
)
def test_public_path_without_usable_text_is_a_config_error(make_config, tmp_path, contents):
    folder = tmp_path / "public"
    folder.mkdir()
    for name, text in contents.items():
        (folder / name).write_text(text)
    config = make_config(public={"path": str(folder), "server_steps": 1})
    with pytest.raises(ConfigError) as err:
        Simulation(config, verbose=False)
    assert _one_line(err).startswith("public.path: ")


# ------------------------------------------------------------------------ LoRA on a pretrained
@pytest.fixture(scope="module")
def hf_model_dir(tmp_path_factory):
    """A tiny random Llama in Hugging Face format with the tiny tokenizer (built with PyTorch)."""
    torch = pytest.importorskip("torch")
    import transformers
    from hf_fixtures import write_tiny_tokenizer

    from fedjax_llm.data import load_tokenizer

    directory = tmp_path_factory.mktemp("tiny_llama")
    write_tiny_tokenizer(directory)
    config = transformers.LlamaConfig(
        vocab_size=load_tokenizer(directory).vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    return str(directory)


def test_lora_server_steps_train_the_global_adapter_on_the_pretrained_base(
    make_config, tmp_path, hf_model_dir
):
    private = write_public_text(tmp_path / "private", files=4, seed=1)
    public = write_public_text(tmp_path / "public", seed=2)

    def run(server_steps):
        config = make_config(
            pretrained={"path": hf_model_dir},
            trainable={"mode": "lora", "lora_rank": 4},
            data={
                "source": "file",
                "path": private,
                "format": "text",
                "sample_by": "paragraph",
                "partitioner": "natural",
                "num_clients": None,
                "seq_len": 32,
            },
            public={"path": public, "server_steps": server_steps, "batch_size": 4, "lr": 0.02},
            run={"num_rounds": 2, "num_clients_per_round": 2, **QUIET},
            eval={"every": 2, "max_new_tokens": 0, "batch_size": 32},
        )
        sim = Simulation(config, verbose=False)
        base = jax.tree.map(np.array, sim.frozen)
        history = sim.run()
        _assert_equal(sim.frozen, base)  # the base is never trained
        return sim.params, history[-1]

    (plain_params, plain), (public_params, trained) = run(0), run(4)
    assert set(public_params) == set(plain_params)  # the LoRA factors only
    assert trained["eval/public/loss"] < plain["eval/public/loss"]


# ------------------------------------------------------------------------------ end to end
def _make_example_data():
    path = os.path.join(ROOT, "scripts", "make_example_data.py")
    spec = importlib.util.spec_from_file_location("make_example_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shipped_public_private_config_runs_on_example_data(tmp_path):
    script = _make_example_data()
    out = tmp_path / "example"
    assert (
        script.main(["--out", str(out), "--users", "4", "--examples", "20", "--pairs", "10"]) == 0
    )
    texts = sorted(os.listdir(out / "public"))
    assert texts and not set(texts) & set(os.listdir(out / "texts"))
    config = load_config(
        os.path.join(ROOT, "configs", "pretrain_public_private.yaml"),
        [
            f"--data.path={out / 'texts'}",
            f"--public.path={out / 'public'}",
            f"--run.output_dir={tmp_path / 'run'}",
            "--model.hidden_size=32",
            "--model.intermediate_size=64",
            "--model.num_layers=1",
            "--data.seq_len=64",
            "--model.max_seq_len=64",
            "--public.warm_start_steps=2",
            "--public.server_steps=1",
            "--run.num_rounds=2",
            "--run.num_clients_per_round=4",
            "--run.partition_report=false",
            "--eval.every=2",
        ],
    )
    history = Simulation(config, verbose=False).run()
    last = history[-1]
    for key in ("eval/perplexity", "client/perplexity_mean", "eval/public/perplexity"):
        assert np.isfinite(last[key]), key
    assert last["eval/public/perplexity"] < history[0]["eval/public/perplexity"]
