"""Stream join throughput and exactness on the local broker.

Starts Tansu and Redis (:class:`em3.app.services.LocalServices`), produces a seeded
synthetic stream (default 200k impressions, ~10% clicked, log-normal click
delays with a tail past the window) with confluent-kafka, then:

1. ``raw_consume_events_per_s``: a plain confluent-kafka group consumer reads
   both input topics (same run, same topics), first record to last;
2. runs ``em3 join`` (the faust app with its batched hot path) as a subprocess
   (``--workers N`` processes), and reads the samples topic until every
   impression has its final label(s); with ``--restart`` the whole join
   process group is SIGKILLed once mid-stream and started again.

``join_events_per_s`` = input events / (time from the moment every partition has
an owner, i.e. the join's first batch, to the last label final); faust start-up
and the first group join are not in it, the restart's downtime is (``--restart``;
``recovery_s``: from the SIGKILL until the new process owns every partition again,
which includes the dead member's session timeout and loading state from Redis).
``lost``: impressions with no first label; ``duplicated``: impressions with a
label that the dedup by sample id cannot remove (two first labels or two
corrections that differ); ``redelivered``: exact re-emissions the dedup
dropped; ``mismatched``: labels that differ from the reference
(:func:`stream.join.expected_labels`). ``rss_mb``: peak RSS of the join
worker process(es) together.

Usage::

    python benchmarks/join.py                      # 200k impressions, 1 worker
    python benchmarks/join.py --restart            # SIGKILL + restart mid-stream
    python benchmarks/join.py --workers 2

The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from em3.config import KafkaSettings, RedisSettings, Settings, TopicNames  # noqa: E402
from em3.redis_stores import connect  # noqa: E402
from em3.app.services import LocalServices  # noqa: E402
from stream.join import JoinConfig, expected_labels  # noqa: E402
from stream.kafka import ensure_topics, make_consumer, wait_for_assignment  # noqa: E402
from stream.synthetic import StreamSpec, arrival_order, generate_stream, produce_stream  # noqa: E402

log = logging.getLogger("benchmarks.join")

JOIN = JoinConfig(window_s=60.0, allowed_lateness_s=5.0, max_correction_delay_s=600.0)


@dataclass(frozen=True)
class _Label:
    impression_id: str
    label: int
    correction: bool
    sample_id: str


def _light(value: bytes) -> _Label:
    """The fields the check needs, without building the whole Sample (this process
    shares the CPU with the join; ``tests/`` check full decoding)."""
    obj = json.loads(value)
    return _Label(obj["impression"]["impression_id"], obj["label"], obj["correction"], obj["sample_id"])


def raw_consume(settings: Settings, expected: int, timeout_s: float = 120.0) -> float:
    """Events/s of a plain group consumer over both input topics, first record to last."""
    consumer = make_consumer(settings.kafka, f"bench-raw-{time.time_ns()}")
    consumer.subscribe([settings.topics.impressions, settings.topics.clicks])
    wait_for_assignment(consumer)
    n, first, last = 0, None, None
    deadline = time.monotonic() + timeout_s
    while n < expected and time.monotonic() < deadline:
        for msg in consumer.consume(num_messages=10000, timeout=0.5):
            if msg.error() is None:
                if first is None:
                    first = time.perf_counter()
                n += 1
                msg.value()
        last = time.perf_counter()
    consumer.close()
    if n < expected:
        raise TimeoutError(f"raw consumer read {n} of {expected} records")
    return n / (last - first)


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _rss_mb(pids: list[int], field: str = "VmHWM") -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


class JoinProcess:
    """``em3 join`` as a subprocess in its own process group."""

    def __init__(self, settings: Settings, workers: int, log_path: Path, verbose: bool = False,
                 positive_timing: str = "window_close") -> None:
        self.argv = [
            sys.executable, "-m", "stream", *(["-v"] if verbose else []), "join", "--workers", str(workers),
            "--window-s", str(JOIN.window_s), "--allowed-lateness-s", str(JOIN.allowed_lateness_s),
            "--positive-timing", positive_timing,
            "--max-correction-delay-s", str(JOIN.max_correction_delay_s),
            "--idle-timeout-s", "0.5", "--idle-advance-rate", "1000000", "--web-port", "0",
            "--bootstrap-servers", settings.kafka.bootstrap_servers, "--redis-url", settings.redis.url,
            "--topic-prefix", settings.topics.prefix, "--redis-prefix", settings.redis_prefix,
        ]
        self.env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.peak_rss_mb = 0.0

    def start(self) -> None:
        log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv, stdout=log_file, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        log_file.close()

    def sample_rss(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            pids = [p for p in _descendants(self.proc.pid)]
            workers = pids[1:] if len(pids) > 1 else pids  # with --workers N the parent only waits
            self.peak_rss_mb = max(self.peak_rss_mb, _rss_mb(workers))

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def run(args: argparse.Namespace) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="bench-join-"))
    with LocalServices(run_dir / "services") as services:
        settings = Settings(
            KafkaSettings(services.info.bootstrap_servers), RedisSettings(services.info.redis_url),
            TopicNames("bench."), "bench:",
        )
        ensure_topics(settings.kafka, settings.topics, partitions=args.partitions)
        spec = StreamSpec(impressions=args.impressions, click_rate=args.click_rate, seed=args.seed)
        impressions, clicks = generate_stream(spec)
        events = len(impressions) + len(clicks)
        t = time.perf_counter()
        produce_stream(settings.kafka, settings.topics, arrival_order(impressions, clicks, spec.jitter_s, spec.seed))
        log.info("produced %d events in %.1f s", events, time.perf_counter() - t)
        reference = expected_labels(impressions, clicks, JOIN)
        want_corrections = sum(1 for _, c in reference.values() if c)

        raw_rate = raw_consume(settings, events)
        log.info("raw confluent-kafka group consume: %.0f events/s", raw_rate)

        join = JoinProcess(settings, args.workers, run_dir / "join.log", args.verbose, args.positive_timing)
        started = time.perf_counter()
        join.start()
        samples = make_consumer(settings.kafka, f"bench-samples-{time.time_ns()}")
        samples.subscribe([settings.topics.samples])
        first_label: dict[str, tuple[str, int]] = {}
        correction: dict[str, tuple[str, int]] = {}
        seen: set[str] = set()
        redelivered = duplicated = 0
        first_sample_at = None
        restarts = 0
        kill_at = int(len(impressions) * args.kill_fraction) if args.restart else None
        deadline = time.monotonic() + args.timeout_s
        last_rss = 0.0
        redis_client = connect(settings.redis)
        epoch_keys = [f"{settings.redis_prefix}join:{settings.topics.prefix}join:{n}:epoch"
                      for n in range(args.partitions)]
        assigned_at = None
        epochs_at_kill = recovered_s = None
        t_kill = 0.0
        while time.monotonic() < deadline:
            if assigned_at is None and redis_client.exists(*epoch_keys) == len(epoch_keys):
                assigned_at = time.perf_counter()  # every partition has an owner: the join starts
            if epochs_at_kill is not None and recovered_s is None:
                now_epochs = redis_client.mget(epoch_keys)
                if all(int(e or 0) > int(k or 0) for e, k in zip(now_epochs, epochs_at_kill)):
                    recovered_s = time.perf_counter() - t_kill  # the new process owns every partition
            for msg in samples.consume(num_messages=10000, timeout=0.2):
                if msg.error() is not None:
                    continue
                if first_sample_at is None:
                    first_sample_at = time.perf_counter()
                s = _light(msg.value())
                iid = s.impression_id
                book = correction if s.correction else first_label
                if s.sample_id in seen:
                    redelivered += 1
                    if book[iid] != (s.sample_id, s.label):
                        duplicated += 1  # same id, different content: dedup cannot fix it
                    continue
                seen.add(s.sample_id)
                if iid in book:
                    duplicated += 1
                book[iid] = (s.sample_id, s.label)
            if time.monotonic() - last_rss > 0.5:
                join.sample_rss()
                last_rss = time.monotonic()
            if kill_at is not None and len(first_label) >= kill_at:
                log.info("SIGKILL the join after %d labels", len(first_label))
                join.sample_rss()
                t_kill = time.perf_counter()
                epochs_at_kill = redis_client.mget(epoch_keys)
                join.kill()
                join.start()
                restarts += 1
                kill_at = None
            if len(first_label) >= len(reference) and len(correction) >= want_corrections:
                break
        done = time.perf_counter()
        join.sample_rss()
        # Read a little longer: late duplicates would show up here.
        tail_end = time.monotonic() + 2.0
        while time.monotonic() < tail_end:
            for msg in samples.consume(num_messages=10000, timeout=0.2):
                if msg.error() is None:
                    s = _light(msg.value())
                    book = correction if s.correction else first_label
                    if s.sample_id in seen:
                        redelivered += 1
                        if book[s.impression_id] != (s.sample_id, s.label):
                            duplicated += 1
                    else:
                        seen.add(s.sample_id)
                        duplicated += s.impression_id in book
                        book[s.impression_id] = (s.sample_id, s.label)
        samples.close()
        join.stop()
        mismatched = sum(
            1 for iid, (lab, corr) in reference.items()
            if first_label.get(iid, (None, None))[1] != lab or (iid in correction) != corr
        )
        lost = sum(1 for iid in reference if iid not in first_label)
        # From the moment every partition had an owner (or the first sample, if earlier).
        begin = min(t for t in (assigned_at, first_sample_at, done) if t is not None)
        elapsed = done - begin
        redis_client.close()
        result = {
            "events": events,
            "impressions": len(impressions),
            "clicks": len(clicks),
            "workers": args.workers,
            "positive_timing": args.positive_timing,
            "partitions": args.partitions,
            "join_events_per_s": round(events / elapsed, 1),
            "raw_consume_events_per_s": round(raw_rate, 1),
            "join_to_raw_ratio": round(events / elapsed / raw_rate, 3),
            "join_s": round(elapsed, 2),
            "timed_from": "assignment" if begin == assigned_at else "first_sample",
            "join_wall_s_with_startup": round(done - started, 2),
            "lost": lost,
            "duplicated": duplicated,
            "redelivered": redelivered,
            "mismatched": mismatched,
            "samples": len(first_label) + len(correction),
            "corrections": len(correction),
            "rss_mb": round(join.peak_rss_mb, 1),
        }
        if args.restart:
            result["restarts"] = restarts
            result["recovery_s"] = None if recovered_s is None else round(recovered_s, 2)
        log.info("join log: %s", run_dir / "join.log")
        return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--impressions", type=int, default=200_000)
    p.add_argument("--click-rate", type=float, default=0.1)
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--restart", action="store_true", help="SIGKILL and restart the join mid-stream")
    p.add_argument("--kill-fraction", type=float, default=0.4, help="kill after this share of labels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout-s", type=float, default=300.0)
    p.add_argument("--verbose", action="store_true", help="info-level join log (in the run directory)")
    p.add_argument("--positive-timing", choices=("window_close", "click"), default="window_close",
                   help="when the join emits a click's positive (JoinConfig.positive_timing)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    print(json.dumps(run(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
