"""The join's decoding never raises anything but a DecodeError with a known reason; samples round-trip."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies as st

from em3 import codec
from em3.errors import DecodeError
from em3.types import Click, Impression, Sample
from stream.wire import decode_click_checked, decode_impression_checked, encode_sample

EXAMPLES = settings.default.max_examples  # the profile's: 100 in the full suite, 10 in the fast lane

FAR = 4e9
GOOD_IMP = codec.to_dict(Impression("a", "r", "u", "i", 2, 1.7e9, "main", 3, "B", 0.5, {"d": "ios"}))
GOOD_CLICK = codec.to_dict(Click("a", "u", "i", 1.7e9 + 3))

weird = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5), st.integers(10**20, 10**30), st.just(10**400),
    st.floats(allow_nan=True), st.just(1.7e9), st.just(1.7e9 + 1), st.text(max_size=3), st.just(""),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2), st.text(max_size=2), max_size=2),
    st.just({"k": 1}),
)


REASONS = {"bad_bytes", "bad_json", "not_an_object", "missing_version", "unknown_schema_version", "wrong_type",
           "missing_field", "mistyped_field", "bad_value", "absurd_timestamp"}


def _outcome(fn, data):
    """("ok", record) or ("error", reason); anything else raised fails the test."""
    try:
        return ("ok", fn(data))
    except DecodeError as exc:
        return ("error", exc.reason)


@settings(max_examples=4 * EXAMPLES, deadline=None)
@given(st.sampled_from(sorted(GOOD_IMP)), weird, st.booleans())
def test_any_mutated_impression_decodes_or_names_its_reason(field, value, drop):
    obj = dict(GOOD_IMP)
    if drop:
        obj.pop(field)
    else:
        obj[field] = value
    kind, result = _outcome(lambda d: decode_impression_checked(d, FAR), json.dumps(obj).encode())
    if kind == "ok":
        assert codec.decode_impression(codec.encode(result)) == result  # what is accepted round-trips
    else:
        assert result in REASONS


@settings(max_examples=3 * EXAMPLES, deadline=None)
@given(st.sampled_from(sorted(GOOD_CLICK)), weird, st.booleans())
def test_any_mutated_click_decodes_or_names_its_reason(field, value, drop):
    obj = dict(GOOD_CLICK)
    if drop:
        obj.pop(field)
    else:
        obj[field] = value
    kind, result = _outcome(lambda d: decode_click_checked(d, FAR), json.dumps(obj).encode())
    assert kind == "ok" or result in REASONS


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
        (json.dumps({**GOOD_IMP, "item_id": "a\tb"}).encode(), "bad_value"),  # control character
        (json.dumps({**GOOD_IMP, "user_id": "x" * 257}).encode(), "bad_value"),
        (json.dumps({**GOOD_IMP, "context": {"k": "v" * 300}}).encode(), "bad_value"),
        (json.dumps({**GOOD_IMP, "context": {str(i): "v" for i in range(33)}}).encode(), "bad_value"),
        (json.dumps({**GOOD_IMP, "impression_id": "\ud800"}).encode(), "bad_json"),  # lone surrogate
        (b"[" * 100_000 + b"]" * 100_000, "not_an_object"),
        (json.dumps({**GOOD_IMP, "context": {"k": [[[[]]]]}}).encode(), "mistyped_field"),
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
