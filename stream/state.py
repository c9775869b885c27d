"""Durable join state in Redis: the stream package's only module that imports ``redis``.

Per join group ``g`` and input partition ``n`` (prefix ``p``, default ``em3:``):

``{p}join:{g}:{n}:rec``    hash: impression id -> record (status, held clicks, impression JSON)
``{p}join:{g}:{n}:orph``   hash: impression id -> JSON list of clicks waiting for it
``{p}join:{g}:{n}:meta``   hash: ``off:{topic}`` -> next offset to read; newest event
                           time per input and the watermark
``{p}join:{g}:{n}:epoch``  int: owner fencing token, INCR'd by each new owner

A checkpoint writes, in ONE ``MULTI/EXEC`` transaction, the records that changed
(HSET) or were evicted (HDEL), the held clicks, the meta hash with the input
offsets consumed, and the history appends of the positives (``{p}hist:{user}``,
the layout of :class:`em3.redis_stores.RedisHistoryStore`). The transaction
WATCHes the epoch keys, so a worker that lost a partition to another cannot
overwrite the new owner's state (:class:`FencedError`).
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import redis

from em3 import codec
from em3.errors import DecodeError, EM3Error
from em3.types import Click
from stream.join import ImpressionState, JoinChanges, JoinConfig, JoinCore

__all__ = ["FencedError", "PartitionCheckpoint", "RedisJoinStateStore", "encode_record", "decode_record"]

log = logging.getLogger(__name__)


class FencedError(EM3Error):
    """Another worker took over a partition: this one must stop writing its state."""


def _click_json(held: Iterable[tuple[Click, int]]) -> bytes:
    return json.dumps(
        [[c.impression_id, c.user_id, c.item_id, c.clicked_at, off] for c, off in held], separators=(",", ":")
    ).encode()


def _clicks_from(data: bytes) -> list[tuple[Click, int]]:
    return [(Click(i, u, it, float(t)), int(off)) for i, u, it, t, off in json.loads(data)]


def encode_record(rec: ImpressionState) -> bytes:
    """``status \\n held-clicks-json \\n impression-json`` (the impression as received).

    >>> from em3.types import Impression
    >>> rec = ImpressionState(Impression("a", "r", "u", "i", 0, 1.7e9), "N")
    >>> decode_record(encode_record(rec)) == rec
    True
    """
    raw = rec.raw if rec.raw is not None else codec.encode(rec.impression)
    held = _click_json(rec.held) if rec.held else b""
    return rec.status.encode() + b"\n" + held + b"\n" + raw


def decode_record(data: bytes) -> ImpressionState:
    """Inverse of :func:`encode_record`."""
    status, held, raw = data.split(b"\n", 2)
    return ImpressionState(
        codec.decode_impression(raw), status.decode(), raw, _clicks_from(held) if held else []
    )


@dataclass
class PartitionCheckpoint:
    """What one partition contributes to a checkpoint."""

    partition: int
    offsets: Mapping[str, int]
    changes: JoinChanges | None = None
    history: list[tuple[str, str, float]] = field(default_factory=list)


class RedisJoinStateStore:
    """Loads and checkpoints per-partition join state (see the module docstring).

    Parameters
    ----------
    client : a Redis client (:func:`em3.redis_stores.connect`), bytes responses.
    prefix : Redis key prefix (``Settings.redis_prefix``).
    group : the join group id; separates independent joins on one Redis.
    history_length : each user's history list is trimmed to this many entries.
    """

    def __init__(self, client: redis.Redis, prefix: str, group: str, history_length: int = 256) -> None:
        if history_length <= 0:
            raise ValueError(f"history_length must be > 0, but {history_length} is given")
        self.client = client
        self.prefix = prefix
        self.group = group
        self.history_length = history_length
        self._epochs: dict[int, int] = {}

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

    def load(self, partition: int, config: JoinConfig, now: float) -> tuple[JoinCore, dict[str, int]]:
        """The partition's core and next offsets per topic, as last checkpointed."""
        pipe = self.client.pipeline(transaction=True)
        pipe.hgetall(self._key(partition, "rec"))
        pipe.hgetall(self._key(partition, "orph"))
        pipe.hgetall(self._key(partition, "meta"))
        recs, orphs, meta_raw = pipe.execute()
        records = []
        for iid, data in recs.items():
            try:
                records.append(decode_record(data))
            except (DecodeError, ValueError) as exc:  # cannot happen unless someone edits Redis
                log.error("dropping unreadable join record %r of partition %d: %s", iid, partition, exc)
        held = [h for data in orphs.values() for h in _clicks_from(data)]
        meta: dict[str, float] = {}
        offsets: dict[str, int] = {}
        for k, v in meta_raw.items():
            key = k.decode()
            if key.startswith("off:"):
                offsets[key[4:]] = int(v)
            else:
                meta[key] = float(v)
        core = JoinCore.restore(config, records, held, meta, now=now)
        log.info(
            "partition %d: loaded %d records, %d held clicks, offsets %s, watermark %s",
            partition, len(records), len(held), offsets, meta.get("watermark"),
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
                pipe.execute()
            except redis.WatchError:
                raise FencedError(f"an epoch of partitions {[p.partition for p in parts]} changed") from None

    def _write(self, pipe: redis.client.Pipeline, p: PartitionCheckpoint, touched: set[str]) -> None:
        meta: dict[str, str] = {f"off:{topic}": str(off) for topic, off in p.offsets.items()}
        if p.changes is not None:
            put = {}
            drop = []
            for iid, rec in p.changes.records.items():
                if rec is None:
                    drop.append(iid)
                else:
                    put[iid] = encode_record(rec)
            if put:
                pipe.hset(self._key(p.partition, "rec"), mapping=put)
            if drop:
                pipe.hdel(self._key(p.partition, "rec"), *drop)
            oput = {}
            odrop = []
            for iid, held in p.changes.orphans.items():
                if held:
                    oput[iid] = _click_json(held)
                else:
                    odrop.append(iid)
            if oput:
                pipe.hset(self._key(p.partition, "orph"), mapping=oput)
            if odrop:
                pipe.hdel(self._key(p.partition, "orph"), *odrop)
            meta.update({k: repr(v) if math.isfinite(v) else str(v) for k, v in p.changes.meta.items()})
        if meta:
            pipe.hset(self._key(p.partition, "meta"), mapping=meta)
        for user_id, item_id, clicked_at in p.history:
            pipe.lpush(self.history_key(user_id), f"{item_id}\t{clicked_at!r}")
            touched.add(user_id)

    def clear(self, partitions: Iterable[int]) -> None:
        """Delete the state of ``partitions`` (tests, or a deliberate reset)."""
        keys = [self._key(n, w) for n in partitions for w in ("rec", "orph", "meta", "epoch")]
        if keys:
            self.client.delete(*keys)
