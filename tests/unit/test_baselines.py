import numpy as np
import pytest

from em3.baselines import BASELINES, FactorizationMachine, ItemCTR, UserItemBias, make_baseline
from em3.metrics import auc
from em3.types import Impression


def _stream(n, seed=0):
    """Items 0-4 are liked by users of their own parity; items differ in popularity."""
    rng = np.random.default_rng(seed)
    imps, labels = [], []
    for k in range(n):
        u, i = int(rng.integers(20)), int(rng.integers(10))
        p = 0.1 + 0.06 * i + (0.3 if (u % 2) == (i % 2) else 0.0)
        imps.append(Impression(f"m{k}", f"r{k}", f"u{u}", f"i{i}", 0, float(k), context={"age": str(u % 3)}))
        labels.append(int(rng.random() < p))
    return imps, labels


def _prequential(model, imps, labels, batch=64):
    preds = []
    for s in range(0, len(imps), batch):
        preds.extend(model.predict(imps[s:s + batch]))
        model.update(imps[s:s + batch], labels[s:s + batch])
    return np.array(preds)


def test_item_ctr_is_the_smoothed_rate_with_the_global_prior():
    m = ItemCTR(pseudo_count=4.0)
    imps = [Impression(str(k), "r", "u", "a" if k < 3 else "b", 0, 0.0) for k in range(6)]
    m.update(imps, [1, 1, 0, 0, 0, 0])
    prior = (0.5 + 2) / (1.0 + 6)  # the uninformative starting prior plus the data
    a, b, new = m.predict([imps[0], imps[3], Impression("x", "r", "u", "new", 0, 0.0)])
    assert a == pytest.approx((2 + 4 * prior) / 7) and b == pytest.approx(4 * prior / 7) and new == pytest.approx(prior)


@pytest.mark.parametrize("name", BASELINES)
def test_baselines_learn_the_stream(name):
    imps, labels = _stream(6000)
    preds = _prequential(make_baseline(name, genres=lambda iid: [f"parity{int(iid[1:]) % 2}"]), imps, labels)
    y = np.array(labels)
    assert auc(y[3000:], preds[3000:]) > 0.6
    assert abs(preds[3000:].mean() - y[3000:].mean()) < 0.05  # calibrated on average


def test_fm_learns_the_user_item_interaction_that_biases_cannot():
    imps, labels = _stream(12000, seed=1)
    y = np.array(labels)
    feats = lambda imp: [f"user={imp.user_id}", f"item={imp.item_id}"]  # noqa: E731
    fm = _prequential(FactorizationMachine(feats, factors=4, lr=0.05, init_std=0.1), imps, labels)
    uib = _prequential(UserItemBias(), imps, labels)
    assert auc(y[6000:], fm[6000:]) > auc(y[6000:], uib[6000:]) + 0.02


def test_unknown_baseline_is_refused():
    with pytest.raises(ValueError, match="baseline must be one of"):
        make_baseline("popularity")
