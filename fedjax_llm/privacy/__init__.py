"""Differential privacy for federated training: the mechanisms as pieces of the round
(`mechanisms`), a run's resolved plan and accountant (`plan`), accounting with `dp_accounting`
(`accounting`) and empirical audits (`audit`).

`accounting` and `audit` do not import JAX themselves (numpy, scipy and `dp_accounting`).
"""

from fedjax_llm.privacy.accounting import (
    PrivacyAccountant,
    SamplingPlan,
    adaptive_clipping_noise,
    compute_epsilon,
    default_delta,
    make_accountant,
    make_dp_event,
    noise_multiplier_for_epsilon,
    plan_for_sampler,
    sample_level_epsilon,
    validate_delta,
)
from fedjax_llm.privacy.audit import (
    CanaryAudit,
    canary_audit,
    epsilon_lower_bound,
    membership_inference,
    one_run_p_value,
)
from fedjax_llm.privacy.mechanisms import adaptive_clip, dp_mean, dp_sgd_objective
from fedjax_llm.privacy.plan import PrivacyPlan, RunPrivacy, example_exposure, make_privacy_plan

__all__ = [
    "CanaryAudit",
    "PrivacyAccountant",
    "PrivacyPlan",
    "RunPrivacy",
    "adaptive_clip",
    "dp_mean",
    "dp_sgd_objective",
    "example_exposure",
    "make_privacy_plan",
    "SamplingPlan",
    "adaptive_clipping_noise",
    "canary_audit",
    "compute_epsilon",
    "default_delta",
    "epsilon_lower_bound",
    "make_accountant",
    "make_dp_event",
    "membership_inference",
    "noise_multiplier_for_epsilon",
    "one_run_p_value",
    "plan_for_sampler",
    "sample_level_epsilon",
    "validate_delta",
]
