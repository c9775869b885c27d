"""The fast decode path agrees with the codec on every input; samples round-trip."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies as st

from em3 import codec
from em3.errors import DecodeError
from em3.types import Click, Impression, Sample
from stream.wire import decode_click_checked, decode_impression_checked, encode_sample

FAR = 4e9
GOOD_IMP = codec.to_dict(Impression("a", "r", "u", "i", 2, 1.7e9, "main", 3, "B", 0.5, {"d": "ios"}))
GOOD_CLICK = codec.to_dict(Click("a", "u", "i", 1.7e9 + 3))

weird = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5), st.integers(10**20, 10**30), st.just(10**400),
    st.floats(allow_nan=True), st.just(1.7e9), st.just(1.7e9 + 1), st.text(max_size=3), st.just(""),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2), st.text(max_size=2), max_size=2),
    st.just({"k": 1}),
)


def _outcome(fn, data):
    try:
        return ("ok", fn(data))
    except DecodeError as exc:
        return ("error", exc.reason)
    except (OverflowError, ValueError, TypeError) as exc:
        return ("crash", type(exc).__name__)


def _codec_then_future(decode, name):
    def run(data):
        rec = decode(data)
        if getattr(rec, name) > FAR:
            raise DecodeError("absurd_timestamp", "future")
        return rec
    return run


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(sorted(GOOD_IMP)), weird, st.booleans())
def test_fast_impression_decode_matches_the_codec(field, value, drop):
    obj = dict(GOOD_IMP)
    if drop:
        obj.pop(field)
    else:
        obj[field] = value
    data = json.dumps(obj).encode()
    assert _outcome(lambda d: decode_impression_checked(d, FAR), data) == _outcome(
        _codec_then_future(codec.decode_impression, "served_at"), data
    )


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(GOOD_CLICK)), weird, st.booleans())
def test_fast_click_decode_matches_the_codec(field, value, drop):
    obj = dict(GOOD_CLICK)
    if drop:
        obj.pop(field)
    else:
        obj[field] = value
    data = json.dumps(obj).encode()
    assert _outcome(lambda d: decode_click_checked(d, FAR), data) == _outcome(
        _codec_then_future(codec.decode_click, "clicked_at"), data
    )


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"\xff\xfe", "bad_bytes"),
        (b"{not json", "bad_json"),
        (b"[1, 2]", "not_an_object"),
        (None, "bad_bytes"),
        (json.dumps({**GOOD_IMP, "v": 99}).encode(), "unknown_schema_version"),
        (json.dumps({**GOOD_IMP, "served_at": 5.0}).encode(), "absurd_timestamp"),
        (json.dumps({**GOOD_IMP, "served_at": 3.9e9}).encode(), "absurd_timestamp"),  # in the future
        (json.dumps(GOOD_CLICK).encode(), "wrong_type"),
    ],
)
def test_malformed_impressions_raise_with_a_reason(data, reason):
    with pytest.raises(DecodeError) as info:
        decode_impression_checked(data, latest=2e9)
    assert info.value.reason == reason


@given(st.booleans(), st.integers(0, 1), st.floats(1e9, 3e9))
def test_encoded_sample_decodes_to_the_same_sample(correction, label, t):
    imp = Impression("a", "r", "u", "i", 2, 1.7e9, "main", 3, "B", 0.5, {"d": "ios"})
    sample = Sample(imp, label, t, correction)
    assert codec.decode_sample(encode_sample(sample, codec.encode(imp))) == sample
    assert codec.decode_sample(encode_sample(sample)) == sample
