"""Retention is enforced by the stores, on a real Redis: histories and join state
carry an expiry renewed by each write, popularity counters count a sliding window
of expiring buckets, snapshot versions past their maximum age are pruned unless the
pointer needs them, and the join-state eraser leaves a state the join loads back."""
from __future__ import annotations

import pytest

from em3.types import Click, Impression, SnapshotManifest
from stream.join import JoinConfig, JoinCore
from stream.state import PartitionCheckpoint, RedisJoinStateStore, erase_users

pytestmark = pytest.mark.integration

T0 = 1_767_225_600.0


def test_history_and_join_state_expire_after_their_last_write(settings, redis_client):
    from em3.redis_stores import RedisHistoryStore

    history = RedisHistoryStore(redis_client, settings.redis_prefix, ttl_s=3600)
    history.append("u1", "i1", T0)
    assert 3590 < redis_client.ttl(f"{settings.redis_prefix}hist:u1") <= 3600
    store = RedisJoinStateStore(redis_client, settings.redis_prefix, "g", history_ttl_s=60, state_ttl_s=600)
    store.acquire(0)
    core = JoinCore(JoinConfig(window_s=10, allowed_lateness_s=0, idle_timeout_s=None))
    core.add_impression(Impression("a", "r", "u2", "i", 0, T0))
    core.add_click(Click("a", "u2", "i", T0 + 1))
    out = core.take_output()
    store.checkpoint([PartitionCheckpoint(0, {"t": 2}, core.take_changes(), out.history, core)])
    assert 50 < redis_client.ttl(f"{settings.redis_prefix}hist:u2") <= 60
    for what in ("log", "meta", "epoch"):
        assert 590 < redis_client.ttl(f"{settings.redis_prefix}join:g:0:{what}") <= 600, what


def test_popularity_counters_count_a_sliding_window_of_expiring_buckets(settings, redis_client):
    from em3.redis_stores import RedisPopularityStore

    import time

    now = [time.time()]  # EXPIREAT is absolute: the store's clock must be the real one here
    pop = RedisPopularityStore(redis_client, settings.redis_prefix, ttl_s=300, buckets=3, clock=lambda: now[0])
    pop.incr_many("clicks", ["a", "a", "b"])
    now[0] += 150
    pop.incr_many("clicks", ["a"])
    assert pop.get_many("clicks", ["a", "b", "c"]) == [3.0, 1.0, 0.0]
    keys = sorted(redis_client.scan_iter(f"{settings.redis_prefix}pop:clicks:*"))
    assert len(keys) == 2 and all(redis_client.ttl(k) > 0 for k in keys)  # each bucket expires on its own
    now[0] += 400  # both buckets left the window (3 buckets of 100 s, plus the open one)
    assert pop.get_many("clicks", ["a", "b"]) == [0.0, 0.0]


def test_snapshot_versions_past_their_age_are_pruned_unless_the_pointer_needs_them(settings, redis_client):
    from em3.redis_stores import RedisSnapshotStore

    now = [T0]
    store = RedisSnapshotStore(redis_client, settings.redis_prefix, keep=10, signing_key=settings.snapshot_key,
                               max_age_s=100, clock=lambda: now[0])
    parent = None
    for k in range(4):  # v1 full, v2 delta, v3 full, v4 delta, a minute apart
        v = store.next_version("old")
        kind = "full" if k % 2 == 0 else "delta"
        store.publish(SnapshotManifest("old", v, parent, now[0], {}, {}, sha256="ab" * 32, num_bytes=1, kind=kind,
                                       base_version=parent if kind == "delta" else None), b"x")
        parent = v
        now[0] += 60
    assert store.versions("old") == [3, 4]  # v1 and v2 are older than 100 s; v4 needs v3
    now[0] += 1000
    store.prune("old")
    assert store.versions("old") == [3, 4]  # too old, but the pointer's chain: kept
    assert [m.version for m, _ in store.get_chain("old", 4)] == [3, 4]


def test_erased_join_state_loads_back_without_the_user(settings, redis_client):
    store = RedisJoinStateStore(redis_client, settings.redis_prefix, "g")
    epoch = store.acquire(0)
    core = JoinCore(JoinConfig(window_s=10, allowed_lateness_s=0, idle_timeout_s=None))
    for k, user in enumerate(["gone", "kept", "gone"]):
        core.add_impression(Impression(f"i{k}", "r", user, "x", 0, T0))
    core.add_click(Click("unknown", "gone", "x", T0 + 5))  # held: its impression is not here
    core.take_output()
    store.checkpoint([PartitionCheckpoint(0, {"t": 4}, core.take_changes(), [], core)])
    removed = erase_users(redis_client, settings.redis_prefix, {"gone"})
    assert removed["records"]["gone"] == 2 and removed["held_clicks"]["gone"] == 1
    assert int(redis_client.get(f"{settings.redis_prefix}join:g:0:epoch")) == epoch + 1  # the owner is fenced
    loaded, offsets = RedisJoinStateStore(redis_client, settings.redis_prefix, "g").load(0, core.config, 0.0)
    records, held = loaded.state()
    assert [r.impression.user_id for r in records] == ["kept"] and not held and offsets == {"t": 4}
