"""Impression logging: every shown item goes to Kafka, without slowing a request.

A request only appends its impressions to a bounded in-memory buffer (a list
behind a lock held for an append). A background thread wakes every
``flush_interval_s`` (it is not woken per request, so it does not compete with
requests for the interpreter), takes the whole buffer, encodes each
:class:`em3.types.Impression` with :mod:`em3.codec` and produces it to the
impressions topic keyed by ``user_id`` (one user's events stay on one partition,
which the join relies on).

Guarantee: at least once while the process lives. The producer is idempotent
(``enable.idempotence``, ``acks=all``) with no delivery timeout
(``message.timeout.ms=0``, :data:`PRODUCER_SETTINGS`), so while the broker is
away librdkafka keeps the impressions and retries until it is back; measured on
Tansu (durable storage) across a broker restart: 2,000 of 2,000 delivered, no
duplicate. When librdkafka's own queue is full the logger thread waits for room
instead of dropping (back-pressure), so its buffer fills; once the buffer is full,
:meth:`ImpressionLogger.reserve` is False and the server answers 503 rather than
serve impressions it could not log (``rejected`` counts those requests). Only
impressions still held at a shutdown that does not drain are ``dropped``, and
only a broker that refuses a record for good makes one ``failed``: both are
counted. Duplicates from retries carry the same impression id and are absorbed by
the join. A SIGKILL loses what the process held (at most the last
``flush_interval_s`` plus the producer's linger of impressions, a few tens of ms).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from em3 import codec
from em3.constraints import NonEmptyStr, PositiveFloat, PositiveInt, config_class
from em3.types import Impression

__all__ = ["ImpressionLoggerConfig", "ImpressionLogger", "ImpressionLoggerStats"]

logger = logging.getLogger(__name__)

BatchHook = Callable[[Sequence[Impression]], None]

#: librdkafka settings of the impression producer (``stream.kafka.make_producer`` overrides).
PRODUCER_SETTINGS = {"enable_idempotence": True, "acks": "all", "message_timeout_ms": 0, "linger_ms": 5}


@config_class
class ImpressionLoggerConfig:
    """Settings of an :class:`ImpressionLogger`.

    Parameters
    ----------
    topic : str
        The impressions topic.
    buffer_size : int
        Impressions the in-memory queue holds before new ones are dropped.
    batch_size : int
        Impressions handed to ``on_batch`` at a time.
    flush_interval_s : float
        How often the background thread drains the buffer.
    """

    topic: NonEmptyStr
    buffer_size: PositiveInt = 100_000
    batch_size: PositiveInt = 2000
    flush_interval_s: PositiveFloat = 0.02


@dataclass(frozen=True)
class ImpressionLoggerStats:
    enqueued: int
    produced: int
    dropped: int
    failed: int
    queued: int
    rejected: int = 0
    waits: int = 0


class ImpressionLogger:
    """Asynchronous, bounded, never-blocking impression logger.

    Parameters
    ----------
    producer : confluent_kafka.Producer-like
        Anything with ``produce(topic, key=, value=, on_delivery=)``, ``poll`` and
        ``flush`` (``stream.kafka.make_producer`` in production).
    config : ImpressionLoggerConfig
    on_batch : callable, optional
        Called in the background thread with each produced batch (the popularity
        counter of impressions uses it); its errors are logged and counted.
    """

    def __init__(self, producer: Any, config: ImpressionLoggerConfig, on_batch: BatchHook | None = None) -> None:
        self.producer = producer
        self.config = config
        self.on_batch = on_batch
        self._buffer: list[Impression] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.enqueued = 0
        self.produced = 0
        self.dropped = 0
        self.failed = 0
        self.rejected = 0  # requests refused (503) because the buffer was full
        self.waits = 0  # times the logger waited on a full producer queue
        self.hook_errors = 0
        self._pending = 0  # taken from the buffer, not yet handed to the producer
        self._reserved = 0  # slots held by requests between reserve() and log_many()
        self._deadline: float | None = None  # set by close(): when to stop waiting on the broker

    # -- request side ---------------------------------------------------------------
    def reserve(self, n: int) -> bool:
        """Hold ``n`` buffer slots for a request about to serve ``n`` impressions.

        False (counted as a rejection) when they do not fit: the server answers 503
        rather than serve what it cannot log. Holding the slots, not only checking
        for them, keeps concurrent requests (``rank_executor="threads"``) from both
        passing the check and the second one's impressions being dropped. The
        request hands them back with ``log_many(..., reserved=n)`` or :meth:`release`.
        """
        with self._lock:
            if len(self._buffer) + self._pending + self._reserved + n <= self.config.buffer_size:
                self._reserved += n
                return True
            self.rejected += 1
            return False

    def release(self, n: int) -> None:
        """Give back slots a request reserved and will not log (it failed)."""
        with self._lock:
            self._reserved = max(0, self._reserved - n)

    def log_many(self, impressions: Sequence[Impression], reserved: int = 0) -> int:
        """Buffer ``impressions`` without blocking, first releasing the ``reserved``
        slots held for them; returns how many were dropped (none when reserved)."""
        with self._lock:
            self._reserved = max(0, self._reserved - reserved)
            room = self.config.buffer_size - len(self._buffer) - self._pending - self._reserved
            taken = impressions if len(impressions) <= room else impressions[: max(0, room)]
            self._buffer.extend(taken)
            dropped = len(impressions) - len(taken)
            self.enqueued += len(taken)
            self.dropped += dropped
        return dropped

    # -- background side --------------------------------------------------------------
    def start(self) -> "ImpressionLogger":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="em3-impression-logger", daemon=True)
            self._thread.start()
        return self

    def _on_delivery(self, err: Any, msg: Any) -> None:
        # With ``delivery.report.only.error`` (set by ServingRuntime.from_settings)
        # librdkafka calls this for failures only, sparing a Python call per record.
        if err is None:
            return
        with self._lock:
            self.failed += 1
        logger.warning("impression delivery failed: %s", err)

    def _take_all(self) -> list[Impression]:
        with self._lock:
            batch, self._buffer = self._buffer, []
            self._pending = len(batch)
        return batch

    def _produce(self, batch: Sequence[Impression]) -> None:
        produced = 0
        for imp in batch:
            value = codec.encode(imp)
            while True:
                try:
                    self.producer.produce(
                        self.config.topic, key=imp.user_id.encode(), value=value, on_delivery=self._on_delivery
                    )
                    produced += 1
                    break
                except BufferError:
                    # librdkafka's queue is full (the broker is away or slow): wait for
                    # room; the buffer fills behind us and the server pushes back (503).
                    if self._stop.is_set() and self._giving_up():
                        with self._lock:
                            self.dropped += len(batch) - produced
                        logger.error("shutting down with the producer queue full: dropped %d impressions",
                                     len(batch) - produced)
                        self._count_produced(produced)
                        return
                    with self._lock:
                        self.waits += 1
                    self.producer.poll(0.05)
        self._count_produced(produced)

    def _giving_up(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline

    def _count_produced(self, n: int) -> None:
        with self._lock:
            self.produced += n
        self.producer.poll(0)

    def _run(self) -> None:
        while True:
            stopping = self._stop.wait(self.config.flush_interval_s)
            taken = self._take_all()
            if not taken:
                self.producer.poll(0)
                if stopping:
                    return
                continue
            size = self.config.batch_size
            for start in range(0, len(taken), size):
                batch = taken[start:start + size]
                try:
                    self._produce(batch)
                except Exception:  # noqa: BLE001 - the logger must outlive any one bad batch
                    with self._lock:
                        self.failed += len(batch)
                    logger.exception("producing %d impressions failed", len(batch))
                    continue
                if self.on_batch is not None:
                    try:
                        self.on_batch(batch)
                    except Exception as exc:  # noqa: BLE001 - counters are best effort
                        self.hook_errors += 1
                        logger.warning("impression batch hook failed: %r", exc)
            with self._lock:
                self._pending = 0

    def close(self, timeout_s: float = 10.0) -> ImpressionLoggerStats:
        """Drain the queue, flush the producer, stop the thread (waiting at most
        ``timeout_s`` for an absent broker; what is left then is counted as dropped)."""
        self._deadline = time.monotonic() + timeout_s
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        remaining = self.producer.flush(max(0.0, self._deadline - time.monotonic()))
        with self._lock:
            self.dropped += len(self._buffer) + remaining
            self._buffer = []
        if remaining:
            logger.error("%d impressions still undelivered at close: counted as dropped", remaining)
        return self.stats()

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until the queue is drained and the producer has delivered everything."""
        deadline = time.monotonic() + timeout_s
        while (self._buffer or self._pending) and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.producer.flush(max(0.0, deadline - time.monotonic())) == 0 and not self._buffer

    def stats(self) -> ImpressionLoggerStats:
        with self._lock:
            return ImpressionLoggerStats(
                self.enqueued, self.produced, self.dropped, self.failed, len(self._buffer), self.rejected, self.waits
            )
