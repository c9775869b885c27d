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
    assert sorted(created) == sorted(settings.topics.all() + [settings.topics.deletions])
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


@pytest.mark.parametrize("flags", [[], ["--durable"]], ids=["memory", "durable"])
def test_services_cli_up_status_down_leaves_nothing_and_prints_no_secret(tmp_path, flags):
    import json
    import os
    import stat

    from em3.app.services import redis_answers

    run_dir = tmp_path / "run"
    em3 = [sys.executable, "-m", "em3.app.cli", "services"]
    up = subprocess.run(em3 + ["up", "--run-dir", str(run_dir)] + flags, capture_output=True, text=True, timeout=60)
    assert up.returncode == 0, up.stderr
    info_path = run_dir / "services.json"
    assert stat.S_IMODE(info_path.stat().st_mode) == 0o600
    info = json.loads(info_path.read_text())
    secrets = [info["api_key"], info["snapshot_key"], info["redis_url"].split("@")[0].split(":")[-1]]
    assert all(len(x) >= 32 for x in secrets)
    status = subprocess.run(em3 + ["status", "--run-dir", str(run_dir)], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stdout + status.stderr
    names = ["kafka", "redis"] + (["objectstore"] if flags else [])
    assert sorted(json.loads(status.stdout)) == sorted(names)
    assert all(s["answers"] for s in json.loads(status.stdout).values())
    for out in (up.stdout + up.stderr, status.stdout + status.stderr):
        assert not any(secret in out for secret in secrets), out
    # Redis refuses anyone without the password.
    host, port = json.loads(status.stdout)["redis"]["address"].split(":")
    assert not redis_answers(host, int(port)) and not redis_answers(host, int(port), password="wrong")
    pids = [int((run_dir / f"{n}.pid").read_text()) for n in names]
    down = subprocess.run(em3 + ["down", "--run-dir", str(run_dir)], capture_output=True, text=True, timeout=60)
    assert down.returncode == 0
    assert not info_path.exists() and not (run_dir / "redis.conf").exists()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def _consume(consumer, want: int, timeout_s: float = 30.0) -> list[bytes]:
    import time

    got: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < want and time.monotonic() < deadline:
        for msg in consumer.consume(100, timeout=0.2):
            assert msg.error() is None, msg.error()
            got.append(msg.value())
    return got


def test_durable_broker_keeps_topics_records_and_offsets_across_restarts(tmp_path):
    from confluent_kafka.admin import AdminClient

    from em3.config import KafkaSettings
    from em3.app.services import LocalServices
    from stream.kafka import ensure_topics, make_consumer, make_producer, wait_for_assignment

    topic, sent = "durable.events", [f"record-{i}".encode() for i in range(300)]
    with LocalServices(tmp_path / "run", durable=True) as services:
        kafka = KafkaSettings(services.info.bootstrap_servers)
        ensure_topics(kafka, [topic], partitions=2)
        producer = make_producer(kafka)
        for i, value in enumerate(sent):
            producer.produce(topic, key=f"u{i % 7}", value=value)
        assert producer.flush(10) == 0
        # A consumer group reads some of them and commits.
        consumer = make_consumer(kafka, "g-resume")
        consumer.subscribe([topic])
        wait_for_assignment(consumer)
        first = _consume(consumer, 100)
        consumer.commit(asynchronous=False)
        consumer.close()
        assert len(first) >= 100

        old_pid = services.pids()["kafka"]
        new_pid = services.restart_kafka()  # SIGKILL the broker alone, start it again
        assert new_pid != old_pid and services.pids()["redis"]

        assert topic in AdminClient(kafka.client_config()).list_topics(timeout=10).topics
        # The group resumes where it committed ...
        consumer = make_consumer(kafka, "g-resume")
        consumer.subscribe([topic])
        wait_for_assignment(consumer)
        rest = _consume(consumer, len(sent) - len(first))
        consumer.close()
        assert sorted(first + rest) == sorted(sent)
        # ... and a new group reads every record from the start.
        consumer = make_consumer(kafka, "g-fresh")
        consumer.subscribe([topic])
        wait_for_assignment(consumer)
        assert sorted(_consume(consumer, len(sent))) == sorted(sent)
        consumer.close()

    # A whole stop and start on the same run directory keeps them too (new ports, new keys).
    with LocalServices(tmp_path / "run", durable=True) as services:
        kafka = KafkaSettings(services.info.bootstrap_servers)
        consumer = make_consumer(kafka, "g-after-down")
        consumer.subscribe([topic])
        wait_for_assignment(consumer)
        assert sorted(_consume(consumer, len(sent))) == sorted(sent)
        consumer.close()


def test_in_memory_broker_loses_every_topic_on_restart(tmp_path):
    from confluent_kafka.admin import AdminClient

    from em3.config import KafkaSettings
    from em3.app.services import LocalServices
    from stream.kafka import ensure_topics

    with LocalServices(tmp_path / "run") as services:
        kafka = KafkaSettings(services.info.bootstrap_servers)
        ensure_topics(kafka, ["volatile"], partitions=1)
        services.restart_kafka(kill=False)
        assert "volatile" not in AdminClient(kafka.client_config()).list_topics(timeout=10).topics


def test_the_file_object_store_honours_conditional_writes_ranges_and_listing(tmp_path):
    import http.client
    import threading

    from em3.app.services import _FileObjectStore, free_port

    port = free_port()
    server = _FileObjectStore(tmp_path, "127.0.0.1", port, "the-key", ["b"])
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    auth = {"Authorization": "AWS4-HMAC-SHA256 Credential=the-key/20260101/us-east-1/s3/aws4_request"}

    def call(method, path, body=b"", **headers):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request(method, path, body=body, headers={**auth, **headers})
        resp = conn.getresponse()
        out = (resp.status, resp.getheader("ETag"), resp.read())
        conn.close()
        return out

    try:
        assert call("GET", "/b/x", Authorization="AWS4-HMAC-SHA256 Credential=other/x")[0] == 403
        status, etag, _ = call("PUT", "/b/a/x.json", b"v1", **{"If-None-Match": "*"})
        assert status == 200 and etag
        assert call("PUT", "/b/a/x.json", b"v2", **{"If-None-Match": "*"})[0] == 412  # exists
        assert call("PUT", "/b/a/x.json", b"v2", **{"If-Match": '"stale"'})[0] == 412
        status, etag2, _ = call("PUT", "/b/a/x.json", b"v2", **{"If-Match": etag})
        assert status == 200 and etag2 != etag
        assert call("GET", "/b/a/x.json") == (200, etag2, b"v2")
        assert call("GET", "/b/a/x.json", Range="bytes=1-")[2] == b"2"
        assert call("GET", "/b/missing")[0] == 404
        call("PUT", "/b/a", b"a key that is also a prefix")
        call("PUT", "/b/a/y/z", b"z")
        listing = call("GET", "/b?list-type=2&prefix=a%2F&delimiter=%2F")[2].decode()
        assert "<Key>a/x.json</Key>" in listing and "<Prefix>a/y/</Prefix>" in listing
        assert "<Key>a</Key>" not in listing
        assert call("DELETE", "/b/a/x.json")[0] == 204 and call("GET", "/b/a/x.json")[0] == 404
    finally:
        server.shutdown()
        server.server_close()


def test_snapshot_store_publishes_prunes_and_rolls_back(settings, redis_client):
    import time

    from em3.errors import SnapshotError
    from em3.redis_stores import RedisSnapshotStore
    from em3.types import SnapshotManifest

    store = RedisSnapshotStore(redis_client, settings.redis_prefix, keep=3, signing_key=settings.snapshot_key)
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


def test_snapshot_store_keeps_delta_chains_loadable_and_walks_them(settings, redis_client):
    import time

    from em3.redis_stores import RedisSnapshotStore
    from em3.types import SnapshotManifest

    store = RedisSnapshotStore(redis_client, settings.redis_prefix, keep=2, signing_key=settings.snapshot_key)
    line, parent = "chain", None
    for k in range(5):  # v1 full, v2-v3 deltas, v4 full, v5 delta
        v = store.next_version(line)
        kind = "full" if k in (0, 3) else "delta"
        m = SnapshotManifest(line, v, parent, time.time(), {}, {}, sha256="ab" * 32, num_bytes=1, kind=kind,
                             base_version=parent if kind == "delta" else None)
        store.publish(m, b"x")
        parent = v
        if k == 2:  # keep=2, but v3's chain reaches back to the full v1
            assert store.versions(line) == [1, 2, 3]
            assert [m.version for m, _ in store.get_chain(line, 3)] == [1, 2, 3]
            assert [m.version for m, _ in store.get_chain(line, 3, have=2)] == [3]
    assert store.versions(line) == [4, 5]  # the new full base frees the old chain
    assert [m.version for m, _ in store.get_chain(line, 5)] == [4, 5]
