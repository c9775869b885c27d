"""mSPRT: A/A false-positive rate at most alpha under continuous peeking, power, validity."""
from __future__ import annotations

import math

import numpy as np
import pytest

from simulators.sequential import (
    SequentialTest,
    msprt,
    msprt_path,
    peeking_z_test_rejects,
    z_test,
)

ALPHA = 0.05
N_RUNS = 1000
HORIZON = 4000  # observations per arm, a look after every one


def _streams(p_a: float, p_b: float, seed: int, n_runs: int = N_RUNS, horizon: int = HORIZON):
    rng = np.random.default_rng(seed)
    a = (rng.random((n_runs, horizon)) < p_a).cumsum(axis=1)
    b = (rng.random((n_runs, horizon)) < p_b).cumsum(axis=1)
    n = np.broadcast_to(np.arange(1, horizon + 1), (n_runs, horizon))
    return n, a, b


def _slack(rate: float, n: int) -> float:
    """Three binomial standard deviations: the Monte Carlo noise of a rate over n runs."""
    return 3 * math.sqrt(rate * (1 - rate) / n)


def test_aa_false_positive_rate_at_most_alpha_and_peeking_z_test_inflates():
    n, a, b = _streams(0.1, 0.1, seed=2024)
    out = msprt_path(n, a, n, b, tau2=1e-3, alpha=ALPHA, min_samples=100)
    fpr = out["reject"].mean()
    # With 1000 runs the observed rate has sd <= 0.7 pp; allow 3 sd above alpha.
    assert fpr <= ALPHA + _slack(ALPHA, N_RUNS)
    looks = slice(99, None, 100)  # the naive analyst peeks every 100 observations
    peek_fpr = peeking_z_test_rejects(n[:, looks], a[:, looks], n[:, looks], b[:, looks], ALPHA).mean()
    assert peek_fpr > 3 * ALPHA  # 40 peeks push a nominal 5% test far above 5%
    once = (z_test(n[:, -1], a[:, -1], n[:, -1], b[:, -1]) <= ALPHA).mean()
    assert abs(once - ALPHA) <= _slack(ALPHA, N_RUNS)  # looked at once, the z-test is fine


def test_planted_lift_is_detected():
    n, a, b = _streams(0.10, 0.13, seed=7, n_runs=300)
    out = msprt_path(n, a, n, b, tau2=1e-3, alpha=ALPHA, min_samples=100)
    assert out["reject"].mean() >= 0.9
    stops = out["stop_index"][out["reject"]]
    assert np.median(stops) < HORIZON  # it stops early, not only at the horizon
    # When it rejects, the always-valid interval excludes zero on the right side.
    final_low = out["ci_low"][:, -1][out["reject"]]
    assert np.all(final_low > 0)


def test_confidence_sequence_covers_the_true_difference():
    delta = 0.02
    n, a, b = _streams(0.10, 0.10 + delta, seed=99, n_runs=400, horizon=3000)
    out = msprt_path(n, a, n, b, tau2=1e-3, alpha=ALPHA, min_samples=100)
    ever_missed = ((out["ci_low"] > delta) | (out["ci_high"] < delta)).any(axis=1)
    assert ever_missed.mean() <= ALPHA + _slack(ALPHA, 400)


def test_running_test_matches_vectorised_path():
    n, a, b = _streams(0.2, 0.25, seed=3, n_runs=1, horizon=1500)
    path = msprt_path(n, a, n, b, tau2=1e-3, alpha=ALPHA, min_samples=50)
    test = SequentialTest(tau2=1e-3, alpha=ALPHA, min_samples=50)
    ps, lows = [], []
    for t in range(0, 1500, 10):
        r = test.update(int(n[0, t]), int(a[0, t]), int(n[0, t]), int(b[0, t]))
        ps.append(r.p_value)
        lows.append(r.ci_low)
    assert all(x >= y for x, y in zip(ps, ps[1:]))  # the always-valid p-value never rises
    assert all(x <= y for x, y in zip(lows, lows[1:]))  # intervals only shrink
    # Looking less often can only give a larger (more conservative) p-value.
    assert ps[-1] >= path["p_value"][0, -1] - 1e-12


def test_single_look_values():
    r = msprt(n_a=10_000, sum_a=500, n_b=10_000, sum_b=650, tau2=1e-4)
    var = 0.05 * 0.95 / 1e4 + 0.065 * 0.935 / 1e4
    expected = 0.5 * math.log(var / (var + 1e-4)) + 1e-4 * 0.015**2 / (2 * var * (var + 1e-4))
    assert r.log_lr == pytest.approx(expected)
    assert r.p_value == pytest.approx(math.exp(-expected))
    assert r.reject and r.ci_low > 0
    before = msprt(n_a=50, sum_a=1, n_b=50, sum_b=20, min_samples=100)
    assert not before.reject and before.p_value == 1.0  # burn-in


def test_z_test_known_value():
    # p = 0.115 pooled, se = 0.014267, z = 2.1028, two-sided p = 0.0355
    assert float(z_test(1000, 100, 1000, 130)) == pytest.approx(0.0355, abs=5e-5)


def test_bad_settings():
    with pytest.raises(ValueError, match="tau2 must be > 0, but -3 is given"):
        SequentialTest(tau2=-3)
    with pytest.raises(ValueError, match="alpha must be in"):
        msprt(10, 1, 10, 1, alpha=0)
