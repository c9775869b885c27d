"""Versioned JSON codec: event structs <-> bytes, by the schema of :mod:`em3.types`.

Every record carries ``"type"`` and ``"v"`` (schema version). Decoding is
:mod:`msgspec` against the declared structs, so the presence, type and
constraints of every field (ID rules, sizes, time range) are checked in one C
pass; any failure raises :class:`em3.errors.DecodeError` with a reason code,
which the stream routes to the dead-letter topic:

``bad_bytes`` (not UTF-8), ``bad_json`` (malformed, nested too deep, lone
surrogates), ``not_an_object``, ``missing_version``, ``unknown_schema_version``,
``wrong_type``, ``missing_field``, ``mistyped_field``, ``absurd_timestamp``
(outside [2000, 2100)), ``bad_value`` (any other violated rule: an ID with a
control character, a context too large, a propensity outside (0, 1], ...).

>>> from em3.types import Click
>>> c = Click("imp-1", "u1", "i9", 1_700_000_000.0)
>>> decode_click(encode(c)) == c
True
>>> decode_click(b'{"type":"click","v":1,"impression_id":"a\\\\tb","user_id":"u","item_id":"i","clicked_at":1.7e9}')
Traceback (most recent call last):
...
em3.errors.DecodeError: bad_value: Expected `str` matching regex ... - at `$.impression_id`
"""
from __future__ import annotations

import re
from typing import Any, Mapping, TypeVar, Union

import msgspec

from em3.errors import DecodeError
from em3.types import (
    MAX_TIMESTAMP,
    MIN_TIMESTAMP,
    SCHEMA_VERSION,
    Click,
    Conversion,
    DeletionRequest,
    Impression,
    ItemContent,
    CheckpointManifest,
    Sample,
    SnapshotManifest,
    Tombstone,
)

__all__ = [
    "SCHEMA_VERSION",
    "MIN_TIMESTAMP",
    "MAX_TIMESTAMP",
    "encode",
    "to_dict",
    "decode",
    "decode_as",
    "decode_impression",
    "decode_click",
    "decode_conversion",
    "decode_sample",
    "decode_item",
    "decode_manifest",
    "decode_deletion",
    "decode_tombstone",
    "decode_deletion_record",
    "decode_checkpoint_manifest",
    "manifest_to_json",
    "reason_of",
    "error_field",
]

T = TypeVar("T")
Record = Union[Impression, Click, Conversion, Sample, ItemContent]

_encoder = msgspec.json.Encoder()
_DECODERS: dict[Any, msgspec.json.Decoder] = {
    t: msgspec.json.Decoder(t) for t in (Impression, Click, Conversion, Sample, ItemContent, Record, DeletionRequest,
                                         Tombstone)
}
#: What the deletions topic carries: requests, and the completion records that replace them.
DeletionRecord = Union[DeletionRequest, Tombstone]
_DECODERS[DeletionRecord] = msgspec.json.Decoder(DeletionRecord)
_TIME_FIELDS = ("served_at", "clicked_at", "converted_at", "label_time")
_AT = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
_VERSION_KEY = re.compile(rb'"v"\s*:')


def encode(record: Record | DeletionRequest | Tombstone) -> bytes:
    """Serialize a record to compact UTF-8 JSON bytes (``type`` first, ``v`` last)."""
    return _encoder.encode(record)


def to_dict(record: Record) -> dict[str, Any]:
    """The JSON-ready dict of ``record``, with ``type`` and ``v`` set (image as base64)."""
    return msgspec.json.decode(_encoder.encode(record))


# --- decoding -----------------------------------------------------------------


def error_field(message: str) -> str:
    """The field a msgspec validation message points at (``item_ids[3]``), or ``body``.

    >>> error_field("Expected `str`, got `int` - at `$.item_ids[3]`")
    'item_ids[3]'
    """
    m = _AT.search(message)
    return (m.group("path") or "body") if m else "body"


class _Head(msgspec.Struct):
    v: Any = msgspec.UNSET


def _head(data: object) -> _Head | None:
    """The envelope of a record that failed to decode (only on that path), if readable."""
    try:
        if isinstance(data, Mapping):
            return _Head(data.get("v", msgspec.UNSET))
        return msgspec.json.decode(data, type=_Head)  # type: ignore[arg-type]
    except (msgspec.MsgspecError, TypeError, RecursionError):
        return None


def reason_of(exc: msgspec.MsgspecError, data: object = None) -> DecodeError:
    """The :class:`DecodeError` (reason code, detail) for a msgspec failure."""
    message = str(exc)
    if isinstance(exc, msgspec.DecodeError) and not isinstance(exc, msgspec.ValidationError):
        if isinstance(data, (bytes, bytearray, memoryview)):
            try:
                bytes(data).decode("utf-8")
            except UnicodeDecodeError as bad:
                return DecodeError("bad_bytes", f"not UTF-8: {bad}")
        if message == "Input data was truncated" and isinstance(data, (bytes, bytearray)) and b"\\u" in data:
            message = "a string holds a lone surrogate or a bad \\u escape (valid JSON is UTF-8)"
        return DecodeError("bad_json", message)
    head = _head(data)
    if head is not None:  # the envelope first, as a reader would check it
        if head.v is msgspec.UNSET:
            return DecodeError("missing_version", "record has no schema version field 'v'")
        if head.v != SCHEMA_VERSION or type(head.v) is not int:
            return DecodeError("unknown_schema_version",
                               f"schema version {head.v!r} is not supported (expected {SCHEMA_VERSION})")
    path = error_field(message)
    leaf = path.rsplit(".", 1)[-1]
    if message.startswith("Object missing required field"):
        name = message.split("`")[1]
        reason = {"type": "wrong_type", "v": "missing_version"}.get(name, "missing_field")
        return DecodeError(reason, message)
    if path == "body" and message.startswith("Expected `object`"):
        return DecodeError("not_an_object", message)
    if leaf == "type":
        return DecodeError("wrong_type", message)
    if leaf == "v":
        return DecodeError("unknown_schema_version", message)
    if message.startswith("Expected `") and ", got `" in message:
        return DecodeError("mistyped_field", message)
    if leaf in _TIME_FIELDS:
        return DecodeError("absurd_timestamp", message)
    return DecodeError("bad_value", message)


def decode_as(data: bytes | str | Mapping[str, Any], kind: type[T]) -> T:
    """Decode ``data`` (JSON bytes or text, or an already parsed mapping) as ``kind``.

    Raises :class:`DecodeError` with the reason; a wire record must also carry its
    schema version ``v`` (``missing_version`` otherwise).
    """
    try:
        if isinstance(data, Mapping):
            record = msgspec.convert(dict(data), kind)
            if "v" not in data and kind is not SnapshotManifest:
                raise DecodeError("missing_version", "record has no schema version field 'v'")
            return record
        if isinstance(data, str):
            data = data.encode("utf-8", "surrogatepass")
        elif isinstance(data, memoryview):
            data = bytes(data)
        elif not isinstance(data, (bytes, bytearray)):
            raise DecodeError("bad_bytes", f"expected bytes, got {type(data).__name__}")
        decoder = _DECODERS.get(kind) or msgspec.json.Decoder(kind)
        record = decoder.decode(data)
    except msgspec.MsgspecError as exc:
        raise reason_of(exc, data) from None
    except RecursionError:
        raise DecodeError("bad_json", "nested too deep") from None
    # The substring test is a C scan; the regex only runs for unusual spacing.
    if kind is not SnapshotManifest and b'"v":' not in data and _VERSION_KEY.search(data) is None:
        raise DecodeError("missing_version", "record has no schema version field 'v'")
    return record


def decode_impression(data: bytes | str | Mapping[str, Any]) -> Impression:
    """Decode an :class:`Impression`; raises :class:`DecodeError` with a reason."""
    return decode_as(data, Impression)


def decode_click(data: bytes | str | Mapping[str, Any]) -> Click:
    """Decode a :class:`Click`; raises :class:`DecodeError` with a reason."""
    return decode_as(data, Click)


def decode_conversion(data: bytes | str | Mapping[str, Any]) -> Conversion:
    """Decode a :class:`Conversion`; raises :class:`DecodeError` with a reason.

    >>> c = Conversion("imp-1", "u1", "i9", 1_700_000_600.0, value=12.5)
    >>> decode_conversion(encode(c)) == c
    True
    """
    return decode_as(data, Conversion)


def decode_sample(data: bytes | str | Mapping[str, Any]) -> Sample:
    """Decode a :class:`Sample`; raises :class:`DecodeError` with a reason."""
    return decode_as(data, Sample)


def decode_item(data: bytes | str | Mapping[str, Any]) -> ItemContent:
    """Decode an :class:`ItemContent`; image bytes are base64 in JSON."""
    return decode_as(data, ItemContent)


def decode(data: bytes | str | Mapping[str, Any]) -> Record:
    """Decode any record by its ``type`` field."""
    return decode_as(data, Record)  # type: ignore[arg-type]


def manifest_to_json(manifest: SnapshotManifest | CheckpointManifest) -> str:
    """A snapshot or checkpoint manifest as JSON text, keys sorted (equal manifests
    give equal text)."""
    return msgspec.json.encode(manifest, order="sorted").decode()


def decode_manifest(data: bytes | str) -> SnapshotManifest:
    """Parse a manifest written by :func:`manifest_to_json`."""
    try:
        return decode_as(data, SnapshotManifest)
    except DecodeError as exc:
        raise DecodeError("bad_value", f"malformed snapshot manifest: {exc.detail}") from None


def decode_deletion(data: bytes | str | Mapping[str, Any]) -> DeletionRequest:
    """Decode a :class:`DeletionRequest` (the deletions topic)."""
    return decode_as(data, DeletionRequest)


def decode_tombstone(data: bytes | str | Mapping[str, Any]) -> Tombstone:
    """Decode a :class:`Tombstone` (Redis, the deletions topic's completion records)."""
    return decode_as(data, Tombstone)


def decode_deletion_record(data: bytes | str | Mapping[str, Any]) -> DeletionRequest | Tombstone:
    """Decode a record of the deletions topic: a request or a completion record."""
    return decode_as(data, DeletionRecord)  # type: ignore[arg-type]


def decode_checkpoint_manifest(data: bytes | str) -> CheckpointManifest:
    """Parse a learner checkpoint's manifest written by :func:`manifest_to_json`."""
    try:
        return decode_as(data, CheckpointManifest)
    except DecodeError as exc:
        raise DecodeError("bad_value", f"malformed checkpoint manifest: {exc.detail}") from None
