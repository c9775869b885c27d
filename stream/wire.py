"""Hot-path record conversion for the join: decode inputs, encode samples fast.

Decoding is the codec's (:mod:`em3.codec`, msgspec against the one schema of
:mod:`em3.types`), plus the check only a reader with a clock can make: an event
time further ahead of the wall clock than ``max_future_s`` is dead-lettered as
``absurd_timestamp``, so it can never push a partition's watermark past the
impressions that follow it.

A sample's JSON embeds its impression; the join reuses the impression bytes it
received (already validated) instead of re-serializing the struct. The result
decodes with :func:`em3.codec.decode_sample` to the same :class:`Sample`.

>>> from em3 import codec
>>> from em3.types import Impression, Sample
>>> imp = Impression("a", "r", "u", "i", 0, 1.7e9)
>>> s = Sample(imp, 1, 1.7e9 + 3)
>>> codec.decode_sample(encode_sample(s, codec.encode(imp))) == s
True
>>> codec.decode_sample(encode_sample(s)) == s
True
>>> c = Sample(imp, 1, 1.7e9 + 90, True, conversion=1, value=4.5)
>>> codec.decode_sample(encode_sample(c, codec.encode(imp))) == c
True
"""
from __future__ import annotations

import json

from em3 import codec
from em3.errors import DecodeError
from em3.types import Click, Conversion, Impression, Sample

__all__ = ["encode_sample", "decode_impression_checked", "decode_click_checked", "decode_conversion_checked"]

_esc = json.encoder.encode_basestring_ascii


def encode_sample(sample: Sample, raw_impression: bytes | None = None) -> bytes:
    """The sample as versioned JSON; ``raw_impression`` is its impression's JSON bytes if at hand."""
    if raw_impression is None:
        return codec.encode(sample)
    extra = f',"conversion":1,"value":{float(sample.value)!r}' if sample.conversion else ""
    tail = (
        f',"label":{sample.label},"label_time":{sample.label_time!r},'
        f'"correction":{"true" if sample.correction else "false"},'
        f'"sample_id":{_esc(sample.sample_id)}{extra},"v":{codec.SCHEMA_VERSION}}}'
    )
    return b'{"type":"sample","impression":' + raw_impression + tail.encode()


def _check_future(value: float, name: str, latest: float) -> None:
    if value > latest:
        raise DecodeError("absurd_timestamp", f"field {name!r} = {value!r} is in the future (limit {latest!r})")


def decode_impression_checked(data: bytes | None, latest: float) -> Impression:
    """:func:`em3.codec.decode_impression`, also rejecting ``served_at > latest``."""
    imp = codec.decode_impression(data)  # type: ignore[arg-type]
    _check_future(imp.served_at, "served_at", latest)
    return imp


def decode_click_checked(data: bytes | None, latest: float) -> Click:
    """:func:`em3.codec.decode_click`, also rejecting ``clicked_at > latest``."""
    click = codec.decode_click(data)  # type: ignore[arg-type]
    _check_future(click.clicked_at, "clicked_at", latest)
    return click


def decode_conversion_checked(data: bytes | None, latest: float) -> Conversion:
    """:func:`em3.codec.decode_conversion`, also rejecting ``converted_at > latest``."""
    conversion = codec.decode_conversion(data)  # type: ignore[arg-type]
    _check_future(conversion.converted_at, "converted_at", latest)
    return conversion
