"""The serving runtime: every moving part of one server, wired together, no HTTP.

:class:`ServingRuntime` owns the reloaders (one per model line or fixed snapshot
that an experiment arm serves), the snapshot watcher, the ranking service, the
impression logger and the metrics. :mod:`serving.app` puts HTTP in front of it;
tests and benchmarks can call it directly.

Build one from settings (Redis, Kafka) with :meth:`ServingRuntime.from_settings`,
or from parts (in-memory stores, a fake producer) with the constructor.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence, get_args

import torch

from em3 import codec
from em3.config import Settings
from em3.constraints import Annotated, Field, Int, Literal, PositiveFloat, PositiveInt, config_class
from em3.privacy import Pseudonymizer, deletion_records, tombstone_id
from em3.stores import ContentSource, HistorySource
from em3.types import Click, Conversion, Impression, ItemContent, Tombstone
from em3.experiment import ArmConfig, ExperimentConfig
from serving.ab import BaselineResult, PopularityRanker, RandomRanker
from serving.logger import ImpressionLogger, ImpressionLoggerConfig
from serving.metrics import ServingMetrics
from serving.ranking import RankingConfig, RankingService
from serving.reloader import ReloaderConfig, SnapshotReloader, SnapshotWatcher
from serving.scoring import ModelLoader

__all__ = ["ServerConfig", "ServingRuntime", "NotReady", "Unavailable", "RankedResponse"]

logger = logging.getLogger(__name__)


class NotReady(RuntimeError):
    """The arm that serves this user has no snapshot loaded yet (HTTP 503)."""


class Unavailable(RuntimeError):
    """A dependency (Redis, the Kafka producer) cannot take the request now (HTTP 503)."""


RankExecutor = Literal["loop", "threads"]
RANK_EXECUTORS: tuple[str, ...] = get_args(RankExecutor)
_STATUS_ORDER = ["requested", "erasing", "stores_erased", "complete"]


@config_class
class ServerConfig:
    """Settings of one server process.

    Parameters
    ----------
    experiment : ExperimentConfig
        Arms and traffic split (one ``line`` arm for ``--model-line``).
    ranking : RankingConfig
    poll_interval_s : float
        Snapshot polling fallback beside pub/sub.
    max_body_bytes : int
        Larger request bodies get 413.
    impression_buffer : int
        Impressions held in memory before new ones are dropped.
    count_impressions : bool
        Feed the popularity counter of impressions from the logger thread.
    random_seed : int
        Seed of the random arm (with the request id).
    request_threads : int, optional
        Torch intra-op threads of each request thread (``None``: torch's default,
        the core count).
    precompute_threads : int, optional
        Torch intra-op threads of the watcher thread that loads versions and
        precomputes item rows (``None``: torch's default).

    precompute_nice : int
        Niceness added to the watcher thread (Linux schedules threads
        separately): a swap's precompute yields the CPU to requests when both
        want it (5 gives requests about three quarters of a contended core). 0
        leaves the priority alone.
    rank_executor : {"loop", "threads"}
        Where ``POST /v1/rank`` runs. ``loop`` (default): in the event-loop thread
        itself, one request at a time per process; scale out with one process per
        core. ``threads``: in a worker-thread pool, so requests overlap inside one
        process (torch releases the GIL), at the price of two cross-thread
        wake-ups per request (measured at about 1 ms of a 7 ms request on this
        2-core VM: ``benchmarks/serving.py``, see docs/results.md).
    max_future_s : float
        ``served_at``/``clicked_at`` further ahead of this server's clock get 422.
    store_timeout_s : float
        Longest wait for Redis on the request path (history, counters); on a
        timeout the request ranks without history and a breaker skips Redis for
        a cool-down (``/readyz`` says ``degraded``).
    api_key : str
        Key that ``POST /v1/click``, ``/v1/conversion`` and ``/v1/items`` must send;
        empty: the settings' ``api_key`` (``EM3_API_KEY``).
    trusted_network : bool
        Without any API key, accept writes anyway (a server only reachable from a
        trusted network); otherwise keyless writes get 401.

    Torch keeps one thread count per OS thread and takes the last value set as
    the default for new threads, so an in-process server (``serve_in_thread``)
    also changes the default for threads its host starts later; pass ``None``
    for both to leave torch alone.

    One thread each by default: requests run concurrently in a thread pool and a
    swap's precompute runs beside them, so OpenMP teams of several threads
    oversubscribe the cores; on a shared 2-core machine a team member that is
    descheduled stalls every barrier of the others (measured: scoring 55 ms mean
    with teams of 2 against 6 ms with one thread each).
    """

    experiment: ExperimentConfig
    ranking: RankingConfig = field(default_factory=RankingConfig)
    poll_interval_s: PositiveFloat = 1.0
    max_body_bytes: PositiveInt = 4 * 1024 * 1024
    impression_buffer: PositiveInt = 100_000
    count_impressions: bool = True
    random_seed: int = 0
    request_threads: PositiveInt | None = 1
    precompute_threads: PositiveInt | None = 1
    precompute_nice: Annotated[Int, Field(ge=0, le=19)] = 5
    rank_executor: RankExecutor = "loop"
    max_future_s: PositiveFloat = 300.0
    store_timeout_s: PositiveFloat = 0.3
    api_key: str = field(default="", repr=False)
    trusted_network: bool = False

    def sources(self) -> list[ReloaderConfig]:
        """One reloader per distinct model source among the arms."""
        seen: dict[str, ReloaderConfig] = {}
        objectives: dict[str, list[str]] = {}
        for arm in self.experiment.arms:
            if arm.is_model:
                objectives.setdefault(arm.source_key, [])
                if arm.objective not in objectives[arm.source_key]:
                    objectives[arm.source_key].append(arm.objective)
                seen.setdefault(arm.source_key, ReloaderConfig(arm.model_line, arm.version))
        return [dataclasses.replace(src, objectives=tuple(objectives[key])) for key, src in seen.items()]


_DEFAULT_TORCH_THREADS = torch.get_num_threads()


def _set_torch_threads(n: int | None) -> None:
    if n is not None:
        torch.set_num_threads(n)


def _init_precompute_thread(config: ServerConfig) -> None:
    """Runs first in the watcher thread: its torch threads and CPU priority."""
    _set_torch_threads(config.precompute_threads)
    if config.precompute_nice and hasattr(os, "setpriority"):
        try:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + config.precompute_nice)
        except OSError as exc:  # not permitted or not supported: run at normal priority
            logger.warning("could not lower the precompute thread's priority: %r", exc)


class _CountBuffer:
    """Adds up impression counts in memory and writes them to the popularity store
    at most every ``every_s`` seconds (one pipeline per flush, not one per request).
    Runs in the impression logger's thread only."""

    def __init__(self, store: Any, kind: str, every_s: float = 1.0) -> None:
        self.store = store
        self.kind = kind
        self.every_s = every_s
        self.counts: Counter[str] = Counter()
        self.last = time.monotonic()

    def add(self, batch: Sequence[Impression]) -> None:
        self.counts.update(imp.item_id for imp in batch)
        if time.monotonic() - self.last < self.every_s:
            return
        counts, self.counts, self.last = self.counts, Counter(), time.monotonic()
        by_amount: dict[int, list[str]] = {}
        for item_id, n in counts.items():
            by_amount.setdefault(n, []).append(item_id)
        for amount, ids in by_amount.items():
            self.store.incr_many(self.kind, ids, float(amount))


@dataclass(frozen=True)
class RankedResponse:
    """What /v1/rank answers (see :meth:`to_dict`)."""

    request_id: str
    arm: str
    model_line: str
    model_version: int
    items: list[tuple[str, float, str, float]]  # item_id, score, impression_id, propensity
    unknown_item_ids: list[str]
    timings: Mapping[str, float]
    #: One per item when the request asked for explanations (None each for an arm
    #: without a model that explains); None when it did not ask.
    explanations: list[dict | None] | None = None

    def to_dict(self) -> dict[str, Any]:
        items = [
            {"item_id": i, "score": s, "position": pos, "impression_id": imp, "propensity": p}
            for pos, (i, s, imp, p) in enumerate(self.items)
        ]
        if self.explanations is not None:
            for item, explanation in zip(items, self.explanations):
                item["explanation"] = explanation
        return {
            "request_id": self.request_id,
            "arm": self.arm,
            "model_line": self.model_line,
            "model_version": self.model_version,
            "items": items,
            "unknown_item_ids": self.unknown_item_ids,
        }


class ServingRuntime:
    """One server's state and behaviour, independent of HTTP.

    Parameters
    ----------
    config : ServerConfig
    loader : ModelLoader
        Builds models from snapshots (:class:`serving.scoring.EM3Loader`).
    snapshot_store : RedisSnapshotStore-like
    content, history : ContentSource, HistorySource
    popularity : RedisPopularityStore-like, optional
        Needed by popularity arms; fed by clicks and impressions.
    producer : confluent_kafka.Producer-like, optional
        Impressions and clicks go through it; without one nothing is produced.
    settings : Settings, optional
        Topic names; Redis prefix for item-update notices.
    redis_client : optional
        For item-update notices and the registered-items check.
    pseudonymizer : Pseudonymizer, optional
        Turns the raw user IDs of requests into pseudonyms before anything else
        sees them (default: from ``settings``; refused without a key unless raw
        IDs are explicitly allowed).
    tombstones : RedisPrivacyStore-like, optional
        Where deletion requests are recorded and their status read
        (``DELETE /v1/users/{id}``, ``GET /v1/users/{id}/deletion``).
    """

    def __init__(
        self,
        config: ServerConfig,
        loader: ModelLoader,
        snapshot_store: Any,
        content: ContentSource,
        history: HistorySource,
        *,
        popularity: Any = None,
        producer: Any = None,
        settings: Settings | None = None,
        redis_client: Any = None,
        pseudonymizer: Pseudonymizer | None = None,
        tombstones: Any = None,
    ) -> None:
        self.config = config
        self.settings = settings
        #: Raw user ID -> pseudonym, applied at the top of every request (the edge).
        self.pseudonymize = pseudonymizer if pseudonymizer is not None else Pseudonymizer.from_settings(settings)
        self.tombstones = tombstones
        self._migrated: set[str] = set()
        #: The key writes must send (``ServerConfig.api_key``, else the settings').
        self.api_key = config.api_key or getattr(settings, "api_key", "") or ""
        self.content = content
        self.popularity = popularity
        self.producer = producer
        self.redis_client = redis_client
        self.owns_clients = False  # from_settings made the Redis client and producer: stop() closes them
        self.metrics = ServingMetrics()
        self.ranking = RankingService(content, history, config.ranking)
        self.reloaders: dict[str, SnapshotReloader] = {
            src.key: SnapshotReloader(snapshot_store, loader, self.ranking.prepare, src, self.metrics)
            for src in config.sources()
        }
        extra = {}
        if redis_client is not None and settings is not None:
            from em3.redis_stores import item_updates_channel

            extra[item_updates_channel(settings.redis_prefix)] = self._on_item_notice
        self.watcher = SnapshotWatcher(
            snapshot_store, list(self.reloaders.values()), config.poll_interval_s, extra, self.metrics,
            thread_init=lambda: _init_precompute_thread(config),
        )
        self._thread_state = threading.local()
        self.logger: ImpressionLogger | None = None
        if producer is not None and settings is not None:
            hook = None
            if popularity is not None and config.count_impressions:
                hook = _CountBuffer(popularity, "impressions").add
            self.logger = ImpressionLogger(
                producer, ImpressionLoggerConfig(settings.topics.impressions, buffer_size=config.impression_buffer),
                on_batch=hook,
            )
        self.random = RandomRanker(config.random_seed)
        # Request ids: a random per-process prefix plus a counter; unique across
        # servers without a urandom call per request (measured at 0.5 ms here).
        self._id_prefix = os.urandom(6).hex()
        self._ids = itertools.count()
        self.baseline_errors = 0
        self.metrics.attach(self._scrape)
        self.started_at = time.time()

    # -- construction from settings ----------------------------------------------------
    @classmethod
    def from_settings(cls, settings: Settings, config: ServerConfig, loader: ModelLoader) -> "ServingRuntime":
        """Redis stores and a Kafka producer for ``settings``."""
        from em3.redis_stores import (
            RedisContentStore, RedisHistoryStore, RedisPopularityStore, RedisPrivacyStore, RedisSnapshotStore,
            connect,
        )
        from serving.logger import producer_settings
        from stream.kafka import make_producer

        pseudonymizer = Pseudonymizer.from_settings(settings)  # refuse before connecting anything
        # Two clients: the request path (history, counters) waits at most
        # store_timeout_s for Redis, so an outage costs a request milliseconds, not
        # seconds (and the breakers in RankingService skip Redis while it is down);
        # snapshots and content (the watcher's bulk reads) keep the longer default.
        client = connect(settings.redis)
        fast = connect(settings.redis, socket_timeout=config.store_timeout_s,
                       socket_connect_timeout=config.store_timeout_s)
        prefix = settings.redis_prefix
        retention = settings.retention
        runtime = cls(
            config, loader, RedisSnapshotStore(client, prefix, signing_key=settings.snapshot_key),
            RedisContentStore(client, prefix), RedisHistoryStore(fast, prefix, ttl_s=retention.history_ttl_s),
            popularity=RedisPopularityStore(fast, prefix, ttl_s=retention.counter_ttl_s,
                                            buckets=retention.counter_buckets),
            producer=make_producer(settings.kafka, delivery_report_only_error=True,
                                   **producer_settings(settings.kafka.idempotence)),
            settings=settings, redis_client=fast,
            tombstones=RedisPrivacyStore(client, prefix, retention.tombstone_ttl_s), pseudonymizer=pseudonymizer,
        )
        runtime.owns_clients = True
        runtime._bulk_client = client
        return runtime

    # -- lifecycle ----------------------------------------------------------------------
    def start(self, wait_ready_s: float = 0.0) -> "ServingRuntime":
        """Start the logger and the watcher; optionally wait for readiness (no error if not)."""
        if self.logger is not None:
            self.logger.start()
        self.watcher.start()
        deadline = time.monotonic() + wait_ready_s
        while wait_ready_s and not self.is_ready() and time.monotonic() < deadline:
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        """Stop the watcher, drain the impression logger; close owned clients."""
        self.watcher.stop()
        if self.logger is not None:
            self.logger.close()
        if not self.owns_clients:
            return
        self.owns_clients = False
        for name, client in (("producer", self.producer), ("redis", self.redis_client),
                             ("redis", getattr(self, "_bulk_client", None))):
            close = getattr(client, "close", None)
            if close is None:
                continue
            try:
                close()
            except Exception as exc:  # noqa: BLE001 - closing is best effort
                logger.warning("closing the %s client failed: %r", name, exc)

    # -- readiness ---------------------------------------------------------------------
    def is_ready(self) -> bool:
        return all(r.current is not None for r in self.reloaders.values())

    def readiness(self) -> dict[str, Any]:
        sources = {key: r.status().to_dict() for key, r in self.reloaders.items()}
        # Degraded: Redis unreachable, or the line points at a version this server
        # refused. A pointer ahead of the served version while it loads is not.
        degraded = any(
            (not s["redis_ok"]) or (s["pointer"] is not None and s["pointer"] in s["bad_versions"])
            for s in sources.values()
        )
        stores = {"history": not self.ranking.history_breaker.open, "content": not self.ranking.content_breaker.open}
        return {
            "ready": self.is_ready(),
            "degraded": degraded or not all(stores.values()),
            "stores_ok": stores,
            "experiment": self.config.experiment.name,
            "arms": [a.name for a in self.config.experiment.arms],
            "sources": sources,
        }

    def _scrape(self) -> dict[str, Any]:
        sources = []
        for r in self.reloaders.values():
            cur = r.current
            sources.append((r.status(), 0 if cur is None else len(cur.cache)))
        return {
            "logger": None if self.logger is None else self.logger.stats(),
            "sources": sources,
            "store_errors": {
                "history": self.ranking.history_errors,
                "content": self.ranking.content_errors,
                "baseline": self.baseline_errors,
            },
            "explain_errors": self.ranking.explain_errors,
            "fresh_promotions": self.ranking.fresh_promotions,
        }

    # -- requests ------------------------------------------------------------------------
    def rank(
        self, user_id: str, item_ids: Sequence[str], context: Mapping[str, str] | None = None, k: int | None = None,
        *, served_at: float | None = None, explain: bool = False,
    ) -> RankedResponse:
        """Rank for ``user_id`` (the raw ID: it is pseudonymised first) with the arm its
        pseudonym is bucketed into, and log impressions.

        ``served_at`` stamps the impressions (event time; default now). ``explain``
        adds an explanation per item (:meth:`serving.ranking.RankingService.explain`;
        None each for a baseline arm); the impressions are logged as for any
        request, since the items are served. Raises
        :class:`NotReady` if the arm's snapshot is not loaded yet, and
        :class:`Unavailable` while the impression log is full.
        """
        user_id = self._user(user_id)
        if not getattr(self._thread_state, "ready", False):
            # Torch reads its thread count per OS thread; a watcher thread that set
            # its own must not decide what request threads use.
            _set_torch_threads(self.config.request_threads or _DEFAULT_TORCH_THREADS)
            self._thread_state.ready = True
        context = dict(context or {})
        k = len(item_ids) if k is None else min(k, len(item_ids))
        if self.logger is not None and not self.logger.reserve(k):
            # Back-pressure: never serve impressions that cannot be logged.
            raise Unavailable("the impression log is full (Kafka away or slow); retry shortly")
        try:
            response, impressions = self._rank_unlogged(user_id, item_ids, context, k, served_at, explain)
        except BaseException:
            if self.logger is not None:
                self.logger.release(k)
            raise
        if self.logger is not None:
            # Hand back the whole reservation and buffer: ``impressions`` may be fewer than k.
            self.logger.log_many(impressions, reserved=k)
        return response

    def _rank_unlogged(self, user_id: str, item_ids: Sequence[str], context: dict, k: int,
                       served_at: float | None, explain: bool) -> tuple[RankedResponse, list[Impression]]:
        """:meth:`rank` without the logging: the response and the impressions to log."""
        arm = self.config.experiment.arm_for(user_id)
        request_id = f"{self._id_prefix}{next(self._ids):08x}"
        served_at = time.time() if served_at is None else served_at
        if arm.is_model:
            state = self.reloaders[arm.source_key].current
            if state is None:
                raise NotReady(f"arm {arm.name!r}: no snapshot of {arm.source_key!r} loaded yet")
            result = self.ranking.rank(state, user_id, item_ids, context, k, explain=explain, objective=arm.objective)
            ranked = [(r.item_id, r.score, 1.0) for r in result.items]
            unknown = result.unknown_item_ids
            line, version, timings = state.model_line, state.version, result.timings
            explanations = result.explanations
            self.metrics.model_seconds.observe(timings["model_s"])
        else:
            ranked, unknown = self._rank_baseline(arm, item_ids, k, request_id)
            line, version, timings = arm.logged_line, 0, {}
            explanations = [None] * len(ranked) if explain else None
        items = [(item_id, score, f"{request_id}-{pos}", p) for pos, (item_id, score, p) in enumerate(ranked)]
        impressions = [
            Impression(imp_id, request_id, user_id, item_id, pos, served_at, line, version, arm.name, p, context)
            for pos, (item_id, _, imp_id, p) in enumerate(items)
        ] if self.logger is not None else []
        self.metrics.arm_requests.labels(arm.name).inc()
        if unknown:
            self.metrics.unknown_candidates.inc(len(unknown))
        return RankedResponse(request_id, arm.name, line, version, items, unknown, timings, explanations), impressions

    def _rank_baseline(
        self, arm: ArmConfig, item_ids: Sequence[str], k: int, request_id: str
    ) -> tuple[list[tuple[str, float, float]], list[str]]:
        if arm.kind == "popularity":
            store = self.popularity
            try:
                if store is None:
                    raise Unavailable("no popularity store configured")
                result = PopularityRanker(store, arm.popularity).rank(item_ids, k)
            except Exception as exc:  # noqa: BLE001 - Redis down: candidate order, counted
                self.baseline_errors += 1
                logger.warning("popularity lookup failed (%r); serving candidate order", exc)
                result = BaselineResult(list(item_ids[:k]), [0.0] * k, [1.0] * k)
        else:
            result = self.random.rank(item_ids, k, request_id)
        return list(zip(result.item_ids, result.scores, result.propensities)), self._unregistered(item_ids)

    def _unregistered(self, item_ids: Sequence[str]) -> list[str]:
        try:
            if self.redis_client is not None and self.settings is not None:
                from em3.redis_stores import registered_mask

                mask = registered_mask(self.redis_client, self.settings.redis_prefix, item_ids)
            else:
                mask = [c is not None for c in self.content.get_many(item_ids)]
        except Exception as exc:  # noqa: BLE001 - reporting unknowns is best effort
            self.baseline_errors += 1
            logger.warning("registered-items check failed: %r", exc)
            return []
        return [i for i, ok in zip(item_ids, mask) if not ok]

    def _user(self, raw: str) -> str:
        """The pseudonym of ``raw``; during a key rotation, the user's history moves to
        the new pseudonym the first time this process sees the user."""
        user = self.pseudonymize(raw)
        if self.pseudonymize.rotating and user not in self._migrated:
            migrate = getattr(self.ranking.history, "migrate", None)
            if migrate is not None:
                try:
                    migrate(self.pseudonymize.previous(raw), user)
                except Exception as exc:  # noqa: BLE001 - best effort: retried on the next request
                    logger.warning("moving a history to its new pseudonym failed: %r", exc)
                    return user
            if len(self._migrated) > 1_000_000:
                self._migrated.clear()
            self._migrated.add(user)
        return user

    def click(self, click: Click) -> None:
        """Produce ``click`` (with the raw user ID, pseudonymised here) to the clicks topic
        and count it for popularity."""
        if self.producer is None or self.settings is None:
            raise Unavailable("this server has no Kafka producer")
        click = Click(click.impression_id, self._user(click.user_id), click.item_id, click.clicked_at)
        try:
            self.producer.produce(self.settings.topics.clicks, key=click.user_id.encode(), value=codec.encode(click))
        except BufferError as exc:
            raise Unavailable(f"Kafka producer queue is full: {exc}") from None
        self.producer.poll(0)
        self.metrics.clicks.inc()
        if self.popularity is not None:
            try:
                self.popularity.incr_many("clicks", [click.item_id])
            except Exception as exc:  # noqa: BLE001 - the counter is best effort
                self.baseline_errors += 1
                logger.warning("click counter update failed: %r", exc)

    def conversion(self, conversion: Conversion) -> None:
        """Produce ``conversion`` (with the raw user ID, pseudonymised here, as clicks are)
        to the conversions topic (the join attributes it)."""
        if self.producer is None or self.settings is None:
            raise Unavailable("this server has no Kafka producer")
        conversion = Conversion(conversion.impression_id, self._user(conversion.user_id), conversion.item_id,
                                conversion.converted_at, conversion.value)
        try:
            self.producer.produce(self.settings.topics.conversions, key=conversion.user_id.encode(),
                                  value=codec.encode(conversion))
        except BufferError as exc:
            raise Unavailable(f"Kafka producer queue is full: {exc}") from None
        self.producer.poll(0)
        self.metrics.conversions.inc()

    def request_deletion(self, raw_user_id: str, request_id: str = "", timeout_s: float = 5.0) -> dict[str, Any]:
        """Write a deletion request for ``raw_user_id`` (each of its pseudonyms) to the
        deletions topic and record it as ``requested``; returns what ``DELETE
        /v1/users/{id}`` answers. Raises :class:`Unavailable` when the broker has not
        acknowledged the request within ``timeout_s`` (it stays queued; retrying is safe)."""
        if self.producer is None or self.settings is None:
            raise Unavailable("this server has no Kafka producer")
        requested_at = time.time()
        records = deletion_records(self.pseudonymize.all(raw_user_id), requested_at, request_id)
        errors: list[str] = []

        def delivered(err: Any, msg: Any) -> None:  # the server's producer reports failures only
            if err is not None:
                errors.append(str(err))

        try:
            for key, value, _ in records:
                self.producer.produce(self.settings.topics.deletions, key=key, value=value, on_delivery=delivered)
        except BufferError as exc:
            raise Unavailable(f"Kafka producer queue is full: {exc}") from None
        remaining = self.producer.flush(timeout_s)
        if errors or remaining:
            raise Unavailable(f"the broker has not acknowledged the deletion request "
                              f"({errors[:1] or f'{remaining} queued after {timeout_s} s'}); retrying is safe")
        if self.tombstones is not None:
            for _, _, tomb in records:
                try:
                    self.tombstones.requested(tomb)
                except Exception as exc:  # noqa: BLE001 - the agent records it anyway
                    logger.warning("recording a deletion request failed: %r", exc)
        self.metrics.deletions.inc()
        return {"status": "requested", "requested_at": requested_at}

    def deletion_status(self, raw_user_id: str) -> dict[str, Any] | None:
        """What is known of the deletion of ``raw_user_id`` (None: nothing). With a key
        rotation under way both pseudonyms are looked up, and the deletion is complete
        once both are."""
        if self.tombstones is None:
            raise Unavailable("this server has no tombstone store")
        try:
            tombs = [self.tombstones.status(tombstone_id(p)) for p in self.pseudonymize.all(raw_user_id)]
        except Exception as exc:  # noqa: BLE001 - Redis away
            raise Unavailable(f"tombstone store unavailable: {exc!r}") from None
        known: list[Tombstone] = [t for t in tombs if t is not None]
        if not known:
            return None
        done = all(t.status == "complete" for t in known)
        first = known[0]
        return {
            "status": "complete" if done else min((t.status for t in known), key=_STATUS_ORDER.index),
            "requested_at": min(t.requested_at for t in known),
            "stores_erased_at": first.stores_erased_at,
            "completed_at": max(t.completed_at or 0.0 for t in known) if done else None,
            "lines_reset": first.lines_reset,
            "lines_expected": first.lines_expected,
            "erased": first.erased,
        }

    def put_items(self, items: Sequence[ItemContent]) -> None:
        """Register or update content; drop cached rows here and tell other servers."""
        ids = [item.item_id for item in items]
        try:
            self.content.put_many(items)
        except Exception as exc:  # noqa: BLE001 - surfaced as 503
            raise Unavailable(f"content store unavailable: {exc!r}") from None
        self.ranking.invalidate(ids)
        self.metrics.items_registered.inc(len(ids))
        if self.redis_client is not None and self.settings is not None:
            from em3.redis_stores import publish_item_updates

            try:
                publish_item_updates(self.redis_client, self.settings.redis_prefix, ids)
            except Exception as exc:  # noqa: BLE001 - other servers catch up by TTL-free rebuild on next swap
                logger.warning("item-update notice failed: %r", exc)

    def _on_item_notice(self, payload: Any) -> None:
        if isinstance(payload, list):
            self.ranking.invalidate([str(i) for i in payload])
