"""Redis-backed stores: the only module of the project that imports ``redis``.

Key layout (prefix ``em3:`` by default; see ``docs/architecture.md``):

``{p}item:{item_id}``              hash: ``data`` = encoded ItemContent JSON
``{p}items``                       set of registered item ids
``{p}hist:{user_id}``              list, newest first, of ``item_id<TAB>clicked_at``, trimmed to N
``{p}snap:{line}:{version}:blob``  safetensors bytes of a snapshot
``{p}snap:{line}:{version}:manifest`` JSON manifest
``{p}snap:{line}:{version}:ckpt``  hash: ``{rank}:manifest`` / ``{rank}:blob`` learner checkpoints of a version
``{p}snap:{line}:versions``        sorted set of kept versions (score = version)
``{p}snap:{line}:latest``          the version pointer (an int)
``{p}snapshots``                   pub/sub channel: ``{"line":..., "version":...}``
``{p}pop:{kind}[:{bucket}]``       sorted set: click / impression counts per item (popularity arm),
                                   one per time bucket when counters have a retention period
``{p}items-updated``               pub/sub channel: JSON list of item ids whose content changed
``{p}learn:{line}:applied:{v}``    JSON: the sample ids (and micro-batches) version ``v`` applied
``{p}privacy:...``                 deletions: tombstones, pending erasures, line resets (:class:`RedisPrivacyStore`)

Retention (:class:`em3.privacy.RetentionConfig`) is enforced here: histories
expire after the user's last click, counters count a sliding window of time
buckets that expire, snapshot versions older than a maximum age are pruned, and
tombstones expire.
"""
from __future__ import annotations

import json
import math
import re
import time
from typing import Callable, Iterable, Mapping, Sequence

import redis

from em3 import codec
from em3.config import RedisSettings
from em3.errors import DecodeError, SnapshotError
from em3.signing import sign_manifest, verify_manifest
from em3.stores import DEFAULT_HISTORY_LENGTH, decode_batches
from em3.types import CheckpointManifest, ItemContent, SnapshotManifest, Tombstone, valid_id

__all__ = [
    "connect",
    "RedisContentStore",
    "RedisHistoryStore",
    "RedisSnapshotStore",
    "RedisError",
    "RedisPopularityStore",
    "POPULARITY_KINDS",
    "item_updates_channel",
    "publish_item_updates",
    "registered_mask",
    "RedisAppliedLog",
    "RedisPrivacyStore",
    "history_key",
    "scan_values",
]

RedisError = redis.RedisError


#: Exceptions that mean "Redis is unreachable or busy now" (an outage to ride out,
#: not a bad record): callers retry these with backoff instead of giving up.
OUTAGE_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.BusyLoadingError, OSError,
)


def connect(settings: RedisSettings, *, decode_responses: bool = False, **kwargs: object) -> redis.Redis:
    """A client for ``settings.url`` (auth and TLS from the URL and the TLS file settings)."""
    tls = {}
    if settings.url.startswith("rediss://"):
        tls = {
            k: v
            for k, v in {
                "ssl_ca_certs": settings.ssl_ca_certs,
                "ssl_certfile": settings.ssl_certfile,
                "ssl_keyfile": settings.ssl_keyfile,
            }.items()
            if v
        }
    kwargs.setdefault("socket_timeout", 5.0)
    kwargs.setdefault("socket_connect_timeout", 5.0)
    kwargs.setdefault("health_check_interval", 30)
    return redis.Redis.from_url(settings.url, decode_responses=decode_responses, **tls, **kwargs)


class RedisContentStore:
    """Item content in Redis (:class:`em3.stores.ContentSource`)."""

    def __init__(self, client: redis.Redis, prefix: str = "em3:") -> None:
        self.client = client
        self.prefix = prefix

    def _key(self, item_id: str) -> str:
        return f"{self.prefix}item:{item_id}"

    def put_many(self, items: Iterable[ItemContent]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for item in items:
            pipe.hset(self._key(item.item_id), "data", codec.encode(item))
            pipe.sadd(f"{self.prefix}items", item.item_id)
        pipe.execute()

    def get_many(self, item_ids: Sequence[str]) -> list[ItemContent | None]:
        if not item_ids:
            return []
        pipe = self.client.pipeline(transaction=False)
        for item_id in item_ids:
            pipe.hget(self._key(item_id), "data")
        out: list[ItemContent | None] = []
        for raw in pipe.execute():
            if raw is None:
                out.append(None)
                continue
            try:
                out.append(codec.decode_item(raw))
            except DecodeError:
                out.append(None)
        return out

    def ids(self) -> list[str]:
        return sorted(m.decode() if isinstance(m, bytes) else m for m in self.client.smembers(f"{self.prefix}items"))


def _history_ids(raw_list: Sequence[bytes | str], limit: int, before: float | None) -> list[str]:
    """Item ids of LRANGE entries ``"<item_id>\t<clicked_at>"`` (newest first), at most
    ``limit``, skipping clicks at or after ``before``.

    An entry that does not parse (bad UTF-8, an ID that breaks the ID rules, a
    time that is not a number: written before the edge validated IDs, or by
    someone else) is skipped, never raised: one bad entry must not stop a learner.
    """
    items: list[str] = []
    for raw in raw_list:
        try:
            text = raw.decode() if isinstance(raw, bytes) else raw
            item_id, _, ts = text.rpartition("\t")
            t = float(ts)
        except (UnicodeDecodeError, ValueError):
            continue
        if not valid_id(item_id) or t != t:
            continue
        if before is not None and t >= before:
            continue
        items.append(item_id)
        if len(items) >= limit:
            break
    return items


def history_key(prefix: str, user_id: str) -> str:
    """The Redis key of a user's click history (the user ID is a pseudonym)."""
    return f"{prefix}hist:{user_id}"


class RedisHistoryStore:
    """Recent clicks per user in a Redis list (:class:`em3.stores.HistorySource`).

    ``ttl_s`` (:attr:`em3.privacy.RetentionConfig.history_ttl_s`) expires a user's
    history that long after their last click (renewed by each append).
    """

    def __init__(self, client: redis.Redis, prefix: str = "em3:", max_length: int = DEFAULT_HISTORY_LENGTH,
                 ttl_s: float | None = None) -> None:
        if max_length <= 0:
            raise ValueError(f"max_length must be > 0, but {max_length} is given")
        if ttl_s is not None and not ttl_s >= 1:
            raise ValueError(f"ttl_s must be >= 1 or None, but {ttl_s!r} is given")
        self.client = client
        self.prefix = prefix
        self.max_length = max_length
        self.ttl_s = ttl_s

    def _key(self, user_id: str) -> str:
        return history_key(self.prefix, user_id)

    def migrate(self, old_user_id: str, new_user_id: str) -> bool:
        """Move a history from ``old_user_id`` to ``new_user_id`` unless the new one has
        one already (a key rotation: the server knows both pseudonyms); True if moved."""
        try:
            return bool(self.client.renamenx(self._key(old_user_id), self._key(new_user_id)))
        except redis.ResponseError:  # no history under the old pseudonym
            return False

    def append(self, user_id: str, item_id: str, clicked_at: float) -> None:
        self.append_many([(user_id, item_id, clicked_at)])

    def append_many(self, entries: Iterable[tuple[str, str, float]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        touched = set()
        for user_id, item_id, clicked_at in entries:
            pipe.lpush(self._key(user_id), f"{item_id}\t{clicked_at!r}")
            touched.add(user_id)
        for user_id in touched:
            pipe.ltrim(self._key(user_id), 0, self.max_length - 1)
            if self.ttl_s is not None:
                pipe.expire(self._key(user_id), max(1, int(math.ceil(self.ttl_s))))
        pipe.execute()

    def get(self, user_id: str, limit: int, before: float | None = None) -> list[str]:
        if limit <= 0:
            return []
        if before is None:  # the serving path: one LRANGE, without a pipeline's bookkeeping
            return _history_ids(self.client.lrange(self._key(user_id), 0, limit - 1), limit, None)
        return self.get_many([user_id], limit, [before])[0]

    def get_many(
        self, user_ids: Sequence[str], limit: int, before: Sequence[float | None] | None = None
    ) -> list[list[str]]:
        if not user_ids:
            return []
        befores = before if before is not None else [None] * len(user_ids)
        pipe = self.client.pipeline(transaction=False)
        for user_id, b in zip(user_ids, befores):
            # Without a time bound only the first `limit` entries are needed.
            pipe.lrange(self._key(user_id), 0, (limit - 1) if b is None else self.max_length - 1)
        out = [_history_ids(raw_list, limit, b) for raw_list, b in zip(pipe.execute(), befores)]
        return out


def check_checkpoints(manifest: SnapshotManifest, checkpoints: Sequence[tuple[CheckpointManifest, bytes]]) -> None:
    """Raise ``ValueError`` unless every checkpoint names ``manifest``'s line, version and
    state digest, one per rank."""
    ranks = [m.rank for m, _ in checkpoints]
    if len(set(ranks)) != len(ranks):
        raise ValueError(f"one checkpoint per learner rank, but ranks {sorted(ranks)} are given")
    for m, _ in checkpoints:
        if (m.model_line, m.version, m.state_sha256) != (manifest.model_line, manifest.version,
                                                         manifest.state_sha256):
            raise ValueError(f"a checkpoint of {m.model_line!r} v{m.version} cannot be published with snapshot "
                             f"{manifest.model_line!r} v{manifest.version} (or its state digest differs)")


def kept_versions(versions: list[int], keep: int, latest: int | None, bases: dict[int, int],
                  expired: Iterable[int] = ()) -> set[int]:
    """The versions a store keeps: the newest ``keep`` that are not ``expired`` (older
    than the store's maximum age), the pointer's, and every version a kept delta is
    built on (``bases``: delta version -> its base), so each kept version stays loadable.

    >>> sorted(kept_versions([1, 2, 3, 4, 5], 2, 5, {2: 1, 3: 2, 4: 3, 5: 4}))
    [1, 2, 3, 4, 5]
    >>> sorted(kept_versions([1, 2, 3, 4, 5], 2, 5, {5: 4}))
    [4, 5]
    >>> sorted(kept_versions([1, 2, 3, 4, 5], 3, 5, {}, expired=[1, 2, 3, 4]))
    [5]
    """
    old = set(expired)
    needed = {v for v in versions[-keep:] if v not in old} | ({latest} if latest is not None else set())
    frontier = list(needed)
    while frontier:
        base = bases.get(frontier.pop())
        if base is not None and base not in needed:
            needed.add(base)
            frontier.append(base)
    return needed


def walk_chain(get, line: str, version: int, have: int | None = None) -> list[tuple[SnapshotManifest, bytes]]:
    """The snapshots that rebuild ``version``, oldest first, read with ``get(line, v)``:
    a full snapshot and the deltas after it, or, when the chain passes through
    ``have`` (a version the caller already holds), only the deltas after ``have``.

    Raises :class:`SnapshotError` when a link is missing (pruned) or loops.
    """
    chain: list[tuple[SnapshotManifest, bytes]] = []
    seen: set[int] = set()
    current: int | None = version
    while current is not None and current != have:
        if current in seen:
            raise SnapshotError(f"snapshot {line!r} v{version}: its delta chain loops at v{current}")
        seen.add(current)
        manifest, blob = get(line, current)
        chain.append((manifest, blob))
        current = manifest.base_version if manifest.kind == "delta" else None
        if manifest.kind == "delta" and current is None:
            raise SnapshotError(f"snapshot {line!r} v{manifest.version} is a delta without a base")
    return chain[::-1]


class RedisSnapshotStore:
    """Versioned snapshots per model line: blob + manifest, a version pointer,
    a pub/sub notification, the last ``keep`` versions kept.

    Publishing is one MULTI/EXEC transaction (blob, manifest, version set,
    pointer), so a reader that follows the pointer always finds a complete
    snapshot; the notification is sent after the transaction commits.
    Verification of checksum and config is the reader's job
    (:func:`em3.snapshot.unpack`), so a corrupt blob is never silently served.

    ``signing_key`` (``Settings.snapshot_key``) signs every published manifest;
    :meth:`get` and :meth:`manifest` refuse (:class:`SnapshotError`) a snapshot
    that is unsigned or signed with another key, and a store without a key can
    neither publish nor read one.

    ``max_age_s`` (:attr:`em3.privacy.RetentionConfig.snapshot_max_age_s`) also
    prunes versions created longer ago than that, except those the pointer needs.
    """

    def __init__(self, client: redis.Redis, prefix: str = "em3:", keep: int = 10, *,
                 signing_key: str = "", max_age_s: float | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, but {keep} is given")
        if max_age_s is not None and not max_age_s > 0:
            raise ValueError(f"max_age_s must be > 0 or None, but {max_age_s!r} is given")
        self.client = client
        self.prefix = prefix
        self._key = signing_key
        self.keep = keep
        self.max_age_s = max_age_s
        self.clock = clock

    # keys -----------------------------------------------------------------
    def _k(self, line: str, suffix: str) -> str:
        return f"{self.prefix}snap:{line}:{suffix}"

    @property
    def channel(self) -> str:
        """The pub/sub channel on which new versions are announced."""
        return f"{self.prefix}snapshots"

    # writing ----------------------------------------------------------------
    def next_version(self, line: str) -> int:
        """A new, never reused version number for ``line`` (atomic INCR)."""
        return int(self.client.incr(self._k(line, "seq")))

    def publish(self, manifest: SnapshotManifest, blob: bytes,
                checkpoints: Sequence[tuple[CheckpointManifest, bytes]] = ()) -> None:
        """Sign and store a snapshot and its learners' ``checkpoints`` (each signed too),
        move the line's pointer to it, then notify. The checkpoints are written in the
        same transaction, so a version's snapshot never exists without them."""
        check_checkpoints(manifest, checkpoints)
        manifest = sign_manifest(manifest, self._key)
        signed = [(sign_manifest(m, self._key), b) for m, b in checkpoints]
        line, version = manifest.model_line, manifest.version
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self._k(line, f"{version}:blob"), blob)
        pipe.set(self._k(line, f"{version}:manifest"), codec.manifest_to_json(manifest))
        if signed:
            fields: dict[str, str | bytes] = {}
            for m, b in signed:
                fields[f"{m.rank}:manifest"] = codec.manifest_to_json(m)
                fields[f"{m.rank}:blob"] = b
            pipe.hset(self._k(line, f"{version}:ckpt"), mapping=fields)
        pipe.zadd(self._k(line, "versions"), {str(version): version})
        if manifest.kind == "delta":
            pipe.hset(self._k(line, "bases"), str(version), str(manifest.base_version))
        pipe.hset(self._k(line, "created"), str(version), repr(float(manifest.created_at)))
        pipe.set(self._k(line, "latest"), version)
        pipe.sadd(f"{self.prefix}snap-lines", line)
        pipe.execute()
        self.client.publish(self.channel, json.dumps({"line": line, "version": version}))
        self._prune(line)

    def _bases(self, line: str) -> dict[int, int]:
        """``{delta version: its base version}`` of the kept deltas."""
        return {int(k): int(v) for k, v in self.client.hgetall(self._k(line, "bases")).items()}

    def _prune(self, line: str) -> None:
        """Keep the newest ``keep`` versions, the pointer's, and every version a kept
        delta is built on (so each kept version stays loadable); delete the rest."""
        versions = self.versions(line)
        expired: list[int] = []
        if self.max_age_s is not None:
            oldest = self.clock() - self.max_age_s
            created = self.client.hgetall(self._k(line, "created"))
            expired = [int(v) for v, t in created.items() if float(t) < oldest]
        needed = kept_versions(versions, self.keep, self.latest_version(line), self._bases(line), expired)
        stale = [v for v in versions if v not in needed]
        if not stale:
            return
        pipe = self.client.pipeline(transaction=True)
        for v in stale:
            pipe.delete(self._k(line, f"{v}:blob"), self._k(line, f"{v}:manifest"), self._k(line, f"{v}:ckpt"))
            pipe.zrem(self._k(line, "versions"), str(v))
            pipe.hdel(self._k(line, "bases"), str(v))
            pipe.hdel(self._k(line, "created"), str(v))
        pipe.execute()

    def prune(self, line: str) -> None:
        """Apply the retention rules now (publishing does it too)."""
        self._prune(line)

    def rollback(self, line: str, version: int | None = None) -> int:
        """Point ``line`` at ``version`` (default: the one before the current) and notify."""
        versions = self.versions(line)
        current = self.latest_version(line)
        if version is None:
            older = [v for v in versions if current is not None and v < current]
            if not older:
                raise SnapshotError(f"line {line!r} has no version older than {current} to roll back to")
            version = older[-1]
        if version not in versions:
            raise SnapshotError(f"line {line!r} keeps versions {versions}; {version} is not among them")
        self.client.set(self._k(line, "latest"), version)
        self.client.publish(self.channel, json.dumps({"line": line, "version": version, "rollback": True}))
        return version

    # reading ----------------------------------------------------------------
    def lines(self) -> list[str]:
        return sorted(m.decode() if isinstance(m, bytes) else m for m in self.client.smembers(f"{self.prefix}snap-lines"))

    def versions(self, line: str) -> list[int]:
        """Kept versions, oldest first."""
        return [int(v) for v in self.client.zrange(self._k(line, "versions"), 0, -1)]

    def latest_version(self, line: str) -> int | None:
        raw = self.client.get(self._k(line, "latest"))
        return None if raw is None else int(raw)

    def manifest(self, line: str, version: int) -> SnapshotManifest:
        raw = self.client.get(self._k(line, f"{version}:manifest"))
        if raw is None:
            raise SnapshotError(f"no manifest for line {line!r} version {version}")
        manifest = codec.decode_manifest(raw)
        verify_manifest(manifest, self._key)
        return manifest

    def get(self, line: str, version: int | None = None) -> tuple[SnapshotManifest, bytes]:
        """The manifest and blob of ``version`` (default: the pointer's)."""
        if version is None:
            version = self.latest_version(line)
            if version is None:
                raise SnapshotError(f"line {line!r} has no published snapshot")
        pipe = self.client.pipeline(transaction=True)
        pipe.get(self._k(line, f"{version}:manifest"))
        pipe.get(self._k(line, f"{version}:blob"))
        raw_manifest, blob = pipe.execute()
        if raw_manifest is None or blob is None:
            raise SnapshotError(f"snapshot {line!r} version {version} is missing (pruned?)")
        manifest = codec.decode_manifest(raw_manifest)
        verify_manifest(manifest, self._key)
        return manifest, blob

    def get_chain(self, line: str, version: int, have: int | None = None) -> list[tuple[SnapshotManifest, bytes]]:
        """See :func:`walk_chain`."""
        return walk_chain(self.get, line, version, have)

    def get_checkpoint(self, line: str, version: int, rank: int = 0) -> tuple[CheckpointManifest, bytes]:
        """The signed manifest and blob of learner ``rank``'s checkpoint of ``version``;
        :class:`SnapshotError` when there is none (published without, or pruned) or its
        signature is missing or wrong. The blob is verified by
        :func:`em3.checkpoint.unpack_checkpoint`."""
        raw_manifest, blob = self.client.hmget(self._k(line, f"{version}:ckpt"), [f"{rank}:manifest", f"{rank}:blob"])
        if raw_manifest is None or blob is None:
            raise SnapshotError(f"line {line!r} v{version} has no checkpoint of learner {rank}")
        manifest = codec.decode_checkpoint_manifest(raw_manifest)
        verify_manifest(manifest, self._key)
        if manifest.model_line != line or manifest.version != version or manifest.rank != rank:
            raise SnapshotError(f"checkpoint stored as {line!r} v{version} rank {rank} names "
                                f"{manifest.model_line!r} v{manifest.version} rank {manifest.rank}")
        return manifest, blob

    def subscribe(self):
        """A pub/sub object subscribed to the notification channel (caller closes it)."""
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(self.channel)
        return pubsub


# --- serving additions: popularity counters and item-update notices ----------------

POPULARITY_KINDS = ("clicks", "impressions")


class RedisPopularityStore:
    """Per-item counters of clicks or impressions in sorted sets ``{p}pop:{kind}``.

    The popularity baseline arm ranks candidates by these counts; the serving
    app increments ``clicks`` on ``POST /v1/click`` and ``impressions`` from the
    impression logger's background thread.

    With ``ttl_s`` (:attr:`em3.privacy.RetentionConfig.counter_ttl_s`) the counts
    live in ``buckets`` time buckets ``{p}pop:{kind}:{n}`` (``n`` = time // width,
    width = ``ttl_s / buckets``), each expiring ``ttl_s`` after it closes; a read
    adds up the live ones, so a counter covers the last ``ttl_s`` to ``ttl_s +
    width`` seconds. Without it, one sorted set that never expires.
    """

    def __init__(self, client: redis.Redis, prefix: str = "em3:", ttl_s: float | None = None, buckets: int = 6,
                 clock: Callable[[], float] = time.time) -> None:
        if ttl_s is not None and not ttl_s >= 1:
            raise ValueError(f"ttl_s must be >= 1 or None, but {ttl_s!r} is given")
        if not isinstance(buckets, int) or buckets < 1:
            raise ValueError(f"buckets must be an int >= 1, but {buckets!r} is given")
        self.client = client
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.buckets = buckets
        self.width = None if ttl_s is None else ttl_s / buckets
        self.clock = clock

    def _key(self, kind: str, bucket: int | None = None) -> str:
        if kind not in POPULARITY_KINDS:
            raise ValueError(f"kind must be one of {POPULARITY_KINDS}, but {kind!r} is given")
        return f"{self.prefix}pop:{kind}" if bucket is None else f"{self.prefix}pop:{kind}:{bucket}"

    def _bucket(self) -> int | None:
        return None if self.width is None else int(self.clock() // self.width)

    def incr_many(self, kind: str, item_ids: Iterable[str], amount: float = 1.0) -> None:
        """Add ``amount`` to the counter of each id (repeats add up)."""
        bucket = self._bucket()
        key = self._key(kind, bucket)
        pipe = self.client.pipeline(transaction=False)
        n = 0
        for item_id in item_ids:
            pipe.zincrby(key, amount, item_id)
            n += 1
        if n:
            if bucket is not None:
                pipe.expireat(key, int(math.ceil((bucket + 1) * self.width + self.ttl_s)))
            pipe.execute()

    def get_many(self, kind: str, item_ids: Sequence[str]) -> list[float]:
        """The counters of ``item_ids`` (0.0 for never counted ones)."""
        if not item_ids:
            return []
        bucket = self._bucket()
        if bucket is None:
            scores = self.client.zmscore(self._key(kind), list(item_ids))
            return [0.0 if s is None else float(s) for s in scores]
        pipe = self.client.pipeline(transaction=False)
        for b in range(bucket - self.buckets, bucket + 1):
            pipe.zmscore(self._key(kind, b), list(item_ids))
        totals = [0.0] * len(item_ids)
        for scores in pipe.execute():
            for i, s in enumerate(scores):
                if s is not None:
                    totals[i] += float(s)
        return totals


def item_updates_channel(prefix: str = "em3:") -> str:
    """The pub/sub channel on which servers announce changed item content."""
    return f"{prefix}items-updated"


def publish_item_updates(client: redis.Redis, prefix: str, item_ids: Sequence[str]) -> None:
    """Tell every server that the content of ``item_ids`` changed (JSON list of ids)."""
    if item_ids:
        client.publish(item_updates_channel(prefix), json.dumps(list(item_ids)))


def registered_mask(client: redis.Redis, prefix: str, item_ids: Sequence[str]) -> list[bool]:
    """Whether each id is in the registered-items set ``{p}items`` (one round trip)."""
    if not item_ids:
        return []
    return [bool(x) for x in client.smismember(f"{prefix}items", list(item_ids))]


class RedisAppliedLog:
    """The sample ids each published snapshot version applied, per partition, chained by parent.

    Written by the learners (:class:`learners.publisher.SnapshotPublisher`) just
    before the snapshot of the same version is published; a version whose
    snapshot was never published is unreachable from the line's pointer and is
    ignored. Walking ``parent`` links from a published version back gives every
    sample id in that model state's lineage: the learner rebuilds its dedup
    window from it, and ``benchmarks/recovery.py`` audits it. ``batches`` records
    how those ids were grouped into micro-batches, in order, so the lineage can be
    learned again batch for batch (``benchmarks/recovery.py`` compares a restarted
    learner with one that never stopped that way).

    Key: ``{p}learn:{line}:applied:{version}``, JSON
    ``{"parent": int | null, "ids": {"topic:partition": [sample_id, ...]},
    "batches": [[partition index, ...], ...]}`` (:func:`em3.stores.encode_batches`).
    """

    def __init__(self, client: redis.Redis, prefix: str = "em3:") -> None:
        self.client = client
        self.prefix = prefix

    def _key(self, line: str, version: int) -> str:
        return f"{self.prefix}learn:{line}:applied:{version}"

    def put(
        self,
        line: str,
        version: int,
        parent: int | None,
        ids: dict[str, list[str]],
        ttl_s: float | None = None,
        batches: list[list[int]] | None = None,
    ) -> None:
        """Record the ids applied by ``version`` since ``parent`` and, given ``batches``
        (:func:`em3.stores.encode_batches`), how they were grouped into micro-batches;
        ``ttl_s`` expires the record."""
        record: dict = {"parent": parent, "ids": ids}
        if batches is not None:
            record["batches"] = batches
        body = json.dumps(record, separators=(",", ":"))
        if ttl_s is None:
            self.client.set(self._key(line, version), body)
        else:
            self.client.set(self._key(line, version), body, px=max(1, int(ttl_s * 1000)))

    def get(self, line: str, version: int) -> tuple[int | None, dict[str, list[str]]] | None:
        """``(parent, ids)`` of ``version``, or ``None`` if unknown (never written, expired, deleted)."""
        raw = self.client.get(self._key(line, version))
        if raw is None:
            return None
        obj = json.loads(raw)
        parent = obj.get("parent")
        return (None if parent is None else int(parent)), {
            str(k): [str(i) for i in v] for k, v in dict(obj.get("ids", {})).items()
        }

    def batches(self, line: str, version: int) -> list[list[tuple[str, str]]] | None:
        """``version``'s micro-batches, each ``[(partition, sample_id), ...]`` in learned
        order (:func:`em3.stores.decode_batches`); None when the record is unknown or
        was written without them."""
        raw = self.client.get(self._key(line, version))
        if raw is None:
            return None
        obj = json.loads(raw)
        if "batches" not in obj:
            return None
        return decode_batches({str(k): [str(i) for i in v] for k, v in dict(obj.get("ids", {})).items()},
                              obj["batches"])

    def chain(self, line: str, version: int | None, max_versions: int | None = None):
        """Yield ``(version, ids)`` from ``version`` back through its parents, newest first.

        Stops at the root, at a missing record, or after ``max_versions``.
        """
        seen = 0
        while version is not None and (max_versions is None or seen < max_versions):
            record = self.get(line, version)
            if record is None:
                return
            parent, ids = record
            yield version, ids
            seen += 1
            version = parent

    def delete(self, line: str, versions: Iterable[int]) -> None:
        keys = [self._key(line, v) for v in versions]
        if keys:
            self.client.delete(*keys)


class RedisPrivacyStore:
    """Deletions in Redis: tombstones, the erasures learners still owe, their resets.

    Keys (prefix ``p``; ``tid`` = :func:`em3.privacy.tombstone_id` of the pseudonym,
    which names no user):

    ``{p}privacy:tomb:{tid}``    JSON :class:`em3.types.Tombstone`, expires after ``ttl_s``
    ``{p}privacy:tombstones``    sorted set tid -> requested_at (the join and learners drop
                                 events of these users; entries older than ``ttl_s`` pruned)
    ``{p}privacy:seq``           int, bumped on every change of the two above (cheap polling)
    ``{p}privacy:pending``       hash tid -> pseudonym: erasures whose model rows some line
                                 still has to reset; removed on completion (the only key that
                                 holds a deleted user's pseudonym, for as long as that takes)
    ``{p}privacy:reset:{tid}``   hash line -> ``[version, time]``: the snapshot that reset the rows
    ``{p}privacy:lines``         hash line -> time of its learner's last publish (active lines)
    """

    def __init__(self, client: redis.Redis, prefix: str = "em3:", ttl_s: float = 30 * 86_400.0,
                 clock: Callable[[], float] = time.time) -> None:
        if not ttl_s >= 1:
            raise ValueError(f"ttl_s must be >= 1, but {ttl_s!r} is given")
        self.client = client
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.clock = clock

    def _k(self, suffix: str) -> str:
        return f"{self.prefix}privacy:{suffix}"

    def _ttl(self) -> int:
        return max(1, int(math.ceil(self.ttl_s)))

    # -- tombstones -------------------------------------------------------------------
    def status(self, tid: str) -> Tombstone | None:
        """The tombstone of ``tid``, or None if no deletion is known."""
        raw = self.client.get(self._k(f"tomb:{tid}"))
        if raw is None:
            return None
        try:
            return codec.decode_tombstone(raw)
        except DecodeError:
            return None

    def requested(self, tomb: Tombstone) -> bool:
        """Record a request the server accepted (status ``requested``) unless the
        deletion is known already; True if recorded."""
        return bool(self.client.set(self._k(f"tomb:{tomb.tombstone_id}"), codec.encode(tomb), nx=True,
                                    ex=self._ttl()))

    def begin(self, tomb: Tombstone, user_pseudonym: str) -> None:
        """The erasure of ``user_pseudonym`` starts: tombstone it (events of the user are
        dropped from now on) and owe the model lines a reset of its rows."""
        tid = tomb.tombstone_id
        pipe = self.client.pipeline(transaction=True)
        pipe.zadd(self._k("tombstones"), {tid: tomb.requested_at})
        pipe.zremrangebyscore(self._k("tombstones"), "-inf", self.clock() - self.ttl_s)
        pipe.hset(self._k("pending"), tid, user_pseudonym)
        pipe.delete(self._k(f"reset:{tid}"))
        pipe.set(self._k(f"tomb:{tid}"), codec.encode(tomb), ex=self._ttl())
        pipe.incr(self._k("seq"))
        pipe.execute()

    def save(self, tomb: Tombstone) -> None:
        """Store ``tomb``; when complete, also settle what the erasure owed."""
        tid = tomb.tombstone_id
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self._k(f"tomb:{tid}"), codec.encode(tomb), ex=self._ttl())
        if tomb.status == "complete":
            pipe.hdel(self._k("pending"), tid)
            pipe.delete(self._k(f"reset:{tid}"))
            pipe.incr(self._k("seq"))
        pipe.execute()

    def tombstoned(self, seq: int | None = None) -> tuple[int, set[str]] | None:
        """``(seq, tombstone ids younger than the TTL)``, or None when the change
        counter still equals ``seq`` (the :class:`em3.privacy.TombstoneFilter` fetch)."""
        raw = self.client.get(self._k("seq"))
        now_seq = int(raw) if raw is not None else 0
        if seq is not None and now_seq == seq:
            return None
        tids = self.client.zrangebyscore(self._k("tombstones"), self.clock() - self.ttl_s, "+inf")
        return now_seq, {t.decode() if isinstance(t, bytes) else t for t in tids}

    # -- what the model lines owe -----------------------------------------------------
    def pending(self) -> dict[str, str]:
        """``tid -> pseudonym`` of erasures whose model rows are still to be reset."""
        return {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                for k, v in self.client.hgetall(self._k("pending")).items()}

    def forget_pending(self, tid: str) -> None:
        """Drop ``tid`` from what is owed (its tombstone expired)."""
        self.client.hdel(self._k("pending"), tid)

    def owed_by(self, line: str, pending: Mapping[str, str]) -> dict[str, str]:
        """The part of ``pending`` that ``line`` has not reset yet."""
        tids = list(pending)
        if not tids:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for tid in tids:
            pipe.hexists(self._k(f"reset:{tid}"), line)
        return {tid: pending[tid] for tid, done in zip(tids, pipe.execute()) if not done}

    def reset_done(self, line: str, version: int, tids: Iterable[str], at: float | None = None) -> None:
        """``line`` published ``version`` with the rows of ``tids`` reset."""
        at = self.clock() if at is None else at
        value = json.dumps([int(version), float(at)])
        pipe = self.client.pipeline(transaction=False)
        for tid in tids:
            pipe.hset(self._k(f"reset:{tid}"), line, value)
            pipe.expire(self._k(f"reset:{tid}"), self._ttl())
        pipe.execute()

    def resets(self, tid: str) -> dict[str, tuple[int, float]]:
        """``line -> (version, time)`` of the lines that reset the rows of ``tid``."""
        out = {}
        for line, raw in self.client.hgetall(self._k(f"reset:{tid}")).items():
            version, at = json.loads(raw)
            out[line.decode() if isinstance(line, bytes) else line] = (int(version), float(at))
        return out

    def heartbeat(self, line: str, at: float | None = None) -> None:
        """``line``'s learner is alive (called at each publish)."""
        self.client.hset(self._k("lines"), line, repr(self.clock() if at is None else at))

    def active_lines(self, within_s: float) -> list[str]:
        """Lines whose learner published within the last ``within_s`` seconds."""
        oldest = self.clock() - within_s
        return sorted((k.decode() if isinstance(k, bytes) else k)
                      for k, v in self.client.hgetall(self._k("lines")).items() if float(v) >= oldest)

    # -- erasing the user's keys ----------------------------------------------------
    def erase_user_keys(self, pseudonyms: Iterable[str]) -> int:
        """Delete every per-user key of ``pseudonyms`` (their click histories); returns
        the number of keys deleted."""
        keys = [history_key(self.prefix, p) for p in pseudonyms]
        return int(self.client.delete(*keys)) if keys else 0


def scan_values(client: redis.Redis, pattern: re.Pattern[bytes], match: str = "*") -> dict[bytes, set[bytes]]:
    """Every match of ``pattern`` in the names and values of the keys matching
    ``match`` (strings, lists, hashes, sets, sorted sets, streams), mapped to the keys
    it was found in: an audit of what Redis holds (``benchmarks/privacy.py`` looks
    for user IDs with it). Reads everything: not for a request path."""
    found: dict[bytes, set[bytes]] = {}

    def look(key: bytes, data: bytes | None) -> None:
        if data:
            for m in pattern.findall(data):
                found.setdefault(m if isinstance(m, bytes) else m[0], set()).add(key)

    for key in client.scan_iter(match=match, count=1000):
        look(key, key)
        kind = client.type(key)
        kind = kind.decode() if isinstance(kind, bytes) else kind
        if kind == "string":
            look(key, client.get(key))
        elif kind == "list":
            for item in client.lrange(key, 0, -1):
                look(key, item)
        elif kind == "hash":
            for field, value in client.hgetall(key).items():
                look(key, field)
                look(key, value)
        elif kind == "set":
            for item in client.smembers(key):
                look(key, item)
        elif kind == "zset":
            for item in client.zrange(key, 0, -1):
                look(key, item)
        elif kind == "stream":
            for _, fields in client.xrange(key):
                for field, value in fields.items():
                    look(key, field)
                    look(key, value)
    return found
