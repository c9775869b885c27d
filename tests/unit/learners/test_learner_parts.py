"""Dedup window, snapshot policy, partition split, parameter averaging, configs."""
from __future__ import annotations

import pytest
import torch

from learners.aggregate import average_deltas
from stream.dedup import DedupWindow
from learners.publisher import PublisherConfig, SnapshotPolicy
from learners.sources import partitions_for_rank


def test_dedup_window_is_bounded_fifo():
    w = DedupWindow(3, ["a", "b", "c", "d"])
    assert w.ids() == ["b", "c", "d"] and len(w) == 3
    assert w.filter_new(["a", "b", "e", "e"]) == [0, 2]


def test_dedup_window_rebuilds_newest_first_up_to_capacity():
    consumed = []

    def chunks():
        for chunk in (["e", "f"], ["c", "d"], ["a", "b"]):
            consumed.append(chunk)
            yield chunk

    w = DedupWindow.from_newest_first(3, chunks())
    assert w.ids() == ["d", "e", "f"]
    assert len(consumed) == 2  # stops reading the chain once full


def test_snapshot_policy_steps_or_seconds():
    p = SnapshotPolicy(interval_s=2.0, every_steps=5)
    assert not p.due(4, 1.9) and p.due(5, 0.0) and p.due(0, 2.0)
    with pytest.raises(ValueError, match="interval_s must be > 0 or None, but -3 is given"):
        SnapshotPolicy(interval_s=-3)
    with pytest.raises(ValueError, match="cannot both be None"):
        SnapshotPolicy(interval_s=None, every_steps=None)
    with pytest.raises(ValueError, match="dedup_capacity must be > 0, but 0 is given"):
        PublisherConfig(dedup_capacity=0)


def test_partitions_are_split_disjointly_and_completely():
    for n in range(1, 9):
        for world in range(1, 5):
            parts = [partitions_for_rank(n, r, world) for r in range(world)]
            assert sorted(p for ps in parts for p in ps) == list(range(n))


def test_average_deltas_adds_up_counters():
    base = {"item_impressions": torch.tensor([5.0, 0.0, 1.0]), "w": torch.tensor([0.0])}
    a = {"item_impressions": torch.tensor([7.0, 1.0, 1.0]), "w": torch.tensor([2.0])}
    b = {"item_impressions": torch.tensor([6.0, 0.0, 1.0]), "w": torch.tensor([4.0])}
    out = average_deltas(base, [a, b])
    assert out["item_impressions"].tolist() == [8.0, 1.0, 1.0] and out["w"].tolist() == [3.0]


def test_average_deltas_keeps_sparse_updates_and_averages_dense_ones():
    base = {"emb": torch.zeros(4, 2), "dense": torch.ones(3), "step": torch.tensor(0)}
    a = {"emb": torch.tensor([[1.0, 1.0], [0, 0], [2, 2], [0, 0]]), "dense": torch.tensor([2.0, 2, 2]), "step": torch.tensor(1)}
    b = {"emb": torch.tensor([[3.0, 3.0], [0, 0], [0, 0], [4, 4]]), "dense": torch.tensor([0.0, 0, 0]), "step": torch.tensor(1)}
    out = average_deltas(base, [a, b])
    assert out["emb"].tolist() == [[2.0, 2.0], [0, 0], [2, 2], [4, 4]]
    assert out["dense"].tolist() == [1.0, 1.0, 1.0]
    assert out["step"].item() == 1
    assert average_deltas(base, [a])["emb"].tolist() == a["emb"].tolist()


def test_average_of_identical_states_is_that_state():
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(5, 3, generator=g)}
    s = {"w": base["w"] + torch.randn(5, 3, generator=g)}
    assert torch.allclose(average_deltas(base, [s, s, s])["w"], s["w"])
