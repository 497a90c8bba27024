"""Private runs end to end: epsilon after every round from the accountant, resume, the budget
stop, sample-level DP-SGD accounting and the refusals of what cannot be accounted for."""

from __future__ import annotations

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_llm import ConfigError, Simulation
from fedjax_llm.privacy.accounting import SamplingPlan, compute_epsilon, sample_level_epsilon
from fedjax_llm.privacy.plan import example_exposure
from fedjax_llm.round import LocalSchedule, client_batch_indices

POPULATION = 8  # tiny_config's clients
DELTA = 1 / POPULATION**1.1  # the default delta


def private(make_config, **sections):
    privacy = {"level": "client", "noise_multiplier": 1.0, **sections.pop("privacy", {})}
    sampling = {"kind": "poisson", **sections.pop("sampling", {})}
    return make_config(privacy=privacy, sampling=sampling, **sections)


def epsilons(history):
    return [h["privacy/epsilon"] for h in history if "privacy/epsilon" in h]


def test_epsilon_after_every_round_is_the_accountants(make_config):
    config = private(make_config, run={"num_rounds": 3})
    history = Simulation(config, verbose=False).run()
    plan = SamplingPlan("poisson", POPULATION, 4)
    want = [compute_epsilon(1.0, plan, r, DELTA, "rdp") for r in (1, 2, 3)]
    np.testing.assert_allclose(epsilons(history), want, rtol=1e-9)
    summary = json.load(open(os.path.join(config.run.output_dir, "summary.json")))
    assert summary["privacy"]["epsilon"] == pytest.approx(want[-1])
    assert summary["privacy"]["delta"] == pytest.approx(DELTA)
    # Every record of the pipeline reports the noise it added and the clip it used.
    assert history[-1]["pipeline/dp/noise_stddev"] == pytest.approx(1.0)


@pytest.mark.parametrize("algorithm", [{"type": "fedadam"}, {"type": "scaffold"}])
def test_any_algorithm_becomes_its_dp_version(make_config, algorithm):
    client = {"optimizer": "sgd", "lr": 0.5} if algorithm["type"] == "scaffold" else {}
    config = private(
        make_config,
        algorithm=algorithm,
        client=client,
        privacy={"clip_norm": 0.05},
        run={"num_rounds": 1},
        eval={"every": 0},
    )
    history = Simulation(config, verbose=False).run()
    assert len(epsilons(history)) == 1
    # Every delivered client's whole upload was clipped (SCAFFOLD's control delta included).
    assert history[-1]["pipeline/clip/clipped"] == history[-1]["participants"]


def test_a_resumed_run_reports_the_same_epsilon_and_state(make_config, tmp_path):
    whole = private(make_config, run={"num_rounds": 4})
    whole_sim = Simulation(whole, verbose=False)
    whole_history = whole_sim.run()
    split = private(make_config, run={"num_rounds": 4, "stop_after": 2, "checkpoint_every": 1})
    Simulation(split, verbose=False).run()
    resumed = private(
        make_config,
        run={
            "num_rounds": 4,
            "resume": True,
            "checkpoint_every": 1,
            "output_dir": split.run.output_dir,
        },
    )
    resumed_sim = Simulation(resumed, verbose=False)
    resumed_history = resumed_sim.run()
    np.testing.assert_allclose(epsilons(resumed_history), epsilons(whole_history), rtol=1e-12)
    chex.assert_trees_all_close(resumed_sim.params, whole_sim.params, rtol=1e-6, atol=1e-7)


def test_a_run_stops_with_a_checkpoint_before_exceeding_its_budget(make_config):
    plan = SamplingPlan("poisson", POPULATION, 4)
    budget = compute_epsilon(1.0, plan, 2, DELTA, "rdp") * 1.001  # room for 2 rounds only
    config = private(
        make_config, privacy={"max_epsilon": budget}, run={"num_rounds": 5, "checkpoint_every": 0}
    )
    sim = Simulation(config, verbose=False)
    history = sim.run()
    assert epsilons(history) == pytest.approx(
        [compute_epsilon(1.0, plan, r, DELTA, "rdp") for r in (1, 2)]
    )
    assert max(epsilons(history)) <= budget
    assert sim.checkpointer.rounds() == [2]
    summary = json.load(open(os.path.join(config.run.output_dir, "summary.json")))
    assert "privacy budget reached" in summary["privacy"]["stopped_by_budget"]
    assert "stopped after 2 rounds" in summary["privacy"]["stopped_by_budget"]


def test_target_epsilon_solves_the_noise_and_is_met(make_config):
    config = private(
        make_config,
        privacy={"noise_multiplier": None, "target_epsilon": 6.0},
        run={"num_rounds": 3},
    )
    sim = Simulation(config, verbose=False)
    history = sim.run()
    final = epsilons(history)[-1]
    assert 6.0 * 0.99 <= final <= 6.0  # met, and not wastefully
    assert sim.privacy_plan.noise_multiplier > 0
    assert sim.stopped_by_budget is None


def test_adaptive_clipping_runs_and_is_charged(make_config):
    config = private(
        make_config,
        privacy={"adaptive_clipping": True, "clipped_count_stddev": 1.0, "clip_norm": 0.1},
        run={"num_rounds": 3},
    )
    sim = Simulation(config, verbose=False)
    history = sim.run()
    plan = sim.privacy_plan
    # The update's noise multiplier is raised so that both releases cost the configured z.
    assert plan.update_noise_multiplier > plan.noise_multiplier == 1.0
    assert history[-1]["pipeline/dp/noise_stddev"] == pytest.approx(
        plan.update_noise_multiplier * history[-1]["pipeline/dp/clip_norm"], rel=1e-5
    )
    clips = [h["pipeline/dp/clip_norm"] for h in history if "pipeline/dp/clip_norm" in h]
    assert clips[0] == pytest.approx(0.1) and clips[-1] != clips[0]


# ------------------------------------------------------------------------------ sample level
@pytest.mark.parametrize(
    "count,steps,batch,epochs",
    [(3, 4, 2, None), (12, 2, 4, None), (5, 3, 4, 2.0), (2, 2, 3, None), (7, 5, 3, 1.5)],
)
def test_example_exposure_counts_what_the_round_draws(count, steps, batch, epochs):
    """The exposure formula against the round's own batch drawing: the worst example's sum over
    steps of (times used in the step)^2."""
    schedule = LocalSchedule(steps, batch, max_client_examples=16, local_epochs=epochs)
    worst = 0
    for seed in range(5):
        indices, example_mask, _ = client_batch_indices(
            jax.random.key(seed), jnp.int32(0), jnp.int32(count), schedule
        )
        indices, used = np.asarray(indices), np.asarray(example_mask) > 0
        for example in range(count):
            per_step = np.sum((indices == example) & used, axis=1)
            worst = max(worst, int(np.sum(per_step**2)))
    assert example_exposure(count, steps, batch, epochs, 16) == worst


def test_sample_level_epsilon_is_the_worst_clients(make_config):
    config = make_config(
        privacy={"level": "sample", "noise_multiplier": 2.0, "clip_norm": 1.0},
        run={"num_rounds": 2},
        eval={"every": 0},
    )
    sim = Simulation(config, verbose=False)
    history = sim.run()
    exposure = sim.privacy_plan.exposure
    participations = np.zeros(POPULATION, int)
    want = []
    for r in range(2):
        participations[sim.sampler.sample(r)] += 1
        compositions = int(np.max(participations * exposure))
        want.append(sample_level_epsilon(2.0, compositions, sim.privacy_plan.delta, "rdp"))
    np.testing.assert_allclose(epsilons(history), want, rtol=1e-9)
    assert all(np.isfinite([h["train_loss"] for h in history if "train_loss" in h]))


# ------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "sections,needle",
    [
        ({"privacy": {"level": "client"}}, "privacy.noise_multiplier"),
        ({"privacy": {"level": "client", "noise_multiplier": -1.0}}, "privacy.noise_multiplier"),
        (
            {"privacy": {"level": "client", "noise_multiplier": 1.0, "clip_norm": 0.0}},
            "privacy.clip_norm",
        ),
        ({"privacy": {"level": "client", "noise_multiplier": 1.0, "delta": 1.5}}, "privacy.delta"),
        ({"privacy": {"level": "client", "noise_multiplier": 1.0, "delta": 0.5}}, "delta"),
        (
            {"privacy": {"level": "client", "target_epsilon": 1e-8, "delta": 1e-5}},
            "privacy.target_epsilon",
        ),
        (
            {
                "privacy": {"level": "client", "noise_multiplier": 1.0},
                "sampling": {"kind": "availability", "availability": 0.5},
            },
            "availability",
        ),
        (
            {"privacy": {"level": "client", "noise_multiplier": 1.0, "accountant": "pld"}},
            "privacy.accountant=pld",
        ),
        (
            {
                "privacy": {"level": "client", "noise_multiplier": 1.0},
                "aggregation": {"aggregator": "median"},
            },
            "aggregation.aggregator",
        ),
        (
            {"privacy": {"level": "sample", "noise_multiplier": 1.0, "adaptive_clipping": True}},
            "privacy.adaptive_clipping",
        ),
        ({"privacy": {"target_epsilon": 3.0}}, "privacy.level"),
        (
            {"privacy": {"level": "client", "noise_multiplier": 0.01, "max_epsilon": 1.0}},
            "single round",
        ),
        ({"byzantine": {"fraction": 0.25}}, "byzantine.attack"),
        (
            {
                "byzantine": {"fraction": 0.25, "attack": "sign_flip"},
                "aggregation": {"aggregator": "krum"},
            },
            "n > 2f + 2",
        ),
        (
            {
                "byzantine": {"fraction": 0.5, "attack": "sign_flip"},
                "aggregation": {"aggregator": "trimmed_mean", "trim_fraction": 0.25},
            },
            "cannot tolerate",
        ),
        (
            {"secure_aggregation": {"enabled": True}, "aggregation": {"aggregator": "median"}},
            "secure_aggregation",
        ),
    ],
)
def test_what_cannot_be_run_or_accounted_is_refused_before_training(make_config, sections, needle):
    with pytest.raises(ConfigError, match=None) as err:
        Simulation(make_config(**sections), verbose=False)
    message = str(err.value)
    assert needle in message, message
    assert "\n" not in message


# ------------------------------------------------------------------------------- audits
def audit_config(make_config, z: float):
    return private(
        make_config,
        # delta well below 1 / canaries: the one-run bound pays 2 m delta (Steinke et al.).
        privacy={"noise_multiplier": z, "audit_canaries": 200, "clip_norm": 0.5, "delta": 1e-6},
        run={"num_rounds": 4, "num_clients_per_round": 150},
        eval={"every": 0},
    )


@pytest.mark.slow
def test_the_canary_audit_is_sound_and_flags_a_weakened_mechanism(make_config):
    """With the noise the accountant is told about, the audit's lower bound stays below the
    accountant's epsilon; with a tenth of it (the accountant not told), it exceeds it."""
    sound = Simulation(audit_config(make_config, 6.0), verbose=False)
    sound.run()
    claimed = sound.privacy.epsilon()
    assert 1.0 < claimed < 1.5
    assert sound.audit["canaries"]["epsilon_lower_bound"] < claimed
    # The canaries took part: 200 extra clients, included ones sampled, excluded ones never.
    excluded = set(sound.canaries.excluded_ids.tolist())
    for r in range(4):
        ids = set(np.asarray(sound.cohort(r).client_ids)[sound.cohort(r).participating].tolist())
        assert not ids & excluded
    weakened = Simulation(audit_config(make_config, 6.0), verbose=False)
    weakened._hyperparam_defaults["dp_noise_multiplier"] /= 10  # what a bug would do
    weakened.run()
    assert weakened.privacy.epsilon() == pytest.approx(claimed)  # the accountant is fooled
    assert weakened.audit["canaries"]["epsilon_lower_bound"] > claimed
    written = json.load(open(os.path.join(weakened.run_dir, "privacy_audit.json")))
    assert written["canaries"]["epsilon_lower_bound"] > written["accountant_epsilon"]


def test_held_out_clients_are_never_sampled_and_attacked(make_config):
    config = make_config(
        privacy={"audit_holdout_clients": 4},
        data={"num_clients": 12},
        run={"num_rounds": 2, "num_clients_per_round": 6},
    )
    sim = Simulation(config, verbose=False)
    sim.run()
    held_out = set(sim.holdout.excluded_ids.tolist())
    assert held_out and len(held_out) < 4 or len(held_out) == 4
    for r in range(2):
        cohort = sim.cohort(r)
        assert not set(np.asarray(cohort.client_ids)[cohort.participating].tolist()) & held_out
    attack = sim.audit["membership_inference"]
    assert attack["clients_in"] + attack["clients_out"] == 4
    assert 0.0 <= attack["auc"] <= 1.0


def test_a_schedule_may_not_change_the_noise_of_a_private_run(make_config):
    sim = Simulation(
        private(make_config),
        verbose=False,
        hyperparam_schedule=lambda r: {"dp_noise_multiplier": 0.1},
    )
    with pytest.raises(ConfigError, match="accountant"):
        sim.hyperparams(0)
