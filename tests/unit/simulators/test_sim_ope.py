"""Off-policy estimators: agreement with Open Bandit Pipeline, intervals, validation."""
from __future__ import annotations

import numpy as np
import pytest

from simulators.obd import bts_action_dist, load_obd
from simulators.ope import (
    bootstrap_ci,
    estimate_dr,
    estimate_ips,
    estimate_replay,
    estimate_snips,
    position_item_reward_model,
)

obp_ope = pytest.importorskip("obp.ope")
obp_utils = pytest.importorskip("obp.utils")


@pytest.fixture(scope="module")
def logged():
    """Seeded synthetic logs: 10 actions, 3 positions, non-uniform propensities."""
    rng = np.random.default_rng(7)
    n, n_actions, len_list = 3000, 10, 3
    action = rng.integers(0, n_actions, size=n)
    position = rng.integers(0, len_list, size=n)
    pscore = rng.uniform(0.05, 0.3, size=n)
    reward = (rng.random(n) < 0.1 + 0.05 * (action % 3)).astype(np.int64)
    action_dist = rng.dirichlet(np.ones(n_actions), size=(n, len_list)).transpose(0, 2, 1)  # (n, A, L)
    q_hat = rng.uniform(0.0, 0.3, size=(n, n_actions, len_list))
    return dict(reward=reward, action=action, position=position, pscore=pscore,
                action_dist=action_dist, q_hat=q_hat)


def test_ips_snips_dr_equal_obp(logged):
    d = logged
    common = dict(reward=d["reward"], action=d["action"], position=d["position"], pscore=d["pscore"],
                  action_dist=d["action_dist"])
    ours = {
        "ips": estimate_ips(d["reward"], d["action"], d["pscore"], d["action_dist"], d["position"]).estimate,
        "snips": estimate_snips(d["reward"], d["action"], d["pscore"], d["action_dist"], d["position"]).estimate,
        "dr": estimate_dr(d["reward"], d["action"], d["pscore"], d["action_dist"], d["q_hat"],
                          d["position"]).estimate,
    }
    theirs = {
        "ips": obp_ope.InverseProbabilityWeighting().estimate_policy_value(**common),
        "snips": obp_ope.SelfNormalizedInverseProbabilityWeighting().estimate_policy_value(**common),
        "dr": obp_ope.DoublyRobust().estimate_policy_value(**common, estimated_rewards_by_reg_model=d["q_hat"]),
    }
    for name in ours:
        assert abs(ours[name] - theirs[name]) <= 1e-9, name
    # The three estimators really differ on these inputs (the check is not vacuous).
    assert len({round(v, 6) for v in ours.values()}) == 3


def test_replay_equals_obp_for_a_deterministic_policy(logged):
    d = logged
    n, n_actions, len_list = d["action_dist"].shape
    greedy = np.zeros_like(d["action_dist"])
    best = d["q_hat"].argmax(axis=1)  # (n, L)
    for pos in range(len_list):
        greedy[np.arange(n), best[:, pos], pos] = 1.0
    ours = estimate_replay(d["reward"], d["action"], greedy, d["position"])
    theirs = obp_ope.ReplayMethod().estimate_policy_value(
        reward=d["reward"], action=d["action"], action_dist=greedy, position=d["position"])
    assert abs(ours.estimate - theirs) <= 1e-9
    match = greedy[np.arange(n), d["action"], d["position"]] == 1
    assert ours.n == int(match.sum())


def test_bootstrap_interval_equals_obp(logged):
    d = logged
    ours = estimate_ips(d["reward"], d["action"], d["pscore"], d["action_dist"], d["position"],
                        ci="bootstrap", n_bootstrap_samples=300, random_state=11)
    theirs = obp_ope.InverseProbabilityWeighting().estimate_interval(
        reward=d["reward"], action=d["action"], position=d["position"], pscore=d["pscore"],
        action_dist=d["action_dist"], n_bootstrap_samples=300, random_state=11)
    assert abs(ours.ci_low - theirs["95.0% CI (lower)"]) <= 1e-9
    assert abs(ours.ci_high - theirs["95.0% CI (upper)"]) <= 1e-9


def test_estimators_equal_obp_on_open_bandit_dataset():
    log = load_obd("all", "random")
    action_dist = bts_action_dist("all", n_rounds=log.n_rounds, n_sim=5000, random_state=1)
    q_table = position_item_reward_model(log.reward, log.action, log.position, log.n_actions, log.len_list)
    q_hat = np.ascontiguousarray(np.broadcast_to(q_table, action_dist.shape))
    args = dict(reward=log.reward, action=log.action, position=log.position, pscore=log.pscore,
                action_dist=action_dist)
    pairs = [
        (estimate_ips(log.reward, log.action, log.pscore, action_dist, log.position).estimate,
         obp_ope.InverseProbabilityWeighting().estimate_policy_value(**args)),
        (estimate_snips(log.reward, log.action, log.pscore, action_dist, log.position).estimate,
         obp_ope.SelfNormalizedInverseProbabilityWeighting().estimate_policy_value(**args)),
        (estimate_dr(log.reward, log.action, log.pscore, action_dist, q_hat, log.position).estimate,
         obp_ope.DoublyRobust().estimate_policy_value(**args, estimated_rewards_by_reg_model=q_hat)),
    ]
    for ours, theirs in pairs:
        assert abs(ours - theirs) <= 1e-9


def test_normal_interval_covers_the_true_value():
    """IPS with a known policy value: the 95% interval covers it in about 95% of seeded runs."""
    n_runs, n, n_actions = 300, 400, 4
    true_ctr = np.array([0.1, 0.2, 0.3, 0.4])
    pi_e = np.array([0.1, 0.1, 0.2, 0.6])
    truth = float(pi_e @ true_ctr)
    covered = 0
    for seed in range(n_runs):
        rng = np.random.default_rng(seed)
        action = rng.integers(0, n_actions, size=n)
        reward = (rng.random(n) < true_ctr[action]).astype(float)
        dist = np.broadcast_to(pi_e[None, :, None], (n, n_actions, 1))
        est = estimate_ips(reward, action, np.full(n, 1 / n_actions), dist)
        covered += est.ci_low <= truth <= est.ci_high
    # Binomial(300, 0.95) has sd 1.3%; 0.90 is more than 3 sd below the nominal level.
    assert covered / n_runs >= 0.90


def test_snips_and_replay_have_finite_intervals(logged):
    d = logged
    s = estimate_snips(d["reward"], d["action"], d["pscore"], d["action_dist"], d["position"])
    r = estimate_replay(d["reward"], d["action"], d["action_dist"], d["position"], random_state=3)
    for est in (s, r):
        assert est.ci_low < est.estimate < est.ci_high
        assert np.isfinite(est.std_err) and est.std_err > 0
    # Stochastic replay is seeded: the same seed accepts the same rounds.
    again = estimate_replay(d["reward"], d["action"], d["action_dist"], d["position"], random_state=3)
    assert again == r


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(alpha=1.5), "alpha must be in (0, 1), but 1.5 is given"),
        (dict(ci="jackknife"), "ci must be one of"),
    ],
)
def test_bad_arguments_raise_value_error(logged, kwargs, message):
    d = logged
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        estimate_ips(d["reward"], d["action"], d["pscore"], d["action_dist"], d["position"], **kwargs)


def test_bad_inputs_raise_value_error(logged):
    d = logged
    with pytest.raises(ValueError, match="pscore must be > 0"):
        estimate_ips(d["reward"], d["action"], np.zeros_like(d["pscore"]), d["action_dist"], d["position"])
    with pytest.raises(ValueError, match="position must be given"):
        estimate_ips(d["reward"], d["action"], d["pscore"], d["action_dist"])
    with pytest.raises(ValueError, match="same number of rounds"):
        estimate_ips(d["reward"][:-1], d["action"], d["pscore"], d["action_dist"], d["position"])
    with pytest.raises(ValueError, match="n_bootstrap_samples must be > 0, but -3 is given"):
        bootstrap_ci(np.ones(5), n_bootstrap_samples=-3)


def test_position_item_reward_model_shrinks_towards_position_mean():
    reward = np.array([1, 0, 0, 0, 1])
    action = np.array([0, 0, 1, 1, 2])
    position = np.array([0, 0, 0, 0, 1])
    q = position_item_reward_model(reward, action, position, n_actions=3, len_list=2, prior_strength=2.0)
    assert q.shape == (3, 2)
    pos0_mean = 1 / 4
    assert q[0, 0] == pytest.approx((1 + 2 * pos0_mean) / (2 + 2))
    assert q[1, 0] == pytest.approx((0 + 2 * pos0_mean) / (2 + 2))
    assert q[2, 0] == pytest.approx(pos0_mean)  # never shown: the prior


def test_replay_interval_without_clicks_is_not_a_point():
    n = 400
    action = np.arange(n) % 4
    dist = np.zeros((n, 4, 1))
    dist[:, 0, 0] = 1.0
    est = estimate_replay(np.zeros(n), action, dist)
    assert est.estimate == 0.0 and est.n == 100
    assert est.ci_low == 0.0 and 0.02 < est.ci_high < 0.05  # Wilson: about 3.7% for 0 of 100
