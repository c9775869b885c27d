"""Durable join state in Redis: the stream package's only module that imports ``redis``.

Per join group ``g`` and input partition ``n`` (prefix ``p``, default ``em3:``):

``{p}join:{g}:{n}:base``   string: the partition's state at the last compaction
``{p}join:{g}:{n}:log``    list: one blob per checkpoint since, the changed records
                           (upserts and evictions) and held clicks of that batch
``{p}join:{g}:{n}:meta``   hash: ``off:{topic}`` -> next offset to read; newest event
                           time per input, the watermark, base and log sizes
``{p}join:{g}:{n}:epoch``  int: owner fencing token, INCR'd by each new owner

Retention: with ``state_ttl_s`` every checkpoint renews an expiry on the
partition's keys, so the state of an abandoned join group disappears; with
``history_ttl_s`` each history append renews the user's history expiry.

Erasure (:func:`erase_users`): a user's impressions (clicked ones kept for their
conversion window included), held clicks and held conversions are removed from
every partition's state by rewriting its base without them, in a
transaction that also bumps the partition's epoch, so the worker that owns it is
fenced and reloads the erased state rather than writing back what it holds.

A checkpoint writes, in ONE ``MULTI/EXEC`` transaction, each partition's delta
blob (RPUSH), its meta hash with the input offsets consumed, and the history
appends of the batch's positives (``{p}hist:{user}``, the layout of
:class:`em3.redis_stores.RedisHistoryStore`). When a partition's log grows past
twice its base (and 16 MB), the same transaction replaces the base with the
full state and deletes the log, so writes stay within a small multiple of the
changes and a restart reads at most about three times the state.
One blob per batch rather than one HSET field per impression: redis-py spends
microseconds per command argument, which at 20k+ events/s was a fifth of the
join's time. The transaction WATCHes the epoch keys, so a worker that lost a
partition to another cannot overwrite the new owner's state (:class:`FencedError`).

Blob format: entries separated by ``0x1e``, fields by ``0x1f`` (neither can occur
in valid JSON): ``U iid record`` (upsert, :func:`encode_record`), ``D iid``
(evicted), ``S iid status\\nclicks-json`` (status change of a stored record),
``O iid clicks-json`` (held clicks), ``X iid`` (no held clicks), ``C iid
conversions-json`` (conversions waiting for their click), ``Y iid`` (none).
A record's status line is ``status[ clicked_at[ v]]``: the click time of a
positive, and ``v`` once a conversion was attributed to it.
"""
from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Collection, Iterable, Mapping

import msgspec
import redis

from em3 import codec
from em3.errors import DecodeError, EM3Error
from em3.types import Click, Conversion
from stream.join import ImpressionState, JoinChanges, JoinConfig, JoinCore
from stream.wire import decode_impression_checked

__all__ = ["FencedError", "PartitionCheckpoint", "RedisJoinStateStore", "encode_record", "decode_record",
           "erase_users", "erase_from_state"]

log = logging.getLogger(__name__)


class FencedError(EM3Error):
    """Another worker took over a partition: this one must stop writing its state."""


def _click_json(held: Iterable[tuple[Click, int]]) -> bytes:
    return json.dumps(
        [[c.impression_id, c.user_id, c.item_id, c.clicked_at, off] for c, off in held], separators=(",", ":")
    ).encode()


def _clicks_from(data: bytes) -> list[tuple[Click, int]]:
    return [(Click(i, u, it, float(t)), int(off)) for i, u, it, t, off in json.loads(data)]


def _conversion_json(held: Iterable[tuple[Conversion, int]]) -> bytes:
    return json.dumps(
        [[c.impression_id, c.user_id, c.item_id, c.converted_at, c.value, off] for c, off in held],
        separators=(",", ":"),
    ).encode()


def _conversions_from(data: bytes) -> list[tuple[Conversion, int]]:
    return [(Conversion(i, u, it, float(t), None if v is None else float(v)), int(off))
            for i, u, it, t, v, off in json.loads(data)]


def _status_line(rec: ImpressionState) -> bytes:
    if rec.clicked_at is None:
        return rec.status.encode()
    return f"{rec.status} {rec.clicked_at!r}{' v' if rec.converted else ''}".encode()


def _parse_status(line: bytes) -> tuple[str, float | None, bool]:
    status, *rest = line.decode().split(" ")
    return status, (float(rest[0]) if rest else None), rest[1:] == ["v"]


def encode_record(rec: ImpressionState) -> bytes:
    """``status-line \\n held-clicks-json \\n impression-json`` (the impression as received).

    >>> from em3.types import Impression
    >>> rec = ImpressionState(Impression("a", "r", "u", "i", 0, 1.7e9), "D", clicked_at=1.7e9 + 3, converted=True)
    >>> back = decode_record(encode_record(rec))
    >>> (back.impression, back.status, back.held, back.clicked_at, back.converted) == (
    ...     rec.impression, rec.status, rec.held, rec.clicked_at, rec.converted)
    True
    """
    raw = rec.raw if rec.raw is not None else codec.encode(rec.impression)
    held = _click_json(rec.held) if rec.held else b""
    return _status_line(rec) + b"\n" + held + b"\n" + raw


def decode_record(data: bytes) -> ImpressionState:
    """Inverse of :func:`encode_record`."""
    line, held, raw = data.split(b"\n", 2)
    status, clicked_at, converted = _parse_status(line)
    return ImpressionState(
        decode_impression_checked(raw, math.inf), status, raw, _clicks_from(held) if held else [],
        clicked_at, converted,
    )


_RS, _US = b"\x1e", b"\x1f"
_MIN_COMPACT_BYTES = 16 * 1024 * 1024


def _delta_blob(changes: JoinChanges, full: bool = False) -> bytes:
    parts = []
    for iid, rec in changes.records.items():
        key = iid.encode()
        if rec is None:
            parts.append(b"D" + _US + key)
        elif rec.persisted and not full:  # status (and held clicks) only
            held = _click_json(rec.held) if rec.held else b""
            parts.append(b"S" + _US + key + _US + _status_line(rec) + b"\n" + held)
        else:
            parts.append(b"U" + _US + key + _US + encode_record(rec))
            rec.persisted = True
    for iid, held in changes.orphans.items():
        key = iid.encode()
        parts.append(b"O" + _US + key + _US + _click_json(held) if held else b"X" + _US + key)
    for iid, held in changes.conversions.items():
        key = iid.encode()
        parts.append(b"C" + _US + key + _US + _conversion_json(held) if held else b"Y" + _US + key)
    return _RS.join(parts)


def _full_blob(core: JoinCore) -> bytes:
    records, orphans = core.state()
    changes = JoinChanges(
        records={r.impression.impression_id: r for r in records},
        orphans={iid: held for iid, held in orphans.items()},
        conversions=core.held_conversions(),
    )
    return _delta_blob(changes, full=True)


def _apply_blob(blob: bytes, records: dict[bytes, bytes], orphans: dict[bytes, bytes],
                conversions: dict[bytes, bytes]) -> None:
    if not blob:
        return
    for entry in blob.split(_RS):
        op, key, *rest = entry.split(_US, 2)
        if op == b"U":
            records[key] = rest[0]
        elif op == b"S":
            old = records.get(key)
            if old is not None:
                records[key] = rest[0] + b"\n" + old.split(b"\n", 2)[2]
        elif op == b"D":
            records.pop(key, None)
        elif op == b"O":
            orphans[key] = rest[0]
        elif op == b"X":
            orphans.pop(key, None)
        elif op == b"C":
            conversions[key] = rest[0]
        else:
            conversions.pop(key, None)


@dataclass
class PartitionCheckpoint:
    """What one partition contributes to a checkpoint."""

    partition: int
    offsets: Mapping[str, int]
    changes: JoinChanges | None = None
    history: list[tuple[str, str, float]] = field(default_factory=list)
    core: JoinCore | None = None  # for compaction: the partition's full state


class RedisJoinStateStore:
    """Loads and checkpoints per-partition join state (see the module docstring).

    Parameters
    ----------
    client : a Redis client (:func:`em3.redis_stores.connect`), bytes responses.
    prefix : Redis key prefix (``Settings.redis_prefix``).
    group : the join group id; separates independent joins on one Redis.
    history_length : each user's history list is trimmed to this many entries.
    history_ttl_s : a user's history expires this long after its last append (None: never).
    state_ttl_s : a partition's keys expire this long after its last checkpoint (None: never).
    """

    def __init__(self, client: redis.Redis, prefix: str, group: str, history_length: int = 256,
                 history_ttl_s: float | None = None, state_ttl_s: float | None = None) -> None:
        if history_length <= 0:
            raise ValueError(f"history_length must be > 0, but {history_length} is given")
        for name, value in (("history_ttl_s", history_ttl_s), ("state_ttl_s", state_ttl_s)):
            if value is not None and not value >= 1:
                raise ValueError(f"{name} must be >= 1 or None, but {value!r} is given")
        self.client = client
        self.prefix = prefix
        self.group = group
        self.history_length = history_length
        self.history_ttl = None if history_ttl_s is None else int(math.ceil(history_ttl_s))
        self.state_ttl = None if state_ttl_s is None else int(math.ceil(state_ttl_s))
        self._epochs: dict[int, int] = {}
        self._sizes: dict[int, list[int]] = {}  # partition -> [base bytes, log bytes]
        self.compactions = 0

    def _key(self, partition: int, what: str) -> str:
        return f"{self.prefix}join:{self.group}:{partition}:{what}"

    def history_key(self, user_id: str) -> str:
        return f"{self.prefix}hist:{user_id}"

    # -- ownership and loading --------------------------------------------------------
    def acquire(self, partition: int) -> int:
        """Become the owner of ``partition``: bump and remember its fencing epoch."""
        epoch = int(self.client.incr(self._key(partition, "epoch")))
        self._epochs[partition] = epoch
        return epoch

    def release(self, partition: int) -> None:
        """Forget ``partition`` (its state stays in Redis for the next owner)."""
        self._epochs.pop(partition, None)
        self._sizes.pop(partition, None)

    def load(self, partition: int, config: JoinConfig, now: float) -> tuple[JoinCore, dict[str, int]]:
        """The partition's core and next offsets per topic, as last checkpointed."""
        pipe = self.client.pipeline(transaction=True)
        pipe.get(self._key(partition, "base"))
        pipe.lrange(self._key(partition, "log"), 0, -1)
        pipe.hgetall(self._key(partition, "meta"))
        base, blobs, meta_raw = pipe.execute()
        raw_records: dict[bytes, bytes] = {}
        raw_orphans: dict[bytes, bytes] = {}
        raw_conversions: dict[bytes, bytes] = {}
        for blob in [base or b"", *blobs]:
            _apply_blob(blob, raw_records, raw_orphans, raw_conversions)
        records = []
        for iid, data in raw_records.items():
            try:
                rec = decode_record(data)
                rec.persisted = True
                records.append(rec)
            except (DecodeError, ValueError) as exc:  # cannot happen unless someone edits Redis
                log.error("dropping unreadable join record %r of partition %d: %s", iid, partition, exc)
        held = [h for data in raw_orphans.values() for h in _clicks_from(data)]
        conversions = [h for data in raw_conversions.values() for h in _conversions_from(data)]
        meta: dict[str, float] = {}
        offsets: dict[str, int] = {}
        sizes = {}
        for k, v in meta_raw.items():
            key = k.decode()
            if key.startswith("off:"):
                offsets[key[4:]] = int(v)
            elif key.endswith("_bytes"):
                sizes[key] = int(v)
            else:
                meta[key] = float(v)
        self._sizes[partition] = [sizes.get("base_bytes", 0), sizes.get("log_bytes", 0)]
        core = JoinCore.restore(config, records, held, meta, now=now, conversions=conversions)
        log.info(
            "partition %d: loaded %d records, %d held clicks, %d held conversions, offsets %s, watermark %s",
            partition, len(records), len(held), len(conversions), offsets, meta.get("watermark"),
        )
        return core, offsets

    # -- checkpoint -------------------------------------------------------------------
    def checkpoint(self, parts: Iterable[PartitionCheckpoint]) -> None:
        """Write every partition's changes, offsets and history in one transaction.

        Raises :class:`FencedError` when another worker now owns one of the partitions.
        """
        parts = list(parts)
        if not parts:
            return
        epoch_keys = [self._key(p.partition, "epoch") for p in parts]
        with self.client.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(*epoch_keys)
                current = pipe.mget(epoch_keys)
                for p, value in zip(parts, current):
                    mine = self._epochs.get(p.partition)
                    if mine is None or value is None or int(value) != mine:
                        raise FencedError(
                            f"partition {p.partition} is owned by epoch {value!r}, this worker has {mine!r}"
                        )
                pipe.multi()
                touched: set[str] = set()
                for p in parts:
                    self._write(pipe, p, touched)
                for user_id in touched:
                    pipe.ltrim(self.history_key(user_id), 0, self.history_length - 1)
                    if self.history_ttl is not None:
                        pipe.expire(self.history_key(user_id), self.history_ttl)
                if self.state_ttl is not None:
                    for p in parts:
                        for what in ("base", "log", "meta", "epoch"):
                            pipe.expire(self._key(p.partition, what), self.state_ttl)
                pipe.execute()
            except redis.WatchError:
                raise FencedError(f"an epoch of partitions {[p.partition for p in parts]} changed") from None

    def _write(self, pipe: redis.client.Pipeline, p: PartitionCheckpoint, touched: set[str]) -> None:
        meta: dict[str, str] = {f"off:{topic}": str(off) for topic, off in p.offsets.items()}
        if p.changes is not None:
            sizes = self._sizes.setdefault(p.partition, [0, 0])
            blob = _delta_blob(p.changes)
            if p.core is not None and sizes[1] + len(blob) > max(2 * sizes[0], _MIN_COMPACT_BYTES):
                base = _full_blob(p.core)
                pipe.set(self._key(p.partition, "base"), base)
                pipe.delete(self._key(p.partition, "log"))
                sizes[:] = [len(base), 0]
                self.compactions += 1
            elif blob:
                pipe.rpush(self._key(p.partition, "log"), blob)
                sizes[1] += len(blob)
            meta["base_bytes"], meta["log_bytes"] = str(sizes[0]), str(sizes[1])
            meta.update({k: repr(v) if math.isfinite(v) else str(v) for k, v in p.changes.meta.items()})
        if meta:
            pipe.hset(self._key(p.partition, "meta"), mapping=meta)
        for user_id, item_id, clicked_at in p.history:
            pipe.lpush(self.history_key(user_id), f"{item_id}\t{clicked_at!r}")
            touched.add(user_id)

    def clear(self, partitions: Iterable[int]) -> None:
        """Delete the state of ``partitions`` (tests, or a deliberate reset)."""
        keys = [self._key(n, w) for n in partitions for w in ("base", "log", "meta", "epoch")]
        if keys:
            self.client.delete(*keys)


# -- erasure ---------------------------------------------------------------------------

class _UserOnly(msgspec.Struct):
    user_id: str = ""


_user_decoder = msgspec.json.Decoder(_UserOnly)


def _record_user(record: bytes) -> str | None:
    """The user id of a stored record (``status\\nheld\\nimpression-json``)."""
    try:
        return _user_decoder.decode(record.split(b"\n", 2)[-1]).user_id
    except msgspec.MsgspecError:
        return None


def erase_from_state(blobs: Iterable[bytes], user_ids: Collection[str]) -> tuple[bytes, dict[str, Counter]]:
    """A partition's state (its base and log blobs, oldest first) without the records
    and held clicks of ``user_ids``: one new base blob, and per user what was removed.

    >>> from em3.types import Impression
    >>> from stream.join import ImpressionState, JoinChanges
    >>> recs = {f"i{n}": ImpressionState(Impression(f"i{n}", "r", u, "x", 0, 1.7e9), "N")
    ...         for n, u in enumerate(["alice", "bob", "alice"])}
    >>> base, removed = erase_from_state([_delta_blob(JoinChanges(records=recs), full=True)], {"alice"})
    >>> removed["records"]["alice"], b"alice" in base, b"bob" in base
    (2, False, True)
    """
    records: dict[bytes, bytes] = {}
    orphans: dict[bytes, bytes] = {}
    conversions: dict[bytes, bytes] = {}
    for blob in blobs:
        _apply_blob(blob, records, orphans, conversions)
    wanted = set(user_ids)
    removed: dict[str, Counter] = {"records": Counter(), "held_clicks": Counter(), "held_conversions": Counter()}
    parts = []
    for key, record in records.items():
        user = _record_user(record)
        if user in wanted:
            removed["records"][user] += 1
            continue
        parts.append(b"U" + _US + key + _US + record)
    for key, data in orphans.items():
        held = json.loads(data) if data else []
        kept = [h for h in held if h[1] not in wanted]
        for h in held:
            if h[1] in wanted:
                removed["held_clicks"][h[1]] += 1
        if kept:
            parts.append(b"O" + _US + key + _US + json.dumps(kept, separators=(",", ":")).encode())
    for key, data in conversions.items():
        held = json.loads(data) if data else []
        kept = [h for h in held if h[1] not in wanted]
        for h in held:
            if h[1] in wanted:
                removed["held_conversions"][h[1]] += 1
        if kept:
            parts.append(b"C" + _US + key + _US + json.dumps(kept, separators=(",", ":")).encode())
    return _RS.join(parts), removed


def erase_users(client: redis.Redis, prefix: str, user_ids: Collection[str],
                max_attempts: int = 50) -> dict[str, Counter]:
    """Remove every impression, held click and held conversion of ``user_ids`` from the
    state of every partition of every join group under ``prefix``; returns, per user,
    what was removed (``records``, ``held_clicks``, ``held_conversions``) and the
    partitions rewritten (``partitions[""]``).

    Each partition is rewritten in one transaction that WATCHes its base, log and
    epoch and bumps the epoch: the worker that owns the partition is fenced at its
    next checkpoint and reloads the erased state, so what it holds in memory (and
    whatever of the user's it read in the batch under way) is never written back.
    A partition that changed while it was read is tried again.
    """
    totals: dict[str, Counter] = {"partitions": Counter(), "records": Counter(), "held_clicks": Counter(),
                                  "held_conversions": Counter()}
    if not user_ids:
        return totals
    for meta_key in client.scan_iter(match=f"{prefix}join:*:meta", count=1000):
        stem = meta_key[: -len(b"meta")] if isinstance(meta_key, bytes) else meta_key.encode()[: -len(b"meta")]
        base_key, log_key, epoch_key = stem + b"base", stem + b"log", stem + b"epoch"
        for attempt in range(max_attempts):
            with client.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(base_key, log_key, epoch_key)
                    base = pipe.get(base_key)
                    blobs = pipe.lrange(log_key, 0, -1)
                    new_base, removed = erase_from_state([base or b"", *blobs], user_ids)
                    pipe.multi()
                    pipe.incr(epoch_key)  # fence the owner: it reloads the erased state
                    pipe.set(base_key, new_base)
                    pipe.delete(log_key)
                    pipe.hset(meta_key, mapping={"base_bytes": str(len(new_base)), "log_bytes": "0"})
                    pipe.execute()
                except redis.WatchError:
                    continue
            totals["partitions"][""] += 1
            totals["records"].update(removed["records"])
            totals["held_clicks"].update(removed["held_clicks"])
            totals["held_conversions"].update(removed["held_conversions"])
            break
        else:
            raise FencedError(f"join state {stem!r} kept changing; erasure not done after {max_attempts} tries")
    return totals
