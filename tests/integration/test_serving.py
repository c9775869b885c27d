"""The server on the real broker and Redis, with the real EM3 model (tiny config), over sockets."""
from __future__ import annotations

import functools
import threading
import time

import httpx
import json
import pytest

from em3 import codec
from em3.types import ItemContent
from em3.privacy import Pseudonymizer

pytestmark = pytest.mark.integration

LINE = "main"
from em3.app.services import wait_until

_wait = functools.partial(wait_until, timeout_s=30.0, what="condition", interval_s=0.05)


@pytest.fixture(scope="module")
def tiny_model():
    from em3.model import EM3Model, ModelConfig

    config = ModelConfig.tiny()
    return config, EM3Model(config).trainable_state_dict()


class Publisher:
    """Publishes perturbed versions of one tiny EM3 state into a line."""

    def __init__(self, store, config, state):
        self.store, self.config, self.state = store, config, state

    def publish(self, line: str = LINE, corrupt: bool = False) -> int:
        from em3 import snapshot

        version = self.store.next_version(line)
        state = {k: v + 0.01 * version for k, v in self.state.items()}
        blob, manifest = snapshot.pack(state, model_line=line, version=version, config=self.config,
                                       offsets={"t.samples:0": version})
        if corrupt:
            mid = len(blob) // 2
            blob = blob[:mid] + bytes([blob[mid] ^ 0xFF]) + blob[mid + 1:]
        self.store.publish(manifest, blob)
        return version


@pytest.fixture
def publisher(settings, redis_client, tiny_model):
    from em3.redis_stores import RedisSnapshotStore

    return Publisher(RedisSnapshotStore(redis_client, settings.redis_prefix, signing_key=settings.snapshot_key), *tiny_model)


@pytest.fixture
def catalog(settings, redis_client):
    from em3.redis_stores import RedisContentStore, RedisHistoryStore

    items = [ItemContent(f"i{n}", text=f"movie {n} about genre {n % 4}") for n in range(40)]
    RedisContentStore(redis_client, settings.redis_prefix).put_many(items)
    RedisHistoryStore(redis_client, settings.redis_prefix).append_many(  # under u1's pseudonym, as the join writes
        [(Pseudonymizer(settings.user_id_key)("u1"), f"i{n}", 1.7e9 + n) for n in range(8)]
    )
    return [i.item_id for i in items]


@pytest.fixture
def serve(settings):
    """serve(experiment=None, **server_config) -> a running ServerHandle on a free port."""
    from em3.experiment import ExperimentConfig
    from serving.app import serve_in_thread
    from serving.scoring import EM3Loader
    from serving.server import ServerConfig, ServingRuntime
    from stream.kafka import ensure_topics

    ensure_topics(settings.kafka, settings.topics)
    handles = []

    def _serve(experiment=None, settings_=None, **kwargs):
        kwargs.setdefault("poll_interval_s", 0.5)
        kwargs.setdefault("trusted_network", True)
        config = ServerConfig(experiment or ExperimentConfig.single_line(LINE), **kwargs)
        runtime = ServingRuntime.from_settings(settings_ or settings, config, EM3Loader())
        handle = serve_in_thread(runtime, port=0)
        handles.append(handle)
        return handle

    yield _serve
    for handle in handles:
        handle.stop()


def _ready(client) -> bool:
    return client.get("/readyz").status_code == 200


def _rank(client, user="u1", items=None, k=5):
    return client.post("/v1/rank", json={"user_id": user, "item_ids": items or ["i1", "i2", "i3", "i4"], "k": k})


def test_published_snapshots_are_served_and_followed(serve, publisher, catalog):
    handle = serve()
    with httpx.Client(base_url=handle.url, timeout=10) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 503  # nothing published yet
        v1 = publisher.publish()
        _wait(lambda: _ready(client), what="ready")
        out = _rank(client, items=catalog[:20]).json()
        assert out["model_version"] == v1 and out["model_line"] == LINE and len(out["items"]) == 5
        v2 = publisher.publish()
        _wait(lambda: _rank(client).json()["model_version"] == v2, what="served v2")
        text = client.get("/metrics").text
        assert f'em3_serving_model_version{{line="{LINE}",source="{LINE}"}} {float(v2)}' in text


@pytest.mark.parametrize("executor", ["loop", "threads"])
def test_swaps_under_concurrent_requests_fail_nothing(serve, publisher, catalog, executor):
    publisher.publish()
    handle = serve(poll_interval_s=0.2, rank_executor=executor)
    stop = threading.Event()
    results: list[tuple[int, int]] = []
    errors: list[str] = []
    lock = threading.Lock()

    def hammer(n: int) -> None:
        with httpx.Client(base_url=handle.url, timeout=10) as client:
            _wait(lambda: _ready(client))
            while not stop.is_set():
                try:
                    r = _rank(client, user=f"user{n}", items=catalog[:30])
                    with lock:
                        if r.status_code == 200:
                            results.append((n, r.json()["model_version"]))
                        else:
                            errors.append(f"{r.status_code} {r.text[:200]}")
                except httpx.HTTPError as exc:
                    with lock:
                        errors.append(repr(exc))

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    _wait(lambda: len(results) > 10, what="first answers")
    published = [publisher.publish() for _ in range(5) if not time.sleep(0.4)]
    with httpx.Client(base_url=handle.url, timeout=10) as client:
        _wait(lambda: _rank(client).json()["model_version"] == published[-1], what="last version served")
    time.sleep(0.3)
    stop.set()
    for t in threads:
        t.join(10)
    assert errors == []
    assert len(results) > 20
    for n in range(4):  # each client sees versions only move forward
        versions = [v for m, v in results if m == n]
        assert versions == sorted(versions)
    assert len({v for _, v in results}) >= 2


def test_a_corrupt_snapshot_is_refused_and_the_last_good_keeps_serving(serve, publisher, catalog):
    good = publisher.publish()
    handle = serve()
    with httpx.Client(base_url=handle.url, timeout=10) as client:
        _wait(lambda: _ready(client))
        bad = publisher.publish(corrupt=True)
        status = _wait(lambda: (s := client.get("/readyz").json()["sources"][LINE])["bad_versions"] and s,
                       what="bad version noticed")
        assert status["version"] == good and status["pointer"] == bad and status["stale"]
        assert "checksum" in status["last_error"]
        assert _rank(client).json()["model_version"] == good
        assert 'reason="snapshot"' in client.get("/metrics").text
        fixed = publisher.publish()
        _wait(lambda: _rank(client).json()["model_version"] == fixed, what="recovered")


def test_impressions_reach_kafka_with_arm_version_and_propensity(serve, publisher, catalog, settings):
    from em3.experiment import ArmConfig, ExperimentConfig
    from stream.kafka import make_consumer, wait_for_assignment

    version = publisher.publish()
    exp = ExperimentConfig("exp", (ArmConfig("model", 0.5, "line", LINE), ArmConfig("rnd", 0.5, "random")), salt="s")
    handle = serve(exp)
    served = {}
    with httpx.Client(base_url=handle.url, timeout=10) as client:
        _wait(lambda: _ready(client))
        for n in range(20):
            out = _rank(client, user=f"user{n}", items=catalog[:8], k=3).json()
            for item in out["items"]:
                served[item["impression_id"]] = (out["arm"], out["model_version"], item["propensity"],
                                                 Pseudonymizer(settings.user_id_key)(f"user{n}"))
    consumer = make_consumer(settings.kafka, "g-imp-test")
    consumer.subscribe([settings.topics.impressions])
    wait_for_assignment(consumer)
    got = {}
    deadline = time.monotonic() + 30
    while len(got) < len(served) and time.monotonic() < deadline:
        for msg in consumer.consume(200, timeout=0.2):
            imp = codec.decode_impression(msg.value())
            assert msg.key() == imp.user_id.encode()
            got[imp.impression_id] = (imp.arm, imp.model_version, imp.propensity, imp.user_id)
    consumer.close()
    assert got == served
    arms = {v[0] for v in got.values()}
    assert arms == {"model", "rnd"}
    assert all(v[1] == version and v[2] == 1.0 for v in got.values() if v[0] == "model")
    assert all(v[1] == 0 and v[2] == pytest.approx(1 / 8) for v in got.values() if v[0] == "rnd")


def test_bad_input_gets_422_naming_the_field_and_clicks_and_items_work(serve, publisher, catalog, settings):
    publisher.publish()
    handle = serve()
    with httpx.Client(base_url=handle.url, timeout=10) as client:
        _wait(lambda: _ready(client))
        r = client.post("/v1/rank", json={"user_id": "u1", "item_ids": ["a", "a"]})
        assert r.status_code == 422 and r.json()["detail"][0]["field"] == "item_ids"
        r = client.post("/v1/rank", json={"user_id": "u1", "item_ids": ["a"], "k": -1})
        assert r.status_code == 422 and r.json()["detail"][0]["field"] == "k"
        r = client.post("/v1/rank", content=b"x" * (5 * 1024 * 1024), headers={"content-type": "application/json"})
        assert r.status_code == 413
        click = {"impression_id": "x-0", "user_id": "u1", "item_id": "i1"}
        assert client.post("/v1/click", json=click).status_code == 401  # writes need the key
        key = {"Authorization": f"Bearer {settings.api_key}"}
        r = client.post("/v1/click", json=click, headers=key)
        assert r.status_code == 202
        out = _rank(client, items=["brand-new", "i1"]).json()
        assert out["unknown_item_ids"] == ["brand-new"]
        r = client.post("/v1/items", json={"item_id": "brand-new", "text": "fresh arrival"}, headers=key)
        assert r.status_code == 200
        assert _rank(client, items=["brand-new", "i1"]).json()["unknown_item_ids"] == []


def test_a_snapshot_not_signed_with_the_key_is_never_served(serve, publisher, catalog, settings, redis_client):
    """Someone who can write to Redis but lacks the snapshot key publishes weights
    with a matching sha256: unsigned, or signed with another key. The server keeps
    serving the last good version and says it is degraded."""
    import msgspec

    from em3.redis_stores import RedisSnapshotStore
    from em3.signing import sign_manifest

    good = publisher.publish()
    handle = serve()
    store = RedisSnapshotStore(redis_client, settings.redis_prefix, signing_key=settings.snapshot_key)
    manifest, blob = store.get(LINE)
    with httpx.Client(base_url=handle.url, timeout=10) as client:
        _wait(lambda: _ready(client))
        for version, forged in ((good + 1, msgspec.structs.replace(manifest, signature="")),
                                (good + 2, sign_manifest(manifest, "not-the-key"))):
            forged = msgspec.structs.replace(forged, version=version)
            redis_client.set(f"{settings.redis_prefix}snap:{LINE}:{version}:blob", blob)
            redis_client.set(f"{settings.redis_prefix}snap:{LINE}:{version}:manifest",
                             msgspec.json.encode(forged))
            redis_client.zadd(f"{settings.redis_prefix}snap:{LINE}:versions", {str(version): version})
            redis_client.set(f"{settings.redis_prefix}snap:{LINE}:latest", version)
            redis_client.publish(store.channel, json.dumps({"line": LINE, "version": version}))
            time.sleep(2.5)
            assert _rank(client).json()["model_version"] == good
            ready = client.get("/readyz").json()
            assert ready["degraded"], ready


def test_ab_assignment_is_the_same_on_two_servers(serve, publisher, catalog):
    from em3.experiment import ArmConfig, ExperimentConfig

    publisher.publish()
    exp = ExperimentConfig("exp", (ArmConfig("a", 0.7, "line", LINE), ArmConfig("b", 0.3, "popularity")), salt="s")
    h1, h2 = serve(exp), serve(exp)
    with httpx.Client(timeout=10) as client:
        _wait(lambda: client.get(f"{h1.url}/readyz").status_code == 200)
        _wait(lambda: client.get(f"{h2.url}/readyz").status_code == 200)
        arms1, arms2 = [], []
        for n in range(60):
            body = {"user_id": f"person-{n}", "item_ids": ["i1", "i2"]}
            arms1.append(client.post(f"{h1.url}/v1/rank", json=body).json()["arm"])
            arms2.append(client.post(f"{h2.url}/v1/rank", json=body).json()["arm"])
    assert arms1 == arms2
    assert 0.45 < arms1.count("a") / 60 < 0.9


def test_redis_outage_keeps_the_last_good_snapshot_serving(tmp_path, serve, tiny_model, settings):
    import dataclasses
    import subprocess

    from em3.config import RedisSettings
    from em3.redis_stores import RedisContentStore, RedisSnapshotStore, connect
    from em3.app.services import find_redis_server, free_port, redis_answers

    port = free_port()
    proc = subprocess.Popen([str(find_redis_server()), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(lambda: redis_answers("127.0.0.1", port), timeout_s=10, what="private redis")
        private = dataclasses.replace(settings, redis=RedisSettings(f"redis://127.0.0.1:{port}/0"))
        client = connect(private.redis)
        RedisContentStore(client, private.redis_prefix).put_many([ItemContent("i1", text="x"), ItemContent("i2")])
        version = Publisher(RedisSnapshotStore(client, private.redis_prefix, signing_key=private.snapshot_key), *tiny_model).publish()
        client.close()
        handle = serve(settings_=private, poll_interval_s=0.2)
        with httpx.Client(base_url=handle.url, timeout=10) as http:
            _wait(lambda: _ready(http))
            assert _rank(http, items=["i1", "i2"]).json()["model_version"] == version
            proc.terminate()
            proc.wait(10)
            status = _wait(lambda: (s := http.get("/readyz").json()["sources"][LINE]) and not s["redis_ok"] and s,
                           what="outage noticed")
            assert status["version"] == version and status["ready"]
            r = _rank(http, items=["i1", "i2"])
            assert r.status_code == 200 and r.json()["model_version"] == version
            assert "em3_serving_redis_up 0.0" in http.get("/metrics").text
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)


def test_ranking_rides_out_a_redis_outage_without_blocking(serve, publisher, catalog, local_service_processes):
    """Redis frozen (SIGSTOP) for 6 s: every /v1/rank still answers 200 within a
    bounded time (without history while Redis is away), /readyz answers at once and
    says degraded, and both recover by themselves."""
    import os
    import signal

    publisher.publish()
    handle = serve()
    redis_pid = local_service_processes.pids()["redis"]
    with httpx.Client(base_url=handle.url, timeout=10) as client:
        _wait(lambda: _ready(client))
        assert _rank(client).status_code == 200
        os.kill(redis_pid, signal.SIGSTOP)
        try:
            slowest, degraded_seen, end = 0.0, False, time.monotonic() + 6.0
            while time.monotonic() < end:
                t0 = time.monotonic()
                r = _rank(client)
                slowest = max(slowest, time.monotonic() - t0)
                assert r.status_code == 200, r.text
                t0 = time.monotonic()
                ready = client.get("/readyz")
                assert time.monotonic() - t0 < 1.5
                degraded_seen |= ready.json()["degraded"]
        finally:
            os.kill(redis_pid, signal.SIGCONT)
        assert slowest < 1.5 and degraded_seen
        _wait(lambda: not client.get("/readyz").json()["degraded"], timeout_s=40.0)
        assert _rank(client).status_code == 200
