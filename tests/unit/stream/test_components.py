"""Small pieces of the stream package: dedup, configs, the synthetic stream, the CLI."""
from __future__ import annotations

import argparse

import pytest

from em3.types import Impression, Sample
from stream.dedup import DedupWindow
from stream.join import JoinConfig, expected_labels
from stream.synthetic import StreamSpec, arrival_order, generate_stream


def test_dedup_drops_repeats_and_stays_bounded():
    d = DedupWindow(capacity=10)
    imp = Impression("a", "r", "u", "i", 0, 1.7e9)
    s = Sample(imp, 1, 1.7e9 + 1)
    correction = Sample(imp, 1, 1.7e9 + 1, correction=True)
    assert [d.add_new(x.sample_id) for x in (s, s, correction)] == [True, False, True]
    for k in range(1000):
        d.add(f"id{k}")
    assert len(d) == 10 and "id999" in d and "id0" not in d


@pytest.mark.parametrize("capacity", [0, -1, 2.5])
def test_dedup_capacity_is_checked(capacity):
    with pytest.raises(ValueError, match="capacity must be > 0"):
        DedupWindow(capacity)


def test_worker_config_errors_name_the_field():
    from stream.worker import WorkerConfig

    with pytest.raises(ValueError, match="batch_size must be > 0, but -3 is given"):
        WorkerConfig(batch_size=-3)
    with pytest.raises(ValueError, match="batch_size must be an integer > 0, but 2.5 is given"):
        WorkerConfig(batch_size=2.5)
    with pytest.raises(ValueError, match="poll_timeout_s must be > 0, but 0 is given"):
        WorkerConfig(poll_timeout_s=0)


def test_app_config_errors():
    from stream.app import AppConfig

    with pytest.raises(ValueError, match="web_port must be in"):
        AppConfig(web_port=70000)


def test_synthetic_stream_is_seeded_and_on_time():
    spec = StreamSpec(impressions=2000, seed=5)
    a, b = generate_stream(spec), generate_stream(spec)
    assert a == b and generate_stream(StreamSpec(impressions=2000, seed=6)) != a
    imps, clicks = a
    assert 100 < len(clicks) < 300  # ~10% clicked, a few repeated
    order = list(arrival_order(imps, clicks, jitter_s=1.0, seed=5))
    assert len(order) == len(imps) + len(clicks)
    labels = expected_labels(imps, clicks, JoinConfig())
    assert sum(lab for lab, _ in labels.values()) > 0 and any(c for _, c in labels.values())
    with pytest.raises(ValueError, match="click_rate must be in \\[0, 1\\], but 2 is given"):
        StreamSpec(click_rate=2)


def test_cli_registers_the_stream_commands_and_their_flags():
    from stream.cli import _strip_flags, join_config_from_args, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["join", "--workers", "2", "--window-s", "30", "--idle-timeout-s", "0",
                              "--redis-prefix", "x:"])
    cfg = join_config_from_args(args)
    assert (cfg.window_s, cfg.idle_timeout_s, args.workers, args.redis_prefix) == (30.0, None, 2, "x:")
    for argv in (["topics", "create", "--partitions", "8"], ["generate", "--impressions", "10"],
                 ["samples", "summary"]):
        parser.parse_args(argv)
    assert _strip_flags(["-v", "join", "--workers", "2", "--web-port=7000", "--window-s", "5"],
                        {"--workers", "--web-port"}) == ["-v", "join", "--window-s", "5"]
