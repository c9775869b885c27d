"""A learner process: wires an :class:`OnlineLearner` to Kafka and Redis.

:class:`LearnerWorker` is a plain class (the Ray actor in :mod:`learners.actor`
wraps it unchanged). It runs in one of two modes:

* **single** (:meth:`LearnerWorker.run`): it owns the whole samples topic, and
  repeats *resume once -> (cycle -> publish -> commit)*. This is what
  ``em3 learn --learners 1`` runs.
* **fleet member** (:meth:`LearnerWorker.train_round`): one of N data-parallel
  learners; each round it starts from the aggregator's averaged state and
  returns its cycle (state, offsets, applied ids); the aggregator publishes
  (:mod:`learners.aggregate`, :mod:`learners.scaleout`).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Mapping

import numpy as np

from em3.config import Settings
from em3.constraints import Annotated, PositiveFloat, PositiveInt, StringConstraints, config_class
from em3.retry import Backoff
from stream.kafka import KafkaException, dead_letter_headers, make_producer
from learners.loop import COUNTERS, CycleResult, LearnerLoop, LoopConfig
from learners.online import LEARNER_DEFAULTS
from learners.privacy import ErasureDuty
from learners.publisher import LineMovedError, PublisherConfig, SnapshotPolicy, SnapshotPublisher

__all__ = ["LearnConfig", "LineTrainer", "LearnerWorker", "PrequentialWindow", "cycle_stats", "training_data_stats"]

log = logging.getLogger(__name__)


@config_class
class LearnConfig:
    """Everything that defines a learner of one model line (runtime choices included).

    Parameters
    ----------
    model_line : str
        Name of the line whose snapshots the learners publish.
    model_config : mapping
        ``ModelConfig.to_dict()`` of the model (saved in every manifest).
    lr : float
        Dense learning rate (default: :data:`learners.online.LEARNER_DEFAULTS`, the
        same defaults ``benchmarks/quality.py`` measures; the sparse optimizer's
        settings come from there too).
    content_lr : float or None
        Learning rate of the content modules (default ``lr / 16``, see
        :class:`learners.online.OnlineLearner`).
    device : str
        ``"auto"`` takes the GPU Ray assigned (if any), else the CPU.
    seed : int
    loop : LoopConfig
    policy : SnapshotPolicy
        When snapshots (single mode) or averaging rounds (fleet) happen.
    publisher : PublisherConfig
    group_id : str or None
        Consumer group for committed offsets (default ``em3-learn-<line>``).
    metrics_window : int
        Samples in the sliding prequential window.
    metrics_window_s : float or None
        Also drop from it the pairs served more than this many seconds (event time)
        before the newest one: the window is then "the last minute" (60), whatever the
        rate; None (the default): the last ``metrics_window`` samples only.
    """

    model_line: Annotated[str, StringConstraints(min_length=1, pattern=r"^[^:]+$")]
    model_config: Mapping[str, Any]
    lr: PositiveFloat = LEARNER_DEFAULTS["lr"]
    content_lr: PositiveFloat | None = None
    device: str = "auto"
    seed: int = 0
    loop: LoopConfig = LoopConfig()
    policy: SnapshotPolicy = SnapshotPolicy()
    publisher: PublisherConfig = PublisherConfig()
    group_id: str | None = None
    metrics_window: PositiveInt = 10_000
    metrics_window_s: PositiveFloat | None = None

    def __post_init__(self) -> None:
        if self.loop.dedup_capacity != self.publisher.dedup_capacity:
            raise ValueError(
                f"loop.dedup_capacity and publisher.dedup_capacity must agree, but "
                f"{self.loop.dedup_capacity} and {self.publisher.dedup_capacity} are given"
            )

    @property
    def group(self) -> str:
        return self.group_id or f"em3-learn-{self.model_line}"


class PrequentialWindow:
    """Sliding window of the last ``size`` (label, probability) pairs, scored before
    learning: window AUC, logloss and CTR (:func:`em3.metrics.auc`, :func:`em3.metrics.logloss`).
    With ``seconds``, only the pairs served at most that long (event time) before the
    newest one given are kept, and at most ``size`` of them.

    Bounded memory (``em3.metrics.PrequentialTracker`` also keeps every pair ever
    seen, which a learner that runs for days cannot afford). Undefined metrics
    are ``None`` so manifests stay strict JSON.
    """

    def __init__(self, size: int, seconds: float | None = None) -> None:
        if size <= 0:
            raise ValueError(f"size must be > 0, but {size} is given")
        if seconds is not None and not seconds > 0:
            raise ValueError(f"seconds must be > 0 or None, but {seconds!r} is given")
        self.size, self.seconds = size, seconds
        self._labels = np.zeros(0, dtype=np.int8)
        self._probs = np.zeros(0, dtype=np.float64)
        self._times = np.zeros(0, dtype=np.float64)
        self.count = 0

    def update(self, labels: np.ndarray, probs: np.ndarray, times: np.ndarray | None = None) -> None:
        """Add pairs (``times``: their served_at, needed with ``seconds``; pairs given
        without them, or with times that do not align, as from a caller that keeps none,
        count as served at the newest time seen)."""
        labels, probs = np.asarray(labels, dtype=np.int8), np.asarray(probs, dtype=np.float64)
        if labels.shape != probs.shape:
            raise ValueError(f"labels and probs must align, but {labels.shape} and {probs.shape} are given")
        if times is None or len(times) != len(labels):  # no times: served now, at the newest time seen
            times = np.full(labels.shape, float(self._times.max()) if len(self._times) else -np.inf)
        times = np.asarray(times, dtype=np.float64)
        self._labels = np.concatenate([self._labels, labels])[-self.size:]
        self._probs = np.concatenate([self._probs, probs])[-self.size:]
        self._times = np.concatenate([self._times, times])[-self.size:]
        if self.seconds is not None and len(self._times):
            keep = self._times >= self._times.max() - self.seconds
            self._labels, self._probs, self._times = self._labels[keep], self._probs[keep], self._times[keep]
        self.count += len(labels)

    def summary(self) -> dict[str, float | int | None]:
        from em3.metrics import auc, logloss

        def finite(x: float) -> float | None:
            return None if not np.isfinite(x) else round(float(x), 6)

        n = len(self._labels)
        return {
            "window_auc": finite(auc(self._labels, self._probs)) if n else None,
            "window_logloss": finite(logloss(self._labels, self._probs)) if n else None,
            "window_ctr": finite(self._labels.mean()) if n else None,
            "window_mean_prob": finite(self._probs.mean()) if n else None,
            "window_n": n,
            "window_s": self.seconds,
            "scored": self.count,
        }


def cycle_stats(totals: Mapping[str, int], window: PrequentialWindow, result: CycleResult,
                **extra: Any) -> dict[str, Any]:
    """The ``stats`` a manifest carries: cumulative counters, prequential window, last
    cycle (and whatever ``extra`` adds: the training-data policy, the fleet size)."""
    applied = max(1, result.applied)
    return {
        "totals": {k: int(totals.get(k, 0)) for k in COUNTERS},
        "prequential": window.summary(),
        "cycle": {**{k: int(v) for k, v in result.counters.items()},
                  "mean_loss": result.loss_sum / applied, "seconds": round(result.seconds, 3)},
        **extra,
    }


def training_data_stats(loop: LoopConfig) -> dict[str, Any]:
    """What a manifest records of the training-data policy the line learned under."""
    policy = "weighted" if loop.weight_as_line else "split" if loop.exclude_lines else "pooled"
    return {"policy": policy, "excluded_lines": list(loop.exclude_lines)}


class LineTrainer:
    """The learner's control flow over injected parts (pure: no Kafka or Redis of its own).

    Parameters
    ----------
    learner : LearnerLike
        An :class:`learners.online.OnlineLearner`.
    source : SampleSource
    history : HistorySource
    publisher : SnapshotPublisher
    config : LearnConfig
    rank, world : int
        This learner's place in a fleet (``0, 1`` alone).
    duty : ErasureDuty, optional
        The deleted users whose rows this line must reset (single mode publishes them
        reset; a fleet's aggregator does it for the fleet).
    tombstones : TombstoneFilter, optional
        Deleted users whose samples the loop drops.
    """

    def __init__(self, learner, source, history, publisher: SnapshotPublisher, config: LearnConfig,
                 rank: int = 0, world: int = 1, *, history_len: int = 100,
                 transient: tuple[type[BaseException], ...] = (OSError,),
                 on_quarantine: Callable[..., None] | None = None,
                 duty: ErasureDuty | None = None, tombstones: Any = None) -> None:
        self.config = config
        self.rank, self.world = rank, world
        self.learner = learner
        self.source = source
        self.publisher = publisher
        self.transient = transient
        self.duty = duty
        self.loop = LearnerLoop(learner, source, history, config.loop, history_len=history_len,
                                transient=transient, on_quarantine=on_quarantine, tombstones=tombstones)
        self.window = PrequentialWindow(config.metrics_window, config.metrics_window_s)
        self.version: int | None = None
        self.published = 0
        self._stop = threading.Event()
        self._base: tuple[int | None, dict[str, int]] | None = None
        # Where the last resume started, reported in the next manifest's stats.
        self._resumed: dict[str, Any] | None = None

    # ------------------------------------------------------------ checkpoints
    def _checkpoint(self) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """The learner's checkpoint plus the loop's own state (None for a learner
        without :meth:`learners.online.OnlineLearner.checkpoint`)."""
        if not hasattr(self.learner, "checkpoint"):
            return None
        tensors, meta = self.learner.checkpoint()
        return tensors, {**meta, "loop": self.loop.checkpoint_meta()}

    def _restore(self, checkpoint: tuple[Any, Any] | None) -> bool:
        """Load a checkpoint into the learner and the loop; False (and a warning) when
        there is none or it does not fit, leaving the optimizer state as it was."""
        if checkpoint is None or not hasattr(self.learner, "load_checkpoint"):
            return False
        tensors, meta = checkpoint
        try:
            self.learner.load_checkpoint(tensors, meta)
        except ValueError as exc:
            log.warning("learner checkpoint does not fit this learner (%s): optimizer state starts afresh", exc)
            return False
        self.loop.load_checkpoint_meta(dict(meta.get("loop", {})))
        return True

    # ------------------------------------------------------------ single mode
    def resume(self) -> int | None:
        """Load the line's latest snapshot and its learner checkpoint, and seek to its
        offsets; returns its version."""
        point = self.publisher.resume(self.source.partitions(), rank=self.rank)
        if point is None:
            self.loop.reset(None, {})
            self.version = None
            self._resumed = None
        else:
            self.loop.reset(point.state, point.offsets, point.window, point.totals)
            restored = self._restore(point.checkpoint)
            self.version = point.version
            self._resumed = {"from": point.version, "checkpoint": restored}
        return self.version

    def run(self, should_stop: Callable[[], bool] | None = None, max_cycles: int | None = None) -> int | None:
        """Single mode: resume, then cycle -> publish -> commit until stopped.

        Returns the last published version. A final snapshot is published on a
        graceful stop, so nothing learned is thrown away.
        """
        stop = should_stop or self._stop.is_set
        if not self.start(stop):
            return self.version
        cycles = 0
        while not stop() and (max_cycles is None or cycles < max_cycles):
            self.cycle(stop)
            cycles += 1
        return self.version

    def start(self, should_stop: Callable[[], bool] | None = None) -> bool:
        """Resume from the line's latest snapshot, or publish the initial weights as its
        first version; False if a stop was asked for during an outage."""
        stop = should_stop or self._stop.is_set
        if not self._retrying(self.resume, "resume", stop):
            return False
        if self.version is None:
            self._retrying(self._publish_initial, "initial publish", stop)
        return True

    def cycle(self, should_stop: Callable[[], bool] | None = None) -> CycleResult:
        """One cycle (until the policy says a snapshot is due, or ``should_stop()``),
        published if it changed the model or deleted users wait for this line to reset
        their rows. :meth:`run` repeats it; a caller that owns the schedule (an
        in-process simulation) calls it after :meth:`start`."""
        stop = should_stop or self._stop.is_set
        result = self.loop.run_cycle(self.config.policy, stop)
        self.window.update(result.labels, result.probs, result.times)
        if result.changed or self._owes_erasures():
            self._retrying(lambda: self._publish(result), "publish", stop)
        return result

    def _owes_erasures(self) -> bool:
        """Whether deleted users wait for this line to reset their rows (a snapshot is
        then published even without new samples)."""
        if self.duty is None:
            return False
        try:
            return bool(self.duty.owed())
        except self.transient as exc:  # an outage: the next cycle asks again
            log.warning("could not read owed erasures (%r)", exc)
            return False

    def _retrying(self, action: Callable[[], Any], what: str, stop: Callable[[], bool]) -> bool:
        """Run ``action``, retrying an outage (Redis, the broker) with backoff until it
        works (True) or a stop is asked for (False); the learner never exits on one.
        A cycle whose publish waits keeps its samples: its offsets are only
        committed after the snapshot holding them is published."""
        backoff = Backoff(self.config.loop.retry_initial_s, self.config.loop.retry_max_s)
        while True:
            try:
                action()
                return True
            except self.transient as exc:
                if stop():
                    log.warning("%s failed during an outage (%r) while stopping", what, exc)
                    return False
                delay = backoff.next()
                log.warning("%s failed on an outage (%r); retrying in %.1f s", what, exc, delay)
                time.sleep(delay)

    def _publish(self, result: CycleResult) -> None:
        extra = {} if self._resumed is None else {"resumed": dict(self._resumed)}
        stats = cycle_stats(self.loop.totals, self.window, result, learners=1,
                            training_data=training_data_stats(self.config.loop),
                            dedup_window=len(self.loop.window), **extra)
        if self._publish_state(result.offsets, result.applied_ids, stats, result.batches):
            self.source.commit(result.offsets)  # only after the snapshot holding them is published
            log.info("published %s v%d (%d applied, offsets %s)", self.config.model_line, self.version,
                     result.applied, result.offsets)

    def _publish_initial(self) -> None:
        """Publish the untrained model as the line's first version, so servers can
        rank (new lines rank by content and hashed IDs from the start) before any
        sample arrives. It holds no offsets, so nothing is marked as consumed."""
        stats = {"totals": {k: 0 for k in COUNTERS}, "prequential": self.window.summary(), "initial": True}
        if self._publish_state({}, {}, stats, batches=[]):
            log.info("published %s v%d (initial weights)", self.config.model_line, self.version)

    def _publish_state(self, offsets: Mapping[str, int], applied_ids: Mapping[str, list[str]],
                       stats: Mapping[str, Any], batches: list[list[str]] | None = None) -> bool:
        """Publish the learner's state and checkpoint on top of ``self.version``; False (and
        resumed from the line's pointer) if the line moved meanwhile, e.g. after a rollback."""
        owed: dict[str, str] = {}
        rows: list[int] = []
        if self.duty is not None:
            owed = self.duty.owed()
            if owed:  # reset before the state (and checkpoint) is taken; drop their samples from now on
                rows = self.learner.forget_users(list(owed.values()))
                if self.loop.tombstones is not None:
                    self.loop.tombstones.add(owed.values())
        checkpoint = self._checkpoint()
        try:
            manifest = self.publisher.publish(self.learner.state_dict(), parent=self.version,
                                              offsets=offsets, applied_ids=applied_ids, stats=stats,
                                              batches=batches,
                                              checkpoints=None if checkpoint is None else {self.rank: checkpoint})
        except LineMovedError as exc:
            log.warning("%s; resuming from the line's pointer", exc)
            self.resume()
            return False
        self.version = manifest.version
        self.published += 1
        self._resumed = None
        if self.duty is not None:
            self.duty.done(manifest.version, owed, rows)
        return True

    def stop(self) -> None:
        """Ask :meth:`run` to finish its cycle, publish it and return."""
        self._stop.set()

    # ------------------------------------------------------------ fleet mode
    def train_round(self, base_version: int | None, base_state: Mapping[str, Any] | None,
                    base_offsets: Mapping[str, int], policy: SnapshotPolicy | None = None) -> CycleResult:
        """One data-parallel round: start from the aggregator's state, train one cycle.

        If this learner's positions are not those of ``base_offsets`` (it was
        restarted, or its last round was never published), it seeks back to them,
        rebuilds its dedup window from ``base_version``'s chain and loads its own
        checkpoint of ``base_version`` (optimizer state as that round left it), so
        the discarded work is learned again exactly once, and exactly as before.
        The result carries this learner's checkpoint, which the aggregator
        publishes with the merged state.
        """
        mine = {k: int(v) for k, v in base_offsets.items() if k in set(self.source.partitions())}
        if mine:
            self.source.commit(mine)  # the base is published, so its offsets may be committed
        if self._base is None or self.loop.positions != mine:
            window = self.publisher.window_for(base_version, self.source.partitions())
            self.loop.reset(None, mine, window)
            digest = None
            if base_state is not None:
                from em3.snapshot import state_digest

                digest = state_digest(base_state)
            restored = self._restore(self.publisher.load_checkpoint(base_version, digest, self.rank))
            log.info("learner %d reset to v%s at %s (%s checkpoint)", self.rank, base_version, mine,
                     "its" if restored else "no")
        if base_state is not None:
            self.learner.load_state_dict(base_state)
        self._base = (base_version, mine)
        result = self.loop.run_cycle(policy or self.config.policy, self._stop.is_set)
        result.state = self.learner.state_dict()
        result.checkpoint = self._checkpoint()
        return result

    # ----------------------------------------------------------------- misc
    def status(self) -> dict[str, Any]:
        return {"rank": self.rank, "world": self.world, "version": self.version, "published": self.published,
                "partitions": self.source.partitions(), "positions": dict(self.loop.positions),
                "totals": dict(self.loop.totals), "device": str(self.learner.device), "resumed": self._resumed}

    def state(self) -> dict[str, Any]:
        """The learner's current trainable state (CPU tensors)."""
        return self.learner.state_dict()

    def pid(self) -> int:
        import os

        return os.getpid()

    def close(self) -> None:
        self.source.close()


class LearnerWorker(LineTrainer):
    """A :class:`LineTrainer` wired to Kafka (the samples topic) and Redis (content,
    history, snapshots); the class the Ray actor wraps.

    Parameters
    ----------
    settings : Settings
        Where Kafka and Redis are.
    config : LearnConfig
    rank, world : int
        This learner's share of the samples topic's partitions.
    """

    def __init__(self, settings: Settings, config: LearnConfig, rank: int = 0, world: int = 1) -> None:
        from em3.model import ModelConfig
        from em3.privacy import TombstoneFilter
        from em3.redis_stores import (
            OUTAGE_ERRORS, RedisAppliedLog, RedisContentStore, RedisHistoryStore, RedisPrivacyStore,
            RedisSnapshotStore, connect,
        )
        from learners.online import OnlineLearner
        from learners.sources import KafkaSampleSource

        self.settings = settings
        self._dlq = None
        model_config = ModelConfig.from_dict(config.model_config)
        self.redis = connect(settings.redis)
        prefix = settings.redis_prefix
        retention = settings.retention
        publisher = SnapshotPublisher(
            RedisSnapshotStore(self.redis, prefix, signing_key=settings.snapshot_key,
                               max_age_s=retention.snapshot_max_age_s),
            RedisAppliedLog(self.redis, prefix), config.model_line, model_config.to_dict(), config.publisher,
        )
        privacy = RedisPrivacyStore(self.redis, prefix, retention.tombstone_ttl_s)
        extra = {} if config.content_lr is None else {"content_lr": config.content_lr}
        learner = OnlineLearner(model_config, RedisContentStore(self.redis, prefix),
                                lr=config.lr, device=config.device, seed=config.seed, **extra)
        source = KafkaSampleSource(settings.kafka, settings.topics.samples, config.group, rank=rank, world=world)
        super().__init__(learner, source, RedisHistoryStore(self.redis, prefix), publisher, config, rank, world,
                         history_len=model_config.history_len, transient=OUTAGE_ERRORS + (KafkaException,),
                         on_quarantine=self._dead_letter,
                         duty=ErasureDuty(privacy, config.model_line) if world == 1 else None,
                         tombstones=TombstoneFilter(privacy.tombstoned))
        log.info("learner %d/%d on %s, partitions %s, device %s", rank, world, config.model_line,
                 source.partitions(), learner.device)

    def _dead_letter(self, records: Any, reason: str) -> None:
        """A quarantined micro-batch goes to the dead-letter topic, record by record."""
        if self._dlq is None:
            self._dlq = make_producer(self.settings.kafka, linger_ms=5)
        code, _, detail = reason.partition(": ")
        for rec in records:
            topic, _, partition = rec.partition.rpartition(":")
            self._dlq.produce(self.settings.topics.dead_letter, value=rec.value[:65536],
                              headers=dead_letter_headers(code, detail, topic, int(partition), rec.offset))
        self._dlq.flush(10)

    def close(self) -> None:
        super().close()
        self.redis.close()
        if self._dlq is not None:
            self._dlq.flush(10)
