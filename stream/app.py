"""The faust-streaming app that hosts the join (at-least-once; ``em3 join`` runs it).

faust keeps what it serves well: the app and its worker lifecycle (signals,
graceful stop), a timer that logs the counters, and a web view with the
metrics (``GET /join/metrics``). The hot path is not a faust agent: faust's
per-event stream machinery tops out near 8k events/s on these machines
(``ENVIRONMENT.md``). Instead a faust *service* runs the batched confluent-kafka
loop of :class:`stream.worker.JoinWorker` on a dedicated thread, one micro-batch
per call, so the event loop stays free for the timer and the web view.

This is the only stream module that imports faust, and it does so lazily.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from em3.config import KafkaSettings, Settings
from stream.join import JoinConfig
from stream.worker import JoinWorker, WorkerConfig

__all__ = ["AppConfig", "create_app", "run_worker"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AppConfig:
    """faust-side settings of one join worker process.

    Parameters
    ----------
    web_port : port of the metrics web view; 0 disables the web server.
    web_host : interface the web view binds to.
    metrics_interval_s : how often the timer logs the counters; > 0.
    """

    web_port: int = 6066
    web_host: str = "127.0.0.1"
    metrics_interval_s: float = 10.0

    def __post_init__(self) -> None:
        if not 0 <= self.web_port < 65536:
            raise ValueError(f"web_port must be in [0, 65535], but {self.web_port!r} is given")
        if not self.metrics_interval_s > 0:
            raise ValueError(f"metrics_interval_s must be > 0, but {self.metrics_interval_s!r} is given")


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

    @app.timer(interval=app_config.metrics_interval_s)
    async def _log_metrics() -> None:
        worker._log_counters()

    @app.page("/join/metrics")
    async def _metrics(web: Any, request: Any) -> Any:
        return web.json(worker.metrics())

    @app.page("/metrics")
    async def _prometheus(web: Any, request: Any) -> Any:
        return web.text(prometheus_text(worker.metrics()),
                        content_type="text/plain; version=0.0.4; charset=utf-8")

    return app


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
