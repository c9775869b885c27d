"""The join's conversion attribution: window, delayed feedback, bounded state, restore."""
from __future__ import annotations

import math
import random
from collections import Counter

import pytest
from hypothesis import given, settings, strategies as st

from em3 import codec
from em3.types import Click, Conversion, Impression, sample_id_for
from stream.join import DONE, ImpressionState, JoinConfig, JoinCore, expected_labels
from stream.state import _apply_blob, _delta_blob, decode_record, _conversions_from

EXAMPLES = settings.default.max_examples  # the profile's: 100 in the full suite, 10 in the fast lane

BASE = 1_700_000_000.0
HOUR = 3600.0
# Clicks within 10 s; conversions within 2 days of their click (long next to the click horizon of 30 s).
# A click's positive goes out when the click comes (the conversions' timing is what is tested here;
# tests/unit/stream/test_join.py covers "window_close", the default).
CFG = JoinConfig(window_s=10.0, allowed_lateness_s=5.0, max_correction_delay_s=20.0, idle_timeout_s=None,
                 conversion_window_s=48 * HOUR, positive_timing="click")


def _imp(k: int, served: float, user: str | None = None) -> Impression:
    return Impression(f"imp{k}", f"r{k}", user or f"u{k % 3}", f"i{k % 5}", 0, BASE + served)


def _click(imp: Impression, delay: float) -> Click:
    return Click(imp.impression_id, imp.user_id, imp.item_id, imp.served_at + delay)


def _conv(imp: Impression, at: float, value: float | None = None) -> Conversion:
    return Conversion(imp.impression_id, imp.user_id, imp.item_id, imp.served_at + at, value)


def _filler(core: JoinCore, k: int, served: float) -> None:
    """An impression and a click at ``served``: moves the watermark to about ``served - 5``."""
    imp = _imp(k, served)
    core.add_impression(imp)
    core.add_click(_click(imp, 0.0))


def test_a_conversion_within_the_window_is_its_own_delayed_correction_sample():
    core = JoinCore(CFG)
    imp = _imp(1, 0.0)
    core.add_impression(imp, raw=b"raw-imp")
    core.add_click(_click(imp, 3.0))
    first = core.take_output()
    assert [(s.label, s.correction, s.conversion) for s in first.samples] == [(1, False, 0)]
    _filler(core, 2, 5 * HOUR)  # the click's horizon passes: kept for its conversion window
    assert core.records == 1 and core.awaiting_conversion == 1
    core.take_output()
    core.add_conversion(_conv(imp, 3 * HOUR, value=25.0), offset=7)
    out = core.take_output()
    (s,) = out.samples
    assert (s.label, s.correction, s.conversion, s.value, s.label_time) == (1, True, 1, 25.0, imp.served_at + 3 * HOUR)
    assert s.sample_id == sample_id_for(imp.impression_id, True, conversion=True)
    assert out.raws == [b"raw-imp"] and out.history == []  # the click was appended already
    assert out.counts["conversion"] == 1 and out.counts["late_conversion"] == 1
    core.add_conversion(_conv(imp, 4 * HOUR))  # a repeat: counted, never a second sample
    assert core.take_output().samples == [] and core.counters["duplicate_conversion"] == 1
    assert core.take_changes().records[imp.impression_id].converted


def test_conversions_past_the_window_or_for_another_item_are_dead_lettered():
    core = JoinCore(CFG)
    imp = _imp(1, 0.0)
    core.add_impression(imp)
    core.add_click(_click(imp, 1.0))
    core.add_conversion(Conversion(imp.impression_id, imp.user_id, "other", imp.served_at + 60))
    core.add_conversion(_conv(imp, 1.0 + 48 * HOUR + 1))
    out = core.take_output()
    assert [d.reason for d in out.dead_letters] == ["conversion_mismatch", "conversion_after_window"]
    assert [s.conversion for s in out.samples] == [0]
    core.add_conversion(_conv(imp, 1.0 + 48 * HOUR))  # exactly at the window's end still counts
    assert [s.conversion for s in core.take_output().samples] == [1]


def test_a_conversion_read_before_its_click_gives_the_same_samples():
    def run(order):
        core = JoinCore(CFG)
        imp = _imp(1, 0.0)
        core.add_impression(imp)
        for kind in order:
            if kind == "click":
                core.add_click(_click(imp, 2.0))
            else:
                core.add_conversion(_conv(imp, 40.0, value=3.0))
        core.advance_watermark(math.inf)
        out = core.take_output()
        return [(s.sample_id, s.label, s.correction, s.conversion, s.value, s.label_time) for s in out.samples], out

    late, out_late = run(["click", "conversion"])
    early, out_early = run(["conversion", "click"])
    assert late == early and len(late) == 2 and late[1][3] == 1  # the click's sample, then the conversion's
    assert out_late.counts["late_conversion"] == 1 and out_early.counts["late_conversion"] == 0


def test_a_conversion_without_a_click_waits_for_the_watermark_then_is_dead_lettered():
    core = JoinCore(CFG)
    imp = _imp(1, 0.0)
    core.add_impression(imp)
    core.add_conversion(_conv(imp, 25.0))
    core.add_conversion(Conversion("ghost", "u0", "i0", BASE + 25.0))
    assert core.take_output().dead_letters == [] and core.held_conversion_count == 2
    ch = core.take_changes()
    assert set(ch.conversions) == {imp.impression_id, "ghost"}
    _filler(core, 2, 31.0)  # watermark 26 > 25: the click would have come
    dead = core.take_output().dead_letters
    assert sorted(d.reason for d in dead) == ["conversion_without_click", "orphan_conversion"]
    assert core.held_conversion_count == 0
    assert core.take_changes().conversions == {imp.impression_id: None, "ghost": None}


def test_a_late_click_correction_can_convert_too():
    core = JoinCore(CFG)
    imp = _imp(1, 0.0)
    core.add_impression(imp)
    core.advance_watermark(imp.served_at + 10.0)  # the negative goes out
    core.add_click(_click(imp, 25.0))  # within the correction delay
    core.add_conversion(_conv(imp, 2 * HOUR))
    out = core.take_output()
    assert [(s.label, s.correction, s.conversion) for s in out.samples] == [(0, False, 0), (1, True, 0), (1, True, 1)]
    assert len({s.sample_id for s in out.samples}) == 3


def test_clicked_impressions_leave_when_the_conversion_window_closes():
    core = JoinCore(CFG)
    imp = _imp(1, 0.0)
    core.add_impression(imp)
    core.add_click(_click(imp, 1.0))
    core.add_conversion(Conversion("other", "u", "i", BASE + 1.0))  # the conversions input has started
    _filler(core, 2, 60.0)
    assert core.awaiting_conversion == 1
    # The other inputs run 3 days ahead, the conversions input is still at its start:
    # its conversions for imp1 may still come, so imp1 stays.
    _filler(core, 3, 72 * HOUR)
    assert core.awaiting_conversion >= 1 and core.conversion_watermark < imp.served_at + 48 * HOUR
    core.add_conversion(_conv(imp, 47 * HOUR))  # arrives late in processing, on time in event time
    assert [s.conversion for s in core.take_output().samples][-1:] == [1]
    core.add_conversion(Conversion("other", "u", "i", BASE + 71 * HOUR))
    assert core.awaiting_conversion == 0  # every window is over now


def test_idle_conversions_input_stops_holding_the_conversion_watermark():
    cfg = JoinConfig(window_s=10, allowed_lateness_s=5, max_correction_delay_s=20, idle_timeout_s=1.0,
                     conversion_window_s=HOUR)
    core = JoinCore(cfg, now=0.0)
    imp = _imp(1, 0.0)
    core.add_impression(imp, now=0.0)
    core.add_click(_click(imp, 1.0), now=0.0)
    core.tick(0.5, conversions_busy=True)
    later = _imp(2, 2 * HOUR)
    core.add_impression(later, now=0.6)
    core.add_click(_click(later, 0.0), now=0.6)
    assert core.awaiting_conversion == 1  # the conversions input is behind, not idle
    core.tick(2.0)  # quiet for 1.5 s: idle, the join's watermark rules
    assert core.awaiting_conversion == 0 and core.conversion_watermark == core.watermark


def test_state_for_conversions_is_bounded():
    cfg = JoinConfig(window_s=10.0, allowed_lateness_s=0.0, max_correction_delay_s=0.0, idle_timeout_s=None,
                     conversion_window_s=7 * 24 * HOUR, max_conversion_records=50, positive_timing="click")
    core = JoinCore(cfg)
    for k in range(500):
        imp = _imp(k, 60.0 * k)
        core.add_impression(imp)
        core.add_click(_click(imp, 1.0))
        assert core.awaiting_conversion <= 50
        assert core.records <= 2
    assert core.counters["conversion_state_evicted"] == 500 - 50 - core.records
    gone = core.take_changes()
    assert sum(1 for rec in gone.records.values() if rec is None) >= 400  # reported, so restore agrees
    core.take_output()
    core.add_conversion(_conv(_imp(0, 0.0), 100.0))  # its record was dropped for room
    core.add_conversion(_conv(_imp(499, 60.0 * 499), 100.0))
    out = core.take_output()
    assert [s.impression.impression_id for s in out.samples] == ["imp499"]


def test_records_round_trip_through_the_state_blob_with_click_times_and_held_conversions():
    core = JoinCore(CFG)
    imp, other = _imp(1, 0.0), _imp(2, 0.0)
    core.add_impression(imp, raw=codec.encode(imp))
    core.add_impression(other)
    core.add_click(_click(imp, 2.5))
    core.add_conversion(_conv(imp, 50.0, value=7.0))
    core.add_conversion(_conv(other, 60.0))  # held: no click yet
    records: dict = {}
    orphans: dict = {}
    conversions: dict = {}
    _apply_blob(_delta_blob(core.take_changes()), records, orphans, conversions)
    back = decode_record(records[imp.impression_id.encode()])
    assert (back.status, back.clicked_at, back.converted) == (DONE, imp.served_at + 2.5, True)
    assert _conversions_from(conversions[other.impression_id.encode()]) == [(_conv(other, 60.0), -1)]


# -- properties -----------------------------------------------------------------------


@st.composite
def streams(draw, on_time: bool):
    """Impressions with at most one click each, conversions (some before their click,
    some past the window, some for unclicked or unknown impressions), in an order."""
    n = draw(st.integers(1, 20))
    imps = [_imp(k, draw(st.floats(0, 300, allow_nan=False))) for k in range(n)]
    clicks, convs = [], []
    for imp in imps:
        if draw(st.booleans()):
            delay = draw(st.floats(0, 40, allow_nan=False))
            clicks.append(_click(imp, delay))
            for _ in range(draw(st.integers(0, 2))):
                convs.append(_conv(imp, delay + draw(st.sampled_from([0.0, 30.0, 3 * HOUR, 47 * HOUR, 49 * HOUR]))))
        elif draw(st.booleans()):
            convs.append(_conv(imp, draw(st.floats(0, 100, allow_nan=False))))
    for j in range(draw(st.integers(0, 2))):
        convs.append(Conversion(f"ghost{j}", "u0", "i0", BASE + draw(st.floats(0, 100, allow_nan=False))))
    events = [("i", e) for e in imps] + [("c", c) for c in clicks] + [("v", c) for c in convs]
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    if on_time:
        keyed = [(_time(e) + rng.uniform(0, CFG.allowed_lateness_s * 0.99), i) for i, e in enumerate(events)]
        events = [events[i] for _, i in sorted(keyed)]
    else:
        rng.shuffle(events)
    return imps, clicks, convs, events


def _time(event) -> float:
    kind, rec = event
    return {"i": lambda r: r.served_at, "c": lambda r: r.clicked_at, "v": lambda r: r.converted_at}[kind](rec)


def _run(events, restore_at: int | None = None):
    core = JoinCore(CFG)
    samples, dead = [], []
    store: dict = {"records": {}, "orphans": {}, "conversions": {}, "meta": {}}

    def drain():
        out = core.take_output()
        samples.extend(out.samples)
        dead.extend(out.dead_letters)
        ch = core.take_changes()
        for iid, rec in ch.records.items():
            if rec is None:
                store["records"].pop(iid, None)
            else:
                store["records"][iid] = (rec.impression, rec.status, rec.raw, list(rec.held), rec.clicked_at,
                                         rec.converted)
        for name in ("orphans", "conversions"):
            for iid, held in getattr(ch, name).items():
                if held is None:
                    store[name].pop(iid, None)
                else:
                    store[name][iid] = list(held)
        store["meta"] = ch.meta

    for i, (kind, rec) in enumerate(events):
        if restore_at is not None and i == restore_at:
            drain()
            core = JoinCore.restore(
                CFG, [ImpressionState(*r) for r in store["records"].values()],
                [h for held in store["orphans"].values() for h in held], store["meta"],
                conversions=[h for held in store["conversions"].values() for h in held],
            )
        if kind == "i":
            core.add_impression(rec)
        elif kind == "c":
            core.add_click(rec, offset=i)
        else:
            core.add_conversion(rec, offset=i)
    core.advance_watermark(math.inf)
    drain()
    return samples, dead, core


@settings(max_examples=2 * EXAMPLES, deadline=None)
@given(streams(on_time=True))
def test_on_time_streams_attribute_exactly_the_conversions_within_the_window(stream):
    imps, clicks, convs, events = stream
    samples, dead, core = _run(events)
    labels = expected_labels(imps, clicks, CFG)
    clicked_at = {c.impression_id: c.clicked_at for c in clicks}
    expected = set()
    for conv in convs:
        iid = conv.impression_id
        lab = labels.get(iid)
        if lab is not None and (lab[0] == 1 or lab[1]) and conv.converted_at <= clicked_at[iid] + 48 * HOUR:
            expected.add(iid)
    got = Counter(s.impression.impression_id for s in samples if s.conversion)
    assert set(got) == expected and all(v == 1 for v in got.values())
    reasons = Counter(d.reason for d in dead if isinstance(d.record, Conversion))
    assert set(reasons) <= {"conversion_after_window", "conversion_without_click", "orphan_conversion"}
    assert len(convs) == sum(got.values()) + sum(reasons.values()) + core.counters.get("duplicate_conversion", 0)
    assert core.awaiting_conversion == 0 and core.held_conversion_count == 0


@settings(max_examples=2 * EXAMPLES, deadline=None)
@given(streams(on_time=False))
def test_any_order_converts_only_clicked_impressions_after_their_click_sample(stream):
    _, _, convs, events = stream
    samples, dead, core = _run(events)
    seen_positive: set[str] = set()
    converted: Counter = Counter()
    for s in samples:
        iid = s.impression.impression_id
        if s.conversion:
            assert iid in seen_positive  # the click's sample always goes first
            converted[iid] += 1
            assert s.sample_id == sample_id_for(iid, True, conversion=True)
        elif s.label:
            seen_positive.add(iid)
    assert all(v == 1 for v in converted.values())
    conv_dead = sum(1 for d in dead if isinstance(d.record, Conversion))
    assert len(convs) == sum(converted.values()) + conv_dead + core.counters.get("duplicate_conversion", 0)


@settings(max_examples=3 * EXAMPLES // 2, deadline=None)
@given(streams(on_time=False), st.data())
def test_restoring_mid_stream_changes_no_conversion(stream, data):
    *_, events = stream
    cut = data.draw(st.integers(0, len(events)))
    a = _run(events)
    b = _run(events, restore_at=cut)
    key = lambda s: (s.sample_id, s.label, s.label_time, s.conversion, s.value)  # noqa: E731
    assert sorted(map(key, a[0])) == sorted(map(key, b[0]))
    dkey = lambda d: (d.reason, repr(d.record), d.offset)  # noqa: E731
    assert sorted(map(dkey, a[1])) == sorted(map(dkey, b[1]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"conversion_window_s": -1}, "conversion_window_s must be >= 0 and finite, but -1 is given"),
        ({"max_conversion_records": 0}, "max_conversion_records must be > 0, but 0 is given"),
    ],
)
def test_conversion_config_errors_say_what_was_given(kwargs, message):
    with pytest.raises(ValueError, match=message):
        JoinConfig(**kwargs)
