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


def test_fast_encode_unusual_values_fall_back_to_codec():
    odd = [
        Impression("i", "r", "u", "it", 1, 1_700_000_000, propensity=1),  # ints where floats are usual
        Impression("i", "r", "u", "it", True, 1.7e9),  # a bool position
        Impression("i", "r", "u", "it", 0, float("inf")),
        Impression("i", "r", "u", "it", 0, 1.7e9, context={"a": 1}),
        Impression("i\n\t\\", "", "\u2603", "x" * 300, 10**6, 1.7e9 + 1e-7, context={}),
        Click("i", "u", "it", 1_700_000_000),
    ]
    for e in odd:
        assert fast_encode(e) == encode(e)


def test_context_cache_never_serves_a_stale_context():
    shared = {"device": "ios"}
    events = [
        Impression("a", "r", "u", "i", 0, 1.7e9, context=shared),
        Impression("b", "r", "u", "i", 0, 1.7e9, context={"device": "web"}),
        Impression("c", "r", "u", "i", 0, 1.7e9, context=shared),
    ]
    assert [fast_encode(e) for e in events] == [encode(e) for e in events]
    shared["device"] = "android"  # mutated after encoding: the next encoding must see it
    assert fast_encode(events[0]) == encode(events[0])
    assert b'"android"' in fast_encode(events[2])
