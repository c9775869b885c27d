"""Fixtures for serving unit tests: in-memory stores, a fake producer, toy snapshots."""
from __future__ import annotations

import json
import queue
import threading

import pytest

from em3.errors import SnapshotError
from em3.stores import InMemoryContentStore, InMemoryHistoryStore
from em3.types import ItemContent
from serving.toy import ToyConfig, make_toy_snapshot


class MemorySnapshotStore:
    """The parts of RedisSnapshotStore the reloader uses, in memory; ``down`` fails calls."""

    def __init__(self) -> None:
        self.snaps: dict[tuple[str, int], tuple] = {}
        self.latest: dict[str, int] = {}
        self.down = False
        self.notices: "queue.Queue[dict]" = queue.Queue()

    def _check(self) -> None:
        if self.down:
            raise ConnectionError("redis is down (test)")

    def publish(self, manifest, blob) -> None:
        self._check()
        self.snaps[(manifest.model_line, manifest.version)] = (manifest, blob)
        self.latest[manifest.model_line] = manifest.version
        self.notices.put({"type": "message", "channel": b"snapshots",
                          "data": json.dumps({"line": manifest.model_line, "version": manifest.version})})

    def latest_version(self, line):
        self._check()
        return self.latest.get(line)

    def versions(self, line):
        self._check()
        return sorted(v for (l, v) in self.snaps if l == line)

    def get(self, line, version=None):
        self._check()
        version = self.latest[line] if version is None else version
        if (line, version) not in self.snaps:
            raise SnapshotError(f"no {line} v{version}")
        return self.snaps[(line, version)]

    def subscribe(self):
        self._check()
        return _MemoryPubSub(self)


class _MemoryPubSub:
    def __init__(self, store: MemorySnapshotStore) -> None:
        self.store = store

    def subscribe(self, channel) -> None:
        pass

    def get_message(self, timeout=0.0):
        self.store._check()
        try:
            return self.store.notices.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        pass


class FakeProducer:
    """Records produce() calls; ``full`` makes produce raise BufferError."""

    def __init__(self) -> None:
        self.records: list[tuple[str, bytes, bytes]] = []
        self.full = False
        self.lock = threading.Lock()

    def produce(self, topic, key=None, value=None, on_delivery=None):
        if self.full:
            raise BufferError("queue full")
        with self.lock:
            self.records.append((topic, key, value))
        if on_delivery is not None:
            on_delivery(None, None)

    def poll(self, timeout=0):
        return 0

    def flush(self, timeout=0):
        return 0


TOY = ToyConfig(dim=8, buckets=256, history_len=10)


@pytest.fixture
def toy_config() -> ToyConfig:
    return TOY


@pytest.fixture
def memory_store() -> MemorySnapshotStore:
    return MemorySnapshotStore()


@pytest.fixture
def fake_producer() -> FakeProducer:
    return FakeProducer()


@pytest.fixture
def catalog() -> list[ItemContent]:
    return [ItemContent(f"i{n}", text=f"item number {n} genre{n % 3}") for n in range(30)]


@pytest.fixture
def content(catalog) -> InMemoryContentStore:
    return InMemoryContentStore(catalog)


@pytest.fixture
def history() -> InMemoryHistoryStore:
    h = InMemoryHistoryStore()
    h.append_many([("u1", f"i{n}", 1.7e9 + n) for n in range(5)])
    return h


@pytest.fixture
def publish(memory_store):
    """publish(version, seed=None, line="main") -> manifest: a toy snapshot into the memory store."""

    def _publish(version: int, seed: int | None = None, line: str = "main"):
        manifest, blob = make_toy_snapshot(line, version, TOY, seed=version if seed is None else seed)
        memory_store.publish(manifest, blob)
        return manifest

    return _publish


class MemoryPopularity:
    """RedisPopularityStore in memory."""

    def __init__(self) -> None:
        self.counts: dict[str, dict[str, float]] = {"clicks": {}, "impressions": {}}

    def incr_many(self, kind, item_ids, amount=1.0):
        for i in item_ids:
            self.counts[kind][i] = self.counts[kind].get(i, 0.0) + amount

    def get_many(self, kind, item_ids):
        return [self.counts[kind].get(i, 0.0) for i in item_ids]


@pytest.fixture
def make_runtime(memory_store, content, history, fake_producer):
    """make_runtime(experiment=None, **server_config) -> a ServingRuntime on in-memory parts."""
    from em3.config import KafkaSettings, RedisSettings, Settings, TopicNames
    from em3.experiment import ExperimentConfig
    from serving.server import ServerConfig, ServingRuntime
    from serving.toy import ToyLoader

    made = []

    def _make(experiment=None, **kwargs):
        # Raw user IDs explicitly allowed: these tests look at ranking, not at the edge
        # (tests/functional/test_privacy_http.py runs the server with a key).
        settings = Settings(KafkaSettings("127.0.0.1:1"), RedisSettings("redis://127.0.0.1:1/0"), TopicNames("t."),
                            allow_raw_user_ids=True)
        kwargs.setdefault("trusted_network", True)
        config = ServerConfig(experiment or ExperimentConfig.single_line("main"), **kwargs)
        runtime = ServingRuntime(config, ToyLoader(), memory_store, content, history,
                                 popularity=MemoryPopularity(), producer=fake_producer, settings=settings)
        made.append(runtime)
        return runtime

    yield _make
    for runtime in made:
        runtime.stop()
