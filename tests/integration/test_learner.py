"""Learners on the real broker and Redis: learning moves the model, snapshots carry
offsets and are committed after publishing, a SIGKILLed learner process loses and
repeats nothing."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from em3 import codec
from em3.model import ModelConfig
from em3.app.services import wait_until
from learners.loop import LoopConfig
from learners.publisher import PublisherConfig, SnapshotPolicy
from learners.testing import synthetic_items, synthetic_samples
from learners.worker import LearnConfig

pytestmark = pytest.mark.integration

PARTITIONS = 2


def produce(settings, samples, duplicates_every: int = 0) -> None:
    from stream.kafka import make_producer

    producer = make_producer(settings.kafka)
    for k, s in enumerate(samples):
        value = codec.encode(s)
        producer.produce(settings.topics.samples, key=s.impression.user_id, value=value)
        if duplicates_every and k % duplicates_every == 0:  # the join re-emitting after its crash
            producer.produce(settings.topics.samples, key=s.impression.user_id, value=value)
    assert producer.flush(15) == 0


def prepare(settings, redis_client) -> None:
    from em3.redis_stores import RedisContentStore
    from stream.kafka import ensure_topics

    ensure_topics(settings.kafka, [settings.topics.samples], partitions=PARTITIONS)
    RedisContentStore(redis_client, settings.redis_prefix).put_many(synthetic_items())


def audit(settings, redis_client, line: str) -> Counter:
    from em3.redis_stores import RedisAppliedLog, RedisSnapshotStore

    latest = RedisSnapshotStore(redis_client, settings.redis_prefix, signing_key=settings.snapshot_key).latest_version(line)
    chain = RedisAppliedLog(redis_client, settings.redis_prefix).chain(line, latest)
    return Counter(i for _, ids in chain for values in ids.values() for i in values)


def config(line: str, **kw) -> LearnConfig:
    return LearnConfig(line, ModelConfig.tiny("id_only").to_dict(), lr=1e-2, device="cpu",
                       loop=LoopConfig(batch_size=64, max_batch_wait_s=0.05),
                       policy=SnapshotPolicy(interval_s=0.5),
                       publisher=PublisherConfig(retain_applied=True), **kw)


def test_learning_moves_the_model_and_snapshots_carry_committed_offsets(settings, redis_client):
    from em3.redis_stores import RedisSnapshotStore
    from learners.worker import LearnerWorker

    prepare(settings, redis_client)
    samples = synthetic_samples(1500, seed=5)
    produce(settings, samples)
    worker = LearnerWorker(settings, config("it"))
    try:
        initial = {k: v.clone() for k, v in worker.learner.state_dict().items()}
        deadline = time.monotonic() + 60
        worker.run(lambda: worker.loop.totals["samples_applied"] >= 1500 or time.monotonic() > deadline)
        store = RedisSnapshotStore(redis_client, settings.redis_prefix, signing_key=settings.snapshot_key)
        manifest, _ = store.get("it")
        assert sum(manifest.offsets.values()) == 1500
        assert sorted(manifest.offsets) == [f"{settings.topics.samples}:{p}" for p in range(PARTITIONS)]
        assert manifest.stats["totals"]["samples_applied"] == 1500
        assert manifest.stats["prequential"]["window_auc"] > 0.65
        assert worker.source.committed() == manifest.offsets  # committed after publishing
        assert len(store.versions("it")) >= 2
        moved = worker.learner.state_dict()
        assert any(not (moved[k] == initial[k]).all() for k in initial)
    finally:
        worker.close()


def test_a_sigkilled_learner_process_loses_nothing_and_applies_nothing_twice(settings, redis_client, local_services):
    from em3.redis_stores import RedisSnapshotStore

    prepare(settings, redis_client)
    line = "crash"
    store = RedisSnapshotStore(redis_client, settings.redis_prefix, signing_key=settings.snapshot_key)
    argv = [sys.executable, "-m", "em3", "learn", "--in-process", "--tiny", "--variant", "id_only",
            "--model-line", line, "--bootstrap-servers", local_services.bootstrap_servers,
            "--redis-url", local_services.redis_url, "--topic-prefix", settings.topics.prefix,
            "--redis-prefix", settings.redis_prefix, "--snapshot-interval-s", "0.3", "--batch-size", "32",
            "--max-batch-wait-s", "0.02", "--lr", "0.01", "--retain-applied"]

    env = {**os.environ, "EM3_SNAPSHOT_KEY": settings.snapshot_key}

    def applied() -> int:
        v = store.latest_version(line)
        return 0 if v is None else store.manifest(line, v).stats["totals"]["samples_applied"]

    samples = synthetic_samples(3000, seed=7)
    produce(settings, samples[:1500], duplicates_every=9)
    kills = 0
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        wait_until(lambda: applied() > 200, 60, "no snapshot from the first learner")
        os.kill(proc.pid, signal.SIGKILL)  # mid-stream: its unpublished cycle is lost
        proc.wait(10)
        kills += 1
        produce(settings, samples[1500:], duplicates_every=9)
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        wait_until(lambda: applied() > 1700, 60, "the restarted learner made no progress")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        kills += 1
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        wait_until(lambda: applied() >= 3000, 60, "the stream was not fully learned")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    counts = audit(settings, redis_client, line)
    assert kills == 2
    assert set(counts) == {s.sample_id for s in samples}, "samples lost"
    assert max(counts.values()) == 1, "samples applied twice"
    manifest = store.manifest(line, store.latest_version(line))
    assert manifest.stats["totals"]["duplicates_dropped"] >= 3000 // 9


def test_snapshots_cli_lists_shows_and_rolls_back(settings, redis_client, local_services):
    import json

    import torch

    from em3.redis_stores import RedisAppliedLog, RedisSnapshotStore
    from learners.publisher import SnapshotPublisher

    store = RedisSnapshotStore(redis_client, settings.redis_prefix, signing_key=settings.snapshot_key)
    pub = SnapshotPublisher(store, RedisAppliedLog(redis_client, settings.redis_prefix), "cli", {"embed_dim": 4})
    v1 = pub.publish({"w": torch.zeros(2)}, parent=None, offsets={"s:0": 5}, applied_ids={"s:0": ["a"]},
                     stats={"totals": {"samples_applied": 1}, "prequential": {"window_auc": 0.5}}).version
    v2 = pub.publish({"w": torch.ones(2)}, parent=v1, offsets={"s:0": 9}, applied_ids={"s:0": ["b"]},
                     stats={"totals": {"samples_applied": 2}, "prequential": {"window_auc": None}}).version
    base = [sys.executable, "-m", "em3", "snapshots"]
    flags = ["--redis-url", local_services.redis_url, "--redis-prefix", settings.redis_prefix]

    def em3(*args: str) -> str:
        done = subprocess.run(base + list(args) + flags, capture_output=True, text=True, timeout=60,
                              env={**os.environ, "EM3_SNAPSHOT_KEY": settings.snapshot_key})
        assert done.returncode == 0, done.stderr
        return done.stdout

    listing = em3("list", "cli")
    assert f"* {v2:>7}" in listing and '{"s:0": 5}' in listing and "0.5000" in listing
    assert json.loads(em3("show", "cli", str(v1)))["offsets"] == {"s:0": 5}
    assert json.loads(em3("rollback", "cli"))["latest"] == v1
    assert store.latest_version("cli") == v1
    assert "cli" in json.loads(em3("list"))["lines"]


def test_a_forged_pointer_does_not_stall_the_publisher_but_a_rollback_is_honoured(settings, redis_client):
    """Someone without the snapshot key moves the line's pointer to a forged version:
    the learner publishes over it (it used to resume, skip the forgery and stall for
    good: found by benchmarks/chaos.py). A real rollback still stops it."""
    import msgspec
    import torch

    from em3.redis_stores import RedisAppliedLog, RedisSnapshotStore
    from learners.publisher import LineMovedError, SnapshotPublisher

    store = RedisSnapshotStore(redis_client, settings.redis_prefix, signing_key=settings.snapshot_key)
    pub = SnapshotPublisher(store, RedisAppliedLog(redis_client, settings.redis_prefix), "forge", {"embed_dim": 4})
    args = {"offsets": {"s:0": 1}, "applied_ids": {"s:0": ["a"]}, "stats": {}}
    v1 = pub.publish({"w": torch.zeros(2)}, parent=None, **args).version
    manifest, blob = store.get("forge", v1)
    forged = store.next_version("forge")
    key = f"{settings.redis_prefix}snap:forge"
    redis_client.set(f"{key}:{forged}:blob", blob)
    redis_client.set(f"{key}:{forged}:manifest",
                     msgspec.json.encode(msgspec.structs.replace(manifest, version=forged, signature="")))
    redis_client.zadd(f"{key}:versions", {str(forged): forged})
    redis_client.set(f"{key}:latest", forged)
    v3 = pub.publish({"w": torch.ones(2)}, parent=v1, **args).version
    assert store.latest_version("forge") == v3 > forged
    store.rollback("forge", v1)  # a signed, deliberate move: honoured
    with pytest.raises(LineMovedError):
        pub.publish({"w": torch.ones(2)}, parent=v3, **args)
