"""Freshness: from a click's production to the first /v1/rank answer served by a
snapshot whose offsets include it.

Starts the embedded broker and Redis, a learner (``em3 learn``: by default the
default ``em3`` model through a Ray learner actor, publishing delta snapshots every
second; ``--runtime in_process --tiny --variant id_only`` for the small in-process
one) and a ranking server (``em3 serve``) as subprocesses, keeps a background
stream of samples flowing, and every ``--probe-every-s`` produces a probe click: a
positive labelled sample on the samples topic (``--through direct``, the learner's
input; with ``--through join`` an impression and its click go through ``em3 join``,
whose window, 5 s here, holds the click's positive until the window closes). Its
partition and offset come from the producer's delivery report. A poller asks
``/v1/rank`` every ``--poll-every-s`` and notes when each model version is first
served. A probe's freshness is the time from its ``produce()`` call to the first
answer from a version whose manifest offsets for its partition are above its offset.

Also reported: how much of that is the learner (probe -> manifest ``created_at``)
and how much the server's reload (``created_at`` -> first answer).

Run::

    python benchmarks/freshness.py                      # em3, Ray, 1 s deltas
    python benchmarks/freshness.py --runtime in_process --tiny --variant id_only --snapshot-interval-s 2

The last printed line is one JSON object: freshness_p50_s, freshness_p99_s,
snapshot_interval_s, ...
"""
from __future__ import annotations

import argparse
import msgspec
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from em3 import codec
from em3.config import KafkaSettings, RedisSettings, TopicNames
from em3.redis_stores import RedisContentStore, RedisSnapshotStore, connect
from em3.types import Click, sample_id_for
from em3.app.services import LocalServices, free_port, wait_until
from learners.testing import synthetic_items, synthetic_samples
from stream.kafka import TopicPartition, ensure_topics, make_consumer, make_producer

# The join's window and allowed lateness with ``--through join``: a click's positive
# sample goes out when its impression's window closes (``JoinConfig.positive_timing``).
JOIN_WINDOW_S, JOIN_LATENESS_S = 5.0, 1.0

LINE = "fresh"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration-s", type=float, default=40.0, help="measured phase")
    parser.add_argument("--snapshot-interval-s", type=float, default=1.0)
    parser.add_argument("--background-rate", type=float, default=200.0, help="samples per second")
    parser.add_argument("--probe-every-s", type=float, default=0.25)
    parser.add_argument("--poll-every-s", type=float, default=0.05)
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--variant", default="em3")
    parser.add_argument("--start-timeout-s", type=float, default=600.0,
                        help="how long the learner may take to publish its first snapshot (Ray, model load)")
    parser.add_argument("--tiny", action="store_true", help="the tiny random-init config instead of the default")
    parser.add_argument("--runtime", choices=["ray", "in_process"], default="ray",
                        help="the learner as a Ray actor (what `em3 learn` runs) or in its process")
    parser.add_argument("--through", choices=["direct", "join"], default="direct",
                        help="direct: probe clicks are labelled samples on the samples topic; join: an "
                             "impression then a click on their topics, labelled by `em3 join --engine plain`")
    parser.add_argument("--log-dir", default=None, help="keep the learner's and server's logs here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp, LocalServices(Path(tmp)) as services:
        info = services.info
        kafka, redis_settings = KafkaSettings(info.bootstrap_servers), RedisSettings(info.redis_url)
        prefix, topics = "fresh:", TopicNames("fresh.")
        ensure_topics(kafka, topics, partitions=2)
        client = connect(redis_settings)
        items = synthetic_items()
        RedisContentStore(client, prefix).put_many(items)
        store = RedisSnapshotStore(client, prefix, signing_key=info.snapshot_key)
        common = ["--bootstrap-servers", info.bootstrap_servers, "--redis-url", info.redis_url,
                  "--topic-prefix", topics.prefix, "--redis-prefix", prefix]
        env = {**os.environ, **info.env(), "OMP_NUM_THREADS": "1"}
        log_dir = Path(args.log_dir) if args.log_dir else Path(tmp)
        log_dir.mkdir(parents=True, exist_ok=True)
        learner = subprocess.Popen(
            [sys.executable, "-m", "em3", "-v", "learn", *(["--in-process"] if args.runtime == "in_process" else []),
             *(["--tiny"] if args.tiny else []), "--variant", args.variant,
             "--model-line", LINE, "--snapshot-interval-s", str(args.snapshot_interval_s),
             "--batch-size", "256", "--max-batch-wait-s", "0.05", *(["--lr", "0.01"] if args.tiny else []), *common],
            env=env, stdout=subprocess.DEVNULL, stderr=open(log_dir / "learner.log", "wb"))
        join = None
        if args.through == "join":
            join = subprocess.Popen(
                [sys.executable, "-m", "em3", "-v", "join", "--engine", "plain", "--window-s", str(JOIN_WINDOW_S),
                 "--allowed-lateness-s", str(JOIN_LATENESS_S), "--batch-size", "1000", *common],
                env=env, stdout=subprocess.DEVNULL, stderr=open(log_dir / "join.log", "wb"))
        server = None
        stop = threading.Event()
        producer = make_producer(kafka, linger_ms=1)
        probes: list[dict] = []
        seen: dict[int, float] = {}
        manifests: dict = {}
        errors = [0]
        try:
            def background() -> None:
                k, pending_clicks = 0, []
                while not stop.is_set():
                    batch = synthetic_samples(max(1, int(args.background_rate / 10)), seed=k, start=k * 10_000,
                                              t0=time.time() - k * 10_000, id_prefix="bg")
                    if args.through == "direct":
                        for s in batch:
                            producer.produce(topics.samples, key=s.impression.user_id, value=codec.encode(s))
                    else:
                        for click in pending_clicks:  # clicks follow their impressions by one tick
                            producer.produce(topics.clicks, key=click.user_id, value=codec.encode(click))
                        pending_clicks = []
                        for s in batch:
                            imp = msgspec.structs.replace(s.impression, served_at=time.time())
                            producer.produce(topics.impressions, key=imp.user_id, value=codec.encode(imp))
                            if s.label:
                                pending_clicks.append(Click(imp.impression_id, imp.user_id, imp.item_id,
                                                            time.time() + 0.1))
                    producer.poll(0)
                    k += 1
                    time.sleep(0.1)

            locations: dict[str, tuple[str, int]] = {}
            if args.through == "join":
                def locate() -> None:  # where the join put each sample: sample_id -> (partition, offset)
                    consumer = make_consumer(kafka, "fresh-locator")
                    consumer.assign([TopicPartition(topics.samples, p, -2) for p in range(2)])
                    while not stop.is_set():
                        for msg in consumer.consume(1000, timeout=0.1):
                            if msg.error() is None:
                                sid = json.loads(msg.value()).get("sample_id", "")
                                locations[sid] = (f"{msg.topic()}:{msg.partition()}", msg.offset())
                    consumer.close()

                threading.Thread(target=locate, daemon=True).start()

            threading.Thread(target=background, daemon=True).start()
            wait_until(lambda: store.latest_version(LINE) is not None, args.start_timeout_s,
                       "the learner published no snapshot")
            port = free_port()
            server = subprocess.Popen(
                [sys.executable, "-m", "em3", "serve", "--model-line", LINE, "--host", "127.0.0.1",
                 "--port", str(port), "--poll-interval", "1.0", *common],
                env=env, stdout=subprocess.DEVNULL, stderr=open(log_dir / "server.log", "wb"))
            url = f"http://127.0.0.1:{port}"
            http = httpx.Client(timeout=10.0)

            def ready() -> bool:
                try:
                    return http.get(f"{url}/readyz").status_code == 200
                except httpx.HTTPError:
                    return False

            wait_until(ready, 120, "the server never became ready")
            body = {"user_id": "u1", "item_ids": [it.item_id for it in items[: args.candidates]], "k": 10}

            def poll() -> None:
                with httpx.Client(timeout=10.0) as c:
                    while not stop.is_set():
                        try:
                            r = c.post(f"{url}/v1/rank", json=body)
                            now = time.time()
                            if r.status_code == 200:
                                version = int(r.json()["model_version"])
                                if version not in seen:
                                    seen[version] = now
                                    # Read now: the store keeps only the last K versions.
                                    manifests[version] = store.manifest(LINE, version)
                            else:
                                errors[0] += 1
                        except httpx.HTTPError:
                            errors[0] += 1
                        time.sleep(args.poll_every_s)

            poller = threading.Thread(target=poll, daemon=True)
            poller.start()
            t_end = time.monotonic() + args.duration_s
            k = 0
            while time.monotonic() < t_end:
                s = synthetic_samples(1, seed=10_000 + k, start=10**9 + k, id_prefix="probe",
                                      t0=time.time() - 10**9 - k)[0]
                s = type(s)(s.impression, 1, s.label_time)  # a click: positive label
                if args.through == "join":
                    imp = msgspec.structs.replace(s.impression, served_at=time.time())
                    producer.produce(topics.impressions, key=imp.user_id, value=codec.encode(imp))
                    producer.flush(5)  # the impression is in the broker before its click
                    probe = {"t0": time.time(), "sample_id": sample_id_for(imp.impression_id, False)}
                    click = Click(imp.impression_id, imp.user_id, imp.item_id, time.time())
                    producer.produce(topics.clicks, key=imp.user_id, value=codec.encode(click))
                else:
                    probe = {"t0": time.time()}

                    def delivered(err, msg, probe=probe) -> None:
                        if err is None:
                            probe["key"] = f"{msg.topic()}:{msg.partition()}"
                            probe["offset"] = msg.offset()

                    producer.produce(topics.samples, key=s.impression.user_id, value=codec.encode(s),
                                     on_delivery=delivered)
                producer.poll(0)
                probes.append(probe)
                k += 1
                time.sleep(args.probe_every_s)
            producer.flush(10)
            # Let the last probes reach the server; through the join a click's sample
            # goes out when its impression's window closes.
            held = JOIN_WINDOW_S + JOIN_LATENESS_S if args.through == "join" else 0.0
            time.sleep(held + args.snapshot_interval_s + 5.0)
            stop.set()
            for probe in probes:
                if "sample_id" in probe and probe["sample_id"] in locations:
                    probe["key"], probe["offset"] = locations[probe["sample_id"]]
            poller.join(5)
        finally:
            stop.set()
            for proc in (server, learner, join):
                if proc is not None:
                    proc.send_signal(signal.SIGTERM)
            for proc in (server, learner, join):
                if proc is not None:
                    try:
                        proc.wait(30)
                    except subprocess.TimeoutExpired:
                        proc.kill()

        order = sorted(manifests, key=lambda v: seen[v])
        delta_count = sum(1 for m in manifests.values() if m.kind == "delta")
        full_count = len(manifests) - delta_count
        fresh, learner_part, server_part, uncovered = [], [], [], 0
        for probe in probes:
            if "offset" not in probe:
                uncovered += 1
                continue
            hit = next((v for v in order if manifests[v].offsets.get(probe["key"], 0) > probe["offset"]), None)
            if hit is None:
                uncovered += 1
                continue
            probe["version"] = hit
            probe["freshness_s"] = seen[hit] - probe["t0"]
            fresh.append(seen[hit] - probe["t0"])
            learner_part.append(manifests[hit].created_at - probe["t0"])
            server_part.append(seen[hit] - manifests[hit].created_at)
        client.close()
        if args.log_dir:
            (log_dir / "probes.json").write_text(json.dumps(
                {"probes": probes, "seen": seen, "created": {v: m.created_at for v, m in manifests.items()}}))

    def pct(values, q):
        return None if not values else round(float(np.percentile(values, q)), 3)

    return {
        "freshness_p50_s": pct(fresh, 50),
        "freshness_p99_s": pct(fresh, 99),
        "freshness_max_s": pct(fresh, 100),
        "snapshot_interval_s": args.snapshot_interval_s,
        "variant": args.variant + (" (tiny)" if args.tiny else ""),
        "runtime": args.runtime,
        "delta_snapshots": delta_count,
        "full_snapshots": full_count,
        "target_p99_s": 3.0,
        "learner_part_p50_s": pct(learner_part, 50),
        "learner_part_p99_s": pct(learner_part, 99),
        "server_reload_part_p50_s": pct(server_part, 50),
        "server_reload_part_p99_s": pct(server_part, 99),
        "probes": len(probes),
        "uncovered": uncovered,
        "versions_served": len(seen),
        "rank_errors": errors[0],
        "through": ("samples topic (direct)" if args.through == "direct"
                    else "impressions + clicks topics -> em3 join (plain engine) -> samples"),
    }


if __name__ == "__main__":
    out = main()
    print(json.dumps(out))
