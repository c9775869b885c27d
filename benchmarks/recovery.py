"""Recovery: a stream learned by a learner that is SIGKILLed and restarted, compared
with a learner that never stopped.

Starts the embedded broker and Redis and produces a seeded sample stream at a steady
rate (about ``--dup-rate`` of the samples emitted twice, as the join does after its
own crashes; each positive's click joins its user's history first, as the join
does). By default the
learner is the default ``em3`` model (pretrained MiniLM and EfficientNet-Lite0 with
LoRA) in a Ray actor, started the way ``em3 learn`` starts it (:class:`LearnerFleet`);
``--runtime in_process`` runs ``em3 learn --in-process`` in a subprocess instead. The
learner's process is SIGKILLed ``--kills`` times at random moments while the stream
flows (each time once it has published at least one snapshot since starting) and
restarted (Ray restarts the actor; the subprocess is started again). The stream
flows until the last restarted learner has published, then ``--tail-samples`` more,
and the last learner drains it.

Samples -- ``lost`` and ``applied_twice``: each published version has, beside it and
written before its publish, the sample ids its cycle learned and how they were
grouped into micro-batches (:class:`em3.redis_stores.RedisAppliedLog`); a version whose
publish never happened (the process died) is not reachable from the line's
pointer. Walking ``parent`` links from the final version gives exactly the samples
in the final model's lineage, each in the one version that learned it. ``lost`` =
produced ids missing from it, ``applied_twice`` = ids in it more than once.

Parameters -- ``max_param_diff_vs_uncrashed``: a learner that never crashed, built
here with the same config, learns the final version's lineage batch for batch
(:func:`learners.lineage.replay_batches`, through the same :class:`LearnerLoop` code,
same histories and content); the figure is the largest absolute difference between
its parameters and the final snapshot's (learned tensors and counters). The same
replay with the optimizer state, step counter, RNG and history cache started afresh
at each point where the crashed learner resumed gives
``max_param_diff_without_checkpoints``: what the crashes would cost without learner
checkpoints (the comparison can fail).

Run::

    python benchmarks/recovery.py                                          # em3, Ray actor, 3 kills
    python benchmarks/recovery.py --runtime in_process --tiny --variant id_only --rate 500
    python benchmarks/recovery.py --learners 2 --kill-aggregator --kills 4 --tiny --variant id_only

The last printed line is one JSON object: variant, runtime, restarts, lost,
applied_twice, max_param_diff_vs_uncrashed, ...
"""
from __future__ import annotations

import argparse
import json
import logging
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

log = logging.getLogger("recovery")

LINE = "recovery"
PREFIX, TOPIC_PREFIX = "rec:", "rec."


class ProcessRunner:
    """One ``em3 learn --in-process`` subprocess; a kill is a SIGKILL and a restart."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.argv, self.env, self.log_path, self.proc = argv, env, log_path, None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=subprocess.DEVNULL,
                                     stderr=open(self.log_path, "ab"))

    def kill(self) -> str:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.start()
        return "learner process"

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class FleetRunner:
    """Ray learner actors (and an aggregator with two or more) in this process's Ray
    runtime, as ``em3 learn`` runs them; a kill SIGKILLs one of their processes at
    random and Ray restarts it."""

    def __init__(self, settings, config, learners: int, kill_aggregator: bool, rng: random.Random,
                 ray_dir: Path) -> None:
        from learners import LearnerFleet

        self.fleet = LearnerFleet(settings, config, learners, ray_init_kwargs={
            "num_cpus": learners, "configure_logging": False, "_temp_dir": str(ray_dir)})
        self.kill_aggregator = kill_aggregator
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
        self.thread.join(120)
        self.fleet.shutdown()


def replay(config, model_config, client, lineage, records, resumes: set[int], fresh_at_resumes: bool):
    """The state of a learner that learns ``lineage`` (``[(version, batches)]``) without
    stopping; with ``fresh_at_resumes``, one whose optimizer state, step counter, RNG and
    history cache start afresh after each version in ``resumes`` (a restart without
    a learner checkpoint)."""
    import torch

    from em3.redis_stores import RedisContentStore, RedisHistoryStore
    from learners.lineage import replay_batches
    from learners.loop import LearnerLoop, MemorySampleSource
    from learners.online import OnlineLearner

    def learner(state=None):
        extra = {} if config.content_lr is None else {"content_lr": config.content_lr}
        out = OnlineLearner(model_config, RedisContentStore(client, PREFIX), lr=config.lr, device="cpu",
                            seed=config.seed, **extra)
        if state is not None:
            out.load_state_dict(state)
        return out

    torch.set_num_threads(1)  # as the learner ran (OMP_NUM_THREADS=1)
    history = RedisHistoryStore(client, PREFIX)
    loop = LearnerLoop(learner(), MemorySampleSource({}), history, config.loop, history_len=model_config.history_len)
    batches = 0
    for version, version_batches in lineage:
        batches += len(version_batches)
        replay_batches(loop, version_batches, records)
        if fresh_at_resumes and version in resumes:
            loop = LearnerLoop(learner(loop.learner.state_dict()), MemorySampleSource({}), history, config.loop,
                               history_len=model_config.history_len)
    return loop.learner.state_dict(), batches


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=100.0, help="samples per second produced")
    parser.add_argument("--tail-samples", type=int, default=1000,
                        help="samples produced after the last restarted learner published (the stream flows until "
                             "then, so every kill lands mid-stream)")
    parser.add_argument("--max-samples", type=int, default=30000, help="the stream ends here in any case")
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--variant", default="em3")
    parser.add_argument("--tiny", action="store_true", help="the tiny random-init config instead of the default")
    parser.add_argument("--runtime", choices=["ray", "in_process"], default="ray",
                        help="the learner as a Ray actor (what `em3 learn` runs) or `em3 learn --in-process`")
    parser.add_argument("--learners", type=int, default=1,
                        help="Ray learner actors; N >= 2 adds the aggregator (no replay comparison then)")
    parser.add_argument("--kill-aggregator", action="store_true", help="with --learners >= 2: the aggregator "
                        "is the second kill's target")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--dup-rate", type=float, default=0.05)
    parser.add_argument("--snapshot-interval-s", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=None, help="default: the learners' default (0.01 with --tiny)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-s", type=float, default=900.0)
    parser.add_argument("--log-dir", default=None, help="keep the learner's log here (in_process)")
    args = parser.parse_args(argv)
    if args.runtime == "in_process" and args.learners != 1:
        parser.error("--runtime in_process runs one learner")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the learners (Ray workers inherit it) and the replay
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    t_start = time.monotonic()

    from em3 import codec, snapshot
    from em3.config import KafkaSettings, RedisSettings, Settings, TopicNames
    from em3.model import ModelConfig
    from em3.redis_stores import RedisAppliedLog, RedisContentStore, RedisHistoryStore, RedisSnapshotStore, connect
    from em3.app.services import LocalServices
    from learners import LearnConfig, LoopConfig, PublisherConfig, SnapshotPolicy
    from learners.lineage import lineage_batches, max_abs_difference
    from learners.online import LEARNER_DEFAULTS
    from learners.testing import synthetic_items, synthetic_samples
    from stream.kafka import ensure_topics, make_producer

    rng = random.Random(args.seed)
    lr = args.lr if args.lr is not None else (0.01 if args.tiny else LEARNER_DEFAULTS["lr"])
    model_config = ModelConfig.tiny(args.variant) if args.tiny else ModelConfig.for_variant(args.variant)
    config = LearnConfig(LINE, model_config.to_dict(), lr=lr, device="cpu", seed=0,
                         loop=LoopConfig(batch_size=args.batch_size, max_batch_wait_s=0.05),
                         policy=SnapshotPolicy(interval_s=args.snapshot_interval_s),
                         publisher=PublisherConfig(retain_applied=True))

    with tempfile.TemporaryDirectory(dir="/tmp", prefix="rec-") as tmp, LocalServices(Path(tmp)) as services:
        info = services.info
        kafka, redis_settings = KafkaSettings(info.bootstrap_servers), RedisSettings(info.redis_url)
        samples_topic = f"{TOPIC_PREFIX}samples"
        ensure_topics(kafka, [samples_topic], partitions=args.partitions)
        client = connect(redis_settings)
        RedisContentStore(client, PREFIX).put_many(synthetic_items())
        store = RedisSnapshotStore(client, PREFIX, signing_key=info.snapshot_key)
        pool = synthetic_samples(args.max_samples, seed=args.seed, num_users=args.users)
        history = RedisHistoryStore(client, PREFIX)
        produced_so_far, stop_at = [0], [len(pool)]

        def produce() -> None:
            producer = make_producer(kafka, linger_ms=5)
            chunk = max(1, int(args.rate / 20))
            for start in range(0, len(pool), chunk):
                if start >= stop_at[0]:
                    break
                part = pool[start : start + chunk]
                # A sample's click joins its user's history before the sample is produced
                # (as the join does): a learner reads the clicks before an impression, so the
                # live learner and the replay see the same histories.
                history.append_many((s.impression.user_id, s.impression.item_id, s.label_time)
                                    for s in part if s.label)
                for s in part:
                    value = codec.encode(s)
                    producer.produce(samples_topic, key=s.impression.user_id, value=value)
                    if rng.random() < args.dup_rate:
                        producer.produce(samples_topic, key=s.impression.user_id, value=value)
                producer.poll(0)
                produced_so_far[0] = start + len(part)
                time.sleep(chunk / args.rate)
            producer.flush(30)

        def latest() -> tuple[int | None, int]:
            v = store.latest_version(LINE)
            return v, (0 if v is None else int(store.manifest(LINE, v).stats["totals"]["samples_applied"]))

        # Which versions a restarted learner published first, and from what it resumed.
        resumes: dict[int, dict] = {}
        watching = threading.Event()

        def watch() -> None:
            seen = None
            while not watching.is_set():
                try:
                    v = store.latest_version(LINE)
                    if v is not None and v != seen:
                        seen = v
                        note = store.manifest(LINE, v).stats.get("resumed")
                        if note is not None:  # and whether it resumed from a full snapshot or a delta
                            resumes[v] = {**note, "from_kind": store.manifest(LINE, note["from"]).kind}
                except Exception:  # noqa: BLE001 - a watcher must not stop the benchmark
                    pass
                time.sleep(0.02)

        if args.runtime == "in_process":
            env = {**os.environ, **info.env(), "OMP_NUM_THREADS": "1"}
            argv_learn = [sys.executable, "-m", "em3", "-v", "learn", "--in-process", "--variant", args.variant,
                          *(["--tiny"] if args.tiny else []), "--model-line", LINE,
                          "--bootstrap-servers", info.bootstrap_servers, "--redis-url", info.redis_url,
                          "--topic-prefix", TOPIC_PREFIX, "--redis-prefix", PREFIX,
                          "--snapshot-interval-s", str(args.snapshot_interval_s), "--batch-size", str(args.batch_size),
                          "--max-batch-wait-s", "0.05", "--lr", str(lr), "--seed", "0", "--retain-applied"]
            log_path = Path(args.log_dir or tmp) / "learner.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            runner = ProcessRunner(argv_learn, env, log_path)
        else:
            settings = Settings(kafka, redis_settings, TopicNames(TOPIC_PREFIX), PREFIX, api_key=info.api_key,
                                snapshot_key=info.snapshot_key)
            runner = FleetRunner(settings, config, args.learners, args.kill_aggregator, rng, Path(tmp) / "ray")

        producer_thread = threading.Thread(target=produce, daemon=True)
        watcher = threading.Thread(target=watch, daemon=True)
        restarts, killed_at = 0, []
        runner.start()
        watcher.start()
        wait_until_first = time.monotonic() + args.timeout_s
        while latest()[0] is None and time.monotonic() < wait_until_first:
            time.sleep(0.1)  # the learner is up (model loaded) and published its first version
        log.info("learner up: v%s after %.1f s", latest()[0], time.monotonic() - t_start)
        producer_thread.start()
        deadline = time.monotonic() + args.timeout_s
        try:
            for _ in range(args.kills + 1):
                version_at_start = latest()[0]
                while latest()[0] == version_at_start and time.monotonic() < deadline:
                    time.sleep(0.05)  # it has (re)started and published at least once
                if restarts == args.kills:
                    break
                time.sleep(rng.uniform(0.3, 2.0))
                target = runner.kill()
                version, applied_then = latest()
                killed_at.append({"target": target, "published_version": version,
                                  "published_applied": applied_then, "produced": produced_so_far[0]})
                restarts += 1
                log.info("kill %d: %s at v%s (%d applied, %d produced)", restarts, target, version, applied_then,
                         produced_so_far[0])
            stop_at[0] = produced_so_far[0] + args.tail_samples
            producer_thread.join()
            samples = pool[: produced_so_far[0]]
            distinct = len({s.sample_id for s in samples})
            while latest()[1] < distinct and time.monotonic() < deadline:
                time.sleep(0.1)
            log.info("drained: v%s, %d applied", *latest())
        finally:
            runner.stop()
            watching.set()
            watcher.join(5)
        learn_seconds = round(time.monotonic() - t_start, 1)
        version, applied_counter = latest()
        applied_log = RedisAppliedLog(client, PREFIX)
        counts = Counter(i for _, ids in applied_log.chain(LINE, version) for values in ids.values() for i in values)
        produced = {s.sample_id for s in samples}
        manifest, final_state = snapshot.load_state(store, LINE, version)
        ckpt_manifest, _ = store.get_checkpoint(LINE, version)
        result = {
            "variant": args.variant + (" (tiny)" if args.tiny else ""),
            "runtime": args.runtime,
            "learners": args.learners,
            "restarts": restarts,
            "kills_mid_stream": sum(k["produced"] < len(samples) for k in killed_at),
            "lost": len(produced - set(counts)),
            "applied_twice": sum(c - 1 for c in counts.values() if c > 1),
            "produced": len(samples),
            "distinct": len(produced),
            "applied": sum(counts.values()),
            "applied_counter_in_snapshot": applied_counter,
            "duplicates_dropped": int(manifest.stats["totals"]["duplicates_dropped"]),
            "versions": version,
            "final_kind": manifest.kind,
            "resumes": [{"version": v, **resumes[v]} for v in sorted(resumes)],
            "checkpoint_bytes": ckpt_manifest.num_bytes,
            "max_param_diff_vs_uncrashed": None,
            "max_param_diff_tensor": None,
            "max_param_diff_without_checkpoints": None,
            "kills": killed_at,
            "snapshot_interval_s": args.snapshot_interval_s,
            "batch_size": args.batch_size,
            "window_auc": manifest.stats["prequential"].get("window_auc"),
            "learn_seconds": learn_seconds,
        }
        if args.learners == 1:
            log.info("replaying the lineage of v%s", version)
            lineage = lineage_batches(applied_log, LINE, version)
            records = {s.sample_id: codec.encode(s) for s in samples}
            resumed_from = {note["from"] for note in resumes.values()}
            uncrashed, batches = replay(config, model_config, client, lineage, records, resumed_from, False)
            diff, where = max_abs_difference(final_state, uncrashed)
            without, _ = replay(config, model_config, client, lineage, records, resumed_from, True)
            result.update(max_param_diff_vs_uncrashed=diff, max_param_diff_tensor=where,
                          max_param_diff_without_checkpoints=max_abs_difference(final_state, without)[0],
                          replayed_batches=batches)
        result["seconds"] = round(time.monotonic() - t_start, 1)
        result["load_avg_1m"] = round(os.getloadavg()[0], 2)
        client.close()
    return result


if __name__ == "__main__":
    out = main()
    print(json.dumps(out))
