"""Hot reload: follow a model line's snapshots in Redis and swap them in atomically.

Protocol (see ``docs/architecture.md``, "Serving"):

1. A :class:`SnapshotWatcher` thread listens on the ``{prefix}snapshots`` pub/sub
   channel and also polls every ``poll_interval_s`` (a missed notice, a restarted
   Redis or a dropped subscription cost at most one poll interval).
2. On a notice or a poll, each :class:`SnapshotReloader` reads its line's version
   pointer. The pointer is the truth: if it differs from the version being served
   (newer, or older after a rollback), that version is loaded.
3. Loading happens in the watcher thread, never on the request path: fetch the
   manifest and blob, verify checksum and config (the :class:`ModelLoader`), build
   the model, precompute the item-row cache (``prepare``). Only then is the new
   :class:`serving.ranking.ServingState` published with one reference assignment;
   a request reads ``reloader.current`` once and uses that state to the end, so no
   request sees half a swap, fails, or waits for one.
4. A bad snapshot (checksum, config, unreadable) is refused, remembered and not
   retried; Redis errors are retried at the next poll. Either way the last good
   state keeps serving, and :meth:`SnapshotReloader.status` says what went wrong.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol, Sequence

from em3.constraints import NonEmptyStr, PositiveInt, config_class
from em3.errors import SignatureError, SnapshotError
from em3.redis_stores import RedisError
from em3.types import SnapshotManifest
from serving.ranking import ServingState
from serving.scoring import ModelLoader, RankingModel

__all__ = [
    "ReloaderConfig",
    "ReloadListener",
    "ReloaderStatus",
    "SnapshotReloader",
    "SnapshotWatcher",
]

logger = logging.getLogger(__name__)

PrepareFn = Callable[[str, SnapshotManifest, RankingModel, "ServingState | None"], ServingState]


@config_class
class ReloaderConfig:
    """Which snapshots one :class:`SnapshotReloader` serves.

    Parameters
    ----------
    model_line : str
        The line whose version pointer is followed.
    version : int, optional
        Serve exactly this version and never follow the pointer (an A/B arm
        pinned to a fixed snapshot).
    max_bad_versions : int
        How many refused versions are remembered (not retried).
    objectives : tuple of str
        Serving objectives the arms of this source rank by; a snapshot whose model
        cannot compute one of them is refused (:attr:`RankingModel.objectives`).
    """

    model_line: NonEmptyStr
    version: PositiveInt | None = None
    max_bad_versions: PositiveInt = 100
    objectives: tuple[NonEmptyStr, ...] = ("ctr",)

    @property
    def key(self) -> str:
        """``line`` or ``line@version``: how arms and metrics name this source."""
        return self.model_line if self.version is None else f"{self.model_line}@{self.version}"


class ReloadListener(Protocol):
    """Told about swaps and failures (the metrics implement it)."""

    def on_swap(self, key: str, line: str, version: int, seconds: float) -> None: ...

    def on_failure(self, key: str, line: str, reason: str, error: str) -> None: ...

    def on_redis(self, ok: bool) -> None: ...


@dataclass(frozen=True)
class ReloaderStatus:
    """What /readyz reports for one source."""

    key: str
    model_line: str
    ready: bool
    version: int | None
    pointer: int | None
    stale: bool
    redis_ok: bool
    swaps: int
    failures: int
    last_error: str | None
    last_error_at: float | None
    loaded_at: float | None
    bad_versions: list[int]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class SnapshotReloader:
    """Holds the state served for one line (or one fixed snapshot) and reloads it.

    ``current`` is ``None`` until the first snapshot loads; afterwards it only ever
    changes by one assignment to a fully built state.
    """

    def __init__(
        self,
        store: Any,
        loader: ModelLoader,
        prepare: PrepareFn,
        config: ReloaderConfig,
        listener: ReloadListener | None = None,
    ) -> None:
        self.store = store
        self.loader = loader
        self.prepare = prepare
        self.config = config
        self.listener = listener
        self.current: ServingState | None = None
        self.pointer: int | None = None
        self.redis_ok = True
        self.swaps = 0
        self.failures = 0
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self._bad: OrderedDict[int, str] = OrderedDict()
        self._lock = threading.Lock()  # one load at a time per reloader

    @property
    def key(self) -> str:
        return self.config.key

    @property
    def model_line(self) -> str:
        return self.config.model_line

    def _fail(self, reason: str, error: str) -> None:
        self.failures += 1
        self.last_error = f"{reason}: {error}"
        self.last_error_at = time.time()
        if self.listener is not None:
            self.listener.on_failure(self.key, self.model_line, reason, error)

    def mark_redis(self, ok: bool, error: str | None = None) -> None:
        if not ok and self.redis_ok:
            logger.warning("%s: Redis unreachable (%s); serving version %s", self.key, error,
                           None if self.current is None else self.current.version)
        if not ok:
            self._fail("redis", error or "unreachable")
        self.redis_ok = ok

    def check(self) -> bool:
        """Read the pointer (or the fixed version) and load it if it is not served yet.

        Returns True if a new state was swapped in. Never raises for Redis or
        snapshot problems: they are recorded and reported.
        """
        with self._lock:
            try:
                target = self.config.version
                if target is None:
                    target = self.store.latest_version(self.model_line)
                self.pointer = target
            except (RedisError, OSError) as exc:
                self.mark_redis(False, repr(exc))
                return False
            self.redis_ok = True
            if target is None:
                return False  # nothing published yet
            if self.current is not None and self.current.version == target:
                return False
            if target not in self._bad and self._load(target):
                return True
            if self.current is None and target in self._bad:
                # Nothing served yet and the pointer names a version we refuse (forged,
                # corrupt): serve the newest older version that verifies, rather than
                # stay unready until someone publishes again.
                return self._fall_back(target)
            return False

    def _fall_back(self, below: int) -> bool:
        try:
            older = [v for v in self.store.versions(self.model_line) if v < below and v not in self._bad]
        except (RedisError, OSError) as exc:
            self.mark_redis(False, repr(exc))
            return False
        for version in reversed(older):
            if self._load(version):
                logger.warning("%s: the pointer's v%d is refused; serving v%d meanwhile", self.key, below, version)
                return True
        return False

    def _chain(self, version: int) -> list:
        """The snapshots to apply to reach ``version``: the deltas after the version
        served now when ``version``'s chain passes through it, else a full snapshot
        and the deltas after it (:meth:`RedisSnapshotStore.get_chain`)."""
        have = None if self.current is None else self.current.version
        get_chain = getattr(self.store, "get_chain", None)
        if get_chain is None:  # a store without deltas
            return [self.store.get(self.model_line, version)]
        return get_chain(self.model_line, version, have=have)

    def _build(self, chain: list, previous: RankingModel | None) -> RankingModel:
        """Load the chain's snapshots in order, each on the model before it."""
        model = previous
        for manifest, blob in chain:
            if manifest.kind == "delta":
                load_delta = getattr(self.loader, "load_delta", None)
                if load_delta is None:
                    raise SnapshotError(f"v{manifest.version} is a delta, and this loader loads only full snapshots")
                model = load_delta(manifest, blob, model)
            else:
                model = self.loader.load(manifest, blob, model)
        can = tuple(getattr(model, "objectives", ("ctr",)))
        missing = [o for o in self.config.objectives if o not in can]
        if missing:
            raise SnapshotError(f"arms of {self.key!r} rank by {missing}, which this snapshot's model cannot "
                                f"compute (it offers {list(can)}; ctcvr and value need the CVR head)")
        return model

    def _load(self, version: int) -> bool:
        t0 = time.perf_counter()
        try:
            chain = self._chain(version)
        except (RedisError, OSError) as exc:
            self.mark_redis(False, repr(exc))
            return False
        except SignatureError as exc:  # forged or foreign weights: never served
            self._refuse(version, "signature", str(exc))
            return False
        except SnapshotError as exc:  # pruned between pointer read and get: next poll retries
            self._fail("missing", str(exc))
            return False
        previous = self.current
        manifest = chain[-1][0]
        try:
            model = self._build(chain, None if previous is None else previous.model)
            state = self.prepare(self.model_line, manifest, model, previous)
        except SnapshotError as exc:
            self._refuse(version, "snapshot", str(exc))
            return False
        except Exception as exc:  # noqa: BLE001 - a broken build must not kill the watcher
            logger.exception("%s: building version %d failed", self.key, version)
            self._refuse(version, "build", repr(exc))
            return False
        self.current = state  # the swap: one reference assignment
        self.swaps += 1
        seconds = time.perf_counter() - t0
        logger.info("%s: now serving version %d (built in %.3f s)", self.key, version, seconds)
        if self.listener is not None:
            self.listener.on_swap(self.key, self.model_line, version, seconds)
        return True

    def _refuse(self, version: int, reason: str, error: str) -> None:
        logger.error("%s: refusing version %d (%s: %s); still serving %s", self.key, version, reason, error,
                     None if self.current is None else self.current.version)
        self._bad[version] = error
        while len(self._bad) > self.config.max_bad_versions:
            self._bad.popitem(last=False)
        self._fail(reason, f"version {version}: {error}")

    def status(self) -> ReloaderStatus:
        cur = self.current
        version = None if cur is None else cur.version
        return ReloaderStatus(
            key=self.key,
            model_line=self.model_line,
            ready=cur is not None,
            version=version,
            pointer=self.pointer,
            stale=self.pointer is not None and self.pointer != version,
            redis_ok=self.redis_ok,
            swaps=self.swaps,
            failures=self.failures,
            last_error=self.last_error,
            last_error_at=self.last_error_at,
            loaded_at=None if cur is None else cur.loaded_at,
            bad_versions=list(self._bad),
        )


class SnapshotWatcher:
    """One background thread: pub/sub notices plus a polling fallback for all reloaders.

    Parameters
    ----------
    store : RedisSnapshotStore
        Its ``subscribe()`` gives the notice subscription.
    reloaders : sequence of SnapshotReloader
    poll_interval_s : float
        Poll every reloader at least this often, notices or not.
    extra_channels : mapping of channel to callback, optional
        More pub/sub channels to follow on the same connection; each callback
        gets the decoded JSON payload (item-update notices use this).
    listener : ReloadListener, optional
        Told whether Redis answered, after each round of checks.
    thread_init : callable, optional
        Run first in the watcher thread (the runtime limits the torch threads
        that the precompute of a new version may use).
    """

    def __init__(
        self,
        store: Any,
        reloaders: Sequence[SnapshotReloader],
        poll_interval_s: float = 1.0,
        extra_channels: dict[str, Callable[[Any], None]] | None = None,
        listener: ReloadListener | None = None,
        thread_init: Callable[[], None] | None = None,
    ) -> None:
        if poll_interval_s <= 0:
            raise ValueError(f"poll_interval_s must be > 0, but {poll_interval_s} is given")
        self.store = store
        self.reloaders = list(reloaders)
        self.poll_interval_s = poll_interval_s
        self.extra_channels = dict(extra_channels or {})
        self.listener = listener
        self.thread_init = thread_init
        self.notices = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "SnapshotWatcher":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="em3-snapshot-watcher", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def check_all(self, reloaders: Iterable[SnapshotReloader] | None = None) -> int:
        """Run :meth:`SnapshotReloader.check` on each; returns the number of swaps."""
        swapped = 0
        for reloader in self.reloaders if reloaders is None else reloaders:
            swapped += int(reloader.check())
        if self.listener is not None:
            self.listener.on_redis(all(r.redis_ok for r in self.reloaders))
        return swapped

    def _handle(self, message: dict) -> None:
        channel = message.get("channel")
        channel = channel.decode() if isinstance(channel, bytes) else channel
        data = message.get("data")
        try:
            payload = json.loads(data.decode() if isinstance(data, bytes) else data)
        except (TypeError, ValueError):
            logger.warning("ignoring a malformed notice on %s: %r", channel, data)
            return
        if channel in self.extra_channels:
            self.extra_channels[channel](payload)
            return
        self.notices += 1
        line = payload.get("line") if isinstance(payload, dict) else None
        targets = [r for r in self.reloaders if r.model_line == line and r.config.version is None]
        if targets:
            self.check_all(targets)

    def _run(self) -> None:
        if self.thread_init is not None:
            self.thread_init()
        pubsub = None
        backoff = 0.1
        next_poll = 0.0
        while not self._stop.is_set():
            try:
                if pubsub is None:
                    pubsub = self.store.subscribe()
                    for channel in self.extra_channels:
                        pubsub.subscribe(channel)
                    next_poll = 0.0  # notices may have been missed while unsubscribed
                    backoff = 0.1
                now = time.monotonic()
                if now >= next_poll:
                    self.check_all()
                    next_poll = time.monotonic() + self.poll_interval_s
                wait = max(0.0, min(self.poll_interval_s, next_poll - time.monotonic()))
                message = pubsub.get_message(timeout=wait)
                if message is not None and message.get("type") == "message":
                    self._handle(message)
            except (RedisError, OSError) as exc:
                for reloader in self.reloaders:
                    reloader.mark_redis(False, repr(exc))
                if self.listener is not None:
                    self.listener.on_redis(False)
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except (RedisError, OSError):
                        pass
                    pubsub = None
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.poll_interval_s)
            except Exception:  # noqa: BLE001 - keep watching whatever happens
                logger.exception("snapshot watcher iteration failed")
                self._stop.wait(self.poll_interval_s)
        if pubsub is not None:
            try:
                pubsub.close()
            except (RedisError, OSError):
                pass
