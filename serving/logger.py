"""Impression logging: every shown item goes to Kafka, without ever slowing a request.

A request only appends its impressions to a bounded in-memory buffer (a list
behind a lock held for an append); when the buffer is full the impressions are
dropped and counted, never waited for. A background thread wakes every
``flush_interval_s`` (it is not woken per request, so it does not compete with
requests for the interpreter), takes the whole buffer, encodes each :class:`em3.types.Impression` with :mod:`em3.codec` and produces it
to the impressions topic keyed by ``user_id`` (one user's events stay on one
partition, which the join relies on). Producer back-pressure (librdkafka's
local queue full) is retried briefly and then counted as a drop; delivery
failures reported by the broker are counted as ``failed``.

Guarantee: at most once, best effort. An impression is never produced twice by
the logger, and every one that is not produced is counted (``dropped`` or
``failed``), so a consumer can size the loss.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from em3 import codec
from em3.types import Impression

__all__ = ["ImpressionLoggerConfig", "ImpressionLogger", "ImpressionLoggerStats"]

logger = logging.getLogger(__name__)

BatchHook = Callable[[Sequence[Impression]], None]


@dataclass(frozen=True)
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
    produce_retry_s : float
        How long a batch waits on a full producer queue before dropping.
    """

    topic: str
    buffer_size: int = 100_000
    batch_size: int = 2000
    flush_interval_s: float = 0.02
    produce_retry_s: float = 0.5

    def __post_init__(self) -> None:
        if not self.topic:
            raise ValueError(f"topic must be a non-empty string, but {self.topic!r} is given")
        for name in ("buffer_size", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be > 0, but {value!r} is given")
        for name in ("flush_interval_s", "produce_retry_s"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"{name} must be > 0, but {value!r} is given")


@dataclass(frozen=True)
class ImpressionLoggerStats:
    enqueued: int
    produced: int
    dropped: int
    failed: int
    queued: int


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
        self.hook_errors = 0
        self._pending = 0  # taken from the buffer, not yet handed to the producer

    # -- request side ---------------------------------------------------------------
    def log_many(self, impressions: Sequence[Impression]) -> int:
        """Buffer ``impressions`` without blocking; returns how many were dropped."""
        with self._lock:
            room = self.config.buffer_size - len(self._buffer)
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
        for n, imp in enumerate(batch):
            value = codec.encode(imp)
            deadline = time.monotonic() + self.config.produce_retry_s
            while True:
                try:
                    self.producer.produce(
                        self.config.topic, key=imp.user_id.encode(), value=value, on_delivery=self._on_delivery
                    )
                    produced += 1
                    break
                except BufferError:
                    if time.monotonic() >= deadline:
                        with self._lock:
                            self.dropped += len(batch) - produced
                        logger.warning("producer queue full; dropped %d impressions", len(batch) - produced)
                        self._count_produced(produced)
                        return
                    self.producer.poll(0.05)
        self._count_produced(produced)

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
        """Drain the queue, flush the producer, stop the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        remaining = self.producer.flush(timeout_s)
        if remaining:
            logger.warning("%d impressions still undelivered at close", remaining)
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
                self.enqueued, self.produced, self.dropped, self.failed, len(self._buffer)
            )
