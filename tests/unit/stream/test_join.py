"""Property tests of the pure join core: labels, idempotence, accounting, restore."""
from __future__ import annotations

import math
import random
from collections import Counter

import pytest
from hypothesis import given, settings, strategies as st

from em3.types import Click, Impression, sample_id_for
from stream.join import DONE, PENDING, JoinConfig, JoinCore, expected_labels

EXAMPLES = settings.default.max_examples  # the profile's: 100 in the full suite, 10 in the fast lane

BASE = 1_700_000_000.0
CFG = JoinConfig(window_s=10.0, allowed_lateness_s=5.0, max_correction_delay_s=20.0, idle_timeout_s=None)


def _imp(k: int, served: float) -> Impression:
    return Impression(f"imp{k}", f"r{k}", f"u{k % 3}", f"i{k % 5}", k % 4, BASE + served)


@st.composite
def streams(draw, on_time: bool):
    """A shuffled stream: impressions (some duplicated), clicks (some repeated, late,
    orphan). ``on_time`` keeps every record within the allowed lateness."""
    n = draw(st.integers(1, 25))
    imps = [_imp(k, draw(st.floats(0, 60, allow_nan=False))) for k in range(n)]
    clicks = []
    for imp in imps:
        for _ in range(draw(st.integers(0, 2))):
            delay = draw(st.floats(0, 45, allow_nan=False))
            clicks.append(Click(imp.impression_id, imp.user_id, imp.item_id, imp.served_at + delay))
    for j in range(draw(st.integers(0, 3))):  # orphans: their impression never arrives
        clicks.append(Click(f"ghost{j}", "u0", "i0", BASE + draw(st.floats(0, 60, allow_nan=False))))
    dups = [imp for imp in imps if draw(st.booleans()) and draw(st.booleans())]
    events = [("i", e) for e in imps + dups] + [("c", c) for c in clicks]
    seed = draw(st.integers(0, 2**32 - 1))
    rng = random.Random(seed)
    if on_time:
        # Arrival order = event time + a jitter below the allowed lateness.
        keyed = [(_time(e) + rng.uniform(0, CFG.allowed_lateness_s * 0.99), i) for i, e in enumerate(events)]
        events = [events[i] for _, i in sorted(keyed)]
    else:
        rng.shuffle(events)
    return imps, clicks, events


def _time(event) -> float:
    kind, rec = event
    return rec.served_at if kind == "i" else rec.clicked_at


def _run(events, config=CFG, restore_at: int | None = None):
    core = JoinCore(config)
    samples, dead, history = [], [], []
    store: dict = {"records": {}, "orphans": {}, "meta": {}}

    def drain():
        out = core.take_output()
        samples.extend(out.samples)
        dead.extend(out.dead_letters)
        history.extend(out.history)
        ch = core.take_changes()
        for iid, rec in ch.records.items():
            if rec is None:
                store["records"].pop(iid, None)
            else:
                store["records"][iid] = (rec.impression, rec.status, rec.raw, list(rec.held))
        for iid, held in ch.orphans.items():
            if held is None:
                store["orphans"].pop(iid, None)
            else:
                store["orphans"][iid] = list(held)
        store["meta"] = ch.meta

    for i, (kind, rec) in enumerate(events):
        records, _ = core.state()
        assert core.pending == sum(1 for r in records if r.status == "P")
        if restore_at is not None and i == restore_at:
            drain()
            from stream.join import ImpressionState

            core = JoinCore.restore(
                config,
                [ImpressionState(imp, st, raw, list(held)) for imp, st, raw, held in store["records"].values()],
                [h for held in store["orphans"].values() for h in held],
                store["meta"],
            )
        if kind == "i":
            core.add_impression(rec)
        else:
            core.add_click(rec, offset=i)
    core.advance_watermark(math.inf)
    drain()
    return samples, dead, history, core


@settings(max_examples=3 * EXAMPLES, deadline=None)
@given(streams(on_time=True))
def test_on_time_stream_gets_exactly_the_reference_labels(stream):
    imps, clicks, events = stream
    samples, dead, history, core = _run(events)
    expected = expected_labels(imps, clicks, CFG)
    first = {s.impression.impression_id: s for s in samples if not s.correction}
    corrections = Counter(s.impression.impression_id for s in samples if s.correction)
    assert len(first) == len([s for s in samples if not s.correction])  # one first label each
    assert {iid: (s.label, corrections[iid] > 0) for iid, s in first.items()} == expected
    assert all(v == 1 for v in corrections.values())
    assert {d.reason for d in dead} <= {"orphan_click", "click_after_max_delay"}
    horizon = CFG.window_s + CFG.max_correction_delay_s
    served = {imp.impression_id: imp.served_at for imp in imps}
    for d in dead:  # a ghost's click, or one past the horizon (its impression may be evicted already)
        iid = d.record.impression_id
        assert iid.startswith("ghost") or d.record.clicked_at > served[iid] + horizon
    assert len(history) == sum(s.label for s in samples)
    assert core.records == 0 and core.held_clicks == 0  # everything evicted at the end


@settings(max_examples=3 * EXAMPLES, deadline=None)
@given(streams(on_time=False))
def test_any_interleaving_gives_one_final_label_and_accounts_for_every_click(stream):
    imps, clicks, events = stream
    samples, dead, history, core = _run(events)
    ids = {imp.impression_id: imp for imp in imps}
    firsts = Counter(s.impression.impression_id for s in samples if not s.correction)
    late = Counter(d.record.impression_id for d in dead if d.reason == "late_impression")
    for iid in ids:
        # one label, or none because every copy came past its horizon (a copy arriving
        # after the labelled original was evicted is dead-lettered, never relabelled)
        assert firsts[iid] == 1 or (firsts[iid] == 0 and late[iid] >= 1), iid
    for s in samples:  # nothing invented: every sample is an input impression, ids are stable
        assert s.impression == ids[s.impression.impression_id]
        assert s.sample_id == sample_id_for(s.impression.impression_id, s.correction)
        if s.label == 0:
            assert s.label_time == s.impression.served_at + CFG.window_s
    by_id = {}
    for s in samples:
        by_id.setdefault(s.impression.impression_id, []).append(s)
    for iid, ss in by_id.items():
        corr = [s for s in ss if s.correction]
        assert len(corr) <= 1
        if corr:  # a correction only ever follows a negative
            assert [s.label for s in ss if not s.correction] == [0] and corr[0].label == 1
    positives = sum(1 for s in samples if s.label == 1 and not s.correction)
    click_dead = sum(1 for d in dead if isinstance(d.record, Click))
    corrections = sum(1 for s in samples if s.correction)
    assert len(clicks) == positives + corrections + click_dead + core.counters.get("duplicate_click", 0)
    assert len(history) == sum(s.label for s in samples)


@settings(max_examples=2 * EXAMPLES, deadline=None)
@given(streams(on_time=False), st.data())
def test_restoring_from_persisted_changes_mid_stream_changes_nothing(stream, data):
    _, _, events = stream
    cut = data.draw(st.integers(0, len(events)))
    a = _run(events)
    b = _run(events, restore_at=cut)
    key = lambda s: (s.sample_id, s.label, s.label_time)  # noqa: E731
    assert sorted(map(key, a[0])) == sorted(map(key, b[0]))
    dkey = lambda d: (d.reason, repr(d.record), d.offset)  # noqa: E731
    assert sorted(map(dkey, a[1])) == sorted(map(dkey, b[1]))


def test_click_after_window_waits_for_the_window_then_gives_negative_and_correction():
    core = JoinCore(CFG)
    imp = _imp(1, 0.0)
    core.add_impression(imp)
    core.add_click(Click(imp.impression_id, imp.user_id, imp.item_id, imp.served_at + 15))
    assert len(core.take_output()) == 0  # an in-window click may still arrive
    core.advance_watermark(imp.served_at + 10)
    out = core.take_output()
    assert [(s.label, s.correction) for s in out.samples] == [(0, False), (1, True)]
    assert out.history == [(imp.user_id, imp.item_id, imp.served_at + 15)]
    core.add_click(Click(imp.impression_id, imp.user_id, imp.item_id, imp.served_at + 16))
    assert len(core.take_output()) == 0 and core.counters["duplicate_click"] == 1


def test_click_past_max_delay_and_mismatched_click_are_dead_lettered():
    core = JoinCore(CFG)
    imp = _imp(1, 0.0)
    core.add_impression(imp)
    core.add_click(Click(imp.impression_id, imp.user_id, "other-item", imp.served_at + 1))
    core.add_click(Click(imp.impression_id, imp.user_id, imp.item_id, imp.served_at + 31))
    core.advance_watermark(imp.served_at + 10)
    out = core.take_output()
    assert [d.reason for d in out.dead_letters] == ["click_mismatch", "click_after_max_delay"]
    assert [(s.label, s.correction) for s in out.samples] == [(0, False)]


def test_orphan_click_waits_out_the_lateness_then_dead_letters():
    core = JoinCore(CFG)
    core.add_click(Click("nope", "u", "i", BASE + 10))
    core.add_impression(_imp(1, 14.0))  # impression time 14 -> but clicks input holds the watermark
    core.add_click(Click("x", "u", "i", BASE + 14.9))  # min(14, 14.9) - 5 = 9 < 10: still waiting
    assert core.take_output().dead_letters == [] and core.held_clicks == 2
    core.add_impression(_imp(2, 20.0))
    core.add_click(Click("y", "u", "i", BASE + 16))  # watermark 11 passes the first orphan
    dead = core.take_output().dead_letters
    assert [(d.reason, d.record.impression_id) for d in dead] == [("orphan_click", "nope")]


def test_duplicate_after_eviction_is_dead_lettered_not_relabelled():
    core = JoinCore(CFG)
    imp = _imp(1, 0.0)
    core.add_impression(imp)
    core.advance_watermark(imp.served_at + 100)
    core.add_impression(imp)
    out = core.take_output()
    assert [s.label for s in out.samples] == [0]
    assert [d.reason for d in out.dead_letters] == ["late_impression"]


def test_idle_inputs_let_processing_time_close_windows():
    cfg = JoinConfig(window_s=10, allowed_lateness_s=5, max_correction_delay_s=20, idle_timeout_s=1.0,
                     idle_advance_rate=10.0)
    core = JoinCore(cfg, now=0.0)
    imp = _imp(1, 0.0)
    core.add_impression(imp, now=0.0)
    core.tick(0.5)
    assert core.take_output().samples == []
    core.tick(1.0)  # clicks never came, impressions idle too: both idle -> start advancing
    core.tick(3.0)  # 2 s idle x 10 = 20 event seconds past (served - lateness)
    out = core.take_output()
    assert [(s.label, s.impression.impression_id) for s in out.samples] == [(0, "imp1")]
    core.add_impression(_imp(2, 1.0), now=3.1)  # new data stops the idle advance
    assert core._idle_since is None


def test_a_busy_input_is_never_idle():
    cfg = JoinConfig(window_s=10, allowed_lateness_s=5, max_correction_delay_s=20, idle_timeout_s=1.0,
                     idle_advance_rate=10.0)
    core = JoinCore(cfg, now=0.0)
    core.add_impression(_imp(1, 0.0), now=0.0)
    for t in (1.0, 5.0, 50.0):  # a backlog on the clicks input: it holds the watermark
        core.tick(t, clicks_busy=True)
    assert core.take_output().samples == [] and core.watermark == -math.inf
    core.tick(51.5)  # caught up and quiet for 1.5 s: now both inputs are idle
    core.tick(53.0)
    assert [s.label for s in core.take_output().samples] == [0]


def test_only_click_input_idle_lets_impressions_drive_the_watermark():
    cfg = JoinConfig(window_s=10, allowed_lateness_s=5, max_correction_delay_s=20, idle_timeout_s=1.0)
    core = JoinCore(cfg, now=0.0)
    core.add_impression(_imp(1, 0.0), now=0.0)
    core.add_impression(_imp(2, 30.0), now=2.0)
    assert core.take_output().samples == []  # clicks input holds the watermark at -inf
    core.tick(2.0)  # clicks idle for 2 s, impressions not: watermark = 30 - 5 = 25
    assert [s.impression.impression_id for s in core.take_output().samples] == ["imp1"]


def test_state_records_statuses():
    core = JoinCore(JoinConfig(**{**CFG.__dict__, "positive_timing": "click"}))
    imp = _imp(1, 0.0)
    core.add_impression(imp, raw=b"{}")
    core.add_click(Click(imp.impression_id, imp.user_id, imp.item_id, imp.served_at + 1))
    ch = core.take_changes()
    assert ch.records[imp.impression_id].status == DONE and ch.records[imp.impression_id].raw == b"{}"
    core.advance_watermark(math.inf)
    assert core.take_changes().records == {}  # evictions follow from the watermark


def test_a_click_in_the_window_goes_out_when_the_window_closes_with_the_negatives_beside_it():
    core = JoinCore(CFG)  # positive_timing="window_close", the default
    clicked, shown = _imp(1, 0.0), _imp(2, 0.0)
    for imp in (clicked, shown):
        core.add_impression(imp, raw=b"{}")
    core.add_click(Click(clicked.impression_id, clicked.user_id, clicked.item_id, clicked.served_at + 1))
    core.add_click(Click(clicked.impression_id, clicked.user_id, clicked.item_id, clicked.served_at + 2))  # a repeat
    core.advance_watermark(clicked.served_at + 5)  # the window (10 s) is still open
    early = core.take_output()
    assert early.samples == []
    assert early.history == [(clicked.user_id, clicked.item_id, clicked.served_at + 1)]  # serving sees it now
    record = core.take_changes().records[clicked.impression_id]
    assert record.status == PENDING and len(record.held) == 1  # the first, restart-safe, until the window closes
    assert core.counters["duplicate_click"] == 1  # the repeat is counted at once, not kept
    core.advance_watermark(clicked.served_at + 10)
    closed = core.take_output()
    out = closed.samples
    assert [(s.impression.impression_id, s.label, s.correction) for s in out] == [
        (clicked.impression_id, 1, False), (shown.impression_id, 0, False)]
    assert out[0].label_time == clicked.served_at + 1  # the first click
    assert closed.history == []  # the history took the click once, when it came
    assert core.counters["duplicate_click"] == 1 and core.pending == 0


def test_a_flood_of_clicks_on_one_impression_holds_one_click_the_earliest():
    core = JoinCore(CFG)
    imp = _imp(1, 0.0)
    core.add_impression(imp)
    for k in range(1000):
        core.add_click(Click(imp.impression_id, imp.user_id, imp.item_id, imp.served_at + 5 - k / 1000))
    record = core.take_changes().records[imp.impression_id]
    assert len(record.held) == 1 and record.held[0][0].clicked_at == imp.served_at + 5 - 999 / 1000
    assert core.counters["duplicate_click"] == 999
    core.advance_watermark(imp.served_at + 10)
    out = core.take_output()
    assert [(s.label, s.label_time) for s in out.samples] == [(1, imp.served_at + 5 - 999 / 1000)]
    assert out.history == [(imp.user_id, imp.item_id, imp.served_at + 5)]  # once, the first to arrive


def test_a_flood_of_late_clicks_while_the_window_is_open_holds_one_the_earliest():
    core = JoinCore(CFG)  # window 10 s, corrections up to 20 s after it
    imp = _imp(1, 0.0)
    core.add_impression(imp)
    for k in range(1000):  # after the window, arriving before it closes
        core.add_click(Click(imp.impression_id, imp.user_id, imp.item_id, imp.served_at + 15 - k / 1000))
    core.add_click(Click(imp.impression_id, imp.user_id, imp.item_id, imp.served_at + 31))  # past the horizon
    record = core.take_changes().records[imp.impression_id]
    assert [c.clicked_at for c, _ in record.held] == [imp.served_at + 15 - 999 / 1000]
    assert core.counters["duplicate_click"] == 999
    out = core.take_output()
    assert [d.reason for d in out.dead_letters] == ["click_after_max_delay"]  # at once, not held
    core.advance_watermark(imp.served_at + 20)
    out = core.take_output()
    assert [(s.label, s.correction, s.label_time) for s in out.samples] == [
        (0, False, imp.served_at + 10), (1, True, imp.served_at + 15 - 999 / 1000)]


def test_a_conversion_before_the_window_closes_waits_for_its_clicks_positive():
    from em3.types import Conversion

    core = JoinCore(JoinConfig(**{**CFG.__dict__, "conversion_window_s": 3600.0}))
    imp = _imp(1, 0.0)
    core.add_impression(imp)
    core.add_click(Click(imp.impression_id, imp.user_id, imp.item_id, imp.served_at + 1))
    core.add_conversion(Conversion(imp.impression_id, imp.user_id, imp.item_id, imp.served_at + 3, value=2.0))
    core.advance_watermark(imp.served_at + 6)  # past the conversion time, before the window closes
    assert core.take_output().dead_letters == []
    core.advance_watermark(imp.served_at + 10)
    out = core.take_output()
    assert [(s.label, s.conversion, s.value) for s in out.samples] == [(1, 0, 0.0), (1, 1, 2.0)]
    assert out.dead_letters == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"window_s": -3}, "window_s must be > 0 and finite, but -3 is given"),
        ({"window_s": float("inf")}, "window_s must be > 0 and finite, but inf is given"),
        ({"allowed_lateness_s": -1}, "allowed_lateness_s must be >= 0 and finite, but -1 is given"),
        ({"max_correction_delay_s": -2}, "max_correction_delay_s must be >= 0 and finite, but -2 is given"),
        ({"idle_timeout_s": 0}, "idle_timeout_s must be > 0 or None, but 0 is given"),
        ({"idle_advance_rate": True}, "idle_advance_rate must be a number > 0, but True is given"),
        ({"idle_advance_rate": 0}, "idle_advance_rate must be > 0, but 0 is given"),
    ],
)
def test_config_errors_say_what_was_given(kwargs, message):
    with pytest.raises(ValueError, match=message):
        JoinConfig(**kwargs)
