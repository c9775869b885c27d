"""Deletion that reaches everything, on a live stack, with no raw user ID anywhere.

Starts the embedded broker and Redis (:class:`em3.app.services.LocalServices`, with a
generated user ID key), the join (``em3 join``: the faust app with the deletion
agent), a learner (``em3 learn``: the default ``em3`` model through a Ray actor by
default) and a ranking server (``em3 serve``) as subprocesses. Simulated users
(raw IDs ``rawuser-NNNNNN``, at least 1,000 of them) ask ``/v1/rank`` and click
through ``/v1/click``. Once every user has been served, ``--delete`` of them (users
who clicked, so they have a history, pending impressions and trained rows) are
deleted with ``DELETE /v1/users/{id}`` while the others' traffic flows; each
deleted user stops asking, but clicks it already had in flight still arrive. Each
deletion is followed with ``GET /v1/users/{id}/deletion`` to the time erasure
completed; when it does, the snapshot version that reset the user's rows is loaded
and checked.

Then it scans:

* every Redis key (names and values, :func:`em3.redis_stores.scan_values`) for the
  deleted users' pseudonyms and raw IDs, and for any raw ID at all;
* the newest snapshot (:func:`em3.snapshot.load_state` through its delta chain) for
  the deleted users' rows (reset unless a live user shares the hash bucket and
  trained it since), and its blobs and manifests for any ID;
* every record of every topic (up to ``--topic-sample`` per topic) for any raw ID and
  for the deleted users' pseudonyms, split by when the record was written: before
  the deletion request, after it, after the erasure completed.

Run::

    python benchmarks/privacy.py                                   # em3 through Ray
    python benchmarks/privacy.py --tiny --variant id_only --runtime in_process   # quick

The last printed line is one JSON object: users_deleted, erase_p99_s, residual_keys,
residual_in_snapshot, raw_ids_found, ...
"""
from __future__ import annotations

import argparse
import heapq
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np

from em3.app.services import LocalServices, free_port, wait_until
from em3.model import USER_ROW_STATE, user_rows, user_rows_in
from em3.privacy import Pseudonymizer, is_pseudonym, tombstone_id
from em3.redis_stores import RedisContentStore, RedisPrivacyStore, RedisSnapshotStore, connect, scan_values
from em3.snapshot import load_state
from em3.types import ItemContent
from stream.kafka import TopicPartition, ensure_topics, make_consumer, partition_counts

log = logging.getLogger("privacy")
LINE = "priv"
RAW = re.compile(rb"rawuser-\d{6}")
HEX32 = re.compile(rb"(?<![0-9a-f])[0-9a-f]{32}(?![0-9a-f])")
REPO = Path(__file__).resolve().parents[1]


def raw_id(n: int) -> str:
    return f"rawuser-{n:06d}"


class Traffic:
    """Simulated users: rank requests in a round-robin over the live users (so every
    user is served early), clicks posted after a delay, deletions on request."""

    def __init__(self, url: str, api_key: str, users: list[str], items: list[str], rate: float,
                 candidates: int, click_p: float, seed: int) -> None:
        self.url, self.headers = url, {"X-API-Key": api_key}
        self.live = list(users)
        self.items = items
        self.rate, self.candidates, self.click_p = rate, candidates, click_p
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.served: dict[str, int] = {}
        self.clicked: dict[str, int] = {}
        self.requests = self.rank_errors = self.clicks_posted = self.click_errors = 0
        self.late_clicks = 0  # clicks of users deleted meanwhile (in flight)
        self.deleted: set[str] = set()
        self._clicks: list[tuple[float, int, dict]] = []
        self._seq = 0

    def run(self) -> None:
        threads = [threading.Thread(target=self._ranker, daemon=True),
                   threading.Thread(target=self._clicker, daemon=True)]
        for t in threads:
            t.start()
        self._threads = threads

    def join(self) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(30)

    def delete(self, user: str) -> None:
        """The user leaves: no new requests (clicks already in flight still arrive)."""
        with self.lock:
            self.deleted.add(user)
            self.live = [u for u in self.live if u != user]

    def _ranker(self) -> None:
        order: list[str] = []
        with httpx.Client(base_url=self.url, timeout=30) as http:
            t0, n = time.monotonic(), 0
            while not self.stop.is_set():
                if not order:
                    with self.lock:
                        order = list(self.live)
                    self.rng.shuffle(order)
                user = order.pop()
                if user in self.deleted:
                    continue
                body = {"user_id": user, "item_ids": self.rng.sample(self.items, self.candidates), "k": 5}
                try:
                    r = http.post("/v1/rank", json=body)
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.requests += 1
                if not ok:
                    self.rank_errors += 1
                else:
                    self.served[user] = self.served.get(user, 0) + 1
                    for pos, item in enumerate(r.json()["items"]):
                        if self.rng.random() < self.click_p / (1 + pos):
                            due = time.monotonic() + self.rng.uniform(0.2, 2.0)
                            click = {"impression_id": item["impression_id"], "user_id": user,
                                     "item_id": item["item_id"]}
                            with self.lock:
                                heapq.heappush(self._clicks, (due, self._seq, click))
                                self._seq += 1
                n += 1
                wait = t0 + n / self.rate - time.monotonic()
                if wait > 0:
                    time.sleep(wait)

    def _clicker(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30, headers=self.headers) as http:
            while not self.stop.is_set() or self._clicks:
                with self.lock:
                    due = self._clicks[0][0] if self._clicks else None
                    click = heapq.heappop(self._clicks)[2] if due is not None and due <= time.monotonic() else None
                if click is None:
                    time.sleep(0.02)
                    if self.stop.is_set() and due is not None and due > time.monotonic() + 5:
                        break
                    continue
                try:
                    ok = http.post("/v1/click", json=click).status_code == 202
                except httpx.HTTPError:
                    ok = False
                user = click["user_id"]
                if ok:
                    self.clicks_posted += 1
                    self.clicked[user] = self.clicked.get(user, 0) + 1
                    self.late_clicks += user in self.deleted
                else:
                    self.click_errors += 1


class Follower(threading.Thread):
    """Follows the line as a server does (each new version applied onto the last, delta
    by delta) and notes, per version, whether each watched user's rows are all zero."""

    def __init__(self, store: Any, users: list[str]) -> None:
        super().__init__(daemon=True)
        self.store, self.users = store, users
        self.stop = threading.Event()
        self.zero_at: dict[int, dict[str, bool]] = {}
        self.errors = 0

    def run(self) -> None:
        from em3.errors import SnapshotError
        from em3.snapshot import materialize

        held_v: int | None = None
        state: dict | None = None
        while not self.stop.wait(0.05):
            v = self.store.latest_version(LINE)
            if v is None or v == held_v:
                continue
            try:
                try:
                    chain = self.store.get_chain(LINE, v, have=held_v)
                except SnapshotError:  # fell behind a pruned link: start from the full snapshot
                    chain, state = self.store.get_chain(LINE, v), None
                for manifest, blob in chain:
                    state = materialize([(manifest, blob)], base=state)
                    rows, own = user_rows_in(manifest.config, state, self.users)
                    self.zero_at[manifest.version] = {  # a user holding an own row is not forgotten
                        u: not o and all(bool((state[n][r] == 0).all()) for n in USER_ROW_STATE if n in state)
                        for u, r, o in zip(self.users, rows, own)}
                held_v = v
            except SnapshotError as exc:
                self.errors += 1
                log.warning("following v%s failed: %r", v, exc)
                held_v, state = None, None


def read_topic(settings: Any, topic: str, cap: int) -> list[Any]:
    """Up to ``cap`` records of ``topic`` from its beginning (every partition)."""
    n = partition_counts(settings.kafka, [topic]).get(topic, 0)
    if not n:
        return []
    consumer = make_consumer(settings.kafka, f"privacy-audit-{time.time_ns()}")
    consumer.assign([TopicPartition(topic, p, -2) for p in range(n)])
    out, idle = [], 0
    while len(out) < cap and idle < 10:
        batch = [m for m in consumer.consume(10000, timeout=0.3) if m.error() is None]
        idle = 0 if batch else idle + 1
        out.extend(batch)
    consumer.close()
    return out[:cap]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=1000, help="users with traffic (>= 1,000 for the figure)")
    parser.add_argument("--delete", type=int, default=100, help="users deleted while traffic flows")
    parser.add_argument("--rate", type=float, default=30.0, help="rank requests per second")
    parser.add_argument("--delete-rate", type=float, default=5.0, help="deletions per second")
    parser.add_argument("--after-s", type=float, default=15.0, help="traffic after the last deletion")
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--click-p", type=float, default=0.3, help="click probability at the top position")
    parser.add_argument("--variant", default="em3")
    parser.add_argument("--tiny", action="store_true", help="the tiny random-init config instead of the default")
    parser.add_argument("--runtime", choices=["ray", "in_process"], default="ray")
    parser.add_argument("--id-table", choices=["hashed", "bounded"], default="hashed",
                        help="the learner's ID tables (bounded: rows are looked up in the snapshot's map)")
    parser.add_argument("--snapshot-interval-s", type=float, default=1.0)
    parser.add_argument("--topic-sample", type=int, default=500_000, help="records read per topic")
    parser.add_argument("--complete-timeout-s", type=float, default=300.0)
    parser.add_argument("--start-timeout-s", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-dir", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.delete > args.users:
        parser.error("--delete must not exceed --users")

    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="em3-privacy-") as tmp, LocalServices(Path(tmp) / "services") as services:
        info = services.info
        settings = info.settings()
        ensure_topics(settings.kafka, settings.topics, partitions=2)
        client = connect(settings.redis)
        store = RedisSnapshotStore(client, settings.redis_prefix, signing_key=settings.snapshot_key)
        items = [ItemContent(f"item-{k}", text=f"item {k} about topic {k % 7}") for k in range(args.items)]
        RedisContentStore(client, settings.redis_prefix).put_many(items)
        log_dir = Path(args.log_dir) if args.log_dir else Path(tmp)
        log_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **info.env(), "OMP_NUM_THREADS": "1", "RAY_TMPDIR": f"/tmp/priv-ray-{os.getpid()}",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        join_port = free_port()
        procs: dict[str, subprocess.Popen] = {}

        def spawn(name: str, argv_: list[str]) -> None:
            procs[name] = subprocess.Popen([sys.executable, *argv_], env=env, stdout=subprocess.DEVNULL,
                                           stderr=open(log_dir / f"{name}.log", "wb"), start_new_session=True)

        spawn("join", ["-m", "stream", "-v", "join", "--window-s", "5", "--allowed-lateness-s", "1",
                       "--max-correction-delay-s", "30", "--idle-timeout-s", "2", "--batch-size", "1000",
                       "--web-port", str(join_port)])
        spawn("learner", ["-m", "em3", "-v", "learn", "--model-line", LINE, "--variant", args.variant,
                          *(["--tiny", "--lr", "0.01"] if args.tiny else []),
                          *(["--in-process"] if args.runtime == "in_process" else []),
                          "--id-table", args.id_table,
                          "--snapshot-interval-s", str(args.snapshot_interval_s), "--batch-size", "256",
                          "--max-batch-wait-s", "0.05"])
        traffic = None
        try:
            def alive() -> None:
                for name, p in procs.items():
                    if p.poll() is not None:
                        raise RuntimeError(f"{name} exited with {p.returncode}; see {log_dir / (name + '.log')}")

            wait_until(lambda: store.latest_version(LINE) is not None, args.start_timeout_s,
                       "the learner's first snapshot", check=alive, interval_s=0.5)
            port = free_port()
            spawn("server", ["-m", "em3", "serve", "--model-line", LINE, "--port", str(port),
                             "--poll-interval", "1.0"])
            url = f"http://127.0.0.1:{port}"
            http = httpx.Client(base_url=url, timeout=30, headers={"X-API-Key": info.api_key})

            def ready() -> bool:
                try:
                    return http.get("/readyz").status_code == 200
                except httpx.HTTPError:
                    return False

            wait_until(ready, args.start_timeout_s, "the server to be ready", check=alive, interval_s=0.5)
            startup_s = time.monotonic() - t_start
            log.info("stack up after %.0f s", startup_s)

            users = [raw_id(n) for n in range(args.users)]
            traffic = Traffic(url, info.api_key, users, [i.item_id for i in items], args.rate, args.candidates,
                              args.click_p, args.seed)
            traffic.run()
            wait_until(lambda: len(traffic.served) >= args.users, 3 * args.users / args.rate + 120,
                       "every user to be served", check=alive, interval_s=0.5)
            time.sleep(3.0)  # let the first clicks land (histories, trained rows)
            rng = random.Random(args.seed + 1)
            clickers = sorted(u for u, n in traffic.clicked.items() if n > 0)
            victims = rng.sample(clickers, min(args.delete, len(clickers)))
            if len(victims) < args.delete:  # fewer clickers than asked: take served users too
                rest = sorted(set(traffic.served) - set(victims))
                victims += rng.sample(rest, args.delete - len(victims))
            pseudonymize = Pseudonymizer(info.user_id_key)
            pid_of = {u: pseudonymize(u) for u in users}
            follower = Follower(store, [pid_of[u] for u in victims])
            follower.start()
            requested: dict[str, float] = {}
            delete_errors = 0
            for user in victims:
                traffic.delete(user)
                try:
                    r = http.delete(f"/v1/users/{quote(user, safe='')}")
                    if r.status_code == 202:
                        requested[user] = r.json()["requested_at"]
                    else:
                        delete_errors += 1
                except httpx.HTTPError:
                    delete_errors += 1
                time.sleep(1.0 / args.delete_rate)
            log.info("%d deletions requested while traffic flows", len(requested))

            # Follow each deletion to the time its erasure completed.
            status: dict[str, dict] = {}
            reset_version: dict[str, int | None] = {}
            t_after = time.monotonic()
            deadline = time.monotonic() + args.complete_timeout_s
            # Completion is watched in Redis (fast enough to load the resetting version
            # before the store prunes it); the answer users get is read from the API below.
            privacy = RedisPrivacyStore(client, settings.redis_prefix)
            tid_of = {u: tombstone_id(pid_of[u]) for u in requested}
            done_at: dict[str, float] = {}
            while time.monotonic() < deadline and len(done_at) < len(requested):
                for user in requested:
                    if user in done_at:
                        continue
                    tomb = privacy.status(tid_of[user])
                    if tomb is None or tomb.status != "complete":
                        continue
                    done_at[user] = tomb.completed_at
                    reset_version[user] = tomb.lines_reset.get(LINE)
                if time.monotonic() - t_after > args.after_s and not traffic.stop.is_set():
                    traffic.join()
                time.sleep(0.05)
            for user in requested:  # the acknowledgement users get
                r = http.get(f"/v1/users/{quote(user, safe='')}/deletion")
                if r.status_code == 200 and r.json()["status"] == "complete":
                    status[user] = r.json()
            api_matches_store = all(status[u]["completed_at"] == done_at.get(u) for u in status)
            if not traffic.stop.is_set():
                remaining = args.after_s - (time.monotonic() - t_after)
                if remaining > 0:
                    time.sleep(remaining)
                traffic.join()
            time.sleep(3.0 + args.snapshot_interval_s)  # in-flight clicks joined, learned, snapshotted
            follower.stop.set()
            follower.join(60)
            reset_checked = {u: follower.zero_at.get(v, {}).get(pid_of[u]) for u, v in reset_version.items()
                             if v is not None}
            with httpx.Client(timeout=10) as c:
                join_metrics = c.get(f"http://127.0.0.1:{join_port}/join/metrics").json()

            # -- the audit ---------------------------------------------------------------
            deleted_pids = {pid_of[u].encode() for u in requested}
            deleted_raw = {u.encode() for u in requested}
            # The scanner can fail: a planted raw ID and a deleted pseudonym must be found.
            canary = f"{settings.redis_prefix}audit-canary"
            client.hset(canary, "x", f"{raw_id(999999)}\t{pid_of[next(iter(requested))]}")
            planted = scan_values(client, RAW, match=canary), scan_values(client, HEX32, match=canary)
            client.delete(canary)
            if not planted[0] or not set(planted[1]) & deleted_pids:
                raise RuntimeError(f"the audit missed a planted raw ID or pseudonym: {planted}")
            redis_raw = scan_values(client, RAW)
            redis_hex = scan_values(client, HEX32)
            residual = {k for pid, keys in redis_hex.items() if pid in deleted_pids for k in keys}
            residual |= {k for raw, keys in redis_raw.items() if raw in deleted_raw for k in keys}
            redis_keys = sum(1 for _ in client.scan_iter(count=1000))

            manifest, newest = load_state(store, LINE)
            chain = store.get_chain(LINE, manifest.version)
            live = [pid_of[u] for u in traffic.served if u not in requested]
            gone = list(requested)
            rows, owns = user_rows_in(manifest.config, newest, live + [pid_of[u] for u in gone])  # one map rebuild
            live_rows = set(rows[: len(live)])
            if manifest.config.get("id_table") == "bounded":  # a live user trains its fallback row before admission
                live_rows |= set(user_rows(int(manifest.config["id_fallback_buckets"]), live))
            not_reset, shared = [], 0
            for user, row, own in zip(gone, rows[len(live):], owns[len(live):]):
                zero = all(bool((newest[n][row] == 0).all()) for n in USER_ROW_STATE if n in newest)
                if own:  # a bounded table's map still gives the deleted user its own row
                    not_reset.append(user)
                elif not zero:
                    if row in live_rows:
                        shared += 1  # a live user in the same bucket trained it after the reset
                    else:
                        not_reset.append(user)
            snapshot_bytes = b"".join(blob + json.dumps(m.config).encode() + json.dumps(m.stats).encode()
                                      for m, blob in chain)
            snap_raw = len(RAW.findall(snapshot_bytes))
            snap_pids = sum(1 for h in HEX32.findall(snapshot_bytes) if h in deleted_pids)

            topics: dict[str, Any] = {}
            raw_in_topics = 0
            completed_at = {pid_of[u].encode(): s["completed_at"] for u, s in status.items()}
            requested_at = {pid_of[u].encode(): t for u, t in requested.items()}
            for topic in settings.topics.all():
                records = read_topic(settings, topic, args.topic_sample)
                found = {"records": len(records), "raw_ids": 0, "non_pseudonymous_keys": 0,
                         "deleted_pseudonyms": {"before_request": 0, "after_request": 0, "after_complete": 0}}
                for m in records:
                    blob = (m.key() or b"") + (m.value() or b"") + b"".join(v or b"" for _, v in (m.headers() or []))
                    found["raw_ids"] += len(RAW.findall(blob))
                    if m.key() and not is_pseudonym(m.key().decode("utf-8", "replace")):
                        found["non_pseudonymous_keys"] += 1
                    t = m.timestamp()[1] / 1000.0
                    for h in set(HEX32.findall(blob)) & deleted_pids:
                        bucket = ("after_complete" if completed_at.get(h) is not None and t > completed_at[h]
                                  else "after_request" if t >= requested_at[h] else "before_request")
                        found["deleted_pseudonyms"][bucket] += 1
                raw_in_topics += found["raw_ids"]
                if topic == settings.topics.samples:  # re-emissions after a fenced batch (same ids)
                    found["distinct_sample_ids"] = len({json.loads(m.value()).get("sample_id") for m in records})
                topics[topic.removeprefix(settings.topics.prefix)] = found
            # The deletions topic: a request names the pseudonym (the agent needs it); the
            # completion record under the same key must not (compaction keeps only it).
            deletions = read_topic(settings, settings.topics.deletions, args.topic_sample)
            kinds = {"deletion": 0, "tombstone": 0}
            naming = {"deletion": 0, "tombstone": 0}
            for m in deletions:
                blob = (m.key() or b"") + (m.value() or b"")
                raw_in_topics += len(RAW.findall(blob))
                kind = json.loads(m.value())["type"]
                kinds[kind] += 1
                naming[kind] += bool(set(HEX32.findall(blob)) & deleted_pids)
            topics["deletions"] = {"records": len(deletions), "requests": kinds["deletion"],
                                   "completions": kinds["tombstone"], "requests_naming_the_user": naming["deletion"],
                                   "completions_naming_the_user": naming["tombstone"],
                                   "distinct_keys": len({m.key() for m in deletions}),
                                   "compacted": len(deletions) == len({m.key() for m in deletions})}
        finally:
            if traffic is not None and not traffic.stop.is_set():
                traffic.join()
            for p in procs.values():
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGTERM)
            for p in procs.values():
                try:
                    p.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
        client.close()

    erase = sorted(s["completed_at"] - requested[u] for u, s in status.items())

    def pct(q: float) -> float | None:
        return None if not erase else round(float(np.percentile(erase, q)), 3)

    raw_found = sum(len(k) for k in redis_raw.values()) + snap_raw + raw_in_topics
    return {
        "users_deleted": len(status),
        "erase_p50_s": pct(50),
        "erase_p99_s": pct(99),
        "erase_max_s": pct(100),
        "residual_keys": len(residual),
        "residual_in_snapshot": len(not_reset) + snap_pids,
        "raw_ids_found": raw_found,
        "deletions_requested": len(requested),
        "delete_errors": delete_errors,
        "users_with_traffic": len(traffic.served),
        "users_who_clicked": len(traffic.clicked),
        "rank_requests": traffic.requests,
        "rank_errors": traffic.rank_errors,
        "clicks_posted": traffic.clicks_posted,
        "clicks_of_deleted_users_after_their_request": traffic.late_clicks,
        "api_completed_at_matches_store": api_matches_store,
        "resets_verified_at_their_version": sum(ok is True for ok in reset_checked.values()),
        "resets_not_reset_at_their_version": sum(ok is False for ok in reset_checked.values()),
        "resets_unchecked": len(status) - sum(ok is not None for ok in reset_checked.values()),
        "versions_followed": len(follower.zero_at),
        "rows_shared_with_live_users": shared,
        "snapshot_version": manifest.version,
        "snapshot_kind": manifest.kind,
        "deleted_pseudonyms_in_snapshot_bytes": snap_pids,
        "raw_ids": {"redis": sum(len(k) for k in redis_raw.values()), "snapshot": snap_raw, "topics": raw_in_topics},
        "redis_keys_scanned": redis_keys,
        "topics": topics,
        "join": {k: join_metrics.get(k) for k in ("erased_dropped", "fenced", "recoveries", "events_in",
                                                   "deletions.requests", "deletions.erased",
                                                   "deletions.join_records", "deletions.history_keys")},
        "learner_erased_dropped": manifest.stats.get("totals", {}).get("erased_dropped"),
        "startup_s": round(startup_s, 1),
        "variant": args.variant + (" (tiny)" if args.tiny else ""),
        "runtime": args.runtime,
        "model_user_buckets": int(manifest.config["user_buckets"]),
        "id_table": manifest.config.get("id_table", "hashed"),
        "snapshot_interval_s": args.snapshot_interval_s,
    }


if __name__ == "__main__":
    out = main()
    print(json.dumps(out))
