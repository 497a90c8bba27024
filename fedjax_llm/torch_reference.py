"""The federated LoRA round as a PyTorch user writes it: a loop over clients with transformers.

This is the reference the benchmark times the compiled round against. It follows the loop of
PyTorch federated fine-tuning frameworks (OpenFedLLM, FlowerTune): one transformers
`LlamaForCausalLM` is built once with LoRA on the chosen projections; for each sampled client the
global LoRA weights are loaded into it, a fresh local optimizer runs the client's local steps,
and the client's delta is added to a running FedAvg sum weighted by its example count; the new
global LoRA weights are the old ones plus the weighted mean delta (FedAvg with a server
``sgd(1.0)``).

Everything that decides the numbers is the same as in `fedjax_llm.round.make_round_fn`: the
weights (the base params converted with the inverse of `fedjax_llm.models.hf_loader`'s mapping),
LoRA's placement and ``alpha / rank`` scaling (unmerged, as `fedjax_llm.models.llama` applies
it), the client batches (drawn by `fedjax_llm.round.client_batch_indices` with the keys the
round derives, evaluated with JAX once per round), the local optimizer (plain SGD), the loss
(`fedjax_llm.objectives.next_token_loss`: mean token cross-entropy under the loss mask and the
example weights) and the aggregation (`fedjax_llm.pipeline.weighted_mean`). So in float32 its new
global LoRA params equal the compiled round's up to floating-point rounding.

LoRA is implemented here by hand (`LoRALinear`, a wrapper around the frozen `nn.Linear` in
PEFT's layout: ``lora_A`` ``[r, d_in]``, ``lora_B`` ``[d_out, r]``) so that PEFT is not needed.
The loop runs on the GPU when one is given (``device='cuda'``) and in bfloat16 autocast when
asked, as a PyTorch user runs mixed precision.

PyTorch and transformers are needed to import this module (PyTorch is a test-only dependency of
the package); `fedjax_llm.benchmarking` imports it only when the torch loop is requested.

References:
  Ye et al. 2024, "OpenFedLLM: Training Large Language Models on Decentralized Private Data via
  Federated Learning". Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from torch import nn
from torch.nn import functional as F

from fedjax_llm.models.hf_loader import _LAYER_TENSORS
from fedjax_llm.models.llama import LlamaConfig
from fedjax_llm.round import ClientData, LocalSchedule, client_batch_indices
from fedjax_llm.sampling import Cohort

__all__ = [
    "LORA_MODULES",
    "LoRALinear",
    "TorchFedAvgRound",
    "TorchRoundOutput",
    "add_lora",
    "build_hf_model",
    "hf_config",
    "hf_state_dict",
]

LORA_MODULES = {
    "q": ("self_attn", "q_proj"),
    "k": ("self_attn", "k_proj"),
    "v": ("self_attn", "v_proj"),
    "o": ("self_attn", "o_proj"),
    "gate": ("mlp", "gate_proj"),
    "up": ("mlp", "up_proj"),
    "down": ("mlp", "down_proj"),
}
"""Our LoRA target names and the submodule of a transformers `LlamaDecoderLayer` each adapts."""


# ------------------------------------------------------------------------------ base model
def hf_config(config: LlamaConfig) -> transformers.LlamaConfig:
    """The transformers `LlamaConfig` of one of our architectures.

    Args:
      config: the architecture.

    Returns:
      The equivalent transformers config (float32 weights).

    Raises:
      ValueError: for q/k/v biases (a transformers Llama with ``attention_bias`` also has an
        o_proj bias, so no transformers Llama matches).
    """
    config.validate()
    if config.attention_bias:
        raise ValueError(
            "the torch reference builds a transformers LlamaForCausalLM, which has no config "
            "with q/k/v biases only (Qwen2's layout); use a config with attention_bias=False."
        )
    rope: dict[str, Any] = {}
    if config.rope_type != "default":
        scaling: dict[str, Any] = {
            "rope_type": config.rope_type,
            "factor": config.rope_factor,
            "rope_theta": config.rope_theta,
        }
        if config.rope_type == "llama3":
            scaling.update(
                low_freq_factor=config.rope_low_freq_factor,
                high_freq_factor=config.rope_high_freq_factor,
                original_max_position_embeddings=config.rope_original_max_position,
            )
        rope["rope_scaling"] = scaling
    return transformers.LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.resolved_head_dim,
        hidden_act="silu",
        max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta,
        tie_word_embeddings=config.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=0.0,
        use_cache=False,
        **rope,
    )


def hf_state_dict(config: LlamaConfig, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Our base params as a transformers `LlamaForCausalLM` state dict (float32 numpy arrays).

    The inverse of `fedjax_llm.models.hf_loader.load_hf_params`: kernels ``[in, out]`` become
    Linear weights ``[out, in]`` and the stacked layer axis becomes ``model.layers.<i>``.

    Args:
      config: the architecture.
      params: base params as `fedjax_llm.models.llama.init_params` returns them.

    Returns:
      ``{tensor name: array}``; ``lm_head.weight`` only for untied embeddings.
    """
    params = jax.device_get(params)

    def array(x: Any) -> np.ndarray:
        return np.array(x, np.float32, order="C")  # a writable copy, as torch wants

    state = {
        "model.embed_tokens.weight": array(params["embed"]["embedding"]),
        "model.norm.weight": array(params["final_norm"]["scale"]),
    }
    if not config.tie_embeddings:
        state["lm_head.weight"] = array(np.asarray(params["lm_head"]["kernel"]).T)
    for name, (path, transpose) in _LAYER_TENSORS.items():
        node = params["layers"]
        for key in path:
            node = node.get(key) if isinstance(node, Mapping) else None
        if node is None:  # biases the architecture does not have
            continue
        stacked = np.asarray(node, np.float32)
        for layer in range(config.num_layers):
            value = stacked[layer].T if transpose else stacked[layer]
            state[f"model.layers.{layer}.{name}"] = array(value)
    return state


def build_hf_model(
    config: LlamaConfig, params: Mapping[str, Any], device: str | torch.device = "cpu"
) -> transformers.LlamaForCausalLM:
    """A transformers `LlamaForCausalLM` holding our base params, frozen, on ``device``.

    Args:
      config: the architecture.
      params: base params (`fedjax_llm.models.llama.init_params` layout).
      device: torch device.

    Returns:
      The model, float32, every parameter with ``requires_grad=False``.

    Raises:
      ValueError: if the converted tensors do not fill the model exactly.
    """
    model = transformers.LlamaForCausalLM(hf_config(config))
    state = {name: torch.from_numpy(x) for name, x in hf_state_dict(config, params).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # With tied embeddings lm_head.weight is the embedding itself, not a tensor of its own.
    missing = [m for m in missing if not (config.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(
            f"converted params do not match transformers' Llama: missing {missing}, "
            f"unexpected {unexpected}."
        )
    if config.tie_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.requires_grad_(False)
    return model.to(device=device, dtype=torch.float32)


# ------------------------------------------------------------------------------ LoRA
class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus an unmerged low-rank update, as PEFT's LoRA layer computes it.

    ``y = base(x) + scaling * (x @ lora_A.T) @ lora_B.T``, the same function as
    `fedjax_llm.models.llama`'s ``x @ W + scaling * (x @ a) @ b`` with ``lora_A = a.T`` and
    ``lora_B = b.T`` (no dropout).

    Attributes:
      base: the frozen projection.
      lora_A: ``[r, d_in]`` trainable.
      lora_B: ``[d_out, r]`` trainable.
      scaling: ``alpha / r``.
    """

    def __init__(self, base: nn.Linear, rank: int, scaling: float):
        super().__init__()
        self.base = base
        weight = base.weight
        self.lora_A = nn.Parameter(torch.zeros(rank, base.in_features, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=weight.device))
        self.scaling = float(scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * F.linear(F.linear(x, self.lora_A), self.lora_B)


def add_lora(
    model: transformers.LlamaForCausalLM, targets: Sequence[str], rank: int, scaling: float
) -> dict[str, list[LoRALinear]]:
    """Wraps the target projections of every decoder layer in `LoRALinear` (in place).

    Args:
      model: the model (its base weights should already be frozen).
      targets: our target names (keys of `LORA_MODULES`).
      rank: LoRA rank r.
      scaling: ``alpha / r``.

    Returns:
      ``{target: [the layer-0 .. layer-(L-1) wrappers]}``.

    Raises:
      ValueError: for an unknown target.
    """
    wrappers: dict[str, list[LoRALinear]] = {}
    for target in targets:
        if target not in LORA_MODULES:
            raise ValueError(f"unknown LoRA target {target!r}; valid: {tuple(LORA_MODULES)}.")
        block, name = LORA_MODULES[target]
        wrappers[target] = []
        for layer in model.model.layers:
            parent = getattr(layer, block)
            wrapper = LoRALinear(getattr(parent, name), rank, scaling)
            setattr(parent, name, wrapper)
            wrappers[target].append(wrapper)
    return wrappers


# ------------------------------------------------------------------------------ the round
class TorchRoundOutput(NamedTuple):
    """What a torch round reports.

    Attributes:
      train_loss: ``sum loss_sum / sum loss_weight`` over every participating client's local
        steps (the loss before each step), as `fedjax_llm.round.RoundOutput.train_loss`.
      weights: ``[C]`` the FedAvg weights of the cohort's slots.
    """

    train_loss: float
    weights: np.ndarray


def _make_batch_draw(schedule: LocalSchedule):
    def one(round_key, client_id, start, count):
        # The key derivation of `fedjax_llm.round.make_client_update`: the client's key is
        # fold_in(round_key, id), split into its batch-order key and its step keys.
        data_key, _ = jax.random.split(jax.random.fold_in(round_key, client_id))
        return client_batch_indices(data_key, start, count, schedule)

    return jax.jit(jax.vmap(one, in_axes=(None, 0, 0, 0)))


class TorchFedAvgRound:
    """FedAvg rounds of LoRA fine-tuning as a PyTorch loop over clients.

    The model is built once; each round, for every participating client: reset the LoRA
    weights to the global ones, build a fresh SGD optimizer, run its local steps (forward,
    masked cross-entropy, backward, step), and add ``count * (new - global)`` to the running
    sums; then the global LoRA weights move by the weighted mean delta. Losses are summed on the
    device and read once per round.

    Attributes:
      config: our architecture.
      model: the transformers model with LoRA.
      lora: ``{target: [LoRALinear per layer]}``.
      device: the torch device.
      autocast_dtype: the autocast dtype (None: float32, no autocast).
    """

    def __init__(
        self,
        config: LlamaConfig,
        base_params: Mapping[str, Any],
        data: ClientData,
        schedule: LocalSchedule,
        *,
        lora_targets: Sequence[str],
        lora_rank: int,
        lora_scaling: float,
        device: str | torch.device = "cpu",
        autocast_dtype: torch.dtype | None = None,
    ):
        """Builds the model and moves the client data to the device.

        Args:
          config: our architecture (its ``dtype`` is ignored: see ``autocast_dtype``).
          base_params: the frozen base params.
          data: every client's examples (``tokens``, ``loss_mask``).
          schedule: local steps K, batch size B and the shuffling of
            `fedjax_llm.round.client_batch_indices`.
          lora_targets: our LoRA target names.
          lora_rank: LoRA rank r.
          lora_scaling: ``alpha / r``.
          device: torch device of the model and data.
          autocast_dtype: run forward passes under `torch.autocast` in this dtype
            (``torch.bfloat16`` for mixed precision); None for float32.

        Raises:
          ValueError: if the data lack ``tokens`` or ``loss_mask``.
        """
        missing = [f for f in ("tokens", "loss_mask") if f not in data.examples]
        if missing:
            raise ValueError(f"the torch reference needs client data fields {missing}.")
        self.config = config
        self.device = torch.device(device)
        self.autocast_dtype = autocast_dtype
        self.model = build_hf_model(config, base_params, self.device)
        self.lora = add_lora(self.model, tuple(lora_targets), lora_rank, lora_scaling)
        self.model.train()
        self._params = [
            p for target in self.lora.values() for m in target for p in (m.lora_A, m.lora_B)
        ]
        self._data = data
        examples = jax.device_get(data.examples)
        self._tokens = torch.from_numpy(np.array(examples["tokens"], np.int64)).to(self.device)
        self._loss_mask = torch.from_numpy(np.array(examples["loss_mask"], np.float32)).to(
            self.device
        )
        self._counts = np.asarray(data.client_count)
        self._draw = _make_batch_draw(schedule)

    # -------------------------------------------------------------------- params
    def lora_from_jax(self, lora: Mapping[str, Mapping[str, Any]]) -> list[torch.Tensor]:
        """Global LoRA params in our layout (``a`` ``[L, d_in, r]``, ``b`` ``[L, r, d_out]``) as
        this loop's global state: one tensor per LoRA parameter, in `parameters` order."""
        lora = jax.device_get(lora)
        tensors = []
        for target, layers in self.lora.items():
            a = np.asarray(lora[target]["a"], np.float32)
            b = np.asarray(lora[target]["b"], np.float32)
            for layer in range(len(layers)):
                for value in (a[layer].T, b[layer].T):  # lora_A, lora_B
                    tensors.append(torch.from_numpy(np.array(value, order="C")).to(self.device))
        return tensors

    def lora_to_jax(self, global_lora: Sequence[torch.Tensor]) -> dict[str, dict[str, np.ndarray]]:
        """This loop's global state back in our layout (float32 numpy)."""
        out, i = {}, 0
        for target, layers in self.lora.items():
            a, b = [], []
            for _ in layers:
                a.append(global_lora[i].detach().cpu().numpy().T)
                b.append(global_lora[i + 1].detach().cpu().numpy().T)
                i += 2
            out[target] = {"a": np.stack(a), "b": np.stack(b)}
        return out

    # -------------------------------------------------------------------- round
    def draw_batches(
        self, cohort: Cohort, round_key: jax.Array
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The participating clients and their batches, exactly as the compiled round draws them.

        Returns:
          ``(slots, indices [n, K, B], example_mask [n, K, B], step_mask [n, K])`` for the
          ``n`` participating slots (their positions in the cohort).
        """
        slots = np.flatnonzero(np.asarray(cohort.participating))
        ids = np.asarray(cohort.client_ids)[slots].astype(np.int32)
        starts = np.asarray(self._data.client_start)[ids]
        counts = self._counts[ids]
        indices, example_mask, step_mask = jax.device_get(
            self._draw(round_key, jnp.asarray(ids), jnp.asarray(starts), jnp.asarray(counts))
        )
        return slots, indices, example_mask, step_mask

    def __call__(
        self,
        global_lora: list[torch.Tensor],
        cohort: Cohort,
        round_key: jax.Array,
        client_lr: float,
    ) -> TorchRoundOutput:
        """Runs one round, updating ``global_lora`` in place.

        Args:
          global_lora: the global LoRA params (`lora_from_jax`), updated in place.
          cohort: the round's clients (padding slots and lost uploads contribute nothing).
          round_key: the round's key (the compiled round's ``round_key``).
          client_lr: the local SGD learning rate.

        Returns:
          The `TorchRoundOutput`.
        """
        slots, indices, example_mask, step_mask = self.draw_batches(cohort, round_key)
        delivered = np.asarray(cohort.delivered)[slots] & np.asarray(cohort.participating)[slots]
        ids = np.asarray(cohort.client_ids)[slots]
        indices_t = torch.from_numpy(indices.astype(np.int64)).to(self.device)
        example_t = torch.from_numpy(example_mask.astype(np.float32)).to(self.device)
        vocab = self.config.vocab_size
        autocast = self.autocast_dtype is not None
        with torch.no_grad():
            sums = [torch.zeros_like(g) for g in global_lora]
        loss_sum = torch.zeros((), device=self.device)
        loss_weight = torch.zeros((), device=self.device)
        weights = np.zeros(len(np.asarray(cohort.client_ids)), np.float32)
        total_weight = 0.0
        for n, slot in enumerate(slots):
            with torch.no_grad():
                for param, value in zip(self._params, global_lora, strict=True):
                    param.copy_(value)
            optimizer = torch.optim.SGD(self._params, lr=client_lr)
            steps = 0
            for k in range(indices.shape[1]):
                if not step_mask[n, k]:
                    continue
                rows = indices_t[n, k]
                tokens = self._tokens[rows]
                weight = self._loss_mask[rows][:, 1:] * example_t[n, k][:, None]
                with torch.autocast(self.device.type, self.autocast_dtype, enabled=autocast):
                    logits = self.model(input_ids=tokens, use_cache=False).logits
                ce = F.cross_entropy(
                    logits[:, :-1].float().reshape(-1, vocab),
                    tokens[:, 1:].reshape(-1),
                    reduction="none",
                ).view_as(weight)
                step_sum = (ce * weight).sum()
                step_weight = weight.sum()
                loss = step_sum / step_weight.clamp_min(1.0)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += step_sum.detach()
                loss_weight += step_weight
                steps += 1
            client_weight = float(self._counts[ids[n]]) if steps and delivered[n] else 0.0
            weights[slot] = client_weight
            if client_weight > 0:
                total_weight += client_weight
                with torch.no_grad():
                    for total, param, value in zip(sums, self._params, global_lora, strict=True):
                        total.add_(param - value, alpha=client_weight)
        with torch.no_grad():
            if total_weight > 0:
                for value, total in zip(global_lora, sums, strict=True):
                    value.add_(total / total_weight)
        # The round's one read of device values (it also waits for the device to finish).
        train_loss = float((loss_sum / loss_weight.clamp_min(1.0)).item())
        return TorchRoundOutput(train_loss, weights)
