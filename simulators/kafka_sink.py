"""The Kafka edge of the simulators: produce Impression, Click and Conversion events to topics.

Topics are ``{prefix}impressions`` and ``{prefix}clicks`` (the names of
:class:`em3.config.TopicNames`); records are keyed by ``user_id`` (so one
user's events stay on one partition, in order), carry the event time as the
Kafka timestamp, and hold :func:`em3.codec.encode` bytes.

The Kafka client itself is only touched through :mod:`stream.kafka` (the one
module of the project that imports confluent-kafka).

Encoding uses :func:`em3.codec.encode`, whose hand-written path for impressions
and clicks is what lets a replay reach 50k events/s on one core.

This is an edge: every event's raw user ID is replaced by its pseudonym
(``pseudonymize``, an :class:`em3.privacy.Pseudonymizer`) before it is produced,
and the callers must pass one (keyed, or explicitly allowing raw IDs).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import msgspec

from em3.codec import encode
from em3.config import KafkaSettings, TopicNames
from em3.types import Click, Conversion, Impression

__all__ = ["SinkStats", "produce_events", "KafkaEventSink", "DEFAULT_PREFIX", "with_pseudonym"]


def with_pseudonym(event: Impression | Click, pseudonymize: Callable[[str], str]) -> Impression | Click:
    """``event`` with its user ID replaced by ``pseudonymize(user_id)``.

    >>> from em3.privacy import Pseudonymizer
    >>> imp = Impression("i1", "r1", "alice", "item9", 0, 1.7e9)
    >>> with_pseudonym(imp, Pseudonymizer("k")).user_id == Pseudonymizer("k")("alice")
    True
    """
    user = pseudonymize(event.user_id)
    return event if user == event.user_id else msgspec.structs.replace(event, user_id=user)

logger = logging.getLogger(__name__)

DEFAULT_PREFIX = "em3."


@dataclass
class SinkStats:
    """What was produced: per-topic counts, delivery failures and timing."""

    produced: dict[str, int] = field(default_factory=dict)
    delivered: int = 0
    failed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0

    @property
    def total(self) -> int:
        """Records handed to the producer."""
        return sum(self.produced.values())

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dict."""
        return {"produced": dict(self.produced), "total": self.total, "delivered": self.delivered,
                "failed": self.failed, "errors": dict(self.errors), "wall_s": self.wall_s}


def produce_events(
    events: Iterable[Impression | Click], kafka: KafkaSettings | str, *, pseudonymize: Callable[[str], str],
    prefix: str = DEFAULT_PREFIX,
    create_topics: bool = True, partitions: int = 1, producer_overrides: Mapping[str, object] | None = None,
    flush_timeout_s: float = 60.0, encoder: Callable[[Impression | Click], bytes] = encode,
) -> SinkStats:
    """Produce ``events`` to ``{prefix}impressions`` and ``{prefix}clicks``.

    Parameters
    ----------
    events : iterable of Impression or Click
        Typically :meth:`simulators.replay.LogReplayer.run`.
    kafka : KafkaSettings or str
        Settings, or bootstrap servers as ``"host:port"``.
    pseudonymize : callable
        Raw user ID to pseudonym (:class:`em3.privacy.Pseudonymizer`), applied to
        every event before it is produced.
    prefix : str
        Topic name prefix (default ``"em3."``).
    create_topics : bool
        Create the two topics first if missing.
    partitions : int
        Partitions of topics created here.
    producer_overrides : mapping, optional
        librdkafka settings, ``_`` for ``.`` (``{"linger_ms": 5}``).
    flush_timeout_s : float
        How long to wait for outstanding deliveries at the end.
    encoder : callable
        Event to bytes (default :func:`em3.codec.encode`).

    Returns
    -------
    SinkStats

    Raises
    ------
    TimeoutError
        When deliveries are still outstanding after ``flush_timeout_s``.
    """
    from stream.kafka import ensure_topics, make_producer  # the Kafka client lives there

    if flush_timeout_s <= 0:
        raise ValueError(f"flush_timeout_s must be > 0, but {flush_timeout_s} is given")
    settings = KafkaSettings(kafka) if isinstance(kafka, str) else kafka
    topics = TopicNames(prefix)
    if create_topics:
        ensure_topics(settings, [topics.impressions, topics.clicks, topics.conversions], partitions=partitions)
    # Delivery reports for failures only: no Python callback per delivered record.
    overrides = {"delivery_report_only_error": True, **dict(producer_overrides or {})}
    producer = make_producer(settings, **overrides)
    stats = SinkStats(produced={topics.impressions: 0, topics.clicks: 0})

    def on_delivery(err, _msg) -> None:
        if err is None:
            stats.delivered += 1
        else:
            stats.failed += 1
            name = str(err.name()) if hasattr(err, "name") else str(err)
            stats.errors[name] = stats.errors.get(name, 0) + 1

    imp_topic, click_topic = topics.impressions, topics.clicks
    produced = stats.produced
    start = time.monotonic()
    for n, event in enumerate(events, start=1):
        event = with_pseudonym(event, pseudonymize)
        if type(event) is Impression:
            topic, ts = imp_topic, event.served_at
        elif type(event) is Conversion:
            topic, ts = topics.conversions, event.converted_at
            produced.setdefault(topic, 0)
        else:
            topic, ts = click_topic, event.clicked_at
        value = encoder(event)
        key = event.user_id.encode("utf-8")
        while True:
            try:
                producer.produce(topic, value, key, timestamp=int(ts * 1000), on_delivery=on_delivery)
                break
            except BufferError:  # local queue full: serve delivery reports, then retry
                producer.poll(0.05)
        produced[topic] += 1
        if n % 10_000 == 0:
            producer.poll(0)
    remaining = producer.flush(flush_timeout_s)
    stats.wall_s = time.monotonic() - start
    if remaining:
        raise TimeoutError(f"{remaining} records still undelivered after {flush_timeout_s} s")
    if overrides.get("delivery_report_only_error"):
        stats.delivered = stats.total - stats.failed  # flushed: every record is acknowledged or failed
    if stats.failed:
        logger.error("%d of %d records failed delivery: %s", stats.failed, stats.total, stats.errors)
    return stats


class KafkaEventSink:
    """A callable ``event_sink`` (for :class:`simulators.ab.ABRunner`) that produces each event.

    Same topics, keys, timestamps, encoding and pseudonyms as :func:`produce_events`;
    call :meth:`close` (or use it as a context manager) to flush at the end.
    """

    def __init__(self, kafka: KafkaSettings | str, *, pseudonymize: Callable[[str], str],
                 prefix: str = DEFAULT_PREFIX, create_topics: bool = True,
                 partitions: int = 1, producer_overrides: Mapping[str, object] | None = None,
                 flush_timeout_s: float = 60.0) -> None:
        from stream.kafka import ensure_topics, make_producer

        if flush_timeout_s <= 0:
            raise ValueError(f"flush_timeout_s must be > 0, but {flush_timeout_s} is given")
        self.settings = KafkaSettings(kafka) if isinstance(kafka, str) else kafka
        self.topics = TopicNames(prefix)
        if create_topics:
            ensure_topics(self.settings, [self.topics.impressions, self.topics.clicks, self.topics.conversions],
                          partitions=partitions)
        self._producer = make_producer(self.settings, **dict(producer_overrides or {}))
        self.flush_timeout_s = flush_timeout_s
        self.pseudonymize = pseudonymize
        self.stats = SinkStats(produced={self.topics.impressions: 0, self.topics.clicks: 0,
                                         self.topics.conversions: 0})

    def _on_delivery(self, err, _msg) -> None:
        if err is None:
            self.stats.delivered += 1
        else:
            self.stats.failed += 1
            name = str(err.name()) if hasattr(err, "name") else str(err)
            self.stats.errors[name] = self.stats.errors.get(name, 0) + 1

    def __call__(self, event: Impression | Click | Conversion) -> None:
        event = with_pseudonym(event, self.pseudonymize)
        if type(event) is Impression:
            topic, ts = self.topics.impressions, event.served_at
        elif type(event) is Conversion:
            topic, ts = self.topics.conversions, event.converted_at
        else:
            topic, ts = self.topics.clicks, event.clicked_at
        value = encode(event)
        while True:
            try:
                self._producer.produce(topic, value, event.user_id.encode("utf-8"), timestamp=int(ts * 1000),
                                       on_delivery=self._on_delivery)
                break
            except BufferError:
                self._producer.poll(0.05)
        self.stats.produced[topic] += 1
        self._producer.poll(0)

    def close(self) -> SinkStats:
        """Flush; raises ``TimeoutError`` if records are still undelivered."""
        remaining = self._producer.flush(self.flush_timeout_s)
        if remaining:
            raise TimeoutError(f"{remaining} records still undelivered after {self.flush_timeout_s} s")
        return self.stats

    def __enter__(self) -> "KafkaEventSink":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
