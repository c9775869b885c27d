"""Kafka I/O: the only module of the project that imports the Kafka client.

Producers, consumers and the admin helper all take :class:`em3.config.KafkaSettings`,
so librdkafka security settings (SASL/SSL) pass through unchanged.

Consumers default to what works on both Apache Kafka and the embedded Tansu
broker: committed offsets with ``auto.offset.reset=earliest`` and manual commits
(Tansu reports high watermarks wrongly, so ``latest`` would re-deliver).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic

from em3.config import KafkaSettings, TopicNames

__all__ = [
    "Consumer",
    "Producer",
    "Message",
    "TopicPartition",
    "KafkaException",
    "KafkaError",
    "OFFSET_BEGINNING",
    "partition_counts",
    "make_producer",
    "make_consumer",
    "ensure_topics",
    "delete_topics",
    "DeadLetterRecord",
    "dead_letter_headers",
    "parse_dead_letter",
    "offsets_key",
    "wait_for_assignment",
]

log = logging.getLogger(__name__)

# librdkafka defaults tuned for throughput and for Tansu's slow first group join.
PRODUCER_DEFAULTS: Mapping[str, object] = {
    "linger.ms": 20,
    "batch.num.messages": 10000,
    "queue.buffering.max.messages": 500000,
    "compression.type": "lz4",
    "acks": "all",
}
CONSUMER_DEFAULTS: Mapping[str, object] = {
    "auto.offset.reset": "earliest",
    "enable.auto.commit": False,
    "session.timeout.ms": 6000,
    "heartbeat.interval.ms": 1000,
    "fetch.wait.max.ms": 50,
    "queued.min.messages": 20000,
}


def make_producer(settings: KafkaSettings, *, on_delivery: Callable[..., None] | None = None,
                  **overrides: object) -> Producer:
    """A confluent-kafka Producer with throughput defaults; ``overrides`` use librdkafka
    names with ``_`` for ``.`` (``linger_ms=5``). ``on_delivery(err, msg)``, if given, is
    the default delivery report callback (served by ``poll``/``flush``)."""
    config = settings.client_config(**PRODUCER_DEFAULTS)
    config.update({k.replace("_", "."): v for k, v in overrides.items()})
    if on_delivery is not None:
        config["on_delivery"] = on_delivery
    return Producer(config)


def make_consumer(settings: KafkaSettings, group_id: str, **overrides: object) -> Consumer:
    """A consumer in ``group_id`` with manual commits and ``earliest`` reset."""
    config = settings.client_config(**CONSUMER_DEFAULTS)
    config["group.id"] = group_id
    config.update({k.replace("_", "."): v for k, v in overrides.items()})
    return Consumer(config)


def ensure_topics(
    settings: KafkaSettings,
    topics: TopicNames | Iterable[str],
    partitions: int | Mapping[str, int] = 1,
    timeout_s: float = 15.0,
    retention_s: float | None = None,
) -> list[str]:
    """Create missing topics idempotently; returns the names created now.

    ``partitions`` is one count for all or a mapping per topic name. Keying
    every record by user id keeps one user's events on one partition.
    Given :class:`TopicNames`, the deletions topic is created too, with one
    partition and ``cleanup.policy=compact``; ``retention_s`` sets ``retention.ms``
    of the event topics (:attr:`em3.privacy.RetentionConfig.topic_retention_s`).
    Apache Kafka enforces both; Tansu 0.6 stores them and enforces neither.
    """
    names = topics.all() if isinstance(topics, TopicNames) else list(topics)
    counts = {n: (partitions[n] if isinstance(partitions, Mapping) else partitions) for n in names}
    configs: dict[str, dict[str, str]] = {}
    if retention_s is not None:
        configs = {n: {"retention.ms": str(int(retention_s * 1000))} for n in names}
    if isinstance(topics, TopicNames):
        names = names + [topics.deletions]
        counts[topics.deletions] = 1
        configs[topics.deletions] = {"cleanup.policy": "compact"}
    for name, count in counts.items():
        if count < 1:
            raise ValueError(f"partitions for {name!r} must be >= 1, but {count} is given")
    admin = AdminClient(settings.client_config())
    existing = set(admin.list_topics(timeout=timeout_s).topics)
    missing = [n for n in names if n not in existing]
    if not missing:
        return []
    futures = admin.create_topics(
        [NewTopic(n, num_partitions=counts[n], replication_factor=1, config=configs.get(n, {})) for n in missing],
        operation_timeout=timeout_s,
    )
    created = []
    for name, future in futures.items():
        try:
            future.result(timeout=timeout_s)
            created.append(name)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
    _wait_for_metadata(admin, missing, timeout_s)
    log.info("created topics %s", created)
    return created


def _wait_for_metadata(admin: AdminClient, names: Sequence[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        md = admin.list_topics(timeout=timeout_s).topics
        if all(n in md and md[n].error is None and md[n].partitions for n in names):
            return
        time.sleep(0.1)
    raise TimeoutError(f"topics {list(names)} did not appear in metadata within {timeout_s} s")


def delete_topics(settings: KafkaSettings, names: Iterable[str], timeout_s: float = 15.0) -> None:
    """Delete topics, ignoring those that do not exist."""
    admin = AdminClient(settings.client_config())
    for name, future in admin.delete_topics(list(names), operation_timeout=timeout_s).items():
        try:
            future.result(timeout=timeout_s)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise


def partition_counts(settings: KafkaSettings, names: Iterable[str], timeout_s: float = 15.0) -> dict[str, int]:
    """Partition count of each named topic (0 where the topic does not exist)."""
    admin = AdminClient(settings.client_config())
    md = admin.list_topics(timeout=timeout_s).topics
    return {n: (len(md[n].partitions) if n in md and md[n].error is None else 0) for n in names}


def wait_for_assignment(consumer: Consumer, timeout_s: float = 30.0) -> list[TopicPartition]:
    """Poll until the group gives ``consumer`` partitions (first join takes seconds)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        consumer.poll(0.1)
        assignment = consumer.assignment()
        if assignment:
            return assignment
    raise TimeoutError(f"no partitions assigned within {timeout_s} s")


def offsets_key(topic: str, partition: int) -> str:
    """The key under which snapshots and the join record an offset: ``topic:partition``."""
    return f"{topic}:{partition}"


# --- dead letters --------------------------------------------------------------


@dataclass(frozen=True)
class DeadLetterRecord:
    """A record that could not be processed, with why and where it came from."""

    reason: str
    detail: str
    source_topic: str
    source_partition: int
    source_offset: int
    value: bytes


def dead_letter_headers(reason: str, detail: str, topic: str, partition: int, offset: int) -> list[tuple[str, bytes]]:
    """Kafka headers carried by a dead-lettered record; the value is the original bytes."""
    return [
        ("em3-reason", reason.encode()),
        ("em3-detail", detail[:1000].encode("utf-8", "replace")),
        ("em3-source-topic", topic.encode()),
        ("em3-source-partition", str(partition).encode()),
        ("em3-source-offset", str(offset).encode()),
    ]


def parse_dead_letter(message: Message) -> DeadLetterRecord:
    """Read back a dead-letter message written with :func:`dead_letter_headers`."""
    headers = {k: (v or b"").decode("utf-8", "replace") for k, v in (message.headers() or [])}
    return DeadLetterRecord(
        reason=headers.get("em3-reason", ""),
        detail=headers.get("em3-detail", ""),
        source_topic=headers.get("em3-source-topic", ""),
        source_partition=int(headers.get("em3-source-partition", "-1")),
        source_offset=int(headers.get("em3-source-offset", "-1")),
        value=message.value() or b"",
    )
