"""Exact restarts: a learner killed twice mid-cycle and restarted from the line's
snapshots and learner checkpoints ends with the parameters of a learner that learned
the same batches without stopping (in-memory stores, the tiny content model with
cached history content, so optimizer moments, step counter and history cache all
matter). Without the checkpoints the same crashes leave it measurably elsewhere. A fleet
learner restarted mid-round ends where the fleet without the crash does."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from em3 import codec, snapshot
from em3.checkpoint import unpack_checkpoint
from em3.errors import SnapshotError
from em3.model import ModelConfig
from em3.stores import InMemoryContentStore, InMemoryHistoryStore
from learners.lineage import lineage_batches, max_abs_difference, replay_batches
from learners.loop import LearnerLoop, LoopConfig, MemorySampleSource
from learners.online import OnlineLearner
from learners.publisher import PublisherConfig, SnapshotPolicy, SnapshotPublisher
from learners.testing import InMemoryAppliedLog, InMemorySnapshotStore, synthetic_items, synthetic_samples
from learners.worker import LearnConfig, LineTrainer

LINE = "main"
KEY = "test-snapshot-key"
LOOP = LoopConfig(batch_size=40, max_batch_wait_s=0.01)


@pytest.fixture(scope="module")
def model_config() -> ModelConfig:
    return ModelConfig.tiny("em3")


@pytest.fixture(scope="module")
def world():
    """Encoded samples on two partitions (some re-emitted) and the users' click histories."""
    samples = synthetic_samples(900, seed=11)
    history = InMemoryHistoryStore()
    history.append_many((s.impression.user_id, s.impression.item_id, s.impression.served_at + 1.0)
                        for s in samples if s.label)
    records: dict[str, list[bytes]] = {"s:0": [], "s:1": []}
    for k, s in enumerate(samples):
        key = f"s:{int(s.impression.user_id[1:]) % 2}"
        records[key].append(codec.encode(s))
        if k % 11 == 0:
            records[key].append(codec.encode(s))
    return samples, records, history


def learner(model_config) -> OnlineLearner:
    return OnlineLearner(model_config, InMemoryContentStore(synthetic_items()), lr=1e-2, device="cpu", seed=5)


def trainer(model_config, world, snaps, applied) -> LineTrainer:
    _, records, history = world
    config = LearnConfig(LINE, model_config.to_dict(), lr=1e-2, device="cpu", seed=5, loop=LOOP,
                         policy=SnapshotPolicy(interval_s=60.0, every_steps=3),
                         publisher=PublisherConfig(retain_applied=True, full_every=3))
    publisher = SnapshotPublisher(snaps, applied, LINE, model_config.to_dict(), config.publisher)
    return LineTrainer(learner(model_config), MemorySampleSource(records), history, publisher, config,
                       history_len=model_config.history_len)


def crash_twice_and_drain(model_config, world, snaps, applied, drop_checkpoints: bool = False) -> list[dict]:
    """Two learners each publish two cycles, learn three more batches and die; a third
    drains the stream. Returns the ``resumed`` notes of the restarted learners."""
    notes = []
    for crash in range(3):
        if drop_checkpoints:
            snaps.checkpoints.clear()  # as if the snapshots had been published without them
        t = trainer(model_config, world, snaps, applied)
        if crash == 2:
            src = t.source
            t.run(should_stop=lambda: all(src.positions[k] >= len(v) for k, v in src.records.items()))
        else:
            t.run(max_cycles=2)
            for _ in range(3):  # learned, never published: lost with the process
                t.loop.process(t.loop.poll_batch())
        if crash:
            notes.append(snaps.get(LINE, _first_after_resume(snaps, applied))[0].stats["resumed"])
    return notes


def _first_after_resume(snaps, applied) -> int:
    """The newest kept version whose manifest says it follows a resume."""
    return max(v for v in snaps.versions(LINE) if "resumed" in snaps.get(LINE, v)[0].stats)


def uncrashed(model_config, world, snaps, applied) -> dict[str, torch.Tensor]:
    """A learner that never stopped, learning the final version's lineage batch for batch."""
    samples, _, history = world
    records = {s.sample_id: codec.encode(s) for s in samples}
    loop = LearnerLoop(learner(model_config), MemorySampleSource({}), history, LOOP,
                       history_len=model_config.history_len)
    lineage = lineage_batches(applied, LINE, snaps.latest_version(LINE))
    learned = replay_batches(loop, [b for _, batches in lineage for b in batches], records)
    assert learned == len(samples)
    return loop.learner.state_dict()


@pytest.mark.slow  # long streams; the full suite runs it
def test_a_learner_killed_twice_ends_exactly_where_an_uncrashed_one_does(model_config, world):
    samples = world[0]
    snaps, applied = InMemorySnapshotStore(keep=50, signing_key=KEY), InMemoryAppliedLog()
    notes = crash_twice_and_drain(model_config, world, snaps, applied)
    assert notes == [{"from": notes[0]["from"], "checkpoint": True}, {"from": notes[1]["from"], "checkpoint": True}]
    assert snaps.get(LINE, notes[0]["from"])[0].kind == "delta"  # a checkpoint keyed to a delta version
    counts = Counter(i for _, ids in applied.chain(LINE, snaps.latest_version(LINE)) for v in ids.values() for i in v)
    assert set(counts) == {s.sample_id for s in samples} and max(counts.values()) == 1
    _, final = snapshot.load_state(snaps, LINE)
    diff, where = max_abs_difference(final, uncrashed(model_config, world, snaps, applied))
    assert diff <= 1e-6, f"{where} differs by {diff}"


@pytest.mark.slow  # long streams; the full suite runs it
def test_without_learner_checkpoints_the_same_crashes_move_the_parameters(model_config, world):
    snaps, applied = InMemorySnapshotStore(keep=50, signing_key=KEY), InMemoryAppliedLog()
    notes = crash_twice_and_drain(model_config, world, snaps, applied, drop_checkpoints=True)
    assert [n["checkpoint"] for n in notes] == [False, False]
    _, final = snapshot.load_state(snaps, LINE)
    diff, _ = max_abs_difference(final, uncrashed(model_config, world, snaps, applied))
    assert diff > 1e-4  # what the checkpoints are for: the comparison can fail


def test_a_checkpoint_of_another_state_or_with_a_bad_signature_is_not_used(model_config, world):
    snaps, applied = InMemorySnapshotStore(keep=50, signing_key=KEY), InMemoryAppliedLog()
    t = trainer(model_config, world, snaps, applied)
    t.run(max_cycles=1)
    version = snaps.latest_version(LINE)
    manifest, blob = snaps.get_checkpoint(LINE, version)
    assert manifest.signature and manifest.state_sha256 == snaps.get(LINE, version)[0].state_sha256
    with pytest.raises(SnapshotError, match="another state"):
        unpack_checkpoint(blob, manifest, state_sha256="0" * 64)
    with pytest.raises(SnapshotError, match="checksum"):
        unpack_checkpoint(blob[:-1] + bytes([blob[-1] ^ 1]), manifest)
    other = InMemorySnapshotStore(signing_key="another key")
    other.checkpoints = snaps.checkpoints
    with pytest.raises(SnapshotError, match="wrong signature"):
        other.get_checkpoint(LINE, version)
    # A resuming learner falls back to fresh optimizer state and says so.
    snaps.checkpoints[(LINE, version)] = {0: (manifest, blob[:-1] + bytes([blob[-1] ^ 1]))}
    resumed = trainer(model_config, world, snaps, applied)
    assert resumed.resume() == version and resumed.status()["resumed"] == {"from": version, "checkpoint": False}


@pytest.mark.slow  # long streams; the full suite runs it
def test_a_fleet_learner_restarted_mid_round_ends_where_the_fleet_without_the_crash_does(model_config, world):
    """Two learners averaged each round; in one run learner 1 dies in round 2 and a new
    one re-runs that round from the base and its own checkpoint of it."""
    from learners.aggregate import Aggregator

    def fleet_run(crash: bool) -> dict[str, torch.Tensor]:
        snaps, applied = InMemorySnapshotStore(keep=50, signing_key=KEY), InMemoryAppliedLog()
        _, records, history = world
        config = LearnConfig(LINE, model_config.to_dict(), lr=1e-2, device="cpu", seed=5, loop=LOOP,
                             policy=SnapshotPolicy(interval_s=600.0, every_steps=3),
                             publisher=PublisherConfig(retain_applied=True))

        def member(rank: int) -> LineTrainer:
            publisher = SnapshotPublisher(snaps, applied, LINE, model_config.to_dict(), config.publisher)
            return LineTrainer(learner(model_config), MemorySampleSource({f"s:{rank}": records[f"s:{rank}"]}),
                               history, publisher, config, rank, 2, history_len=model_config.history_len)

        agg = Aggregator(SnapshotPublisher(snaps, applied, LINE, model_config.to_dict(), config.publisher),
                         config, world=2)
        members = [member(0), member(1)]
        agg.start(members[0].learner.state_dict())
        for round_ in range(4):
            version, offsets = agg.base()
            results = [m.train_round(version, agg.base_state(), offsets) for m in members]
            if crash and round_ == 2:  # learner 1's round is lost with its process
                members[1] = member(1)
                results[1] = members[1].train_round(version, agg.base_state(), offsets)
            agg.merge_and_publish(results)
        return snapshot.load_state(snaps, LINE)[1]

    diff, where = max_abs_difference(fleet_run(crash=False), fleet_run(crash=True))
    assert diff <= 1e-6, f"{where} differs by {diff}"
