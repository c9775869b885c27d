"""Exact restarts on the real broker and Redis: an ``em3 learn --in-process`` learner
(tiny content model) SIGKILLed twice ends with the parameters of a learner that
learned the same batches without stopping; its checkpoints are signed, stored beside
the snapshots and pruned with them."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter

import pytest
import torch

from em3 import codec, snapshot
from em3.errors import SnapshotError
from em3.model import ModelConfig
from em3.app.services import wait_until
from learners.loop import LoopConfig
from learners.testing import synthetic_items, synthetic_samples

pytestmark = pytest.mark.integration

LINE = "exact"


def test_a_sigkilled_learner_ends_with_the_parameters_of_one_that_never_stopped(settings, redis_client,
                                                                               local_services):
    from em3.redis_stores import (
        RedisAppliedLog, RedisContentStore, RedisHistoryStore, RedisSnapshotStore,
    )
    from learners.lineage import lineage_batches, max_abs_difference, replay_batches
    from learners.loop import LearnerLoop, MemorySampleSource
    from learners.online import OnlineLearner
    from stream.kafka import ensure_topics, make_producer

    ensure_topics(settings.kafka, [settings.topics.samples], partitions=2)
    content = RedisContentStore(redis_client, settings.redis_prefix)
    content.put_many(synthetic_items())
    history = RedisHistoryStore(redis_client, settings.redis_prefix)
    samples = synthetic_samples(1500, seed=13)
    history.append_many((s.impression.user_id, s.impression.item_id, s.label_time) for s in samples if s.label)
    store = RedisSnapshotStore(redis_client, settings.redis_prefix, signing_key=settings.snapshot_key)
    argv = [sys.executable, "-m", "em3", "learn", "--in-process", "--tiny", "--variant", "em3",
            "--model-line", LINE, "--bootstrap-servers", local_services.bootstrap_servers,
            "--redis-url", local_services.redis_url, "--topic-prefix", settings.topics.prefix,
            "--redis-prefix", settings.redis_prefix, "--snapshot-interval-s", "0.3", "--batch-size", "32",
            "--max-batch-wait-s", "0.02", "--lr", "0.01", "--retain-applied"]
    env = {**os.environ, "EM3_SNAPSHOT_KEY": settings.snapshot_key, "OMP_NUM_THREADS": "1"}

    def applied() -> int:
        v = store.latest_version(LINE)
        return 0 if v is None else store.manifest(LINE, v).stats["totals"]["samples_applied"]

    def produce(part) -> None:
        producer = make_producer(settings.kafka)
        for k, s in enumerate(part):
            for _ in range(1 + (k % 13 == 0)):  # some re-emitted, as the join does after a crash
                producer.produce(settings.topics.samples, key=s.impression.user_id, value=codec.encode(s))
        assert producer.flush(15) == 0

    produce(samples[:700])
    resumes = {}
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        for target in (250, 900):
            wait_until(lambda: applied() > target, 120, f"no snapshot past {target} samples")
            os.kill(proc.pid, signal.SIGKILL)  # mid-stream: its unpublished cycle is lost
            proc.wait(10)
            if target == 250:
                produce(samples[700:])
            killed_at = store.latest_version(LINE)
            proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
            first = wait_until(lambda: (store.latest_version(LINE) or 0) > killed_at and store.latest_version(LINE),
                               120, "the restarted learner published nothing")
            resumes[first] = store.manifest(LINE, first).stats["resumed"]
        wait_until(lambda: applied() >= 1500, 120, "the stream was not fully learned")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()

    assert [r["checkpoint"] for r in resumes.values()] == [True, True], resumes
    latest = store.latest_version(LINE)
    applied_log = RedisAppliedLog(redis_client, settings.redis_prefix)
    counts = Counter(i for _, ids in applied_log.chain(LINE, latest) for v in ids.values() for i in v)
    assert set(counts) == {s.sample_id for s in samples} and max(counts.values()) == 1

    # Checkpoints: signed, beside each kept version.
    manifest, _ = store.get_checkpoint(LINE, latest)
    assert manifest.state_sha256 == store.manifest(LINE, latest).state_sha256 and manifest.signature
    with pytest.raises(SnapshotError, match="wrong signature"):
        RedisSnapshotStore(redis_client, settings.redis_prefix, signing_key="another").get_checkpoint(LINE, latest)
    assert all(redis_client.exists(f"{settings.redis_prefix}snap:{LINE}:{v}:ckpt") for v in store.versions(LINE))

    # A learner that never stopped, learning the final version's lineage batch for batch.
    config = ModelConfig.tiny("em3")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the learner process ran
    try:
        loop = LearnerLoop(OnlineLearner(config, content, lr=0.01, device="cpu"), MemorySampleSource({}), history,
                           LoopConfig(batch_size=32), history_len=config.history_len)
        lineage = lineage_batches(applied_log, LINE, latest)
        records = {s.sample_id: codec.encode(s) for s in samples}
        assert replay_batches(loop, [b for _, batches in lineage for b in batches], records) == 1500
    finally:
        torch.set_num_threads(threads)
    _, final = snapshot.load_state(store, LINE, latest)
    diff, where = max_abs_difference(final, loop.learner.state_dict())
    assert diff <= 1e-6, f"{where} differs by {diff}"


def test_checkpoints_are_written_with_their_snapshot_and_pruned_with_it(settings, redis_client):
    from em3.redis_stores import RedisAppliedLog, RedisSnapshotStore
    from learners.publisher import PublisherConfig, SnapshotPublisher

    store = RedisSnapshotStore(redis_client, settings.redis_prefix, keep=2, signing_key=settings.snapshot_key)
    pub = SnapshotPublisher(store, RedisAppliedLog(redis_client, settings.redis_prefix), "prune", {"embed_dim": 4},
                            PublisherConfig(full_every=0))
    parent = None
    for n in range(4):
        state = {"w": torch.full((2,), float(n))}
        ckpt = ({"adam/w/step": torch.tensor(float(n))}, {"steps": n})
        parent = pub.publish(state, parent=parent, offsets={}, applied_ids={}, stats={}, batches=[],
                             checkpoints={0: ckpt}).version
    assert store.versions("prune") == [3, 4]
    key = f"{settings.redis_prefix}snap:prune"
    assert [bool(redis_client.exists(f"{key}:{v}:ckpt")) for v in (1, 2, 3, 4)] == [False, False, True, True]
    point = pub.resume()
    assert point.version == 4 and point.checkpoint[1] == {"steps": 3}
