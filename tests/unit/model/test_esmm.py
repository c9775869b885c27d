"""The ESMM multi-task loss and CVR head: the CTCVR loss, its delayed-feedback
correction, no effect on the click model, and a CVR that learns and is calibrated."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from em3.metrics import auc
from em3.model import EM3Model, ModelConfig
from em3.model.losses import ctcvr_bce, weighted_bce
from em3.stores import InMemoryContentStore
from em3.types import Impression, ItemContent, Sample
from learners import OnlineLearner


def _reference(zc, zv, y):
    p = torch.sigmoid(zc) * torch.sigmoid(zv)
    return -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()


def test_ctcvr_loss_is_the_bce_of_the_product_and_trains_only_the_cvr_side():
    g = torch.Generator().manual_seed(0)
    zc = torch.randn(50, generator=g, dtype=torch.float64, requires_grad=True)
    zv = torch.randn(50, generator=g, dtype=torch.float64, requires_grad=True)
    y = (torch.rand(50, generator=g, dtype=torch.float64) < 0.2).double()
    loss = ctcvr_bce(zc, zv, y)
    torch.testing.assert_close(loss, _reference(zc, zv, y))
    loss.backward()
    assert zc.grad is None or torch.count_nonzero(zc.grad) == 0  # pCTR is detached
    # The gradient w.r.t. the CVR logits by central finite differences.
    eps = 1e-6
    with torch.no_grad():
        for k in (0, 7, 31):
            up, down = zv.detach().clone(), zv.detach().clone()
            up[k] += eps
            down[k] -= eps
            fd = (_reference(zc, up, y) - _reference(zc, down, y)) / (2 * eps)
            assert float(zv.grad[k]) == pytest.approx(float(fd), rel=1e-6, abs=1e-9)


def test_a_conversion_correction_cancels_the_fake_negative_learned_before():
    """Learning "no conversion" at the click, then the conversion sample, adds up to
    learning "converted" once: the delayed conversion leaves no bias behind."""
    zc, zv = torch.tensor([0.3, -1.0]), torch.tensor([-0.5, 1.2], requires_grad=True)
    zero, one = torch.zeros(2), torch.ones(2)
    twice = ctcvr_bce(zc, zv, zero) + ctcvr_bce(zc, zv, one, correction=torch.ones(2, dtype=torch.bool))
    once = ctcvr_bce(zc, zv, one)
    torch.testing.assert_close(twice, once)
    g_twice = torch.autograd.grad(twice, zv)[0]
    zv2 = zv.detach().clone().requires_grad_(True)
    torch.testing.assert_close(g_twice, torch.autograd.grad(ctcvr_bce(zc, zv2, one), zv2)[0])
    positive = ctcvr_bce(zc, zv, one, correction=torch.ones(2, dtype=torch.bool), mode="positive")
    torch.testing.assert_close(positive, once)  # "positive" leaves the fake negative in place


def test_trained_over_all_impressions_the_cvr_is_the_true_one_wherever_pctr_is_right():
    """ESMM's point: fit through pCTCVR on every impression, pCVR recovers P(conversion |
    click, x), also where clicks are rare."""
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.normal(size=(40_000, 2)), dtype=torch.float32)
    ctr_logit = 1.5 * x[:, 0] - 1.0  # clicks rare where x0 is low
    cvr_logit = -1.0 + 1.2 * x[:, 1] - 0.8 * x[:, 0]
    click = torch.rand(len(x), generator=torch.Generator().manual_seed(1)) < torch.sigmoid(ctr_logit)
    conv = click & (torch.rand(len(x), generator=torch.Generator().manual_seed(2)) < torch.sigmoid(cvr_logit))
    w = torch.zeros(3, requires_grad=True)
    opt = torch.optim.Adam([w], lr=0.05)
    for _ in range(400):
        opt.zero_grad()
        z = w[0] + w[1] * x[:, 0] + w[2] * x[:, 1]
        ctcvr_bce(ctr_logit, z, conv.float()).backward()
        opt.step()
    torch.testing.assert_close(w.detach(), torch.tensor([-1.0, -0.8, 1.2]), atol=0.12, rtol=0)


def _world(seed=0, n_items=30, n_users=40):
    """Clicks like users' genres; conversions depend on the item (a hidden quality)."""
    rng = np.random.default_rng(seed)
    items = [ItemContent(f"it{k}", text=f"a {['comedy', 'horror', 'western'][k % 3]} film {k}") for k in range(n_items)]
    quality = rng.normal(size=n_items) * 1.5
    p_conv = 1 / (1 + np.exp(-(quality - 1.0)))

    def stream(n, t0):
        samples, truth = [], []
        for k in range(n):
            u, i = int(rng.integers(n_users)), int(rng.integers(n_items))
            imp = Impression(f"m{t0 + k}", f"r{t0 + k}", f"u{u}", f"it{i}", 0, 1.7e9 + t0 + k)
            clicked = rng.random() < (0.5 if (u + i) % 3 == 0 else 0.15)
            samples.append(Sample(imp, int(clicked), imp.served_at + 1))
            truth.append(p_conv[i])
            if clicked and rng.random() < p_conv[i]:  # a delayed conversion: its own later sample
                samples.append(Sample(imp, 1, imp.served_at + 3600, correction=True, conversion=1, value=10.0 + i))
        return samples, truth

    return InMemoryContentStore(items), stream


def _ctr_state(learner):
    return {k: v for k, v in learner.state_dict().items() if not k.startswith("cvr")}


@pytest.mark.parametrize("variant, with_conversions", [("id_only", False), ("em3", False), ("id_only", True)])
def test_the_click_model_is_the_same_with_or_without_the_cvr_head(variant, with_conversions):
    """Without conversions, the default task weights change nothing in the click model,
    bit for bit. With conversions (the CTCVR loss reaches only the CVR head) it is the
    same up to float rounding: conversion rows add zero gradients to the ID tables,
    which changes the order in which the embedding's backward sums them."""
    store, stream = _world(seed=1)
    base = ModelConfig.tiny(variant, image_model="none", history_len=5)
    plain = OnlineLearner(base.replace(ctcvr_weight=0.0), store, device="cpu", seed=0)
    multi = OnlineLearner(base, store, device="cpu", seed=0)
    assert base.has_cvr and not plain.config.has_cvr
    for step in range(6):
        batch, _ = stream(64, step * 100)
        clicks_only = [s for s in batch if not s.conversion]
        a = plain.learn_batch(clicks_only, [[]] * len(clicks_only), return_probs=True)
        feed = batch if with_conversions else clicks_only
        b = multi.learn_batch(feed, [[]] * len(feed), return_probs=True)
        kept = b["probs"][[not s.conversion for s in feed]]
        np.testing.assert_allclose(a["probs"], kept, rtol=0, atol=1e-6 if with_conversions else 0)
        assert a["rank_loss"] == pytest.approx(b["rank_loss"], rel=1e-6) and b["ctcvr_loss"] > 0
    sa, sb = _ctr_state(plain), _ctr_state(multi)
    assert sa.keys() == sb.keys()
    tol = 1e-5 if with_conversions else 0.0
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=tol, msg=k)
    assert (multi.model.cvr_global_counts[1] > 0) == with_conversions  # conversions were counted


def test_without_a_cvr_head_conversion_samples_are_not_learned():
    store, stream = _world(seed=2)
    cfg = ModelConfig.tiny("id_only", history_len=5, ctcvr_weight=0.0)
    a, b = (OnlineLearner(cfg, store, device="cpu", seed=0) for _ in range(2))
    batch, _ = stream(80, 0)
    clicks_only = [s for s in batch if not s.conversion]
    stats = a.learn_batch(batch, [[]] * len(batch))
    b.learn_batch(clicks_only, [[]] * len(clicks_only))
    assert stats["conversions"] > 0 and stats["ctcvr_loss"] == 0
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], rtol=0, atol=0)
    with pytest.raises(ValueError, match="needs a model with a CVR head"):
        a.score(batch[:2], [[]] * 2, task="cvr")


@pytest.mark.slow
def test_the_cvr_head_learns_item_conversion_rates_calibrated():
    store, stream = _world(seed=3)
    learner = OnlineLearner(ModelConfig.tiny("id_only", history_len=5), store, lr=5e-3, device="cpu", seed=0)
    for step in range(150):
        batch, _ = stream(128, step * 1000)
        learner.learn_batch(batch, [[]] * len(batch))
    test, truth = stream(6000, 10**7)
    first = [(s, p) for s, p in zip(test, truth) if s.label == 1 and not s.correction]  # the clicks
    converted = {s.impression.impression_id for s in test if s.conversion}
    labels = [s.impression.impression_id in converted for s, _ in first]
    pcvr = learner.score([s for s, _ in first], [[]] * len(first), task="cvr")
    oracle = auc(labels, [p for _, p in first])
    assert auc(labels, pcvr) >= 0.5 + 0.8 * (oracle - 0.5)
    assert abs(pcvr.mean() / np.mean(labels) - 1) < 0.15
    ctcvr = learner.score(test, [[]] * len(test), task="ctcvr")
    ctr = learner.score(test, [[]] * len(test), task="ctr")
    np.testing.assert_allclose(ctcvr, ctr * learner.score(test, [[]] * len(test), task="cvr"), rtol=1e-5)


def test_score_candidates_ranks_by_the_objective():
    cfg = ModelConfig.tiny("id_only", history_len=5)
    model = EM3Model(cfg).eval()
    with torch.no_grad():
        model.observe_conversions(["a", "b", "c"] * 10, ["u"] * 30, [1.0] * 30, [1.0, 0.0, 0.0] * 10,
                                  [1.0, 0.0, 0.0] * 10)
        model.observe_conversions(["c"] * 5, ["u"] * 5, [0.0] * 5, [1.0] * 5, [100.0] * 5)
        reps = model.item_representations(["a", "b", "c"])
        empty = reps[:0]
        ctr = model.score_candidates("u", {}, empty, reps, "ctr")
        ctcvr = model.score_candidates("u", {}, empty, reps, "ctcvr")
        value = model.score_candidates("u", {}, empty, reps, "value")
        cvr = model.forward_tasks(["u"] * 3, [{}] * 3, reps, torch.arange(3), torch.zeros(3, 1, dtype=torch.long),
                                  torch.zeros(3, 1, dtype=torch.bool))[1]
    torch.testing.assert_close(torch.sigmoid(ctcvr), torch.sigmoid(ctr) * torch.sigmoid(cvr))
    assert ctcvr[0] > ctcvr[1] and ctcvr[2] > ctcvr[1]  # a and c convert, b never does
    assert value[2] > value[0]  # c's conversions are worth 100, a's 1
    with pytest.raises(ValueError, match="objective must be one of"):
        EM3Model(cfg.replace(ctcvr_weight=0.0)).score_candidates("u", {}, empty[:, :-2], reps[:, :-2], "ctcvr")


def test_task_weights_are_validated():
    with pytest.raises(ValueError, match="ctcvr_weight must be >= 0"):
        ModelConfig.tiny(ctcvr_weight=-1.0)
    with pytest.raises(ValueError, match="must not both be 0"):
        ModelConfig.tiny(ctr_weight=0.0, ctcvr_weight=0.0)
    assert ModelConfig.from_dict({k: v for k, v in ModelConfig.tiny().to_dict().items()
                                  if k != "ctcvr_weight"}).has_cvr is False  # a config saved before conversions
    assert F.logsigmoid(torch.tensor(0.0)) < 0
    assert weighted_bce(torch.zeros(1), torch.ones(1)) > 0
