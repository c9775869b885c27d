"""SIGKILL the join (a real faust worker subprocess) mid-stream, restart it: every
impression ends with exactly one final label after dedup by sample id, and the
history in Redis holds each positive exactly once."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from em3 import codec
from em3.app.services import free_port
from stream.dedup import DedupWindow
from stream.join import JoinConfig, expected_labels
from stream.kafka import ensure_topics, make_consumer, wait_for_assignment
from stream.synthetic import StreamSpec, arrival_order, generate_stream, produce_stream

pytestmark = pytest.mark.integration

JOIN = JoinConfig(window_s=60.0, allowed_lateness_s=5.0, max_correction_delay_s=600.0)
ROOT = Path(__file__).resolve().parents[2]


def _start_join(settings, tmp_path: Path, web_port: int, batch_size: int) -> subprocess.Popen:
    argv = [
        sys.executable, "-m", "stream", "-v", "join",
        "--window-s", "60", "--allowed-lateness-s", "5", "--max-correction-delay-s", "600",
        "--idle-timeout-s", "0.3", "--idle-advance-rate", "1000000", "--batch-size", str(batch_size),
        "--web-port", str(web_port),
        "--bootstrap-servers", settings.kafka.bootstrap_servers, "--redis-url", settings.redis.url,
        "--topic-prefix", settings.topics.prefix, "--redis-prefix", settings.redis_prefix,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = open(tmp_path / "join.log", "ab")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                            start_new_session=True)
    log.close()
    return proc


def _finished(client, settings, total: int, partitions: int, last_close: float) -> bool:
    """Has the join checkpointed every input record and every window's close?"""
    offsets, watermarks = 0, []
    for key in client.scan_iter(f"{settings.redis_prefix}join:*:meta"):
        meta = client.hgetall(key)
        offsets += sum(int(v) for k, v in meta.items() if k.startswith(b"off:"))
        watermarks.append(float(meta.get(b"watermark", b"-inf")))
    return offsets >= total and len(watermarks) == partitions and min(watermarks) >= last_close


def test_sigkill_mid_stream_then_restart_loses_nothing_and_labels_once(settings, redis_client, tmp_path):
    ensure_topics(settings.kafka, settings.topics, partitions=4)
    spec = StreamSpec(impressions=40_000, users=3_000, seed=11)
    impressions, clicks = generate_stream(spec)
    produce_stream(settings.kafka, settings.topics, arrival_order(impressions, clicks, spec.jitter_s, seed=11))
    reference = expected_labels(impressions, clicks, JOIN)
    want = len(reference) + sum(c for _, c in reference.values())
    total = len(impressions) + len(clicks)

    samples = make_consumer(settings.kafka, f"check-{time.time_ns()}")
    samples.subscribe([settings.topics.samples])
    wait_for_assignment(samples)

    web_port = free_port()
    proc = _start_join(settings, tmp_path, web_port, batch_size=500)
    dedup = DedupWindow(capacity=1_000_000)
    got: dict[tuple[str, bool], tuple[str, int]] = {}
    conflicting = raw = 0
    killed = False
    metrics = None
    deadline = time.monotonic() + 150
    try:
        last_close = max(i.served_at for i in impressions) + JOIN.window_s
        while time.monotonic() < deadline and (
            len(got) < want or not _finished(redis_client, settings, total, 4, last_close)
        ):
            for m in samples.consume(5000, timeout=0.2):
                if m.error() is not None:
                    continue
                raw += 1
                s = codec.decode_sample(m.value())
                key = (s.impression.impression_id, s.correction)
                if not dedup.add_new(s.sample_id):
                    conflicting += got[key] != (s.sample_id, s.label)
                    continue
                conflicting += key in got  # a second, different first label or correction
                got[key] = (s.sample_id, s.label)
            if not killed and len(got) >= want * 0.03:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/join/metrics", timeout=5) as r:
                        metrics = json.loads(r.read())
                except OSError:
                    pass
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                killed = True
                proc = _start_join(settings, tmp_path, web_port, batch_size=500)
        # A little longer: any late duplicates would show up now.
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            for m in samples.consume(5000, timeout=0.2):
                if m.error() is None:
                    raw += 1
                    s = codec.decode_sample(m.value())
                    if dedup.add_new(s.sample_id):
                        conflicting += 1
    finally:
        samples.close()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)

    log_tail = (tmp_path / "join.log").read_text(errors="replace")[-3000:]
    assert killed, log_tail
    assert metrics is not None and metrics["events_in"] > 0 and "dead_letters" in metrics
    assert conflicting == 0
    labels = {iid: lab for (iid, corr), (_, lab) in got.items() if not corr}
    corrections = {iid for (iid, corr) in got if corr}
    lost = [iid for iid in reference if iid not in labels]
    assert not lost, (len(lost), log_tail)
    assert {iid: (labels[iid], iid in corrections) for iid in reference} == reference
    assert raw >= want  # duplicates, if any, were only exact re-emissions

    # The history appends travel in the checkpoint transaction: each positive once.
    user_of = {i.impression_id: i.user_id for i in impressions}
    positives = Counter(user_of[iid] for (iid, _), (_, lab) in got.items() if lab == 1)
    for user, n in positives.items():
        assert redis_client.llen(f"{settings.redis_prefix}hist:{user}") == n, user
