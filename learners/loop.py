"""The learner's cycle: consume -> micro-batch -> resolve histories -> score -> learn.

:class:`LearnerLoop` is pure apart from what it is given: a :class:`SampleSource`
(Kafka in production, :class:`MemorySampleSource` in tests), a history source, a
learner with the :class:`LearnerLike` interface and a prequential tracker. It
never publishes or commits; :meth:`LearnerLoop.run_cycle` trains until a snapshot
is due and returns a :class:`CycleResult` (the offsets it trained to, the sample
ids it applied, counters and the prequential pairs). The caller (a single learner
in :mod:`learners.worker`, or the aggregator of a fleet) publishes the snapshot
and only then commits the offsets.

Per micro-batch:

1. poll up to ``batch_size`` records, waiting at most ``max_batch_wait_s`` after
   the first one;
2. decode them (undecodable records are counted, logged and skipped; their offsets
   still advance);
3. drop samples of erased users (``tombstones``: deleted users' samples still in
   flight, ``erased_dropped``) and samples whose ``sample_id`` is in the dedup
   window or repeated in the batch;
4. fetch each user's history as it was when the impression was served
   (``before=served_at``);
5. score the batch with the current model (prequential: every prediction is made
   before the model learns from that sample), then ``learn_batch``; a learner whose
   ``learn_batch`` takes ``return_probs`` does both in one forward pass.

Correction samples (a late click on an impression already learned as a negative,
or a conversion after the click's sample) are learned with the model's
fake-negative correction and counted (``corrections_applied``, and
``conversions_applied`` for conversions), but kept out of the prequential AUC and
logloss: they re-label an impression that was already scored once.
"""
from __future__ import annotations

import inspect
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

import numpy as np

from em3 import codec
from em3.constraints import PositiveFloat, PositiveInt, config_class
from em3.errors import DecodeError
from em3.experiment import ArmPropensity
from em3.retry import Backoff
from em3.stores import HistorySource
from em3.types import Sample
from stream.dedup import DEFAULT_DEDUP_CAPACITY, DedupWindow
from learners.publisher import SnapshotPolicy

__all__ = [
    "LoopConfig",
    "SourceRecord",
    "SampleSource",
    "MemorySampleSource",
    "LearnerLike",
    "CycleResult",
    "LearnerLoop",
    "COUNTERS",
]

log = logging.getLogger(__name__)

# Cumulative counters a loop keeps (and a snapshot's stats carry).
COUNTERS = ("records", "samples_applied", "duplicates_dropped", "decode_errors", "corrections_applied", "steps",
            "batch_retries", "quarantined", "other_arm_skipped", "erased_dropped", "conversions_applied")


@config_class
class LoopConfig:
    """Micro-batching and dedup settings of a :class:`LearnerLoop`.

    Parameters
    ----------
    batch_size : int
        Most records per micro-batch (one optimizer step).
    max_batch_wait_s : float
        Longest wait for a batch to fill once its first record arrived.
    poll_timeout_s : float
        Longest single poll of the source.
    history_len : int or None
        History items fetched per sample (default: the model's ``history_len``).
    dedup_capacity : int
        Sample ids remembered to drop redeliveries.
    max_batch_attempts : int
        Tries of a micro-batch that fails with an error that is not an outage
        (see ``transient`` of :class:`LearnerLoop`) before it is quarantined:
        skipped, counted and handed to ``on_quarantine`` (the dead-letter topic).
        An outage (Redis or the broker unreachable) is retried until it ends.
    retry_initial_s, retry_max_s : float
        Backoff between tries (exponential, with jitter).
    exclude_lines : tuple of str
        Samples whose impression one of these model lines served are skipped
        (counted as ``other_arm_skipped``): the experiment's ``split`` training-data
        policy (:meth:`em3.experiment.ExperimentConfig.excluded_lines`). Empty: learn
        from every sample (``pooled``).
    weight_as_line : str
        Non-empty: the ``weighted`` policy. Every sample is learned with the weight
        :class:`em3.experiment.ArmPropensity` gives it for this model line's arm
        (``P(line | item) / share``, from the ``model_line`` tags of the samples seen so
        far in this process), so that the data looks as if this line had served
        everyone.
    """

    batch_size: PositiveInt = 256
    max_batch_wait_s: PositiveFloat = 0.2
    poll_timeout_s: PositiveFloat = 0.05
    history_len: PositiveInt | None = None
    dedup_capacity: PositiveInt = DEFAULT_DEDUP_CAPACITY
    max_batch_attempts: PositiveInt = 3
    retry_initial_s: PositiveFloat = 0.5
    retry_max_s: PositiveFloat = 30.0
    exclude_lines: tuple[str, ...] = ()
    weight_as_line: str = ""


@dataclass(frozen=True)
class SourceRecord:
    """One record of the samples topic: ``partition`` is ``"topic:partition"``."""

    partition: str
    offset: int
    value: bytes


class SampleSource(Protocol):
    """Where a loop reads encoded samples from; positions are next offsets per partition."""

    def poll(self, max_records: int, timeout_s: float) -> list[SourceRecord]:
        """Up to ``max_records`` records, waiting at most ``timeout_s`` for the first."""
        ...

    def partitions(self) -> list[str]:
        """The ``"topic:partition"`` keys this source reads."""
        ...

    def seek(self, offsets: Mapping[str, int]) -> None:
        """Position every partition at ``offsets[key]``, or at its beginning if absent."""
        ...

    def commit(self, offsets: Mapping[str, int]) -> None:
        """Record ``offsets`` as consumed (only after the snapshot holding them is published)."""
        ...

    def close(self) -> None: ...


class MemorySampleSource:
    """An in-memory :class:`SampleSource` over lists of encoded records per partition.

    >>> src = MemorySampleSource({"t:0": [b"a", b"b"], "t:1": [b"c"]})
    >>> [(r.partition, r.offset) for r in src.poll(10, 0.01)]
    [('t:0', 0), ('t:0', 1), ('t:1', 0)]
    >>> src.seek({"t:0": 1}); [r.value for r in src.poll(10, 0.01)]
    [b'b', b'c']
    """

    def __init__(self, records: Mapping[str, Sequence[bytes]]) -> None:
        self.records: dict[str, list[bytes]] = {k: list(v) for k, v in records.items()}
        self.positions: dict[str, int] = {k: 0 for k in self.records}
        self.committed: dict[str, int] = {}

    def append(self, partition: str, values: Iterable[bytes]) -> None:
        self.records.setdefault(partition, []).extend(values)
        self.positions.setdefault(partition, 0)

    def poll(self, max_records: int, timeout_s: float) -> list[SourceRecord]:
        out: list[SourceRecord] = []
        for key in sorted(self.records):
            values, pos = self.records[key], self.positions[key]
            take = values[pos : pos + max_records - len(out)]
            out.extend(SourceRecord(key, pos + i, v) for i, v in enumerate(take))
            self.positions[key] = pos + len(take)
            if len(out) >= max_records:
                break
        if not out:
            time.sleep(min(timeout_s, 0.01))
        return out

    def partitions(self) -> list[str]:
        return sorted(self.records)

    def seek(self, offsets: Mapping[str, int]) -> None:
        for key in self.records:
            self.positions[key] = int(offsets.get(key, 0))

    def commit(self, offsets: Mapping[str, int]) -> None:
        self.committed.update(offsets)

    def close(self) -> None:
        pass


class LearnerLike(Protocol):
    """What the loop needs of :class:`learners.online.OnlineLearner`."""

    def learn_batch(self, samples: Sequence[Sample], histories: Sequence[Sequence[str]],
                    weights: Sequence[float] | None = None) -> Mapping[str, float]: ...

    def score(self, records: Sequence[Sample], histories: Sequence[Sequence[str]]) -> np.ndarray: ...

    def state_dict(self) -> Mapping[str, object]: ...

    def load_state_dict(self, state: Mapping[str, object]) -> None: ...


@dataclass
class CycleResult:
    """What one snapshot cycle did; everything a publisher or aggregator needs.

    ``offsets`` are the next offsets of every partition the loop has a position
    for (the snapshot holding this cycle includes every record below them);
    ``applied_ids`` the sample ids learned in this cycle, per partition, in order;
    ``batches`` the partition of each of them, batch by batch, in the order they were
    learned (with ``applied_ids`` it rebuilds every micro-batch:
    :func:`em3.stores.encode_batches`); ``labels`` and ``probs`` the prequential
    pairs (non-correction samples) and ``times`` their impressions' ``served_at``
    (event time; empty when a caller does not give them); ``checkpoint`` what a learner
    needs beyond ``state`` to continue exactly (fleet rounds).
    """

    offsets: dict[str, int]
    applied_ids: dict[str, list[str]]
    counters: dict[str, int]
    labels: np.ndarray
    probs: np.ndarray
    loss_sum: float = 0.0
    seconds: float = 0.0
    state: Mapping[str, object] | None = field(default=None, repr=False)
    batches: list[list[str]] = field(default_factory=list, repr=False)
    checkpoint: tuple[Mapping[str, object], Mapping[str, Any]] | None = field(default=None, repr=False)
    times: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float64), repr=False)

    @property
    def changed(self) -> bool:
        """Whether the cycle consumed anything (so a snapshot would differ from its parent)."""
        return self.counters.get("records", 0) > 0

    @property
    def applied(self) -> int:
        return self.counters.get("samples_applied", 0)


class LearnerLoop:
    """Runs micro-batches through a learner; see the module docstring.

    Parameters
    ----------
    learner : LearnerLike
    source : SampleSource
    history : HistorySource
    config : LoopConfig
    history_len : int
        Fallback history length when ``config.history_len`` is None (the model's).
    clock : callable
        Monotonic seconds (tests inject a fake clock).
    tombstones : TombstoneFilter, optional
        Deleted users (:class:`em3.privacy.TombstoneFilter`), refreshed before each
        micro-batch; their samples are dropped.
    """

    def __init__(
        self,
        learner: LearnerLike,
        source: SampleSource,
        history: HistorySource,
        config: LoopConfig = LoopConfig(),
        *,
        history_len: int = 100,
        clock: Callable[[], float] = time.monotonic,
        transient: tuple[type[BaseException], ...] = (OSError,),
        on_quarantine: Callable[[Sequence[SourceRecord], str], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        tombstones: Any = None,
    ) -> None:
        self.learner = learner
        self.tombstones = tombstones
        self.transient = transient
        self.on_quarantine = on_quarantine
        self.sleep = sleep
        self._should_stop: Callable[[], bool] = lambda: False
        self.source = source
        self.history = history
        self.config = config
        self.history_len = config.history_len or history_len
        self.clock = clock
        self.window = DedupWindow(config.dedup_capacity)
        self.positions: dict[str, int] = {}
        # learn_batch(..., return_probs=True) returns the pre-update predictions itself.
        self._fused = "return_probs" in inspect.signature(learner.learn_batch).parameters
        self._propensity = ArmPropensity()
        self.totals: dict[str, int] = {name: 0 for name in COUNTERS}
        self._new_cycle()

    # ---------------------------------------------------------------- state
    def _new_cycle(self) -> None:
        self._cycle_counters = {name: 0 for name in COUNTERS}
        self._applied: dict[str, list[str]] = defaultdict(list)
        self._batches: list[list[str]] = []
        self._labels: list[np.ndarray] = []
        self._probs: list[np.ndarray] = []
        self._times: list[np.ndarray] = []
        self._loss_sum = 0.0

    def reset(
        self,
        state: Mapping[str, object] | None,
        offsets: Mapping[str, int],
        window: DedupWindow | None = None,
        totals: Mapping[str, int] | None = None,
    ) -> None:
        """Put the loop exactly where a snapshot left off.

        Loads ``state`` into the learner (None keeps the learner's current weights,
        e.g. a fresh model), seeks the source to ``offsets`` (partitions absent from
        them start at their beginning), replaces the dedup window and the
        cumulative counters, and drops the unfinished cycle.
        """
        if state is not None:
            self.learner.load_state_dict(state)
        self.source.seek(offsets)
        self.positions = {k: int(v) for k, v in offsets.items() if k in set(self.source.partitions())}
        self.window = window if window is not None else DedupWindow(self.config.dedup_capacity)
        self.totals = {name: int((totals or {}).get(name, 0)) for name in COUNTERS}
        self._new_cycle()

    # -------------------------------------------------------------- batching
    def poll_batch(self) -> list[SourceRecord]:
        """One micro-batch: up to ``batch_size`` records, waiting at most
        ``max_batch_wait_s`` after the first; empty after one idle poll."""
        cfg = self.config
        records = self.source.poll(cfg.batch_size, cfg.poll_timeout_s)
        if not records:
            return records
        deadline = self.clock() + cfg.max_batch_wait_s
        while len(records) < cfg.batch_size:
            remaining = deadline - self.clock()
            if remaining <= 0:
                break
            more = self.source.poll(cfg.batch_size - len(records), min(cfg.poll_timeout_s, remaining))
            records.extend(more)
        return records

    def process(self, records: Sequence[SourceRecord]) -> dict[str, float]:
        """Decode, dedup, score and learn one micro-batch; returns the learner's stats.

        The batch's offsets count as consumed only once it is learned, or
        quarantined. A failure is retried with backoff: an outage (an exception
        in ``transient``: Redis or the broker unreachable) for as long as it
        lasts, anything else ``max_batch_attempts`` times, after which the batch
        is quarantined (counted, logged, given to ``on_quarantine``) and skipped.
        A stop requested during an outage leaves the batch unconsumed, to be read
        again after the restart.
        """
        backoff = Backoff(self.config.retry_initial_s, self.config.retry_max_s)
        attempts = 0
        while True:
            try:
                stats = self._process_once(records)
            except self.transient as exc:
                if self._should_stop():
                    log.warning("stopping during an outage (%r): batch left unconsumed", exc)
                    return {}
                delay = backoff.next()
                self._cycle_counters["batch_retries"] += 1
                log.warning("micro-batch failed on an outage (%r); retrying in %.1f s", exc, delay)
                self.sleep(delay)
                continue
            except Exception as exc:  # noqa: BLE001 - a poison batch must not stop the learner
                attempts += 1
                self._cycle_counters["batch_retries"] += 1
                if attempts < self.config.max_batch_attempts:
                    delay = backoff.next()
                    log.warning("micro-batch failed (%r); try %d of %d in %.1f s", exc, attempts + 1,
                                self.config.max_batch_attempts, delay)
                    self.sleep(delay)
                    continue
                log.error("micro-batch of %d records failed %d times (%r): quarantined", len(records), attempts, exc)
                self._cycle_counters["quarantined"] += len(records)
                if self.on_quarantine is not None:
                    try:
                        self.on_quarantine(records, f"learn_failed: {exc!r}")
                    except Exception as dl_exc:  # noqa: BLE001 - counted and logged above either way
                        log.error("quarantine hand-off failed: %r", dl_exc)
                stats = {}
            for rec in records:
                self.positions[rec.partition] = max(self.positions.get(rec.partition, 0), rec.offset + 1)
            return stats

    def _weights(self, samples: Sequence[Sample]) -> list[float]:
        """Si's weights of ``samples`` for this line's arm (the ``weighted`` policy)."""
        for s in samples:
            if not s.correction:
                self._propensity.observe(s.impression.model_line or "-", s.impression.item_id)
        return [self._propensity.weight(self.config.weight_as_line, s.impression.item_id) for s in samples]

    def _process_once(self, records: Sequence[SourceRecord]) -> dict[str, float]:
        counters = self._cycle_counters
        decoded: list[tuple[str, Sample]] = []
        undecodable = 0
        for rec in records:
            try:
                decoded.append((rec.partition, codec.decode_sample(rec.value)))
            except DecodeError as exc:
                undecodable += 1
                log.warning("undecodable sample at %s@%d skipped: %s", rec.partition, rec.offset, exc)
        erased = 0
        if self.tombstones is not None:
            self.tombstones.refresh()
            if len(self.tombstones):
                alive = [(p, s) for p, s in decoded if not self.tombstones.erased(s.impression.user_id)]
                erased, decoded = len(decoded) - len(alive), alive
        excluded = self.config.exclude_lines
        skipped = 0
        if excluded:
            mine = [(p, s) for p, s in decoded if s.impression.model_line not in excluded]
            skipped, decoded = len(decoded) - len(mine), mine
        keep = self.window.filter_new([s.sample_id for _, s in decoded])
        kept = [decoded[i] for i in keep]
        samples = [s for _, s in kept]
        stats: dict[str, float] = {}
        if samples:
            histories = self.history.get_many(
                [s.impression.user_id for s in samples],
                self.history_len,
                [s.impression.served_at for s in samples],
            )
            extra: dict[str, Any] = {}
            if self.config.weight_as_line:
                extra["weights"] = self._weights(samples)
            if self._fused:
                # One forward pass: the probabilities computed before the update are the
                # prequential predictions.
                stats = dict(self.learner.learn_batch(samples, histories, return_probs=True, **extra))
                probs = np.asarray(stats.pop("probs"), dtype=np.float64)
            else:
                probs = np.asarray(self.learner.score(samples, histories), dtype=np.float64)
                stats = dict(self.learner.learn_batch(samples, histories, **extra))
        # Only counted once the batch went through (a retried batch counts once).
        counters["records"] += len(records)
        counters["decode_errors"] += undecodable
        counters["other_arm_skipped"] += skipped
        counters["erased_dropped"] += erased
        counters["duplicates_dropped"] += len(decoded) - len(keep)
        if not samples:
            return stats
        plain = np.array([not s.correction for s in samples], dtype=bool)
        self._labels.append(np.array([s.label for s in samples], dtype=np.int8)[plain])
        self._probs.append(probs[plain])
        self._times.append(np.array([s.impression.served_at for s in samples], dtype=np.float64)[plain])
        counters["steps"] += 1
        counters["samples_applied"] += len(samples)
        counters["corrections_applied"] += int((~plain).sum())
        counters["conversions_applied"] += sum(1 for s in samples if s.conversion)
        self._loss_sum += float(stats.get("loss", 0.0)) * len(samples)
        for partition, sample in kept:
            self._applied[partition].append(sample.sample_id)
        self._batches.append([partition for partition, _ in kept])
        self.window.add_many(s.sample_id for s in samples)
        return stats

    # ----------------------------------------------------------------- cycle
    def run_cycle(self, policy: SnapshotPolicy, should_stop: Callable[[], bool] = lambda: False) -> CycleResult:
        """Train micro-batches until ``policy`` says a snapshot is due or ``should_stop()``."""
        started = self.clock()
        self._should_stop = should_stop
        while True:
            records = self.poll_batch()
            if records:
                self.process(records)
            if should_stop() or policy.due(self._cycle_counters["steps"], self.clock() - started):
                break
        return self.finish_cycle(self.clock() - started)

    def finish_cycle(self, seconds: float = 0.0) -> CycleResult:
        """Close the current cycle: fold its counters into the totals and return it."""
        for name, value in self._cycle_counters.items():
            self.totals[name] += value
        result = CycleResult(
            offsets=dict(self.positions),
            applied_ids={k: list(v) for k, v in self._applied.items() if v},
            counters=dict(self._cycle_counters),
            labels=np.concatenate(self._labels) if self._labels else np.zeros(0, dtype=np.int8),
            probs=np.concatenate(self._probs) if self._probs else np.zeros(0, dtype=np.float64),
            times=np.concatenate(self._times) if self._times else np.zeros(0, dtype=np.float64),
            loss_sum=self._loss_sum,
            seconds=seconds,
            batches=[list(b) for b in self._batches],
        )
        self._new_cycle()
        return result

    # ----------------------------------------------------------- checkpoint
    def checkpoint_meta(self) -> dict[str, Any]:
        """The loop's own training state for a learner checkpoint: the arm propensities
        of the ``weighted`` policy (empty otherwise)."""
        return {"propensity": self._propensity.state()} if self.config.weight_as_line else {}

    def load_checkpoint_meta(self, meta: Mapping[str, Any]) -> None:
        """Restore :meth:`checkpoint_meta` output (absent parts start empty)."""
        self._propensity = ArmPropensity()
        if "propensity" in meta:
            self._propensity.load_state(dict(meta["propensity"]))
