"""Partial personalization: some trainable parameters stay on each client, the rest is federated.

`make_partially_personal` wraps any algorithm of the FedAvg family. A *personal* part of the
trainable params lives in each client's state in the simulator's client store and never leaves
the client; the *shared* rest is trained and aggregated as the wrapped algorithm does. Presets:

- FedSA-LoRA (`make_fedsa_lora`): the LoRA ``a`` factors are shared, the ``b`` factors personal.
- A personal soft prompt on a shared LoRA (`make_personal_prompt`): the soft prompt a LoRA
  trainable holds with ``trainable.lora_soft_prompt`` is personal, the factors shared.
- FedPer (`make_fedper`): the last N transformer layers (and optionally named modules) are
  personal. Layers are stacked along a leading layer axis (``nn.scan``), so personal-ness is per
  slice of a leaf: the selection returns a mask over that axis, not a yes/no per leaf.

What each round does, per sampled client: ``client_init`` starts local training from the global
shared part and the client's own personal part; the wrapped algorithm trains all of it;
``client_final`` keeps the trained personal part as the client's new state and uploads only the
shared part of the delta. The personal part is *excluded* from the upload (not sent as zeros):
the `ClientOutput` holds a tuple of the shared parts, so upload transforms, DP noise, robust
aggregators and the ``bytes_up`` count see only what is really sent. The server expands the
aggregate with zeros at the personal positions before the wrapped server update, so the server's
copy of the personal part never changes (with every built-in server optimizer a zero
pseudo-gradient is a zero update). The broadcast still carries the server's whole params (the
wrapped algorithm's broadcast is params-shaped, and downlink compression relies on it), so
``bytes_down`` counts the unchanged global copy of the personal part, which clients ignore.

A personal part starts from the global init: the client store is initialized from the initial
params, so a client never sampled yet holds the init, which is also the server's (unchanged) copy.
As for every stateful algorithm, a client's new state is committed only when its upload is
delivered: a client that drops out mid-round loses that round's personal training too.

References:
  Guo et al. 2024, "Selective Aggregation for Low-Rank Adaptation in Federated Learning"
  (FedSA-LoRA); Arivazhagan et al. 2019, "Federated Learning with Personalization Layers"
  (FedPer); Pillutla et al. 2022, "Federated Learning with Partial Model Personalization".
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_llm.algorithms.base import Algorithm
from fedjax_llm.algorithms.fedavg import make_fedavg
from fedjax_llm.config import ConfigError
from fedjax_llm.models.trainable import PROMPT_KEY
from kernels.pytree import PyTree

LeafSelection = Callable[[str, Any], "bool | np.ndarray"]
"""``(path, leaf) -> bool or bool array [leaf.shape[0]]``: a leaf's personal slices."""
PersonalSelection = str | LeafSelection | Sequence["str | LeafSelection"]
"""Which trainable params are personal: glob patterns over leaf paths and/or functions.

Paths join the keys of a leaf with ``/``: ``q/a`` and ``q/b`` for LoRA on q, ``layers/attn/
q_proj/kernel`` or ``lm_head/kernel`` for full params, ``key`` / ``value`` for a prefix, ``""`` for
a soft prompt. A pattern selects the leaves whose path matches it (`fnmatch`, so ``*/b`` is every
LoRA ``b``) or lies under it (``q`` is ``q/a`` and ``q/b``). A function ``(path, leaf) -> bool or
bool array [leaf.shape[0]]`` may make only some slices of a leaf's leading axis personal (a layer
of stacked layers); it must read only the leaf's shape (it also sees shape structs and tracers).
A sequence selects the union of its items; each pattern in it must match some leaf.
"""

FEDSA_LORA_PERSONAL = ("*/b",)
"""FedSA-LoRA's personal part: every LoRA ``b`` factor (the ``a`` factors are shared)."""

LAYER_STACKED = {"full": ("layers",), "lora": ("*",), "prefix": ("*",), "soft_prompt": ()}
"""Per trainable mode, the patterns of leaves stacked along a leading layer axis."""


class PersonalClientState(NamedTuple):
    """A client's state under `make_partially_personal`.

    Attributes:
      personal: the client's personal part, a tuple with one array per leaf that has personal
        slices (the whole leaf, or its personal slices along the leading axis), in leaf order.
      inner: the wrapped algorithm's client state (``()`` for the FedAvg family).
    """

    personal: tuple
    inner: PyTree


class _Layout(NamedTuple):
    """How each leaf of the params splits: static, computed from shapes only."""

    treedef: Any
    shared_index: tuple  # per leaf: None (all), () (none), or a slice / indices of axis 0
    personal_index: tuple
    inverse: tuple  # per split leaf: the permutation undoing concat(shared, personal); or None


def leaf_paths(params: PyTree) -> list[str]:
    """The ``/``-joined path of every leaf, in leaf order (see `PersonalSelection`)."""
    return [_path_text(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _path_text(path: tuple) -> str:
    parts = []
    for entry in path:
        for attribute in ("key", "name", "idx"):
            if hasattr(entry, attribute):
                parts.append(str(getattr(entry, attribute)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)


def _matches(path: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path, pattern + "/*")


def _layout(params: PyTree, personal: PersonalSelection, name: str) -> _Layout:
    """Splits every leaf into shared and personal slices; refuses a selection of nothing."""
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [_path_text(path) for path, _ in with_paths]
    leaves = [leaf for _, leaf in with_paths]
    items = (personal,) if isinstance(personal, str) or callable(personal) else tuple(personal)
    patterns = [item for item in items if isinstance(item, str)]
    unknown = [p for p in patterns if not any(_matches(path, p) for path in paths)]
    if unknown or not items:
        raise ConfigError(
            f"{name}: the personal part {unknown or list(items)} names no parameter of the "
            f"trainable; its parameters are {paths}."
        )
    selected = []
    for path, leaf in zip(paths, leaves, strict=True):
        mask = np.zeros((), bool)
        for item in items:
            choice = _matches(path, item) if isinstance(item, str) else item(path, leaf)
            mask = np.logical_or(mask, np.asarray(choice, bool))
        selected.append(mask)
    shared_index, personal_index, inverse = [], [], []
    for path, leaf, mask in zip(paths, leaves, selected, strict=True):
        if mask.ndim == 0:
            shared_index.append(None if not mask else ())
            personal_index.append(None if mask else ())
            inverse.append(None)
            continue
        if mask.shape != tuple(leaf.shape[:1]):
            raise ValueError(
                f"{name}: the personal mask of {path!r} has shape {mask.shape}; it must be a "
                f"bool or one bool per slice of the leading axis ({leaf.shape[:1]})."
            )
        if mask.all() or not mask.any():
            shared_index.append(None if not mask.any() else ())
            personal_index.append(None if mask.all() else ())
            inverse.append(None)
            continue
        shared, own = np.flatnonzero(~mask), np.flatnonzero(mask)
        shared_index.append(_static_index(shared))
        personal_index.append(_static_index(own))
        order = np.argsort(np.concatenate([shared, own]))
        inverse.append(None if np.array_equal(order, np.arange(len(order))) else order)
    if all(isinstance(index, tuple) for index in personal_index):
        raise ConfigError(
            f"{name}: the personal part selects no parameter of the trainable; its parameters "
            f"are {paths}."
        )
    return _Layout(treedef, tuple(shared_index), tuple(personal_index), tuple(inverse))


def _static_index(index: np.ndarray) -> slice | np.ndarray:
    # A run of consecutive slices (FedPer's last layers) is a slice, not a gather.
    if np.array_equal(index, np.arange(index[0], index[-1] + 1)):
        return slice(int(index[0]), int(index[-1]) + 1)
    return index


def _part(leaf: jax.Array, index: Any) -> jax.Array | None:
    if index is None:
        return leaf
    if isinstance(index, tuple):  # nothing of this leaf
        return None
    return leaf[index]


def _split(layout: _Layout, params: PyTree) -> tuple[tuple, tuple]:
    """``params -> (shared parts, personal parts)``, each a tuple over the leaves having one."""
    leaves = layout.treedef.flatten_up_to(params)
    shared, personal = [], []
    for leaf, s, p in zip(leaves, layout.shared_index, layout.personal_index, strict=True):
        if (part := _part(leaf, s)) is not None:
            shared.append(part)
        if (part := _part(leaf, p)) is not None:
            personal.append(part)
    return tuple(shared), tuple(personal)


def _merge(layout: _Layout, shared: Sequence, personal: Sequence) -> PyTree:
    """The inverse of `_split`."""
    shared, personal = iter(shared), iter(personal)
    leaves = []
    for s, p, inverse in zip(
        layout.shared_index, layout.personal_index, layout.inverse, strict=True
    ):
        if s is None:
            leaves.append(next(shared))
        elif p is None:
            leaves.append(next(personal))
        else:
            a, b = next(shared), next(personal)
            leaf = jnp.concatenate([a, b.astype(a.dtype)], axis=0)
            leaves.append(leaf if inverse is None else leaf[inverse])
    return layout.treedef.unflatten(leaves)


def make_partially_personal(
    base: Algorithm, personal: PersonalSelection, name: str = "personalization"
) -> Algorithm:
    """Wraps an algorithm so that a personal part of the params stays on each client.

    See the module docstring for what is sent, stored and when. The wrapped algorithm must
    keep its local model in ``train_state.params`` and take a params-shaped ``delta`` in its
    server update (the FedAvg family and FedProx do; FedProx's proximal term then pulls the
    personal part toward the client's own previous personal part). It must not be personalized
    itself (its ``personal_params`` is replaced).

    Args:
      base: the algorithm that trains and aggregates the shared part.
      personal: which params are personal (`PersonalSelection`).
      name: what error messages call this algorithm (a config's ``algorithm.type``).

    Returns:
      The `Algorithm`; its client state is a `PersonalClientState` and its ``personal_params``
      puts a client's personal part into the global params.

    Raises:
      ConfigError: (when first given params, at ``server_init``) if the selection names no
        parameter of the trainable.
    """

    def layout(params):
        return _layout(params, personal, name)

    def personalize(broadcast, own):
        # What the wrapped algorithm sees as "global": the global shared part and the client's
        # own personal part (so a proximal term pulls the personal part toward its last value).
        lay = layout(broadcast.params)
        return broadcast._replace(params=_merge(lay, _split(lay, broadcast.params)[0], own))

    def server_init(params, *frozen):
        layout(params)  # a selection of nothing fails here, before anything compiles
        return base.server_init(params, *frozen)

    def client_state_init(params):
        return PersonalClientState(
            _split(layout(params), params)[1], base.client_state_init(params)
        )

    def client_init(broadcast, client_state, hparams):
        own = personalize(broadcast, client_state.personal)
        return base.client_init(own, client_state.inner, hparams)

    def client_step(broadcast, client_state, state, batch, key, loss_fn, hparams):
        own = personalize(broadcast, client_state.personal)
        return base.client_step(own, client_state.inner, state, batch, key, loss_fn, hparams)

    def client_final(broadcast, state, client_state, hparams):
        own = personalize(broadcast, client_state.personal)
        output, inner = base.client_final(own, state, client_state.inner, hparams)
        lay = layout(broadcast.params)
        shared_delta = _split(lay, output.delta)[0]
        trained_personal = _split(lay, state.params)[1]
        return output._replace(delta=shared_delta), PersonalClientState(trained_personal, inner)

    def full_aggregate(server_state, aggregate):
        return aggregate._replace(delta=params_delta(base.server_params(server_state), aggregate))

    def server_update(server_state, aggregate, round_info, key):
        full = full_aggregate(server_state, aggregate)
        return base.server_update(server_state, full, round_info, key)

    server_metrics = None
    if base.server_metrics is not None:

        def server_metrics(server_state, aggregate, round_info):
            full = full_aggregate(server_state, aggregate)
            return base.server_metrics(server_state, full, round_info)

    def params_delta(params, upload):
        # The shared part's change, and no change of the personal part.
        lay = layout(params)
        zeros = tuple(jnp.zeros_like(p) for p in _split(lay, params)[1])
        return _merge(lay, upload.delta, zeros)

    def personal_params(global_params, client_state):
        lay = layout(global_params)
        return _merge(lay, _split(lay, global_params)[0], client_state.personal)

    return base._replace(
        server_init=server_init,
        client_state_init=client_state_init,
        client_init=client_init,
        client_step=client_step,
        client_final=client_final,
        server_update=server_update,
        server_metrics=server_metrics,
        personal_params=personal_params,
        params_delta=params_delta,
    )


def fedper_personal(
    mode: str, personal_layers: int, personal_modules: Sequence[str] = ()
) -> tuple[str | LeafSelection, ...]:
    """FedPer's personal part: the last ``personal_layers`` layers, plus named modules.

    Args:
      mode: the trainable mode (`LAYER_STACKED` says which of its leaves are stacked layers).
      personal_layers: how many of the last layers are personal, from 1 to the model's number
        of layers.
      personal_modules: patterns (`PersonalSelection`) of further leaves kept wholly personal,
        e.g. ``lm_head`` or ``final_norm`` of full params.

    Returns:
      A `PersonalSelection`: the module patterns and a function giving each stacked leaf a mask
      over its layer axis (true for the last ``personal_layers`` layers).

    Raises:
      ConfigError: for a mode without layers, or (when the selection sees the params) for
        ``personal_layers`` outside [1, number of layers] or a module pattern naming nothing.
    """
    if mode not in LAYER_STACKED:
        raise ConfigError(f"fedper: unknown trainable mode {mode!r}; valid: {list(LAYER_STACKED)}.")
    if not LAYER_STACKED[mode]:
        raise ConfigError(
            f"algorithm.type=fedper makes layers personal, but trainable.mode={mode} has no "
            "per-layer parameters; use trainable.mode lora, prefix or full."
        )
    stacked = LAYER_STACKED[mode]

    def last_layers(path: str, leaf: Any) -> np.ndarray | bool:
        if not any(_matches(path, pattern) for pattern in stacked):
            return False
        num_layers = int(leaf.shape[0])
        if not 1 <= personal_layers <= num_layers:
            raise ConfigError(
                f"algorithm.personal_layers={personal_layers} must be from 1 to the model's "
                f"{num_layers} layers."
            )
        return np.arange(num_layers) >= num_layers - personal_layers

    return (*personal_modules, last_layers)


def make_fedsa_lora(
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
) -> Algorithm:
    """Builds FedSA-LoRA: FedAvg on the LoRA ``a`` factors, the ``b`` factors kept per client.

    Guo et al. find that the ``a`` matrices learn general knowledge and the ``b`` matrices
    client-specific knowledge, so only ``a`` is aggregated. The global ``b`` stays at its init
    (zero), so the global model alone is the base model; evaluate it with each client's ``b``
    (the personalized evaluation).

    Args:
      client_optimizer: local optimizer.
      server_optimizer: server optimizer on the pseudo-gradient of the ``a`` factors.

    Returns:
      The `Algorithm` (see `make_partially_personal`).

    References:
      Guo et al. 2024, "Selective Aggregation for Low-Rank Adaptation in Federated Learning".
    """
    return make_partially_personal(
        make_fedavg(client_optimizer, server_optimizer), FEDSA_LORA_PERSONAL, "fedsa_lora"
    )


def make_personal_prompt(
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
) -> Algorithm:
    """Builds a personal soft prompt on a shared LoRA: FedAvg on the LoRA factors, each client's
    soft prompt (``trainable.lora_soft_prompt``, under `PROMPT_KEY`) kept in its state.

    Args:
      client_optimizer: local optimizer (trains the factors and the client's prompt).
      server_optimizer: server optimizer on the factors' pseudo-gradient.

    Returns:
      The `Algorithm` (see `make_partially_personal`).

    References:
      Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning" (soft
      prompts); Pillutla et al. 2022, "Federated Learning with Partial Model Personalization".
    """
    return make_partially_personal(
        make_fedavg(client_optimizer, server_optimizer), (PROMPT_KEY,), "personal_prompt"
    )


def make_fedper(
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
    mode: str,
    personal_layers: int,
    personal_modules: Sequence[str] = (),
) -> Algorithm:
    """Builds FedPer: FedAvg on the lower layers, the last layers kept per client.

    Args:
      client_optimizer: local optimizer.
      server_optimizer: server optimizer on the shared part's pseudo-gradient.
      mode: the trainable mode (``full``, ``lora`` or ``prefix``).
      personal_layers: how many of the last layers are personal.
      personal_modules: patterns of further leaves kept personal (see `fedper_personal`).

    Returns:
      The `Algorithm` (see `make_partially_personal`).

    References:
      Arivazhagan et al. 2019, "Federated Learning with Personalization Layers".
    """
    return make_partially_personal(
        make_fedavg(client_optimizer, server_optimizer),
        fedper_personal(mode, personal_layers, personal_modules),
        "fedper",
    )
