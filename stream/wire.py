"""Hot-path record conversion for the join: decode inputs, encode samples fast.

A sample's JSON embeds its impression; the join reuses the impression bytes it
received (already validated by :func:`em3.codec.decode_impression`) instead of
re-serializing the dataclass, which is most of the per-sample cost. The result
decodes with :func:`em3.codec.decode_sample` to the same :class:`Sample`.

>>> from em3 import codec
>>> from em3.types import Impression, Sample
>>> imp = Impression("a", "r", "u", "i", 0, 1.7e9)
>>> s = Sample(imp, 1, 1.7e9 + 3)
>>> codec.decode_sample(encode_sample(s, codec.encode(imp))) == s
True
>>> codec.decode_sample(encode_sample(s)) == s
True
"""
from __future__ import annotations

import json

from em3 import codec
from em3.errors import DecodeError
from em3.types import Click, Impression, Sample

__all__ = ["encode_sample", "decode_impression_checked", "decode_click_checked"]


def encode_sample(sample: Sample, raw_impression: bytes | None = None) -> bytes:
    """The sample as versioned JSON; ``raw_impression`` is its impression's JSON bytes if at hand."""
    imp = raw_impression if raw_impression is not None else codec.encode(sample.impression)
    tail = (
        f',"label":{sample.label},"label_time":{sample.label_time!r},'
        f'"correction":{"true" if sample.correction else "false"},'
        f'"sample_id":"{sample.sample_id}","v":{codec.SCHEMA_VERSION},"type":"sample"}}'
    )
    return b'{"impression":' + imp + tail.encode()


def _check_future(value: float, name: str, latest: float) -> None:
    if value > latest:
        raise DecodeError("absurd_timestamp", f"field {name!r} = {value!r} is in the future (limit {latest!r})")


_MIN_TS, _MAX_TS = codec.MIN_TIMESTAMP, codec.MAX_TIMESTAMP


def _ts(value: object) -> float | None:
    t = type(value)
    if (t is float or t is int) and _MIN_TS <= value < _MAX_TS:  # false for nan; no float(huge int)
        return float(value)  # type: ignore[arg-type]
    return None


def _s(obj: dict, name: str) -> str | None:
    value = obj.get(name)
    return value if type(value) is str and value else None


_IMPRESSION_KEYS = frozenset(codec.to_dict(Impression("i", "r", "u", "i", 0, _MIN_TS)))


def _fast_impression(obj: object) -> Impression | None:
    """The impression if ``obj`` is a plainly valid one, else None (the codec then
    decides, and names the reason). Same rules as :func:`em3.codec.decode_impression`."""
    if type(obj) is not dict:
        return None
    if obj.keys() == _IMPRESSION_KEYS:  # the codec's own layout: index directly
        iid, user, item = obj["impression_id"], obj["user_id"], obj["item_id"]
        served, position, context = obj["served_at"], obj["position"], obj["context"]
        request_id, model_line, arm = obj["request_id"], obj["model_line"], obj["arm"]
        version, propensity = obj["model_version"], obj["propensity"]
        tserved = type(served)
        if (
            obj["v"] == codec.SCHEMA_VERSION and obj["type"] == "impression"
            and type(iid) is str and iid and type(user) is str and user and type(item) is str and item
            and (tserved is float or tserved is int) and _MIN_TS <= served < _MAX_TS
            and type(position) is int and position >= 0
            and type(request_id) is str and type(model_line) is str and type(arm) is str
            and type(version) is int
            and (type(propensity) is float or type(propensity) is int) and 0.0 < propensity <= 1.0
            and type(context) is dict
            and (not context or all(type(k) is str and type(v) is str for k, v in context.items()))
        ):
            return Impression(iid, request_id, user, item, position, float(served), model_line, version, arm,
                              float(propensity), context)
        return None
    if obj.get("v") != codec.SCHEMA_VERSION or obj.get("type") != "impression":
        return None
    iid, user, item = _s(obj, "impression_id"), _s(obj, "user_id"), _s(obj, "item_id")
    served = _ts(obj.get("served_at"))
    position = obj.get("position")
    request_id = obj.get("request_id")
    model_line = obj.get("model_line")
    arm = obj.get("arm")
    version = obj.get("model_version")
    propensity = obj.get("propensity")
    context = obj.get("context")
    if (
        iid is None or user is None or item is None or served is None
        or type(position) is not int or position < 0
        or (request_id is not None and type(request_id) is not str)
        or (model_line is not None and type(model_line) is not str)
        or (arm is not None and type(arm) is not str)
        or (version is not None and type(version) is not int)
        or (propensity is not None and not ((type(propensity) is float or type(propensity) is int)
                                            and 0.0 < propensity <= 1.0))
    ):
        return None
    if context is None:
        context = {}
    elif type(context) is not dict or not all(type(k) is str and type(v) is str for k, v in context.items()):
        return None
    return Impression(
        iid, request_id or "", user, item, position, served, model_line or "", version or 0, arm or "",
        1.0 if propensity is None else float(propensity), context,
    )


def _fast_click(obj: object) -> Click | None:
    if type(obj) is not dict or obj.get("v") != codec.SCHEMA_VERSION or obj.get("type") != "click":
        return None
    iid, user, item = _s(obj, "impression_id"), _s(obj, "user_id"), _s(obj, "item_id")
    clicked = _ts(obj.get("clicked_at"))
    if iid is None or user is None or item is None or clicked is None:
        return None
    return Click(iid, user, item, clicked)


_raw_decode = json.JSONDecoder().raw_decode


def _parse(data: object) -> object:
    # raw_decode on str skips json.loads' encoding detection and whitespace scans;
    # anything unusual (bad UTF-8, surrounding whitespace, trailing data) returns
    # None and the codec decides and names the reason.
    if type(data) is not bytes:
        return None
    try:
        text = data.decode("utf-8")
        obj, end = _raw_decode(text)
    except ValueError:
        return None
    return obj if end == len(text) else None


def decode_impression_checked(data: bytes | None, latest: float) -> Impression:
    """:func:`em3.codec.decode_impression` with a fast path for plainly valid records,
    also rejecting ``served_at > latest`` (``absurd_timestamp``)."""
    obj = _parse(data)
    imp = _fast_impression(obj)
    if imp is None:
        imp = codec.decode_impression(obj if type(obj) is dict else data)  # raises with the reason
    _check_future(imp.served_at, "served_at", latest)
    return imp


def decode_click_checked(data: bytes | None, latest: float) -> Click:
    """:func:`em3.codec.decode_click` with a fast path, also rejecting ``clicked_at > latest``."""
    obj = _parse(data)
    click = _fast_click(obj)
    if click is None:
        click = codec.decode_click(obj if type(obj) is dict else data)
    _check_future(click.clicked_at, "clicked_at", latest)
    return click
