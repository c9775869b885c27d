"""Log replay core: logged rows in, Impression and Click events out, in event-time order.

Pure: it takes an iterable of rows and yields events; it never touches a
socket. The Kafka edge is :func:`simulators.kafka_sink.produce_events`; the
file and dataset adapters are in :mod:`simulators.replay_sources`.

A row is one logged impression plus, if it was clicked, the delay from the
impression to the click (:class:`LogRow`). The replayer emits each
impression at its ``served_at`` and each click at ``served_at + delay``, so
every impression-to-click delay of the log is kept, and the merged stream is
in non-decreasing event time (clicks at the same instant as a later
impression come first; a click never precedes its impression).

Pacing: ``speed`` maps event time to wall time (1.0 real time, 100.0 a
hundred times faster, 0.0 as fast as possible); ``max_events_per_s`` caps
the rate on top. ``start_at`` resumes after the first ``start_at`` events of
a previous run (the output order is deterministic, so
``ReplayStats.position`` of an interrupted run is the place to resume).

Malformed rows (missing fields, absurd times, negative delays, rows out of
order when ``presorted=True``) are counted per reason in
:class:`ReplayStats` and logged, never fatal.

>>> from em3.types import Impression
>>> imp = Impression("i1", "r1", "u1", "item9", 0, 1_700_000_000.0)
>>> rows = [LogRow(imp, click_delay_s=5.0), Malformed("missing_field", "no user_id")]
>>> replayer = LogReplayer()
>>> [type(e).__name__ for e in replayer.run(rows)]
['Impression', 'Click']
>>> replayer.stats.malformed
{'missing_field': 1}
"""
from __future__ import annotations

import heapq
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from em3.codec import MAX_TIMESTAMP, MIN_TIMESTAMP
from em3.constraints import FiniteNonNegFloat, NonNegInt, PositiveFloat, PositiveInt, config_class
from em3.types import Click, Impression

__all__ = [
    "LogRow",
    "Malformed",
    "ReplayConfig",
    "ReplayStats",
    "LogReplayer",
    "Event",
    "event_time",
    "replay_events",
]

logger = logging.getLogger(__name__)

Event = Impression | Click


@dataclass(frozen=True)
class LogRow:
    """One logged impression and, if it was clicked, its impression-to-click delay.

    ``click_delay_s`` is ``None`` for an impression that was not clicked.
    """

    impression: Impression
    click_delay_s: float | None = None


@dataclass(frozen=True)
class Malformed:
    """A row an adapter could not parse; the replayer counts it under ``reason``."""

    reason: str
    detail: str = ""
    line: int | None = None


@config_class
class ReplayConfig:
    """How to replay.

    Parameters
    ----------
    speed : float
        Event seconds per wall second: 1.0 real time, 100.0 for 100x, 0.0 as
        fast as possible.
    max_events_per_s : float, optional
        Rate limit in events per wall second (``None``: none).
    start_at : int
        Events of the output to skip (resume position).
    max_events : int, optional
        Stop after emitting this many events.
    presorted : bool
        Rows come in non-decreasing ``served_at``; streams in constant memory,
        and rows out of order are counted as malformed (``out_of_order``).
        When False, rows are read into memory and sorted (stable) first.
    progress_every : int
        Call the progress callback every this many emitted events.
    """

    speed: FiniteNonNegFloat = 0.0
    max_events_per_s: PositiveFloat | None = None
    start_at: NonNegInt = 0
    max_events: NonNegInt | None = None
    presorted: bool = False
    progress_every: PositiveInt = 10_000


@dataclass
class ReplayStats:
    """What a replay did. ``position`` is where a later run resumes (``start_at``)."""

    rows: int = 0
    impressions: int = 0
    clicks: int = 0
    skipped: int = 0
    malformed: dict[str, int] = field(default_factory=dict)
    position: int = 0
    first_event_time: float | None = None
    last_event_time: float | None = None
    wall_s: float = 0.0

    @property
    def events(self) -> int:
        """Events emitted (impressions + clicks)."""
        return self.impressions + self.clicks

    @property
    def malformed_total(self) -> int:
        """Rows dropped as malformed, all reasons."""
        return sum(self.malformed.values())

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dict."""
        return {
            "rows": self.rows, "events": self.events, "impressions": self.impressions,
            "clicks": self.clicks, "skipped": self.skipped, "malformed": dict(self.malformed),
            "malformed_total": self.malformed_total, "position": self.position,
            "first_event_time": self.first_event_time, "last_event_time": self.last_event_time,
            "wall_s": self.wall_s,
        }


def event_time(event: Event) -> float:
    """The event time of an impression (``served_at``) or a click (``clicked_at``)."""
    return event.served_at if isinstance(event, Impression) else event.clicked_at


def _problem(row: LogRow) -> tuple[str, str] | None:
    """Why a parsed row cannot be replayed, or None."""
    imp = row.impression
    if not isinstance(imp, Impression):
        return "not_an_impression", f"expected Impression, got {type(imp).__name__}"
    for name in ("impression_id", "user_id", "item_id"):
        value = getattr(imp, name)
        if not isinstance(value, str) or not value:
            return "missing_field", f"{name} must be a non-empty string, but {value!r} is given"
    t = imp.served_at
    if not isinstance(t, (int, float)) or not math.isfinite(t) or not (MIN_TIMESTAMP <= t < MAX_TIMESTAMP):
        return "absurd_timestamp", f"served_at {t!r} is outside [2000, 2100)"
    if not isinstance(imp.position, int) or imp.position < 0:
        return "bad_value", f"position must be >= 0, but {imp.position!r} is given"
    if not (0.0 < imp.propensity <= 1.0):
        return "bad_value", f"propensity must be in (0, 1], but {imp.propensity!r} is given"
    d = row.click_delay_s
    if d is not None:
        if not isinstance(d, (int, float)) or not math.isfinite(d) or d < 0:
            return "bad_delay", f"click delay must be >= 0 seconds, but {d!r} is given"
        if t + d >= MAX_TIMESTAMP:
            return "absurd_timestamp", f"click time {t + d!r} is after 2100"
    return None


def replay_events(rows: Iterable[LogRow | Malformed], stats: ReplayStats, presorted: bool = False) -> Iterator[Event]:
    """All events of ``rows`` in event-time order, without pacing; updates ``stats``.

    Counts ``rows``, ``malformed`` (per reason) and ``first``/``last_event_time``;
    emitted events are counted by the caller (:class:`LogReplayer`).
    """
    source: Iterable[LogRow | Malformed]
    if not presorted:
        good: list[LogRow] = []
        for row in rows:
            if _accept(row, stats):
                good.append(row)  # type: ignore[arg-type]
        good.sort(key=lambda r: r.impression.served_at)  # stable: ties keep log order
        source = good
        counted = True
    else:
        source = rows
        counted = False
    pending: list[tuple[float, int, Click]] = []  # (clicked_at, seq, click)
    seq = 0
    last_served = -math.inf
    for row in source:
        if not counted and not _accept(row, stats):
            continue
        imp = row.impression  # type: ignore[union-attr]
        if imp.served_at < last_served:
            _count(stats, "out_of_order", f"served_at {imp.served_at} < previous {last_served}")
            continue
        last_served = imp.served_at
        while pending and pending[0][0] <= imp.served_at:
            yield heapq.heappop(pending)[2]
        yield imp
        if row.click_delay_s is not None:  # type: ignore[union-attr]
            clicked_at = imp.served_at + float(row.click_delay_s)  # type: ignore[union-attr]
            heapq.heappush(pending, (clicked_at, seq, Click(imp.impression_id, imp.user_id, imp.item_id, clicked_at)))
            seq += 1
    while pending:
        yield heapq.heappop(pending)[2]


def _accept(row: LogRow | Malformed, stats: ReplayStats) -> bool:
    stats.rows += 1
    if isinstance(row, Malformed):
        _count(stats, row.reason, row.detail, row.line)
        return False
    if not isinstance(row, LogRow):
        _count(stats, "not_a_row", f"expected LogRow, got {type(row).__name__}")
        return False
    problem = _problem(row)
    if problem is not None:
        _count(stats, *problem)
        return False
    return True


def _count(stats: ReplayStats, reason: str, detail: str, line: int | None = None) -> None:
    n = stats.malformed.get(reason, 0) + 1
    stats.malformed[reason] = n
    if n <= 5:
        where = f" (line {line})" if line is not None else ""
        logger.warning("malformed log row%s: %s: %s", where, reason, detail)
    elif n == 6:
        logger.warning("more malformed rows with reason %r; counting without logging", reason)


class LogReplayer:
    """Replays rows as events with pacing, rate limit and resume.

    Parameters
    ----------
    config : ReplayConfig, optional
        Speed, rate limit, resume position.
    clock, sleep : callables
        Wall clock and sleep, injectable for tests (defaults ``time.monotonic``
        and ``time.sleep``).
    on_progress : callable, optional
        Called with :class:`ReplayStats` every ``config.progress_every`` events
        and at the end (a CLI hooks its progress bar here).

    Attributes
    ----------
    stats : ReplayStats
        Counts of the latest :meth:`run`.
    """

    def __init__(
        self, config: ReplayConfig | None = None, *, clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep, on_progress: Callable[[ReplayStats], None] | None = None,
    ) -> None:
        self.config = config or ReplayConfig()
        self._clock = clock
        self._sleep = sleep
        self._on_progress = on_progress
        self.stats = ReplayStats()

    def run(self, rows: Iterable[LogRow | Malformed]) -> Iterator[Event]:
        """Yield the events of ``rows`` in event-time order, paced by the config."""
        cfg = self.config
        stats = self.stats = ReplayStats(position=cfg.start_at)
        wall0 = self._clock()
        t0: float | None = None
        emitted = 0
        index = 0
        for event in replay_events(rows, stats, presorted=cfg.presorted):
            index += 1
            if index <= cfg.start_at:
                stats.skipped += 1
                continue
            if cfg.max_events is not None and emitted >= cfg.max_events:
                break
            t = event_time(event)
            if t0 is None:
                t0 = t
                wall0 = self._clock()
                stats.first_event_time = t
            self._pace(wall0, t - t0, emitted)
            yield event
            emitted += 1
            stats.position = cfg.start_at + emitted
            stats.last_event_time = t
            if isinstance(event, Impression):
                stats.impressions += 1
            else:
                stats.clicks += 1
            if self._on_progress is not None and emitted % cfg.progress_every == 0:
                self._on_progress(stats)
        stats.wall_s = self._clock() - wall0
        if self._on_progress is not None:
            self._on_progress(stats)
        if stats.malformed:
            logger.info("replay dropped %d malformed rows: %s", stats.malformed_total, stats.malformed)

    def _pace(self, wall0: float, event_offset_s: float, emitted: int) -> None:
        cfg = self.config
        due = wall0
        if cfg.speed > 0:
            due = wall0 + event_offset_s / cfg.speed
        if cfg.max_events_per_s is not None:
            due = max(due, wall0 + emitted / cfg.max_events_per_s)
        if due > wall0:
            wait = due - self._clock()
            if wait > 0.0005:
                self._sleep(wait)
