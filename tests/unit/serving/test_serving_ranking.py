"""The ranking service: two-speed content rows, cold start, unknown candidates, invalidation."""
from __future__ import annotations

import time

import pytest
import torch

from em3.types import ItemContent
from serving.ranking import ItemRepCache, RankingConfig, RankingService
from serving.toy import ToyLoader, ToyModel, make_toy_snapshot


def _state(service, toy_config, version=1, previous=None):
    manifest, blob = make_toy_snapshot("main", version, toy_config, seed=version)
    model = ToyLoader().load(manifest, blob, None)
    return service.prepare("main", manifest, model, previous)


def test_prepare_precomputes_the_catalog(content, history, toy_config, catalog):
    service = RankingService(content, history)
    state = _state(service, toy_config)
    assert len(state.cache) == len(catalog)
    assert state.version == 1


def test_rank_orders_by_model_score_and_matches_the_bare_model(content, history, toy_config):
    service = RankingService(content, history)
    state = _state(service, toy_config)
    ids = [f"i{n}" for n in range(10, 30)]
    result = service.rank(state, "u1", ids, {"device": "ios"}, k=5)
    assert len(result.items) == 5
    scores = [r.score for r in result.items]
    assert scores == sorted(scores, reverse=True)
    assert [r.position for r in result.items] == list(range(5))
    hist = state.model.item_representations(history.get("u1", 10), content.get_many(history.get("u1", 10)))
    cands = state.model.item_representations(ids, content.get_many(ids))
    direct = state.model.score("u1", {}, hist, cands)
    best = int(torch.argmax(direct))
    assert result.items[0].item_id == ids[best]
    assert result.items[0].score == pytest.approx(float(direct[best]), rel=1e-5)
    assert result.history_len == 5
    assert result.unknown_item_ids == []


def test_unknown_candidates_are_reported_and_scored_or_dropped(content, history, toy_config):
    ids = ["i1", "nope-1", "i2", "nope-2"]
    service = RankingService(content, history)
    result = service.rank(_state(service, toy_config), "u1", ids)
    assert result.unknown_item_ids == ["nope-1", "nope-2"]
    assert {r.item_id for r in result.items} == set(ids)
    drop = RankingService(content, history, RankingConfig(unknown_candidates="drop"))
    result = drop.rank(_state(drop, toy_config), "u1", ids)
    assert result.unknown_item_ids == ["nope-1", "nope-2"]
    assert [r.item_id for r in result.items] == [r.item_id for r in result.items if r.item_id.startswith("i")]
    assert len(result.items) == 2


def test_all_candidates_unknown_and_dropped_gives_an_empty_ranking(content, history, toy_config):
    service = RankingService(content, history, RankingConfig(unknown_candidates="drop"))
    result = service.rank(_state(service, toy_config), "u1", ["x", "y"])
    assert result.items == [] and result.unknown_item_ids == ["x", "y"]


def test_a_new_item_ranks_from_its_content_at_once(content, history, toy_config):
    service = RankingService(content, history, RankingConfig(unknown_ttl_s=60.0))
    state = _state(service, toy_config)
    assert service.rank(state, "u1", ["fresh"]).unknown_item_ids == ["fresh"]
    content.put_many([ItemContent("fresh", text="brand new thing")])
    service.invalidate(["fresh"])  # what POST /v1/items does
    result = service.rank(state, "u1", ["fresh", "i1"])
    assert result.unknown_item_ids == []
    row = state.cache.get("fresh", 0.0)
    expected = state.model.item_content(["fresh"], [ItemContent("fresh", text="brand new thing")])[0]
    assert torch.allclose(row.rep, expected)


def test_unknown_rows_expire_so_registration_elsewhere_is_seen(content, history, toy_config):
    service = RankingService(content, history, RankingConfig(unknown_ttl_s=0.0))
    state = _state(service, toy_config)
    assert service.rank(state, "u1", ["late"]).unknown_item_ids == ["late"]
    content.put_many([ItemContent("late", text="registered by another server")])
    assert service.rank(state, "u1", ["late"]).unknown_item_ids == []


def test_updated_content_changes_the_row(content, history, toy_config):
    service = RankingService(content, history)
    state = _state(service, toy_config)
    before = state.cache.get("i3", 0.0).rep.clone()
    content.put_many([ItemContent("i3", text="completely different words now")])
    service.invalidate(["i3"])
    service.rank(state, "u1", ["i3"])
    assert not torch.allclose(state.cache.get("i3", 0.0).rep, before)


def test_next_version_precomputes_what_the_previous_one_served(content, history, toy_config):
    service = RankingService(content, history)
    v1 = _state(service, toy_config)
    service.rank(v1, "u1", ["adhoc-1", "adhoc-2"])  # unregistered: cached with a TTL
    v2 = _state(service, toy_config, version=2, previous=v1)
    assert "adhoc-1" in v2.cache.keys()


def test_stale_epoch_rows_are_not_stored():
    cache = ItemRepCache(10)
    epochs = cache.epochs(["a"])
    cache.invalidate(["a"])  # content changed while the row was being computed
    stored = cache.put_many(["a"], torch.zeros(1, 2), [True], epochs, [float("inf")])
    assert stored == 0 and len(cache) == 0


def test_cache_is_bounded():
    cache = ItemRepCache(3)
    ids = ["a", "b", "c", "d"]
    cache.put_many(ids, torch.zeros(4, 2), [True] * 4, [0] * 4, [float("inf")] * 4)
    assert cache.keys() == ["b", "c", "d"]


def test_gather_reuses_slots_and_marks_missing_and_expired_rows():
    cache = ItemRepCache(2)
    rows = torch.arange(6, dtype=torch.float32).reshape(3, 2)
    cache.put_many(["a", "b"], rows[:2], [True, False], [0, 0], [float("inf"), 5.0])
    got, known, missing = cache.gather(["b", "zz", "a"], now=1.0)
    assert torch.equal(got, torch.tensor([[2.0, 3.0], [0.0, 0.0], [0.0, 1.0]]))
    assert known == [False, False, True] and missing == [1]
    _, _, missing = cache.gather(["b"], now=6.0)  # the unregistered row has expired
    assert missing == [0]
    cache.put_many(["c"], rows[2:], [True], [0], [float("inf")])  # evicts "a", reuses its slot
    got, known, missing = cache.gather(["a", "c", "b"], now=1.0)
    assert missing == [0] and torch.equal(got[1], rows[2]) and torch.equal(got[2], rows[1])
    assert cache.keys() == ["b", "c"] and torch.equal(cache.get("c", 1.0).rep, rows[2])
    with pytest.raises(ValueError, match="rows must have shape"):
        cache.put_many(["d"], torch.zeros(1, 3), [True], [0], [float("inf")])


class _BrokenHistory:
    def get(self, user_id, limit, before=None):
        raise ConnectionError("redis down")


def test_history_outage_ranks_without_history(content, toy_config):
    service = RankingService(content, _BrokenHistory())
    result = service.rank(_state(service, toy_config), "u1", ["i1", "i2"])
    assert len(result.items) == 2 and result.history_len == 0
    assert service.history_errors == 1


def test_rank_checks_its_arguments(content, history, toy_config):
    service = RankingService(content, history, RankingConfig(max_candidates=3))
    state = _state(service, toy_config)
    with pytest.raises(ValueError, match="at most 3 candidates, but 4 are given"):
        service.rank(state, "u1", ["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="k must be > 0, but 0 is given"):
        service.rank(state, "u1", ["a"], k=0)


@pytest.mark.parametrize("field, value", [("history_len", -3), ("max_candidates", 0), ("rep_batch_size", -1)])
def test_ranking_config_messages(field, value):
    with pytest.raises(ValueError, match=f"{field} must be > 0, but {value} is given"):
        RankingConfig(**{field: value})


def _retrained(model: ToyModel, *, towers: bool) -> ToyModel:
    """``model`` after more training: new ID rows and, with ``towers``, new content towers."""
    g = torch.Generator().manual_seed(7)
    tensors = {"item_table": torch.randn(model.item_table.shape, generator=g), "user_table": model.user_table,
               "bias": model.bias, "token_table": model.token_table}
    if towers:
        tensors["token_table"] = torch.randn(model.token_table.shape, generator=g)
    return ToyModel(model.config, tensors)


def test_a_version_with_the_same_towers_shares_the_content_rows_and_composes_its_own(content, history,
                                                                                        toy_config):
    service = RankingService(content, history)
    v1 = _state(service, toy_config)
    model2 = _retrained(v1.model, towers=False)
    v2 = service.prepare("main", None, model2, v1)
    assert v2.content is v1.content and not v2.content.refreshing  # nothing recomputed per item
    ids = ["i3", "i4"]
    reps, _ = service.representations(v2, ids)
    assert torch.allclose(reps, model2.item_representations(ids, content.get_many(ids)))


def test_new_towers_keep_the_old_content_rows_until_a_background_refresh_replaces_them(content, history,
                                                                                         toy_config, catalog):
    service = RankingService(content, history, RankingConfig(content_refresh_s=0.0))
    v1 = _state(service, toy_config)
    old_rows = v1.cache.get("i3", 0.0).rep.clone()
    model2 = _retrained(v1.model, towers=True)
    v2 = service.prepare("main", None, model2, v1)
    deadline = time.monotonic() + 10
    while v2.content.key != model2.content_key and time.monotonic() < deadline:
        time.sleep(0.01)
    assert v2.content.key == model2.content_key and v2.content.refreshes == 1
    new_row = v2.cache.get("i3", 0.0).rep
    assert not torch.allclose(new_row, old_rows)
    assert torch.allclose(new_row, model2.item_content(["i3"], content.get_many(["i3"]))[0])
    assert len(v2.cache) == len(catalog)  # the whole catalog, recomputed
