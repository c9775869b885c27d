import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import log_loss, roc_auc_score

from em3.metrics import PrequentialTracker, auc, gauc, logloss

EXAMPLES = settings.default.max_examples  # the profile's: 100 in the full suite, 10 in the fast lane


@settings(max_examples=3 * EXAMPLES // 5, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 6)), min_size=2, max_size=200))
def test_auc_equals_sklearn_with_ties(pairs):
    y = np.array([p[0] for p in pairs])
    s = np.array([p[1] for p in pairs], dtype=float)
    if y.min() == y.max():
        assert np.isnan(auc(y, s))
    else:
        assert auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_gauc_is_impression_weighted_and_skips_one_class_users():
    rng = np.random.default_rng(0)
    users = rng.integers(0, 20, 2000).astype(str)
    y = rng.integers(0, 2, 2000)
    s = rng.random(2000) + 0.3 * y
    y[users == "3"] = 1  # single-class user: skipped
    total = weight = 0.0
    for u in np.unique(users):
        m = users == u
        if 0 < y[m].sum() < m.sum():
            total += roc_auc_score(y[m], s[m]) * m.sum()
            weight += m.sum()
    assert gauc(users, y, s) == pytest.approx(total / weight, abs=1e-12)


def test_logloss_equals_sklearn():
    rng = np.random.default_rng(1)
    y, p = rng.integers(0, 2, 500), rng.random(500)
    assert logloss(y, p) == pytest.approx(log_loss(y, p), abs=1e-9)


def test_prequential_tracker_window_and_totals():
    t = PrequentialTracker(window=4)
    t.update([0, 1], [0.9, 0.1], groups=["a", "a"])  # wrong order early on
    t.update([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8], groups=["a", "b", "b", "a"])
    out = t.summary()
    assert out["n"] == 6 and out["window_auc"] == 1.0 and out["auc"] < 1.0
    with pytest.raises(ValueError, match="must align"):
        t.update([1], [0.5, 0.2])
