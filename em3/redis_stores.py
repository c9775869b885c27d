"""Redis-backed stores: the only module of the project that imports ``redis``.

Key layout (prefix ``em3:`` by default; see ``docs/architecture.md``):

``{p}item:{item_id}``              hash: ``data`` = encoded ItemContent JSON
``{p}items``                       set of registered item ids
``{p}hist:{user_id}``              list, newest first, of ``item_id<TAB>clicked_at``, trimmed to N
``{p}snap:{line}:{version}:blob``  safetensors bytes of a snapshot
``{p}snap:{line}:{version}:manifest`` JSON manifest
``{p}snap:{line}:versions``        sorted set of kept versions (score = version)
``{p}snap:{line}:latest``          the version pointer (an int)
``{p}snapshots``                   pub/sub channel: ``{"line":..., "version":...}``
"""
from __future__ import annotations

from typing import Iterable, Sequence

import redis

from em3 import codec
from em3.config import RedisSettings
from em3.errors import DecodeError
from em3.stores import DEFAULT_HISTORY_LENGTH
from em3.types import ItemContent

__all__ = ["connect", "RedisContentStore", "RedisHistoryStore", "RedisError"]

RedisError = redis.RedisError


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


class RedisHistoryStore:
    """Recent clicks per user in a Redis list (:class:`em3.stores.HistorySource`)."""

    def __init__(self, client: redis.Redis, prefix: str = "em3:", max_length: int = DEFAULT_HISTORY_LENGTH) -> None:
        if max_length <= 0:
            raise ValueError(f"max_length must be > 0, but {max_length} is given")
        self.client = client
        self.prefix = prefix
        self.max_length = max_length

    def _key(self, user_id: str) -> str:
        return f"{self.prefix}hist:{user_id}"

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
        pipe.execute()

    def get(self, user_id: str, limit: int, before: float | None = None) -> list[str]:
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
        out = []
        for raw_list, b in zip(pipe.execute(), befores):
            items: list[str] = []
            for raw in raw_list:
                text = raw.decode() if isinstance(raw, bytes) else raw
                item_id, _, ts = text.partition("\t")
                if b is not None and ts and float(ts) >= b:
                    continue
                items.append(item_id)
                if len(items) >= limit:
                    break
            out.append(items)
        return out
