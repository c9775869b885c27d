"""Testing helpers for learners (like ``bytewax.testing``): a seeded synthetic sample
stream with a learnable signal, and in-memory snapshot and applied-id stores with
the interfaces of :class:`em3.redis_stores.RedisSnapshotStore` and
:class:`em3.redis_stores.RedisAppliedLog`.

>>> s = synthetic_samples(4, seed=1)
>>> len(s), len({x.sample_id for x in s})
(4, 4)
"""
from __future__ import annotations

import time
from typing import Iterable, Mapping, Sequence

import numpy as np

from em3.errors import SnapshotError
from em3.redis_stores import check_checkpoints, kept_versions, walk_chain
from em3.signing import sign_manifest, verify_manifest
from em3.stores import decode_batches
from em3.types import CheckpointManifest, Impression, ItemContent, Sample, SnapshotManifest

__all__ = ["synthetic_samples", "synthetic_items", "InMemorySnapshotStore", "InMemoryAppliedLog",
           "InMemoryPrivacyStore"]


def synthetic_items(num_items: int = 30) -> list[ItemContent]:
    """Items ``i0..`` whose text names their group (``even``/``odd``), so content can carry the signal."""
    return [ItemContent(f"i{k}", text=f"item {k} {'even' if k % 2 == 0 else 'odd'} group") for k in range(num_items)]


def synthetic_samples(n: int, *, seed: int = 0, num_users: int = 20, num_items: int = 30,
                      start: int = 0, t0: float = 1.75e9, p_match: float = 0.8, p_other: float = 0.1,
                      id_prefix: str = "imp") -> list[Sample]:
    """``n`` labelled samples: items of even number are clicked with probability
    ``p_match``, odd ones with ``p_other`` (the Bayes AUC is about 0.83 for the defaults).

    ``start`` offsets the impression numbering, so successive calls give new ids.
    """
    rng = np.random.default_rng(seed)
    users = rng.integers(0, num_users, n)
    items = rng.integers(0, num_items, n)
    coins = rng.random(n)
    out = []
    for k in range(n):
        u, i = int(users[k]), int(items[k])
        p = p_match if i % 2 == 0 else p_other
        t = t0 + start + k
        imp = Impression(f"{id_prefix}-{start + k}", f"req-{start + k}", f"u{u}", f"i{i}", 0, t)
        out.append(Sample(imp, int(coins[k] < p), t + 1.0))
    return out


class InMemorySnapshotStore:
    """A dict-backed stand-in for :class:`em3.redis_stores.RedisSnapshotStore`
    (learner checkpoints included; without a ``signing_key`` nothing is signed)."""

    def __init__(self, keep: int = 10, signing_key: str = "") -> None:
        self.keep = keep
        self.signing_key = signing_key
        self.seq: dict[str, int] = {}
        self.snaps: dict[str, dict[int, tuple[SnapshotManifest, bytes]]] = {}
        self.checkpoints: dict[tuple[str, int], dict[int, tuple[CheckpointManifest, bytes]]] = {}
        self.latest: dict[str, int] = {}

    def next_version(self, line: str) -> int:
        self.seq[line] = self.seq.get(line, 0) + 1
        return self.seq[line]

    def publish(self, manifest: SnapshotManifest, blob: bytes,
                checkpoints: Sequence[tuple[CheckpointManifest, bytes]] = ()) -> None:
        check_checkpoints(manifest, checkpoints)
        if self.signing_key:
            checkpoints = [(sign_manifest(m, self.signing_key), b) for m, b in checkpoints]
        line = manifest.model_line
        kept = self.snaps.setdefault(line, {})
        kept[manifest.version] = (manifest, blob)
        if checkpoints:
            self.checkpoints[(line, manifest.version)] = {m.rank: (m, b) for m, b in checkpoints}
        self.latest[line] = manifest.version
        bases = {v: m.base_version for v, (m, _) in kept.items() if m.kind == "delta"}
        needed = kept_versions(sorted(kept), self.keep, manifest.version, bases)
        for v in [v for v in kept if v not in needed]:
            del kept[v]
            self.checkpoints.pop((line, v), None)

    def get_checkpoint(self, line: str, version: int, rank: int = 0) -> tuple[CheckpointManifest, bytes]:
        try:
            manifest, blob = self.checkpoints[(line, version)][rank]
        except KeyError:
            raise SnapshotError(f"line {line!r} v{version} has no checkpoint of learner {rank}") from None
        if self.signing_key:
            verify_manifest(manifest, self.signing_key)
        return manifest, blob

    def get_chain(self, line: str, version: int, have: int | None = None) -> list[tuple[SnapshotManifest, bytes]]:
        return walk_chain(self.get, line, version, have)

    def versions(self, line: str) -> list[int]:
        return sorted(self.snaps.get(line, {}))

    def latest_version(self, line: str) -> int | None:
        return self.latest.get(line)

    def get(self, line: str, version: int | None = None) -> tuple[SnapshotManifest, bytes]:
        version = self.latest_version(line) if version is None else version
        try:
            return self.snaps[line][version]
        except KeyError:
            raise SnapshotError(f"no snapshot {line!r} v{version}") from None

    def rollback(self, line: str, version: int) -> int:
        self.latest[line] = version
        return version


class InMemoryAppliedLog:
    """A dict-backed stand-in for :class:`em3.redis_stores.RedisAppliedLog`."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, int], tuple[int | None, dict[str, list[str]]]] = {}
        self.order: dict[tuple[str, int], list[list[int]]] = {}

    def put(self, line: str, version: int, parent: int | None, ids: Mapping[str, list[str]],
            ttl_s: float | None = None, batches: list[list[int]] | None = None) -> None:
        self.records[(line, version)] = (parent, {k: list(v) for k, v in ids.items()})
        if batches is not None:
            self.order[(line, version)] = [list(b) for b in batches]

    def get(self, line: str, version: int):
        return self.records.get((line, version))

    def batches(self, line: str, version: int) -> list[list[tuple[str, str]]] | None:
        record, order = self.records.get((line, version)), self.order.get((line, version))
        return None if record is None or order is None else decode_batches(record[1], order)

    def chain(self, line: str, version: int | None, max_versions: int | None = None):
        seen = 0
        while version is not None and (max_versions is None or seen < max_versions):
            record = self.get(line, version)
            if record is None:
                return
            yield version, record[1]
            seen += 1
            version = record[0]

    def delete(self, line: str, versions: Iterable[int]) -> None:
        for v in versions:
            self.records.pop((line, v), None)
            self.order.pop((line, v), None)


class InMemoryPrivacyStore:
    """What learners use of :class:`em3.redis_stores.RedisPrivacyStore`, in dicts;
    :meth:`delete` plays the deletion agent (tombstone the user, owe the reset)."""

    def __init__(self) -> None:
        self.owed: dict[str, str] = {}
        self.resets: dict[str, dict[str, int]] = {}
        self.lines: dict[str, float] = {}
        self.tids: set[str] = set()
        self.seq = 0

    def delete(self, user_pseudonym: str) -> str:
        from em3.privacy import tombstone_id

        tid = tombstone_id(user_pseudonym)
        self.owed[tid] = user_pseudonym
        self.tids.add(tid)
        self.seq += 1
        return tid

    def pending(self) -> dict[str, str]:
        return dict(self.owed)

    def owed_by(self, line: str, pending: Mapping[str, str]) -> dict[str, str]:
        return {t: p for t, p in pending.items() if line not in self.resets.get(t, {})}

    def reset_done(self, line: str, version: int, tids: Iterable[str], at: float | None = None) -> None:
        for tid in tids:
            self.resets.setdefault(tid, {})[line] = version

    def heartbeat(self, line: str, at: float | None = None) -> None:
        self.lines[line] = time.time() if at is None else at

    def tombstoned(self, seq: int | None = None):
        return None if seq == self.seq else (self.seq, set(self.tids))
