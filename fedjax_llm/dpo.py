"""Direct Preference Optimization: the objective of federated alignment tuning.

Each example is a preference pair rendered with the chat template: token rows ``chosen`` and
``rejected`` ``[B, T]`` (the same prompt, then each response) whose masks ``chosen_mask`` /
``rejected_mask`` select the response targets (position t is 1 where token t is predicted, the
convention of ``loss_mask``). The policy is the model with what clients train (LoRA, soft
prompt or prefix); the reference is the same frozen base with that part switched off
(``Trainable.apply(..., adapter=False)``), so it costs a forward pass and no second copy of the
weights. After a ``trainable.base_run`` the base already holds the earlier stages (pre-training,
a merged instruction-tuning adapter), so the reference is the model DPO starts from.

With ``h = [log pi(y_w|x) - log ref(y_w|x)] - [log pi(y_l|x) - log ref(y_l|x)]``:

- ``sigmoid`` (Rafailov et al. 2023): ``-log sigmoid(beta * h)``;
- ``ipo`` (Azar et al. 2023): ``(h - 1 / (2 beta))^2`` with the log-probabilities averaged over
  each response's tokens, as TRL computes it.

Rewards are ``beta`` times each response's summed log-ratio to the reference; a pair counts as
correct when the chosen reward is strictly larger (TRL's convention: at the start, when the
policy equals the reference, no pair is correct).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from fedjax_llm.objectives import LOSS_SUM, LOSS_WEIGHT, Objective, next_token_losses

DPO_LOSSES = ("sigmoid", "ipo")
PREFERENCE_FIELDS = ("chosen", "chosen_mask", "rejected", "rejected_mask")
REWARD_METRICS = ("reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward")
"""The per-pair metrics DPO reports (as means over pairs, see `Objective.means`)."""


def _response_logp(apply_fn: Callable, frozen, params, tokens, mask, **kwargs) -> jax.Array:
    """``[B]`` summed log-probabilities of the tokens ``mask`` selects (position t predicted
    from position t - 1); fused with the output projection where ``apply_fn`` allows it."""
    ce = next_token_losses(apply_fn, frozen, params, tokens, **kwargs)
    return -jnp.sum(ce * mask[:, 1:], axis=-1)


def dpo_loss(apply_fn: Callable, beta: float = 0.1, loss_type: str = "sigmoid") -> Objective:
    """The DPO objective over preference pairs.

    Args:
      apply_fn: ``Trainable.apply``: ``(frozen, params, tokens, adapter=True) -> logits``;
        ``adapter=False`` must run the reference (the frozen base alone).
      beta: the inverse temperature (strength of the pull toward the reference), > 0.
      loss_type: ``sigmoid`` (DPO) or ``ipo``.

    Returns:
      The `Objective` over `PREFERENCE_FIELDS`. Metric sums: ``loss_sum``, ``loss_weight``
      (pairs) and `REWARD_METRICS` (reported per pair).

    Raises:
      ValueError: for a non-positive beta or an unknown loss type.

    References:
      Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a
      Reward Model"; Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning
      from Human Preferences" (IPO).
    """
    if not beta > 0:
        raise ValueError(f"dpo.beta must be > 0, got {beta!r}.")
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"dpo.loss={loss_type!r}; valid choices: {list(DPO_LOSSES)}.")

    def loss(frozen, params, batch, key):
        del key  # the model has no dropout
        # Chosen and rejected rows go through each model as one batch.
        tokens = jnp.concatenate([batch["chosen"], batch["rejected"]])
        mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
        policy = _response_logp(apply_fn, frozen, params, tokens, mask)
        reference = jax.lax.stop_gradient(
            _response_logp(apply_fn, frozen, params, tokens, mask, adapter=False)
        )
        ratio = policy - reference  # [2B] summed log-ratios
        chosen, rejected = jnp.split(ratio, 2)
        if loss_type == "sigmoid":
            per_pair = -jax.nn.log_sigmoid(beta * (chosen - rejected))
        else:
            lengths = jnp.maximum(jnp.sum(mask[:, 1:], axis=-1), 1.0)
            chosen_avg, rejected_avg = jnp.split(ratio / lengths, 2)
            per_pair = jnp.square(chosen_avg - rejected_avg - 1.0 / (2.0 * beta))
        chosen_reward, rejected_reward = beta * chosen, beta * rejected
        weight = batch["example_weight"]
        pairs = jnp.sum(weight)
        loss_sum = jnp.sum(weight * per_pair)
        metrics = {
            LOSS_SUM: loss_sum,
            LOSS_WEIGHT: pairs,
            "reward_accuracy": jnp.sum(weight * (chosen_reward > rejected_reward)),
            "reward_margin": jnp.sum(weight * (chosen_reward - rejected_reward)),
            "chosen_reward": jnp.sum(weight * chosen_reward),
            "rejected_reward": jnp.sum(weight * rejected_reward),
        }
        return loss_sum / jnp.maximum(pairs, 1.0), metrics

    return Objective(loss, PREFERENCE_FIELDS, REWARD_METRICS)
