"""The Kafka-backed :class:`learners.loop.SampleSource`.

Learners read the samples topic with a *static* assignment: learner ``rank`` of
``world`` owns the partitions ``p`` with ``p % world == rank`` and positions them
itself (at the offsets of the snapshot it resumes from). The consumer group
(``group_id``) is used for committed offsets only, which are written after the
snapshot holding them is published, so lag monitoring works as usual. A group
rebalance would move partitions between learners in the middle of a snapshot
cycle and break the per-cycle offset accounting; with static assignment a learner
that dies is restarted (by Ray) on the same partitions instead.
"""
from __future__ import annotations

import logging
import time
from typing import Mapping

from em3.config import KafkaSettings
from learners.loop import SourceRecord
from stream.kafka import KafkaException, TopicPartition, make_consumer, offsets_key

__all__ = ["KafkaSampleSource", "partitions_for_rank"]

log = logging.getLogger(__name__)

_OFFSET_BEGINNING = -2  # librdkafka's RD_KAFKA_OFFSET_BEGINNING


def partitions_for_rank(num_partitions: int, rank: int, world: int) -> list[int]:
    """The partitions learner ``rank`` of ``world`` owns.

    >>> partitions_for_rank(5, 1, 2)
    [1, 3]
    """
    if world <= 0:
        raise ValueError(f"world must be > 0, but {world} is given")
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), but {rank} is given")
    return [p for p in range(num_partitions) if p % world == rank]


class KafkaSampleSource:
    """Reads encoded samples from ``topic`` for learner ``rank`` of ``world``.

    Parameters
    ----------
    settings : KafkaSettings
    topic : str
    group_id : str
        Group whose committed offsets record the published progress.
    rank, world : int
        This learner's share of the partitions (see :func:`partitions_for_rank`).
    wait_for_topic_s : float
        How long to wait for the topic to appear before raising ``TimeoutError``.
    """

    def __init__(self, settings: KafkaSettings, topic: str, group_id: str, *, rank: int = 0, world: int = 1,
                 wait_for_topic_s: float = 60.0) -> None:
        self.topic = topic
        self.group_id = group_id
        self.consumer = make_consumer(settings, group_id)
        num = self._num_partitions(wait_for_topic_s)
        self._partitions = partitions_for_rank(num, rank, world)
        if not self._partitions:
            log.warning("learner %d of %d owns none of the %d partitions of %s", rank, world, num, topic)
        self._keys = [offsets_key(topic, p) for p in self._partitions]
        self.seek({})

    def _num_partitions(self, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        while True:
            md = self.consumer.list_topics(self.topic, timeout=5.0).topics.get(self.topic)
            if md is not None and md.error is None and md.partitions:
                return len(md.partitions)
            if time.monotonic() > deadline:
                raise TimeoutError(f"topic {self.topic!r} did not appear within {timeout_s} s")
            time.sleep(0.2)

    def partitions(self) -> list[str]:
        return list(self._keys)

    def seek(self, offsets: Mapping[str, int]) -> None:
        """(Re)assign the owned partitions at ``offsets`` (absent: beginning)."""
        tps = [
            TopicPartition(self.topic, p, int(offsets.get(key, _OFFSET_BEGINNING)))
            for p, key in zip(self._partitions, self._keys)
        ]
        self.consumer.assign(tps)

    def poll(self, max_records: int, timeout_s: float) -> list[SourceRecord]:
        if not self._partitions:
            time.sleep(timeout_s)
            return []
        out = []
        for msg in self.consumer.consume(max_records, timeout=timeout_s):
            err = msg.error()
            if err is not None:
                log.warning("consumer error on %s: %s", self.topic, err)
                continue
            out.append(SourceRecord(offsets_key(msg.topic(), msg.partition()), msg.offset(), msg.value() or b""))
        return out

    def commit(self, offsets: Mapping[str, int]) -> None:
        tps = []
        for p, key in zip(self._partitions, self._keys):
            if key in offsets:
                tps.append(TopicPartition(self.topic, p, int(offsets[key])))
        if tps:
            try:
                self.consumer.commit(offsets=tps, asynchronous=False)
            except KafkaException as exc:
                # Committed offsets are informational here (resume uses the snapshot's).
                log.warning("offset commit failed (resume is unaffected): %s", exc)

    def committed(self) -> dict[str, int]:
        """The group's committed offsets for the owned partitions (for monitoring and tests)."""
        tps = [TopicPartition(self.topic, p) for p in self._partitions]
        got = self.consumer.committed(tps, timeout=10.0) if tps else []
        return {offsets_key(tp.topic, tp.partition): tp.offset for tp in got if tp.offset >= 0}

    def close(self) -> None:
        self.consumer.close()
