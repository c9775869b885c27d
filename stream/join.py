"""The pure impression-click join: event-time windows closed by a watermark.

No Kafka, no Redis, no clock: the caller feeds decoded events and the current
processing time, and takes back samples, dead letters, history appends and the
state changes to persist. :mod:`stream.worker` is the I/O shell around it.

Semantics (one :class:`JoinCore` per co-partitioned pair of input partitions)
----------------------------------------------------------------------------
* Attribution window ``W``: a click at ``clicked_at <= served_at + W`` makes the
  impression positive. The label is decided by event times only, never by
  arrival order, so a replay after a crash gives the same labels.
* Watermark: the minimum over the two inputs (impressions, clicks) of the
  largest event time seen, minus ``allowed_lateness_s``; it never goes back.
  An input with no record for ``idle_timeout_s`` of processing time leaves the
  minimum; when both are idle the watermark moves on with processing time at
  ``idle_advance_rate`` event seconds per second (so a finite stream's last
  windows close, and a quiet partition does not hold state forever). An input
  the caller reports as busy (records still to read) is never idle.
* A positive is emitted when its click arrives; a negative when the watermark
  passes ``served_at + W`` (``label_time = served_at + W``). A click after the
  window that arrives while the window is still open waits for it to close.
* A click after the negative, up to ``served_at + W + max_correction_delay_s``,
  gives one positive *correction* sample (``correction=True``, its own stable
  id); a later one is dead-lettered (``click_after_max_delay``).
* Duplicate impressions and repeated clicks are counted and ignored: one final
  label per impression. Records are kept until the watermark passes the
  correction horizon; an impression arriving after its horizon is dead-lettered
  (``late_impression``), so an evicted impression is never labelled twice.
* A click whose impression is unknown waits until the watermark passes its
  ``clicked_at`` (the impression, served earlier, must have arrived by then),
  then is dead-lettered (``orphan_click``).
* Every positive (first label or correction) appends ``(user, item, clicked_at)``
  to the user's history.

Conversions (a third input, co-partitioned like the other two)
--------------------------------------------------------------
* A conversion names its impression; it is attributed to that impression's click
  if ``converted_at <= clicked_at + conversion_window_s`` (hours to days). The
  first one wins; repeats are counted (``duplicate_conversion``), a later one is
  dead-lettered (``conversion_after_window``), one naming another user or item
  too (``conversion_mismatch``).
* An attributed conversion is its own sample (``conversion=1``, ``label=1``,
  ``correction=True``, ``label_time = converted_at``): a delayed-feedback
  correction of the click's sample, which went out when the click arrived. A
  conversion that arrives before its click is held and emitted right after the
  click's sample, so samples and their ids never depend on arrival order.
* A conversion whose impression has no click yet waits until the watermark
  passes ``converted_at`` (its click, earlier in event time, must have arrived by
  then), then is dead-lettered: ``conversion_without_click`` if the impression is
  known, ``orphan_conversion`` if not (or if it was evicted).
* A clicked impression is kept past its correction horizon, until the
  *conversion watermark* passes ``clicked_at + conversion_window_s``. That
  watermark is the join's, held back by the conversions input's own progress
  (newest ``converted_at`` minus the lateness) unless that input is idle, so a
  slower conversions partition cannot lose conversions. At most
  ``max_conversion_records`` such impressions are kept per partition; beyond it
  the ones whose window ends first are dropped early (``conversion_state_evicted``),
  which bounds the state whatever the window.

>>> from em3.types import Impression, Click, Conversion
>>> core = JoinCore(JoinConfig(window_s=10, allowed_lateness_s=0))
>>> core.add_impression(Impression("a", "r", "u", "i", 0, 1_700_000_000.0))
>>> core.add_impression(Impression("b", "r", "u", "j", 1, 1_700_000_000.0))
>>> core.add_click(Click("a", "u", "i", 1_700_000_003.0))
>>> core.advance_watermark(1_700_000_100.0)
>>> [(s.impression.impression_id, s.label) for s in core.take_output().samples]
[('a', 1), ('b', 0)]
>>> core.add_conversion(Conversion("a", "u", "i", 1_700_003_600.0, value=9.5))
>>> [(s.impression.impression_id, s.conversion, s.value) for s in core.take_output().samples]
[('a', 1, 9.5)]
"""
from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Literal

from em3.constraints import FiniteNonNegFloat, FinitePositiveFloat, PositiveFloat, PositiveInt, config_class
from em3.types import Click, Conversion, Impression, Sample

__all__ = [
    "JoinConfig",
    "JoinCore",
    "JoinOutput",
    "JoinDeadLetter",
    "JoinChanges",
    "ImpressionState",
    "PENDING",
    "NEGATIVE",
    "DONE",
    "expected_labels",
]

#: Record status: window open, no label yet.
PENDING = "P"
#: Negative emitted; a click may still bring a correction.
NEGATIVE = "N"
#: Final positive emitted (first label or correction); kept only for idempotence.
DONE = "D"

_NEG_INF = -math.inf


@config_class
class JoinConfig:
    """Join semantics; all durations in seconds.

    Parameters
    ----------
    window_s : attribution window ``W`` after ``served_at``.
    allowed_lateness_s : how far behind the newest event time a record may
        arrive and still count as on time.
    max_correction_delay_s : how long after the window a click still yields a
        correction sample.
    idle_timeout_s : processing time without records after which an input stops
        holding the watermark back; ``None`` for never.
    idle_advance_rate : event seconds the watermark advances per processing
        second while both inputs are idle (1.0 follows the wall clock; a
        large value closes a finite stream's windows quickly).
    conversion_window_s : a conversion counts for a click if it comes at most
        this long after it (event time); 0: conversions are not attributed and
        clicked impressions are not kept for them.
    max_conversion_records : clicked impressions kept per partition for their
        conversion window once past the correction horizon. Beyond it the ones
        whose window ends first are dropped (counted), which bounds memory
        whatever the window and the click rate.
    positive_timing : ``"window_close"`` (default): a click in the window makes the
        impression's sample positive, and it goes out when the window closes, at the
        same point of the stream as the negatives of impressions served with it;
        ``"click"``: it goes out when the click arrives, up to ``window_s`` sooner.
        With ``"click"`` a learner has always taken in the last window's clicks but
        not their impressions' negatives: in the demo both lines then predicted
        twice their CTR (0.20-0.26 against 0.10-0.14), and a simulation of that
        timing reproduces it (``docs/results.md``, "Calibration").
    """

    window_s: FinitePositiveFloat = 60.0
    allowed_lateness_s: FiniteNonNegFloat = 5.0
    max_correction_delay_s: FiniteNonNegFloat = 600.0
    idle_timeout_s: PositiveFloat | None = 5.0
    idle_advance_rate: PositiveFloat = 1.0
    conversion_window_s: FiniteNonNegFloat = 86_400.0
    max_conversion_records: PositiveInt = 100_000
    positive_timing: Literal["window_close", "click"] = "window_close"


@dataclass(slots=True)
class ImpressionState:
    """What the join remembers of one impression (persisted per partition)."""

    impression: Impression
    status: str = PENDING
    raw: bytes | None = None  # the impression's JSON as received, reused when emitting samples
    #: Clicks after the window that arrived while it was still open: they wait for
    #: the window to close, so an in-window click arriving later still wins.
    held: list[tuple[Click, int]] = field(default_factory=list)
    #: Event time of the click that made it positive (status DONE), None before.
    clicked_at: float | None = None
    #: Whether a conversion was attributed to that click.
    converted: bool = False
    #: Whether a store holds this record's impression already (so a status change
    #: need not rewrite it); set by the store, not part of the state.
    persisted: bool = field(default=False, compare=False)


@dataclass(frozen=True)
class JoinDeadLetter:
    """A click, conversion or impression the join could not label, with why."""

    reason: str
    detail: str
    record: Impression | Click | Conversion
    offset: int = -1


@dataclass
class JoinOutput:
    """What the core emitted since the last :meth:`JoinCore.take_output`.

    ``raws`` is parallel to ``samples``: the impression JSON as received (or None).
    """

    samples: list[Sample] = field(default_factory=list)
    raws: list[bytes | None] = field(default_factory=list)
    dead_letters: list[JoinDeadLetter] = field(default_factory=list)
    history: list[tuple[str, str, float]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: {"positive": 0, "negative": 0, "correction": 0,
                                                            "conversion": 0, "late_conversion": 0})

    def __len__(self) -> int:
        return len(self.samples) + len(self.dead_letters)


@dataclass
class JoinChanges:
    """State changes since the last :meth:`JoinCore.take_changes`, to persist incrementally.

    ``records`` maps impression id to its new state (or None if it is gone);
    ``orphans`` maps impression id to the clicks still held, or None when none are;
    ``conversions`` likewise for conversions waiting for their click.
    Three changes follow from the watermark in ``meta`` and are not reported, which
    saves two writes per impression: a window closing with no click (PENDING to
    NEGATIVE), an eviction past the correction horizon and one past the conversion
    window. :meth:`JoinCore.restore` re-derives them.
    """

    records: dict[str, ImpressionState | None] = field(default_factory=dict)
    orphans: dict[str, list[tuple[Click, int]] | None] = field(default_factory=dict)
    meta: dict[str, float] = field(default_factory=dict)
    conversions: dict[str, list[tuple[Conversion, int]] | None] = field(default_factory=dict)


class JoinCore:
    """Join state for one partition pair; see the module docstring for the semantics.

    Parameters
    ----------
    config : the join semantics.
    now : processing time at creation (for idleness); any monotonic clock.
    """

    def __init__(self, config: JoinConfig, now: float = 0.0) -> None:
        self.config = config
        self._window = config.window_s
        self._horizon = config.window_s + config.max_correction_delay_s
        self._lateness = config.allowed_lateness_s
        self._records: dict[str, ImpressionState] = {}
        self._n_pending = 0
        self._orphans: dict[str, list[tuple[Click, int]]] = {}
        # Window ends of remembered impressions (min-heap); clicks waiting for their
        # impression (min-heap); eviction times, appended as windows close (so in
        # order but for late impressions; lookups also check the horizon, so
        # eviction is exact whatever this queue's order).
        self._closes: list[tuple[float, str]] = []
        self._orphan_due: list[tuple[float, str]] = []
        self._evictions: deque[tuple[float, str]] = deque()
        # Conversions: clicked impressions past their correction horizon, kept for the
        # conversion window (ends in a min-heap, checked against the record itself);
        # conversions waiting for their click (min-heap of conversion times).
        self._conv_window = config.conversion_window_s
        self._clicked: dict[str, ImpressionState] = {}
        self._clicked_due: list[tuple[float, str]] = []
        self._held_conversions: dict[str, list[tuple[Conversion, int]]] = {}
        self._conversion_due: list[tuple[float, str]] = []
        self.max_impression_time = _NEG_INF
        self.max_click_time = _NEG_INF
        self.max_conversion_time = _NEG_INF
        self.watermark = _NEG_INF
        #: Watermark of the conversion windows: ``watermark`` held back by the
        #: conversions input's progress unless that input is idle (never ahead of it).
        self.conversion_watermark = _NEG_INF
        self._conversions_idle = False
        self._last_impression_at = now
        self._last_click_at = now
        self._last_conversion_at = now
        self._idle_since: float | None = None
        self._idle_base = _NEG_INF
        self._out = JoinOutput()
        self._changed: set[str] = set()
        self._orphans_changed: set[str] = set()
        self._conversions_changed: set[str] = set()
        self.counters: dict[str, int] = {}

    # -- feeding ----------------------------------------------------------------
    def add_impression(self, impression: Impression, raw: bytes | None = None, now: float | None = None) -> None:
        """Take one impression (``raw``: its JSON bytes as received, if at hand)."""
        if now is not None:
            self._last_impression_at = now
            self._idle_since = None
        iid = impression.impression_id
        served = impression.served_at
        wm = self.watermark
        if iid in self._records and self._lookup(iid) is not None:
            self._count("duplicate_impression")
        elif served + self._horizon <= wm:
            self._dead(
                "late_impression",
                f"served_at {served!r} is past the correction horizon (watermark {wm!r})",
                impression,
            )
        else:
            rec = self._records[iid] = ImpressionState(impression, PENDING, raw)
            self._n_pending += 1
            self._changed.add(iid)
            heapq.heappush(self._closes, (served + self._window, iid))
            if self._orphans:
                held = self._orphans.pop(iid, None)
                if held:
                    self._orphans_changed.add(iid)
                    for click, offset in sorted(held, key=lambda h: h[0].clicked_at):
                        self._apply_click(rec, click, offset)
        if served > self.max_impression_time:
            self.max_impression_time = served
            newest = self.max_click_time
            new = (served if served < newest else newest) - self._lateness
            if new > wm:
                self.watermark = wm = new
        if self._closes[0][0] <= wm if self._closes else False:
            self._fire()
        elif self._orphan_due or self._evictions or self._conversion_due or self._clicked_due:
            self._fire()

    def add_click(self, click: Click, offset: int = -1, now: float | None = None) -> None:
        """Take one click (``offset``: where it came from, for dead letters)."""
        if now is not None:
            self._last_click_at = now
            self._idle_since = None
        rec = self._lookup(click.impression_id)
        if rec is not None:
            self._apply_click(rec, click, offset)
        elif click.clicked_at <= self.watermark:
            self._dead(
                "orphan_click",
                "impression unknown (never arrived, or evicted past its correction horizon)",
                click,
                offset,
            )
        else:
            self._orphans.setdefault(click.impression_id, []).append((click, offset))
            self._orphans_changed.add(click.impression_id)
            heapq.heappush(self._orphan_due, (click.clicked_at, click.impression_id))
        if click.clicked_at > self.max_click_time:
            self.max_click_time = click.clicked_at
            self._update_watermark()
        else:
            self._fire()

    def add_conversion(self, conversion: Conversion, offset: int = -1, now: float | None = None) -> None:
        """Take one conversion (``offset``: where it came from, for dead letters)."""
        if now is not None:
            self._last_conversion_at = now
            self._conversions_idle = False
        iid = conversion.impression_id
        rec = self._lookup(iid)
        if rec is None:
            rec = self._clicked_lookup(iid)
        if rec is not None and rec.clicked_at is not None:
            self._attribute(rec, conversion, offset, late=True)
        elif conversion.converted_at <= self.watermark and not self._click_waits(rec):
            # Its click (earlier in event time) would have arrived by now.
            self._dead_conversion(rec, conversion, offset)
        else:
            self._held_conversions.setdefault(iid, []).append((conversion, offset))
            self._conversions_changed.add(iid)
            heapq.heappush(self._conversion_due, (conversion.converted_at, iid))
        if conversion.converted_at > self.max_conversion_time:
            self.max_conversion_time = conversion.converted_at
        self._fire()

    def _click_waits(self, rec: ImpressionState | None) -> bool:
        """Whether ``rec`` was clicked in its window and the positive waits for the
        window to close (``positive_timing="window_close"``): its conversions wait too."""
        return rec is not None and rec.status == PENDING and any(
            c.clicked_at <= rec.impression.served_at + self._window for c, _ in rec.held)

    def _lookup(self, iid: str) -> ImpressionState | None:
        rec = self._records.get(iid)
        if rec is not None and rec.impression.served_at + self._horizon <= self.watermark:
            del self._records[iid]  # past its horizon: evicted, whatever the queue says
            self._retire(iid, rec)
            return None
        return rec

    def _clicked_lookup(self, iid: str) -> ImpressionState | None:
        rec = self._clicked.get(iid)
        if rec is not None and rec.clicked_at + self._conv_window <= self.conversion_watermark:
            del self._clicked[iid]  # its conversion window is over
            return None
        return rec

    def _retire(self, iid: str, rec: ImpressionState) -> None:
        """A record past its correction horizon: keep it for its conversion window
        if it was clicked (and the window is still open), else let it go."""
        if rec.clicked_at is None or not self._conv_window:
            return
        due = rec.clicked_at + self._conv_window
        if due <= self.conversion_watermark:
            return
        self._clicked[iid] = rec
        heapq.heappush(self._clicked_due, (due, iid))
        if len(self._clicked) > self.config.max_conversion_records:
            self._shed_clicked()

    def _shed_clicked(self) -> None:
        """Drop the clicked records whose conversion window ends first, down to the cap."""
        cap = self.config.max_conversion_records
        clicked, due = self._clicked, self._clicked_due
        while len(clicked) > cap and due:
            when, iid = heapq.heappop(due)
            rec = clicked.get(iid)
            if rec is None or rec.clicked_at + self._conv_window != when:
                continue
            del clicked[iid]
            self._changed.add(iid)  # reported as gone: restore() could not re-derive it
            self._count("conversion_state_evicted")

    def tick(self, now: float, impressions_busy: bool = False, clicks_busy: bool = False,
             conversions_busy: bool = False) -> None:
        """Let processing time move an idle watermark (see :class:`JoinConfig`).

        ``impressions_busy`` / ``clicks_busy`` / ``conversions_busy``: the caller
        knows that input has records still to read (a backlog), so it is behind,
        not idle, however long since its last record.
        """
        timeout = self.config.idle_timeout_s
        if timeout is None:
            return
        if impressions_busy:
            self._last_impression_at = now
            self._idle_since = None
        if clicks_busy:
            self._last_click_at = now
            self._idle_since = None
        if conversions_busy:
            self._last_conversion_at = now
        conversions_idle = now - self._last_conversion_at >= timeout
        if conversions_idle != self._conversions_idle:
            self._conversions_idle = conversions_idle
            self._fire()
        imp_idle = now - self._last_impression_at >= timeout
        click_idle = now - self._last_click_at >= timeout
        if imp_idle and click_idle:
            if self._idle_since is None:
                self._idle_since = now
                self._idle_base = max(self.max_impression_time, self.max_click_time) - self.config.allowed_lateness_s
                if self._idle_base == _NEG_INF:
                    return
            if self._idle_base != _NEG_INF:
                target = self._idle_base + (now - self._idle_since) * self.config.idle_advance_rate
                self._idle_advance(target)
        elif imp_idle or click_idle:
            self._update_watermark(imp_idle=imp_idle, click_idle=click_idle)

    def advance_watermark(self, watermark: float) -> None:
        """Move the watermark and the conversion watermark to ``watermark`` (never
        back) and fire what is due."""
        if watermark > self.watermark:
            self.watermark = watermark
        if watermark > self.conversion_watermark:
            self.conversion_watermark = watermark
        self._fire()

    def _idle_advance(self, watermark: float) -> None:
        if watermark > self.watermark:
            self.watermark = watermark
        self._fire()

    # -- output -------------------------------------------------------------------
    def take_output(self) -> JoinOutput:
        """Everything emitted since the last call."""
        out, self._out = self._out, JoinOutput()
        return out

    def take_changes(self) -> JoinChanges:
        """State changes since the last call (records, held clicks, watermark figures)."""
        records, clicked = self._records, self._clicked
        held = self._held_conversions
        changes = JoinChanges(
            records={iid: records.get(iid) or clicked.get(iid) for iid in self._changed},
            orphans={iid: (list(self._orphans[iid]) if iid in self._orphans else None) for iid in self._orphans_changed},
            meta=self.meta(),
            conversions={iid: (list(held[iid]) if iid in held else None) for iid in self._conversions_changed},
        )
        self._changed = set()
        self._orphans_changed = set()
        self._conversions_changed = set()
        return changes

    def meta(self) -> dict[str, float]:
        """The scalar state: newest event time per input and the two watermarks."""
        return {
            "max_impression_time": self.max_impression_time,
            "max_click_time": self.max_click_time,
            "max_conversion_time": self.max_conversion_time,
            "watermark": self.watermark,
            "conversion_watermark": self.conversion_watermark,
        }

    def state(self) -> tuple[list[ImpressionState], dict[str, list[tuple[Click, int]]]]:
        """All remembered records (clicked ones kept for conversions included) and
        held clicks (for a full checkpoint); :meth:`held_conversions` holds the rest."""
        limit = self.watermark - self._horizon
        records = [r for r in self._records.values() if r.impression.served_at > limit]
        cw, window = self.conversion_watermark, self._conv_window
        records += [r for iid, r in self._clicked.items() if r.clicked_at + window > cw and iid not in self._records]
        return records, {iid: list(held) for iid, held in self._orphans.items()}

    def held_conversions(self) -> dict[str, list[tuple[Conversion, int]]]:
        """Conversions waiting for their click (for a full checkpoint)."""
        return {iid: list(held) for iid, held in self._held_conversions.items()}

    @property
    def pending(self) -> int:
        """Impressions with no label yet."""
        return self._n_pending

    @property
    def records(self) -> int:
        """Impressions remembered (pending, negative or done)."""
        return len(self._records)

    @property
    def held_clicks(self) -> int:
        """Clicks waiting for their impression."""
        return sum(len(v) for v in self._orphans.values())

    @property
    def awaiting_conversion(self) -> int:
        """Clicked impressions past their correction horizon, kept for their conversion window."""
        return len(self._clicked)

    @property
    def held_conversion_count(self) -> int:
        """Conversions waiting for their click."""
        return sum(len(v) for v in self._held_conversions.values())

    @classmethod
    def restore(
        cls,
        config: JoinConfig,
        records: Iterable[ImpressionState],
        orphans: Iterable[tuple[Click, int]],
        meta: dict[str, float],
        now: float = 0.0,
        conversions: Iterable[tuple[Conversion, int]] = (),
    ) -> "JoinCore":
        """Rebuild a core from persisted state (what :meth:`take_changes` reported)."""
        core = cls(config, now)
        core.max_impression_time = float(meta.get("max_impression_time", _NEG_INF))
        core.max_click_time = float(meta.get("max_click_time", _NEG_INF))
        core.max_conversion_time = float(meta.get("max_conversion_time", _NEG_INF))
        core.watermark = float(meta.get("watermark", _NEG_INF))
        core.conversion_watermark = float(meta.get("conversion_watermark", _NEG_INF))
        wm, cw, window = core.watermark, core.conversion_watermark, config.conversion_window_s
        for rec in records:
            iid = rec.impression.impression_id
            end = rec.impression.served_at + config.window_s
            if end + config.max_correction_delay_s <= wm:
                # Past its correction horizon (evictions are not reported as changes):
                # gone, unless clicked and inside its conversion window.
                if window and rec.status == DONE and rec.clicked_at is not None and rec.clicked_at + window > cw:
                    core._clicked[iid] = rec
                    core._clicked_due.append((rec.clicked_at + window, iid))
                continue
            if rec.status == PENDING and end <= wm:
                # Its window closed before the checkpoint: the negative went out, and
                # any held clicks were settled (a correction, or a dead letter).
                horizon = end + config.max_correction_delay_s
                in_time = [c.clicked_at for c, _ in rec.held if c.clicked_at <= horizon]
                rec.status = DONE if in_time else NEGATIVE
                if in_time:
                    rec.clicked_at = min(in_time)
                rec.held = []
            core._records[iid] = rec
            core._n_pending += rec.status == PENDING
            core._closes.append((rec.impression.served_at + config.window_s, iid))
        heapq.heapify(core._closes)
        heapq.heapify(core._clicked_due)
        if len(core._clicked) > config.max_conversion_records:
            core._shed_clicked()
        for click, offset in orphans:
            core._orphans.setdefault(click.impression_id, []).append((click, offset))
            core._orphan_due.append((click.clicked_at, click.impression_id))
        heapq.heapify(core._orphan_due)
        for conversion, offset in conversions:
            core._held_conversions.setdefault(conversion.impression_id, []).append((conversion, offset))
            core._conversion_due.append((conversion.converted_at, conversion.impression_id))
        heapq.heapify(core._conversion_due)
        return core

    # -- internals ----------------------------------------------------------------
    def _count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def _dead(self, reason: str, detail: str, record: Impression | Click | Conversion, offset: int = -1) -> None:
        self._out.dead_letters.append(JoinDeadLetter(reason, detail, record, offset))
        self._count(f"dead_letter.{reason}")

    def _emit(self, rec: ImpressionState, label: int, label_time: float, correction: bool,
              history: bool = True) -> None:
        """One sample of ``rec``; a click's also goes to the user's history unless it
        went there when the click came (``history=False``)."""
        out = self._out
        out.samples.append(Sample(rec.impression, label, label_time, correction))
        out.raws.append(rec.raw)
        kind = "correction" if correction else ("positive" if label else "negative")
        out.counts[kind] += 1
        self.counters[kind] = self.counters.get(kind, 0) + 1
        if label and history:
            imp = rec.impression
            out.history.append((imp.user_id, imp.item_id, label_time))

    def _attribute(self, rec: ImpressionState, conversion: Conversion, offset: int, late: bool) -> None:
        """Attribute ``conversion`` to the click of ``rec`` (status DONE): one
        conversion sample, or a count or dead letter saying why not.

        ``late``: the click's sample went out before the conversion arrived."""
        imp = rec.impression
        if conversion.user_id != imp.user_id or conversion.item_id != imp.item_id:
            self._dead(
                "conversion_mismatch",
                f"conversion names user {conversion.user_id!r} item {conversion.item_id!r}, "
                f"impression has {imp.user_id!r} {imp.item_id!r}",
                conversion,
                offset,
            )
        elif rec.converted:
            self._count("duplicate_conversion")
        elif not self._conv_window or conversion.converted_at > rec.clicked_at + self._conv_window:
            self._dead(
                "conversion_after_window",
                f"converted {conversion.converted_at - rec.clicked_at:.1f} s after the click, past the "
                f"conversion window ({self._conv_window} s)",
                conversion,
                offset,
            )
        else:
            rec.converted = True
            self._changed.add(imp.impression_id)
            out = self._out
            out.samples.append(Sample(rec.impression, 1, conversion.converted_at, True, conversion=1,
                                      value=float(conversion.value or 0.0)))
            out.raws.append(rec.raw)
            out.counts["conversion"] += 1
            self._count("conversion")
            if late:
                out.counts["late_conversion"] += 1
                self._count("late_conversion")

    def _dead_conversion(self, rec: ImpressionState | None, conversion: Conversion, offset: int) -> None:
        if rec is None:
            self._dead("orphan_conversion", "impression unknown (never arrived, or evicted past its "
                       "correction horizon unclicked, or past its conversion window)", conversion, offset)
        else:
            self._dead("conversion_without_click", "the impression was not clicked by the conversion time",
                       conversion, offset)

    def _clicked_now(self, rec: ImpressionState, clicked_at: float) -> None:
        """``rec`` just became positive: remember when, and settle conversions it was waiting for."""
        rec.clicked_at = clicked_at
        iid = rec.impression.impression_id
        held = self._held_conversions.pop(iid, None) if self._held_conversions else None
        if held:
            self._conversions_changed.add(iid)
            for conversion, offset in sorted(held, key=lambda h: h[0].converted_at):
                self._attribute(rec, conversion, offset, late=False)

    def _apply_click(self, rec: ImpressionState, click: Click, offset: int) -> None:
        imp = rec.impression
        if click.user_id != imp.user_id or click.item_id != imp.item_id:
            self._dead(
                "click_mismatch",
                f"click names user {click.user_id!r} item {click.item_id!r}, "
                f"impression has {imp.user_id!r} {imp.item_id!r}",
                click,
                offset,
            )
            return
        end = imp.served_at + self.config.window_s
        if rec.status == PENDING:
            self._changed.add(imp.impression_id)
            if click.clicked_at <= end and self.config.positive_timing == "window_close":
                # The sample goes out when the window closes; the user's history (what
                # serving reads) takes the first click now, as with "click".
                if self._hold_earliest(rec, click, offset, end):
                    self._out.history.append((imp.user_id, imp.item_id, click.clicked_at))
                return
            if click.clicked_at <= end:
                rec.status = DONE
                self._n_pending -= 1
                self._emit(rec, 1, click.clicked_at, False)
                self._clicked_now(rec, click.clicked_at)
                if rec.held:  # the later clicks it beat are repeats now
                    self._count("duplicate_click", len(rec.held))
                    rec.held = []
            elif click.clicked_at > end + self.config.max_correction_delay_s:
                # Past the correction horizon: no label can come of it, whatever the window says.
                self._dead_too_late(click, offset, imp)
            else:
                # After the window, but the window is still open: decide when it closes.
                self._hold_earliest(rec, click, offset, end)
            return
        if rec.status == NEGATIVE:
            if click.clicked_at <= end + self.config.max_correction_delay_s:
                rec.status = DONE
                self._changed.add(imp.impression_id)
                self._emit(rec, 1, click.clicked_at, True)
                self._clicked_now(rec, click.clicked_at)
            else:
                self._dead_too_late(click, offset, imp)
            return
        self._count("duplicate_click")

    def _hold_earliest(self, rec: ImpressionState, click: Click, offset: int, end: float) -> bool:
        """Hold ``click`` in ``rec`` until its window (ending at ``end``) closes, at most
        one click on each side of ``end``: only the earliest in the window can make the
        positive, and only the earliest after it the correction. A repeat keeps the
        earlier of the two and is counted at once, so a flood of clicks on one
        impression cannot grow its record. True when ``click`` is the first on its side."""
        in_window = click.clicked_at <= end
        for n, (held, _) in enumerate(rec.held):
            if (held.clicked_at <= end) == in_window:
                self._count("duplicate_click")
                if click.clicked_at < held.clicked_at:
                    rec.held[n] = (click, offset)
                return False
        rec.held.append((click, offset))
        return True

    def _dead_too_late(self, click: Click, offset: int, imp: Impression) -> None:
        self._dead(
            "click_after_max_delay",
            f"clicked {click.clicked_at - imp.served_at:.1f} s after serving, past "
            f"window + max correction delay ({self.config.window_s + self.config.max_correction_delay_s} s)",
            click,
            offset,
        )

    def _update_watermark(self, imp_idle: bool = False, click_idle: bool = False) -> None:
        if imp_idle:
            newest = self.max_click_time
        elif click_idle:
            newest = self.max_impression_time
        else:
            newest = min(self.max_impression_time, self.max_click_time)
        wm = newest - self.config.allowed_lateness_s
        if wm > self.watermark:
            self.watermark = wm
        self._fire()

    def _fire(self) -> None:
        wm = self.watermark
        # The conversion watermark: this one, held back by the conversions input
        # unless that input is idle; it never goes back.
        cw = wm if self._conversions_idle else self.max_conversion_time - self._lateness
        if cw > wm:
            cw = wm
        if cw > self.conversion_watermark:
            self.conversion_watermark = cw
        closes = self._closes
        records = self._records
        evictions = self._evictions
        md = self.config.max_correction_delay_s
        while closes and closes[0][0] <= wm:
            when, iid = heapq.heappop(closes)
            rec = records.get(iid)
            if rec is None:
                continue
            evictions.append((when + md, iid))
            if rec.status == PENDING and any(c.clicked_at <= when for c, _ in rec.held):
                # Clicked in its window (positive_timing "window_close"): the positive goes
                # out now, from the first such click; the other clicks are repeats.
                first = min(c.clicked_at for c, _ in rec.held if c.clicked_at <= when)
                rec.status = DONE
                self._n_pending -= 1
                self._changed.add(iid)
                self._emit(rec, 1, first, False, history=False)  # the history took it at the click
                self._clicked_now(rec, first)
                self._count("duplicate_click", len(rec.held) - 1)
                rec.held = []
            elif rec.status == PENDING:
                rec.status = NEGATIVE
                self._n_pending -= 1
                self._emit(rec, 0, when, False)
                if rec.held:
                    self._changed.add(iid)
                    held, rec.held = rec.held, []
                    for click, offset in sorted(held, key=lambda h: h[0].clicked_at):
                        self._apply_click(rec, click, offset)
                # else: not reported as a change; restore() derives it from the watermark
        due = self._orphan_due
        while due and due[0][0] <= wm:
            _, iid = heapq.heappop(due)
            held = self._orphans.get(iid)
            if not held:
                continue
            keep = []
            for click, offset in held:
                if click.clicked_at <= wm:
                    self._dead("orphan_click", "no impression arrived within the allowed lateness", click, offset)
                else:
                    keep.append((click, offset))
            if keep:
                self._orphans[iid] = keep
            else:
                del self._orphans[iid]
            self._orphans_changed.add(iid)
        due = self._conversion_due
        while due and due[0][0] <= wm:
            _, iid = heapq.heappop(due)
            held = self._held_conversions.get(iid)
            if not held:
                continue
            keep = []
            for conversion, offset in held:
                rec = self._lookup(iid) or self._clicked_lookup(iid)
                if conversion.converted_at <= wm and not self._click_waits(rec):  # its click has not come by now
                    self._dead_conversion(rec, conversion, offset)
                else:  # later, or its click waits for the window to close (it settles them then)
                    keep.append((conversion, offset))
            if keep:
                self._held_conversions[iid] = keep
            else:
                del self._held_conversions[iid]
            self._conversions_changed.add(iid)
        while evictions and evictions[0][0] <= wm:
            _, iid = evictions.popleft()
            rec = records.get(iid)
            if rec is not None and rec.impression.served_at + self._horizon <= wm:
                del records[iid]  # not reported: restore() drops what is past its horizon
                if rec.clicked_at is not None:
                    self._retire(iid, rec)
        clicked_due, clicked = self._clicked_due, self._clicked
        cw, window = self.conversion_watermark, self._conv_window
        while clicked_due and clicked_due[0][0] <= cw:
            when, iid = heapq.heappop(clicked_due)
            rec = clicked.get(iid)
            if rec is not None and rec.clicked_at + window <= cw:
                del clicked[iid]  # not reported: restore() drops what is past its window


def expected_labels(
    impressions: Iterable[Impression], clicks: Iterable[Click], config: JoinConfig
) -> dict[str, tuple[int, bool]]:
    """Reference labels for an on-time stream: impression id -> (first label, has correction).

    The first label is 1 if any matching click falls within the window; a
    correction follows a 0 if a click falls within the correction delay. Only
    valid when every record respects the allowed lateness.

    >>> from em3.types import Impression, Click
    >>> imps = [Impression("a", "r", "u", "i", 0, 100.0), Impression("b", "r", "u", "j", 0, 100.0)]
    >>> expected_labels(imps, [Click("b", "u", "j", 200.0)], JoinConfig(window_s=10, max_correction_delay_s=500))
    {'a': (0, False), 'b': (0, True)}
    """
    by_id: dict[str, Impression] = {}
    for imp in impressions:
        by_id.setdefault(imp.impression_id, imp)
    first: dict[str, list[float]] = {}
    for c in clicks:
        imp = by_id.get(c.impression_id)
        if imp is not None and imp.user_id == c.user_id and imp.item_id == c.item_id:
            first.setdefault(c.impression_id, []).append(c.clicked_at)
    out = {}
    for iid, imp in by_id.items():
        end = imp.served_at + config.window_s
        times = first.get(iid, [])
        if any(t <= end for t in times):
            out[iid] = (1, False)
        else:
            out[iid] = (0, any(t <= end + config.max_correction_delay_s for t in times))
    return out
