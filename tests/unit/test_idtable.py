"""The pure id -> row map: admission, eviction, tombstones, bounded memory."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from em3.idtable import CountMinSketch, IdTable, fingerprint


def _table(**kw) -> IdTable:
    return IdTable(**{"rows": 12, "fallback": 4, "salt": "item", "admit_after": 2, **kw})


def test_admission_after_n_impressions_and_fallback_before():
    t = _table(admit_after=3)
    for step in range(2):
        u = t.observe(["a"], now=10 + step)
        assert not u.changed and not t.owns(["a"])[0]
        assert t.rows(["a"])[0] < t.fallback
    u = t.observe(["a"], now=12)
    assert t.owns(["a"])[0] and t.rows(["a"])[0] == u.admitted[0] >= t.fallback
    assert u.admitted_from.tolist() == IdTable(**t.settings()).rows(["a"]).tolist()  # the row it used before


def test_repeats_within_one_batch_count():
    t = _table(admit_after=2)
    u = t.observe(["a", "a", "b"], now=5)
    assert t.owns(["a", "b"]).tolist() == [True, False] and len(u.admitted) == 1


def _est(t: IdTable, key: str) -> int:
    return int(t.sketch.estimate(np.array([fingerprint(key, t.salt)], dtype=np.int64))[0])


def test_lru_eviction_beyond_capacity_frees_the_least_recent_row():
    t = _table(rows=6, fallback=2, admit_after=1, sketch_width=1 << 10)  # 4 own rows; a wide sketch: exact counts
    for n, key in enumerate("abcd"):
        t.observe([key], now=n)
    t.observe(["a"], now=10)  # a came back (protected); b is the least recently seen probationary row
    u = t.observe(["e", "e"], now=11)  # e (2 impressions) out-counts b (1)
    assert t.owns(list("abcde")).tolist() == [True, False, True, True, True]
    assert u.evicted.tolist() == u.admitted.tolist()  # b's row, reused by e
    assert t.rows(["b"])[0] < t.fallback  # b is served by its fallback row, never by e's


def test_slru_evicts_probationary_rows_before_ids_that_came_back():
    t = _table(rows=6, fallback=2, admit_after=1, sketch_width=1 << 10)  # 4 own rows
    t.observe(["hot"], now=0)
    t.observe(["hot"], now=1)  # came back after admission: protected (2 impressions)
    for n, key in enumerate("abc"):
        t.observe([key], now=2 + n)  # seen once each: probationary, all more recent than hot
    t.observe(["d", "d", "e", "e"], now=10)  # two rows needed: the two oldest probationary rows go
    assert t.owns(["hot", "a", "b", "c", "d", "e"]).tolist() == [True, False, False, True, True, True]
    t.observe(["f", "g", "h"] * 3, now=11)  # c, d, e are probationary: hot, the least recent, stays
    assert t.owns(["hot", "c", "d", "e", "f", "g", "h"]).tolist() == [True] + [False] * 3 + [True] * 3
    t.observe(["f"], now=12)  # f protected too; g, h probationary
    t.observe(["i", "j", "k"] * 4, now=13)  # 2 probationary rows, then the least recent protected one: hot
    assert t.owns(["hot", "f", "i", "j", "k"]).tolist() == [False, True, True, True, True]


def test_at_most_four_fifths_of_the_rows_are_protected_the_oldest_demoted():
    t = _table(rows=14, fallback=4, admit_after=1, sketch_width=1 << 10)  # 10 own rows: at most 8 protected
    keys = [f"k{n}" for n in range(10)]
    for n, key in enumerate(keys):
        t.observe([key], now=n)  # admitted, probationary
    for n, key in enumerate(keys):
        t.observe([key], now=20 + n)  # each came back: protected, k0 the least recently seen
    protected = t.hits[t.rows(keys) - t.fallback] > 0
    assert protected.tolist() == [False, False] + [True] * 8  # k0 and k1 demoted to probation
    t.observe(["new"] * 3, now=40)  # a candidate that out-counts k0 (3 > 2) takes the oldest probationary row
    assert t.owns(["new", "k0", "k1"]).tolist() == [True, False, True]


def test_sketch_halves_after_eighty_times_capacity_counted_impressions():
    t = _table(admit_after=1)  # 8 own rows: the sketch halves after 640 counted impressions
    t.observe(["a"] * 320, now=1)  # a takes a row in this batch, and its impressions still count
    t.observe(["a"] * 319, now=2)
    assert t.sketch.width == 32 and t.sketch.additions == 639 and _est(t, "a") == 639  # 4 x 8 counters a row
    t.observe(["a"], now=3)
    # Counters halved (639 -> 319) and the doorkeeper, which held a's first impression, cleared.
    assert t.sketch.additions == 320 and _est(t, "a") == 319
    assert t.sketch_sample_size == t.sketch.sample_size == 640


def test_ids_seen_once_stay_in_the_doorkeeper_and_out_of_the_counters():
    t = _table(admit_after=2)
    t.observe([f"once{i}" for i in range(50)] + ["twice", "twice"], now=1)
    assert int(t.sketch.table.max()) == 1  # only twice's second impression reached a counter
    assert [_est(t, k) for k in ("once0", "once49", "twice")] == [1, 1, 2]
    assert t.owns(["twice", "once0"]).tolist() == [True, False]
    assert t.sketch.door.nbytes == 8 * t.sketch_sample_size // 8  # 8 bits per impression of the sample


def test_doorkeeper_off_counts_every_impression_in_the_counters():
    s = CountMinSketch(width=1 << 10, depth=4)
    s.add(np.arange(50, dtype=np.int64))
    assert s.door.nbytes == 0 and int(s.table.max()) == 1 and s.in_doorkeeper(np.arange(3)).tolist() == [False] * 3


def test_admitted_ids_are_counted():
    t = _table(admit_after=2, sketch_width=1 << 10)
    t.observe(["a", "a"], now=1)
    assert t.owns(["a"])[0]
    for n in range(5):
        t.observe(["a"], now=2 + n)
    assert _est(t, "a") == 7


def test_a_full_table_admits_only_a_candidate_that_out_counts_the_victim():
    t = _table(rows=4, fallback=2, admit_after=2, sketch_width=1 << 10)  # 2 own rows
    t.observe(["b", "b"], now=1)
    t.observe(["a", "a", "a"], now=2)  # full: b (2 impressions) is the victim, least recently seen
    u = t.observe(["c", "c"], now=3)  # c ties b: refused, b keeps its row
    assert not u.changed and t.owns(["a", "b", "c"]).tolist() == [True, True, False]
    assert t.rows(["c"])[0] < t.fallback
    row_b = t.rows(["b"])[0]
    u = t.observe(["c"], now=4)  # 3 > 2: c takes b's row
    assert t.owns(["a", "b", "c"]).tolist() == [True, False, True]
    assert u.admitted.tolist() == u.evicted.tolist() == [row_b] and t.rows(["c"])[0] == row_b
    assert u.prior_impressions.tolist() == [2]  # its impressions before this batch


def test_candidates_of_one_batch_meet_victims_strongest_first():
    t = _table(rows=4, fallback=2, admit_after=2, sketch_width=1 << 10)  # 2 own rows
    t.observe(["x", "x"], now=1)
    t.observe(["y"] * 5, now=2)  # eviction order: x (2), then y (5)
    t.observe(["p"] * 3 + ["q"] * 5, now=3)  # q (5) meets x and wins; p (3) meets y and loses
    assert t.owns(["x", "y", "p", "q"]).tolist() == [False, True, False, True]


def test_a_warm_candidate_that_loses_is_admitted_once_in_128_duels():
    from em3.idtable import ADMIT_WARM, _jitter

    def duel(candidate: str, impressions: int, now: int) -> bool:
        t = _table(rows=10, fallback=2, admit_after=2, sketch_width=1 << 10)  # 8 own rows, halving at 80
        t.observe([f"v{k}" for k in range(8) for _ in range(9)], now=now - 1)  # full, 9 impressions each
        t.observe([candidate] * impressions, now=now)
        return bool(t.owns([candidate])[0])

    lucky = [n for n in range(2000) if _jitter(np.array([fingerprint(f"c{n}", "item")]), 1000)[0]]
    assert 5 <= len(lucky) <= 40  # about 2000 / 128
    assert duel(f"c{lucky[0]}", ADMIT_WARM, 1000)  # loses 6 to 9, admitted by the jitter
    assert not duel(f"c{lucky[0]}", ADMIT_WARM - 1, 1000)  # a cold candidate never is
    unlucky = next(n for n in range(2000) if n not in lucky)
    assert not duel(f"c{unlucky}", ADMIT_WARM, 1000)


def test_rows_touched_in_the_batch_are_not_evicted():
    t = _table(rows=4, fallback=2, admit_after=1)  # 2 own rows
    u = t.observe(["a", "b", "c"], now=1)
    assert len(u.admitted) == 2 and len(u.evicted) == 0 and len(t) == 2


def test_expiry_frees_rows_unseen_for_t():
    t = _table(admit_after=1, expiry_s=100)
    t.observe(["a", "b"], now=1000)
    t.observe(["b"], now=1080)
    u = t.observe(["c"], now=1150)  # a was last seen 150 s ago, b 70 s ago
    assert t.owns(["a", "b", "c"]).tolist() == [False, True, True]
    assert len(u.evicted) == 1 and t.keys[u.evicted[0] - t.fallback] != 0  # its row went to c (lowest free)


def test_remove_frees_own_rows_only():
    t = _table(admit_after=1)
    t.observe(["a"], now=1)
    row = t.rows(["a"])[0]
    assert t.remove(["a", "never"]).tolist() == [row]
    assert not t.owns(["a"])[0] and t.keys[row - t.fallback] == 0 and len(t) == 0


def test_arrays_round_trip_and_duplicate_owner_refused():
    t = _table(admit_after=1)
    t.observe(["a", "b", "c"], now=7)
    keys, seen, hits = t.to_arrays()
    back = IdTable.from_arrays(keys, seen, hits, **t.settings())
    assert back.rows(list("abcz")).tolist() == t.rows(list("abcz")).tolist()
    bad = keys.copy()
    bad[bad == 0] = fingerprint("a", "item")
    with pytest.raises(ValueError, match="two rows"):
        IdTable.from_arrays(bad, seen, hits, **t.settings())
    with pytest.raises(ValueError, match="fallback"):
        IdTable(rows=4, fallback=4, salt="x")


def test_sketch_conservative_and_aging():
    s = CountMinSketch(width=8, depth=2)
    s.add(np.arange(4, dtype=np.int64))
    assert s.additions == 4
    s.add(np.arange(4, 8, dtype=np.int64))  # 8 additions: every counter halves
    assert s.additions == 4 and s.table.max() <= 2
    s = CountMinSketch(width=8, depth=2, sample_size=20)  # halving apart from the width
    s.add(np.zeros(19, dtype=np.int64))
    assert s.estimate(np.zeros(1, dtype=np.int64)).tolist() == [19]
    s.add(np.zeros(1, dtype=np.int64))
    assert s.estimate(np.zeros(1, dtype=np.int64)).tolist() == [10] and s.additions == 10


# ---------------------------------------------------------------- properties
ops = st.lists(st.tuples(st.sampled_from(["observe", "remove"]),
                         st.lists(st.integers(0, 30).map(lambda i: f"id{i}"), min_size=1, max_size=6),
                         st.integers(0, 50)), min_size=1, max_size=60)


@settings(max_examples=150, deadline=None)
@given(ops, st.integers(1, 3), st.sampled_from([0.0, 20.0]))
def test_property_a_row_never_serves_an_id_that_does_not_own_it(steps, admit_after, expiry):
    """After any mix of impressions, expiries, LRU evictions and removals, each ID's row is
    either a fallback row or an own row whose key is that ID's, and no own row is shared;
    a reader rebuilt from the arrays (a server) agrees row for row."""
    t = IdTable(rows=10, fallback=3, salt="item", admit_after=admit_after, expiry_s=expiry)
    seen: set[str] = set()
    now = 0
    for op, ids, dt in steps:
        now += dt
        if op == "observe":
            u = t.observe(ids, now)
            assert set(u.admitted.tolist()) <= set(range(t.fallback, t.rows_total))
            seen.update(ids)
        else:
            t.remove(ids)
        ids_all = sorted(seen)
        rows = t.rows(ids_all)
        own = rows >= t.fallback
        for key, row in zip(ids_all, rows.tolist()):
            if row >= t.fallback:
                assert t.keys[row - t.fallback] == fingerprint(key, "item")
        assert len(set(rows[own].tolist())) == int(own.sum())  # no own row shared
        assert len(t) == int((t.keys != 0).sum()) <= t.capacity
        server = IdTable.from_arrays(*t.to_arrays(), **t.settings())
        assert server.rows(ids_all).tolist() == rows.tolist()


def test_memory_is_bounded_under_an_unbounded_stream_of_new_ids():
    t = IdTable(rows=1 << 10, fallback=1 << 6, salt="item", admit_after=2, sketch_width=1 << 12)
    sizes = []
    rng = np.random.default_rng(0)
    hot = [f"hot{i}" for i in range(50)]
    for batch in range(200):
        fresh = [f"new{batch}-{i}" for i in range(500)]  # 100,000 distinct one-off IDs
        t.observe(fresh + list(rng.choice(hot, 100)), now=batch)
        sizes.append(t.nbytes)
    cap = t.keys.nbytes + t.last_seen.nbytes + t.hits.nbytes + 100 * t.capacity + t.new_sketch().nbytes
    assert max(sizes) <= cap and len(t) <= t.capacity
    assert t.owns(hot).all()  # the hot IDs kept their rows through the flood
