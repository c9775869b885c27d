"""HMAC signatures of snapshot and checkpoint manifests (no torch: the stores and the
join import it).

A manifest holds its blob's sha256, so signing the manifest's canonical JSON
covers the weights too. Learners and servers share the key (``EM3_SNAPSHOT_KEY``;
``em3 services up`` generates one); see :class:`em3.redis_stores.RedisSnapshotStore`.
A learner checkpoint's manifest (:class:`em3.types.CheckpointManifest`) is signed
with the same key under its own domain tag, so neither kind of signature can be
passed off as the other.
"""
from __future__ import annotations

import hashlib
import hmac
from typing import TypeVar

import msgspec

from em3.errors import SignatureError, SnapshotError
from em3.types import CheckpointManifest, SnapshotManifest

__all__ = ["sign_manifest", "verify_manifest"]

M = TypeVar("M", SnapshotManifest, CheckpointManifest)


def _where(manifest: SnapshotManifest | CheckpointManifest) -> str:
    kind = "checkpoint" if isinstance(manifest, CheckpointManifest) else "snapshot"
    return f"{kind} {manifest.model_line} v{manifest.version}"


def _signature(manifest: SnapshotManifest | CheckpointManifest, key: str) -> str:
    from em3.codec import manifest_to_json

    body = manifest_to_json(msgspec.structs.replace(manifest, signature="")).encode()
    if isinstance(manifest, CheckpointManifest):
        body = b"em3-checkpoint\n" + body
    return hmac.new(key.encode(), body, hashlib.sha256).hexdigest()


def sign_manifest(manifest: M, key: str) -> M:
    """``manifest`` with its ``signature`` set (HMAC-SHA256 with ``key``).

    >>> m = SnapshotManifest("main", 1, None, 0.0, {}, {}, "0" * 64, 0)
    >>> verify_manifest(sign_manifest(m, "k"), "k")
    >>> verify_manifest(sign_manifest(m, "k"), "other")
    Traceback (most recent call last):
    ...
    em3.errors.SignatureError: snapshot main v1: wrong signature (not signed with this server's snapshot key)
    """
    if not key:
        raise SnapshotError("no snapshot key: set EM3_SNAPSHOT_KEY (learners and servers share it)")
    return msgspec.structs.replace(manifest, signature=_signature(manifest, key))


def verify_manifest(manifest: SnapshotManifest | CheckpointManifest, key: str) -> None:
    """Raise :class:`SnapshotError` unless ``manifest`` carries a valid signature for ``key``."""
    where = _where(manifest)
    if not key:
        raise SignatureError(f"{where}: no snapshot key to verify it with; set EM3_SNAPSHOT_KEY")
    if not manifest.signature:
        raise SignatureError(f"{where}: unsigned")
    if not hmac.compare_digest(manifest.signature, _signature(manifest, key)):
        raise SignatureError(f"{where}: wrong signature (not signed with this server's snapshot key)")
