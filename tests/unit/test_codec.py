from __future__ import annotations

import json

import pytest
from hypothesis import given, strategies as st

from em3 import codec
from em3.errors import DecodeError
from em3.types import Click, Impression, ItemContent, Sample

TS = 1_700_000_000.0


def _imp(**kw):
    base = dict(impression_id="imp-1", request_id="r1", user_id="u1", item_id="i1", position=0, served_at=TS,
                model_line="em3", model_version=3, arm="A", propensity=0.5, context={"device": "ios"})
    base.update(kw)
    return Impression(**base)


def test_round_trip_every_type():
    imp = _imp()
    records = [imp, Click("imp-1", "u1", "i1", TS + 5), Sample(imp, 1, TS + 5, correction=True),
               ItemContent("i1", "text", image=b"\x00\x01", attributes={"g": "x"})]
    for r in records:
        assert codec.decode(codec.encode(r)) == r


def test_sample_id_is_stable_and_differs_for_corrections():
    imp = _imp()
    assert Sample(imp, 0, TS).sample_id == Sample(imp, 0, TS + 1).sample_id
    assert Sample(imp, 0, TS).sample_id != Sample(imp, 1, TS, correction=True).sample_id


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b"\xff\xfe", "bad_bytes"),
        (b"{not json", "bad_json"),
        (b"[1,2]", "not_an_object"),
        (b'{"type":"click"}', "missing_version"),
        (b'{"v":99,"type":"click"}', "unknown_schema_version"),
        (b'{"v":1,"type":"impression"}', "wrong_type"),
        (b'{"v":1,"type":"click","user_id":"u","item_id":"i","clicked_at":1.7e9}', "missing_field"),
        (b'{"v":1,"type":"click","impression_id":5,"user_id":"u","item_id":"i","clicked_at":1.7e9}', "mistyped_field"),
        (b'{"v":1,"type":"click","impression_id":"x","user_id":"u","item_id":"i","clicked_at":true}', "mistyped_field"),
        (b'{"v":1,"type":"click","impression_id":"x","user_id":"u","item_id":"i","clicked_at":5}', "absurd_timestamp"),
        (b'{"v":1,"type":"click","impression_id":"","user_id":"u","item_id":"i","clicked_at":1.7e9}', "bad_value"),
        (b'{"v":1,"type":"click","impression_id":"x","user_id":"u","item_id":"i","clicked_at":' + b"9" * 400 + b"}",
         "absurd_timestamp"),
    ],
)
def test_malformed_click_gives_typed_reason(raw, reason):
    with pytest.raises(DecodeError) as info:
        codec.decode_click(raw)
    assert info.value.reason == reason


def test_impression_rejects_bad_propensity_and_position():
    body = codec.to_dict(_imp())
    for field, value, reason in [("propensity", 0.0, "bad_value"), ("position", -1, "bad_value"),
                                 ("context", {"a": 1}, "mistyped_field")]:
        bad = dict(body, **{field: value})
        with pytest.raises(DecodeError) as info:
            codec.decode_impression(json.dumps(bad).encode())
        assert info.value.reason == reason


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise_anything_but_decode_error(raw):
    try:
        codec.decode(raw)
    except DecodeError:
        pass


def test_conversion_round_trips_and_bad_ones_get_a_reason():
    from em3.types import Conversion

    c = Conversion("imp-1", "u1", "i1", TS + 3600, value=19.99)
    assert codec.decode(codec.encode(c)) == c == codec.decode_conversion(codec.encode(c))
    assert codec.decode_conversion(codec.encode(Conversion("imp-1", "u1", "i1", TS))).value is None
    body = codec.to_dict(c)
    for field, value, reason in [("value", -1.0, "bad_value"), ("value", "12", "mistyped_field"),
                                 ("converted_at", 5.0, "absurd_timestamp"), ("impression_id", "a\tb", "bad_value"),
                                 ("type", "click", "wrong_type")]:
        with pytest.raises(DecodeError) as info:
            codec.decode_conversion(json.dumps(dict(body, **{field: value})).encode())
        assert info.value.reason == reason, field
    with pytest.raises(DecodeError) as info:
        codec.decode_conversion(json.dumps({k: v for k, v in body.items() if k != "v"}).encode())
    assert info.value.reason == "missing_version"


def test_a_conversion_sample_has_its_own_id_and_must_be_a_clicked_correction():
    imp = _imp()
    s = Sample(imp, 1, TS + 60, correction=True, conversion=1, value=5.0)
    assert codec.decode_sample(codec.encode(s)) == s
    assert len({s.sample_id, Sample(imp, 1, TS, correction=True).sample_id, Sample(imp, 1, TS).sample_id}) == 3
    with pytest.raises(ValueError, match="a conversion sample must have label 1 and correction True"):
        Sample(imp, 1, TS, correction=False, conversion=1)


def test_privacy_records_round_trip_with_their_schema_version():
    # A tombstone that lost its version field could be stored but never read back
    # (the deletion then never showed as erased): every stored record keeps ``v``.
    from em3.types import DeletionRequest, Tombstone

    tomb = Tombstone("0" * 32, 1.7e9, status="stores_erased", lines_expected=["a"], erased={"history_keys": 1})
    assert codec.decode_tombstone(codec.encode(tomb)) == tomb
    request = DeletionRequest("u" * 32, 1.7e9)
    assert codec.decode_deletion_record(codec.encode(request)) == request
