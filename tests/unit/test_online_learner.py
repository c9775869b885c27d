import numpy as np
import pytest
import torch

from em3.metrics import auc
from em3.model import ModelConfig
from em3.stores import InMemoryContentStore
from em3.types import Impression, ItemContent, Sample
from learners import OnlineLearner, resolve_device

GENRES = ["comedy", "horror", "western", "romance"]


def _world(seed=0, n_items=40, n_users=12):
    """Users like one genre each; an item's genre is in its text (and not in its id)."""
    rng = np.random.default_rng(seed)
    items = [ItemContent(f"it{k}", text=f"a {GENRES[k % 4]} film, number {k}") for k in range(n_items)]
    taste = {f"u{u}": u % 4 for u in range(n_users)}

    def stream(n, t0, item_ids=None):
        out = []
        for k in range(n):
            u = f"u{rng.integers(n_users)}"
            i = int(rng.integers(n_items)) if item_ids is None else int(rng.choice(item_ids))
            like = (i % 4) == taste[u]
            y = int(rng.random() < (0.85 if like else 0.1))
            out.append(Sample(Impression(f"m{t0 + k}", f"r{t0 + k}", u, f"it{i}", 0, 1.7e9 + t0 + k), y, 1.7e9 + t0 + k))
        return out

    return InMemoryContentStore(items), stream


@pytest.fixture(scope="module")
def cfg():
    return ModelConfig.tiny(image_model="none", history_len=5)


def test_resolve_device_auto_is_cpu_here():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _with_histories(batch, liked):
    """Each user's clicked items so far, newest first (then record this batch's clicks)."""
    hist = [list(reversed(liked.get(s.impression.user_id, [])))[:5] for s in batch]
    for s in batch:
        if s.label:
            liked.setdefault(s.impression.user_id, []).append(s.impression.item_id)
    return hist


@pytest.mark.slow  # seconds: out of the fast lane (scripts/test.sh --fast), in the full suite
def test_loss_drops_on_a_learnable_stream(cfg):
    store, stream = _world()
    learner = OnlineLearner(cfg, store, lr=1e-2, device="cpu", seed=0)
    losses, liked = [], {}
    for step in range(60):
        batch = stream(64, step * 64)
        stats = learner.learn_batch(batch, _with_histories(batch, liked))
        losses.append(stats["rank_loss"])
        assert stats["n"] == 64 and stats["positives"] == sum(s.label for s in batch)
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.1
    test = stream(500, 10**6)
    assert auc([s.label for s in test], learner.score(test, _with_histories(test, dict(liked)))) > 0.75


@pytest.mark.slow  # trains the default-size towers; the full suite runs it
def test_pairwise_loss_is_reported_and_changes_the_update_only_when_on(cfg):
    """With ``pairwise_weight`` the step adds the within-user BPR loss (reported as
    ``pair_loss``) and moves the weights differently; at 0 it is reported as 0."""
    store, stream = _world()
    batch = stream(64, 0)
    hist = [[] for _ in batch]
    states = {}
    for weight in (0.0, 1.0):
        learner = OnlineLearner(cfg.replace(pairwise_weight=weight), store, device="cpu", seed=0)
        stats = learner.learn_batch(batch, hist)
        assert (stats["pair_loss"] > 0) == (weight > 0)
        assert stats["loss"] == pytest.approx(stats["rank_loss"] + weight * stats["pair_loss"] + stats["ctcvr_loss"],
                                              rel=1e-5)
        states[weight] = learner.state_dict()["head.mlp.0.weight"]
    assert not torch.equal(states[0.0], states[1.0])


@pytest.mark.slow
def test_content_generalises_to_unseen_items(cfg):
    """Trained on items 0-29 only, the content model (real MiniLM text) ranks brand-new
    items 30-39; IDs alone cannot."""
    store, stream = _world(seed=1)
    scores = {}
    for variant in ("em3", "id_only"):
        real = cfg.replace(text_model="minilm", max_text_tokens=32)
        learner = OnlineLearner(real.replace(variant=variant, use_content=variant == "em3",
                                             cic_weight=cfg.cic_weight if variant == "em3" else 0.0),
                                store, lr=1e-2, device="cpu", seed=0, content_every=1)  # towers every step
        for step in range(40):
            batch = stream(64, step * 64, item_ids=range(30))
            learner.learn_batch(batch, [[]] * 64)
        cold = stream(400, 10**6, item_ids=range(30, 40))
        scores[variant] = auc([s.label for s in cold], learner.score(cold, [[]] * len(cold)))
    assert scores["em3"] > 0.6 and scores["em3"] > scores["id_only"] + 0.08, scores


def test_score_is_batch_size_independent_and_matches_the_serving_path(cfg):
    store, stream = _world(seed=2)
    learner = OnlineLearner(cfg, store, device="cpu")
    batch = stream(30, 0)
    hist = [[f"it{(k + j) % 40}" for j in range(k % 6)] for k in range(30)]
    big = learner.score(batch, hist, batch_size=1024)
    small = learner.score(batch, hist, batch_size=7)
    np.testing.assert_allclose(big, small, rtol=1e-5, atol=1e-6)
    s, h = batch[4], hist[4]
    reps = learner.item_representations(h + [s.impression.item_id])
    with torch.no_grad():
        logit = learner.model.score_candidates(s.impression.user_id, s.impression.context, reps[:-1], reps[-1:])
    assert float(torch.sigmoid(logit)[0]) == pytest.approx(float(big[4]), rel=1e-5)


def test_one_big_batch_gives_the_mean_gradient_of_its_halves(cfg):
    """No batch-dependent layers: d(mean loss over 8) = mean of d(mean loss over 4) of each half."""
    store, stream = _world(seed=3)
    learner = OnlineLearner(cfg.replace(cic_weight=0.0), store, device="cpu")
    batch = stream(8, 0)
    hist = [["it1", "it2"]] * 8

    def grads(samples):
        learner.model.zero_grad()
        logits, _ = learner._logits([s.impression for s in samples], hist[: len(samples)])
        y = torch.tensor([float(s.label) for s in samples])
        torch.nn.functional.binary_cross_entropy_with_logits(logits, y).backward()
        return {n: p.grad.clone() for n, p in learner.model.named_parameters() if p.grad is not None}

    whole, first, second = grads(batch), grads(batch[:4]), grads(batch[4:])
    for name, g in whole.items():
        torch.testing.assert_close(g, (first[name] + second[name]) / 2, atol=1e-6, rtol=1e-4)


def test_corrections_validation_and_state(cfg):
    store, stream = _world(seed=4)
    learner = OnlineLearner(cfg, store, device="cpu")
    batch = stream(10, 0)
    imp = batch[0].impression
    batch.append(Sample(imp, 1, imp.served_at + 60, correction=True))
    stats = learner.learn_batch(batch, [[]] * 11)
    assert stats["corrections"] == 1 and np.isfinite(stats["loss"])
    assert set(stats) >= {"loss", "rank_loss", "cic_loss", "n", "positives", "corrections"}
    with pytest.raises(ValueError, match="histories must align"):
        learner.learn_batch(batch, [[]])
    with pytest.raises(ValueError, match="lr must be > 0"):
        OnlineLearner(cfg, store, lr=0)
    state = learner.state_dict()
    counters = {"item_impressions", "item_clicks", "user_impressions", "user_clicks", "global_counts",
                "head.content_mean", "cvr_item_counts", "cvr_user_counts", "cvr_global_counts"}
    assert sum(v.numel() for k, v in state.items() if k not in counters) == learner.num_trainable_params()
    assert state["item_impressions"].sum() > 0  # trained-on impressions were counted
    # The late positive adds a click to counts already holding its impression.
    assert state["global_counts"][1] == sum(s.label for s in batch)
    assert all(v.device.type == "cpu" for v in state.values())
    assert learner.learn_batch([], [])["n"] == 0


def test_learn_batch_probs_are_the_test_then_train_predictions(cfg):
    store, stream = _world(seed=5)
    learner = OnlineLearner(cfg, store, device="cpu")
    batch = stream(20, 0)
    before = learner.score(batch, [[]] * 20)
    stats = learner.learn_batch(batch, [[]] * 20, return_probs=True)
    np.testing.assert_allclose(stats["probs"], before, rtol=1e-5, atol=1e-6)
    assert not np.allclose(learner.score(batch, [[]] * 20), before)  # the update happened


@pytest.mark.slow  # trains the default-size towers; the full suite runs it
def test_cached_history_content_gives_the_live_predictions_before_any_update(cfg):
    """On the first step the cache is filled from the same weights, so cached and live
    history content give the same test-then-train predictions; content_every skips
    the towers' gradient on the other steps but still trains the ranker."""
    store, stream = _world(seed=6)
    batch = stream(32, 0)
    hist = [["it1", "it2", "it3"]] * 32
    live = OnlineLearner(cfg, store, device="cpu", history_content="live").learn_batch(batch, hist, return_probs=True)
    cached_learner = OnlineLearner(cfg, store, device="cpu", history_content="cached", content_every=2)
    cached = cached_learner.learn_batch(batch, hist, return_probs=True)
    np.testing.assert_allclose(cached["probs"], live["probs"], rtol=1e-5, atol=1e-6)
    lora = {n: p.detach().clone() for n, p in cached_learner.model.named_parameters() if "lora_B" in n}
    head = cached_learner.model.head.mlp[0].weight.detach().clone()
    cached_learner.learn_batch(stream(32, 100), hist)  # step 1: no tower gradient
    assert lora and all(torch.equal(lora[n], p) for n, p in cached_learner.model.named_parameters() if n in lora)
    assert not torch.equal(head, cached_learner.model.head.mlp[0].weight)
    with pytest.raises(ValueError, match="content_every"):
        OnlineLearner(cfg, store, device="cpu", content_every=0)


def test_modality_attention_is_the_mean_mass_per_modality(cfg):
    store, _ = _world()
    learner = OnlineLearner(cfg, store, device="cpu", seed=0)
    mass = learner.modality_attention(["it0", "it1", "ghost"])  # ghost: no content, all on the null token
    assert set(mass) == {"text", "image", "missing"} and mass["image"] == 0.0  # this config has no image tower
    assert sum(mass.values()) == pytest.approx(1.0, abs=1e-3)
    assert mass["missing"] > 1 / 3 and mass["text"] > 0
    assert OnlineLearner(ModelConfig.tiny("id_only"), store, device="cpu").modality_attention(["it0"]) == {}
