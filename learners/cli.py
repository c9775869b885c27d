"""``em3 learn`` and ``em3 snapshots list|show|rollback``.

Examples::

    em3 learn --model-line main --learners 1 --variant em3
    em3 learn --model-line main --learners 2 --ray-address auto --gpu
    em3 learn --model-line tiny --tiny --in-process --duration-s 60
    em3 snapshots list main
    em3 snapshots show main 12
    em3 snapshots rollback main        # to the version before the current one
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from dataclasses import replace
from datetime import datetime, timezone

from em3.app.cli import add_connection_flags, settings_from_args
from learners.online import LEARNER_DEFAULTS

__all__ = ["register", "learn_config_from_args"]

log = logging.getLogger(__name__)


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, but {value} is given")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, but {value} is given")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``learn`` and ``snapshots`` to the ``em3`` command line. Flags that set a
    config field are checked by the field's declaration (:class:`LearnConfig`)."""
    from em3.model.config import VARIANTS

    p = subparsers.add_parser("learn", help="train a model line online from the samples topic")
    add_connection_flags(p)
    p.add_argument("--redis-prefix", default=None, help="prefix of every Redis key (default em3:)")
    p.add_argument("--model-line", required=True, help="name of the model line to train and publish")
    p.add_argument("--learners", type=_positive_int, default=1, help="data-parallel learners (Ray actors)")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (ray://host:10001 or auto); "
                   "default: a local Ray runtime")
    p.add_argument("--in-process", action="store_true", help="one learner in this process, without Ray")
    p.add_argument("--variant", choices=sorted(VARIANTS), default="em3", help="model variant")
    p.add_argument("--tiny", action="store_true", help="the tiny random-init config (tests, demos on a laptop)")
    p.add_argument("--id-table", choices=["hashed", "bounded"], default="hashed",
                   help="user and item ID rows: hashed buckets, or bounded tables with own rows for admitted IDs "
                        "(ModelConfig.id_table; one learner per line)")
    p.add_argument("--experiment", default=None,
                   help="the A/B experiment file the servers run: its training_data policy decides what this "
                        "line learns from (split, the default: not from impressions other model arms served; "
                        "pooled: everything). Without it the line learns from every sample")
    p.add_argument("--lr", type=float, default=LEARNER_DEFAULTS["lr"],
                   help="dense learning rate (the default is the one benchmarks/quality.py measures)")
    p.add_argument("--content-lr", type=float, default=None,
                   help="learning rate of the content modules (default: --lr / 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--snapshot-interval-s", type=float, default=2.0,
                   help="publish a snapshot (or average a round) every T seconds")
    p.add_argument("--snapshot-every-steps", type=int, default=None,
                   help="... or every N optimizer steps, whichever comes first")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-batch-wait-s", type=float, default=0.2)
    p.add_argument("--dedup-capacity", type=int, default=200_000)
    p.add_argument("--full-snapshot-every", type=int, default=10, metavar="N",
                   help="publish a full snapshot after N delta snapshots (0: only full snapshots)")
    p.add_argument("--retain-applied", action="store_true",
                   help="keep every version's applied-ids record (audit trail)")
    p.add_argument("--gpu", action="store_true", help="one GPU per learner (Ray num_gpus=1)")
    p.add_argument("--cpus-per-learner", type=float, default=1.0)
    p.add_argument("--duration-s", type=_positive_float, default=None, help="stop after this long")
    p.add_argument("--metrics-port", type=int, default=0,
                   help="serve Prometheus /metrics for this line on this port (0: off; Ray mode)")
    p.set_defaults(func=_learn)

    s = subparsers.add_parser("snapshots", help="list, show or roll back a model line's snapshots")
    add_connection_flags(s)
    s.add_argument("--redis-prefix", default=None, help="prefix of every Redis key (default em3:)")
    s.add_argument("action", choices=["list", "show", "rollback"])
    s.add_argument("line", nargs="?", help="model line (list without it: all lines)")
    s.add_argument("version", nargs="?", type=int, help="version (default: latest; rollback: the one before)")
    s.set_defaults(func=_snapshots)


def learn_config_from_args(args: argparse.Namespace):
    """The :class:`learners.worker.LearnConfig` that ``em3 learn`` flags describe."""
    from em3.model import ModelConfig
    from learners.loop import LoopConfig
    from learners.publisher import PublisherConfig, SnapshotPolicy
    from learners.worker import LearnConfig

    model = ModelConfig.tiny(args.variant) if args.tiny else ModelConfig.for_variant(args.variant)
    if getattr(args, "id_table", "hashed") != model.id_table:
        rows = min(model.user_buckets, model.item_buckets)
        model = model.replace(id_table=args.id_table, id_fallback_buckets=min(model.id_fallback_buckets, rows // 8))
    policy: dict = {}
    if getattr(args, "experiment", None):
        from em3.experiment import ExperimentConfig

        policy = ExperimentConfig.from_file(args.experiment).loop_settings(args.model_line)
    return LearnConfig(
        model_line=args.model_line,
        model_config=model.to_dict(),
        lr=args.lr,
        content_lr=args.content_lr,
        device="auto" if (args.gpu or args.in_process) else "cpu",
        seed=args.seed,
        loop=LoopConfig(batch_size=args.batch_size, max_batch_wait_s=args.max_batch_wait_s,
                        dedup_capacity=args.dedup_capacity, **policy),
        policy=SnapshotPolicy(interval_s=args.snapshot_interval_s, every_steps=args.snapshot_every_steps),
        publisher=PublisherConfig(dedup_capacity=args.dedup_capacity, retain_applied=args.retain_applied,
                                  full_every=getattr(args, "full_snapshot_every", 10)),
    )


def _settings(args: argparse.Namespace):
    settings = settings_from_args(args)
    if getattr(args, "redis_prefix", None):
        settings = replace(settings, redis_prefix=args.redis_prefix)
    return settings


def _learn(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if not settings.snapshot_key:
        print("em3 learn: no snapshot key; set EM3_SNAPSHOT_KEY (servers verify every snapshot with it; "
              "`em3 services up` generates one)", file=sys.stderr)
        return 2
    config = learn_config_from_args(args)
    stop = threading.Event()
    deadline = None if args.duration_s is None else time.monotonic() + args.duration_s

    def should_stop() -> bool:
        return stop.is_set() or (deadline is not None and time.monotonic() >= deadline)

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if args.in_process:
        if args.learners != 1:
            print("--in-process runs exactly one learner; use Ray for --learners > 1", file=sys.stderr)
            return 2
        from learners.worker import LearnerWorker

        worker = LearnerWorker(settings, config)
        try:
            version = worker.run(should_stop)
        finally:
            worker.close()
        print(json.dumps({"model_line": config.model_line, "version": version, "published": worker.published,
                          "totals": worker.loop.totals}))
        return 0

    from learners.actor import ActorResources
    from learners.scaleout import LearnerFleet

    if args.metrics_port:
        _serve_line_metrics(settings, config.model_line, args.metrics_port, stop)

    fleet = LearnerFleet(settings, config, args.learners, ray_address=args.ray_address,
                         resources=ActorResources(num_cpus=args.cpus_per_learner, num_gpus=1.0 if args.gpu else 0.0))
    fleet.start()
    try:
        version = fleet.run(should_stop)
    finally:
        fleet.shutdown()
    print(json.dumps({"model_line": config.model_line, "version": version, "learners": args.learners,
                      "restarts": fleet.restarts, "rounds": fleet.rounds}))
    return 0


def _serve_line_metrics(settings, line: str, port: int, stop: threading.Event) -> None:
    """Prometheus ``/metrics`` on ``port`` for the line this driver trains, read from the
    manifest of the line's latest snapshot (what servers load), refreshed every second."""
    from prometheus_client import Gauge, start_http_server

    from em3.redis_stores import RedisSnapshotStore, connect

    store = RedisSnapshotStore(connect(settings.redis), settings.redis_prefix, signing_key=settings.snapshot_key)
    gauges = {name: Gauge(f"em3_learner_{name}", doc, ["line"]) for name, doc in [
        ("version", "latest published snapshot version"),
        ("snapshot_age_seconds", "seconds since the latest snapshot was created"),
        ("samples_applied", "samples applied in total"),
        ("window_auc", "prequential AUC over the sliding window"),
        ("window_logloss", "prequential logloss over the sliding window"),
    ]}
    start_http_server(port)

    def refresh() -> None:
        while not stop.wait(1.0):
            try:
                version = store.latest_version(line)
                if version is None:
                    continue
                manifest = store.manifest(line, version)
            except Exception as exc:  # noqa: BLE001 - metrics must never stop training
                log.debug("metrics refresh failed: %r", exc)
                continue
            stats = dict(manifest.stats)
            pre = stats.get("prequential", {})
            values = {"version": version, "snapshot_age_seconds": time.time() - manifest.created_at,
                      "samples_applied": stats.get("totals", {}).get("samples_applied"),
                      "window_auc": pre.get("window_auc"), "window_logloss": pre.get("window_logloss")}
            for name, value in values.items():
                if value is not None:
                    gauges[name].labels(line).set(value)

    threading.Thread(target=refresh, name="learner-metrics", daemon=True).start()


def _snapshots(args: argparse.Namespace) -> int:
    from em3 import codec
    from em3.errors import SnapshotError
    from em3.redis_stores import RedisSnapshotStore, connect

    settings = _settings(args)
    client = connect(settings.redis)
    store = RedisSnapshotStore(client, settings.redis_prefix, signing_key=settings.snapshot_key)
    try:
        if args.action == "list" and not args.line:
            print(json.dumps({"lines": store.lines()}))
            return 0
        if not args.line:
            print(f"snapshots {args.action} needs a LINE", file=sys.stderr)
            return 2
        if args.action == "list":
            latest = store.latest_version(args.line)
            print(f"{'':1} {'version':>7} {'parent':>6} {'kind':<10} {'bytes':>10} {'created (UTC)':<19} {'applied':>9} "
                  f"{'window_auc':>10}  offsets")
            for version in store.versions(args.line):
                m = store.manifest(args.line, version)
                created = datetime.fromtimestamp(m.created_at, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
                applied = m.stats.get("totals", {}).get("samples_applied", "")
                auc = m.stats.get("prequential", {}).get("window_auc")
                kind = "full" if m.kind == "full" else f"delta/{m.base_version}"
                print(f"{'*' if version == latest else ' '} {version:>7} {str(m.parent_version or ''):>6} {kind:<10} "
                      f"{m.num_bytes:>10} {created:<19} "
                      f"{applied!s:>9} {('' if auc is None else f'{auc:.4f}'):>10}  {json.dumps(dict(m.offsets))}")
            return 0
        if args.action == "show":
            version = args.version if args.version is not None else store.latest_version(args.line)
            if version is None:
                raise SnapshotError(f"line {args.line!r} has no published snapshot")
            print(json.dumps(json.loads(codec.manifest_to_json(store.manifest(args.line, version))), indent=2))
            return 0
        version = store.rollback(args.line, args.version)
        print(json.dumps({"line": args.line, "latest": version,
                          "note": "running learners resume from this version at their next snapshot"}))
        return 0
    except SnapshotError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
