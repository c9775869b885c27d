"""The ``em3`` command line: one entry point, subcommands registered per package.

Each package that adds commands exposes ``register(subparsers)`` in a ``cli``
module; they are imported lazily so ``em3 --help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import signal
import sys
import time
from typing import Any, Callable, Mapping, Sequence

from em3.config import default_run_dir, load_settings
from em3.errors import ImproperlyConfigured

__all__ = ["main", "add_connection_flags", "settings_from_args", "explain_item"]

# Packages whose ``cli.register`` adds subcommands; missing ones are skipped.
_COMMAND_MODULES = ("stream.cli", "learners.cli", "serving.cli", "simulators.cli", "em3.app.demo", "em3.app.users")


def add_connection_flags(parser: argparse.ArgumentParser) -> None:
    """The flags every component takes to reach external Kafka and Redis."""
    parser.add_argument("--bootstrap-servers", help="Kafka bootstrap servers (env EM3_BOOTSTRAP_SERVERS)")
    parser.add_argument("--redis-url", help="Redis URL, redis:// or rediss:// (env EM3_REDIS_URL)")
    parser.add_argument("--topic-prefix", help="prefix of every topic name (env EM3_TOPIC_PREFIX, default em3.)")
    parser.add_argument("--kafka-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a librdkafka property for every client, e.g. security.protocol=SASL_SSL "
                             "(repeatable; env EM3_KAFKA_<KEY>)")


def _kafka_options(pairs: Sequence[str]) -> dict[str, str]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"em3: --kafka-option must be KEY=VALUE, but {pair!r} is given")
        options[key.strip()] = value
    return options


def settings_from_args(args: argparse.Namespace):
    return load_settings(
        bootstrap_servers=getattr(args, "bootstrap_servers", None),
        redis_url=getattr(args, "redis_url", None),
        topic_prefix=getattr(args, "topic_prefix", None),
        kafka_options=_kafka_options(getattr(args, "kafka_option", None) or []),
    )


def _services(args: argparse.Namespace) -> int:
    from em3.app.services import LocalServices, services_status, stop_services

    run_dir = args.run_dir or default_run_dir()
    if args.action == "up":
        status = services_status(run_dir)
        if any(s.get("answers") for s in status.values()):
            print(json.dumps(status, indent=2))
            print("services already running; `em3 services down` first", file=sys.stderr)
            return 1
        services = LocalServices(run_dir, kafka_port=args.kafka_port, redis_port=args.redis_port,
                                 detached=not args.foreground, durable=args.durable)
        info = services.start()
        # Addresses only: the Redis password, API key and snapshot key are in the
        # owner-only services.json, which every other em3 command reads.
        print(json.dumps({"bootstrap_servers": info.bootstrap_servers, "redis": info.redis_address,
                          "storage": services.storage, "run_dir": str(run_dir),
                          "credentials": str(services.run_dir / "services.json")}))
        if args.foreground:
            # Stay in the foreground until Ctrl-C or SIGTERM, then stop both.
            stop = False

            def _on_signal(signum: int, frame: object) -> None:
                nonlocal stop
                stop = True

            signal.signal(signal.SIGTERM, _on_signal)
            try:
                while not stop:
                    time.sleep(0.2)
            except KeyboardInterrupt:
                pass
            finally:
                services.stop()
        return 0
    if args.action == "down":
        print(json.dumps({"stopped": stop_services(run_dir)}))
        return 0
    status = services_status(run_dir)
    print(json.dumps(status, indent=2))
    return 0 if all(s.get("answers") for s in status.values()) else 1


def explain_item(snapshots: Any, content: Any, history: Any, line: str, user_id: str, item_id: str, *,
                 version: int | None = None, context: Mapping[str, str] | None = None,
                 history_len: int = 100, objective: str = "ctr") -> dict[str, Any]:
    """What ``POST /v1/rank`` with ``"explain": true`` answers for one item on an arm that
    ranks by ``objective``, computed here from a line's snapshot: ``version`` (default
    the line's pointer), read with
    :func:`em3.snapshot.load_state` (a full snapshot or a delta chain), scored by the
    server's own :class:`serving.ranking.RankingService` against the user's history
    and the item's content from the given stores. Nothing is logged."""
    from em3.model import EM3Model, ModelConfig
    from em3.snapshot import load_state
    from serving.ranking import RankingConfig, RankingService
    from serving.scoring import EM3RankingModel

    manifest, state = load_state(snapshots, line, version)
    model = EM3Model(ModelConfig.from_dict(manifest.config), cache_items=1000)
    model.load_trainable_state_dict(state)
    service = RankingService(content, history, RankingConfig(history_len=history_len, precompute_max_items=0))
    serving = service.prepare(line, manifest, EM3RankingModel(model))
    result = service.rank(serving, user_id, [item_id], dict(context or {}), 1, explain=True, objective=objective)
    return {"user_id": user_id, "item_id": item_id, "model_line": line, "model_version": manifest.version,
            "objective": objective,
            "snapshot_kind": manifest.kind, "score": result.items[0].score,
            "registered": item_id not in result.unknown_item_ids, "history_len": result.history_len,
            "explanation": result.explanations[0]}


def _explain(args: argparse.Namespace) -> int:
    from em3.errors import SnapshotError
    from em3.privacy import Pseudonymizer
    from em3.redis_stores import RedisContentStore, RedisHistoryStore, RedisSnapshotStore, connect

    settings = settings_from_args(args)
    prefix = settings.redis_prefix if args.redis_prefix is None else args.redis_prefix
    if not settings.snapshot_key:
        print("em3 explain: no snapshot key; set EM3_SNAPSHOT_KEY (the key learners sign snapshots with)",
              file=sys.stderr)
        return 2
    context = {}
    for pair in args.context:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            print(f"em3 explain: --context must be KEY=VALUE, but {pair!r} is given", file=sys.stderr)
            return 2
        context[key] = value
    # Stores and snapshots know users by pseudonym only: look the user up as the server would.
    user = Pseudonymizer.from_settings(settings)(args.user)
    client = connect(settings.redis)
    try:
        report = explain_item(RedisSnapshotStore(client, prefix, signing_key=settings.snapshot_key),
                              RedisContentStore(client, prefix), RedisHistoryStore(client, prefix),
                              args.model_line, user, args.item, version=args.version, context=context,
                              history_len=args.history_len, objective=args.objective)
    except SnapshotError as exc:
        print(f"em3 explain: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # an objective this snapshot's model cannot rank by
        print(f"em3 explain: {exc}", file=sys.stderr)
        return 2
    finally:
        client.close()
    print(json.dumps(report, indent=2))
    return 0


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="em3", description="em3-stream: online end-to-end EM3 training")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("services", help="start/stop the embedded Kafka broker (Tansu) and Redis",
                       description="Start, stop or check the embedded Kafka-protocol broker (Tansu) and "
                                   "Redis. Redis gets a generated password; it, the API key and the "
                                   "snapshot key go in RUN_DIR/services.json (mode 0600), never on screen.")
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--run-dir", help="pid files, logs, services.json (env EM3_RUN_DIR, default runs/services)")
    p.add_argument("--kafka-port", type=int, default=None, help="default: a free port")
    p.add_argument("--redis-port", type=int, default=None, help="default: a free port")
    p.add_argument("--foreground", action="store_true", help="stay attached; stop both on Ctrl-C")
    p.add_argument("--durable", action="store_true",
                   help="keep the broker's topics, records and consumer offsets in files under "
                        "RUN_DIR/broker-data, so they survive a broker restart (default: in memory, "
                        "lost when the broker restarts)")
    p.set_defaults(func=_services)

    p = sub.add_parser("explain", help="why a line's latest snapshot scores an item as it does for a user",
                       description="Print, as JSON, the explanation POST /v1/rank gives with \"explain\": true "
                                   "for one item: the Fusion-Q-Former's attention mass on text, image and "
                                   "missing content, the user's history items with the largest "
                                   "target-attention weight, and the Shapley split of the score ranked by "
                                   "--objective into content and ID parts, in total and per term (click, "
                                   "conversion, odds or value). Reads the snapshot (full or delta chain), the user's "
                                   "history and the item's content from Redis; logs nothing.")
    p.add_argument("--user", required=True, help="user id")
    p.add_argument("--item", required=True, help="item id")
    p.add_argument("--model-line", default="em3", help="the line whose snapshot explains (default em3)")
    p.add_argument("--version", type=int, default=None, help="snapshot version (default: the line's pointer)")
    p.add_argument("--context", action="append", default=[], metavar="KEY=VALUE", help="request context (repeatable)")
    p.add_argument("--history-len", type=int, default=100, help="most recent clicks read (as em3 serve)")
    p.add_argument("--objective", choices=["ctr", "ctcvr", "value"], default="ctr",
                   help="the score explained: what the arm ranks by (as em3 serve --objective)")
    p.add_argument("--redis-prefix", default=None, help="Redis key prefix (default em3:)")
    add_connection_flags(p)
    p.set_defaults(func=_explain)

    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):
                continue
            raise
        register: Callable[[argparse._SubParsersAction], None] = module.register
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except ImproperlyConfigured as exc:  # a bad flag, EM3_* variable or config file: say which, no traceback
        print(f"em3 {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
