"""A deleted user in the learner loop (real OnlineLearner, tiny config, in-memory
stores): the next snapshot has the user's rows reset (embedding, counters), the
version is reported, and the user's samples still in flight are dropped, so the
rows stay reset; the other users' rows keep what they learned. Single learner and
a fleet's aggregator alike."""
from __future__ import annotations

import pytest
import torch

from em3 import codec
from em3.model import USER_ROW_STATE, ModelConfig, user_rows
from em3.privacy import TombstoneFilter, tombstone_id
from em3.snapshot import load_state
from learners.aggregate import Aggregator
from learners.loop import CycleResult, LoopConfig, MemorySampleSource
from learners.online import OnlineLearner
from learners.privacy import ErasureDuty
from learners.publisher import PublisherConfig, SnapshotPolicy, SnapshotPublisher
from learners.testing import (InMemoryAppliedLog, InMemoryPrivacyStore, InMemorySnapshotStore, synthetic_items,
                              synthetic_samples)
from learners.worker import LearnConfig, LineTrainer
from em3.stores import InMemoryContentStore, InMemoryHistoryStore

LINE = "main"


@pytest.fixture(scope="module")
def model_config() -> ModelConfig:
    return ModelConfig.tiny("id_only")


def _users_apart(config: ModelConfig, n: int = 20) -> tuple[str, list[str]]:
    """A user to delete whose row no other of the ``n`` users shares."""
    rows = user_rows(config.user_buckets, [f"u{k}" for k in range(n)])
    for k in range(n):
        if rows.count(rows[k]) == 1:
            return f"u{k}", [f"u{j}" for j in range(n) if j != k]
    raise AssertionError("every user collides")


def _rows(state, config, user: str) -> dict[str, torch.Tensor]:
    row = user_rows(config.user_buckets, [user])[0]
    return {name: state[name][row] for name in USER_ROW_STATE if name in state}


def test_a_deleted_users_rows_are_reset_in_the_next_snapshot_and_stay_reset(model_config):
    gone, others = _users_apart(model_config)
    samples = synthetic_samples(1200, seed=5)
    first, second = samples[:600], samples[600:]
    source = MemorySampleSource({"s:0": [codec.encode(s) for s in first]})
    privacy = InMemoryPrivacyStore()
    config = LearnConfig(LINE, model_config.to_dict(), lr=1e-2, device="cpu",
                         loop=LoopConfig(batch_size=50, max_batch_wait_s=0.01),
                         policy=SnapshotPolicy(interval_s=0.3, every_steps=3), publisher=PublisherConfig(full_every=3))
    snaps, applied = InMemorySnapshotStore(), InMemoryAppliedLog()
    learner = OnlineLearner(model_config, InMemoryContentStore(synthetic_items()), lr=config.lr, device="cpu")
    trainer = LineTrainer(learner, source, InMemoryHistoryStore(),
                          SnapshotPublisher(snaps, applied, LINE, model_config.to_dict(), config.publisher),
                          config, history_len=model_config.history_len,
                          duty=ErasureDuty(privacy, LINE), tombstones=TombstoneFilter(privacy.tombstoned))
    drained = lambda: source.positions["s:0"] >= len(source.records["s:0"])  # noqa: E731
    trainer.run(should_stop=drained)
    _, before = load_state(snaps, LINE)
    assert all(bool(t.abs().sum() > 0) for t in _rows(before, model_config, gone).values())  # it learned the user
    assert LINE in privacy.lines  # the line's heartbeat

    tid = privacy.delete(gone)  # the deletion agent: tombstone, owe the reset
    source.append("s:0", [codec.encode(s) for s in second])
    trainer.run(should_stop=drained)
    manifest, after = load_state(snaps, LINE)  # through the delta chain
    assert privacy.resets[tid][LINE] <= manifest.version
    assert all(bool((t == 0).all()) for t in _rows(after, model_config, gone).values())
    in_flight = sum(s.impression.user_id == gone for s in second)
    assert in_flight > 0 and manifest.stats["totals"]["erased_dropped"] == in_flight
    others_rows = [user_rows(model_config.user_buckets, [u])[0] for u in others]
    assert bool(after["user_emb.table.weight"][others_rows].abs().sum(1).gt(0).all())
    assert privacy.owed_by(LINE, privacy.pending()) == {}  # nothing owed any more


def test_the_fleet_aggregator_resets_the_rows_of_the_merged_state(model_config):
    gone, _ = _users_apart(model_config)
    privacy = InMemoryPrivacyStore()
    config = LearnConfig(LINE, model_config.to_dict(), device="cpu")
    snaps, applied = InMemorySnapshotStore(), InMemoryAppliedLog()
    agg = Aggregator(SnapshotPublisher(snaps, applied, LINE, model_config.to_dict(), config.publisher), config,
                     world=2, duty=ErasureDuty(privacy, LINE))
    learner = OnlineLearner(model_config, InMemoryContentStore(synthetic_items()), device="cpu")
    learner.learn_batch(synthetic_samples(200, seed=1), [[] for _ in range(200)])
    agg.start(learner.state_dict())
    tid = privacy.delete(gone)
    empty = CycleResult({}, {}, {}, torch.zeros(0).numpy(), torch.zeros(0).numpy())
    out = agg.merge_and_publish([empty, empty])  # nothing read: published anyway, for the reset
    assert out["published"] and privacy.resets[tid] == {LINE: out["version"]}
    _, state = load_state(snaps, LINE)
    assert all(bool((t == 0).all()) for t in _rows(state, model_config, gone).values())
    assert tombstone_id(gone) == tid
