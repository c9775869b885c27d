"""A published version's lineage, batch by batch, and learning it again.

Every published version's applied-ids record says which samples it learned and how
they were grouped into micro-batches (:class:`em3.redis_stores.RedisAppliedLog`).
Walking the parent links from a version gives its whole lineage: the exact sequence
of batches its model learned, however many learner processes it took to get there.
:func:`replay_batches` learns a sequence of batches through a :class:`LearnerLoop`
(the same code path a live learner runs), so a learner that never stopped can be
compared with one that was killed and restarted (``benchmarks/recovery.py``, the
functional and integration tests).

Batches of a fleet's versions interleave its learners' batches; replaying them
through one learner is not what the fleet learned, so this is for single-learner
lines.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from learners.loop import LearnerLoop, SourceRecord

__all__ = ["Batch", "lineage_batches", "replay_batches", "max_abs_difference"]

#: One micro-batch: ``(partition, sample_id)`` in the order it was learned.
Batch = list[tuple[str, str]]


def lineage_batches(applied, line: str, version: int) -> list[tuple[int, list[Batch]]]:
    """``[(version, its batches), ...]`` from the root of ``version``'s lineage to it,
    oldest first. Raises ``ValueError`` when a version's record lacks its batches (it
    was written before batches were recorded) or the chain is broken (pruned: keep
    the records with ``PublisherConfig(retain_applied=True)``)."""
    out = []
    parent: int | None = None
    for v, ids in applied.chain(line, version):
        batches = applied.batches(line, v)
        if batches is None and not any(ids.values()):
            batches = []  # a version that applied nothing (a line's initial weights)
        if batches is None:
            raise ValueError(f"line {line!r} v{v} has no recorded batches")
        out.append((v, batches))
        parent = applied.get(line, v)[0]
    if parent is not None:
        raise ValueError(f"line {line!r}: the lineage of v{version} stops at v{out[-1][0]}, whose parent "
                         f"v{parent} has no applied record")
    return out[::-1]


def replay_batches(loop: LearnerLoop, batches: Sequence[Batch], records: Mapping[str, bytes]) -> int:
    """Learn ``batches`` through ``loop`` one micro-batch each, in order; ``records``
    maps a sample id to its encoded sample. Returns the number of samples learned;
    raises ``ValueError`` when a batch is not learned whole (missing record,
    quarantine, dedup)."""
    learned = 0
    for n, batch in enumerate(batches):
        missing = [sid for _, sid in batch if sid not in records]
        if missing:
            raise ValueError(f"batch {n}: no record of {missing[:3]}")
        stats = loop.process([SourceRecord(partition, offset, records[sid])
                              for offset, (partition, sid) in enumerate(batch)])
        if int(stats.get("n", 0)) != len(batch):
            raise ValueError(f"batch {n}: {int(stats.get('n', 0))} of {len(batch)} samples learned")
        learned += len(batch)
    loop.finish_cycle()
    return learned


def max_abs_difference(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> tuple[float, str]:
    """The largest absolute elementwise difference between two states with the same
    tensors, and the tensor it is in (``""`` when they are equal).

    >>> max_abs_difference({"w": torch.zeros(2), "v": torch.ones(1)}, {"w": torch.tensor([0.0, 0.5]), "v": torch.ones(1)})
    (0.5, 'w')
    """
    if set(a) != set(b):
        raise ValueError(f"the states hold different tensors: {sorted(set(a) ^ set(b))[:5]}")
    worst, where = 0.0, ""
    for name in sorted(a):
        x, y = a[name].detach().to("cpu", torch.float64), b[name].detach().to("cpu", torch.float64)
        if x.shape != y.shape:
            raise ValueError(f"{name} has shapes {tuple(x.shape)} and {tuple(y.shape)}")
        diff = float((x - y).abs().max()) if x.numel() else 0.0
        if diff > worst:
            worst, where = diff, name
    return worst, where
