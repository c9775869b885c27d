"""The embedded services are real: a Kafka-protocol broker and Redis over sockets."""
from __future__ import annotations

import subprocess
import sys

import pytest

from em3.types import Click, ItemContent
from em3 import codec

pytestmark = pytest.mark.integration


def test_broker_round_trips_records_in_a_consumer_group(settings):
    from stream.kafka import ensure_topics, make_consumer, make_producer, wait_for_assignment

    created = ensure_topics(settings.kafka, settings.topics, partitions=2)
    assert sorted(created) == sorted(settings.topics.all())
    assert ensure_topics(settings.kafka, settings.topics, partitions=2) == []  # idempotent

    producer = make_producer(settings.kafka)
    clicks = [Click(f"imp-{i}", f"u{i % 3}", f"i{i}", 1.7e9 + i) for i in range(50)]
    for c in clicks:
        producer.produce(settings.topics.clicks, key=c.user_id, value=codec.encode(c))
    assert producer.flush(10) == 0

    consumer = make_consumer(settings.kafka, "g-test")
    consumer.subscribe([settings.topics.clicks])
    wait_for_assignment(consumer)
    got = []
    for _ in range(100):
        for msg in consumer.consume(100, timeout=0.2):
            assert msg.error() is None
            got.append(codec.decode_click(msg.value()))
        if len(got) >= len(clicks):
            break
    consumer.close()
    assert sorted(got, key=lambda c: c.impression_id) == sorted(clicks, key=lambda c: c.impression_id)


def test_redis_stores_round_trip(settings, redis_client):
    from em3.redis_stores import RedisContentStore, RedisHistoryStore

    content = RedisContentStore(redis_client, settings.redis_prefix)
    item = ItemContent("i1", text="Toy Story (1995)", image=b"\x89PNG...", attributes={"genre": "Animation"})
    content.put_many([item])
    assert content.get_many(["i1", "missing"]) == [item, None]
    assert content.ids() == ["i1"]

    history = RedisHistoryStore(redis_client, settings.redis_prefix, max_length=3)
    history.append_many([("u", f"i{k}", 100.0 + k) for k in range(5)])
    assert history.get("u", 10) == ["i4", "i3", "i2"]  # newest first, trimmed to 3
    assert history.get("u", 10, before=104.0) == ["i3", "i2"]
    assert history.get_many(["u", "nobody"], 1) == [["i4"], []]


def test_services_cli_up_status_down_leaves_nothing(tmp_path):
    run_dir = tmp_path / "run"
    em3 = [sys.executable, "-m", "em3.cli", "services"]
    up = subprocess.run(em3 + ["up", "--run-dir", str(run_dir)], capture_output=True, text=True, timeout=60)
    assert up.returncode == 0, up.stderr
    status = subprocess.run(em3 + ["status", "--run-dir", str(run_dir)], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and '"answers": true' in status.stdout
    pids = [int((run_dir / f"{n}.pid").read_text()) for n in ("kafka", "redis")]
    down = subprocess.run(em3 + ["down", "--run-dir", str(run_dir)], capture_output=True, text=True, timeout=60)
    assert down.returncode == 0
    import os

    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_snapshot_store_publishes_prunes_and_rolls_back(settings, redis_client):
    import time

    from em3.errors import SnapshotError
    from em3.redis_stores import RedisSnapshotStore
    from em3.types import SnapshotManifest

    store = RedisSnapshotStore(redis_client, settings.redis_prefix, keep=3)
    pubsub = store.subscribe()
    published = []
    for _ in range(5):
        v = store.next_version("em3")
        m = SnapshotManifest("em3", v, published[-1] if published else None, time.time(), {"d": 8},
                             {"t:0": 10 * v}, sha256="ab" * 32, num_bytes=3)
        store.publish(m, b"abc")
        published.append(v)
    assert published == [1, 2, 3, 4, 5]
    assert store.versions("em3") == [3, 4, 5]
    assert store.latest_version("em3") == 5
    manifest, blob = store.get("em3")
    assert (manifest.version, manifest.offsets, blob) == (5, {"t:0": 50}, b"abc")
    notes = []
    deadline = time.time() + 5
    while len(notes) < 5 and time.time() < deadline:
        msg = pubsub.get_message(timeout=0.2)
        if msg:
            notes.append(msg["data"])
    assert len(notes) == 5
    assert store.rollback("em3") == 4 and store.latest_version("em3") == 4
    with pytest.raises(SnapshotError):
        store.rollback("em3", 1)
    with pytest.raises(SnapshotError):
        store.get("nope")
    pubsub.close()
