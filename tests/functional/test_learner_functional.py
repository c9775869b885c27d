"""The whole learner loop in one process: real OnlineLearner (tiny config), in-memory
source and stores. Learning moves the model, a crash mid-cycle loses and repeats
nothing, fleet rounds merge and publish."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from em3 import codec
from em3.model import ModelConfig
from em3.stores import InMemoryContentStore, InMemoryHistoryStore
from learners.aggregate import Aggregator
from learners.loop import LoopConfig, MemorySampleSource
from learners.online import OnlineLearner
from learners.publisher import PublisherConfig, SnapshotPolicy, SnapshotPublisher
from learners.testing import InMemoryAppliedLog, InMemorySnapshotStore, synthetic_items, synthetic_samples
from learners.worker import LearnConfig, LineTrainer

LINE = "main"


@pytest.fixture(scope="module")
def model_config() -> ModelConfig:
    return ModelConfig.tiny("id_only")


def learn_config(model_config, **kw) -> LearnConfig:
    return LearnConfig(LINE, model_config.to_dict(), lr=1e-2, device="cpu",
                       loop=LoopConfig(batch_size=50, max_batch_wait_s=0.01),
                       policy=SnapshotPolicy(interval_s=0.5, every_steps=4),
                       publisher=PublisherConfig(retain_applied=True), **kw)


def stream(n: int, partitions: int = 2, dup_every: int = 0):
    """Encoded samples spread over partitions; every ``dup_every``-th is re-emitted later
    (as the join does after its own crash)."""
    samples = synthetic_samples(n, seed=3)
    parts: dict[str, list[bytes]] = {f"s:{p}": [] for p in range(partitions)}
    for k, s in enumerate(samples):
        key = f"s:{int(s.impression.user_id[1:]) % partitions}"
        parts[key].append(codec.encode(s))
        if dup_every and k % dup_every == 0:
            parts[key].append(codec.encode(s))
    return samples, parts


def trainer(model_config, records, snaps, applied, rank=0, world=1, **kw) -> LineTrainer:
    config = learn_config(model_config, **kw)
    learner = OnlineLearner(model_config, InMemoryContentStore(synthetic_items()), lr=config.lr, device="cpu")
    keys = sorted(records)[rank::world]
    source = MemorySampleSource({k: records[k] for k in keys})
    publisher = SnapshotPublisher(snaps, applied, LINE, model_config.to_dict(), config.publisher)
    return LineTrainer(learner, source, InMemoryHistoryStore(), publisher, config, rank, world,
                       history_len=model_config.history_len)


def drained(t: LineTrainer):
    src = t.source
    return lambda: all(src.positions[k] >= len(v) for k, v in src.records.items())


def audit(snaps, applied) -> Counter:
    """How many times each sample id appears in the lineage of the line's latest version."""
    return Counter(i for _, ids in applied.chain(LINE, snaps.latest_version(LINE)) for v in ids.values() for i in v)


def test_learning_moves_the_model_and_snapshots_carry_offsets(model_config):
    samples, records = stream(2000)
    snaps, applied = InMemorySnapshotStore(), InMemoryAppliedLog()
    t = trainer(model_config, records, snaps, applied)
    before = {k: v.clone() for k, v in t.learner.state_dict().items()}
    t.run(should_stop=drained(t))
    manifest, _ = snaps.get(LINE)
    assert manifest.offsets == {k: len(v) for k, v in records.items()}
    assert manifest.stats["totals"]["samples_applied"] == 2000
    assert manifest.stats["prequential"]["window_auc"] > 0.7
    assert t.source.committed == manifest.offsets
    after = t.learner.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert t.published == len(snaps.versions(LINE)) or t.published > 10


def test_a_crash_mid_cycle_loses_nothing_and_applies_nothing_twice(model_config):
    samples, records = stream(1200, dup_every=7)
    snaps, applied = InMemorySnapshotStore(), InMemoryAppliedLog()
    first = trainer(model_config, records, snaps, applied)
    first.run(max_cycles=2)
    # Learn three more batches, then "crash": nothing of them is published.
    for _ in range(3):
        first.loop.process(first.loop.poll_batch())
    crashed_at = dict(first.loop.positions)
    published_at = dict(snaps.get(LINE)[0].offsets)
    assert crashed_at != published_at
    second = trainer(model_config, records, snaps, applied)
    second.run(should_stop=drained(second))
    counts = audit(snaps, applied)
    assert set(counts) == {s.sample_id for s in samples}  # nothing lost
    assert max(counts.values()) == 1  # nothing applied twice, re-emitted duplicates included
    totals = snaps.get(LINE)[0].stats["totals"]
    assert totals["samples_applied"] == 1200 and totals["duplicates_dropped"] == sum(
        len(v) for v in records.values()) - 1200


def test_rollback_makes_the_learner_resume_from_the_rolled_back_version(model_config):
    samples, records = stream(600)
    snaps, applied = InMemorySnapshotStore(), InMemoryAppliedLog()
    t = trainer(model_config, records, snaps, applied)
    t.run(max_cycles=2)
    snaps.rollback(LINE, 1)
    t.run(should_stop=drained(t))
    counts = audit(snaps, applied)
    assert set(counts) == {s.sample_id for s in samples} and max(counts.values()) == 1


def test_two_trainers_averaged_by_the_aggregator_cover_the_stream_once(model_config):
    samples, records = stream(1600, partitions=4)
    snaps, applied = InMemorySnapshotStore(), InMemoryAppliedLog()
    config = learn_config(model_config)
    publisher = SnapshotPublisher(snaps, applied, LINE, model_config.to_dict(), config.publisher)
    agg = Aggregator(publisher, config, world=2)
    workers = [trainer(model_config, records, snaps, applied, rank=r, world=2) for r in range(2)]
    agg.start(workers[0].learner.state_dict())
    rounds = 0
    while not all(drained(w)() for w in workers):
        version, offsets = agg.base()
        results = [w.train_round(version, agg.base_state(), offsets) for w in workers]
        if rounds == 2:  # worker 1 "crashes": its round result is lost and re-run from the base
            workers[1] = trainer(model_config, records, snaps, applied, rank=1, world=2)
            results[1] = workers[1].train_round(version, agg.base_state(), offsets)
        agg.merge_and_publish(results)
        rounds += 1
    counts = audit(snaps, applied)
    assert set(counts) == {s.sample_id for s in samples} and max(counts.values()) == 1
    manifest = snaps.get(LINE)[0]
    assert manifest.offsets == {k: len(v) for k, v in records.items()}
    assert manifest.stats["learners"] == 2 and manifest.stats["prequential"]["window_auc"] > 0.65
