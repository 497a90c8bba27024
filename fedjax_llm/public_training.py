"""Server steps on public data beside the clients' private data (federated pre-training with
public and private data).

The server holds a public corpus (``public.path``, `fedjax_llm.data.public_data`). Each
round, after the wrapped algorithm's server update on the clients' aggregate, it takes
``public.server_steps`` optimizer steps of the run's objective on batches of public examples;
before round 1 it may take ``public.warm_start_steps`` such steps from the initial model
(`make_public_warm_start`; a resumed run restores the warm-started state and never repeats
them). Any `Algorithm` works: `with_public_steps` wraps it the way
`fedjax_llm.compression.with_downlink_compression` does, its server state a
`PublicTrainingState` that carries the public optimizer's state next to the wrapped state, so
checkpoints hold it and a resumed run continues bit for bit.

Everything runs inside the compiled round: the steps are a `jax.lax.scan`, and the public
examples and the frozen base (for ``trainable.mode: lora``, the model the LoRA params adapt)
reach the server update as inputs of the round (`RoundInfo.server_data`, `RoundInfo.frozen`),
never as constants of the program. The batches come from the server update's key: step s of a
round reads rows ``perm[(s * B + b) mod N]`` of a random permutation ``perm`` of the N public
rows drawn with ``fold_in(key, PUBLIC_STREAM)``, so a round's batches are a pure function of
the run's seed and the round.

References:
  Augenstein et al. 2022, "Mixed Federated Learning: Joint Decentralized and Centralized
  Learning"; Nguyen et al. 2023, "Where to Begin? On the Impact of Pre-Training and
  Initialization in Federated Learning"; Wang et al. 2023, "Can Public Large Language Models
  Help Private Cross-device Federated Learning?".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_llm.algorithms.base import Algorithm, inner_state_hooks
from fedjax_llm.config import ClientConfig, ConfigError, ExperimentConfig, PublicDataConfig
from fedjax_llm.data.public_data import PublicData, build_public_data
from fedjax_llm.data.tokenizer import Tokenizer
from fedjax_llm.errors import first_line
from fedjax_llm.objectives import Objective, check_fields
from fedjax_llm.optimizers import make_client_optimizer
from fedjax_llm.round import random_permutation_at
from kernels.pytree import PyTree

PUBLIC_STREAM = 2**31 - 2
"""``fold_in`` data of the public steps' key, from the server update's key (the wrapped update
receives that key unchanged)."""
WARM_START_STREAM = 2**32 - 1
"""``fold_in`` data of the warm start's key, from the run's training key (rounds fold in their
index, always below it)."""

PublicSteps = Callable[..., tuple[PyTree, PyTree, jax.Array]]
"""``steps(params, opt_state, frozen, examples, key, num_steps) -> (params, opt_state,
losses [num_steps])``."""


class PublicTrainingState(NamedTuple):
    """Server state of an algorithm wrapped by `with_public_steps`.

    Attributes:
      inner: the wrapped algorithm's server state (its params are the global model).
      opt_state: the state of the optimizer of the public steps, kept across rounds.
    """

    inner: PyTree
    opt_state: PyTree


def public_batch_indices(
    key: jax.Array, num_examples: int, num_steps: int, batch_size: int
) -> jax.Array:
    """The public rows each server step reads.

    Args:
      key: the steps' key.
      num_examples: N, the public training rows.
      num_steps: S.
      batch_size: B.

    Returns:
      ``[S, B]`` int32 rows: a random permutation of ``[0, N)`` streamed in order (cycling
      when ``S * B > N``), so no row repeats before every row has been read.
    """
    position = jnp.arange(num_steps * batch_size) % num_examples
    return random_permutation_at(key, position, num_examples).reshape(num_steps, batch_size)


def make_public_steps(
    objective: Objective, optimizer: optax.GradientTransformation, batch_size: int
) -> PublicSteps:
    """Builds the server's optimizer steps on public examples, as one `jax.lax.scan`.

    Args:
      objective: the run's objective (its loss is what the steps descend).
      optimizer: the public steps' optimizer.
      batch_size: public examples per step.

    Returns:
      ``steps(params, opt_state, frozen, examples, key, num_steps) -> (params, opt_state,
      losses)``: ``examples`` is a dict of per-example arrays ``[N, ...]`` (the fields the
      objective reads), ``num_steps`` a Python int, ``losses`` each step's mean loss. Pure and
      jittable.
    """

    def steps(params, opt_state, frozen, examples, key, num_steps):
        num_examples = jax.tree.leaves(examples)[0].shape[0]
        batch_key, step_key = jax.random.split(key)
        indices = public_batch_indices(batch_key, num_examples, num_steps, batch_size)
        keys = jax.random.split(step_key, num_steps)

        def one(carry, xs):
            params, opt_state = carry
            rows, step_key = xs
            batch = {name: x[rows] for name, x in examples.items()}
            batch["example_weight"] = jnp.ones(batch_size, jnp.float32)

            def loss_fn(p):
                return objective.loss(frozen, p, batch, step_key)

            (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, opt_state), losses = jax.lax.scan(one, (params, opt_state), (indices, keys))
        return params, opt_state, losses

    return steps


class _Slot:
    """A placeholder leaf: which leaf of a flattened server state it stands for."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index


def with_params(server_params: Callable, state: PyTree, params: PyTree) -> PyTree:
    """``state`` with the global params that ``server_params(state)`` reads replaced.

    Works for any algorithm whose ``server_params`` selects arrays of its server state (every
    built-in one does): it is run on a copy of the state's structure whose leaves are
    placeholders, which names the leaves to replace.

    Args:
      server_params: the algorithm's ``server_params``.
      state: its server state.
      params: the new params (structure of ``server_params(state)``).

    Returns:
      The server state holding ``params`` (each cast to the dtype of the leaf it replaces).

    Raises:
      ValueError: if ``server_params`` computes its result rather than selecting it.
    """
    problem = (
        "public training writes the server's params back into the algorithm's server state, "
        "so Algorithm.server_params must return arrays held in that state (as "
        "`lambda s: s.params` does); this one computes them"
    )
    leaves, treedef = jax.tree.flatten(state)
    slots = jax.tree.unflatten(treedef, [_Slot(i) for i in range(len(leaves))])
    try:
        picked = jax.tree.leaves(server_params(slots))
    except Exception as err:  # noqa: BLE001 - any failure means it computes on its leaves
        raise ValueError(f"{problem} ({type(err).__name__}: {err}).") from None
    new_leaves = jax.tree.leaves(params)
    if not all(isinstance(x, _Slot) for x in picked) or len(picked) != len(new_leaves):
        raise ValueError(f"{problem}.")
    out = list(leaves)
    for slot, value in zip(picked, new_leaves, strict=True):
        out[slot.index] = jnp.asarray(value, leaves[slot.index].dtype)
    return jax.tree.unflatten(treedef, out)


def _train_on_public(
    algorithm: Algorithm,
    steps: PublicSteps,
    state: PyTree,
    opt_state: PyTree,
    frozen: PyTree,
    examples: dict,
    key: jax.Array,
    num_steps: int,
) -> tuple[PyTree, PyTree, jax.Array]:
    """``num_steps`` public steps on the params of an algorithm's server state."""
    if algorithm.server_frozen is not None:
        # The base the algorithm owns, as its update left it (merged adapters included).
        frozen = algorithm.server_frozen(state)
    params, opt_state, losses = steps(
        algorithm.server_params(state), opt_state, frozen, examples, key, num_steps
    )
    return with_params(algorithm.server_params, state, params), opt_state, losses


def with_public_steps(
    algorithm: Algorithm,
    objective: Objective,
    optimizer: optax.GradientTransformation,
    *,
    server_steps: int,
    batch_size: int,
) -> Algorithm:
    """Wraps an algorithm so that its server also trains on public data every round.

    The server update runs the wrapped update on the clients' aggregate, then
    ``server_steps`` steps of ``optimizer`` on the objective's loss of public batches
    (`make_public_steps`), starting from the params that update produced; the clients of the
    next round receive the result. The public examples are the round's
    `RoundInfo.server_data` and the model's frozen base its `RoundInfo.frozen` (or the base
    the algorithm owns, `Algorithm.server_frozen`), so with ``trainable.mode: lora`` the steps
    train the global LoRA params on the frozen base, and with ``full`` every parameter. The
    key of the steps is ``fold_in(key, PUBLIC_STREAM)`` of the server update's key, which the
    wrapped update receives unchanged.

    Args:
      algorithm: the algorithm to wrap (its ``server_params`` must select arrays of its server
        state, see `with_params`).
      objective: the run's objective (not DP-SGD's noised one: public data need no privacy).
      optimizer: the public steps' optimizer; its state is kept across rounds.
      server_steps: steps per round (0: none, the wrapped update alone).
      batch_size: public examples per step.

    Returns:
      The wrapped `Algorithm`; its server state is a `PublicTrainingState`.

    Raises:
      ValueError: (when the round is traced) if the round has no ``server_data`` although
        ``server_steps`` > 0.
    """
    steps = make_public_steps(objective, optimizer, batch_size)

    def server_init(params, *frozen):
        inner = algorithm.server_init(params, *frozen)
        return PublicTrainingState(inner, optimizer.init(params))

    def server_update(state, aggregate, info, key):
        inner = algorithm.server_update(state.inner, aggregate, info, key)
        if server_steps == 0:
            return PublicTrainingState(inner, state.opt_state)
        if info.server_data is None:
            raise ValueError(
                f"with_public_steps takes {server_steps} public steps per round, but the round "
                "got no server_data: pass the public examples as round_fn(..., server_data)."
            )
        inner, opt_state, _ = _train_on_public(
            algorithm,
            steps,
            inner,
            state.opt_state,
            info.frozen,
            info.server_data,
            jax.random.fold_in(key, PUBLIC_STREAM),
            server_steps,
        )
        return PublicTrainingState(inner, opt_state)

    server_frozen, server_metrics = inner_state_hooks(algorithm)

    return algorithm._replace(
        server_init=server_init,
        server_params=lambda state: algorithm.server_params(state.inner),
        broadcast=lambda state: algorithm.broadcast(state.inner),
        server_update=server_update,
        server_frozen=server_frozen,
        server_metrics=server_metrics,
    )


def make_public_warm_start(
    algorithm: Algorithm,
    objective: Objective,
    optimizer: optax.GradientTransformation,
    *,
    num_steps: int,
    batch_size: int,
) -> Callable[[PyTree, PyTree, dict, jax.Array], tuple[PyTree, jax.Array]]:
    """Builds the warm start: public steps on the initial model, before round 1.

    They are the steps of `with_public_steps` (same step function and optimizer, whose state
    the rounds then continue), taken ``num_steps`` times in one jitted `jax.lax.scan`.

    Args:
      algorithm: an algorithm wrapped by `with_public_steps` (its server state a
        `PublicTrainingState`).
      objective: the run's objective.
      optimizer: the public optimizer (the one given to `with_public_steps`).
      num_steps: steps of the warm start.
      batch_size: public examples per step.

    Returns:
      ``warm_start(server_state, frozen, examples, key) -> (server_state, losses
      [num_steps])``, jitted.
    """
    steps = make_public_steps(objective, optimizer, batch_size)

    @jax.jit
    def warm_start(state, frozen, examples, key):
        state, opt_state, losses = _train_on_public(
            algorithm, steps, state, state.opt_state, frozen, examples, key, num_steps
        )
        return state._replace(opt_state=opt_state), losses

    return warm_start


# ------------------------------------------------------------------------------ from configs
def trains_on_public(config: ExperimentConfig) -> bool:
    """Whether the server takes steps on public data (``public.server_steps`` or
    ``public.warm_start_steps`` > 0); with neither, ``public.path`` only adds evaluation."""
    return config.public.server_steps > 0 or config.public.warm_start_steps > 0


def public_optimizer(public: PublicDataConfig) -> optax.GradientTransformation:
    """The optimizer ``public.optimizer`` names at ``public.lr`` (`make_client_optimizer`'s
    sgd, momentum 0.9, or adamw with b1 0.9 and no weight decay)."""
    return make_client_optimizer(ClientConfig(optimizer=public.optimizer, lr=public.lr))


def load_public_data(config: ExperimentConfig, tokenizer: Tokenizer | None) -> PublicData | None:
    """The public data of ``config.public`` (None without ``public.path``).

    Raises:
      ConfigError: naming ``public.path`` when it does not exist or holds no usable text, and
        when the run has no tokenizer to read text with.
    """
    p = config.public
    if not p.path:
        return None
    if tokenizer is None:
        raise ConfigError(
            f"public.path={p.path!r} is text, but pretrained.path has no tokenizer files to "
            "read it with; add them or remove public.path."
        )
    try:
        return build_public_data(
            p.path,
            tokenizer=tokenizer,
            seq_len=config.data.seq_len,
            sample_by=p.sample_by,
            text_column=p.text_column,
            eval_fraction=p.eval_fraction,
            max_examples=p.max_examples,
            seed=config.data.seed,
        )
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"public.path: {first_line(str(err))}") from None


def build_public_training(
    config: ExperimentConfig, algorithm: Algorithm, objective: Objective, public: PublicData
) -> tuple[Algorithm, Callable | None]:
    """The run's algorithm with the server's public steps, and its warm start.

    Args:
      config: the experiment (its ``public`` section).
      algorithm: the run's algorithm.
      objective: the run's objective.
      public: the public data.

    Returns:
      ``(algorithm, warm_start)``: ``algorithm`` wrapped by `with_public_steps` and the
      `make_public_warm_start` function (None without ``public.warm_start_steps``); the
      algorithm unchanged and None when the server takes no public steps.

    Raises:
      ConfigError: if the objective reads fields that public text does not have.
    """
    if not trains_on_public(config):
        return algorithm, None
    try:
        check_fields(objective, public.train_arrays(), "public text (tokens, loss_mask)")
    except ValueError as err:
        raise ConfigError(
            f"public.server_steps / public.warm_start_steps train client.objective="
            f"{config.client.objective!r} on public.path: {err}"
        ) from None
    p = config.public
    optimizer = public_optimizer(p)
    wrapped = with_public_steps(
        algorithm, objective, optimizer, server_steps=p.server_steps, batch_size=p.batch_size
    )
    warm_start = None
    if p.warm_start_steps:
        warm_start = make_public_warm_start(
            wrapped, objective, optimizer, num_steps=p.warm_start_steps, batch_size=p.batch_size
        )
    return wrapped, warm_start


def describe_public(public: PublicData, config: ExperimentConfig) -> str:
    """One line about the public data and what the server does with it (for the header)."""
    p, s = config.public, public.stats
    training = (
        f"{p.server_steps} server steps per round and {p.warm_start_steps} warm-start steps of "
        f"{p.batch_size} rows ({p.optimizer}, lr {p.lr:g})"
        if trains_on_public(config)
        else "evaluation only (public.server_steps 0)"
    )
    return (
        f"public data: {s['num_train_rows']} training and {s['num_eval_rows']} held-out rows "
        f"from {s['num_records']} records of {s['source']}; {training}"
    )
