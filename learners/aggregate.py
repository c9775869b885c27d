"""Parameter averaging for N data-parallel learners, and the aggregator that publishes.

Synchronisation scheme (periodic parameter averaging, "local SGD"):

* round ``r`` starts from the line's latest snapshot ``v`` (state ``θ_v`` and its
  offsets); every learner trains on its own partitions for one snapshot interval
  with its own optimizer;
* the aggregator merges the learners' states with :func:`average_deltas` -- per
  element, the mean of the changes over the learners that changed it, so an
  embedding row only one learner saw keeps that learner's full update while dense
  weights get the plain average; counters (``em3.model.COUNTER_STATE``, the items'
  trained-on impressions) add up -- and publishes the result as ``v + 1`` with the
  union of the learners' offsets and applied ids (their partitions are disjoint)
  and each learner's checkpoint (its optimizer state at the end of the round);
* only then does every learner commit its offsets and start round ``r + 1`` from
  ``θ_{v+1}``.

A learner that dies in a round is restarted and re-runs that round from ``θ_v``
and ``v``'s offsets (and its own checkpoint of ``v``); the others' results wait.
An aggregator that dies before publishing loses the round: every learner finds its
positions differ from the snapshot's, seeks back and reloads its checkpoint of
``v``. Either way each sample ends up in exactly one published version.
"""
from __future__ import annotations

import logging
from typing import Any, Collection, Mapping, Sequence

import numpy as np
import torch

from em3.config import Settings
from em3.errors import ImproperlyConfigured
from em3.model.model import COUNTER_STATE, reset_user_rows, user_rows
from learners.loop import COUNTERS, CycleResult
from learners.privacy import ErasureDuty
from learners.publisher import LineMovedError, SnapshotPublisher
from learners.worker import LearnConfig, PrequentialWindow, cycle_stats, training_data_stats

__all__ = ["average_deltas", "Aggregator", "RedisAggregator"]

log = logging.getLogger(__name__)


def average_deltas(base: Mapping[str, torch.Tensor], states: Sequence[Mapping[str, torch.Tensor]],
                   additive: Collection[str] = COUNTER_STATE) -> dict[str, torch.Tensor]:
    """Merge learner states that started from ``base``: per element, ``base`` plus the
    mean of the non-zero changes (elements no learner changed stay as they were).
    Tensors named in ``additive`` are counters (each learner counted its own
    samples), so their changes add up instead.

    >>> base = {"w": torch.tensor([0.0, 0.0, 0.0])}
    >>> a = {"w": torch.tensor([1.0, 2.0, 0.0])}
    >>> b = {"w": torch.tensor([3.0, 0.0, 0.0])}
    >>> average_deltas(base, [a, b])["w"].tolist()
    [2.0, 2.0, 0.0]
    """
    if not states:
        return {k: v.clone() for k, v in base.items()}
    out: dict[str, torch.Tensor] = {}
    for name, b in base.items():
        tensors = [s[name] for s in states]
        if not torch.is_floating_point(b):
            changed = [t for t in tensors if not torch.equal(t, b)]
            out[name] = (changed[-1] if changed else b).clone()
            continue
        b64 = b.to(torch.float64)
        deltas = torch.stack([t.to(torch.float64) - b64 for t in tensors])  # (N, ...)
        count = 1 if name in additive else (deltas != 0).sum(dim=0).clamp(min=1)
        out[name] = (b64 + deltas.sum(dim=0) / count).to(b.dtype)
    missing = set(states[0]) - set(base)
    if missing:
        raise ValueError(f"learner states hold tensors the base does not: {sorted(missing)[:5]}")
    return out


class Aggregator:
    """Holds the line's current base and publishes merged rounds (pure over its publisher).

    Parameters
    ----------
    publisher : SnapshotPublisher
    config : LearnConfig
    world : int
        Number of learners (recorded in the manifest stats).
    duty : ErasureDuty, optional
        Deleted users whose rows the merged state must have reset before it is
        published (a round is then published even if no learner read anything).
    """

    def __init__(self, publisher: SnapshotPublisher, config: LearnConfig, world: int,
                 duty: ErasureDuty | None = None) -> None:
        if world > 1 and publisher.model_config.get("id_table", "hashed") != "hashed":
            # Each learner admits and evicts IDs in its own map; averaging two maps is
            # meaningless (a row would hold two owners' updates), so a fleet needs hashed tables.
            raise ImproperlyConfigured(f"data-parallel learners (world={world}) need id_table='hashed', "
                                       f"but {publisher.model_config.get('id_table')!r} is given")
        self.config = config
        self.world = world
        self.duty = duty
        self.publisher = publisher
        self.window = PrequentialWindow(config.metrics_window, config.metrics_window_s)
        self.version: int | None = None
        self.state: dict[str, torch.Tensor] | None = None
        self.offsets: dict[str, int] = {}
        self.totals: dict[str, int] = {k: 0 for k in COUNTERS}
        self.rounds = 0

    def start(self, initial_state: Mapping[str, torch.Tensor] | None = None) -> int:
        """Resume from the line's latest snapshot, or publish ``initial_state`` as its first
        version (so every round has a concrete base). Returns the base version."""
        point = self.publisher.resume(rank=None)
        if point is not None:
            self.version, self.offsets, self.totals = point.version, dict(point.offsets), {
                k: int(point.totals.get(k, 0)) for k in COUNTERS}
            self.state = {k: torch.as_tensor(v) for k, v in point.state.items()}
            return self.version
        if initial_state is None:
            raise ValueError("the line has no snapshot yet, so initial_state must be given")
        self.state = {k: v.detach().clone() for k, v in initial_state.items()}
        empty = CycleResult({}, {}, {k: 0 for k in COUNTERS}, np.zeros(0), np.zeros(0))
        manifest = self.publisher.publish(self.state, parent=None, offsets={}, applied_ids={}, batches=[],
                                          stats=cycle_stats(self.totals, self.window, empty, learners=self.world,
                                          training_data=training_data_stats(self.config.loop),
                                                            initial=True))
        self.version = manifest.version
        if self.duty is not None:
            self.duty.done(self.version, {})
        return self.version

    def base(self) -> tuple[int | None, dict[str, int]]:
        """``(version, offsets)`` of the current base."""
        if self.state is None:
            raise ValueError("call start() first")
        return self.version, dict(self.offsets)

    def base_state(self) -> dict[str, torch.Tensor]:
        if self.state is None:
            raise ValueError("call start() first")
        return self.state

    def merge_and_publish(self, results: Sequence[CycleResult]) -> dict[str, Any]:
        """Average the round's states, publish them with the union of offsets and ids.

        Returns ``{"version", "published", "applied"}``; nothing is published when no
        learner consumed anything.
        """
        if self.state is None:
            raise ValueError("call start() first")
        merged_counters = {k: sum(int(r.counters.get(k, 0)) for r in results) for k in COUNTERS}
        combined = CycleResult(
            offsets={**self.offsets, **{k: v for r in results for k, v in r.offsets.items()}},
            applied_ids={k: v for r in results for k, v in r.applied_ids.items()},
            counters=merged_counters,
            labels=np.concatenate([r.labels for r in results]) if results else np.zeros(0),
            probs=np.concatenate([r.probs for r in results]) if results else np.zeros(0),
            times=np.concatenate([r.times for r in results]) if results else np.zeros(0),
            loss_sum=sum(r.loss_sum for r in results),
            seconds=max((r.seconds for r in results), default=0.0),
        )
        self.rounds += 1
        owed = self.duty.owed() if self.duty is not None else {}
        if not combined.changed and not owed:
            return {"version": self.version, "published": False, "applied": 0}
        state = average_deltas(self.state, [r.state for r in results if r.state is not None])
        rows: list[int] = []
        if owed:
            user_buckets = int(self.publisher.model_config.get("user_buckets", 0))
            rows = user_rows(user_buckets, list(owed.values()))
            reset_user_rows(state, rows)
        totals = {k: self.totals.get(k, 0) + merged_counters[k] for k in COUNTERS}
        self.window.update(combined.labels, combined.probs, combined.times)
        stats = cycle_stats(totals, self.window, combined, learners=self.world, round=self.rounds,
                            training_data=training_data_stats(self.config.loop))
        try:
            manifest = self.publisher.publish(
                state, parent=self.version, offsets=combined.offsets, applied_ids=combined.applied_ids, stats=stats,
                batches=[b for r in results for b in r.batches],
                checkpoints={rank: r.checkpoint for rank, r in enumerate(results) if r.checkpoint is not None})
        except LineMovedError as exc:
            log.warning("%s; the fleet resumes from the line's pointer", exc)
            self.start()
            return {"version": self.version, "published": False, "applied": 0}
        self.version, self.state, self.offsets, self.totals = manifest.version, state, dict(combined.offsets), totals
        if self.duty is not None:
            self.duty.done(manifest.version, owed, rows)
        return {"version": self.version, "published": True, "applied": combined.applied}

    def pid(self) -> int:
        """Process id (crash tests SIGKILL it)."""
        import os

        return os.getpid()

    def close(self) -> None:
        pass


class RedisAggregator(Aggregator):
    """An :class:`Aggregator` publishing to the Redis of ``settings``; the class the Ray actor wraps."""

    def __init__(self, settings: Settings, config: LearnConfig, world: int) -> None:
        from em3.model import ModelConfig
        from em3.redis_stores import RedisAppliedLog, RedisPrivacyStore, RedisSnapshotStore, connect

        self.redis = connect(settings.redis)
        prefix = settings.redis_prefix
        retention = settings.retention
        publisher = SnapshotPublisher(
            RedisSnapshotStore(self.redis, prefix, signing_key=settings.snapshot_key,
                               max_age_s=retention.snapshot_max_age_s),
            RedisAppliedLog(self.redis, prefix), config.model_line,
            ModelConfig.from_dict(config.model_config).to_dict(), config.publisher,
        )
        duty = ErasureDuty(RedisPrivacyStore(self.redis, prefix, retention.tombstone_ttl_s), config.model_line)
        super().__init__(publisher, config, world, duty)

    def close(self) -> None:
        self.redis.close()
