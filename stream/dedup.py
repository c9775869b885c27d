"""Consumer-side dedup: a bounded window of recent sample ids, to drop redelivered samples.

The stream join gives every sample a stable ``sample_id``
(:func:`em3.types.sample_id_for`) and, after its own crashes, may emit the same
sample again at a later offset. The learner keeps the ids it applied in a
first-in, first-out window of bounded size and skips any sample whose id is in it.

Any consumer of the samples topic can use it (``em3 samples summary`` does); for
the learners the window is part of their durable state: the ids applied in each
snapshot cycle are stored beside the snapshot (see
:class:`learners.publisher.SnapshotPublisher`), and a restarted learner rebuilds
the window from the chain of published versions, newest first, up to
``capacity`` ids. The window therefore always describes exactly the samples in
the model state it belongs to.

>>> w = DedupWindow(capacity=2)
>>> w.add("a"); w.add("b"); w.add("c")
>>> "a" in w, "b" in w, "c" in w
(False, True, True)
>>> w.filter_new(["b", "d", "d"])
[1]
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Sequence

__all__ = ["DedupWindow", "DEFAULT_DEDUP_CAPACITY"]

DEFAULT_DEDUP_CAPACITY = 200_000


class DedupWindow:
    """First-in, first-out set of at most ``capacity`` sample ids.

    Parameters
    ----------
    capacity : int
        Most ids kept; the oldest are forgotten first.
    ids : iterable of str, optional
        Initial content, oldest first.
    """

    def __init__(self, capacity: int = DEFAULT_DEDUP_CAPACITY, ids: Iterable[str] = ()) -> None:
        if not isinstance(capacity, int) or capacity <= 0:
            raise ValueError(f"capacity must be > 0, but {capacity!r} is given")
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()
        for sample_id in ids:
            self.add(sample_id)

    def __contains__(self, sample_id: object) -> bool:
        return sample_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, sample_id: str) -> None:
        """Remember ``sample_id`` (moving it to the newest end if already present)."""
        if sample_id in self._ids:
            self._ids.move_to_end(sample_id)
            return
        self._ids[sample_id] = None
        if len(self._ids) > self.capacity:
            self._ids.popitem(last=False)

    def add_new(self, sample_id: str) -> bool:
        """Remember ``sample_id``; True if it was new, False for a duplicate.

        >>> w = DedupWindow(4)
        >>> [w.add_new(x) for x in ["a", "b", "a"]]
        [True, True, False]
        """
        if sample_id in self._ids:
            return False
        self.add(sample_id)
        return True

    def add_many(self, sample_ids: Iterable[str]) -> None:
        for sample_id in sample_ids:
            self.add(sample_id)

    def filter_new(self, sample_ids: Sequence[str]) -> list[int]:
        """Indices of ``sample_ids`` not in the window and not repeated earlier in the list.

        The window itself is not changed; call :meth:`add_many` once the samples
        are applied.
        """
        seen: set[str] = set()
        keep = []
        for index, sample_id in enumerate(sample_ids):
            if sample_id in self._ids or sample_id in seen:
                continue
            seen.add(sample_id)
            keep.append(index)
        return keep

    def ids(self) -> list[str]:
        """The ids, oldest first."""
        return list(self._ids)

    def clear(self) -> None:
        self._ids.clear()

    @classmethod
    def from_newest_first(cls, capacity: int, chunks: Iterable[Sequence[str]]) -> "DedupWindow":
        """Rebuild a window from chunks of ids, newest chunk first, each chunk oldest first.

        Reading stops once ``capacity`` ids are collected, so a caller can pass a
        lazy iterator over an arbitrarily long chain of snapshot versions.

        >>> DedupWindow.from_newest_first(3, [["c", "d"], ["a", "b"]]).ids()
        ['b', 'c', 'd']
        """
        collected: list[Sequence[str]] = []
        total = 0
        for chunk in chunks:
            collected.append(chunk)
            total += len(chunk)
            if total >= capacity:
                break
        window = cls(capacity)
        for chunk in reversed(collected):
            window.add_many(chunk)
        return window
