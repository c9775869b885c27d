"""The fresh slot: a new item shown at a fixed position, the same in every line."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from serving.ranking import RankingConfig, RankingService, promote_fresh
from serving.toy import ToyLoader, ToyModel, make_toy_snapshot


def test_the_best_ranked_fresh_candidate_moves_up_to_the_slot():
    counts = [50, 40, 30, 2, 0, 20]
    order, chosen = promote_fresh([0, 1, 2, 3, 4, 5], counts, slot=1, fresh_impressions=10, k=4)
    assert (order, chosen) == ([0, 3, 1, 2, 4, 5], 3)  # 3, not 4: the better-scored of the fresh two


@pytest.mark.parametrize("order,counts,slot,k", [
    ([0, 1, 2], [0, 50, 50], 1, 3),  # the fresh item already ranks above the slot
    ([0, 1, 2], [50, 50, 50], 1, 3),  # nothing fresh
    ([0, 1, 2], [50, 50, 0], 3, 3),  # the slot is beyond what is shown
])
def test_nothing_moves_when_the_slot_has_nothing_to_do(order, counts, slot, k):
    assert promote_fresh(order, counts, slot, 10, k) == (order, None)


@given(st.lists(st.integers(0, 30), min_size=1, max_size=20), st.integers(0, 25), st.integers(1, 25))
def test_promotion_is_a_permutation_that_moves_one_fresh_item(counts, slot, k):
    order = list(range(len(counts)))[::-1]
    out, chosen = promote_fresh(order, counts, slot, 10, k)
    assert sorted(out) == sorted(order)
    if chosen is None:
        assert out == order
    else:
        assert counts[chosen] < 10 and out[slot] == chosen and order.index(chosen) > slot
        assert [i for i in out if i != chosen] == [i for i in order if i != chosen]


class CountingToy(ToyModel):
    """The toy model with learned-impression counts per item."""

    counts: dict[str, float] = {}

    def impression_counts(self, item_ids):
        return torch.tensor([self.counts.get(i, 0.0) for i in item_ids])


def _state(service, toy_config, model_class=ToyModel, counts=None):
    manifest, blob = make_toy_snapshot("main", 1, toy_config, seed=1)
    toy = ToyLoader().load(manifest, blob, None)
    model = model_class(toy.config, {"item_table": toy.item_table, "token_table": toy.token_table,
                                     "user_table": toy.user_table, "bias": toy.bias})
    if counts is not None:
        model.counts = counts
    return service.prepare("main", manifest, model, None)


def test_the_service_shows_a_fresh_item_at_the_slot_and_counts_it(content, history, toy_config):
    ids = [f"i{n}" for n in range(10, 30)]
    plain = RankingService(content, history)
    by_score = [r.item_id for r in plain.rank(_state(plain, toy_config), "u1", ids, k=5).items]
    fresh = by_score[-1]  # ranked 5th of 5 by score; every other candidate is well known
    counts = {i: 100.0 for i in ids} | {fresh: 3.0}
    service = RankingService(content, history, RankingConfig(fresh_slot=1))
    result = service.rank(_state(service, toy_config, CountingToy, counts), "u1", ids, k=5)
    assert [r.item_id for r in result.items] == [by_score[0], fresh, *by_score[1:4]]
    assert [r.position for r in result.items] == list(range(5))
    assert [r.promoted for r in result.items] == [False, True, False, False, False]
    assert service.fresh_promotions == 1
    # A model that does not count impressions is ranked by score, slot or not.
    uncounted = service.rank(_state(service, toy_config), "u1", ids, k=5)
    assert [r.item_id for r in uncounted.items] == by_score and service.fresh_promotions == 1


def test_a_candidate_without_a_finite_score_is_never_promoted(content, history, toy_config):
    service = RankingService(content, history, RankingConfig(fresh_slot=0))
    state = _state(service, toy_config, CountingToy, {"a": 100.0, "b": 0.0, "c": 2.0})
    scores = torch.tensor([1.0, -math.inf, 0.5])  # "b" is fresh but its score was NaN
    assert service._promote_fresh(state, ["a", "b", "c"], scores, [0, 2, 1], k=3) == ([2, 0, 1], 2)


def test_em3_counts_what_its_learner_learned():
    from em3.model import EM3Model, ModelConfig

    model = EM3Model(ModelConfig.tiny("id_only"))
    model.observe_impressions(["a", "a", "a", "b"], ["u", "u", "u", "u"], [1, 0, 0, 1])
    assert model.impression_counts(["a", "b", "new"]).tolist() == [3.0, 1.0, 0.0]
    assert EM3Model(ModelConfig.tiny("id_only", stat_features=False)).impression_counts(["a"]) is None
