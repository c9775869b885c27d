"""``em3 replay`` and ``em3 ab``: log replay into Kafka and a simulated online A/B test.

Examples::

    em3 replay --obd all --policy random --speed 100          # OBD at 100x real time
    em3 replay --file logs.jsonl --rate 5000 --start-at 120000 # resume, at most 5k events/s
    em3 replay --obd men --dry-run                             # count, no Kafka
    em3 replay --movielens --click-delay lognormal:20,1.2
    em3 ab --arms random,popularity,oracle --n-requests 20000 --out runs/ab
    em3 ab --server http://127.0.0.1:8000 --arm-names control,treatment --kafka

The last line printed is one JSON object (the counts, or the A/B summary).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from em3.errors import ImproperlyConfigured

__all__ = ["register", "replay_command", "ab_command"]

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``replay`` and ``ab`` to the ``em3`` command line."""
    from em3.app.cli import add_connection_flags

    p = subparsers.add_parser("replay", help="replay logs (OBD, JSONL/CSV/Parquet) into Kafka in event-time order")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--obd", choices=("all", "men", "women"), help="Open Bandit Dataset campaign")
    src.add_argument("--file", help="a JSONL, CSV or Parquet log (schema: simulators.replay_sources)")
    src.add_argument("--movielens", action="store_true",
                     help="MovieLens-100K (rating >= 4 is a click; times shifted to start at 2024-01-01)")
    p.add_argument("--policy", choices=("random", "bts"), default="random", help="OBD logging policy")
    p.add_argument("--format", choices=("jsonl", "csv", "parquet"), default=None)
    p.add_argument("--speed", type=float, default=0.0, help="event s per wall s; 0 = as fast as possible")
    p.add_argument("--rate", type=float, default=None, help="at most this many events per second")
    p.add_argument("--start-at", type=int, default=0, help="skip this many events (resume position)")
    p.add_argument("--max-events", type=int, default=None)
    p.add_argument("--presorted", action="store_true", help="rows are in time order: stream in constant memory")
    p.add_argument("--click-delay", default=None,
                   help="delay of clicks without a time: fixed:S, exp:MEAN, lognormal:MEDIAN[,SIGMA]")
    p.add_argument("--seed", type=int, default=0, help="seed of drawn click delays")
    p.add_argument("--partitions", type=int, default=1, help="partitions of topics created here")
    p.add_argument("--dry-run", action="store_true", help="replay without Kafka: only count")
    p.add_argument("--allow-raw-user-ids", action="store_true",
                   help="without EM3_USER_ID_KEY, produce raw user IDs (local demos only; same as "
                        "EM3_ALLOW_RAW_USER_IDS=1); with a key, IDs are pseudonymised either way")
    p.add_argument("--no-progress", action="store_true")
    add_connection_flags(p)
    p.set_defaults(func=replay_command)

    p = subparsers.add_parser("ab", help="online A/B test of rankers against simulated users (mSPRT)")
    arms = p.add_mutually_exclusive_group()
    arms.add_argument("--arms", default="random,popularity",
                      help="built-in arms, control first: random, popularity, oracle, oracle-noisy")
    arms.add_argument("--server", help="ranking service URL; the server buckets users into arms")
    p.add_argument("--arm-names", default=None, help="with --server: the server's arm names, control first")
    p.add_argument("--n-requests", type=int, default=20_000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--rate", type=float, default=2.0, help="requests per event-time second")
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument("--unit", choices=["user", "request"], default="user",
                   help="unit of analysis: user (CTR per user, delta method; users are randomised) or request "
                        "(each request i.i.d.; too confident when one user sends many)")
    p.add_argument("--min-units", type=int, default=200,
                   help="units (users, or requests) per arm before the sequential test may reject")
    p.add_argument("--tau2", type=float, default=1e-4, help="mSPRT mixing variance")
    p.add_argument("--check-every", type=int, default=500)
    p.add_argument("--stop-early", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--world-seed", type=int, default=0)
    p.add_argument("--n-users", type=int, default=1000)
    p.add_argument("--n-items", type=int, default=400)
    p.add_argument("--kafka", action="store_true", help="also produce impressions and clicks to Kafka")
    p.add_argument("--allow-raw-user-ids", action="store_true",
                   help="without EM3_USER_ID_KEY, produce raw user IDs (local demos only; same as "
                        "EM3_ALLOW_RAW_USER_IDS=1); with a key, IDs are pseudonymised either way")
    p.add_argument("--out", default=None, help="write report.json and report.html here")
    add_connection_flags(p)
    p.set_defaults(func=ab_command)


def _progress():
    """A rich progress bar writing to stderr, or None when rich is missing."""
    try:
        from rich.console import Console
        from rich.progress import Progress, TextColumn, TimeElapsedColumn
    except ImportError:  # pragma: no cover - rich is a dependency
        return None
    return Progress(TextColumn("{task.description}"), TextColumn("{task.fields[events]} events"),
                    TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=Console(stderr=True))


def _pseudonymizer(settings, args: argparse.Namespace):
    """The edge's :class:`em3.privacy.Pseudonymizer` (raises ImproperlyConfigured without a key,
    unless ``--allow-raw-user-ids`` or ``EM3_ALLOW_RAW_USER_IDS=1``)."""
    import dataclasses

    from em3.privacy import Pseudonymizer

    if getattr(args, "allow_raw_user_ids", False):
        settings = dataclasses.replace(settings, allow_raw_user_ids=True)
    return Pseudonymizer.from_settings(settings)


def replay_command(args: argparse.Namespace) -> int:
    from em3.errors import ImproperlyConfigured
    from simulators.delays import make_delay
    from simulators.replay import LogReplayer, ReplayConfig
    from simulators.replay_sources import file_rows, movielens_rows, obd_rows

    if not args.dry_run:  # the edge: refuse before reading anything without a user ID key
        from em3.app.cli import settings_from_args

        try:
            _pseudonymizer(settings_from_args(args), args)
        except ImproperlyConfigured as exc:
            print(f"em3 replay: {exc}", file=sys.stderr)
            return 2

    delay = make_delay(args.click_delay) if args.click_delay else None
    if args.obd:
        rows = obd_rows(args.obd, args.policy, click_delay=delay, seed=args.seed)
        source = f"obd:{args.obd}:{args.policy}"
    elif args.movielens:
        rows = movielens_rows(click_delay=delay, seed=args.seed)
        source = "movielens-100k"
    else:
        rows = file_rows(args.file, format=args.format, default_delay=delay, seed=args.seed)
        source = args.file
    config = ReplayConfig(speed=args.speed, max_events_per_s=args.rate, start_at=args.start_at,
                          max_events=args.max_events, presorted=args.presorted, progress_every=1000)
    progress = None if args.no_progress else _progress()
    task = None

    def on_progress(stats) -> None:
        if progress is not None and task is not None:
            rate = f"{stats.events / stats.wall_s:,.0f}/s" if stats.wall_s else ""
            progress.update(task, events=stats.events, rate=rate)

    replayer = LogReplayer(config, on_progress=on_progress)
    out: dict[str, object] = {"source": source}
    if progress is not None:
        progress.start()
        task = progress.add_task(f"replay {source}", events=0, rate="")
    try:
        if args.dry_run:
            for _ in replayer.run(rows):
                pass
        else:
            from em3.app.cli import settings_from_args
            from simulators.kafka_sink import produce_events

            settings = settings_from_args(args)
            sink = produce_events(replayer.run(rows), settings.kafka, prefix=settings.topics.prefix,
                                  partitions=args.partitions, pseudonymize=_pseudonymizer(settings, args))
            out["kafka"] = sink.to_dict()
    except KeyboardInterrupt:
        out["interrupted"] = True
    finally:
        if progress is not None:
            progress.stop()
    out["replay"] = replayer.stats.to_dict()
    out["resume_with"] = f"--start-at {replayer.stats.position}"
    print(json.dumps(out))
    return 0


def _builtin_arms(spec: str, world):
    from simulators.rankers import OracleRanker, PopularityRanker, RandomRanker

    arms = {}
    for i, name in enumerate(n.strip() for n in spec.split(",") if n.strip()):
        if name == "random":
            arms[name] = RandomRanker(name, seed=i)
        elif name == "popularity":
            arms[name] = PopularityRanker(name)
        elif name == "oracle":
            arms[name] = OracleRanker(world, name)
        elif name == "oracle-noisy":
            arms[name] = OracleRanker(world, name, noise=2.0, seed=i)
        else:
            raise ImproperlyConfigured(
                f"arm must be one of random, popularity, oracle, oracle-noisy, but {name!r} is given")
    return arms


def ab_command(args: argparse.Namespace) -> int:
    from simulators.ab import ABConfig, ABRunner
    from simulators.world import World, WorldConfig

    world = World(WorldConfig(n_users=args.n_users, n_items=args.n_items, seed=args.world_seed))
    sinks = []
    client = None
    if args.server:
        from simulators.http_ranker import HTTPRanker

        names = [n.strip() for n in (args.arm_names or "").split(",") if n.strip()]
        if len(names) < 2:
            print("--server needs --arm-names with at least two names, control first", file=sys.stderr)
            return 2
        client = HTTPRanker(args.server)
        client.register_items(world.item_content(i) for i in world.item_ids)
        arms = {n: client for n in names}
        sinks.append(client.click_sink())
    else:
        arms = _builtin_arms(args.arms, world)
    kafka_sink = None
    if args.kafka:
        from em3.app.cli import settings_from_args
        from em3.errors import ImproperlyConfigured
        from simulators.kafka_sink import KafkaEventSink

        settings = settings_from_args(args)
        try:
            pseudonymize = _pseudonymizer(settings, args)
        except ImproperlyConfigured as exc:
            print(f"em3 ab: {exc}", file=sys.stderr)
            return 2
        kafka_sink = KafkaEventSink(settings.kafka, prefix=settings.topics.prefix, pseudonymize=pseudonymize)
        sinks.append(kafka_sink)

    def sink(event) -> None:
        for s in sinks:
            s(event)

    config = ABConfig(n_requests=args.n_requests, k=args.k, request_rate_per_s=args.rate, alpha=args.alpha,
                      tau2=args.tau2, check_every=args.check_every, stop_early=args.stop_early, seed=args.seed,
                      arm_from_ranking=bool(args.server), unit=args.unit, min_samples=args.min_units)
    report = ABRunner(world, arms, config, event_sink=sink if sinks else None).run()
    summary: dict[str, object] = {
        "control": report.control, "requests": report.requests, "stop_reason": report.stop_reason,
        "unit": args.unit, "users": {a: s["users"] for a, s in report.final.items()},
        "ctr": {a: s["ctr"] for a, s in report.final.items()},
        "cvr": {a: s["cvr"] for a, s in report.final.items()},
        "conversions": {a: s["conversions"] for a, s in report.final.items()},
        "conversions_per_user": {a: s["conversions_per_user"] for a, s in report.final.items()},
        "verdicts": {a: {"verdict": v["verdict"], "diff": v["diff"], "p_value": v["p_value"],
                         "ci": [v["ci_low"], v["ci_high"]], "stopped_at_request": v["stopped_at_request"],
                         "fixed_horizon": v["fixed_horizon"]}
                     for a, v in report.tests.items()},
    }
    if kafka_sink is not None:
        summary["kafka"] = kafka_sink.close().to_dict()
    if client is not None:
        summary["clicks_posted"] = client.clicks_posted
        summary["click_errors"] = client.click_errors
        summary["conversions_posted"] = client.conversions_posted
        summary["conversion_errors"] = client.conversion_errors
    if args.out:
        from simulators.report import write_report

        written = write_report(report, Path(args.out))
        summary["report"] = str(written["html"])
    print(json.dumps(summary))
    return 0
