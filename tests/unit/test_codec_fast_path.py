"""em3.codec.encode's fast path for impressions and clicks writes exactly the generic bytes."""
from __future__ import annotations

from em3.codec import decode, encode, encode_generic
from em3.types import Click, Impression, ItemContent
from simulators.replay import LogReplayer
from simulators.replay_sources import obd_rows


def test_fast_encode_equals_codec():
    events = list(LogReplayer().run(obd_rows("all", "random")))
    events.append(Impression("i", "r", "u\u00e9\"x", "it", 2, 1.7e9 + 0.123456789, "line", 3, "arm", 0.25,
                             {"k": "v", "emoji": "\U0001f600"}))
    events.append(Click("i", "u", "it", 1.7e9))
    assert any(isinstance(e, Click) for e in events)
    for e in events:
        assert encode(e) == encode_generic(e)
        assert decode(encode(e)) == e


def test_fast_encode_falls_back_for_other_types():
    item = ItemContent("x", "text")
    assert encode(item) == encode_generic(item)


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
        assert encode(e) == encode_generic(e)


def test_context_mutated_after_encoding_is_seen_next_time():
    shared = {"device": "ios"}
    event = Impression("a", "r", "u", "i", 0, 1.7e9, context=shared)
    assert b'"ios"' in encode(event)
    shared["device"] = "android"
    assert encode(event) == encode_generic(event)
    assert b'"android"' in encode(event)
