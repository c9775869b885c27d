"""Replay the Open Bandit Dataset random logs (campaign all) into the local broker, as fast as possible.

Starts an embedded Tansu broker (and Redis, which the manager brings along)
with :class:`em3.app.services.LocalServices`, unless ``--bootstrap-servers`` points
at a running one. Rows are read first (CSV parsing is not replay); the timed
part is the replay itself: event-time merge of impressions and delayed
clicks, encoding, producing keyed records, and the final flush until every
record is acknowledged. ``--repeat N`` replays the log N times into fresh
topics and reports the median, so one slow flush does not decide the figure.

Usage::

    python benchmarks/replay.py

The last line printed is one JSON object with ``events_per_s`` and ``events``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from em3.config import KafkaSettings  # noqa: E402
from simulators.kafka_sink import produce_events  # noqa: E402
from em3.privacy import Pseudonymizer, new_user_id_key  # noqa: E402
from simulators.obd import load_obd  # noqa: E402
from simulators.replay import LogReplayer, ReplayConfig  # noqa: E402
from simulators.replay_sources import obd_rows  # noqa: E402
from stream.kafka import ensure_topics  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--campaign", default="all", choices=("all", "men", "women"))
    parser.add_argument("--policy", default="random", choices=("random", "bts"))
    parser.add_argument("--bootstrap-servers", default=None, help="use this broker instead of starting one")
    parser.add_argument("--repeat", type=int, default=5, help="replays (each into fresh topics)")
    parser.add_argument("--speed", type=float, default=0.0, help="0 = as fast as possible")
    parser.add_argument("--partitions", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.repeat <= 0:
        parser.error(f"--repeat must be > 0, but {args.repeat} is given")

    load_obd(args.campaign, args.policy)  # parse the CSV once, outside the timing
    with ExitStack() as stack:
        bootstrap = args.bootstrap_servers
        if bootstrap is None:
            from em3.app.services import LocalServices

            services = stack.enter_context(LocalServices(tempfile.mkdtemp(prefix="em3-bench-replay-")))
            bootstrap = services.info.bootstrap_servers
        runs = []
        for r in range(args.repeat):
            prefix = f"bench{uuid.uuid4().hex[:6]}."
            replayer = LogReplayer(ReplayConfig(speed=args.speed))
            # Topics are created before the clock starts: setup, not replay.
            ensure_topics(KafkaSettings(bootstrap), [f"{prefix}impressions", f"{prefix}clicks"],
                          partitions=args.partitions)
            started = time.perf_counter()
            rows = obd_rows(args.campaign, args.policy, seed=args.seed)
            sink = produce_events(replayer.run(rows), bootstrap, prefix=prefix, create_topics=False,
                                  pseudonymize=Pseudonymizer(new_user_id_key()))
            wall = time.perf_counter() - started
            if sink.delivered != sink.total or sink.failed:
                raise RuntimeError(f"delivery incomplete: {sink.to_dict()}")
            runs.append({"events": replayer.stats.events, "wall_s": wall, "events_per_s": sink.total / wall,
                         "impressions": replayer.stats.impressions, "clicks": replayer.stats.clicks,
                         "malformed": replayer.stats.malformed_total})
            print(f"run {r}: {runs[-1]}", file=sys.stderr)
    best = max(runs, key=lambda x: x["events_per_s"])
    out = {
        "events_per_s": statistics.median(x["events_per_s"] for x in runs),
        "events": runs[0]["events"],
        "impressions": runs[0]["impressions"],
        "clicks": runs[0]["clicks"],
        "malformed": runs[0]["malformed"],
        "best_events_per_s": best["events_per_s"],
        "runs": len(runs),
        "wall_s_per_run": [x["wall_s"] for x in runs],
        "campaign": args.campaign,
        "policy": args.policy,
        "speed": args.speed,
        "acks": "all",
        "broker": "tansu (memory)" if args.bootstrap_servers is None else args.bootstrap_servers,
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
