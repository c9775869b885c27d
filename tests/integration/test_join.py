"""The join against the real broker and Redis: exact samples, dead letters, history."""
from __future__ import annotations

import json
import threading
import time
from collections import Counter

import pytest

from em3 import codec
from em3.types import Click, Impression
from stream.join import JoinConfig, expected_labels
from stream.kafka import ensure_topics, make_consumer, make_producer, parse_dead_letter, wait_for_assignment
from stream.synthetic import StreamSpec, arrival_order, generate_stream, produce_stream
from stream.worker import JoinWorker, WorkerConfig

pytestmark = pytest.mark.integration

JOIN = JoinConfig(window_s=60.0, allowed_lateness_s=5.0, max_correction_delay_s=600.0,
                  idle_timeout_s=0.3, idle_advance_rate=1e6)


def read_topic(settings, topic: str, expected: int, timeout_s: float = 60.0, idle_s: float = 1.5) -> list:
    """Every message of ``topic``: until ``expected`` came and nothing more for ``idle_s``."""
    consumer = make_consumer(settings.kafka, f"reader-{time.time_ns()}")
    consumer.subscribe([topic])
    wait_for_assignment(consumer)
    out, last = [], time.monotonic()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batch = consumer.consume(10000, timeout=0.2)
        msgs = [m for m in batch if m.error() is None]
        if msgs:
            out.extend(msgs)
            last = time.monotonic()
        elif len(out) >= expected and time.monotonic() - last > idle_s:
            break
        if len(out) >= expected and not msgs and idle_s == 0:
            break
    consumer.close()
    return out


def assert_labelled_exactly(settings, impressions, clicks, worker) -> None:
    """The samples topic labels every impression as the reference join does, once
    after dedup; a re-emitted sample (same id) carries the same label."""
    from stream.dedup import DedupWindow

    reference = expected_labels(impressions, clicks, JOIN)
    want = len(reference) + sum(c for _, c in reference.values())
    dedup = DedupWindow(1_000_000)
    got = {}
    for m in read_topic(settings, settings.topics.samples, want):
        s = codec.decode_sample(m.value())
        key = (s.impression.impression_id, s.correction)
        if dedup.add_new(s.sample_id):
            got[key] = s.label
        else:
            assert got[key] == s.label  # a re-emission, identical
    missing = [iid for iid in reference if (iid, False) not in got]
    assert not missing, (len(missing), len(reference), missing[:5], worker.counters)
    assert {iid: (got[(iid, False)], (iid, True) in got) for iid in reference} == reference


def run_join(settings, **worker_kwargs) -> JoinWorker:
    worker = JoinWorker(settings, JOIN, WorkerConfig(**worker_kwargs))
    worker.start()
    try:
        worker.run(threading.Event(), idle_exit_s=1.0)
    finally:
        worker.close()
    return worker


def test_100k_events_give_exactly_the_expected_samples_and_history(settings, redis_client):
    ensure_topics(settings.kafka, settings.topics, partitions=4)
    spec = StreamSpec(impressions=90_000, users=5_000, seed=7)
    impressions, clicks = generate_stream(spec)
    produce_stream(settings.kafka, settings.topics, arrival_order(impressions, clicks, spec.jitter_s, seed=7))
    assert len(impressions) + len(clicks) >= 99_000

    worker = run_join(settings)

    reference = expected_labels(impressions, clicks, JOIN)
    n_expected = len(reference) + sum(c for _, c in reference.values())
    msgs = read_topic(settings, settings.topics.samples, n_expected)
    samples = [codec.decode_sample(m.value()) for m in msgs]
    assert len(samples) == n_expected  # nothing lost, nothing duplicated in a clean run
    assert len({s.sample_id for s in samples}) == n_expected
    got = {}
    for s in samples:
        if not s.correction:
            got[s.impression.impression_id] = [s.label, False]
    for s in samples:
        if s.correction:
            got[s.impression.impression_id][1] = True
    assert {k: tuple(v) for k, v in got.items()} == reference
    by_id = {imp.impression_id: imp for imp in impressions}
    assert all(s.impression == by_id[s.impression.impression_id] for s in samples)

    counts = worker.counters
    assert counts["events_in"] == len(impressions) + len(clicks)
    assert counts["positive"] + counts["negative"] == len(impressions)
    assert worker.metrics()["pending_impressions"] == 0

    # Every positive appended (user, item, clicked_at) to the user's history, once.
    positives = [s for s in samples if s.label == 1]
    want = Counter((s.impression.user_id, f"{s.impression.item_id}\t{s.label_time!r}") for s in positives)
    have = Counter()
    for user in {u for u, _ in want}:
        for entry in redis_client.lrange(f"{settings.redis_prefix}hist:{user}", 0, -1):
            have[(user, entry.decode())] += 1
    assert have == want


def test_samples_are_keyed_by_user(settings):
    ensure_topics(settings.kafka, settings.topics, partitions=2)
    impressions, clicks = generate_stream(StreamSpec(impressions=300, users=20, seed=3))
    produce_stream(settings.kafka, settings.topics, arrival_order(impressions, clicks, 1.0))
    run_join(settings)
    msgs = read_topic(settings, settings.topics.samples, 300)
    users_by_partition: dict[str, set[int]] = {}
    for m in msgs:
        s = codec.decode_sample(m.value())
        assert m.key() == s.impression.user_id.encode()
        users_by_partition.setdefault(s.impression.user_id, set()).add(m.partition())
    assert all(len(p) == 1 for p in users_by_partition.values())


def test_malformed_records_are_dead_lettered_with_reasons_while_good_ones_flow(settings):
    ensure_topics(settings.kafka, settings.topics, partitions=2)
    t0 = 1_767_225_600.0
    good = [Impression(f"g{k}", "r", f"u{k}", f"i{k}", 0, t0 + k) for k in range(20)]
    good_clicks = [Click("g3", "u3", "i3", t0 + 5)]
    base = codec.to_dict(good[0])
    bad = {
        b"\xff\xfe\x00garbage": "bad_bytes",
        b"{this is not json": "bad_json",
        b"[1, 2, 3]": "not_an_object",
        json.dumps({k: v for k, v in base.items() if k != "user_id"}).encode(): "missing_field",
        json.dumps({**base, "position": "first"}).encode(): "mistyped_field",
        json.dumps({**base, "v": 42}).encode(): "unknown_schema_version",
        json.dumps({**base, "served_at": 12.0}).encode(): "absurd_timestamp",
        json.dumps({**base, "served_at": time.time() + 30 * 86400}).encode(): "absurd_timestamp",
        json.dumps({**base, "served_at": 10**400}).encode(): "absurd_timestamp",
        codec.encode(Click("x", "u", "i", t0)): "wrong_type",
        # each of these once stopped the join for good (issue 15)
        json.dumps({**base, "impression_id": "\ud800"}).encode(): "bad_json",  # lone surrogate
        json.dumps({**base, "item_id": "a\tb"}).encode(): "bad_value",  # tab in an ID
        json.dumps({**base, "served_at": time.time() + 23 * 3600}).encode(): "absurd_timestamp",  # watermark poison
        b"[" * 100_000 + b"]" * 100_000: "not_an_object",
    }
    huge = json.dumps({**base, "context": {"k": "x" * 900_000}}).encode()  # a ~1 MB record
    producer = make_producer(settings.kafka)
    for i, imp in enumerate(good):
        producer.produce(settings.topics.impressions, key=imp.user_id, value=codec.encode(imp))
        if i == 5:
            for raw in bad:  # raw bytes in the middle of the good stream
                producer.produce(settings.topics.impressions, key=b"u-bad", value=raw)
            producer.produce(settings.topics.impressions, key=b"u-bad", value=huge)
    for c in good_clicks:
        producer.produce(settings.topics.clicks, key=c.user_id, value=codec.encode(c))
    producer.produce(settings.topics.clicks, key=b"u-bad", value=b'{"v":1,"type":"click"}')
    producer.produce(settings.topics.clicks, key=b"u-x", value=None)  # a tombstone
    assert producer.flush(10) == 0

    worker = run_join(settings)

    dead = [parse_dead_letter(m) for m in read_topic(settings, settings.topics.dead_letter, len(bad) + 3)]
    by_value = {d.value: d for d in dead if d.source_topic == settings.topics.impressions}
    assert {raw: by_value[raw].reason for raw in bad if len(raw) <= 65536} == {
        raw: reason for raw, reason in bad.items() if len(raw) <= 65536}
    cut = [d for d in dead if len(d.value) == 65536]  # dead-lettered values are cut to 64 KiB
    assert sorted(d.reason for d in cut) == ["bad_value", "not_an_object"]
    assert worker.counters["dead_letter.bad_value"] == 2
    click_reasons = sorted(d.reason for d in dead if d.source_topic == settings.topics.clicks)
    assert click_reasons == ["bad_bytes", "missing_field"]
    assert all(d.source_offset >= 0 and d.detail for d in dead)
    assert worker.counters["dead_letters"] == len(bad) + 3
    assert worker.counters["dead_letter.absurd_timestamp"] == 4

    samples = [codec.decode_sample(m.value()) for m in read_topic(settings, settings.topics.samples, 20)]
    assert sorted(s.impression.impression_id for s in samples) == sorted(i.impression_id for i in good)
    assert [s.impression.impression_id for s in samples if s.label == 1] == ["g3"]


def test_orphan_and_too_late_clicks_go_to_dead_letter(settings):
    ensure_topics(settings.kafka, settings.topics, partitions=1)
    t0 = 1_767_225_600.0
    imp = Impression("a", "r", "u", "i", 0, t0)
    records = [
        imp,
        Click("ghost", "u", "i", t0 + 1),  # its impression never comes
        Impression("b", "r", "u", "j", 0, t0 + 700),
        Click("a", "u", "i", t0 + 690),  # 690 s after serving > W + max correction delay
    ]
    produce_stream(settings.kafka, settings.topics, iter(records))
    run_join(settings)
    dead = [parse_dead_letter(m) for m in read_topic(settings, settings.topics.dead_letter, 2)]
    assert sorted(d.reason for d in dead) == ["click_after_max_delay", "orphan_click"]
    assert {codec.decode_click(d.value).impression_id for d in dead} == {"ghost", "a"}


def test_a_fenced_worker_reloads_its_partitions_and_still_labels_everything(settings, redis_client):
    from stream.state import RedisJoinStateStore

    ensure_topics(settings.kafka, settings.topics, partitions=2)
    impressions, clicks = generate_stream(StreamSpec(impressions=6000, users=500, seed=9))
    produce_stream(settings.kafka, settings.topics, arrival_order(impressions, clicks, 1.0, seed=9))
    worker = JoinWorker(settings, JOIN, WorkerConfig(batch_size=500))
    worker.start()
    try:
        deadline = time.monotonic() + 30
        while worker.counters["checkpoints"] < 2 and time.monotonic() < deadline:
            worker.run_once()
        other = RedisJoinStateStore(redis_client, settings.redis_prefix, worker.group_id)
        for n in worker.partitions:
            other.acquire(n)  # someone else claims the partitions
        worker.run(threading.Event(), idle_exit_s=1.0)
    finally:
        worker.close()
    assert worker.counters["fenced"] >= 1

    assert_labelled_exactly(settings, impressions, clicks, worker)


def test_the_join_rides_out_a_redis_outage_and_loses_nothing(settings, local_service_processes):
    """Redis frozen (SIGSTOP) for 8 s mid-stream: the join backs off, reloads its
    partitions from the last checkpoint when Redis is back, and every impression is
    still labelled exactly as the reference join labels it."""
    import os
    import signal

    ensure_topics(settings.kafka, settings.topics, partitions=2)
    impressions, clicks = generate_stream(StreamSpec(impressions=4000, users=300, seed=11))
    events = list(arrival_order(impressions, clicks, 1.0, seed=11))
    half = len(events) // 2
    worker = JoinWorker(settings, JOIN, WorkerConfig(batch_size=300, retry_initial_s=0.2, retry_max_s=2.0))
    worker.start()
    redis_pid = local_service_processes.pids()["redis"]
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        produce_stream(settings.kafka, settings.topics, iter(events[:half]))
        time.sleep(1.0)
        os.kill(redis_pid, signal.SIGSTOP)
        try:
            produce_stream(settings.kafka, settings.topics, iter(events[half:]))
            time.sleep(8.0)
        finally:
            os.kill(redis_pid, signal.SIGCONT)
        deadline = time.monotonic() + 90
        last, quiet_since = -1, time.monotonic()
        while time.monotonic() < deadline:  # until recovered, and nothing read or pending for 3 s
            seen = worker.counters["events_in"]
            if seen != last:
                last, quiet_since = seen, time.monotonic()
            if (worker.counters["recoveries"] and not worker.pending
                    and time.monotonic() - quiet_since > 3.0 and seen >= len(events)):
                break
            time.sleep(0.5)
        assert thread.is_alive()  # it never exited
    finally:
        stop.set()
        thread.join(30)
        worker.close()
    assert worker.counters["batch_failures"] >= 1 and worker.counters["recoveries"] >= 1

    assert_labelled_exactly(settings, impressions, clicks, worker)
