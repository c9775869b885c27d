"""Hot reload: pointer following, rollback, refusing bad snapshots, Redis outages, the watcher."""
from __future__ import annotations

from em3.app.services import wait_until


import pytest

from serving.ranking import RankingService
from serving.reloader import ReloaderConfig, SnapshotReloader, SnapshotWatcher
from serving.toy import ToyConfig, ToyLoader, corrupt, make_toy_snapshot


class _Listener:
    def __init__(self):
        self.swaps, self.failures, self.redis = [], [], []

    def on_swap(self, key, line, version, seconds):
        self.swaps.append(version)

    def on_failure(self, key, line, reason, error):
        self.failures.append(reason)

    def on_redis(self, ok):
        self.redis.append(ok)


@pytest.fixture
def reloader(memory_store, content, history):
    service = RankingService(content, history)
    return SnapshotReloader(memory_store, ToyLoader(), service.prepare, ReloaderConfig("main"), _Listener())


def test_nothing_published_means_not_ready(reloader):
    assert reloader.check() is False
    assert reloader.current is None and not reloader.status().ready


def test_loads_the_pointer_and_swaps_to_newer_versions(reloader, publish):
    publish(1)
    assert reloader.check() is True and reloader.current.version == 1
    assert len(reloader.current.cache) == 30  # catalog precomputed before the swap
    assert reloader.check() is False  # nothing new
    publish(2)
    old = reloader.current
    assert reloader.check() is True
    assert reloader.current.version == 2 and reloader.current is not old
    assert old.version == 1  # the old state is untouched, in-flight requests finish on it
    assert reloader.listener.swaps == [1, 2]


def test_follows_a_rollback_to_an_older_version(reloader, publish, memory_store):
    publish(1)
    publish(2)
    reloader.check()
    memory_store.latest["main"] = 1
    assert reloader.check() is True and reloader.current.version == 1


def test_bad_checksum_is_refused_and_the_last_good_keeps_serving(reloader, publish, memory_store, toy_config):
    publish(1)
    reloader.check()
    manifest, blob = make_toy_snapshot("main", 2, toy_config, seed=2)
    memory_store.publish(manifest, corrupt(blob))
    assert reloader.check() is False
    status = reloader.status()
    assert status.version == 1 and status.pointer == 2 and status.stale
    assert status.bad_versions == [2] and "checksum" in status.last_error
    assert reloader.listener.failures == ["snapshot"]
    assert reloader.check() is False and reloader.listener.failures == ["snapshot"]  # not retried
    publish(3)
    assert reloader.check() is True and reloader.current.version == 3


def test_config_change_in_a_line_is_refused(reloader, publish, memory_store):
    publish(1)
    reloader.check()
    manifest, blob = make_toy_snapshot("main", 2, ToyConfig(dim=4, buckets=16), seed=2)
    memory_store.publish(manifest, blob)
    assert reloader.check() is False
    assert "config mismatch" in reloader.status().last_error
    assert reloader.current.version == 1


def test_redis_outage_keeps_serving_and_is_reported(reloader, publish, memory_store):
    publish(1)
    reloader.check()
    memory_store.down = True
    assert reloader.check() is False
    status = reloader.status()
    assert status.ready and status.version == 1 and not status.redis_ok
    assert "redis" in status.last_error
    memory_store.down = False
    publish(2)
    assert reloader.check() is True and reloader.status().redis_ok


def test_a_fixed_version_is_never_replaced(memory_store, content, history, publish):
    service = RankingService(content, history)
    pinned = SnapshotReloader(memory_store, ToyLoader(), service.prepare, ReloaderConfig("main", version=1))
    publish(1)
    publish(2)
    assert pinned.check() is True and pinned.current.version == 1
    publish(3)
    assert pinned.check() is False and pinned.current.version == 1
    assert pinned.key == "main@1"


def test_build_errors_are_contained(memory_store, publish):
    def boom(line, manifest, model, previous):
        raise RuntimeError("precompute exploded")

    r = SnapshotReloader(memory_store, ToyLoader(), boom, ReloaderConfig("main"))
    publish(1)
    assert r.check() is False and "precompute exploded" in r.status().last_error


def test_watcher_follows_notices_and_survives_an_outage(reloader, publish, memory_store):
    watcher = SnapshotWatcher(memory_store, [reloader], poll_interval_s=0.2).start()
    try:
        publish(1)
        wait_until(lambda: reloader.current is not None and reloader.current.version == 1, 5.0, 'reloader state')
        publish(2)
        wait_until(lambda: reloader.current.version == 2, 5.0, 'reloader state')
        memory_store.down = True
        wait_until(lambda: not reloader.redis_ok, 5.0, 'reloader state')
        assert reloader.current.version == 2
        memory_store.down = False
        publish(3)
        wait_until(lambda: reloader.current.version == 3 and reloader.redis_ok, 5.0, 'reloader state')
    finally:
        watcher.stop()


def test_config_errors():
    with pytest.raises(ValueError, match="version must be > 0 or None, but -3 is given"):
        ReloaderConfig("main", version=-3)
    with pytest.raises(ValueError, match="poll_interval_s must be > 0, but 0 is given"):
        SnapshotWatcher(None, [], poll_interval_s=0)




def test_a_server_whose_pointer_names_a_refused_version_serves_the_newest_good_one(reloader, memory_store,
                                                                                   toy_config):
    """A forged or corrupt version at the pointer must not keep a starting server
    unready: it serves the newest older version that verifies (found by the chaos
    benchmark: a server restarted while the pointer named a forged version stayed 503)."""
    from serving.toy import corrupt, make_toy_snapshot

    for version in (1, 2):
        memory_store.publish(*make_toy_snapshot("main", version, toy_config, seed=version))
    manifest, blob = make_toy_snapshot("main", 3, toy_config, seed=3)
    memory_store.publish(manifest, corrupt(blob))
    assert reloader.check()
    assert reloader.current.version == 2 and 3 in reloader.status().bad_versions
