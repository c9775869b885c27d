"""Carrying out deletion requests: what the faust deletion agent (:mod:`stream.app`) runs.

:class:`Eraser` does the work against Redis, off the event loop; the agent feeds
it batches of :class:`em3.types.DeletionRequest` read from the compacted
``{prefix}deletions`` topic, and a timer asks it to :meth:`Eraser.settle`.

One batch of requests:

1. each request begins a tombstone (:func:`em3.privacy.start`; a redelivered
   request of a deletion already complete is skipped): the tombstone id joins
   ``{p}privacy:tombstones`` (the join and the learners drop the user's events from
   their next batch) and the pseudonym joins ``{p}privacy:pending`` (the model
   lines owe a reset of its rows);
2. the users' pending impressions and held clicks leave every join partition's
   state (:func:`stream.state.erase_users`, which fences the owning workers);
3. their click histories are deleted;
4. the tombstones become ``stores_erased``, expecting a reset from every model line
   whose learner is active.

:meth:`Eraser.settle` completes a tombstone once every expected line published a
snapshot with the rows reset (``{p}privacy:reset:{tid}``, written by the
learners), drops the pseudonym from ``pending`` and returns it, so the agent can
record it in its table and on the topic (a record without the pseudonym, under
the same key: compaction then keeps only that).
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Sequence

from em3.config import Settings
from em3.privacy import settle, start, stores_erased, tombstone_id
from em3.types import DeletionRequest, Tombstone

__all__ = ["Eraser", "LINE_ACTIVE_S"]

log = logging.getLogger(__name__)

#: A model line whose learner published within this many seconds must reset the rows.
LINE_ACTIVE_S = 600.0


class Eraser:
    """Erases users from Redis and settles their tombstones (see the module docstring).

    Parameters
    ----------
    settings : Settings
        Redis, key prefix, retention (the tombstones' lifetime).
    client : a Redis client, optional
        Default: a new one for ``settings``.
    line_active_s : float
        Lines whose learner published within this long are waited for.
    clock : callable
        Wall clock (tombstone times).
    """

    def __init__(self, settings: Settings, client: Any = None, line_active_s: float = LINE_ACTIVE_S,
                 clock: Callable[[], float] = time.time) -> None:
        from em3.redis_stores import RedisPrivacyStore, connect

        if not line_active_s > 0:
            raise ValueError(f"line_active_s must be > 0, but {line_active_s!r} is given")
        self.client = client if client is not None else connect(settings.redis)
        self.prefix = settings.redis_prefix
        self.privacy = RedisPrivacyStore(self.client, self.prefix, settings.retention.tombstone_ttl_s, clock=clock)
        self.line_active_s = line_active_s
        self.clock = clock
        self.counters = {"requests": 0, "redelivered": 0, "erased": 0, "completed": 0, "join_records": 0,
                         "held_clicks": 0, "history_keys": 0}

    def erase(self, requests: Sequence[DeletionRequest]) -> list[Tombstone]:
        """Carry out ``requests`` (steps 1-4); returns the tombstones, those already
        complete included (a redelivery). Idempotent: erasing twice erases nothing more."""
        from stream.state import erase_users

        self.counters["requests"] += len(requests)
        work: dict[str, tuple[Tombstone, str]] = {}
        done: list[Tombstone] = []
        for req in requests:
            tid = tombstone_id(req.user_id)
            existing = self.privacy.status(tid)
            tomb = start(existing, tid, req.requested_at)
            if tomb is None:
                self.counters["redelivered"] += 1
                done.append(existing)  # type: ignore[arg-type]
                continue
            if tid in work:  # the same user twice in a batch
                continue
            self.privacy.begin(tomb, req.user_id)
            work[tid] = (tomb, req.user_id)
        if not work:
            return done
        users = {pid for _, pid in work.values()}
        removed = erase_users(self.client, self.prefix, users)
        pipe_counts = {pid: self.privacy.erase_user_keys([pid]) for pid in users}
        at = self.clock()
        lines = self.privacy.active_lines(self.line_active_s)
        for tomb, pid in work.values():
            counts = {"join_records": removed["records"][pid], "held_clicks": removed["held_clicks"][pid],
                      "history_keys": pipe_counts[pid]}
            for name, n in counts.items():
                self.counters[name] += n
            erased = stores_erased(tomb, at, counts, lines)
            erased = settle(erased, {})  # no line to wait for: complete now
            self.privacy.save(erased)
            if erased.status == "complete":
                self.counters["completed"] += 1
            done.append(erased)
        self.counters["erased"] += len(work)
        log.info("erased %d users from Redis (%d join records, %d held clicks, %d histories); lines to reset: %s",
                 len(work), sum(removed["records"].values()), sum(removed["held_clicks"].values()),
                 sum(pipe_counts.values()), lines)
        return done

    def settle(self) -> list[Tombstone]:
        """Complete the tombstones whose expected lines have all reset the rows; returns
        the ones completed now."""
        completed = []
        active = self.privacy.active_lines(self.line_active_s)
        for tid in self.privacy.pending():
            tomb = self.privacy.status(tid)
            if tomb is None:  # expired: nothing is owed any more
                self.privacy.forget_pending(tid)
                continue
            if tomb.status != "stores_erased":
                continue
            new = settle(tomb, self.privacy.resets(tid), active)
            if new.status == "complete":
                self.privacy.save(new)
                self.counters["completed"] += 1
                completed.append(new)
        return completed

    def close(self) -> None:
        self.client.close()
