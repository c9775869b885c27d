"""Deletion through the real parts: `em3 users delete` writes the request to the
deletions topic (Tansu), the join's faust deletion agent (a real `em3 join`
worker subprocess) erases the user's history, pending impressions and held clicks
from Redis, waits for the model line's reset, completes the tombstone, records it
in its faust Table; the user's later events are dropped. Another user is untouched."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from em3 import codec
from em3.app.services import free_port, wait_until
from em3.privacy import Pseudonymizer, tombstone_id
from em3.redis_stores import RedisPrivacyStore, scan_values
from em3.types import Click, Impression
from stream.kafka import ensure_topics, make_producer

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _env(settings) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "EM3_USER_ID_KEY": settings.user_id_key,
            "EM3_RUN_DIR": "/nonexistent-em3-run-dir"}


def _flags(settings) -> list[str]:
    return ["--bootstrap-servers", settings.kafka.bootstrap_servers, "--redis-url", settings.redis.url,
            "--topic-prefix", settings.topics.prefix, "--redis-prefix", settings.redis_prefix]


def _events(user: str, now: float, tag: str) -> list[Impression | Click]:
    """Six impressions, three of them clicked (history), and a click held for later."""
    out: list[Impression | Click] = []
    for n in range(6):
        imp = Impression(f"{tag}-{user[:6]}-{n}", "r", user, f"item{n}", n, now - 5)
        out.append(imp)
        if n % 2 == 0:
            out.append(Click(imp.impression_id, user, imp.item_id, now - 4))
    out.append(Click(f"{tag}-{user[:6]}-future", user, "item9", now + 100))  # impression unknown: held
    return out


def _produce(settings, events) -> None:
    producer = make_producer(settings.kafka, linger_ms=1)
    for e in events:
        topic = settings.topics.impressions if isinstance(e, Impression) else settings.topics.clicks
        producer.produce(topic, key=e.user_id.encode(), value=codec.encode(e))
    assert producer.flush(10) == 0


def _metrics(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/join/metrics", timeout=5) as r:
        return json.loads(r.read())


def test_a_deletion_reaches_redis_the_join_state_and_the_model_lines(settings, redis_client, tmp_path):
    ensure_topics(settings.kafka, settings.topics, partitions=2)
    pseudonymize = Pseudonymizer(settings.user_id_key)
    gone, kept = pseudonymize("alice@example.com"), pseudonymize("bob@example.com")
    tid = tombstone_id(gone)
    now = time.time()
    _produce(settings, _events(gone, now, "a") + _events(kept, now, "a"))
    privacy = RedisPrivacyStore(redis_client, settings.redis_prefix)
    privacy.heartbeat("line-a")  # a model line whose learner is alive: the erasure waits for it

    port = free_port()
    log = open(tmp_path / "join.log", "wb")
    join = subprocess.Popen(
        [sys.executable, "-m", "stream", "-v", "join", "--window-s", "60", "--allowed-lateness-s", "5",
         "--idle-timeout-s", "0", "--batch-size", "100", "--web-port", str(port), *_flags(settings)],
        stdout=log, stderr=subprocess.STDOUT, env=_env(settings), cwd=ROOT, start_new_session=True)
    hist = f"{settings.redis_prefix}hist:".encode()
    needle = re.compile(re.escape(gone.encode()))
    try:
        wait_until(lambda: redis_client.llen(hist + gone.encode()) == 3 and redis_client.llen(hist + kept.encode()) == 3,
                   90, "the join to write both histories")
        wait_until(lambda: needle.search(b"".join(
            (redis_client.get(k) or b"") + b"".join(redis_client.lrange(k.replace(b":base", b":log"), 0, -1))
            for k in redis_client.scan_iter(f"{settings.redis_prefix}join:*:base"))) or needle.search(b"".join(
                b"".join(redis_client.lrange(k, 0, -1)) for k in redis_client.scan_iter(
                    f"{settings.redis_prefix}join:*:log"))), 30, "the user's pending impressions in the join state")

        done = subprocess.run([sys.executable, "-m", "em3", "users", "delete", "alice@example.com", *_flags(settings)],
                              capture_output=True, text=True, env=_env(settings), cwd=ROOT, timeout=60)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["status"] == "requested"

        erased = wait_until(lambda: (t := privacy.status(tid)) is not None and t.status == "stores_erased" and t,
                            60, "the agent to erase the stores")
        assert erased.lines_expected == ["line-a"] and erased.erased["history_keys"] == 1
        assert erased.erased["join_records"] == 6 and erased.erased["held_clicks"] == 1
        assert privacy.pending() == {tid: gone}  # the line still owes the reset of the user's rows
        assert redis_client.llen(hist + kept.encode()) == 3  # the other user is untouched
        # Only what the pending reset needs still names the user: the pending entry itself.
        assert scan_values(redis_client, needle) == {gone.encode(): {f"{settings.redis_prefix}privacy:pending".encode()}}

        privacy.reset_done("line-a", 7, [tid], at=time.time())  # what the line's publisher reports
        complete = wait_until(lambda: (t := privacy.status(tid)) is not None and t.status == "complete" and t,
                              30, "the tombstone to complete")
        assert complete.lines_reset == {"line-a": 7} and complete.completed_at >= erased.stores_erased_at
        assert privacy.pending() == {}
        assert scan_values(redis_client, needle) == {}  # nothing in Redis names the user any more

        # The faust Table records the completed tombstone (the completion record went round the topic).
        def table() -> dict | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/privacy/tombstones/{tid}", timeout=5) as r:
                    return json.loads(r.read())
            except OSError:
                return None

        assert wait_until(lambda: (t := table()) is not None and t["status"] == "complete" and t, 30,
                          "the tombstone in the faust table")["completed_at"] == complete.completed_at

        # Events of the erased user still in flight are dropped; the other user's go on.
        dropped_before = _metrics(port)["erased_dropped"]
        _produce(settings, _events(gone, time.time(), "b")[:2] + _events(kept, time.time(), "b")[:2])
        wait_until(lambda: redis_client.llen(hist + kept.encode()) == 4, 60, "the kept user's new click")
        assert _metrics(port)["erased_dropped"] >= dropped_before + 2
        assert scan_values(redis_client, needle) == {}
    finally:
        os.killpg(join.pid, signal.SIGTERM)
        join.wait(timeout=30)
        log.close()
