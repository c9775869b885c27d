"""Explanations: the Shapley split adds up, attention masses are distributions, and
each view reads the model it explains."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from em3.model import EM3Model, ModelConfig
from em3.model.explain import MODALITIES, explain_candidates, modality_mass, shapley_two
from em3.types import ItemContent

finite = st.floats(-1e3, 1e3, allow_nan=False)


@given(finite, finite, finite, finite)
@settings(max_examples=200, deadline=None)
def test_shapley_two_is_efficient_and_symmetric(v_none, v_a, v_b, v_ab):
    phi_a, phi_b = shapley_two(v_none, v_a, v_b, v_ab)
    assert phi_a + phi_b == pytest.approx(v_ab - v_none, abs=1e-9)
    swapped_b, swapped_a = shapley_two(v_none, v_b, v_a, v_ab)  # players' names do not matter
    assert (swapped_a, swapped_b) == pytest.approx((phi_a, phi_b))


@given(finite, finite)
def test_shapley_two_gives_a_null_player_zero(v_none, v_b):
    phi_a, phi_b = shapley_two(v_none, v_none, v_b, v_b)  # adding a never changes the value
    assert phi_a == 0.0 and phi_b == pytest.approx(v_b - v_none)


def _model(variant: str, items, seen: int = 4) -> tuple[EM3Model, torch.Tensor]:
    """A tiny model whose first ``seen`` items have counted impressions and a trained-like
    ID row, with the representations of ``items``."""
    extra = {"image_model": "none"} if variant == "text_only" else {}  # tiny() sets both towers
    model = EM3Model(ModelConfig.tiny(variant, **extra)).eval()
    ids = [i.item_id for i in items]
    model.observe_impressions(ids[:seen] * 5, ["u1"] * seen * 5, [1, 0, 0, 1, 0] * seen)
    # Conversions on the first two items (item 1's worth 5 each): the CVR head's ID statistics.
    model.observe_conversions(ids[:seen] * 5, ["u1"] * seen * 5, [1.0] * seen * 5,
                              ([1.0, 1.0] + [0.0] * (seen - 2)) * 5, ([1.0, 5.0] + [0.0] * (seen - 2)) * 5)
    with torch.no_grad():
        rows = model.item_emb.buckets_of(ids[:seen])
        model.item_emb.table.weight[rows] += torch.randn(seen, model.config.embed_dim)
        if model.config.content_match:
            model.head.content_mean.normal_()
        reps = model.item_representations(ids, items if model.config.use_content else None)
    return model, reps


@pytest.mark.parametrize("objective", ["ctr", "ctcvr", "value"])
@pytest.mark.parametrize("variant", ["em3", "text_only", "id_only"])
def test_the_split_sums_to_the_ranked_score_minus_the_baseline_score(variant, objective, items):
    model, reps = _model(variant, items)
    hist, cands = reps[:3], reps[1:]
    e = explain_candidates(model, "u1", {"device": "web"}, hist, cands, objective)
    with torch.no_grad():
        score = model.score_candidates("u1", {"device": "web"}, hist, cands, objective)
        both = model.score_candidates("u1", {"device": "web"}, model.baseline_rows(hist, content=True, ids=True),
                                      model.baseline_rows(cands, content=True, ids=True), objective)
    assert e.objective == objective
    torch.testing.assert_close(e.score, score)  # the score explained is the one ranked by
    torch.testing.assert_close(e.baseline, both)  # the baseline: every part at its baseline
    torch.testing.assert_close(e.content + e.id, e.score - e.baseline, atol=1e-5, rtol=0)
    assert e.id.abs().max() > 1e-3  # trained ID rows move the score
    if variant == "id_only":
        assert torch.equal(e.content, torch.zeros_like(e.content))  # no content: a null player
    else:
        assert e.content.abs().max() > 1e-4


def test_a_part_already_at_its_baseline_gets_zero(items):
    model, reps = _model("em3", items)
    new_items = model.baseline_rows(reps[3:], ids=True)  # candidates whose ID part is a never-seen item's
    e = explain_candidates(model, "u1", {}, torch.zeros(0, reps.shape[1]), new_items)
    torch.testing.assert_close(e.id, torch.zeros_like(e.id), atol=1e-6, rtol=0)
    average = model.baseline_rows(reps[3:], content=True)  # candidates of average content
    e = explain_candidates(model, "u1", {}, torch.zeros(0, reps.shape[1]), average)
    torch.testing.assert_close(e.content, torch.zeros_like(e.content), atol=1e-6, rtol=0)


def test_history_weights_are_the_target_attention_and_name_the_history(items):
    model, reps = _model("em3", items)
    hist, cands = reps[:4], reps[4:]
    e = explain_candidates(model, "u1", {}, hist, cands)
    assert e.history_weights.shape == (2, 4)
    torch.testing.assert_close(e.history_weights.sum(1), torch.ones(2))
    rows = e.rows(["h0", "h1", "h2", "h3"], top=2)
    assert [len(r["history"]) for r in rows] == [2, 2]
    for r, w in zip(rows, e.history_weights):
        assert [h["weight"] for h in r["history"]] == pytest.approx(sorted(w.tolist(), reverse=True)[:2])
        assert abs(r["content"] + r["id"] - (r["score"] - r["baseline_score"])) < 1e-5
    empty = explain_candidates(model, "u1", {}, reps[:0], cands)
    assert empty.history_weights.shape == (2, 0) and empty.rows([], top=5)[0]["history"] == []


def test_history_is_capped_at_the_models_history_len(items):
    model, reps = _model("em3", items)
    long_history = reps[[0, 1, 2] * 10]  # 30 rows, history_len 20
    e = explain_candidates(model, "u1", {}, long_history, reps[3:])
    assert e.history_weights.shape == (3, model.config.history_len)


def test_modality_masses_sum_to_one_per_item(items):
    model, _ = _model("em3", items)
    text_only = ItemContent("t", text="Movie only text (1999) | Drama")
    nothing = ItemContent("n", text="")
    mass = modality_mass(model, [i.item_id for i in items] + ["t", "n", "ghost"], list(items) + [text_only, nothing, None])
    assert mass.shape == (len(items) + 3, len(MODALITIES))
    torch.testing.assert_close(mass.sum(1), torch.ones(mass.shape[0]))
    assert (mass >= 0).all()
    assert (mass[: len(items), :2] > 0).all()  # text and image both read for items with both
    assert mass[len(items), 1] == 0.0 and mass[len(items), 0] > 0  # no image: no mass on it
    torch.testing.assert_close(mass[-2:], torch.tensor([[0.0, 0.0, 1.0]] * 2))  # no content: all on missing


def test_modality_mass_of_models_without_a_qformer_is_none(items):
    assert modality_mass(EM3Model(ModelConfig.tiny("id_only")), ["i0"], [items[0]]) is None
    assert modality_mass(EM3Model(ModelConfig.tiny("no_fusion")), ["i0"], [items[0]]) is None
    text = EM3Model(ModelConfig.tiny("text_only", image_model="none"))  # tiny() sets both towers
    mass = modality_mass(text, ["i0"], [items[0]])
    assert mass[0, 1] == 0.0 and mass[0].sum() == pytest.approx(1.0)


def test_scores_with_and_without_weights_agree(items):
    model, reps = _model("em3", items)
    with torch.no_grad():
        plain = model.score_candidates("u1", {}, reps[:3], reps[3:])
        logits, weights = model.score_candidates("u1", {}, reps[:3], reps[3:], return_weights=True)
    assert torch.equal(plain, logits) and weights.shape == (3, 3)


@pytest.mark.parametrize("objective, names", [("ctr", ["click"]), ("ctcvr", ["click", "conversion", "odds"]),
                                              ("value", ["click", "conversion", "value"])])
def test_the_terms_add_up_to_the_score_and_to_each_part(objective, names, items):
    model, reps = _model("em3", items)
    hist, cands = reps[:3], reps[1:]
    e = explain_candidates(model, "u1", {}, hist, cands, objective)
    assert list(e.terms) == names
    for i, total in enumerate((e.score, e.baseline, e.content, e.id)):  # score, baseline, content, id
        torch.testing.assert_close(sum(t[i] for t in e.terms.values()), total, atol=1e-5, rtol=0)
    for score, baseline, content, ids in e.terms.values():
        torch.testing.assert_close(content + ids, score - baseline, atol=1e-5, rtol=0)
    with torch.no_grad():
        ctr, cvr = model.forward_tasks(["u1"] * len(cands), [{}] * len(cands), torch.cat([hist, cands]),
                                       torch.arange(3, 3 + len(cands)), torch.arange(3).expand(len(cands), 3),
                                       torch.ones(len(cands), 3, dtype=torch.bool))
    if objective == "ctr":
        torch.testing.assert_close(e.terms["click"][0], ctr, atol=1e-5, rtol=0)  # the click logit
        return
    # In nats: the click term is log pCTR, the conversion term log pCVR of the same model.
    torch.testing.assert_close(e.terms["click"][0], torch.nn.functional.logsigmoid(ctr), atol=1e-5, rtol=0)
    torch.testing.assert_close(e.terms["conversion"][0], torch.nn.functional.logsigmoid(cvr), atol=1e-5, rtol=0)
    # The items' own conversion statistics are ID evidence: item 1 (candidate 0) converted
    # on every click, items 2 and 3 (candidates 1, 2) never did.
    conv_id = e.terms["conversion"][3]
    assert conv_id[0] > conv_id[1] + 0.1 and conv_id[0] > conv_id[2] + 0.1
    if objective == "value":
        value_id = e.terms["value"][3]
        # Item 1's conversions are worth 5, the mean per conversion 3: log((25 + 2 x 3) / 7 / 3).
        assert float(value_id[0]) == pytest.approx(math.log(31 / 7 / 3), abs=1e-4)
        torch.testing.assert_close(value_id[1:], torch.zeros_like(value_id[1:]))  # never converted: the mean
        torch.testing.assert_close(e.terms["value"][2], torch.zeros_like(value_id))  # content never moves value


def test_a_conversion_objective_rows_name_the_objective_and_units(items):
    model, reps = _model("em3", items)
    rows = explain_candidates(model, "u1", {}, reps[:2], reps[2:], "ctcvr").rows(["h0", "h1"])
    r = rows[0]
    assert r["objective"] == "ctcvr" and "logit of pCTCVR" in r["units"]
    assert set(r["terms"]) == {"click", "conversion", "odds"}
    assert sum(t["score"] for t in r["terms"].values()) == pytest.approx(r["score"], abs=1e-5)
    assert sum(t["content"] for t in r["terms"].values()) == pytest.approx(r["content"], abs=1e-5)
    with pytest.raises(ValueError, match="objective must be one of"):
        explain_candidates(EM3Model(ModelConfig.tiny(ctcvr_weight=0.0)), "u1", {}, reps[:0, :-2], reps[2:, :-2],
                           "ctcvr")
