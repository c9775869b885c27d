"""The Kafka sink's fast encoder writes exactly em3.codec.encode's bytes."""
from __future__ import annotations

from em3.codec import decode, encode
from em3.types import Click, Impression, ItemContent
from simulators._kafka_sink import fast_encode
from simulators.replay import LogReplayer
from simulators.replay_sources import obd_rows


def test_fast_encode_equals_codec():
    events = list(LogReplayer().run(obd_rows("all", "random")))
    events.append(Impression("i", "r", "u\u00e9\"x", "it", 2, 1.7e9 + 0.123456789, "line", 3, "arm", 0.25,
                             {"k": "v", "emoji": "\U0001f600"}))
    events.append(Click("i", "u", "it", 1.7e9))
    assert any(isinstance(e, Click) for e in events)
    for e in events:
        assert fast_encode(e) == encode(e)
        assert decode(fast_encode(e)) == e


def test_fast_encode_falls_back_for_other_types():
    item = ItemContent("x", "text")
    assert fast_encode(item) == encode(item)
