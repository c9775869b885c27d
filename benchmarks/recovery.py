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
from em3.config import KafkaSettings, RedisSettings
from em3.redis_stores import RedisAppliedLog, RedisContentStore, RedisSnapshotStore, connect
from em3.services import LocalServices
from learners.testing import synthetic_items, synthetic_samples
from stream.kafka import ensure_topics, make_producer

LINE = "recovery"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--rate", type=float, default=500.0, help="samples per second produced")
    parser.add_argument("--kills", type=int, default=3)
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
        store = RedisSnapshotStore(client, prefix)
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
        env = {**os.environ, "OMP_NUM_THREADS": "1"}

        def latest() -> tuple[int | None, int]:
            v = store.latest_version(LINE)
            return v, (0 if v is None else int(store.manifest(LINE, v).stats["totals"]["samples_applied"]))

        producer_thread = threading.Thread(target=produce, daemon=True)
        producer_thread.start()
        restarts, killed_at = 0, []
        proc = subprocess.Popen(argv_learn, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + args.timeout_s
        try:
            for _ in range(args.kills):
                version_at_start = latest()[0]
                while latest()[0] == version_at_start and time.monotonic() < deadline:
                    time.sleep(0.05)  # it has resumed and published at least once
                time.sleep(rng.uniform(0.3, 2.0))
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)
                version, applied_then = latest()
                killed_at.append({"published_version": version, "published_applied": applied_then,
                                  "produced": produced_so_far[0]})
                restarts += 1
                proc = subprocess.Popen(argv_learn, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            producer_thread.join()
            distinct = len({s.sample_id for s in samples})
            while latest()[1] < distinct and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        version, applied_counter = latest()
        counts = Counter(i for _, ids in RedisAppliedLog(client, prefix).chain(LINE, version)
                         for values in ids.values() for i in values)
        produced = {s.sample_id for s in samples}
        manifest = store.manifest(LINE, version)
        result = {
            "restarts": restarts,
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
