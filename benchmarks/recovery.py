"""Recovery: a stream learned by a learner process that is SIGKILLed and restarted.

Starts the embedded broker and Redis, produces a seeded sample stream at a steady
rate (with about ``--dup-rate`` of the samples emitted twice, as the join does after
its own crashes), runs ``em3 learn --in-process`` (tiny config) in a subprocess,
SIGKILLs it ``--kills`` times at random moments while the stream flows (each time
once it has published at least one snapshot since starting) and restarts it, then
lets the last process drain the stream.

How "applied" is recorded: each published snapshot version has, beside it and
written before its publish, the list of sample ids its cycle passed to
``learn_batch`` (:class:`em3.redis_stores.RedisAppliedLog`); a version whose
publish never happened (the process died) is not reachable from the line's
pointer. Walking ``parent`` links from the final version gives exactly the
samples in the final model's lineage, each in the one version that learned it.
``lost`` = produced ids missing from it, ``applied_twice`` = ids in it more than once.
Independently, the final manifest's cumulative ``samples_applied`` counter (which
rides in the snapshot, so a killed cycle's counts vanish with it) must equal the
number of distinct produced samples.

Run::

    python benchmarks/recovery.py --samples 20000 --rate 500 --kills 3
    python benchmarks/recovery.py --learners 2 --kill-aggregator --kills 4   # Ray actors

The last printed line is one JSON object: restarts, lost, applied_twice, ...
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from em3 import codec
from em3.config import KafkaSettings, RedisSettings, Settings, TopicNames
from em3.redis_stores import RedisAppliedLog, RedisContentStore, RedisSnapshotStore, connect
from em3.app.services import LocalServices
from learners.testing import synthetic_items, synthetic_samples
from stream.kafka import ensure_topics, make_producer

LINE = "recovery"


class ProcessRunner:
    """One ``em3 learn --in-process`` subprocess; a kill is a SIGKILL and a restart."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.argv, self.env, self.proc = argv, env, None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def kill(self) -> str:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.start()
        return "learner process"

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class FleetRunner:
    """N Ray learner actors and an aggregator (in this process's Ray runtime); a kill
    SIGKILLs one of their processes at random and Ray restarts it."""

    def __init__(self, settings, args, rng: random.Random) -> None:
        from em3.model import ModelConfig
        from learners import LearnConfig, LearnerFleet, LoopConfig, PublisherConfig, SnapshotPolicy

        config = LearnConfig(LINE, ModelConfig.tiny("id_only").to_dict(), lr=0.01, device="cpu",
                             loop=LoopConfig(batch_size=64, max_batch_wait_s=0.05),
                             policy=SnapshotPolicy(interval_s=args.snapshot_interval_s),
                             publisher=PublisherConfig(retain_applied=True))
        self.fleet = LearnerFleet(settings, config, args.learners,
                                  ray_init_kwargs={"num_cpus": args.learners, "configure_logging": False})
        self.kill_aggregator = args.kill_aggregator
        self.rng = rng
        self.thread = None
        self.kills = 0

    def start(self) -> None:
        self.fleet.start()
        self.thread = threading.Thread(target=self.fleet.run, daemon=True)
        self.thread.start()

    def kill(self) -> str:
        self.kills += 1
        if self.kill_aggregator and self.kills == 2:  # the second kill hits the aggregator
            name, pid = "aggregator", self.fleet.aggregator_pid()
        else:
            name, pid = self.rng.choice([(f"learner {i}", p) for i, p in enumerate(self.fleet.pids())])
        os.kill(pid, signal.SIGKILL)
        return name

    def stop(self) -> None:
        self.fleet.stop()
        self.thread.join(60)
        self.fleet.shutdown()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--rate", type=float, default=500.0, help="samples per second produced")
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--learners", type=int, default=1,
                        help="1: an `em3 learn --in-process` subprocess; N >= 2: N Ray learner actors + aggregator")
    parser.add_argument("--kill-aggregator", action="store_true", help="with --learners >= 2: the aggregator "
                        "is the second kill's target")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--dup-rate", type=float, default=0.05)
    parser.add_argument("--snapshot-interval-s", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-s", type=float, default=300.0)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    t_start = time.monotonic()

    with tempfile.TemporaryDirectory() as tmp, LocalServices(Path(tmp)) as services:
        info = services.info
        kafka, redis_settings = KafkaSettings(info.bootstrap_servers), RedisSettings(info.redis_url)
        prefix, topic_prefix = "rec:", "rec."
        samples_topic = f"{topic_prefix}samples"
        ensure_topics(kafka, [samples_topic], partitions=args.partitions)
        client = connect(redis_settings)
        RedisContentStore(client, prefix).put_many(synthetic_items())
        store = RedisSnapshotStore(client, prefix, signing_key=info.snapshot_key)
        samples = synthetic_samples(args.samples, seed=args.seed)

        produced_so_far = [0]

        def produce() -> None:
            producer = make_producer(kafka, linger_ms=5)
            chunk = max(1, int(args.rate / 20))
            for start in range(0, len(samples), chunk):
                for s in samples[start : start + chunk]:
                    value = codec.encode(s)
                    producer.produce(samples_topic, key=s.impression.user_id, value=value)
                    if rng.random() < args.dup_rate:
                        producer.produce(samples_topic, key=s.impression.user_id, value=value)
                producer.poll(0)
                produced_so_far[0] = min(len(samples), start + chunk)
                time.sleep(chunk / args.rate)
            producer.flush(30)

        argv_learn = [sys.executable, "-m", "em3", "learn", "--in-process", "--tiny", "--variant", "id_only",
                      "--model-line", LINE, "--bootstrap-servers", info.bootstrap_servers, "--redis-url",
                      info.redis_url, "--topic-prefix", topic_prefix, "--redis-prefix", prefix,
                      "--snapshot-interval-s", str(args.snapshot_interval_s), "--batch-size", "64",
                      "--max-batch-wait-s", "0.05", "--lr", "0.01", "--retain-applied"]
        env = {**os.environ, **info.env(), "OMP_NUM_THREADS": "1"}

        def latest() -> tuple[int | None, int]:
            v = store.latest_version(LINE)
            return v, (0 if v is None else int(store.manifest(LINE, v).stats["totals"]["samples_applied"]))

        producer_thread = threading.Thread(target=produce, daemon=True)
        producer_thread.start()
        if args.learners == 1:
            runner = ProcessRunner(argv_learn, env)
        else:
            settings = Settings(kafka, redis_settings, TopicNames(topic_prefix), prefix)
            runner = FleetRunner(settings, args, rng)
        restarts, killed_at = 0, []
        runner.start()
        deadline = time.monotonic() + args.timeout_s
        try:
            for _ in range(args.kills):
                version_at_start = latest()[0]
                while latest()[0] == version_at_start and time.monotonic() < deadline:
                    time.sleep(0.05)  # it has resumed and published at least once
                time.sleep(rng.uniform(0.3, 2.0))
                target = runner.kill()
                version, applied_then = latest()
                killed_at.append({"target": target, "published_version": version,
                                  "published_applied": applied_then, "produced": produced_so_far[0]})
                restarts += 1
            producer_thread.join()
            distinct = len({s.sample_id for s in samples})
            while latest()[1] < distinct and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            runner.stop()
        version, applied_counter = latest()
        counts = Counter(i for _, ids in RedisAppliedLog(client, prefix).chain(LINE, version)
                         for values in ids.values() for i in values)
        produced = {s.sample_id for s in samples}
        manifest = store.manifest(LINE, version)
        result = {
            "restarts": restarts,
            "learners": args.learners,
            "lost": len(produced - set(counts)),
            "applied_twice": sum(c - 1 for c in counts.values() if c > 1),
            "produced": len(samples),
            "distinct": len(produced),
            "applied": sum(counts.values()),
            "applied_counter_in_snapshot": applied_counter,
            "duplicates_dropped": int(manifest.stats["totals"]["duplicates_dropped"]),
            "versions": version,
            "kills_mid_stream": sum(k["produced"] < len(samples) for k in killed_at),
            "kills": killed_at,
            "snapshot_interval_s": args.snapshot_interval_s,
            "window_auc": manifest.stats["prequential"].get("window_auc"),
            "seconds": round(time.monotonic() - t_start, 1),
        }
        client.close()
    return result


if __name__ == "__main__":
    out = main()
    print(json.dumps(out))
