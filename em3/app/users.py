"""``em3 users``: delete a user everywhere, follow a deletion, rotate the user ID key.

Examples::

    em3 users delete alice --wait          # request the erasure, wait for completion
    em3 users status alice                 # requested / erasing / stores_erased / complete
    em3 users rotate-key                   # new pseudonyms from now on (services.json)
    em3 users rotate-key --finish          # drop the previous key after the migration window

``delete`` does what ``DELETE /v1/users/{id}`` does: it writes a deletion request
(under the user's pseudonym, for each key held) to the compacted deletions topic,
where the join's deletion agent picks it up (``docs/architecture.md``, privacy).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["register", "rotate_key_file"]


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``em3 users`` to the command line."""
    from em3.app.cli import add_connection_flags

    p = sub.add_parser("users", help="user data rights: delete a user, follow a deletion, rotate the ID key",
                       description="Delete a user everywhere (Kafka request -> faust deletion agent -> Redis, "
                                   "learners), follow a deletion, or rotate the HMAC key of user pseudonyms.")
    p.add_argument("action", choices=["delete", "status", "rotate-key"])
    p.add_argument("user_id", nargs="?", help="the raw user ID (delete, status)")
    p.add_argument("--wait", action="store_true", help="delete: wait until the erasure is complete")
    p.add_argument("--timeout-s", type=float, default=300.0, help="delete --wait: give up after this long")
    p.add_argument("--finish", action="store_true",
                   help="rotate-key: end the rotation (drop the previous key); do it once the histories of "
                        "active users have moved, e.g. after the history retention period")
    p.add_argument("--run-dir", help="rotate-key: the services run directory whose services.json holds the key "
                                     "(env EM3_RUN_DIR, default runs/services)")
    p.add_argument("--redis-prefix", default=None, help="Redis key prefix (default em3:)")
    add_connection_flags(p)
    p.set_defaults(func=_users)


def _users(args: argparse.Namespace) -> int:
    if args.action == "rotate-key":
        from em3.config import default_run_dir

        return _rotate(Path(args.run_dir) if args.run_dir else default_run_dir(), args.finish)
    if not args.user_id:
        print(f"em3 users {args.action}: give the user ID", file=sys.stderr)
        return 2
    import dataclasses

    from em3.app.cli import settings_from_args
    from em3.errors import ImproperlyConfigured
    from em3.privacy import Pseudonymizer
    from em3.types import valid_id

    if not valid_id(args.user_id):
        print("em3 users: a user ID is 1-256 characters without control characters", file=sys.stderr)
        return 2
    settings = settings_from_args(args)
    if args.redis_prefix is not None:
        settings = dataclasses.replace(settings, redis_prefix=args.redis_prefix)
    try:
        pseudonymize = Pseudonymizer.from_settings(settings)
    except ImproperlyConfigured as exc:
        print(f"em3 users: {exc}", file=sys.stderr)
        return 2
    if args.action == "delete":
        return _delete(settings, pseudonymize, args)
    status = _status(settings, pseudonymize, args.user_id)
    print(json.dumps(status or {"status": "unknown"}))
    return 0 if status else 1


def _delete(settings: Any, pseudonymize: Any, args: argparse.Namespace) -> int:
    from em3.privacy import deletion_records
    from em3.redis_stores import RedisPrivacyStore, connect
    from stream.kafka import ensure_topics, make_producer

    ensure_topics(settings.kafka, settings.topics, partitions=1, retention_s=settings.retention.topic_retention_s)
    requested_at = time.time()
    records = deletion_records(pseudonymize.all(args.user_id), requested_at, "cli")
    producer = make_producer(settings.kafka, linger_ms=0)
    for key, value, _ in records:
        producer.produce(settings.topics.deletions, key=key, value=value)
    if producer.flush(30):
        print("em3 users delete: the broker did not acknowledge the request within 30 s", file=sys.stderr)
        return 1
    client = connect(settings.redis)
    try:
        store = RedisPrivacyStore(client, settings.redis_prefix, settings.retention.tombstone_ttl_s)
        for _, _, tomb in records:
            store.requested(tomb)
        status: dict[str, Any] | None = {"status": "requested", "requested_at": requested_at}
        if args.wait:
            deadline = time.monotonic() + args.timeout_s
            while time.monotonic() < deadline:
                status = _status(settings, pseudonymize, args.user_id, store)
                if status and status["status"] == "complete":
                    break
                time.sleep(0.2)
    finally:
        client.close()
    print(json.dumps(status))
    return 0 if not args.wait or (status and status["status"] == "complete") else 1


def _status(settings: Any, pseudonymize: Any, raw: str, store: Any = None) -> dict[str, Any] | None:
    from em3.privacy import tombstone_id
    from em3.redis_stores import RedisPrivacyStore, connect

    client = None
    if store is None:
        client = connect(settings.redis)
        store = RedisPrivacyStore(client, settings.redis_prefix, settings.retention.tombstone_ttl_s)
    try:
        tombs = [store.status(tombstone_id(p)) for p in pseudonymize.all(raw)]
    finally:
        if client is not None:
            client.close()
    known = [t for t in tombs if t is not None]
    if not known:
        return None
    done = all(t.status == "complete" for t in known)
    out = {"status": "complete" if done else known[0].status, "requested_at": min(t.requested_at for t in known),
           "completed_at": max(t.completed_at or 0.0 for t in known) if done else None,
           "lines_reset": known[0].lines_reset, "erased": known[0].erased}
    if done:
        out["erase_s"] = round(out["completed_at"] - out["requested_at"], 3)
    return out


def rotate_key_file(path: Path, finish: bool = False) -> dict[str, Any]:
    """Rotate the user ID key held in a ``services.json`` (see :func:`_rotate`); returns
    what changed, never a key."""
    from em3.app.services import _write_private
    from em3.privacy import new_user_id_key

    doc = json.loads(path.read_text())
    if finish:
        dropped = bool(doc.pop("user_id_key_previous", None))
        _write_private(path, json.dumps(doc, indent=2))
        return {"rotation": "finished", "previous_key_dropped": dropped}
    if doc.get("user_id_key_previous"):
        raise ValueError("a rotation is already under way: run `em3 users rotate-key --finish` first")
    if doc.get("user_id_key"):
        doc["user_id_key_previous"] = doc["user_id_key"]
    doc["user_id_key"] = new_user_id_key()
    _write_private(path, json.dumps(doc, indent=2))
    return {"rotation": "started", "has_previous_key": "user_id_key_previous" in doc}


def _rotate(run_dir: Path, finish: bool) -> int:
    """``em3 users rotate-key``: a new user ID key in ``run_dir/services.json``, the old
    one kept as the previous key until ``--finish``. Restart servers, the join and the
    learners to pick it up. A deployment that sets ``EM3_USER_ID_KEY`` itself sets
    ``EM3_USER_ID_KEY_PREVIOUS`` to the old key and ``EM3_USER_ID_KEY`` to a new one
    (``python -c "from em3.privacy import new_user_id_key; print(new_user_id_key())"``)."""
    path = run_dir / "services.json"
    if not path.exists():
        print(f"em3 users rotate-key: no {path}; with keys in the environment, set EM3_USER_ID_KEY_PREVIOUS "
              "to the current key and EM3_USER_ID_KEY to a new one (em3.privacy.new_user_id_key()), then "
              "restart the servers", file=sys.stderr)
        return 2
    try:
        out = rotate_key_file(path, finish)
    except ValueError as exc:
        print(f"em3 users rotate-key: {exc}", file=sys.stderr)
        return 2
    out["file"] = str(path)
    out["next"] = ("restart em3 serve (and replay) to pseudonymise with the new key; after the history "
                   "retention period run `em3 users rotate-key --finish`") if not finish else "restart em3 serve"
    print(json.dumps(out))
    return 0
