"""Publish snapshots of a fresh model on one line, with whichever ``em3`` is on the path.

``benchmarks/serving.py --explain`` runs this as a subprocess with ``PYTHONPATH`` set
to the baseline's source tree (e.g. ``git archive a529d5d``), so the baseline server
reads snapshots written by its own code: that code's default (or tiny) model, built
after ``torch.manual_seed(--seed)``, signed with ``EM3_SNAPSHOT_KEY``, under
``--redis-prefix``. It also writes the user histories of ``--histories`` (a JSON file
of ``[user, item_id, clicked_at]`` rows) where that code looks them up (by pseudonym
if it has :mod:`em3.privacy`, else by the raw user id), unless they are there already.

So it only uses what both old and new trees have: ``EM3Model``, ``ModelConfig``,
``em3.snapshot.pack``, ``em3.redis_stores`` (``connect``, ``RedisSnapshotStore``,
``RedisHistoryStore``) and ``em3.config.RedisSettings``.

Protocol on stdin/stdout: after the first version it prints one JSON line
(``{"ready": true, "version", "config", "history_keys", "histories_written"}``);
each line read on stdin then starts publishing a new version every
``--swap-interval`` seconds (noise 0.01, as the benchmark's own publisher); end of
stdin stops it. The last line printed is one JSON object: ``{"published": N, ...}``.

    PYTHONPATH=/tmp/baseline-a529d5d python benchmarks/publish_line.py --redis-url redis://... \\
        --redis-prefix bench: --line bench-baseline --config default --seed 0 --swap-interval 4
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import threading


def _config_dict(config) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config), default=list))


def _history_key(user_id_key: str):
    """How this tree's server keys a user's history: its pseudonym, or the raw ID."""
    try:
        from em3.privacy import Pseudonymizer
    except ImportError:  # before pseudonymisation: the raw user ID
        return "raw user id", (lambda user: user)
    return "pseudonym", Pseudonymizer(user_id_key)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--redis-url", required=True)
    p.add_argument("--redis-prefix", default="bench:")
    p.add_argument("--line", required=True)
    p.add_argument("--config", choices=["default", "tiny"], default="default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--swap-interval", type=float, default=4.0)
    p.add_argument("--keep", type=int, default=5)
    p.add_argument("--histories", default=None, help="JSON file of [user, item_id, clicked_at] rows")
    args = p.parse_args(argv)
    # This file's folder (benchmarks/, with a serving.py) is not code to import from.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or ".") != here]

    import torch

    from em3 import snapshot
    from em3.config import RedisSettings
    from em3.model import EM3Model, ModelConfig
    from em3.redis_stores import RedisHistoryStore, RedisSnapshotStore, connect

    config = ModelConfig() if args.config == "default" else ModelConfig.tiny()
    torch.manual_seed(args.seed)
    state = EM3Model(config).eval().trainable_state_dict()
    redis = connect(RedisSettings(args.redis_url))
    store = RedisSnapshotStore(redis, args.redis_prefix, keep=args.keep, signing_key=os.environ["EM3_SNAPSHOT_KEY"])
    noise = torch.Generator().manual_seed(args.seed)

    def publish(scale: float) -> int:
        version = store.next_version(args.line)
        noisy = {k: v + scale * torch.randn(v.shape, generator=noise) for k, v in state.items()}
        blob, manifest = snapshot.pack(noisy, model_line=args.line, version=version, config=config)
        store.publish(manifest, blob)
        return version

    written, how = 0, None
    if args.histories:
        how, key = _history_key(os.environ.get("EM3_USER_ID_KEY", ""))
        history = RedisHistoryStore(redis, args.redis_prefix)
        rows = json.loads(open(args.histories).read())
        users = {user for user, _, _ in rows}
        missing = {user for user in users if not history.get(key(user), 1)}
        history.append_many([(key(user), item, float(at)) for user, item, at in rows if user in missing])
        written = len(missing)
    first = publish(0.0)
    print(json.dumps({"ready": True, "version": first, "config": _config_dict(config),
                      "history_keys": how, "histories_written": written}), flush=True)

    stop = threading.Event()
    if not sys.stdin.readline():  # closed before "go": publish nothing more
        stop.set()

    def watch_stdin() -> None:
        while sys.stdin.readline():
            pass
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    published = 0
    while not stop.wait(args.swap_interval):
        publish(0.01)
        published += 1
    redis.close()
    print(json.dumps({"published": published, "line": args.line}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
