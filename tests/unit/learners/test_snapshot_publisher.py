"""SnapshotPublisher: publish order, pointer check, resume fallbacks, pruning."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from em3.errors import SnapshotError
from learners.publisher import LineMovedError, PublisherConfig, SnapshotPublisher
from learners.testing import InMemoryAppliedLog, InMemorySnapshotStore

CONFIG = {"embed_dim": 4}


def publisher(snaps, applied, **kw):
    return SnapshotPublisher(snaps, applied, "main", CONFIG, PublisherConfig(**kw))


def publish(pub, parent, offsets, ids, w=1.0):
    return pub.publish({"w": torch.full((2,), w)}, parent=parent, offsets=offsets,
                       applied_ids={"t:0": ids}, stats={"totals": {"samples_applied": len(ids)}})


def test_publish_then_resume_restores_state_offsets_window_and_totals():
    snaps, applied = InMemorySnapshotStore(), InMemoryAppliedLog()
    pub = publisher(snaps, applied)
    m1 = publish(pub, None, {"t:0": 2}, ["a", "b"])
    m2 = publish(pub, m1.version, {"t:0": 3}, ["c"], w=2.0)
    assert (m2.parent_version, m2.offsets, m2.config) == (m1.version, {"t:0": 3}, CONFIG)
    point = publisher(snaps, applied).resume()
    assert point.version == m2.version and point.offsets == {"t:0": 3}
    assert point.state["w"].tolist() == [2.0, 2.0]
    assert point.window.ids() == ["a", "b", "c"] and point.totals == {"samples_applied": 1}
    assert publisher(snaps, applied).resume(partitions=["t:9"]).window.ids() == []


def test_publishing_on_a_moved_pointer_is_refused():
    snaps, applied = InMemorySnapshotStore(), InMemoryAppliedLog()
    pub = publisher(snaps, applied)
    m1 = publish(pub, None, {"t:0": 1}, ["a"])
    publish(pub, m1.version, {"t:0": 2}, ["b"])
    with pytest.raises(LineMovedError, match="points at v2, but this learner built on v1"):
        publish(pub, m1.version, {"t:0": 2}, ["x"])


def test_resume_skips_a_corrupt_newest_version_and_refuses_another_config():
    snaps, applied = InMemorySnapshotStore(), InMemoryAppliedLog()
    pub = publisher(snaps, applied)
    m1 = publish(pub, None, {"t:0": 1}, ["a"])
    m2 = publish(pub, m1.version, {"t:0": 2}, ["b"])
    manifest, blob = snaps.snaps["main"][m2.version]
    snaps.snaps["main"][m2.version] = (manifest, blob[:-1] + b"\x00")
    point = publisher(snaps, applied).resume()
    assert point.version == m1.version and point.offsets == {"t:0": 1} and point.window.ids() == ["a"]
    other = SnapshotPublisher(snaps, applied, "main", {"embed_dim": 8})
    with pytest.raises(SnapshotError, match="different model config"):
        other.resume()


def test_applied_records_older_than_the_window_are_pruned_unless_retained():
    for retain in (False, True):
        snaps, applied = InMemorySnapshotStore(keep=100), InMemoryAppliedLog()
        pub = publisher(snaps, applied, dedup_capacity=3, retain_applied=retain)
        parent = None
        for k in range(5):
            parent = publish(pub, parent, {"t:0": 2 * (k + 1)}, [f"{k}a", f"{k}b"]).version
        kept = sorted(v for (_, v) in applied.records)
        assert kept == ([1, 2, 3, 4, 5] if retain else [4, 5])
        assert publisher(snaps, applied, dedup_capacity=3).resume().window.ids() == ["3b", "4a", "4b"]


def test_publisher_config_and_line_are_validated():
    with pytest.raises(ValueError, match="model_line must be a non-empty name without ':'"):
        SnapshotPublisher(InMemorySnapshotStore(), InMemoryAppliedLog(), "a:b", CONFIG)
    with pytest.raises(dataclasses.FrozenInstanceError):
        PublisherConfig().dedup_capacity = 1  # type: ignore[misc]
