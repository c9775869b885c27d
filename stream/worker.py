"""The join's hot path: a batched confluent-kafka loop around :class:`stream.join.JoinCore`.

One :class:`JoinWorker` consumes partition ``n`` of ``impressions``, ``clicks``
and ``conversions`` (co-partitioned by user id; the ``range`` assignor gives a
member the same partition numbers of every topic) and keeps one core per
partition. Without a conversions topic the join runs on the other two and says so
in its log. Each micro-batch:

1. ``consume(num_messages=batch_size)``; decode each record; a malformed one
   goes to the dead-letter topic with its reason (and is counted), the rest
   feed the core of their partition;
2. every core ticks with processing time (idle watermark advance); an input
   partition counts as busy until librdkafka reports its end (partition EOF),
   so a backlog, or a consumer that has not fetched yet, is never mistaken
   for an idle input;
3. samples (keyed by user id) and join dead letters are produced, then the
   producer is **flushed** and every delivery checked;
4. only then, one Redis ``MULTI/EXEC`` writes the changed join records, the
   offsets consumed and the history appends (:class:`stream.state.RedisJoinStateStore`).

Deleted users: before each batch the worker refreshes the tombstones
(:class:`em3.privacy.TombstoneFilter`, one Redis read when nothing changed) and
drops the records of erased users as they are read, and their samples, history
appends and dead letters before they are emitted (``erased_dropped``). The
erasure itself fences the partitions it rewrites (:func:`stream.state.erase_users`),
so whatever of theirs a batch already held is reloaded away, never checkpointed.

On assignment a partition's state and offsets are loaded from Redis and the
consumer seeks there; Kafka's committed offsets are not used for recovery
(they are committed too, only as a progress figure for operators). A crash
after 3 and before 4 re-emits that batch's samples with the same sample ids
(:mod:`stream.dedup`); nothing is lost because offsets only move with state.
"""
from __future__ import annotations

import gc
import logging
import threading
import time
from typing import Callable

from em3 import codec
from em3.config import Settings
from em3.constraints import PositiveFloat, PositiveInt, config_class
from em3.errors import DecodeError, EM3Error, ImproperlyConfigured
from em3.privacy import TombstoneFilter
from em3.redis_stores import RedisPrivacyStore, connect
from em3.retry import Backoff
from em3.types import Click, Conversion
from stream import kafka
from stream.join import JoinConfig, JoinCore
from stream.state import FencedError, PartitionCheckpoint, RedisJoinStateStore
from stream.wire import (
    decode_click_checked,
    decode_conversion_checked,
    decode_impression_checked,
    encode_sample,
)

__all__ = ["WorkerConfig", "JoinWorker", "DeliveryError", "tune_gc"]

log = logging.getLogger(__name__)


def tune_gc(threshold0: int = 100_000) -> None:
    """Collect young objects less often in a join process.

    The join keeps every impression of its correction horizon in memory (hundreds
    of thousands of small objects, none in reference cycles) and allocates a few
    objects per event; with CPython's default threshold (700) the cyclic GC ran
    every few hundred events and cost about a third of the join's CPU time here.
    Process entry points (``em3 join``) call this; a library user may too.
    """
    if threshold0 <= 0:
        raise ValueError(f"threshold0 must be > 0, but {threshold0} is given")
    gc.set_threshold(threshold0, 50, 100)


class DeliveryError(EM3Error):
    """The broker did not acknowledge produced samples; the batch is not checkpointed."""


@config_class
class WorkerConfig:
    """Runtime settings of one join worker.

    Parameters
    ----------
    group_id : consumer group and Redis state namespace; ``""`` means ``{topic prefix}join``.
    batch_size : records per ``consume`` call (one micro-batch, one checkpoint).
    poll_timeout_s : how long ``consume`` waits for a batch to fill.
    history_length : entries kept per user's click history.
    max_future_s : event times further than this ahead of the wall clock are
        dead-lettered as ``absurd_timestamp``, so they never reach a watermark
        (one impression stamped 23 h ahead would close every window after it).
    max_dead_letter_bytes : a dead-lettered value longer than this is cut to it
        (header ``em3-truncated`` holds the original length), so a 1 MB poison
        record cannot fail the dead-letter produce itself.
    retry_initial_s, retry_max_s : backoff between recoveries after a failed batch.
    log_interval_s : how often the counters are logged.
    """

    group_id: str = ""
    batch_size: PositiveInt = 5000
    poll_timeout_s: PositiveFloat = 0.1
    history_length: PositiveInt = 256
    max_future_s: PositiveFloat = 300.0
    log_interval_s: PositiveFloat = 10.0
    max_dead_letter_bytes: PositiveInt = 64 * 1024
    retry_initial_s: PositiveFloat = 0.5
    retry_max_s: PositiveFloat = 30.0


class JoinWorker:
    """Runs the join over Kafka with durable state in Redis (see the module docstring).

    Parameters
    ----------
    settings : where Kafka and Redis are, topic names, Redis key prefix.
    join : the join semantics.
    config : batch size, group id and other runtime settings.
    clock : wall clock (event-time sanity checks); ``monotonic`` is used for idleness.
    """

    def __init__(
        self,
        settings: Settings,
        join: JoinConfig | None = None,
        config: WorkerConfig | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.join = join or JoinConfig()
        self.config = config or WorkerConfig()
        self.group_id = self.config.group_id or f"{settings.topics.prefix}join"
        self.clock = clock
        self.topics = settings.topics
        self._cores: dict[int, JoinCore] = {}
        self._next: dict[tuple[str, int], int | None] = {}
        self._dirty: set[int] = set()
        self._saved_watermark: dict[int, float] = {}
        #: (topic, partition) -> at its end (librdkafka's partition EOF, no record since)
        self._caught_up: dict[tuple[str, int], bool] = {}
        self._consumer: kafka.Consumer | None = None
        self._producer: kafka.Producer | None = None
        self._store: RedisJoinStateStore | None = None
        self._delivery_errors: list[str] = []
        self._lock = threading.Lock()
        self._last_log = time.monotonic()
        #: The input topics read: impressions and clicks, and conversions when that topic exists.
        self.inputs: tuple[str, ...] = (self.topics.impressions, self.topics.clicks)
        self.counters: dict[str, int] = {
            "events_in": 0, "impressions_in": 0, "clicks_in": 0, "conversions_in": 0, "samples_out": 0,
            "positive": 0, "negative": 0, "correction": 0, "conversion": 0, "late_conversion": 0,
            "dead_letters": 0, "batches": 0, "checkpoints": 0,
            "fenced": 0, "batch_failures": 0, "recoveries": 0, "offset_resets": 0, "quarantined": 0,
            "erased_dropped": 0,
        }
        self._tombstones: TombstoneFilter | None = None
        self._backoff = Backoff(self.config.retry_initial_s, self.config.retry_max_s)
        self._retry_at: float | None = None  # set while recovering from a failed batch
        self.last_failure = ""
        self.last_batch_s = 0.0
        #: Seconds spent per phase of the batch loop (decode+join, produce, flush, checkpoint).
        self.phase_s = {"feed": 0.0, "emit": 0.0, "flush": 0.0, "checkpoint": 0.0}
        self.last_checkpoint_s = 0.0

    # -- lifecycle --------------------------------------------------------------------
    def start_or_retry(self) -> None:
        """:meth:`start`; if a dependency is down, count it and let :meth:`step` retry."""
        try:
            self.start()
        except ImproperlyConfigured:
            raise
        except Exception as exc:  # noqa: BLE001 - Redis or the broker not up yet
            self.close_quietly()
            self._failed(exc, "start")

    def start(self) -> None:
        """Connect, check co-partitioning, subscribe (state loads on assignment)."""
        imps, clicks, conversions = self.topics.impressions, self.topics.clicks, self.topics.conversions
        counts = kafka.partition_counts(self.settings.kafka, [imps, clicks, conversions])
        if counts[imps] == 0 or counts[clicks] == 0:
            raise ImproperlyConfigured(f"input topics missing ({counts}); run `em3 topics create` first")
        if counts[imps] != counts[clicks] or counts[conversions] not in (0, counts[imps]):
            raise ImproperlyConfigured(
                f"impressions, clicks and conversions must have the same partition count (co-partitioning), "
                f"but {counts} is given"
            )
        if counts[conversions]:
            self.inputs = (imps, clicks, conversions)
        else:
            self.inputs = (imps, clicks)
            log.warning("topic %s does not exist: conversions are not joined (create it with `em3 topics "
                        "create`)", conversions)
        retention = self.settings.retention
        client = connect(self.settings.redis)
        self._store = RedisJoinStateStore(
            client, self.settings.redis_prefix, self.group_id, self.config.history_length,
            history_ttl_s=retention.history_ttl_s, state_ttl_s=retention.join_state_ttl_s,
        )
        privacy = RedisPrivacyStore(client, self.settings.redis_prefix, retention.tombstone_ttl_s)
        self._tombstones = TombstoneFilter(privacy.tombstoned)
        self._producer = kafka.make_producer(self.settings.kafka, on_delivery=self._on_delivery, linger_ms=5)
        self._consumer = kafka.make_consumer(
            self.settings.kafka, self.group_id, partition_assignment_strategy="range",
            fetch_max_bytes=16 * 1024 * 1024, enable_partition_eof=True,
        )
        self._consumer.subscribe(
            list(self.inputs),
            on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_revoke,
        )
        log.info("join worker started: group %s, %s", self.group_id, self.join)

    def close(self) -> None:
        """Leave the group (state stays in Redis, consistent as of the last batch)."""
        consumer, producer, store = self._consumer, self._producer, self._store
        self._consumer = self._producer = self._store = None
        try:
            if consumer is not None:
                consumer.close()
        finally:
            try:
                if producer is not None:
                    producer.flush(10)
            finally:
                if store is not None:
                    store.client.close()
        self._log_counters()

    def run(self, stop: threading.Event, idle_exit_s: float | None = None) -> None:
        """Loop :meth:`run_once` until ``stop`` is set (or, with ``idle_exit_s``, until
        that long passes with nothing pending and nothing read)."""
        last_work = time.monotonic()
        while not stop.is_set():
            if self.step() or not self.partitions:
                last_work = time.monotonic()
            elif idle_exit_s is not None and time.monotonic() - last_work > idle_exit_s and self.pending == 0:
                return

    def step(self) -> int:
        """One :meth:`run_once` that rides out failures instead of raising.

        A batch that fails (Redis or the broker down, a delivery not acknowledged,
        a fencing surprise) is not checkpointed, so nothing of it is lost: the
        worker waits (exponential backoff with jitter), then rejoins the group,
        whose assignment loads every partition's state and offsets from its last
        checkpoint; the batch's samples are re-emitted with the same ids (dropped by the dedup).
        A worker whose :meth:`start` failed (a dependency down at boot) retries
        it the same way (:meth:`_recover`). Per-record failures never get here: they are
        dead-lettered in the batch.
        """
        if self._retry_at is not None:
            wait = self._retry_at - time.monotonic()
            if wait > 0:
                time.sleep(min(wait, self.config.poll_timeout_s))
                return 0
            try:
                self._recover()
            except Exception as exc:  # noqa: BLE001 - still down: wait longer
                self._failed(exc, "recovery")
                return 0
        try:
            read = self.run_once()
        except Exception as exc:  # noqa: BLE001 - see the docstring
            self._failed(exc, "batch")
            return 0
        self._backoff.reset()
        return read

    def _failed(self, exc: BaseException, what: str) -> None:
        self.counters["batch_failures"] += 1
        self.last_failure = f"{what}: {exc!r}"[:500]
        delay = self._backoff.next()
        self._retry_at = time.monotonic() + delay
        log.warning("join %s failed (%r); retrying in %.1f s", what, exc, delay)

    def _recover(self) -> None:
        """Back to a consistent state: leave the group, start again, and let the
        assignment load every partition's state and offsets from its checkpoint.

        A full restart rather than a reload in place: a failure can strike inside
        a rebalance callback (Redis down while a partition is assigned), after
        which this consumer's idea of its partitions and the group's differ.
        Rejoining costs one rebalance (seconds) and is right in every case.
        """
        self.close_quietly()
        self.start()
        self._retry_at = None
        self.counters["recoveries"] += 1
        log.info("join recovered: rejoined the group; partitions load from their checkpoints")

    def close_quietly(self) -> None:
        """:meth:`close`, ignoring what fails (a half-started worker, a dead dependency)."""
        try:
            self.close()
        except Exception as exc:  # noqa: BLE001 - best effort
            log.debug("close during recovery failed: %r", exc)
        self._consumer = self._producer = self._store = None
        with self._lock:
            for n in list(self._cores):
                self._cores.pop(n, None)
            self._next.clear()
            self._caught_up.clear()
            self._dirty.clear()

    # -- rebalance --------------------------------------------------------------------
    def _on_assign(self, consumer: kafka.Consumer, partitions: list[kafka.TopicPartition]) -> None:
        now = time.monotonic()
        with self._lock:
            for n in sorted({tp.partition for tp in partitions} - set(self._cores)):
                self._store.acquire(n)
                core, offsets = self._store.load(n, self.join, now)
                self._cores[n] = core
                for topic in self.inputs:
                    self._next[(topic, n)] = offsets.get(topic)
            for tp in partitions:
                self._caught_up[(tp.topic, tp.partition)] = False
                stored = self._next.get((tp.topic, tp.partition))
                tp.offset = stored if stored is not None else kafka.OFFSET_BEGINNING
        log.info("assigned %s", [(tp.topic, tp.partition, tp.offset) for tp in partitions])
        consumer.assign(partitions)

    def _on_revoke(self, consumer: kafka.Consumer, partitions: list[kafka.TopicPartition]) -> None:
        # Every finished batch is checkpointed already; records of the batch being
        # read now for these partitions are skipped and re-read by the next owner.
        with self._lock:
            for n in {tp.partition for tp in partitions}:
                self._drop(n)
        log.info("revoked %s", [(tp.topic, tp.partition) for tp in partitions])

    def _reload(self, n: int) -> None:
        """Re-own partition ``n``: new epoch, state and offsets from Redis, seek there."""
        self._drop(n)
        self._store.acquire(n)
        core, offsets = self._store.load(n, self.join, time.monotonic())
        self._cores[n] = core
        for topic in self.inputs:
            stored = offsets.get(topic)
            self._next[(topic, n)] = stored
            self._caught_up[(topic, n)] = False
            try:
                self._consumer.seek(kafka.TopicPartition(
                    topic, n, stored if stored is not None else kafka.OFFSET_BEGINNING))
            except kafka.KafkaException as exc:  # not assigned here any more: the next rebalance decides
                log.warning("cannot seek %s:%d: %s", topic, n, exc)
                self._drop(n)
                return

    def _drop(self, n: int) -> None:
        self._cores.pop(n, None)
        self._dirty.discard(n)
        self._saved_watermark.pop(n, None)
        for topic in self.inputs:
            self._next.pop((topic, n), None)
            self._caught_up.pop((topic, n), None)
        if self._store is not None:
            self._store.release(n)

    # -- the batch ----------------------------------------------------------------------
    def run_once(self) -> int:
        """Read, join, produce, flush and checkpoint one micro-batch; returns records read."""
        if self._tombstones is not None:
            self._tombstones.refresh()  # before reading: see the module docstring
        messages = self._consumer.consume(num_messages=self.config.batch_size, timeout=self.config.poll_timeout_s)
        started = time.perf_counter()
        phases = self.phase_s
        with self._lock:
            read = self._feed(messages)
            t1 = time.perf_counter()
            phases["feed"] += t1 - started
            now = time.monotonic()
            caught_up = self._caught_up
            imps, clicks = self.topics.impressions, self.topics.clicks
            conversions = self.topics.conversions if len(self.inputs) > 2 else None
            for n, core in self._cores.items():
                # An input not at its end has a backlog: behind, not idle.
                core.tick(now, not caught_up.get((imps, n), False), not caught_up.get((clicks, n), False),
                          conversions is not None and not caught_up.get((conversions, n), False))
            parts = self._emit()
        t2 = time.perf_counter()
        phases["emit"] += t2 - t1
        if parts:
            self._flush()
            ck = time.perf_counter()
            phases["flush"] += ck - t2
            try:
                self._store.checkpoint(parts)
            except FencedError as exc:
                # Another worker took these partitions over (a rebalance this worker saw
                # late). Nothing of this batch is checkpointed; its samples are exact
                # re-emissions for the dedup. Kafka still assigns them here, so take
                # them back from the last checkpoint (the other owner is fenced in
                # turn, and the next rebalance settles who keeps them).
                self.counters["fenced"] += 1
                log.warning("fenced: reloading partitions %s from Redis: %s", [p.partition for p in parts], exc)
                with self._lock:
                    for p in parts:
                        self._reload(p.partition)
                return read
            self.last_checkpoint_s = time.perf_counter() - ck
            phases["checkpoint"] += self.last_checkpoint_s
            self.counters["checkpoints"] += 1
            self._commit(parts)
        if read:
            self.counters["batches"] += 1
            self.last_batch_s = time.perf_counter() - started
        if time.monotonic() - self._last_log >= self.config.log_interval_s:
            self._log_counters()
        return read

    def _feed(self, messages: list[kafka.Message]) -> int:
        imp_topic, click_topic = self.topics.impressions, self.topics.clicks
        latest = self.clock() + self.config.max_future_s
        now = time.monotonic()
        cores, nxt, dirty, caught_up = self._cores, self._next, self._dirty, self._caught_up
        erased = self._tombstones.erased if self._tombstones is not None and len(self._tombstones) else None
        read = n_imp = n_click = n_conv = dropped = 0
        for msg in messages:
            err = msg.error()
            if err is not None:
                if err.code() == kafka.KafkaError._PARTITION_EOF:
                    caught_up[(msg.topic(), msg.partition())] = True
                elif err.code() == kafka.KafkaError._AUTO_OFFSET_RESET:
                    # The checkpoint's offset is past the end of the topic (a broker that
                    # lost its data): the consumer restarts at the earliest offset. Accept
                    # what comes from there instead of skipping it as "re-delivered".
                    key = (msg.topic(), msg.partition())
                    self.counters["offset_resets"] += 1
                    log.error("offset of %s:%d is past the end of the topic (broker lost data?): %s; "
                              "reading from the earliest offset", key[0], key[1], err)
                    if key in nxt:
                        nxt[key] = None
                else:
                    log.warning("consume error: %s", err)
                continue
            n = msg.partition()
            core = cores.get(n)
            if core is None:
                continue  # revoked during this consume(): the next owner re-reads it
            topic, off = msg.topic(), msg.offset()
            key = (topic, n)
            expected = nxt.get(key)
            if expected is not None and off < expected:
                continue  # re-delivered after a seek
            nxt[key] = off + 1
            caught_up[key] = False
            dirty.add(n)
            read += 1
            value = msg.value()
            try:
                if topic == imp_topic:
                    imp = decode_impression_checked(value, latest)
                    if erased is not None and erased(imp.user_id):
                        dropped += 1
                        continue
                    core.add_impression(imp, value, now)
                    n_imp += 1
                elif topic == click_topic:
                    click = decode_click_checked(value, latest)
                    if erased is not None and erased(click.user_id):
                        dropped += 1
                        continue
                    core.add_click(click, off, now)
                    n_click += 1
                else:
                    conversion = decode_conversion_checked(value, latest)
                    if erased is not None and erased(conversion.user_id):
                        dropped += 1
                        continue
                    core.add_conversion(conversion, off, now)
                    n_conv += 1
            except DecodeError as exc:
                self._dead_letter(exc.reason, exc.detail, topic, n, off, value, msg.key())
            except Exception as exc:  # noqa: BLE001 - quarantine: one record never stops the join
                log.warning("record %s:%d@%d failed in the join: %r", topic, n, off, exc)
                self.counters["quarantined"] += 1
                self._dead_letter("join_failed", repr(exc), topic, n, off, value, msg.key())
        counters = self.counters
        counters["events_in"] += read
        counters["impressions_in"] += n_imp
        counters["clicks_in"] += n_click
        counters["conversions_in"] += n_conv
        counters["erased_dropped"] += dropped
        return read

    def _dead_letter(self, reason: str, detail: str, topic: str, n: int, off: int, value: bytes | None,
                     key: bytes | None) -> None:
        headers = kafka.dead_letter_headers(reason, detail, topic, n, off)
        limit = self.config.max_dead_letter_bytes
        if value is not None and len(value) > limit:
            headers.append(("em3-truncated", str(len(value)).encode()))
            value = value[:limit]
        if key is not None and len(key) > 1024:
            key = key[:1024]
        try:
            self._producer.produce(self.topics.dead_letter, value=value, key=key, headers=headers)
        except BufferError:
            self._producer.poll(0.5)
            self._producer.produce(self.topics.dead_letter, value=value, key=key, headers=headers)
        self.counters["dead_letters"] += 1
        name = f"dead_letter.{reason}"
        self.counters[name] = self.counters.get(name, 0) + 1

    def _emit(self) -> list[PartitionCheckpoint]:
        produce = self._producer.produce
        samples_topic = self.topics.samples
        parts = []
        counters = self.counters
        erased = self._tombstones.erased if self._tombstones is not None and len(self._tombstones) else None
        for n, core in self._cores.items():
            out = core.take_output()
            if erased is not None:
                self._drop_erased(out, erased)
            for sample, raw in zip(out.samples, out.raws):
                value = encode_sample(sample, raw)
                try:
                    produce(samples_topic, value, sample.impression.user_id)
                except BufferError:  # the local queue is full: let librdkafka drain it
                    self._producer.poll(0.5)
                    produce(samples_topic, value, sample.impression.user_id)
                except kafka.KafkaException as exc:  # this record cannot be produced: quarantine it
                    counters["quarantined"] += 1
                    self._dead_letter("produce_failed", repr(exc), samples_topic, n, -1, value,
                                      sample.impression.user_id.encode())
            for kind, count in out.counts.items():
                counters[kind] += count
            counters["samples_out"] += len(out.samples)
            for d in out.dead_letters:
                source = (self.topics.clicks if isinstance(d.record, Click) else
                          self.topics.conversions if isinstance(d.record, Conversion) else self.topics.impressions)
                self._dead_letter(d.reason, d.detail, source, n, d.offset, codec.encode(d.record),
                                  d.record.user_id.encode())
            changes = core.take_changes()
            watermark = changes.meta["watermark"]
            if (out or changes.records or changes.orphans or changes.conversions or n in self._dirty
                    or watermark != self._saved_watermark.get(n)):
                offsets = {
                    topic: off
                    for topic in self.inputs
                    if (off := self._next.get((topic, n))) is not None
                }
                parts.append(PartitionCheckpoint(n, offsets, changes, out.history, core))
                self._saved_watermark[n] = watermark
        self._dirty.clear()
        return parts

    def _drop_erased(self, out, erased) -> None:
        """Take the samples, history appends and dead letters of erased users out of ``out``."""
        keep = [i for i, s in enumerate(out.samples) if not erased(s.impression.user_id)]
        dropped = len(out.samples) - len(keep)
        if dropped:
            for s in out.samples:
                if erased(s.impression.user_id):
                    kind = ("conversion" if s.conversion else "correction" if s.correction
                            else "positive" if s.label else "negative")
                    out.counts[kind] = out.counts.get(kind, 0) - 1
            out.samples = [out.samples[i] for i in keep]
            out.raws = [out.raws[i] for i in keep]
        history = [h for h in out.history if not erased(h[0])]
        letters = [d for d in out.dead_letters if not erased(d.record.user_id)]
        dropped += len(out.dead_letters) - len(letters)
        out.history, out.dead_letters = history, letters
        self.counters["erased_dropped"] += dropped

    def _on_delivery(self, err: object, msg: kafka.Message) -> None:
        if err is not None:
            self._delivery_errors.append(str(err))

    def _flush(self) -> None:
        remaining = self._producer.flush(30)
        if remaining or self._delivery_errors:
            errors, self._delivery_errors = self._delivery_errors[:5], []
            raise DeliveryError(f"{remaining} records unflushed, delivery errors {errors}; not checkpointing")

    def _commit(self, parts: list[PartitionCheckpoint]) -> None:
        offsets = [kafka.TopicPartition(t, p.partition, off) for p in parts for t, off in p.offsets.items()]
        if offsets:
            try:
                self._consumer.commit(offsets=offsets, asynchronous=True)
            except kafka.KafkaException as exc:  # informational only: Redis holds the real offsets
                log.debug("offset commit failed: %s", exc)

    # -- figures ----------------------------------------------------------------------
    @property
    def partitions(self) -> list[int]:
        """The input partitions this worker owns now."""
        return sorted(self._cores)

    @property
    def pending(self) -> int:
        """Impressions without a label yet, over the owned partitions."""
        return sum(core.pending for core in list(self._cores.values()))

    def metrics(self) -> dict[str, object]:
        """Counters and lag-ish figures: events in, samples out by kind, dead letters by
        reason, state sizes, per-partition watermark and event-time delay, batch times.

        Safe to call from another thread (the faust timer and web view): it waits
        for the current micro-batch's join step to finish.
        """
        with self._lock:
            return self._metrics()

    def _metrics(self) -> dict[str, object]:
        cores = dict(self._cores)
        now = self.clock()
        watermarks = {n: c.watermark for n, c in cores.items()}
        finite = [w for w in watermarks.values() if w > float("-inf")]
        return {
            **self.counters,
            "partitions": sorted(cores),
            "pending_impressions": sum(c.pending for c in cores.values()),
            "records": sum(c.records for c in cores.values()),
            "held_clicks": sum(c.held_clicks for c in cores.values()),
            "held_conversions": sum(c.held_conversion_count for c in cores.values()),
            "awaiting_conversion": sum(c.awaiting_conversion for c in cores.values()),
            "watermark_min": min(finite) if finite else None,
            "event_time_delay_s": (now - min(finite)) if finite else None,
            "next_offsets": {f"{t}:{n}": o for (t, n), o in self._next.items() if o is not None},
            "last_batch_s": round(self.last_batch_s, 4),
            "last_checkpoint_s": round(self.last_checkpoint_s, 4),
            "phase_s": {k: round(v, 3) for k, v in self.phase_s.items()},
            "degraded": int(self._retry_at is not None),
            "last_failure": self.last_failure,
        }

    def _log_counters(self) -> None:
        self._last_log = time.monotonic()
        m = self.metrics()  # takes the lock
        log.info(
            "join: in %d (imp %d, click %d, conv %d), out %d (pos %d, neg %d, corr %d, conv %d), dead %d, "
            "pending %d, held %d, awaiting conversion %d, partitions %s",
            m["events_in"], m["impressions_in"], m["clicks_in"], m["conversions_in"], m["samples_out"],
            m["positive"], m["negative"], m["correction"], m["conversion"], m["dead_letters"],
            m["pending_impressions"], m["held_clicks"], m["awaiting_conversion"], m["partitions"],
        )
