"""The Kafka edge of the simulators: produce Impression and Click events to topics.

Topics are ``{prefix}impressions`` and ``{prefix}clicks`` (the names of
:class:`em3.config.TopicNames`); records are keyed by ``user_id`` (so one
user's events stay on one partition, in order), carry the event time as the
Kafka timestamp, and hold :func:`em3.codec.encode` bytes.

The Kafka client itself is only touched through :mod:`stream.kafka` (the one
module of the project that imports confluent-kafka).

:func:`fast_encode` gives the same bytes as :func:`em3.codec.encode` for
impressions and clicks without ``dataclasses.asdict`` (about 5x faster, which
is what lets a replay reach 50k events/s on one core);
``tests/unit/simulators/test_kafka_sink.py`` checks the bytes are equal.
"""
from __future__ import annotations

import json
import json.encoder
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

from em3.codec import SCHEMA_VERSION, encode
from em3.config import KafkaSettings, TopicNames
from em3.types import Click, Impression

__all__ = ["SinkStats", "produce_events", "KafkaEventSink", "fast_encode", "DEFAULT_PREFIX"]

logger = logging.getLogger(__name__)

DEFAULT_PREFIX = "em3."
_esc = json.encoder.encode_basestring_ascii  # what json.dumps uses for strings (ensure_ascii)


def fast_encode(event: Impression | Click) -> bytes:
    """``em3.codec.encode(event)`` for impressions and clicks, faster.

    Builds the same compact JSON text field by field (strings through the
    json module's own C escaper, numbers through ``repr`` as ``json`` does);
    anything unusual (non-finite floats, non-int positions, other record
    types) goes through :func:`em3.codec.encode` itself.
    """
    kind = type(event)
    if kind is Impression:
        e = event
        if (type(e.position) is int and type(e.model_version) is int and type(e.served_at) is float
                and type(e.propensity) is float and _finite(e.served_at) and _finite(e.propensity)):
            context = _context_json(e.context)
            if context is None:
                return encode(event)
            return (
                f'{{"impression_id":{_esc(e.impression_id)},"request_id":{_esc(e.request_id)},'
                f'"user_id":{_esc(e.user_id)},"item_id":{_esc(e.item_id)},"position":{e.position!r},'
                f'"served_at":{e.served_at!r},"model_line":{_esc(e.model_line)},'
                f'"model_version":{e.model_version!r},"arm":{_esc(e.arm)},"propensity":{e.propensity!r},'
                f'"context":{context},"v":{SCHEMA_VERSION},"type":"impression"}}'
            ).encode("utf-8")
    elif kind is Click:
        e = event
        if type(e.clicked_at) is float and _finite(e.clicked_at):
            return (
                f'{{"impression_id":{_esc(e.impression_id)},"user_id":{_esc(e.user_id)},'
                f'"item_id":{_esc(e.item_id)},"clicked_at":{e.clicked_at!r},"v":{SCHEMA_VERSION},'
                f'"type":"click"}}'
            ).encode("utf-8")
    return encode(event)


_last_context: tuple[dict | None, str] = (None, "{}")  # a copy of the last context encoded, its JSON


def _context_json(ctx) -> str | None:
    """JSON of a str-to-str context (replays repeat one context, so the last one is cached;
    the cache is one tuple, rebound atomically, so threads cannot mix its halves)."""
    global _last_context
    cached, text = _last_context
    if type(ctx) is dict and ctx == cached:
        return text
    if not all(type(k) is str and type(v) is str for k, v in ctx.items()):
        return None
    text = "{" + ",".join(f"{_esc(k)}:{_esc(v)}" for k, v in ctx.items()) + "}"
    _last_context = (dict(ctx), text)
    return text


def _finite(x: float) -> bool:
    return x - x == 0.0  # False for inf and NaN


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
    events: Iterable[Impression | Click], kafka: KafkaSettings | str, *, prefix: str = DEFAULT_PREFIX,
    create_topics: bool = True, partitions: int = 1, producer_overrides: Mapping[str, object] | None = None,
    flush_timeout_s: float = 60.0, encoder: Callable[[Impression | Click], bytes] = fast_encode,
) -> SinkStats:
    """Produce ``events`` to ``{prefix}impressions`` and ``{prefix}clicks``.

    Parameters
    ----------
    events : iterable of Impression or Click
        Typically :meth:`simulators.replay.LogReplayer.run`.
    kafka : KafkaSettings or str
        Settings, or bootstrap servers as ``"host:port"``.
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
        Event to bytes (default :func:`fast_encode`, equal to ``em3.codec.encode``).

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
        ensure_topics(settings, [topics.impressions, topics.clicks], partitions=partitions)
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
        if type(event) is Impression:
            topic, ts = imp_topic, event.served_at
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

    Same topics, keys, timestamps and encoding as :func:`produce_events`; call
    :meth:`close` (or use it as a context manager) to flush at the end.
    """

    def __init__(self, kafka: KafkaSettings | str, *, prefix: str = DEFAULT_PREFIX, create_topics: bool = True,
                 partitions: int = 1, producer_overrides: Mapping[str, object] | None = None,
                 flush_timeout_s: float = 60.0) -> None:
        from stream.kafka import ensure_topics, make_producer

        if flush_timeout_s <= 0:
            raise ValueError(f"flush_timeout_s must be > 0, but {flush_timeout_s} is given")
        self.settings = KafkaSettings(kafka) if isinstance(kafka, str) else kafka
        self.topics = TopicNames(prefix)
        if create_topics:
            ensure_topics(self.settings, [self.topics.impressions, self.topics.clicks], partitions=partitions)
        self._producer = make_producer(self.settings, **dict(producer_overrides or {}))
        self.flush_timeout_s = flush_timeout_s
        self.stats = SinkStats(produced={self.topics.impressions: 0, self.topics.clicks: 0})

    def _on_delivery(self, err, _msg) -> None:
        if err is None:
            self.stats.delivered += 1
        else:
            self.stats.failed += 1
            name = str(err.name()) if hasattr(err, "name") else str(err)
            self.stats.errors[name] = self.stats.errors.get(name, 0) + 1

    def __call__(self, event: Impression | Click) -> None:
        if type(event) is Impression:
            topic, ts = self.topics.impressions, event.served_at
        else:
            topic, ts = self.topics.clicks, event.clicked_at
        value = fast_encode(event)
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
