"""``em3 topics``, ``em3 generate``, ``em3 join`` and ``em3 samples``: the stream commands.

``em3 join --workers N`` starts N worker processes in one consumer group; they
split the partitions (each owns partition ``n`` of both input topics) and load
and save per-partition state in Redis as partitions move between them.
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Sequence

from em3.app.cli import add_connection_flags, settings_from_args
from em3.errors import ImproperlyConfigured

__all__ = ["register", "join_config_from_args", "worker_config_from_args", "join_command"]

log = logging.getLogger(__name__)


def _add_join_semantics(p: argparse.ArgumentParser) -> None:
    p.add_argument("--window-s", type=float, default=60.0, help="attribution window W (event time)")
    p.add_argument("--allowed-lateness-s", type=float, default=5.0, help="watermark = newest event time - this")
    p.add_argument("--max-correction-delay-s", type=float, default=600.0,
                   help="a click up to W + this after serving yields a correction; later ones are dead-lettered")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the stream subcommands to the ``em3`` parser."""
    p = sub.add_parser("topics",
                       help="create or list the topics (impressions, clicks, conversions, samples, dead-letter)")
    p.add_argument("action", choices=["create", "list"])
    p.add_argument("--partitions", type=int, default=4, help="partitions of every topic (co-partitioning)")
    add_connection_flags(p)
    p.set_defaults(func=_topics)

    p = sub.add_parser("generate", help="produce a seeded synthetic impression/click stream")
    p.add_argument("--impressions", type=int, default=200_000)
    p.add_argument("--click-rate", type=float, default=0.1)
    p.add_argument("--users", type=int, default=20_000)
    p.add_argument("--items", type=int, default=5_000)
    p.add_argument("--rate-per-s", type=float, default=1000.0, help="impressions per event-time second")
    p.add_argument("--jitter-s", type=float, default=1.0, help="arrival jitter (keep below the lateness)")
    p.add_argument("--start", type=float, default=None, help="event time of the first impression (default: now)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--partitions", type=int, default=4, help="used when the topics do not exist yet")
    _add_join_semantics(p)
    add_connection_flags(p)
    p.set_defaults(func=_generate)

    p = sub.add_parser("join", help="run the impression-click-conversion join (faust app, batched hot path)")
    p.add_argument("--workers", type=int, default=1, help="worker processes in one consumer group")
    _add_join_semantics(p)
    p.add_argument("--conversion-window-s", type=float, default=86_400.0,
                   help="a conversion up to this long after its click is attributed to it (0: none)")
    p.add_argument("--max-conversion-records", type=int, default=100_000,
                   help="clicked impressions kept per partition for their conversion window (bounds the state)")
    p.add_argument("--positive-timing", choices=("window_close", "click"), default="window_close",
                   help="a click's sample goes out when its window closes, beside the negatives served with it "
                        "(calibrated learners), or when the click arrives")
    p.add_argument("--idle-timeout-s", type=float, default=5.0,
                   help="an input with no records this long stops holding the watermark (0: never)")
    p.add_argument("--idle-advance-rate", type=float, default=1.0,
                   help="event seconds the watermark advances per idle second")
    p.add_argument("--history-length", type=int, default=256, help="entries kept per user's click history")
    p.add_argument("--batch-size", type=int, default=5000, help="records per micro-batch and checkpoint")
    p.add_argument("--group-id", default="", help="consumer group and Redis state namespace (default {prefix}join)")
    p.add_argument("--web-port", type=int, default=6066,
                   help="metrics view of worker i on this port + i (GET /join/metrics); 0 disables")
    p.add_argument("--web-host", default="127.0.0.1", help="interface of the metrics view (0.0.0.0 in containers)")
    p.add_argument("--engine", choices=["faust", "plain"], default="faust",
                   help="faust: the faust app and worker (default); plain: the same batch loop without faust")
    p.add_argument("--exit-when-idle-s", type=float, default=None,
                   help="exit after this long with nothing read and nothing pending (finite streams)")
    p.add_argument("--redis-prefix", default=None, help="prefix of the Redis keys (join state, history); default em3:")
    add_connection_flags(p)
    p.set_defaults(func=join_command)

    p = sub.add_parser("samples", help="summarize the samples topic (dedup by sample id)")
    p.add_argument("action", choices=["summary"])
    p.add_argument("--idle-s", type=float, default=3.0, help="stop after this long without new records")
    add_connection_flags(p)
    p.set_defaults(func=_samples)


def join_config_from_args(args: argparse.Namespace):
    """The :class:`stream.join.JoinConfig` the flags describe."""
    from stream.join import JoinConfig

    return JoinConfig(
        window_s=args.window_s,
        allowed_lateness_s=args.allowed_lateness_s,
        max_correction_delay_s=args.max_correction_delay_s,
        idle_timeout_s=args.idle_timeout_s or None,
        idle_advance_rate=args.idle_advance_rate,
        conversion_window_s=args.conversion_window_s,
        max_conversion_records=args.max_conversion_records,
        positive_timing=getattr(args, "positive_timing", "window_close"),
    )


def worker_config_from_args(args: argparse.Namespace):
    """The :class:`stream.worker.WorkerConfig` the flags describe."""
    from stream.worker import WorkerConfig

    return WorkerConfig(group_id=args.group_id, batch_size=args.batch_size, history_length=args.history_length)


def _topics(args: argparse.Namespace) -> int:
    from stream.kafka import ensure_topics, partition_counts

    settings = settings_from_args(args)
    if args.action == "create":
        created = ensure_topics(settings.kafka, settings.topics, partitions=args.partitions,
                                retention_s=settings.retention.topic_retention_s)
        counts = partition_counts(settings.kafka, settings.topics.all())
        print(json.dumps({"created": created, "partitions": counts}))
        if len(set(counts.values())) > 1:
            print("warning: topics have different partition counts; impressions, clicks and conversions must match",
                  file=sys.stderr)
        return 0
    print(json.dumps(partition_counts(settings.kafka, settings.topics.all())))
    return 0


def _generate(args: argparse.Namespace) -> int:
    from stream.join import JoinConfig, expected_labels
    from stream.kafka import ensure_topics
    from stream.synthetic import StreamSpec, arrival_order, generate_stream, produce_stream

    settings = settings_from_args(args)
    ensure_topics(settings.kafka, settings.topics, partitions=args.partitions)
    spec = StreamSpec(
        impressions=args.impressions, click_rate=args.click_rate, users=args.users, items=args.items,
        rate_per_s=args.rate_per_s, jitter_s=args.jitter_s, seed=args.seed,
        start=args.start if args.start is not None else round(time.time() - args.impressions / args.rate_per_s, 3),
    )
    impressions, clicks = generate_stream(spec)
    started = time.perf_counter()
    n = produce_stream(settings.kafka, settings.topics, arrival_order(impressions, clicks, spec.jitter_s, spec.seed))
    elapsed = time.perf_counter() - started
    labels = expected_labels(impressions, clicks, JoinConfig(
        window_s=args.window_s, allowed_lateness_s=args.allowed_lateness_s,
        max_correction_delay_s=args.max_correction_delay_s))
    expected = {
        "positive": sum(1 for lab, _ in labels.values() if lab == 1),
        "negative": sum(1 for lab, _ in labels.values() if lab == 0),
        "correction": sum(1 for _, c in labels.values() if c),
    }
    print(json.dumps({"impressions": len(impressions), "clicks": len(clicks), "records": n,
                      "produce_s": round(elapsed, 2), "expected": expected}))
    return 0


def _samples(args: argparse.Namespace) -> int:
    from em3 import codec
    from em3.errors import DecodeError
    from stream.dedup import DedupWindow
    from stream.kafka import make_consumer, wait_for_assignment

    settings = settings_from_args(args)
    consumer = make_consumer(settings.kafka, f"em3-samples-summary-{os.getpid()}-{time.time_ns()}")
    consumer.subscribe([settings.topics.samples])
    wait_for_assignment(consumer)
    dedup = DedupWindow(1_000_000)
    counts = {"positive": 0, "negative": 0, "correction": 0, "conversion": 0, "duplicates_dropped": 0,
              "undecodable": 0}
    last = time.monotonic()
    try:
        while time.monotonic() - last < args.idle_s:
            for msg in consumer.consume(10000, timeout=0.5):
                if msg.error() is not None:
                    continue
                last = time.monotonic()
                try:
                    s = codec.decode_sample(msg.value())
                except DecodeError:
                    counts["undecodable"] += 1
                    continue
                if not dedup.add_new(s.sample_id):
                    counts["duplicates_dropped"] += 1
                    continue
                kind = "conversion" if s.conversion else "correction" if s.correction else \
                    "positive" if s.label else "negative"
                counts[kind] += 1
    finally:
        consumer.close()
    counts["labelled_impressions"] = counts["positive"] + counts["negative"]
    print(json.dumps(counts))
    return 0


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _spawn_workers(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run ``args.workers`` single-worker processes; forward SIGTERM/SIGINT; wait for all."""
    children = []
    for i in range(args.workers):
        child_argv = [a for a in argv]
        child_argv += ["--workers", "1", "--web-port", str(args.web_port + i if args.web_port else 0)]
        children.append(subprocess.Popen([sys.executable, "-m", "stream", *child_argv],
                                         preexec_fn=_die_with_parent))
    log.info("started %d join workers: pids %s", len(children), [c.pid for c in children])

    def _forward(signum: int, frame: object) -> None:
        for c in children:
            if c.poll() is None:
                c.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, _forward)
    signal.signal(signal.SIGINT, _forward)
    # A worker that fails takes the group down with it (non-zero exit), so the
    # supervisor (compose's restart policy, systemd, ...) restarts all of them;
    # the partitions' state is in Redis either way.
    while True:
        codes = [c.poll() for c in children]
        if all(code is not None for code in codes):
            return max(codes, default=0)
        if any(code not in (None, 0) for code in codes):
            log.error("a join worker exited with %s; stopping the others", codes)
            _forward(signal.SIGTERM, None)
            return max(c.wait() for c in children) or 1
        time.sleep(0.2)


def join_command(args: argparse.Namespace) -> int:
    """``em3 join``: one worker in this process, or ``--workers N`` child processes."""
    if args.workers < 1:
        raise ImproperlyConfigured(f"workers must be >= 1, but {args.workers} is given")
    if args.workers > 1:
        argv = _strip_flags(sys.argv[1:], {"--workers", "--web-port"})
        return _spawn_workers(args, argv)
    settings = settings_from_args(args)
    if args.redis_prefix is not None:
        settings = dataclasses.replace(settings, redis_prefix=args.redis_prefix)
    join = join_config_from_args(args)
    wconf = worker_config_from_args(args)
    if args.engine == "plain":
        return _run_plain(settings, join, wconf, args.exit_when_idle_s)
    from stream.app import AppConfig, run_worker

    level = logging.getLevelName(logging.getLogger().level).lower()
    return run_worker(settings, join, wconf, AppConfig(web_port=args.web_port, web_host=args.web_host),
                      loglevel=level if level in ("debug", "info", "warning") else "warning",
                      exit_when_idle_s=args.exit_when_idle_s)


def _strip_flags(argv: Sequence[str], flags: set[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in flags:
            skip = "=" not in a
            continue
        out.append(a)
    return out


def _run_plain(settings, join, wconf, exit_when_idle_s: float | None) -> int:
    import threading

    from stream.worker import JoinWorker, tune_gc

    tune_gc()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    worker = JoinWorker(settings, join, wconf)
    worker.start_or_retry()
    try:
        worker.run(stop, idle_exit_s=exit_when_idle_s)
    finally:
        worker.close()
        print(json.dumps(worker.metrics()))
    return 0
