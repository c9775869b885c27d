"""Conversions through the real join (a faust worker subprocess, Tansu, Redis):
delayed conversions are attributed exactly once, also across a SIGKILL and restart,
and bad conversion records are dead-lettered with a reason."""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from em3 import codec
from stream.dedup import DedupWindow
from stream.join import JoinConfig, JoinCore
from stream.kafka import ensure_topics, make_consumer, make_producer, parse_dead_letter, wait_for_assignment
from stream.synthetic import StreamSpec, arrival_order, generate_conversions, generate_stream, produce_stream

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
HOUR = 3600.0
# 12,000 impressions at 2 per event-second span 100 minutes; conversions come a median of
# 20 minutes after their click, some past the 1-hour window.
JOIN = JoinConfig(window_s=60.0, allowed_lateness_s=5.0, max_correction_delay_s=600.0, conversion_window_s=HOUR)


def _start_join(settings, tmp_path: Path) -> subprocess.Popen:
    argv = [
        sys.executable, "-m", "stream", "-v", "join",
        "--window-s", "60", "--allowed-lateness-s", "5", "--max-correction-delay-s", "600",
        "--conversion-window-s", str(HOUR),
        "--idle-timeout-s", "0.3", "--idle-advance-rate", "1000000", "--batch-size", "400", "--web-port", "0",
        "--bootstrap-servers", settings.kafka.bootstrap_servers, "--redis-url", settings.redis.url,
        "--topic-prefix", settings.topics.prefix, "--redis-prefix", settings.redis_prefix,
    ]
    log = open(tmp_path / "join.log", "ab")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            cwd=ROOT, start_new_session=True)
    log.close()
    return proc


def _reference(records) -> set[str]:
    """Sample ids of the conversions the pure core attributes on the same records."""
    core = JoinCore(JoinConfig(**{**JOIN.__dict__, "idle_timeout_s": None}))
    for r in records:
        {"impression": core.add_impression, "click": core.add_click,
         "conversion": core.add_conversion}[type(r).__name__.lower()](r)
    core.advance_watermark(math.inf)
    return {s.sample_id for s in core.take_output().samples if s.conversion}


def test_delayed_conversions_survive_a_sigkill_and_are_attributed_once(settings, redis_client, tmp_path):
    ensure_topics(settings.kafka, settings.topics, partitions=4)
    spec = StreamSpec(impressions=12_000, users=800, rate_per_s=2.0, click_rate=0.15, seed=5)
    impressions, clicks = generate_stream(spec)
    conversions = generate_conversions(clicks, rate=0.4, median_delay_s=1200.0, delay_sigma=1.0, seed=5)
    records = list(arrival_order(impressions, clicks, spec.jitter_s, seed=5, conversions=conversions))
    want = _reference(records)
    assert 300 < len(want) < len(conversions)  # some fall past the window
    produce_stream(settings.kafka, settings.topics, iter(records))
    producer = make_producer(settings.kafka)
    bad = {b'{"v":1,"type":"conversion"}': "missing_field",
           codec.encode(conversions[0]).replace(b'"value":', b'"value":-'): "bad_value"}
    for value in bad:
        producer.produce(settings.topics.conversions, key=b"u-bad", value=value)
    producer.flush(10)
    del producer

    samples = make_consumer(settings.kafka, f"check-{time.time_ns()}")
    samples.subscribe([settings.topics.samples])
    wait_for_assignment(samples)
    proc = _start_join(settings, tmp_path)
    dedup = DedupWindow(1_000_000)
    got: dict[str, tuple] = {}
    conflicting = 0
    killed = False
    deadline = time.monotonic() + 150
    quiet_since = None
    try:
        while time.monotonic() < deadline:
            batch = [m for m in samples.consume(5000, timeout=0.2) if m.error() is None]
            for m in batch:
                s = codec.decode_sample(m.value())
                if not s.conversion:
                    continue
                key = (s.label, s.correction, s.conversion, s.value, s.label_time)
                if not dedup.add_new(s.sample_id):
                    conflicting += got[s.sample_id] != key  # a re-emission must be identical
                    continue
                got[s.sample_id] = key
            if not killed and len(got) >= len(want) * 0.3:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                killed = True
                proc = _start_join(settings, tmp_path)
            quiet_since = (quiet_since or time.monotonic()) if not batch else None
            if killed and len(got) >= len(want) and quiet_since and time.monotonic() - quiet_since > 2.0:
                break
    finally:
        samples.close()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    log_tail = (tmp_path / "join.log").read_text(errors="replace")[-3000:]
    assert killed, log_tail
    assert conflicting == 0
    assert set(got) == want, (len(set(got) - want), len(want - set(got)), log_tail)
    assert all(v[3] > 0 for v in got.values())  # values travel with the conversion

    dead = make_consumer(settings.kafka, f"dead-{time.time_ns()}")
    dead.subscribe([settings.topics.dead_letter])
    wait_for_assignment(dead)
    reasons: dict[str, str] = {}
    end = time.monotonic() + 10
    while time.monotonic() < end and len(reasons) < len(bad):
        for m in dead.consume(5000, timeout=0.2):
            if m.error() is None:
                d = parse_dead_letter(m)
                if d.source_topic == settings.topics.conversions and m.value() in bad:
                    reasons[m.value()] = d.reason
    dead.close()
    assert reasons == bad
