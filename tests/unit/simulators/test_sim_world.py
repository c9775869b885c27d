"""The simulated world: reproducible, content predicts preference, position bias, cold start, drift."""
from __future__ import annotations

import numpy as np
import pytest

from simulators.world import World, WorldConfig

SMALL = dict(n_users=200, n_items=150, new_items_per_hour=10.0, horizon_s=86_400.0)


def _trace(world: World, n: int = 50):
    t0 = world.config.start_time
    out = []
    for i in range(n):
        req = world.next_request(t0 + 60.0 * i)
        fb = world.respond(req.user_id, req.candidates[:10], req.t)
        out.append((req.user_id, req.candidates, dict(req.context), [(f.item_id, f.clicked, f.delay_s) for f in fb]))
    return out


@pytest.mark.parametrize("calibration", ["movielens", "synthetic"])
def test_same_seed_same_run(calibration):
    a = _trace(World(WorldConfig(seed=5, calibration=calibration, **SMALL)))
    b = _trace(World(WorldConfig(seed=5, calibration=calibration, **SMALL)))
    c = _trace(World(WorldConfig(seed=6, calibration=calibration, **SMALL)))
    assert a == b
    assert a != c


def test_movielens_calibration_gives_real_items():
    w = World(WorldConfig(seed=1, **SMALL))
    assert w.calibrated
    content = w.item_content(w.item_ids[0], image=True)
    assert content.text and "|" in content.text and content.attributes["genres"]
    assert content.image[:8] == b"\x89PNG\r\n\x1a\n"
    years = [int(w.item_content(i, image=False).attributes["year"]) for i in w.item_ids]
    # the initial catalogue holds older movies; arrivals are newer (sorted by year)
    assert years[: w.config.n_items] == sorted(years[: w.config.n_items])
    assert min(years[w.config.n_items:]) >= max(years[: w.config.n_items])


def test_content_predicts_preference():
    """Items with the same genres are liked by the same users; with disjoint genres, much less."""
    w = World(WorldConfig(seed=2, content_weight=0.9, drift_scale=0.0, **SMALL))
    t = w.config.start_time
    genres = {i: frozenset(w.item_genres(i)) for i in w.item_ids}
    same = [(i, j) for i in w.item_ids for j in w.item_ids if i < j and genres[i] == genres[j]][:40]
    disjoint = [(i, j) for i in w.item_ids for j in w.item_ids if i < j and not genres[i] & genres[j]][:40]
    assert len(same) >= 10 and len(disjoint) >= 10
    users = w.user_ids[:150]
    attr = {i: np.array([w.attraction(u, [i], t)[0] for u in users]) for pair in same + disjoint for i in pair}

    def corr(pairs):
        return float(np.mean([np.corrcoef(attr[i], attr[j])[0, 1] for i, j in pairs]))

    assert corr(same) > 0.6
    assert corr(same) > corr(disjoint) + 0.4


def test_position_bias_and_click_probability_range():
    w = World(WorldConfig(seed=3, **SMALL))
    t = w.config.start_time
    item = w.item_ids[0]
    u = w.user_ids[0]
    p = [w.click_probability(u, [item], t, positions=[k])[0] for k in range(5)]
    assert all(a > b for a, b in zip(p, p[1:]))
    assert p[0] / p[1] == pytest.approx(2.0)  # eta = 1: examination 1 / (1 + k)
    req = w.next_request(t)
    probs = w.click_probability(req.user_id, req.candidates, t)
    assert np.all((probs >= 0) & (probs <= 1))


def test_mean_attraction_is_calibrated():
    w = World(WorldConfig(seed=4, base_attraction=0.1, **SMALL))
    t = w.config.start_time
    rng = np.random.default_rng(0)
    users = rng.choice(len(w.user_ids), 300)
    items = rng.choice(w.available(t), 300)
    mean = np.mean([w.attraction(w.user_ids[u], [w.item_ids[i]], t)[0] for u, i in zip(users, items)])
    assert mean == pytest.approx(0.1, abs=0.02)


def test_clicks_have_positive_delays_and_follow_probabilities():
    w = World(WorldConfig(seed=8, **SMALL))
    t = w.config.start_time
    req = w.next_request(t)
    items = req.candidates[:5]
    p = w.click_probability(req.user_id, items, t)
    n = 4000
    counts = np.zeros(5)
    for _ in range(n):
        for f in w.respond(req.user_id, items, t):
            if f.clicked:
                counts[f.position] += 1
                assert f.delay_s is not None and f.delay_s > 0
            else:
                assert f.delay_s is None
    assert np.all(np.abs(counts / n - p) <= 4 * np.sqrt(p * (1 - p) / n) + 1e-3)


def test_new_items_arrive_and_fresh_items_are_candidates():
    w = World(WorldConfig(seed=9, n_candidates=40, fresh_share=0.25, fresh_window_s=3600.0, **SMALL))
    t0 = w.config.start_time
    assert w.available(t0) == w.config.n_items
    later = t0 + 12 * 3600.0
    arrived = w.arrivals_between(t0, later)
    assert len(arrived) > 50  # about 10 per hour
    assert w.available(later) == w.config.n_items + len(arrived)
    fresh = set(w.arrivals_between(later - 3600.0, later))
    req = w.next_request(later)
    assert len(set(req.candidates) & fresh) >= min(len(fresh), 10) - 1
    assert all(w.arrival_time(i) <= later for i in req.candidates)
    assert len(set(req.candidates)) == len(req.candidates) == 40


def test_interest_drift():
    w = World(WorldConfig(seed=10, drift_scale=0.5, drift_period_s=86_400.0, **SMALL))
    still = World(WorldConfig(seed=10, drift_scale=0.0, **SMALL))
    t0 = w.config.start_time
    items = w.item_ids[:30]
    u = w.user_ids[0]
    a0, a1 = w.attraction(u, items, t0), w.attraction(u, items, t0 + 43_200.0)
    assert np.abs(a0 - a1).max() > 0.01
    assert np.allclose(still.attraction(u, items, t0), still.attraction(u, items, t0 + 43_200.0))


def test_bad_config_and_inputs():
    with pytest.raises(ValueError, match="n_users must be > 0, but -3 is given"):
        WorldConfig(n_users=-3)
    with pytest.raises(ValueError, match="content_weight must be in"):
        WorldConfig(content_weight=1.5)
    w = World(WorldConfig(seed=0, **SMALL))
    with pytest.raises(ValueError, match="unknown item id"):
        w.attraction(w.user_ids[0], ["nope"], w.config.start_time)
    with pytest.raises(ValueError, match="must not repeat"):
        w.respond(w.user_ids[0], [w.item_ids[0]] * 2, w.config.start_time)


def test_catalog_fills_a_content_store():
    from em3.stores import InMemoryContentStore

    w = World(WorldConfig(seed=0, **SMALL))
    store = InMemoryContentStore(w.catalog(w.config.start_time, image=False))
    assert len(store) == w.config.n_items
    later = w.config.start_time + 3600.0
    store.put_many(w.item_content(i, image=False) for i in w.arrivals_between(w.config.start_time, later))
    assert len(store) == w.available(later)


def test_conversions_follow_the_hidden_probability_with_delays():
    world = World(WorldConfig(seed=4, n_users=200, n_items=100, conversion_rate=0.15, calibration="synthetic"))
    rng = np.random.default_rng(0)
    t = world.config.start_time
    p_all = [world.conversion_probability(world.user_ids[u], [world.item_ids[i]], t)[0]
             for u, i in zip(rng.integers(0, 200, 3000), rng.integers(0, 100, 3000))]
    assert abs(np.mean(p_all) - 0.15) < 0.02  # calibrated to the configured mean
    assert np.std(p_all) > 0.05  # users and items differ
    clicked, converted, predicted, delays = 0, 0, 0.0, []
    for n in range(4000):
        req = world.next_request(t + n)
        for fb in world.respond(req.user_id, req.candidates[:10], t + n):
            if fb.clicked:
                clicked += 1
                predicted += world.conversion_probability(req.user_id, [fb.item_id], t + n + fb.delay_s)[0]
                if fb.converted:
                    converted += 1
                    delays.append(fb.conversion_delay_s)
                    assert fb.value > 0
            else:
                assert not fb.converted and fb.conversion_delay_s is None
    assert clicked > 1000 and abs(converted - predicted) < 4 * np.sqrt(predicted)
    assert np.median(delays) > 600  # hours-scale by default: delayed feedback
    with pytest.raises(ValueError, match="conversion_rate must be in"):
        WorldConfig(conversion_rate=1.0)
