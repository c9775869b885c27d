"""Open Bandit Dataset reader and the Bernoulli-TS action distribution, checked against obp."""
from __future__ import annotations

import numpy as np
import pytest

from simulators.obd import CAMPAIGNS, POLICIES, bts_action_dist, load_obd, obd_data_dir, zozotown_prior

N_ACTIONS = {"all": 80, "men": 34, "women": 46}


@pytest.mark.parametrize("campaign", CAMPAIGNS)
@pytest.mark.parametrize("policy", POLICIES)
def test_load_shapes_and_ranges(campaign, policy):
    log = load_obd(campaign, policy)
    n = log.n_rounds
    assert n == 10_000
    assert log.n_actions == N_ACTIONS[campaign]
    assert log.action.shape == log.position.shape == log.reward.shape == log.pscore.shape == (n,)
    assert log.user_features.shape == (n, 4)
    assert log.user_item_affinity.shape == (n, log.n_actions)
    assert log.item_feature_numeric.shape == (log.n_actions,)
    assert log.item_features_categorical.shape == (log.n_actions, 3)
    assert set(np.unique(log.position)) == {0, 1, 2}
    assert set(np.unique(log.reward)) <= {0, 1}
    assert 0 <= log.action.min() and log.action.max() < log.n_actions
    assert np.all((log.pscore > 0) & (log.pscore <= 1))
    assert np.all(np.diff(log.timestamp) >= 0)
    if policy == "random":
        assert np.allclose(log.pscore, 1.0 / log.n_actions)


def test_arrays_match_a_pandas_read_like_obps():
    """obp's loader: read_csv, sort by timestamp, dense-rank positions."""
    pd = pytest.importorskip("pandas")
    log = load_obd("men", "bts")
    df = pd.read_csv(obd_data_dir() / "bts" / "men" / "men.csv", index_col=0)
    df = df.sort_values("timestamp", kind="stable")
    assert np.array_equal(log.action, df["item_id"].to_numpy())
    assert np.array_equal(log.reward, df["click"].to_numpy())
    assert np.array_equal(log.pscore, df["propensity_score"].to_numpy())
    assert np.array_equal(log.position, df["position"].rank(method="dense").to_numpy().astype(int) - 1)
    assert log.on_policy_value() == pytest.approx(df["click"].mean())


def test_arrays_are_read_only_and_cached():
    a = load_obd("all", "random")
    assert load_obd("all", "random") is a
    with pytest.raises(ValueError):
        a.reward[0] = 1


def test_prior_equals_obps_file():
    yaml = pytest.importorskip("yaml")
    with open(obd_data_dir().parent.parent / "policy" / "conf" / "prior_bts.yaml", "rb") as f:
        theirs = yaml.safe_load(f)
    for campaign in CAMPAIGNS:
        alpha, beta = zozotown_prior(campaign)
        assert np.array_equal(alpha, np.array(theirs[campaign]["alpha"], dtype=float))
        assert np.array_equal(beta, np.array(theirs[campaign]["beta"], dtype=float))


@pytest.mark.parametrize("campaign", CAMPAIGNS)
def test_bts_action_dist_equals_obp(campaign):
    policy_mod = pytest.importorskip("obp.policy")
    n_actions = N_ACTIONS[campaign]
    ours = bts_action_dist(campaign, n_rounds=3, n_sim=2000, random_state=5, chunk_size=700)
    bts = policy_mod.BernoulliTS(n_actions=n_actions, len_list=3, is_zozotown_prior=True,
                                 campaign=campaign, random_state=5)
    theirs = bts.compute_batch_action_dist(n_rounds=3, n_sim=2000)
    assert ours.shape == theirs.shape == (3, n_actions, 3)
    assert np.abs(ours - theirs).max() <= 1e-12
    assert np.allclose(ours.sum(axis=1), 1.0)


def test_bts_action_dist_does_not_depend_on_chunking():
    a = bts_action_dist("women", n_sim=1500, random_state=2, chunk_size=1500)
    b = bts_action_dist("women", n_sim=1500, random_state=2, chunk_size=64)
    assert np.array_equal(a, b)


def test_bad_arguments():
    with pytest.raises(ValueError, match="campaign must be one of"):
        load_obd("kids")
    with pytest.raises(ValueError, match="policy must be one of"):
        load_obd("all", "greedy")
    with pytest.raises(ValueError, match="n_sim must be > 0, but -3 is given"):
        bts_action_dist("all", n_sim=-3)
