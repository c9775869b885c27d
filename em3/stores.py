"""Protocols for the stores every component shares, with in-memory versions.

The Redis-backed versions live in :mod:`em3.redis_stores` (the only module that
imports ``redis``); the in-memory ones here serve pure-logic tests and
offline benchmarks.

Key layout in Redis is documented in ``docs/architecture.md``.
"""
from __future__ import annotations

from collections import defaultdict, deque
from typing import Iterable, Mapping, Protocol, Sequence, runtime_checkable

from em3.types import ItemContent, Tombstone

__all__ = [
    "ContentSource",
    "HistorySource",
    "InMemoryContentStore",
    "InMemoryHistoryStore",
    "InMemoryTombstones",
    "DEFAULT_HISTORY_LENGTH",
    "encode_batches",
    "decode_batches",
]

DEFAULT_HISTORY_LENGTH = 256


@runtime_checkable
class ContentSource(Protocol):
    """Where item content is read from (Redis in production, a dict in tests)."""

    def get_many(self, item_ids: Sequence[str]) -> list[ItemContent | None]:
        """Content for each id, ``None`` where the item is not registered."""
        ...

    def put_many(self, items: Iterable[ItemContent]) -> None:
        """Register or replace items."""
        ...


@runtime_checkable
class HistorySource(Protocol):
    """Per-user recent-click history, newest first, bounded in length.

    Each entry is ``(item_id, clicked_at)``; ``get`` with ``before`` returns only
    clicks strictly before that event time, so a learner can rebuild the
    history a user had when an impression was served (no label leakage).
    """

    def append(self, user_id: str, item_id: str, clicked_at: float) -> None: ...

    def append_many(self, entries: Iterable[tuple[str, str, float]]) -> None:
        """Append ``(user_id, item_id, clicked_at)`` entries in order."""
        ...

    def get(self, user_id: str, limit: int, before: float | None = None) -> list[str]:
        """Up to ``limit`` item ids, newest first."""
        ...

    def get_many(
        self, user_ids: Sequence[str], limit: int, before: Sequence[float | None] | None = None
    ) -> list[list[str]]: ...


class InMemoryContentStore:
    """A dict-backed :class:`ContentSource`."""

    def __init__(self, items: Iterable[ItemContent] = ()) -> None:
        self._items: dict[str, ItemContent] = {}
        self.put_many(items)

    def get_many(self, item_ids: Sequence[str]) -> list[ItemContent | None]:
        return [self._items.get(i) for i in item_ids]

    def put_many(self, items: Iterable[ItemContent]) -> None:
        for item in items:
            self._items[item.item_id] = item

    def __len__(self) -> int:
        return len(self._items)

    def ids(self) -> list[str]:
        return list(self._items)


class InMemoryHistoryStore:
    """A deque-backed :class:`HistorySource`.

    >>> h = InMemoryHistoryStore(max_length=2)
    >>> h.append("u", "a", 1.0); h.append("u", "b", 2.0); h.append("u", "c", 3.0)
    >>> h.get("u", 10)
    ['c', 'b']
    >>> h.get("u", 10, before=3.0)
    ['b']
    """

    def __init__(self, max_length: int = DEFAULT_HISTORY_LENGTH) -> None:
        if max_length <= 0:
            raise ValueError(f"max_length must be > 0, but {max_length} is given")
        self.max_length = max_length
        self._lists: dict[str, deque[tuple[str, float]]] = defaultdict(
            lambda: deque(maxlen=self.max_length)
        )

    def append(self, user_id: str, item_id: str, clicked_at: float) -> None:
        self._lists[user_id].appendleft((item_id, clicked_at))

    def append_many(self, entries: Iterable[tuple[str, str, float]]) -> None:
        for user_id, item_id, clicked_at in entries:
            self.append(user_id, item_id, clicked_at)

    def get(self, user_id: str, limit: int, before: float | None = None) -> list[str]:
        entries = self._lists.get(user_id, ())
        out: list[str] = []
        for item_id, ts in entries:
            if before is not None and ts >= before:
                continue
            out.append(item_id)
            if len(out) >= limit:
                break
        return out

    def get_many(
        self, user_ids: Sequence[str], limit: int, before: Sequence[float | None] | None = None
    ) -> list[list[str]]:
        befores = before if before is not None else [None] * len(user_ids)
        return [self.get(u, limit, b) for u, b in zip(user_ids, befores)]


class InMemoryTombstones:
    """The part of :class:`em3.redis_stores.RedisPrivacyStore` a server uses, in a dict
    (tests): record a requested deletion, read and save a tombstone."""

    def __init__(self) -> None:
        self.records: dict[str, Tombstone] = {}

    def requested(self, tomb: Tombstone) -> bool:
        if tomb.tombstone_id in self.records:
            return False
        self.records[tomb.tombstone_id] = tomb
        return True

    def status(self, tid: str) -> Tombstone | None:
        return self.records.get(tid)

    def save(self, tomb: Tombstone) -> None:
        self.records[tomb.tombstone_id] = tomb


# --- batch order in the learners' applied-ids records ---------------------------------


def encode_batches(ids: Mapping[str, Sequence[str]], batches: Sequence[Sequence[str]]) -> list[list[int]]:
    """The micro-batches of an applied-ids record, compactly: ``batches`` gives, per
    batch, the partition of each sample in the order it was learned; each partition
    becomes its index in ``sorted(ids)``. With ``ids`` (each partition's sample ids in
    learned order) this rebuilds every batch (:func:`decode_batches`).

    >>> encode_batches({"t:0": ["a", "c"], "t:1": ["b"]}, [["t:0", "t:1"], ["t:0"]])
    [[0, 1], [0]]
    """
    index = {key: n for n, key in enumerate(sorted(ids))}
    out = [[index[key] for key in batch] for batch in batches]
    if [sum(b.count(n) for b in out) for n in range(len(index))] != [len(ids[k]) for k in sorted(ids)]:
        raise ValueError("batches must place every applied id exactly once")
    return out


def decode_batches(ids: Mapping[str, Sequence[str]], batches: Sequence[Sequence[int]]) -> list[list[tuple[str, str]]]:
    """``[(partition, sample_id), ...]`` per batch, in learned order (see :func:`encode_batches`).

    >>> decode_batches({"t:0": ["a", "c"], "t:1": ["b"]}, [[0, 1], [0]])
    [[('t:0', 'a'), ('t:1', 'b')], [('t:0', 'c')]]
    """
    keys = sorted(ids)
    next_of = dict.fromkeys(keys, 0)
    out = []
    for batch in batches:
        rows = []
        for n in batch:
            if not 0 <= n < len(keys) or next_of[keys[n]] >= len(ids[keys[n]]):
                raise ValueError(f"batch order names partition {n}, which has no id left")
            key = keys[n]
            rows.append((key, ids[key][next_of[key]]))
            next_of[key] += 1
        out.append(rows)
    if any(next_of[k] != len(ids[k]) for k in keys):
        raise ValueError("batch order leaves applied ids out")
    return out
