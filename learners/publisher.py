"""Snapshot publishing and resuming for one model line.

A snapshot is the model's trainable state (safetensors, :mod:`em3.snapshot`) plus a
:class:`em3.types.SnapshotManifest` that records the model config, the version and
its parent, when it was made, the ``"topic:partition" -> next offset`` map it was
trained to and cumulative statistics. Beside it, :class:`em3.redis_stores.RedisAppliedLog`
records the sample ids that version applied since its parent.

Order of one publish (:meth:`SnapshotPublisher.publish`):

1. check the line's pointer still names our parent (else someone rolled the line
   back or another learner publishes to it: :class:`LineMovedError`, and the caller
   resumes from the pointer);
2. draw a new version (``INCR``), pack the state and the learners' checkpoints
   (:mod:`em3.checkpoint`: optimizer state, step counters, RNG, history-content
   cache), each checkpoint naming the version and the digest of its state;
3. write the applied-ids record of that version (with its micro-batches);
4. publish blob + manifest + checkpoints + pointer in one Redis transaction, then notify.

A learner resumes from a version's snapshot *and* its checkpoint, so it continues
as if it had never stopped; without a usable checkpoint (a version published before
checkpoints existed, or one that fails verification) it resumes with fresh
optimizer state and says so.

Only after :meth:`publish` returns does the caller commit the Kafka offsets. A
crash before step 4 leaves the pointer on the parent: the restarted learner
loads the parent, seeks to its offsets and learns the lost cycle again, and the
orphaned applied record is unreachable from any published version.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from em3.constraints import NonNegFloat, NonNegInt, PositiveFloat, PositiveInt, config_class
from em3.errors import SignatureError, SnapshotError
from em3.types import SnapshotManifest
from stream.dedup import DedupWindow

__all__ = [
    "SnapshotPolicy",
    "PublisherConfig",
    "ResumePoint",
    "SnapshotPublisher",
    "LineMovedError",
    "Checkpoint",
]

log = logging.getLogger(__name__)


class LineMovedError(SnapshotError):
    """The line's pointer no longer names the version this learner built on."""


@config_class
class SnapshotPolicy:
    """When a snapshot is due: every ``every_steps`` optimizer steps or every
    ``interval_s`` seconds, whichever comes first (None disables a criterion).

    >>> p = SnapshotPolicy(interval_s=2.0, every_steps=None)
    >>> p.due(steps=100, elapsed_s=1.0), p.due(steps=0, elapsed_s=2.0)
    (False, True)
    """

    interval_s: PositiveFloat | None = 2.0
    every_steps: PositiveInt | None = None

    def __post_init__(self) -> None:
        if self.interval_s is None and self.every_steps is None:
            raise ValueError("interval_s and every_steps cannot both be None")

    def due(self, steps: int, elapsed_s: float) -> bool:
        if self.every_steps is not None and steps >= self.every_steps:
            return True
        return self.interval_s is not None and elapsed_s >= self.interval_s


@config_class
class PublisherConfig:
    """Settings of a :class:`SnapshotPublisher`.

    Parameters
    ----------
    dedup_capacity : int
        Ids the dedup window holds; applied records older than the window are
        deleted unless ``retain_applied``.
    retain_applied : bool
        Keep every applied-ids record (an audit trail: tests and
        ``benchmarks/recovery.py``).
    check_pointer : bool
        Refuse to publish when the line's pointer moved (:class:`LineMovedError`).
    full_every, full_every_s : int, float
        Between full snapshots, publish deltas against the version before
        (:func:`em3.snapshot.pack_delta`: the changed rows of the ID tables and
        counters, the dense tensors whole); a full snapshot follows after
        ``full_every`` deltas or ``full_every_s`` seconds, whichever comes first.
        ``full_every=0`` publishes only full snapshots. Keep ``full_every`` below
        the store's ``keep`` so that a server which missed a delta finds the chain.
    """

    dedup_capacity: PositiveInt = 200_000
    retain_applied: bool = False
    check_pointer: bool = True
    full_every: NonNegInt = 10
    full_every_s: NonNegFloat = 300.0


@dataclass
class _Base:
    version: int
    state: dict[str, Any]
    digest: str
    deltas: int  # deltas published since the last full snapshot
    full_at: float  # monotonic time of that full snapshot


def _copy_state(state: Mapping[str, Any]) -> dict[str, Any]:
    return {name: t.detach().to("cpu").clone() for name, t in state.items()}


#: A learner checkpoint as the learner gives and takes it: ``(tensors, meta)``
#: (:meth:`learners.online.OnlineLearner.checkpoint`).
Checkpoint = tuple[Mapping[str, Any], Mapping[str, Any]]


@dataclass
class ResumePoint:
    """Where a line's latest loadable snapshot left off; ``checkpoint`` is the learner
    checkpoint published with it (None when there is none or it is unusable)."""

    version: int
    manifest: SnapshotManifest
    state: Mapping[str, Any]
    offsets: dict[str, int]
    window: DedupWindow
    totals: dict[str, int] = field(default_factory=dict)
    checkpoint: Checkpoint | None = None


def _pack(state: Mapping[str, Any], **manifest_fields: Any) -> tuple[bytes, SnapshotManifest]:
    from em3 import snapshot

    return snapshot.pack(state, **manifest_fields)


def _pack_delta(state: Mapping[str, Any], base: Mapping[str, Any], **fields: Any) -> tuple[bytes, SnapshotManifest]:
    from em3 import snapshot

    return snapshot.pack_delta(state, base, **fields)


def _materialize(chain, expected_config: Mapping[str, Any]) -> dict[str, Any]:
    from em3 import snapshot

    return snapshot.materialize(chain, expected_config)


def _digest(state: Mapping[str, Any]) -> str:
    from em3 import snapshot

    return snapshot.state_digest(state)


def _pack_checkpoint(tensors: Mapping[str, Any], meta: Mapping[str, Any], **fields: Any):
    from em3.checkpoint import pack_checkpoint

    return pack_checkpoint(tensors, meta, **fields)


def _unpack_checkpoint(blob: bytes, manifest: Any, state_sha256: str) -> Checkpoint:
    from em3.checkpoint import unpack_checkpoint

    return unpack_checkpoint(blob, manifest, state_sha256)


def _encode_batches(ids: Mapping[str, list[str]], batches: list[list[str]]) -> list[list[int]]:
    from em3.stores import encode_batches

    return encode_batches(ids, batches)


def _config_dict(config: Mapping[str, Any]) -> dict[str, Any]:
    from em3 import snapshot

    return snapshot.config_dict(config)


class SnapshotPublisher:
    """Publishes and resumes the snapshots of one model line.

    Parameters
    ----------
    snapshots : RedisSnapshotStore
    applied : RedisAppliedLog
    model_line : str
    model_config : mapping
        The saved model config (``ModelConfig.to_dict()``); a resumed snapshot
        must carry the same one.
    config : PublisherConfig
    """

    def __init__(self, snapshots, applied, model_line: str, model_config: Mapping[str, Any],
                 config: PublisherConfig = PublisherConfig()) -> None:
        if not model_line or ":" in model_line:
            raise ValueError(f"model_line must be a non-empty name without ':', but {model_line!r} is given")
        self.snapshots = snapshots
        self.applied = applied
        self.model_line = model_line
        self.model_config = dict(model_config)
        self.config = config
        # (version, applied count) of the window's chain, newest last; used to prune.
        self._chain: list[tuple[int, int]] = []
        # The last published (or resumed) state, that the next delta is made against.
        self._base: _Base | None = None

    # ---------------------------------------------------------------- resume
    def resume(self, partitions: Iterable[str] | None = None, rank: int | None = 0) -> ResumePoint | None:
        """The newest loadable snapshot of the line, or None if it has none.

        A corrupt newest version is skipped for the one before it (learning the
        records after the older one's offsets again); a config mismatch raises
        :class:`em3.errors.SnapshotError` rather than overwrite the line.
        ``partitions`` restricts the rebuilt dedup window to those partitions;
        the point carries learner ``rank``'s checkpoint of the version (none for
        ``rank=None``: the aggregator, which trains nothing).
        """
        latest = self.snapshots.latest_version(self.model_line)
        if latest is None:
            self._chain = []
            return None
        candidates = [latest] + [v for v in reversed(self.snapshots.versions(self.model_line)) if v < latest]
        for version in candidates:
            try:
                chain = self.snapshots.get_chain(self.model_line, version)
            except SnapshotError as exc:
                log.warning("snapshot %s v%d unreadable (%s); trying an older one", self.model_line, version, exc)
                continue
            manifest = chain[-1][0]
            saved, wanted = _config_dict(manifest.config), _config_dict(self.model_config)
            if saved != wanted:
                differing = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
                raise SnapshotError(
                    f"line {self.model_line!r} v{version} was trained with a different model config; "
                    f"use another --model-line or the same variant (differing keys: {differing})"
                )
            try:
                state = _materialize(chain, self.model_config)
            except SnapshotError as exc:
                log.warning("snapshot %s v%d fails verification (%s); trying an older one", self.model_line, version, exc)
                continue
            window, applied_chain = self._window(version, None if partitions is None else set(partitions))
            self._chain = applied_chain
            digest = manifest.state_sha256 or _digest(state)
            self._base = _Base(version, _copy_state(state), digest, 0, -math.inf)
            totals = {k: int(v) for k, v in dict(manifest.stats.get("totals", {})).items()}
            checkpoint = None if rank is None else self.load_checkpoint(version, digest, rank)
            log.info("resuming %s from v%d (offsets %s, dedup window %d ids, %s)",
                     self.model_line, version, dict(manifest.offsets), len(window),
                     "without a learner checkpoint" if checkpoint is None else "with its learner checkpoint")
            return ResumePoint(version, manifest, state, dict(manifest.offsets), window, totals, checkpoint)
        raise SnapshotError(f"line {self.model_line!r} has versions but none is loadable")

    def _window(self, version: int, partitions: set[str] | None) -> tuple[DedupWindow, list[tuple[int, int]]]:
        chain: list[tuple[int, int]] = []

        def chunks():
            for v, ids in self.applied.chain(self.model_line, version):
                chosen = [i for key, values in sorted(ids.items())
                          if partitions is None or key in partitions for i in values]
                chain.append((v, sum(len(values) for values in ids.values())))
                yield chosen

        window = DedupWindow.from_newest_first(self.config.dedup_capacity, chunks())
        return window, list(reversed(chain))

    def load_checkpoint(self, version: int | None, state_sha256: str | None = None, rank: int = 0) -> Checkpoint | None:
        """Learner ``rank``'s checkpoint of ``version``, verified (signature, checksum, and
        that it belongs to the state with digest ``state_sha256``, default the
        version's manifest's); None, with a warning, when there is none or it fails."""
        if version is None:
            return None
        try:
            if state_sha256 is None:
                state_sha256 = self.snapshots.get(self.model_line, version)[0].state_sha256
            manifest, blob = self.snapshots.get_checkpoint(self.model_line, version, rank)
            return _unpack_checkpoint(blob, manifest, state_sha256)
        except SnapshotError as exc:
            log.warning("no usable learner checkpoint for %s v%d (%s): optimizer state starts afresh",
                        self.model_line, version, exc)
            return None

    def window_for(self, version: int | None, partitions: Iterable[str] | None = None) -> DedupWindow:
        """The dedup window as of ``version`` (empty for None), for ``partitions``."""
        if version is None:
            return DedupWindow(self.config.dedup_capacity)
        return self._window(version, None if partitions is None else set(partitions))[0]

    # --------------------------------------------------------------- publish
    def publish(
        self,
        state: Mapping[str, Any],
        *,
        parent: int | None,
        offsets: Mapping[str, int],
        applied_ids: Mapping[str, list[str]],
        stats: Mapping[str, Any],
        batches: list[list[str]] | None = None,
        checkpoints: Mapping[int, Checkpoint] | None = None,
    ) -> SnapshotManifest:
        """Publish ``state`` as the line's next version; see the module docstring.

        ``batches`` (:attr:`learners.loop.CycleResult.batches`) records how
        ``applied_ids`` were grouped into micro-batches; ``checkpoints`` maps each
        learner's rank to its checkpoint taken with ``state``.
        """
        line = self.model_line
        if self.config.check_pointer:
            current = self.snapshots.latest_version(line)
            if current != parent and not self._forged(current):
                raise LineMovedError(f"line {line!r} points at v{current}, but this learner built on v{parent}")
        version = self.snapshots.next_version(line)
        fields = dict(model_line=line, version=version, parent_version=parent, created_at=time.time(),
                      config=self.model_config, offsets={k: int(v) for k, v in offsets.items()}, stats=dict(stats))
        base, now = self._base, time.monotonic()
        delta = (base is not None and parent is not None and base.version == parent
                 and base.deltas < self.config.full_every and now - base.full_at < self.config.full_every_s)
        if delta:
            blob, manifest = _pack_delta(state, base.state, base_version=parent, base_state_sha256=base.digest,
                                         **fields)
        else:
            blob, manifest = _pack(state, **fields)
        packed = []
        for rank, (tensors, meta) in sorted((checkpoints or {}).items()):
            ckpt_blob, ckpt_manifest = _pack_checkpoint(tensors, meta, model_line=line, version=version,
                                                        rank=int(rank), state_sha256=manifest.state_sha256)
            packed.append((ckpt_manifest, ckpt_blob))
        ids = {k: list(v) for k, v in applied_ids.items() if v}
        order = None if batches is None else _encode_batches(ids, [b for b in batches if b])
        self.applied.put(line, version, parent, ids, batches=order)
        if packed:
            self.snapshots.publish(manifest, blob, checkpoints=packed)
        else:
            self.snapshots.publish(manifest, blob)
        self._base = _Base(version, _copy_state(state), manifest.state_sha256,
                           base.deltas + 1 if delta else 0, base.full_at if delta else now)
        self._chain.append((version, sum(len(v) for v in applied_ids.values())))
        self._prune()
        return manifest

    def _forged(self, version: int | None) -> bool:
        """True when the line's pointer names a version whose manifest is not signed with
        our key: someone with write access to Redis but without the key moved it. It is
        not a rollback to honour (resuming would skip it and stall for good): the next
        publish moves the pointer back onto the signed chain."""
        if version is None:
            return False
        try:
            self.snapshots.get(self.model_line, version)
        except SignatureError as exc:
            log.error("line %r points at v%d, which fails verification (%s); publishing over it",
                      self.model_line, version, exc)
            return True
        except SnapshotError:
            return False
        return False

    def _prune(self) -> None:
        """Delete applied records that fell out of the dedup window (unless retained)."""
        if self.config.retain_applied:
            return
        total, keep_from = 0, 0
        for index in range(len(self._chain) - 1, -1, -1):
            total += self._chain[index][1]
            if total >= self.config.dedup_capacity:
                keep_from = index
                break
        stale = [v for v, _ in self._chain[:keep_from]]
        if stale:
            self.applied.delete(self.model_line, stale)
            self._chain = self._chain[keep_from:]
