"""Impression logging never blocks, counts every loss and keys records by user."""
from __future__ import annotations

import time

import pytest

from em3 import codec
from em3.types import Impression
from serving.logger import ImpressionLogger, ImpressionLoggerConfig


def _imps(n, user="u1"):
    return [Impression(f"r-{k}", "r", user, f"i{k}", k, 1.7e9, "main", 3, "control", 0.5, {"d": "x"}) for k in range(n)]


def test_impressions_reach_the_producer_keyed_by_user(fake_producer):
    seen = []
    log = ImpressionLogger(fake_producer, ImpressionLoggerConfig("t.impressions"), on_batch=seen.extend).start()
    log.log_many(_imps(50, "alice"))
    assert log.flush(5.0)
    stats = log.close()
    assert stats.produced == 50 and stats.dropped == 0 and stats.failed == 0
    topics = {t for t, _, _ in fake_producer.records}
    assert topics == {"t.impressions"}
    assert all(k == b"alice" for _, k, _ in fake_producer.records)
    decoded = [codec.decode_impression(v) for _, _, v in fake_producer.records]
    assert decoded == _imps(50, "alice")
    assert len(seen) == 50


def test_a_full_buffer_drops_and_counts_without_blocking(fake_producer):
    log = ImpressionLogger(fake_producer, ImpressionLoggerConfig("t", buffer_size=5))  # not started: nothing drains
    t0 = time.perf_counter()
    dropped = log.log_many(_imps(12))
    assert time.perf_counter() - t0 < 0.05
    assert dropped == 7
    assert log.stats().dropped == 7 and log.stats().queued == 5


def test_reserved_slots_keep_concurrent_requests_from_dropping(fake_producer):
    # Two requests may check for room at once (rank_executor="threads"): the first
    # one's slots are held, so the second is refused (503) instead of its impressions
    # being dropped after it has answered.
    log = ImpressionLogger(fake_producer, ImpressionLoggerConfig("t", buffer_size=5))  # not started: nothing drains
    assert log.reserve(3)
    assert not log.reserve(3) and log.stats().rejected == 1
    assert log.reserve(2)
    assert log.log_many(_imps(3), reserved=3) == 0
    log.release(2)  # the second request failed before logging
    assert log.reserve(2) and log.log_many(_imps(1), reserved=2) == 0  # fewer than reserved
    assert log.stats().dropped == 0 and log.stats().queued == 4
    assert log.reserve(1) and not log.reserve(1)


def test_a_full_producer_queue_makes_the_logger_wait_not_drop(fake_producer):
    fake_producer.full = True  # the broker is away: librdkafka's queue stays full
    log = ImpressionLogger(fake_producer, ImpressionLoggerConfig("t", buffer_size=6)).start()
    log.log_many(_imps(4))
    deadline = time.monotonic() + 5
    while log.stats().waits < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert log.stats().dropped == 0 and log.stats().produced == 0  # waiting, nothing lost
    log.log_many(_imps(2))
    assert not log.reserve(1) and log.stats().rejected == 1  # the server answers 503 now
    fake_producer.full = False  # the broker is back
    assert log.flush(5.0)
    stats = log.close()
    assert stats.produced == 6 and stats.dropped == 0


def test_what_a_shutdown_cannot_deliver_is_counted_as_dropped(fake_producer):
    fake_producer.full = True
    log = ImpressionLogger(fake_producer, ImpressionLoggerConfig("t")).start()
    log.log_many(_imps(4))
    time.sleep(0.1)
    stats = log.close(timeout_s=0.3)
    assert stats.dropped == 4 and stats.produced == 0


def test_a_failing_batch_hook_does_not_stop_logging(fake_producer):
    def hook(batch):
        raise ConnectionError("redis down")

    log = ImpressionLogger(fake_producer, ImpressionLoggerConfig("t"), on_batch=hook).start()
    log.log_many(_imps(3))
    log.flush(5.0)
    log.log_many(_imps(3))
    stats = log.close()
    assert stats.produced == 6 and log.hook_errors >= 1


@pytest.mark.parametrize("field, value", [("buffer_size", -3), ("batch_size", 0)])
def test_config_messages(field, value):
    with pytest.raises(ValueError, match=f"{field} must be > 0, but {value} is given"):
        ImpressionLoggerConfig("t", **{field: value})


def test_broker_delivery_failures_are_counted(fake_producer):
    class FailingProducer(type(fake_producer)):
        def produce(self, topic, key=None, value=None, on_delivery=None):
            on_delivery("broker said no", None)

    log = ImpressionLogger(FailingProducer(), ImpressionLoggerConfig("t")).start()
    log.log_many(_imps(3))
    stats = log.close()
    assert stats.failed == 3 and stats.produced == 3
