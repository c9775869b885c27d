"""Replay of the Open Bandit Dataset into a real (Tansu) broker, consumed back with confluent-kafka."""
from __future__ import annotations

from collections import defaultdict

import pytest

from em3 import codec
from em3.types import Click, Impression
from em3.privacy import Pseudonymizer, is_pseudonym
from simulators.kafka_sink import produce_events, with_pseudonym
from simulators.delays import ExponentialDelay
from simulators.replay import LogReplayer, event_time
from simulators.replay_sources import obd_rows

pytestmark = pytest.mark.integration


def test_obd_replay_round_trips_through_the_broker(settings):
    from stream.kafka import make_consumer, wait_for_assignment

    prefix = settings.topics.prefix
    rows = list(obd_rows("men", "random", click_delay=ExponentialDelay(45.0), seed=1))
    expected = [with_pseudonym(e, Pseudonymizer(settings.user_id_key)) for e in LogReplayer().run(rows)]
    assert not {e.user_id for e in expected} & {r.impression.user_id for r in rows if hasattr(r, "impression")}
    replayer = LogReplayer()
    pseudonymize = Pseudonymizer(settings.user_id_key)
    stats = produce_events(replayer.run(rows), settings.kafka, prefix=prefix, partitions=3,
                           pseudonymize=pseudonymize)
    n_imp = sum(isinstance(e, Impression) for e in expected)
    n_click = len(expected) - n_imp
    assert stats.produced == {f"{prefix}impressions": n_imp, f"{prefix}clicks": n_click}
    assert stats.delivered == len(expected) and stats.failed == 0
    assert replayer.stats.events == len(expected)

    consumer = make_consumer(settings.kafka, f"{prefix}check")
    consumer.subscribe([f"{prefix}impressions", f"{prefix}clicks"])
    wait_for_assignment(consumer)
    got: dict[str, list] = defaultdict(list)  # topic -> [(partition, key, timestamp, event)]
    idle = 0
    while sum(len(v) for v in got.values()) < len(expected) and idle < 50:
        batch = consumer.consume(5000, timeout=0.2)
        idle = 0 if batch else idle + 1
        for msg in batch:
            assert msg.error() is None
            event = codec.decode(msg.value())
            got[msg.topic()].append((msg.partition(), msg.key().decode(), msg.timestamp()[1], event))
    consumer.close()

    imps = got[f"{prefix}impressions"]
    clicks = got[f"{prefix}clicks"]
    assert len(imps) == n_imp and len(clicks) == n_click
    assert sorted((e for *_, e in imps), key=lambda e: e.impression_id) == \
        sorted((e for e in expected if isinstance(e, Impression)), key=lambda e: e.impression_id)
    assert {e for *_, e in clicks} == {e for e in expected if isinstance(e, Click)}
    for topic_records in (imps, clicks):
        partitions_of_key: dict[str, set[int]] = defaultdict(set)
        per_key_times: dict[str, list[float]] = defaultdict(list)
        for partition, key, ts_ms, event in topic_records:
            assert key == event.user_id and is_pseudonym(key)  # keyed by the user's pseudonym
            assert ts_ms == int(event_time(event) * 1000)  # Kafka timestamp = event time
            partitions_of_key[key].add(partition)
            per_key_times[key].append(event_time(event))
        assert all(len(p) == 1 for p in partitions_of_key.values())  # one user, one partition
        assert len({p for ps in partitions_of_key.values() for p in ps}) > 1  # keys spread out
        for times in per_key_times.values():  # per key, event-time order survives the broker
            assert all(a <= b for a, b in zip(times, times[1:]))


def test_ab_runner_events_reach_kafka(settings):
    from simulators.kafka_sink import KafkaEventSink
    from simulators.ab import ABConfig, ABRunner
    from simulators.rankers import RandomRanker
    from simulators.world import World, WorldConfig
    from stream.kafka import make_consumer, wait_for_assignment

    world = World(WorldConfig(seed=0, n_users=100, n_items=100))
    seen: list = []
    pseudonymize = Pseudonymizer(settings.user_id_key)
    with KafkaEventSink(settings.kafka, prefix=settings.topics.prefix, pseudonymize=pseudonymize) as kafka:
        def sink(event):
            seen.append(with_pseudonym(event, pseudonymize))
            kafka(event)

        ABRunner(world, {"a": RandomRanker("a"), "b": RandomRanker("b", 1)},
                 ABConfig(n_requests=300, k=5, check_every=100), event_sink=sink).run()
    assert kafka.stats.delivered == len(seen) and kafka.stats.failed == 0
    consumer = make_consumer(settings.kafka, f"{settings.topics.prefix}ab")
    consumer.subscribe([settings.topics.impressions, settings.topics.clicks, settings.topics.conversions])
    wait_for_assignment(consumer)
    got, topics = [], {}
    idle = 0
    while len(got) < len(seen) and idle < 50:
        batch = consumer.consume(2000, timeout=0.2)
        idle = 0 if batch else idle + 1
        for m in batch:
            if m.error() is None:
                got.append(codec.decode(m.value()))
                topics[type(got[-1]).__name__] = m.topic()
    consumer.close()
    assert sorted(map(codec.encode, got)) == sorted(map(codec.encode, seen))
    assert topics["Conversion"] == settings.topics.conversions  # conversions on their own topic
