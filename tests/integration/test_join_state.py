"""The Redis join state store: checkpoint/load round trip, compaction, fencing."""
from __future__ import annotations

import math

import pytest

from em3 import codec
from em3.redis_stores import RedisHistoryStore
from em3.types import Click, Impression
from stream.join import JoinConfig, JoinCore
from stream.state import FencedError, PartitionCheckpoint, RedisJoinStateStore

pytestmark = pytest.mark.integration

CFG = JoinConfig(window_s=10, allowed_lateness_s=0, max_correction_delay_s=100, idle_timeout_s=None)
T0 = 1_767_225_600.0


def _imp(k: int, t: float) -> Impression:
    return Impression(f"imp{k}", "r", f"u{k % 3}", f"i{k}", 0, T0 + t)


def _checkpoint(store: RedisJoinStateStore, core: JoinCore, offsets: dict) -> list:
    out = core.take_output()
    store.checkpoint([PartitionCheckpoint(0, offsets, core.take_changes(), out.history, core)])
    return out.samples


def _snapshot(core: JoinCore):
    records, orphans = core.state()
    recs = {r.impression.impression_id: (r.impression, r.status, list(r.held)) for r in records}
    return recs, orphans, core.meta()


@pytest.mark.parametrize("compact", [False, True])
def test_checkpoints_load_back_to_the_same_core(redis_client, settings, compact, monkeypatch):
    if compact:
        monkeypatch.setattr("stream.state._MIN_COMPACT_BYTES", 1)  # compact at every checkpoint
    store = RedisJoinStateStore(redis_client, settings.redis_prefix, "g")
    store.acquire(0)
    core = JoinCore(CFG)
    for k in range(30):
        imp = _imp(k, k)
        core.add_impression(imp, raw=codec.encode(imp))
    core.add_click(Click("imp3", "u0", "i3", T0 + 5), offset=7)  # positive
    core.add_click(Click("ghost", "u0", "i0", T0 + 40), offset=8)  # held orphan
    core.add_click(Click("imp20", "u2", "i20", T0 + 35), offset=9)  # after the window: held on the record
    _checkpoint(store, core, {"imps": 30, "clicks": 3})
    core.advance_watermark(T0 + 25)  # closes windows: status changes only ("S" entries)
    core.add_click(Click("imp2", "u2", "i2", T0 + 30), offset=10)  # correction
    _checkpoint(store, core, {"imps": 30, "clicks": 4})
    core.advance_watermark(T0 + 115)  # evicts the oldest
    samples = _checkpoint(store, core, {"imps": 30, "clicks": 4})
    assert samples and core.records < 30

    loaded, offsets = store.load(0, CFG, now=0.0)
    assert offsets == {"imps": 30, "clicks": 4}
    assert _snapshot(loaded) == _snapshot(core)
    assert (store.compactions >= 1) == compact

    # Both continue identically.
    for c in (core, loaded):
        c.add_click(Click("imp25", "u1", "i25", T0 + 40), offset=11)
        c.advance_watermark(math.inf)
    a, b = core.take_output(), loaded.take_output()
    assert [(s.sample_id, s.label) for s in a.samples] == [(s.sample_id, s.label) for s in b.samples]
    assert [d.reason for d in a.dead_letters] == [d.reason for d in b.dead_letters]

    history = RedisHistoryStore(redis_client, settings.redis_prefix)
    assert history.get("u0", 10) == ["i3"] and history.get("u2", 10) == ["i20", "i2"]  # newest first


def test_a_fenced_worker_cannot_overwrite_the_new_owner(redis_client, settings):
    old = RedisJoinStateStore(redis_client, settings.redis_prefix, "g")
    new = RedisJoinStateStore(redis_client, settings.redis_prefix, "g")
    old.acquire(0)
    new.acquire(0)  # a rebalance moved partition 0
    core = JoinCore(CFG)
    core.add_impression(_imp(1, 0))
    with pytest.raises(FencedError):
        _checkpoint(old, core, {"imps": 1})
    _checkpoint(new, core, {"imps": 1})
    assert new.load(0, CFG, 0.0)[1] == {"imps": 1}


def test_history_is_trimmed_to_its_length(redis_client, settings):
    store = RedisJoinStateStore(redis_client, settings.redis_prefix, "g", history_length=3)
    store.acquire(0)
    history = [("u", f"i{k}", T0 + k) for k in range(5)]
    store.checkpoint([PartitionCheckpoint(0, {"t": 1}, None, history)])
    reader = RedisHistoryStore(redis_client, settings.redis_prefix)
    assert reader.get("u", 10) == ["i4", "i3", "i2"]
    assert reader.get("u", 2) == ["i4", "i3"] and reader.get("u", 0) == [] and reader.get("nobody", 5) == []
    assert reader.get("u", 10, before=T0 + 4) == ["i3", "i2"]  # clicks at or after `before` are left out
    assert reader.get_many(["u", "nobody"], 1) == [["i4"], []]
