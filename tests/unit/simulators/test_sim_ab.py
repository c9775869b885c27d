"""The A/B runner: A/A false positives, a planted lift, reproducibility, events, the report."""
from __future__ import annotations

import json

import pytest

from em3.types import Click, Conversion, Impression
from simulators.ab import ABConfig, ABRunner
from simulators.rankers import OracleRanker, PopularityRanker, RandomRanker, Ranker, Ranking
from simulators.world import World, WorldConfig

SMALL = dict(n_users=300, n_items=200, horizon_s=86_400.0)


def _aa(seed: int, n_requests: int = 1200):
    world = World(WorldConfig(seed=seed, **SMALL))
    arms = {"a": RandomRanker("a", seed), "b": RandomRanker("b", seed + 1000)}
    cfg = ABConfig(n_requests=n_requests, seed=seed, check_every=50, min_samples=100)
    return ABRunner(world, arms, cfg).run()


@pytest.mark.slow  # seconds: out of the fast lane (scripts/test.sh --fast), in the full suite
def test_aa_runs_rarely_reject():
    """Ten seeded A/A experiments, looked at every 50 requests.

    At alpha = 0.05 the expected number of false positives is at most 0.5;
    P(Binomial(10, 0.05) >= 3) = 1.2%, so 3 or more would point to a broken test.
    (The many-run rate is checked in test_sim_sequential and benchmarks/ab_aa.py.)
    """
    rejections = sum(_aa(seed).tests["b"]["reject"] for seed in range(10))
    assert rejections <= 2


def test_planted_lift_is_detected_early():
    world = World(WorldConfig(seed=1, **SMALL))
    arms = {"random": RandomRanker("random", 1), "oracle": OracleRanker(world, noise=0.5, seed=2)}
    cfg = ABConfig(n_requests=6000, seed=1, check_every=100, stop_early=True, request_rate_per_s=1.0, min_samples=50)
    report = ABRunner(world, arms, cfg).run()
    test = report.tests["oracle"]
    assert test["verdict"] == "treatment_better"
    assert test["ci_low"] > 0 and test["p_value"] <= 0.05
    assert report.stop_reason == "evidence" and report.requests < 6000
    assert report.final["oracle"]["ctr"] > report.final["random"]["ctr"]


def test_stop_reason_says_why_the_run_ended():
    assert _aa(0, 200).stop_reason == "request_budget"
    world = World(WorldConfig(seed=0, **SMALL))
    calls = iter(range(10_000))
    budget = ABRunner(world, {"a": RandomRanker("a"), "b": RandomRanker("b", 1)},
                      ABConfig(n_requests=1000, check_every=50), should_stop=lambda: next(calls) >= 120).run()
    assert budget.stop_reason == "time_budget" and budget.requests == 120
    assert json.loads(budget.to_json())["stop_reason"] == "time_budget" and "stopped_early" not in budget.to_dict()


def test_same_seed_same_report():
    assert _aa(3, 400).to_json() == _aa(3, 400).to_json()
    assert _aa(3, 400).to_json() != _aa(4, 400).to_json()


class Recorder:
    """A learning ranker that records what it observes."""

    def __init__(self, arm: str) -> None:
        self.arm = arm
        self.inner = RandomRanker(arm, 0)
        self.seen: list = []
        self.weights: list = []

    def rank(self, user_id, candidates, context, k) -> Ranking:
        return self.inner.rank(user_id, candidates, context, k)

    def observe(self, events, weights=None) -> None:
        self.seen.extend(events)
        self.weights.extend([1.0] * len(events) if weights is None else weights)


class TopOnly(Recorder):
    """Shows only the first ``k`` candidates in id order: a narrow, fixed catalogue."""

    def rank(self, user_id, candidates, context, k) -> Ranking:
        return Ranking(tuple(sorted(candidates)[:k]), self.arm)


def test_pooled_and_weighted_learners_see_every_arm_weighted_by_how_their_arm_serves_the_item():
    world = World(WorldConfig(seed=3, **SMALL))
    pooled = {"a": Recorder("a"), "b": TopOnly("b")}
    ABRunner(world, pooled, ABConfig(n_requests=400, seed=3, k=5, check_every=100, training_data="pooled")).run()
    assert len(pooled["a"].seen) == len(pooled["b"].seen) and set(pooled["a"].weights) == {1.0}
    world = World(WorldConfig(seed=3, **SMALL))
    arms = {"a": Recorder("a"), "b": TopOnly("b")}
    ABRunner(world, arms, ABConfig(n_requests=400, seed=3, k=5, check_every=100, training_data="weighted")).run()
    b_items = {e.item_id for e in arms["b"].seen if isinstance(e, Impression) and e.arm == "b"}
    w_a = [w for e, w in zip(arms["a"].seen, arms["a"].weights) if isinstance(e, Impression)]
    items = [e.item_id for e in arms["a"].seen if isinstance(e, Impression)]
    only_a = [w for i, w in zip(items, w_a) if i not in b_items]
    only_b_for_a = [w for e, w in zip(arms["a"].seen, arms["a"].weights)
                    if isinstance(e, Impression) and e.arm == "b"]
    # The random arm rarely shows the narrow arm's items: for its learner they weigh little,
    # while its own spread-out items weigh more than 1.
    assert sum(only_b_for_a) / len(only_b_for_a) < 0.5 < 1.0 < sum(only_a) / len(only_a)


def test_events_reach_the_sink_in_time_order_and_learners_see_their_own_arm():
    world = World(WorldConfig(seed=2, **SMALL))
    a, b = Recorder("a"), Recorder("b")
    sink: list = []
    cfg = ABConfig(n_requests=600, seed=2, k=5, check_every=100)
    report = ABRunner(world, {"a": a, "b": b}, cfg, event_sink=sink.append).run()
    times = [e.served_at if isinstance(e, Impression) else e.clicked_at if isinstance(e, Click) else e.converted_at
             for e in sink]
    assert all(x <= y for x, y in zip(times, times[1:]))
    impressions = [e for e in sink if isinstance(e, Impression)]
    clicks = [e for e in sink if isinstance(e, Click)]
    conversions = [e for e in sink if isinstance(e, Conversion)]
    assert len(impressions) == 600 * 5 and clicks
    by_id = {e.impression_id: e for e in impressions}
    assert all(c.clicked_at >= by_id[c.impression_id].served_at for c in clicks)
    assert all(e.arm == "a" for e in a.seen if isinstance(e, Impression))
    assert all(e.arm == "b" for e in b.seen if isinstance(e, Impression))
    assert len(a.seen) + len(b.seen) == len(sink) - len(conversions)  # rankers see no conversions
    total_clicks = sum(s["clicks"] for s in report.final.values())
    assert total_clicks <= len(clicks)  # clicks beyond the attribution window do not count
    assert isinstance(a, Ranker)


def test_conversions_reach_the_sink_after_their_click_and_the_readout_counts_them():
    world = World(WorldConfig(seed=3, conversion_rate=0.3, **SMALL))
    sink: list = []
    cfg = ABConfig(n_requests=800, seed=3, k=5, check_every=200, conversion_window_s=2 * 3600.0)
    report = ABRunner(world, {"a": Recorder("a"), "b": Recorder("b")}, cfg, event_sink=sink.append).run()
    imps = {e.impression_id: e for e in sink if isinstance(e, Impression)}
    clicks = {e.impression_id: e for e in sink if isinstance(e, Click)}
    conversions = [e for e in sink if isinstance(e, Conversion)]
    assert conversions and all(c.impression_id in clicks for c in conversions)
    assert all(c.converted_at >= clicks[c.impression_id].clicked_at and c.value > 0 for c in conversions)
    late = [c for c in conversions if c.converted_at - clicks[c.impression_id].clicked_at > 3600.0]
    assert late  # delayed feedback: many convert hours after their click
    counted = {arm: 0 for arm in "ab"}
    for c in conversions:
        click = clicks[c.impression_id]
        imp = imps[c.impression_id]
        if click.clicked_at - imp.served_at <= cfg.attribution_window_s \
                and c.converted_at - click.clicked_at <= cfg.conversion_window_s:
            counted[imp.arm] += 1
    for arm, s in report.final.items():
        assert s["conversions"] == counted[arm] > 0
        assert s["cvr"] == pytest.approx(s["conversions"] / s["clicks"])
        assert s["conversions_per_user"] == pytest.approx(s["conversions"] / s["users"])
    no_conv = ABRunner(World(WorldConfig(seed=3, conversion_rate=0.0, **SMALL)), {"a": Recorder("a"), "b": Recorder("b")},
                       cfg).run()
    assert all(s["conversions"] == 0 for s in no_conv.final.values())
    # The click world is the same with or without conversions: they draw from their own streams.
    assert [s["clicks"] for s in no_conv.final.values()] == [s["clicks"] for s in report.final.values()]


def test_popularity_ranker_learns():
    world = World(WorldConfig(seed=5, drift_scale=0.0, **SMALL))
    arms = {"random": RandomRanker("random", 5), "pop": PopularityRanker()}
    report = ABRunner(world, arms, ABConfig(n_requests=4000, seed=5, check_every=500)).run()
    assert report.final["pop"]["ctr"] > report.final["random"]["ctr"]


def test_report_json_is_valid_and_has_a_timeline():
    report = _aa(7, 300)
    data = json.loads(report.to_json())  # NaN and inf become null
    assert data["control"] == "a" and data["arms"] == ["a", "b"]
    assert len(data["timeline"]) == 300 // 50 + 1
    assert set(data["tests"]["b"]) >= {"verdict", "p_value", "ci_low", "ci_high", "diff", "stopped_at_request"}


def test_bad_config():
    world = World(WorldConfig(seed=0, **SMALL))
    with pytest.raises(ValueError, match="at least 2"):
        ABRunner(world, {"a": RandomRanker()})
    with pytest.raises(ValueError, match="split must give each arm"):
        ABRunner(world, {"a": RandomRanker(), "b": RandomRanker()}, ABConfig(split={"a": 0.7, "b": 0.7}))
    with pytest.raises(ValueError, match="n_requests must be > 0, but -3 is given"):
        ABConfig(n_requests=-3)


def test_auc_equals_scikit_learn():
    import numpy as np

    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    from simulators.ab import auc

    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = rng.integers(0, 6, size=300).astype(float)  # many ties
        labels = rng.random(300) < 0.2
        assert auc(scores, labels) == pytest.approx(sklearn_metrics.roc_auc_score(labels, scores), abs=1e-12)
    assert np.isnan(auc([1.0, 2.0], [0, 0]))


def test_prequential_auc_for_scoring_rankers():
    world = World(WorldConfig(seed=4, **SMALL))
    arms = {"random": RandomRanker("random", 4), "oracle": OracleRanker(world)}
    report = ABRunner(world, arms, ABConfig(n_requests=1500, check_every=300)).run()
    last = report.timeline[-1]["metrics"]["prequential_auc"]
    assert "random" not in last  # no scores, no AUC
    assert last["oracle"] > 0.6  # the true attraction ranks clicks above non-clicks


def test_user_level_inference_keeps_alpha_where_request_level_does_not():
    """A/A with heterogeneous users who each send many requests (their requests are
    correlated through the user's own click rate): the delta-method test over users
    rejects about alpha of the time; the naive per-request test far more often."""
    import numpy as np

    from simulators.sequential import RatioStats, fixed_horizon

    rng = np.random.default_rng(0)
    rejections = {"user": 0, "request": 0}
    runs = 300
    for _ in range(runs):
        arms = {}
        for arm in ("a", "b"):
            stats, per_request = RatioStats(), []
            for user in range(60):
                p = rng.beta(0.5, 4.0)  # users differ a lot in how often they click
                clicks = rng.binomial(10, p, size=int(rng.integers(5, 40)))  # (requests,) of 10 shown each
                stats.add(f"{arm}{user}", 10 * clicks.size, int(clicks.sum()))  # the user's totals: all the delta method reads
                per_request.append(clicks / 10)
            arms[arm] = (stats, np.concatenate(per_request))
        (sa, ra), (sb, rb) = arms["a"], arms["b"]
        (ma, va), (mb, vb) = sa.estimate(), sb.estimate()
        rejections["user"] += fixed_horizon(ma, va, mb, vb)["p_value"] <= 0.05
        naive = fixed_horizon(ra.mean(), ra.var(ddof=1) / ra.size, rb.mean(), rb.var(ddof=1) / rb.size)
        rejections["request"] += naive["p_value"] <= 0.05
    assert rejections["user"] / runs <= 0.05 + 0.04
    assert rejections["request"] / runs >= 0.2


def test_a_shadow_unit_runs_its_own_test_beside_the_main_one_and_never_stops_it():
    from simulators.rankers import RandomRanker
    from simulators.world import World, WorldConfig

    world = World(WorldConfig(seed=3, n_users=80, n_items=60, calibration="synthetic"))
    cfg = ABConfig(n_requests=600, seed=3, min_samples=10, check_every=100, unit="user", shadow_unit="request")
    report = ABRunner(world, {"a": RandomRanker("a", 1), "b": RandomRanker("b", 2)}, cfg).run()
    main, shadow = report.tests["b"], report.shadow_tests["b"]
    assert main["unit"] == "user" and shadow["unit"] == "request"
    # Both look at the same requests: the shadow test counts requests, the main one users.
    assert shadow["n_a"] + shadow["n_b"] == report.requests
    assert main["n_a"] + main["n_b"] <= 80
    assert ABRunner(world, {"a": RandomRanker("a", 1), "b": RandomRanker("b", 2)},
                    ABConfig(n_requests=100, seed=3)).run().shadow_tests == {}
    with pytest.raises(ValueError, match="shadow_unit"):
        ABConfig(shadow_unit="session")
