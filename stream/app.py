"""The faust-streaming app that hosts the join (at-least-once; ``em3 join`` runs it).

faust keeps what it serves well: the app and its worker lifecycle (signals,
graceful stop), a timer that logs the counters, and a web view with the
metrics (``GET /join/metrics``). The hot path is not a faust agent: faust's
per-event stream machinery tops out near 8k events/s on these machines
(``ENVIRONMENT.md``). Instead a faust *service* runs the batched confluent-kafka
loop of :class:`stream.worker.JoinWorker` on a dedicated thread, one micro-batch
per call, so the event loop stays free for the timer and the web view.

The same app runs the *deletion agent*: a real faust agent over the compacted
``{prefix}deletions`` topic, with a faust Table of tombstones (``tombstones``,
changelogged to ``{app id}-tombstones-changelog``). It erases each requested
user's history and pending join state from Redis (:class:`stream.erasure.Eraser`,
in a thread off the event loop, retrying an outage until it passes), records the
tombstone in the table, and a timer completes tombstones once every active model
line has reset the user's rows, writing the completion record (no pseudonym, same
key) to the topic, which the agent records in turn. Redis holds the durable copy
of each tombstone (``GET /v1/users/{id}/deletion`` on the server reads it): on
Tansu, faust's table recovery from the changelog loses entries (measured: 13 of
20 after a restart; ``docs/architecture.md``). ``GET /privacy/tombstones/{tid}``
on the web view answers from the table.

This is the only stream module that imports faust, and it does so lazily.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from em3 import codec
from em3.config import KafkaSettings, Settings
from em3.constraints import Port, PositiveFloat, config_class
from em3.errors import DecodeError
from em3.retry import Backoff
from em3.types import DeletionRequest, Tombstone
from stream.join import JoinConfig
from stream.worker import JoinWorker, WorkerConfig

__all__ = ["AppConfig", "create_app", "run_worker"]

log = logging.getLogger(__name__)


@config_class
class AppConfig:
    """faust-side settings of one join worker process.

    Parameters
    ----------
    web_port : port of the metrics web view; 0 disables the web server.
    web_host : interface the web view binds to.
    metrics_interval_s : how often the timer logs the counters.
    deletions : run the deletion agent (and its table) in this app.
    settle_interval_s : how often the agent's timer completes tombstones.
    """

    web_port: Port = 6066
    web_host: str = "127.0.0.1"
    metrics_interval_s: PositiveFloat = 10.0
    deletions: bool = True
    settle_interval_s: PositiveFloat = 0.5


def _faust_broker_options(kafka: KafkaSettings) -> dict[str, Any]:
    """Map librdkafka security settings onto faust's credentials (its own connection)."""
    import faust

    extra = {k.lower(): str(v) for k, v in kafka.extra.items()}
    protocol = extra.get("security.protocol", "PLAINTEXT").upper()
    options: dict[str, Any] = {}
    if protocol in ("SASL_PLAINTEXT", "SASL_SSL"):
        mechanism = extra.get("sasl.mechanism", "PLAIN").upper()
        ssl_context = None
        if protocol == "SASL_SSL":
            import ssl

            ssl_context = ssl.create_default_context(cafile=extra.get("ssl.ca.location"))
        if mechanism == "PLAIN":
            options["broker_credentials"] = faust.SASLCredentials(
                username=extra.get("sasl.username"), password=extra.get("sasl.password"), ssl_context=ssl_context
            )
        else:
            log.warning("faust's own connection does not map SASL mechanism %s; the join itself does", mechanism)
    elif protocol == "SSL":
        import ssl

        options["broker_credentials"] = ssl.create_default_context(cafile=extra.get("ssl.ca.location"))
    return options


def _stop_worker_process() -> None:
    """Ask faust's Worker to shut down gracefully, as on Ctrl-C (it owns the signals)."""
    os.kill(os.getpid(), signal.SIGTERM)


def create_app(
    settings: Settings,
    join: JoinConfig | None = None,
    worker_config: WorkerConfig | None = None,
    app_config: AppConfig | None = None,
    exit_when_idle_s: float | None = None,
) -> Any:
    """A faust app whose service runs a :class:`JoinWorker`; returns the ``faust.App``.

    The worker is reachable as ``app.join_worker`` (for its ``metrics()``). With
    ``exit_when_idle_s`` the app stops itself once nothing was read for that long
    and no impression waits for a label (finite streams, demos).
    """
    import faust
    from mode import Service

    app_config = app_config or AppConfig()
    worker = JoinWorker(settings, join, worker_config)
    app = faust.App(
        f"{worker.group_id}-app",
        broker=[f"kafka://{hp}" for hp in settings.kafka.bootstrap_servers.split(",")],
        autodiscover=False,
        store="memory://",
        web_enabled=app_config.web_port > 0,
        web_port=app_config.web_port or 6066,
        web_bind=app_config.web_host,
        web_host=app_config.web_host,
        broker_session_timeout=6.0,
        broker_heartbeat_interval=1.0,
        topic_replication_factor=1,
        topic_partitions=1,
        **_faust_broker_options(settings.kafka),
    )
    app.join_worker = worker

    class JoinService(Service):
        """Runs the worker's batch loop on its own thread, one micro-batch per call."""

        def __post_init__(self) -> None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="em3-join")

        async def _call(self, fn: Any, *args: Any) -> Any:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

        async def on_start(self) -> None:
            await self._call(worker.start_or_retry)

        @Service.task
        async def _batches(self) -> None:
            loop_time = asyncio.get_running_loop().time
            last_work = loop_time()
            while not self.should_stop:
                # step() rides out Redis and broker outages (backoff, reload from the
                # checkpoint) and dead-letters bad records; it does not raise.
                read = await self._call(worker.step)
                if read or not worker.partitions:
                    last_work = loop_time()
                elif (exit_when_idle_s is not None and loop_time() - last_work > exit_when_idle_s
                      and worker.pending == 0):
                    log.info("nothing read for %.1f s and nothing pending: stopping", exit_when_idle_s)
                    _stop_worker_process()
                    return

        async def on_stop(self) -> None:
            await self._call(worker.close)
            self._executor.shutdown(wait=True)

    app.service(JoinService)
    if app_config.deletions:
        _add_deletion_agent(app, settings, app_config)

    @app.timer(interval=app_config.metrics_interval_s)
    async def _log_metrics() -> None:
        worker._log_counters()

    @app.page("/join/metrics")
    async def _metrics(web: Any, request: Any) -> Any:
        metrics = worker.metrics()
        eraser = getattr(app, "eraser", None)
        if eraser is not None:
            metrics.update({f"deletions.{k}": v for k, v in eraser.counters.items()})
        return web.json(metrics)

    @app.page("/metrics")
    async def _prometheus(web: Any, request: Any) -> Any:
        return web.text(prometheus_text(worker.metrics()),
                        content_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def _add_deletion_agent(app: Any, settings: Settings, app_config: AppConfig) -> None:
    """The deletion agent, its tombstone table, the settling timer and the table's
    web view (see the module docstring)."""
    from stream.erasure import Eraser
    from stream.kafka import dead_letter_headers

    eraser = Eraser(settings)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="em3-erase")
    eraser.counters.update(bad_records=0, erase_failures=0)
    topic = app.topic(settings.topics.deletions, key_type=bytes, value_type=bytes, key_serializer="raw",
                      value_serializer="raw", partitions=1, compacting=True)
    dead_letter = app.topic(settings.topics.dead_letter, key_type=bytes, value_type=bytes, key_serializer="raw",
                            value_serializer="raw")
    # use_partitioner: written from a batch (stream.take), outside one event's context.
    tombstones = app.Table("tombstones", default=None, partitions=1, use_partitioner=True)
    app.eraser, app.tombstones = eraser, tombstones

    async def off_loop(fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    async def until_done(fn: Any, *args: Any) -> Any:
        # A Redis outage must not lose a request: the batch is acknowledged (its
        # offset committed) only once erased, so retry until it is.
        backoff = Backoff(0.5, 30.0)
        while True:
            try:
                return await off_loop(fn, *args)
            except Exception as exc:  # noqa: BLE001 - an outage: wait and retry
                eraser.counters["erase_failures"] += 1
                delay = backoff.next()
                log.warning("erasure failed (%r); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)

    @app.agent(topic, name=f"{app.conf.id}-erase-users")
    async def erase_users(stream: Any) -> None:
        async for values in stream.take(100, within=0.2):
            requests: list[DeletionRequest] = []
            for value in values:
                if not value:
                    continue  # a Kafka null record (compaction tombstone): nothing to do
                try:
                    record = codec.decode_deletion_record(value)
                except DecodeError as exc:
                    eraser.counters["bad_records"] += 1
                    log.warning("undecodable deletion record dead-lettered: %s", exc)
                    await dead_letter.send(value=bytes(value[:65536]), headers=dead_letter_headers(
                        exc.reason, exc.detail, settings.topics.deletions, -1, -1))
                    continue
                if isinstance(record, Tombstone):
                    tombstones[record.tombstone_id] = codec.to_dict(record)
                else:
                    requests.append(record)
            if requests:
                for tomb in await until_done(eraser.erase, requests):
                    tombstones[tomb.tombstone_id] = codec.to_dict(tomb)

    def owns_topic() -> bool:
        try:
            return any(tp.topic == settings.topics.deletions for tp in app.consumer.assignment())
        except Exception:  # noqa: BLE001 - not started yet
            return False

    @app.timer(interval=app_config.settle_interval_s)
    async def _settle() -> None:
        if not owns_topic():  # one worker of the group settles: the one that owns the requests
            return
        try:
            completed = await off_loop(eraser.settle)
        except Exception as exc:  # noqa: BLE001 - Redis away: the next tick tries again
            log.warning("settling tombstones failed: %r", exc)
            return
        for tomb in completed:
            await topic.send(key=tomb.tombstone_id.encode(), value=codec.encode(tomb))

    @app.page("/privacy/tombstones/{tid}")
    async def _tombstone(web: Any, request: Any, tid: str) -> Any:
        value = tombstones.get(tid)
        if value is None:
            return web.json({"error": "not_found"}, status=404)
        return web.json(value)


#: Join counters that only grow (Prometheus counters); every other number is a gauge.
_COUNTERS = ("events_in", "impressions_in", "clicks_in", "conversions_in", "samples_out", "positive", "negative",
             "correction", "conversion", "late_conversion",
             "dead_letters", "batches", "checkpoints", "fenced", "batch_failures", "recoveries", "offset_resets",
             "quarantined")


def prometheus_text(metrics: dict[str, Any], prefix: str = "em3_join_") -> str:
    """The numeric join figures in Prometheus' text format (for ``GET /metrics``),
    through prometheus_client: counters and gauges with HELP and TYPE lines, and the
    dead letters by reason as one labelled counter.

    >>> text = prometheus_text({"events_in": 3, "partitions": [0], "watermark_min": None,
    ...                         "dead_letter.bad_json": 2})
    >>> for line in text.splitlines():
    ...     if "events_in" in line or "reason" in line:
    ...         print(line)
    # HELP em3_join_events_in_total join counter events_in
    # TYPE em3_join_events_in_total counter
    em3_join_events_in_total 3.0
    # HELP em3_join_dead_letters_by_reason_total dead letters by reason
    # TYPE em3_join_dead_letters_by_reason_total counter
    em3_join_dead_letters_by_reason_total{reason="bad_json"} 2.0
    """
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    class _Snapshot:
        def collect(self):
            by_reason = CounterMetricFamily(f"{prefix}dead_letters_by_reason", "dead letters by reason",
                                            labels=["reason"])
            for name, value in sorted(metrics.items()):
                if name.startswith("dead_letter."):
                    by_reason.add_metric([name.split(".", 1)[1]], float(value))
                    continue
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                if name in _COUNTERS:
                    yield CounterMetricFamily(f"{prefix}{name}", f"join counter {name}", value=float(value))
                else:
                    yield GaugeMetricFamily(f"{prefix}{name}", f"join gauge {name}", value=float(value))
            yield by_reason

    registry = CollectorRegistry()
    registry.register(_Snapshot())
    return generate_latest(registry).decode()


def run_worker(
    settings: Settings,
    join: JoinConfig | None = None,
    worker_config: WorkerConfig | None = None,
    app_config: AppConfig | None = None,
    loglevel: str = "info",
    exit_when_idle_s: float | None = None,
) -> int:
    """Run one join worker process under faust's ``Worker`` until SIGTERM/SIGINT; returns
    the exit code (1 if the batch loop failed)."""
    import faust

    from stream.worker import tune_gc

    tune_gc()
    app = create_app(settings, join, worker_config, app_config, exit_when_idle_s)
    app._em3_failed = False
    worker = faust.Worker(app, loglevel=loglevel, quiet=True, redirect_stdouts=False)
    code = 0
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0
    if app._em3_failed or app.crashed:
        log.error("join worker stopped on a failure: %r", app.crash_reason)
        return code or 1
    return code
