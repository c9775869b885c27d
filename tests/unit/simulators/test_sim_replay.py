"""Log replay: event-time order, delays kept, pacing, resume, malformed rows, adapters."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from em3.types import Click, Impression
from simulators.delays import ExponentialDelay, make_delay
from simulators.replay import LogReplayer, LogRow, Malformed, ReplayConfig, event_time
from simulators.replay_sources import file_rows, obd_rows, record_to_row, row_to_record

EXAMPLES = settings.default.max_examples  # the profile's: 100 in the full suite, 10 in the fast lane

T0 = 1_700_000_000.0


def _rows(n: int = 500, seed: int = 0) -> list[LogRow]:
    """Rows in shuffled time order; about a third clicked, with delays up to an hour."""
    rng = np.random.default_rng(seed)
    times = T0 + np.sort(rng.uniform(0, 3600, size=n))
    rows = []
    for i in rng.permutation(n):
        imp = Impression(f"imp-{i}", f"req-{i}", f"u{i % 7}", f"item{i % 13}", int(i % 3), float(times[i]))
        delay = float(rng.exponential(600)) if rng.random() < 0.35 else None
        rows.append(LogRow(imp, delay))
    return rows


def test_events_in_time_order_and_delays_kept():
    rows = _rows()
    replayer = LogReplayer()
    events = list(replayer.run(rows))
    times = [event_time(e) for e in events]
    assert all(a <= b for a, b in zip(times, times[1:]))
    served = {}
    n_clicks = 0
    for e in events:
        if isinstance(e, Impression):
            served[e.impression_id] = e.served_at
        else:
            n_clicks += 1
            assert e.impression_id in served  # the impression came first
    delays = {r.impression.impression_id: r.click_delay_s for r in rows if r.click_delay_s is not None}
    for e in events:
        if isinstance(e, Click):
            assert e.clicked_at - served[e.impression_id] == pytest.approx(delays[e.impression_id], abs=1e-6)
    stats = replayer.stats
    assert stats.impressions == len(rows) and stats.clicks == n_clicks == len(delays)
    assert stats.events == len(events) and stats.position == len(events)
    assert stats.malformed_total == 0


def test_zero_delay_click_follows_its_impression():
    imp = Impression("a", "r", "u", "i", 0, T0)
    later = Impression("b", "r2", "u", "j", 0, T0)
    events = list(LogReplayer().run([LogRow(imp, 0.0), LogRow(later)]))
    # A click due at the same instant as a later impression comes first; never before its own.
    assert [(type(e).__name__, e.impression_id) for e in events] == [
        ("Impression", "a"), ("Click", "a"), ("Impression", "b")]


def test_malformed_rows_are_counted_not_fatal():
    good = _rows(20)
    bad = [
        Malformed("bad_json", "x", 3),
        LogRow(Impression("x1", "r", "", "i", 0, T0)),  # empty user id
        LogRow(Impression("x2", "r", "u", "i", 0, math.nan)),
        LogRow(Impression("x3", "r", "u", "i", 0, 12.0)),  # 1970: absurd
        LogRow(Impression("x4", "r", "u", "i", 0, T0), click_delay_s=-5.0),
        LogRow(Impression("x5", "r", "u", "i", -1, T0)),
        LogRow(Impression("x6", "r", "u", "i", 0, T0, propensity=0.0)),
        "not a row",
    ]
    replayer = LogReplayer()
    events = list(replayer.run(good[:10] + bad + good[10:]))
    s = replayer.stats
    assert s.malformed == {"bad_json": 1, "missing_field": 1, "absurd_timestamp": 2, "bad_delay": 1,
                           "bad_value": 2, "not_a_row": 1}
    assert s.rows == 28 and s.impressions == 20
    assert len(events) == s.events


def test_presorted_stream_counts_out_of_order_rows():
    rows = sorted(_rows(50), key=lambda r: r.impression.served_at)
    rows.insert(30, LogRow(Impression("late", "r", "u", "i", 0, T0 - 10)))
    replayer = LogReplayer(ReplayConfig(presorted=True))
    events = list(replayer.run(iter(rows)))
    assert replayer.stats.malformed == {"out_of_order": 1}
    assert all(e.impression_id != "late" for e in events)


def test_resume_continues_exactly_where_it_stopped():
    rows = _rows(300, seed=4)
    full = list(LogReplayer().run(rows))
    first = LogReplayer(ReplayConfig(max_events=123))
    head = list(first.run(rows))
    assert first.stats.position == 123
    second = LogReplayer(ReplayConfig(start_at=first.stats.position))
    tail = list(second.run(rows))
    assert head + tail == full
    assert second.stats.skipped == 123 and second.stats.position == len(full)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept = 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s
        self.slept += s


@pytest.mark.parametrize("speed", [1.0, 100.0])
def test_speed_factor_maps_event_time_to_wall_time(speed):
    rows = _rows(200, seed=1)
    fake = FakeClock()
    replayer = LogReplayer(ReplayConfig(speed=speed), clock=fake.clock, sleep=fake.sleep)
    walls, times = [], []
    for e in replayer.run(rows):
        walls.append(fake.now)
        times.append(event_time(e))
    span = times[-1] - times[0]
    assert fake.now == pytest.approx(span / speed, rel=1e-6)
    for w, t in zip(walls, times):  # every event at its scaled event time (within the 0.5 ms slack)
        assert w == pytest.approx((t - times[0]) / speed, abs=1e-3)


def test_as_fast_as_possible_never_sleeps_and_rate_limit_paces():
    rows = _rows(100, seed=2)
    fake = FakeClock()
    list(LogReplayer(ReplayConfig(speed=0.0), clock=fake.clock, sleep=fake.sleep).run(rows))
    assert fake.slept == 0.0
    fake = FakeClock()
    replayer = LogReplayer(ReplayConfig(speed=0.0, max_events_per_s=50.0), clock=fake.clock, sleep=fake.sleep)
    n = len(list(replayer.run(rows)))
    assert fake.now == pytest.approx((n - 1) / 50.0, rel=1e-6)


def test_progress_callback_sees_counts():
    seen = []
    replayer = LogReplayer(ReplayConfig(progress_every=100), on_progress=lambda s: seen.append(s.events))
    n = len(list(replayer.run(_rows(250))))
    assert seen[:2] == [100, 200] and seen[-1] == n


def test_bad_config():
    with pytest.raises(ValueError, match="speed must be >= 0"):
        ReplayConfig(speed=-3)
    with pytest.raises(ValueError, match="max_events_per_s must be > 0 or None, but -3 is given"):
        ReplayConfig(max_events_per_s=-3)
    with pytest.raises(ValueError, match="start_at must be >= 0"):
        ReplayConfig(start_at=-1)


# --- adapters -----------------------------------------------------------------------


def test_obd_rows_same_seed_same_delays():
    a = [r.click_delay_s for r in obd_rows("men", "random", seed=3) if r.click_delay_s is not None]
    b = [r.click_delay_s for r in obd_rows("men", "random", seed=3) if r.click_delay_s is not None]
    c = [r.click_delay_s for r in obd_rows("men", "random", seed=4) if r.click_delay_s is not None]
    assert a == b and a != c and len(a) > 0


def test_obd_replay_counts():
    from simulators.obd import load_obd

    log = load_obd("all", "random")
    replayer = LogReplayer()
    events = list(replayer.run(obd_rows("all", "random", click_delay=ExponentialDelay(30.0))))
    assert replayer.stats.impressions == log.n_rounds
    assert replayer.stats.clicks == int(log.reward.sum())
    assert len(events) == log.n_rounds + int(log.reward.sum())
    first = events[0]
    assert isinstance(first, Impression) and first.propensity == pytest.approx(1 / 80) and first.arm == "random"


def _write(path, fmt, records):
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif fmt == "csv":
        import csv

        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(records[0]))
            w.writeheader()
            w.writerows(records)
    else:
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_file_round_trip_gives_the_same_events(tmp_path, fmt):
    rows = [r for _, r in zip(range(400), obd_rows("women", "bts", seed=1))]
    records = [row_to_record(r) for r in rows]
    path = tmp_path / f"log.{fmt}"
    _write(path, fmt, records)
    expected = list(LogReplayer().run(rows))
    replayer = LogReplayer()
    got = list(replayer.run(file_rows(path)))
    assert replayer.stats.malformed_total == 0
    assert got == expected


def test_jsonl_malformed_lines_counted(tmp_path):
    lines = [
        json.dumps({"user_id": "u1", "item_id": 5, "served_at": T0, "clicked": 1, "click_delay_s": 4}),
        "{not json",
        json.dumps({"item_id": "i", "served_at": T0}),  # no user
        json.dumps({"user_id": "u", "item_id": "i", "served_at": "yesterday"}),
        json.dumps([1, 2]),
        json.dumps({"user_id": "u2", "item_id": "i2", "served_at": "2023-11-14T22:13:30+00:00",
                    "clicked_at": "2023-11-14T22:14:00+00:00", "ctx_device": "ios"}),
        json.dumps({"user_id": "u3", "item_id": "i3", "served_at": T0 + 1, "clicked": "maybe"}),
    ]
    path = tmp_path / "log.jsonl"
    path.write_text("\n".join(lines) + "\n")
    replayer = LogReplayer()
    events = list(replayer.run(file_rows(path)))
    assert replayer.stats.malformed == {"bad_json": 1, "missing_field": 1, "bad_value": 2, "not_an_object": 1}
    clicks = [e for e in events if isinstance(e, Click)]
    assert len(clicks) == 2
    iso = next(e for e in events if isinstance(e, Impression) and e.user_id == "u2")
    assert iso.context == {"device": "ios"} and iso.item_id == "i2"
    assert next(c for c in clicks if c.user_id == "u2").clicked_at - iso.served_at == pytest.approx(30.0)
    assert next(e for e in events if isinstance(e, Impression) and e.user_id == "u1").item_id == "5"


def test_csv_clicked_without_time_uses_default_delay(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id,served_at,clicked\nu,i,1700000000,1\nu,j,1700000001,0\nu,k,1700000002,\n")
    events = list(LogReplayer().run(file_rows(path, default_delay=make_delay("fixed:7"))))
    clicks = [e for e in events if isinstance(e, Click)]
    assert len(clicks) == 1 and clicks[0].clicked_at == pytest.approx(T0 + 7)


def test_record_to_row_rejects_naive_iso_times():
    row = record_to_row({"user_id": "u", "item_id": "i", "served_at": "2023-11-14T22:13:30"}, 1)
    assert isinstance(row, Malformed) and row.reason == "bad_value" and "time zone" in row.detail


def test_unknown_format():
    with pytest.raises(ValueError, match="cannot tell the format"):
        list(file_rows("log.xlsx"))


def test_movielens_rows_are_shifted_into_plausible_times():
    from simulators.replay_sources import movielens_rows

    rows = list(movielens_rows(max_events=2000, click_delay=ExponentialDelay(10.0), seed=1))
    assert len(rows) == 2000
    assert rows[0].impression.served_at == 1_704_067_200.0
    replayer = LogReplayer()
    events = list(replayer.run(rows))
    assert replayer.stats.malformed_total == 0
    assert replayer.stats.clicks == sum(r.click_delay_s is not None for r in rows) > 0
    times = [event_time(e) for e in events]
    assert all(a <= b for a, b in zip(times, times[1:]))


@settings(max_examples=3 * EXAMPLES // 5, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1e5), st.one_of(st.none(), st.floats(0, 1e4))), max_size=60))
def test_replay_order_property(spec):
    rows = [LogRow(Impression(f"i{k}", "r", f"u{k % 3}", "x", 0, T0 + t), d) for k, (t, d) in enumerate(spec)]
    events = list(LogReplayer().run(rows))
    times = [event_time(e) for e in events]
    assert times == sorted(times)
    assert len(events) == len(rows) + sum(d is not None for _, d in spec)
    position = {}
    for n, e in enumerate(events):
        if isinstance(e, Impression):
            position[e.impression_id] = n
        else:
            assert position[e.impression_id] < n
    # Streaming (presorted) and in-memory sorting give the same stream for sorted input.
    in_order = sorted(rows, key=lambda r: r.impression.served_at)
    assert list(LogReplayer(ReplayConfig(presorted=True)).run(in_order)) == list(LogReplayer().run(in_order))
