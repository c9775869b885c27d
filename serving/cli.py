"""``em3 serve``: run a ranking server for one model line or an A/B experiment.

Examples::

    em3 serve --model-line main --port 8000
    em3 serve --experiment exp.json --host 0.0.0.0 --port 8000 --redis-url redis://...
"""
from __future__ import annotations

import argparse
import sys
import dataclasses
import json
import logging
from pathlib import Path

__all__ = ["register", "build_runtime"]

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``serve`` to the ``em3`` command line."""
    from em3.app.cli import add_connection_flags

    p = subparsers.add_parser("serve", help="serve /v1/rank with hot-reloaded snapshots (FastAPI + uvicorn)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model-line", help="serve the latest snapshot of this line to all users")
    which.add_argument("--experiment", help="JSON file: {name, salt?, arms: [{name, fraction, kind, objective?, ...}]}")
    p.add_argument("--objective", choices=["ctr", "ctcvr", "value"], default="ctr",
                   help="with --model-line: rank by click probability, click-and-conversion probability "
                        "(needs the CVR head), or expected conversion value (an experiment names it per arm)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--redis-prefix", default=None, help="Redis key prefix (default em3:)")
    p.add_argument("--model-config", default=None,
                   help="expected ModelConfig: a JSON file or a variant name; default: pin each line "
                        "to the config of its first loaded snapshot")
    p.add_argument("--poll-interval", type=float, default=1.0, help="snapshot polling fallback, seconds")
    p.add_argument("--history-len", type=int, default=100)
    p.add_argument("--max-candidates", type=int, default=1000)
    p.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024)
    p.add_argument("--unknown-candidates", choices=["score", "drop"], default="score")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch intra-op threads per request thread (0: torch's default, the core count)")
    p.add_argument("--precompute-threads", type=int, default=1,
                   help="torch intra-op threads for loading versions and precomputing item rows "
                        "(0: torch's default)")
    p.add_argument("--precompute-nice", type=int, default=5,
                   help="niceness added to the thread that loads versions (0: same priority as requests)")
    p.add_argument("--rank-executor", choices=["loop", "threads"], default="loop",
                   help="run /v1/rank in the event-loop thread (one at a time per process; run one process "
                        "per core) or in a worker-thread pool (overlapping requests, about 1 ms of thread "
                        "hand-offs each)")
    p.add_argument("--precompute-max-items", type=int, default=50_000,
                   help="most items whose content rows are computed when a line's first version loads, "
                        "and by each background content refresh")
    p.add_argument("--content-refresh-s", type=float, default=30.0,
                   help="least seconds between two background refreshes of a line's content rows (each "
                        "starts when a new version changed the content towers)")
    p.add_argument("--fresh-slot", type=int, default=None, metavar="POSITION",
                   help="show the best-scored new item (fewer than 10 learned impressions) at this position "
                        "(0 is the top) when the model ranks it lower: cold-start exploration, the same in "
                        "every line (default: rank by score alone)")
    p.add_argument("--max-future", type=float, default=300.0,
                   help="served_at/clicked_at further ahead of this server's clock than this many seconds get 422")
    p.add_argument("--allow-raw-user-ids", action="store_true",
                   help="without EM3_USER_ID_KEY, let raw user IDs through to Kafka and Redis (local demos only; "
                        "same as EM3_ALLOW_RAW_USER_IDS=1); with a key, IDs are pseudonymised either way")
    p.add_argument("--trusted-network", action="store_true",
                   help="accept writes (/v1/click, /v1/items) without an API key: only for a server that only "
                        "a trusted network can reach (default: writes need EM3_API_KEY)")
    add_connection_flags(p)
    p.set_defaults(func=_serve)


def _expected_config(spec: str | None) -> dict | None:
    if spec is None:
        return None
    path = Path(spec)
    if path.exists():
        return json.loads(path.read_text())
    from em3.model import ModelConfig

    return ModelConfig.for_variant(spec).to_dict()


def build_runtime(args: argparse.Namespace):
    """A :class:`serving.server.ServingRuntime` from parsed ``em3 serve`` flags."""
    from em3.app.cli import settings_from_args
    from em3.experiment import ExperimentConfig
    from serving.ranking import RankingConfig
    from serving.scoring import EM3Loader
    from serving.server import ServerConfig, ServingRuntime

    settings = settings_from_args(args)
    if args.redis_prefix is not None:
        settings = dataclasses.replace(settings, redis_prefix=args.redis_prefix)
    if getattr(args, "allow_raw_user_ids", False):
        settings = dataclasses.replace(settings, allow_raw_user_ids=True)
    if args.experiment:
        experiment = ExperimentConfig.from_file(args.experiment)
    else:
        experiment = ExperimentConfig.single_line(args.model_line, args.objective)
    ranking = RankingConfig(history_len=args.history_len, max_candidates=args.max_candidates,
                            unknown_candidates=args.unknown_candidates,
                            precompute_max_items=args.precompute_max_items,
                            content_refresh_s=args.content_refresh_s, fresh_slot=args.fresh_slot)
    config = ServerConfig(experiment, ranking, poll_interval_s=args.poll_interval,
                          max_body_bytes=args.max_body_bytes, request_threads=args.torch_threads or None,
                          precompute_threads=args.precompute_threads or None,
                          precompute_nice=args.precompute_nice, rank_executor=args.rank_executor,
                          max_future_s=args.max_future, trusted_network=args.trusted_network)
    return ServingRuntime.from_settings(settings, config, EM3Loader(_expected_config(args.model_config)))


def _serve(args: argparse.Namespace) -> int:
    from em3.errors import ImproperlyConfigured
    from serving.app import serve_forever

    try:
        runtime = build_runtime(args)
    except ImproperlyConfigured as exc:
        print(f"em3 serve: {exc}", file=sys.stderr)
        return 2
    if not runtime.settings.snapshot_key:
        print("em3 serve: no snapshot key; set EM3_SNAPSHOT_KEY (the key learners sign snapshots with; "
              "`em3 services up` generates one)", file=sys.stderr)
        return 2
    print(json.dumps({"serving": runtime.config.experiment.name, "url": f"http://{args.host}:{args.port}"}), flush=True)
    serve_forever(runtime, args.host, args.port)
    return 0
