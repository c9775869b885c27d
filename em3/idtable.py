"""Bounded, collision-aware ID tables: the id -> row map, admission, eviction, tombstones.

Pure: numpy only, no torch, no I/O. A table of ``rows`` rows has two regions::

    [0, fallback)       hashed fallback rows: an ID not (yet) admitted shares one by hash,
                        so the tail behaves as the hashed tables always did
    [fallback, rows)    own rows: each holds at most one ID (``capacity = rows - fallback``)

An ID is known by its 64-bit fingerprint (BLAKE2b of ``"<salt>|<id>"``, never 0); the
raw ID is never stored. ``keys[slot]`` holds the fingerprint that owns row
``fallback + slot``, 0 when the row is free (a tombstone: the row belongs to nobody and
is reset before it is given out again); ``last_seen[slot]`` the event time (whole
seconds) at which its owner was last trained on; ``hits[slot]`` in how many later
batches its owner came back after it took the row. These three int64 arrays *are* the map:
snapshots carry them as tensors (safetensors, full or delta, no pickle), and a reader
rebuilds the index from them (:meth:`IdTable.from_arrays`), so a row serves the ID its
``keys`` entry names and no other, whatever that row served before.

Admission is TinyLFU (Einziger, Friedman, Manes, ACM ToS 2017; Caffeine's
``FrequencySketch`` and ``BoundedLocalCache.admit``) behind Monolith's frequency filter.
Every trained-on impression of the table, admitted IDs included, is counted in a
count-min sketch (:class:`CountMinSketch`: conservative update; width ``4 x`` the power
of two >= capacity, Caffeine's number of counters, :func:`sketch_width_for`) behind
TinyLFU's *doorkeeper*, a Bloom filter that takes an ID's first impression, so that the
flood of IDs seen once never reaches the counters (the estimate is the counters plus the
doorkeeper's bit). All counters are halved, and the doorkeeper cleared, after
``W = 80 x capacity`` impressions (:data:`SAMPLE_PER_ROW`), so old counts fade and
memory is fixed whatever the stream. An ID whose
estimate reaches ``admit_after`` is a candidate: it takes a free own row if there is
one. With none free, the segmented-LRU (SLRU, memcached, Caffeine's main region)
victim is chosen: the least recently seen *probationary* row (its owner never came back
after admission, ``hits == 0``) first, a *protected* one only when no probationary row is
left, never a row seen in this batch (at most :data:`PROTECTED_SHARE` of the rows are
protected: beyond it the least recently seen protected rows are demoted, as in Caffeine); the candidate takes the victim's row **only if its
estimate is strictly greater than the victim's owner's** (ties and lower: it stays on
its fallback row, the victim keeps its row). Several candidates of one batch are taken
by descending estimate (ties: first appearance), the strongest first to free rows, the
others paired one to one with the victims in eviction order. As in Caffeine, a *warm*
candidate (estimate >= 6) that loses is still admitted about once in 128 duels, so that
IDs crafted to inflate a victim's cells cannot lock admission (:func:`_jitter`:
deterministic in fingerprint and event time, so restarts and tests repeat exactly).
Rows unseen for ``expiry_s`` seconds of event time are freed (Monolith's expiring
IDs). :meth:`IdTable.remove` frees the rows of deleted IDs.

>>> t = IdTable(rows=8, fallback=4, salt="item", admit_after=2)
>>> int(t.rows(["a"])[0]) < 4          # not admitted yet: a fallback row
True
>>> _ = t.observe(["a"], now=100); u = t.observe(["a"], now=101)
>>> int(t.rows(["a"])[0]) == int(u.admitted[0]) >= 4   # its own row after 2 impressions
True
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Sequence

import numpy as np

__all__ = ["fingerprint", "sketch_width_for", "CountMinSketch", "TableUpdate", "IdTable"]

_EMPTY = np.zeros(0, dtype=np.int64)

SAMPLE_PER_ROW = 80
"""TinyLFU's sample size per own row: the sketch halves after ``80 x capacity`` counted
impressions (the paper's ``W/C``). Caffeine uses 10, for a cache, where a miss costs one
load; an evicted embedding row loses what it learned, so the tables remember frequency
8 times longer. Affordable because of the doorkeeper (:data:`DOOR_BITS_PER_SAMPLE`):
without it, the longer sample fills the counters with one-off IDs and noise evicts rare
hot IDs; with it, an ID seen once per ~100,000 impressions keeps its row
(``docs/results.md``, "Bounded ID tables": chosen on tuning streams, seeds 1-3)."""
DOOR_BITS_PER_SAMPLE = 8
"""Bits of the doorkeeper (a Bloom filter of 4 hashes) per impression of the sample:
at most ``W`` distinct IDs enter it between two clearings, so false positives stay
below ~2.5%. ``80 x 28,672 x 8`` bits are 2.3 MB a table at the default size."""
PROTECTED_SHARE = 0.8
"""At most this share of the own rows is protected (Caffeine's ``PERCENT_MAIN_PROTECTED``):
beyond it, the least recently seen protected rows are demoted to probation, so IDs that
came back once long ago cannot hold the table against newcomers for ever."""
ADMIT_WARM = 6
"""A losing candidate at least this frequent may be admitted at random (Caffeine's
``ADMIT_HASHDOS_THRESHOLD``)."""
ADMIT_JITTER_BITS = 7
"""That happens once in ``2**7 = 128`` duels (Caffeine's ``(random & 127) == 0``)."""


# A small cache: hot IDs hit it, and its memory stays bounded under a stream of new IDs.
@lru_cache(maxsize=1 << 16)
def _digest(key: str, salt: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{salt}|{key}".encode(), digest_size=8).digest(), "little")


def fingerprint(key: str, salt: str) -> int:
    """The ID's 64-bit fingerprint as a non-zero signed int64 (0 marks a free row).

    >>> fingerprint("u1", "user") == fingerprint("u1", "user") != fingerprint("u1", "item")
    True
    """
    u = _digest(key, salt)
    fp = u - (1 << 64) if u >= 1 << 63 else u
    return fp or 1


def sketch_width_for(capacity: int) -> int:
    """Counters per row of a table's admission sketch: 4 x the power of two >= ``capacity``.

    Caffeine sizes its sketch to the cache: a power of two >= capacity of 64-bit words,
    16 four-bit counters each, which each of its 4 hash functions reaches 4 of; so
    4 rows of ``4 x`` that power of two counters here (int32) hold as many counters.

    >>> sketch_width_for(28_672), sketch_width_for(1)
    (131072, 4)
    """
    return 4 * (1 << max(int(capacity) - 1, 0).bit_length())


def _jitter(fps: np.ndarray, now: int) -> np.ndarray:
    """``(N,)`` bool, True for about one in ``2**ADMIT_JITTER_BITS`` of the fingerprints
    ``fps`` ``(N,)`` at event time ``now``: the admission's random fraction, as a hash so
    that it repeats exactly (no generator state to checkpoint).

    >>> hits = _jitter(np.arange(1, 128_001, dtype=np.int64), now=1_750_000_000)
    >>> 800 < int(hits.sum()) < 1200
    True
    """
    salt = np.uint64((int(now) * 0xC2B2AE3D27D4EB4F) & 0xFFFFFFFFFFFFFFFF)
    with np.errstate(over="ignore"):
        h = (fps.astype(np.uint64) ^ salt) * np.uint64(0x9E3779B97F4A7C15)  # (N,), wraps mod 2^64
    return (h >> np.uint64(64 - ADMIT_JITTER_BITS)) == 0


def _fallback_row(key: str, salt: str, fallback: int) -> int:
    """The hashed fallback row; the same bucket :func:`em3.model.ranker.stable_bucket` gives."""
    return _digest(key, salt) % fallback


class CountMinSketch:
    """Approximate counts of int64 keys in fixed memory (``depth x width`` int32), and
    approximate sums of a value per key (``values``, float32, same cells).

    Conservative update (only the smallest counters of a key grow), and after every
    ``sample_size`` counted additions (default: ``width``) all counters and sums are
    halved (TinyLFU's reset): old counts fade, and an unbounded stream of distinct keys
    cannot saturate the table. With ``doorkeeper_bits`` > 0, a key's first addition
    since the last reset only sets its bits in a Bloom filter of that many bits (TinyLFU's
    doorkeeper, cleared at each reset), later ones reach the counters, and an estimate
    is the counters' plus 1 for a key the doorkeeper holds: the same counts, while keys
    seen once leave the counters to the keys that repeat. Every addition counts toward
    ``sample_size``, the doorkeeper's included (as in Ristretto's TinyLFU).

    >>> s = CountMinSketch(width=64, depth=4)
    >>> s.add(np.array([7, 7, 9], dtype=np.int64)).tolist()
    [2, 1]
    >>> s.estimate(np.array([7], dtype=np.int64)).tolist()
    [2]
    >>> d = CountMinSketch(width=64, depth=4, doorkeeper_bits=256)
    >>> d.add(np.array([7, 7, 9], dtype=np.int64)).tolist(), int(d.table.max())  # 9 only in the doorkeeper
    ([2, 1], 1)
    """

    # Odd 64-bit multipliers of the multiply-shift hashes, one per row.
    _MULT = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93,
                      0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53, 0x94D049BB133111EB, 0xBF58476D1CE4E5B9],
                     dtype=np.uint64)
    # The doorkeeper's 4 hashes: other odd multipliers, so its bits are independent of the rows'.
    _DOOR_MULT = np.array([0xA0761D6478BD642F, 0xE7037ED1A0B428DB, 0x8EBC6AF09C88C6E3, 0x589965CC75374CC3],
                          dtype=np.uint64)

    def __init__(self, width: int = 1 << 16, depth: int = 4, sample_size: int | None = None,
                 doorkeeper_bits: int = 0) -> None:
        if not (isinstance(width, int) and width >= 1):
            raise ValueError(f"width must be an int >= 1, but {width!r} is given")
        if not (isinstance(depth, int) and 1 <= depth <= len(self._MULT)):
            raise ValueError(f"depth must be an int in [1, {len(self._MULT)}], but {depth!r} is given")
        sample_size = width if sample_size is None else sample_size
        if not (isinstance(sample_size, int) and sample_size >= 1):
            raise ValueError(f"sample_size must be an int >= 1, but {sample_size!r} is given")
        if not (isinstance(doorkeeper_bits, int) and doorkeeper_bits >= 0):
            raise ValueError(f"doorkeeper_bits must be an int >= 0 (0: none), but {doorkeeper_bits!r} is given")
        self.width, self.depth, self.sample_size = width, depth, sample_size
        self.table = np.zeros((depth, width), dtype=np.int32)
        self.values = np.zeros((depth, width), dtype=np.float32)
        self.door_bits = -(-doorkeeper_bits // 8) * 8  # whole bytes
        self.door = np.zeros(self.door_bits // 8, dtype=np.uint8)  # the doorkeeper's bits, packed
        self.additions = 0

    def _cells(self, keys: np.ndarray) -> np.ndarray:
        """``(depth, N)`` column of each key in each row."""
        with np.errstate(over="ignore"):
            mixed = keys.astype(np.uint64)[None, :] * self._MULT[: self.depth, None]  # (depth, N), wraps mod 2^64
        return ((mixed >> np.uint64(32)) % np.uint64(self.width)).astype(np.int64)

    def _door_bits_of(self, keys: np.ndarray) -> np.ndarray:
        """``(4, N)`` the doorkeeper bit of each key under each of its hashes."""
        with np.errstate(over="ignore"):
            mixed = keys.astype(np.uint64)[None, :] * self._DOOR_MULT[:, None]  # (4, N), wraps mod 2^64
        return ((mixed >> np.uint64(32)) % np.uint64(self.door_bits)).astype(np.int64)

    def in_doorkeeper(self, keys: np.ndarray) -> np.ndarray:
        """``(N,)`` bool: whether the doorkeeper holds each key (all False without one)."""
        if not self.door_bits:
            return np.zeros(len(keys), dtype=bool)
        return self._door_holds(self._door_bits_of(keys))

    def _door_holds(self, bits: np.ndarray) -> np.ndarray:
        """``(N,)`` bool: whether all of each key's doorkeeper ``bits`` ``(4, N)`` are set."""
        return ((self.door[bits >> 3] >> (bits & 7).astype(np.uint8)) & 1).all(axis=0).astype(bool)

    def estimate(self, keys: np.ndarray) -> np.ndarray:
        """``(N,)`` estimated counts (never below the true count since the last halving)."""
        if not len(keys):
            return _EMPTY
        cells = self._cells(keys)
        counted = self.table[np.arange(self.depth)[:, None], cells].min(axis=0).astype(np.int64)
        return counted + self.in_doorkeeper(keys)

    def add(self, keys: np.ndarray) -> np.ndarray:
        """Count each entry of ``keys`` once; returns the estimates of ``np.unique(keys)``
        after the addition (in sorted key order)."""
        if not len(keys):
            return _EMPTY
        uniq, counts = np.unique(keys, return_counts=True)
        cells = self._cells(uniq)  # (depth, U)
        rows = np.arange(self.depth)[:, None]
        grow = counts  # (U,) additions that reach the counters
        if self.door_bits:
            bits = self._door_bits_of(uniq)  # (4, U)
            first = ~self._door_holds(bits)  # first sightings since the last reset: doorkeeper only
            new = bits[:, first].reshape(-1)
            np.bitwise_or.at(self.door, new >> 3, np.left_shift(1, new & 7).astype(np.uint8))
            grow = counts - first
        counted = self.table[rows, cells].min(axis=0).astype(np.int64) + grow  # (U,)
        target = np.minimum(counted, np.iinfo(np.int32).max).astype(np.int32)
        for r in range(self.depth):
            np.maximum.at(self.table[r], cells[r], target)
        self.additions += int(counts.sum())
        if self.additions >= self.sample_size:
            self.table >>= 1
            self.values *= 0.5
            self.door[:] = 0
            self.additions //= 2
        return counted + (1 if self.door_bits else 0)

    def add_values(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Add ``values`` ``(N,)`` to the sums of ``keys`` ``(N,)``."""
        if len(keys):
            cells = self._cells(keys)
            for r in range(self.depth):
                np.add.at(self.values[r], cells[r], np.asarray(values, dtype=np.float32))

    def estimate_values(self, keys: np.ndarray) -> np.ndarray:
        """``(N,)`` estimated sums (the smallest of the key's cells)."""
        if not len(keys):
            return np.zeros(0, dtype=np.float32)
        return self.values[np.arange(self.depth)[:, None], self._cells(keys)].min(axis=0)

    @property
    def nbytes(self) -> int:
        return int(self.table.nbytes + self.values.nbytes + self.door.nbytes)


@dataclass(frozen=True)
class TableUpdate:
    """What one :meth:`IdTable.observe` changed: ``admitted`` rows newly given to an ID
    (each must be reset before it is used; ``admitted_from`` ``(N,)`` the fallback row
    each such ID used until now; ``prior_impressions`` and ``prior_clicks`` ``(N,)`` the
    sketch's estimates of its impressions and clicks before this call, which its own
    counters can start from: for a first admission those before it, for an ID that had
    a row before, also those on that row, both aged by the same halvings), ``evicted`` rows whose owner left (expired, least
    recently used, or removed); a row can be in both (evicted, then reused)."""

    admitted: np.ndarray
    admitted_from: np.ndarray
    evicted: np.ndarray
    prior_impressions: np.ndarray = field(default_factory=lambda: _EMPTY)
    prior_clicks: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))

    @property
    def changed(self) -> bool:
        return bool(len(self.admitted) or len(self.evicted))


class IdTable:
    """The id -> row map of one table (see the module docstring).

    Parameters
    ----------
    rows : int
        Rows of the table (fallback and own).
    fallback : int
        Rows of the hashed fallback region, ``1 <= fallback < rows``.
    salt : str
        Hash salt (``"user"``, ``"item"``).
    admit_after : int
        Impressions after which an ID gets its own row (1: at its first).
    expiry_s : float
        Free rows whose owner was unseen this long (event time); 0: never expire.
    sketch_width : int
        Counters per row of the admission sketch (:class:`CountMinSketch`); 0 (the
        default): :func:`sketch_width_for` the capacity. Whatever the width, the sketch
        halves after ``80 x capacity`` counted impressions (:data:`SAMPLE_PER_ROW`), and
        its doorkeeper has :data:`DOOR_BITS_PER_SAMPLE` bits per impression of that.
    sketch_depth : int
        Rows of the admission sketch. It is allocated on the first :meth:`observe` (a
        server that only reads the map never holds one).
    """

    def __init__(self, rows: int, fallback: int, salt: str, admit_after: int = 2, expiry_s: float = 0.0,
                 sketch_width: int = 0, sketch_depth: int = 4) -> None:
        if not (isinstance(fallback, int) and isinstance(rows, int) and 1 <= fallback < rows):
            raise ValueError(f"fallback must be an int in [1, rows), but {fallback!r} with rows={rows!r} is given")
        if not (isinstance(admit_after, int) and admit_after >= 1):
            raise ValueError(f"admit_after must be an int >= 1, but {admit_after!r} is given")
        if not expiry_s >= 0:
            raise ValueError(f"expiry_s must be >= 0, but {expiry_s!r} is given")
        if not (isinstance(sketch_width, int) and sketch_width >= 0):
            raise ValueError(f"sketch_width must be an int >= 0 (0: from the capacity), but {sketch_width!r} is given")
        self.rows_total, self.fallback, self.salt = rows, fallback, salt
        self.capacity = rows - fallback
        self.admit_after, self.expiry_s = admit_after, float(expiry_s)
        self.sketch_width, self.sketch_depth = sketch_width, sketch_depth
        self.keys = np.zeros(self.capacity, dtype=np.int64)  # owner fingerprint per own row; 0 = free
        self.last_seen = np.zeros(self.capacity, dtype=np.int64)  # event time (s) of the owner's last impression
        self.hits = np.zeros(self.capacity, dtype=np.int64)  # later batches the owner came back in
        self._index: dict[int, int] = {}  # fingerprint -> slot
        self.sketch: CountMinSketch | None = None  # allocated on the first observe
        self.now = 0

    # ------------------------------------------------------------- reading
    @property
    def sketch_sample_size(self) -> int:
        """Counted impressions between two halvings of the sketch: ``80 x capacity``."""
        return SAMPLE_PER_ROW * self.capacity

    def new_sketch(self, width: int | None = None) -> CountMinSketch:
        """An empty admission sketch for this table (``width``: a loaded sketch's)."""
        width = width or self.sketch_width or sketch_width_for(self.capacity)
        return CountMinSketch(width, self.sketch_depth, self.sketch_sample_size,
                              doorkeeper_bits=DOOR_BITS_PER_SAMPLE * self.sketch_sample_size)

    def settings(self) -> dict:
        return {"rows": self.rows_total, "fallback": self.fallback, "salt": self.salt,
                "admit_after": self.admit_after, "expiry_s": self.expiry_s,
                "sketch_width": self.sketch_width, "sketch_depth": self.sketch_depth}

    @classmethod
    def from_arrays(cls, keys: np.ndarray, last_seen: np.ndarray, hits: np.ndarray | None = None,
                    **settings) -> "IdTable":
        """A table whose map is ``keys`` / ``last_seen`` / ``hits`` (as :meth:`to_arrays`
        gives them, e.g. read from a snapshot); a fingerprint owning two rows is refused."""
        table = cls(**settings)
        keys = np.asarray(keys, dtype=np.int64).reshape(-1)
        last_seen = np.asarray(last_seen, dtype=np.int64).reshape(-1)
        hits = np.zeros_like(keys) if hits is None else np.asarray(hits, dtype=np.int64).reshape(-1)
        if not keys.shape == last_seen.shape == hits.shape == (table.capacity,):
            raise ValueError(f"keys, last_seen and hits must have shape ({table.capacity},), "
                             f"but {keys.shape}, {last_seen.shape} and {hits.shape} are given")
        slots = np.flatnonzero(keys)
        if len(np.unique(keys[slots])) != len(slots):
            raise ValueError("keys hold a fingerprint in two rows")
        table.keys, table.last_seen, table.hits = keys.copy(), last_seen.copy(), hits.copy()
        table._index = dict(zip(keys[slots].tolist(), slots.tolist()))
        table.now = int(last_seen.max(initial=0))
        return table

    def to_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(keys, last_seen, hits)``, each ``(capacity,)`` int64: the whole map."""
        return self.keys, self.last_seen, self.hits

    def rows(self, ids: Sequence[str]) -> np.ndarray:
        """``(N,)`` int64 row of each ID: its own row, or its hashed fallback row."""
        out = np.empty(len(ids), dtype=np.int64)
        index, salt, fb = self._index, self.salt, self.fallback
        for n, key in enumerate(ids):
            slot = index.get(fingerprint(key, salt))
            out[n] = _fallback_row(key, salt, fb) if slot is None else fb + slot
        return out

    def owns(self, ids: Sequence[str]) -> np.ndarray:
        """``(N,)`` bool: whether each ID has its own row."""
        return np.array([fingerprint(k, self.salt) in self._index for k in ids], dtype=bool)

    def __len__(self) -> int:
        """IDs holding an own row."""
        return len(self._index)

    @property
    def nbytes(self) -> int:
        """Bytes held: the map arrays, the index (at ~100 bytes an entry) and the sketch;
        bounded by the capacity and the sketch size, whatever the stream."""
        sketch = self.sketch.nbytes if self.sketch is not None else 0
        return int(self.keys.nbytes + self.last_seen.nbytes + self.hits.nbytes + 100 * len(self._index) + sketch)

    # ------------------------------------------------------------- writing
    def _free(self, slots: np.ndarray) -> None:
        for fp in self.keys[slots].tolist():
            self._index.pop(fp, None)
        self.keys[slots] = 0
        self.last_seen[slots] = 0
        self.hits[slots] = 0

    def _cap_protected(self) -> None:
        """Demote the least recently seen protected rows (ties: lowest row) to probation
        while more than :data:`PROTECTED_SHARE` of the own rows are protected."""
        protected = np.flatnonzero((self.keys != 0) & (self.hits > 0))
        excess = len(protected) - int(PROTECTED_SHARE * self.capacity)
        if excess > 0:
            oldest = protected[np.lexsort((protected, self.last_seen[protected]))][:excess]
            self.hits[oldest] = 0

    def observe(self, ids: Sequence[str], now: float) -> TableUpdate:
        """Count one trained-on impression per entry of ``ids`` at event time ``now``
        (every ID, admitted or not): expire stale rows, touch the rows of admitted IDs,
        and admit the IDs whose estimate reaches ``admit_after``: to free rows, else
        to the SLRU victims' rows they out-count (see the module docstring)."""
        self.now = now = max(self.now, int(now))
        fb, salt = self.fallback, self.salt
        evicted: list[np.ndarray] = []
        if self.expiry_s > 0:
            stale = np.flatnonzero((self.keys != 0) & (self.last_seen < now - self.expiry_s))
            if len(stale):
                self._free(stale)
                evicted.append(stale + fb)
        if not len(ids):
            return TableUpdate(_EMPTY, _EMPTY, np.concatenate(evicted) if evicted else _EMPTY)
        # Unique IDs in order of first appearance: admission order is deterministic.
        counts: dict[str, int] = {}
        for key in ids:
            counts[key] = counts.get(key, 0) + 1
        uniq = list(counts)
        fps = np.array([fingerprint(k, salt) for k in uniq], dtype=np.int64)  # (U,)
        slots = np.array([self._index.get(int(f), -1) for f in fps], dtype=np.int64)
        own = slots >= 0
        self.last_seen[slots[own]] = now
        self.hits[slots[own]] += 1
        self._cap_protected()
        if self.sketch is None:
            self.sketch = self.new_sketch()
        sketch = self.sketch
        before = sketch.estimate(fps)  # (U,) impressions counted before this call
        sketch.add(np.repeat(fps, list(counts.values())))
        after = sketch.estimate(fps)  # (U,) now, after a halving this call may have caused
        reached = ~own & (before + np.fromiter(counts.values(), np.int64, len(uniq)) >= self.admit_after)
        cand = np.flatnonzero(reached)
        cand = cand[np.argsort(-after[cand], kind="stable")]  # strongest first; ties: first appearance
        free = np.flatnonzero(self.keys == 0)
        winners, rows = cand[: len(free)], free[: len(cand)]
        duel = cand[len(free):]
        if len(duel):
            # SLRU order: probationary rows first, then protected; least recently seen
            # first within each (ties: lowest row); rows touched now are never victims.
            old = np.flatnonzero((self.keys != 0) & (self.last_seen < now))
            victims = old[np.lexsort((old, self.last_seen[old], self.hits[old] > 0))][: len(duel)]
            duel = duel[: len(victims)]
            cand_est, victim_est = after[duel], sketch.estimate(self.keys[victims])
            win = (cand_est > victim_est) | ((cand_est >= ADMIT_WARM) & _jitter(fps[duel], now))
            victims = victims[win]
            if len(victims):
                self._free(victims)
                evicted.append(victims + fb)
            winners, rows = np.concatenate([winners, duel[win]]), np.concatenate([rows, victims])
        for n, slot in zip(winners.tolist(), rows.tolist()):
            fp = int(fps[n])
            self.keys[slot], self.last_seen[slot], self.hits[slot] = fp, now, 0
            self._index[fp] = slot
        return TableUpdate(rows.astype(np.int64) + fb,
                           np.array([_fallback_row(uniq[n], salt, fb) for n in winners.tolist()], dtype=np.int64),
                           np.concatenate(evicted) if evicted else _EMPTY, before[winners],
                           sketch.estimate_values(fps[winners]))

    def observe_labels(self, ids: Sequence[str], labels: Sequence[float]) -> None:
        """Add the clicks ``labels`` of trained-on impressions of ``ids`` to the sketch's
        click sums (every ID, as :meth:`observe` counts every impression; call after the
        step that learned them): an ID's sums and counts cover the same impressions."""
        if self.sketch is None or not len(ids):
            return
        fps = np.array([fingerprint(k, self.salt) for k in ids], dtype=np.int64)
        y = np.asarray(labels, dtype=np.float32)
        keep = y != 0
        self.sketch.add_values(fps[keep], y[keep])

    def fallback_rows(self, ids: Sequence[str]) -> np.ndarray:
        """``(N,)`` int64 hashed fallback row of each ID, whether or not it holds an own row."""
        return np.array([_fallback_row(k, self.salt, self.fallback) for k in ids], dtype=np.int64)

    def remove(self, ids: Sequence[str]) -> np.ndarray:
        """Free the own rows of ``ids`` (a deletion); returns those rows. IDs without
        one are untouched (their fallback rows are shared)."""
        slots = [self._index[f] for f in (fingerprint(k, self.salt) for k in ids) if f in self._index]
        slots_arr = np.array(sorted(set(slots)), dtype=np.int64)
        if len(slots_arr):
            self._free(slots_arr)
        return slots_arr + self.fallback
