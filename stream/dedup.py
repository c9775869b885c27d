"""Consumer-side dedup of samples by their stable ``sample_id``.

The join gives exactly-once *effect*: its state, offsets and history appends
move together in one Redis transaction, written after the batch's samples are
flushed to Kafka. If the join dies between that flush and the transaction, the
restarted join re-reads the same input from the checkpointed offsets and emits
the same samples again, with the same ``sample_id`` (a pure function of the
impression id and the correction flag). Such duplicates are at most one join
micro-batch apart on the samples topic (same key, same partition), so a bounded
window of recent ids removes them; a window of a few batch sizes is plenty, and
the default is far larger.

>>> d = SampleDedup(capacity=4)
>>> [d.add(x) for x in ["a", "b", "a", "c"]]
[True, True, False, True]
"""
from __future__ import annotations

from typing import Iterable, Iterator, TypeVar

from em3.types import Sample

__all__ = ["SampleDedup", "DEFAULT_DEDUP_CAPACITY"]

DEFAULT_DEDUP_CAPACITY = 1_000_000

T = TypeVar("T", bound=Sample)


class SampleDedup:
    """Remembers between ``capacity / 2`` and ``capacity`` most recent sample ids.

    Two generations of sets: when the current one is full the older is dropped,
    so memory stays bounded and lookups stay O(1).

    Parameters
    ----------
    capacity : how many ids at most are remembered; >= 2.
    """

    def __init__(self, capacity: int = DEFAULT_DEDUP_CAPACITY) -> None:
        if not isinstance(capacity, int) or capacity < 2:
            raise ValueError(f"capacity must be an int >= 2, but {capacity!r} is given")
        self.capacity = capacity
        self._current: set[str] = set()
        self._previous: set[str] = set()
        self.dropped = 0

    def add(self, sample_id: str) -> bool:
        """Record ``sample_id``; False if it was seen recently (a duplicate)."""
        if sample_id in self._current or sample_id in self._previous:
            self.dropped += 1
            return False
        if len(self._current) >= self.capacity // 2:
            self._previous, self._current = self._current, set()
        self._current.add(sample_id)
        return True

    def filter(self, samples: Iterable[T]) -> Iterator[T]:
        """The samples whose ids were not seen before, in order."""
        for s in samples:
            if self.add(s.sample_id):
                yield s

    def __contains__(self, sample_id: str) -> bool:
        return sample_id in self._current or sample_id in self._previous

    def __len__(self) -> int:
        return len(self._current) + len(self._previous)
