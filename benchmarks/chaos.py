"""Chaos: a live stack under steady traffic, attacked with poison inputs and faults.

Starts the embedded services (durable broker, Redis with a password), the stream
join (``python -m stream join``), a learner with the default model through Ray
(``python -m em3 learn``), and a ranking server (``python -m em3 serve``), all as
subprocesses; simulated users (:mod:`simulators.world`) ask ``/v1/rank`` and
click. Meanwhile it

* sends poison HTTP requests of many kinds to ``/v1/rank``, ``/v1/click`` and
  ``/v1/items`` (:func:`http_poisons`) and counts answers >= 500 and writes
  without the API key that were accepted;
* produces poison records of many kinds straight to the impressions and clicks
  topics (:func:`kafka_poisons`) and checks each comes back on the dead-letter
  topic with a reason (matched by source topic, partition and offset);
* freezes Redis twice (SIGSTOP/SIGCONT) and counts ``/v1/rank`` requests that
  fail meanwhile; restarts the broker once;
* SIGKILLs the join, the learner (its Ray actor process; Ray restarts it) and the
  server at random moments, restarting the join and the server as a supervisor
  would; any process that exits on its own is a crashed component;
* writes a forged (unsigned) snapshot into Redis and checks the server never
  answers with its version.

After the traffic stops and the pipeline drains, every impression id the server
returned is looked up on the samples topic (joined) and the dead-letter topic;
the rest, less what the server's impression logger counted as dropped or failed,
is ``impressions_lost``. Samples: the learner's applied-ids chain
(:class:`em3.redis_stores.RedisAppliedLog`) from the final snapshot, as in
``benchmarks/recovery.py``, against the distinct sample ids on the samples topic.

Run::

    python benchmarks/chaos.py                # ~10 min on 2 cores
    python benchmarks/chaos.py --quick        # smoke run: tiny model, short outages

The last printed line is one JSON object (see ``main``).
"""
from __future__ import annotations

import argparse
import base64
import heapq
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import msgspec

if __name__ == "__main__":  # run as a script: the repository, not benchmarks/ (its serving.py), on the path
    _HERE = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
    sys.path.insert(0, str(_HERE.parent))

from em3.types import ClickRequest, ItemRequest, ItemsRequest, RankRequest

log = logging.getLogger("chaos")

REPO = Path(__file__).resolve().parents[1]
LINE = "em3"
DAY_S = 86_400.0

# --------------------------------------------------------------------------- poison HTTP


@dataclass(frozen=True)
class HttpPoison:
    """One hostile request: ``POST path`` with ``body``.

    ``auth`` is ``"key"`` (the right API key), ``"none"`` or ``"wrong"``;
    ``rejected_by`` names the server's check that must refuse it: ``decoder``
    (the schema, 422), ``auth`` (401), ``size`` (413), ``future`` (a timestamp
    beyond the server's skew, 422) or ``candidates`` (more than the server's
    1,000 candidates, 422).
    """

    kind: str
    path: str
    body: bytes
    auth: str = "key"
    rejected_by: str = "decoder"


_RANK, _CLICK, _ITEMS = "/v1/rank", "/v1/click", "/v1/items"
_STRUCTS = {_RANK: (RankRequest,), _CLICK: (ClickRequest,), _ITEMS: (ItemsRequest, ItemRequest)}
_CONTROL = [chr(c) for c in range(0x20)] + ["\x7f"]


def _j(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def _deep(depth: int, leaf: str = "[", close: str = "]") -> str:
    return leaf * depth + close * depth


def _valid_rank(rng: random.Random) -> dict[str, Any]:
    return {"user_id": f"user-{rng.randrange(1000)}", "item_ids": [f"item-{i}" for i in rng.sample(range(500), 5)],
            "k": 3}


def _valid_click(rng: random.Random) -> dict[str, Any]:
    return {"impression_id": f"imp-{rng.randrange(10**6)}", "user_id": f"user-{rng.randrange(1000)}",
            "item_id": f"item-{rng.randrange(500)}"}


def _valid_item(rng: random.Random) -> dict[str, Any]:
    # Never an id of the real catalogue: an accepted keyless write must not change it.
    return {"item_id": f"intruder-{rng.randrange(10**6)}", "text": "pwned", "attributes": {"genres": "x"}}


def _bad_id(rng: random.Random) -> str:
    """An id that breaks the ID rule: control character, empty, too long."""
    choice = rng.randrange(4)
    if choice == 0:
        return f"a{rng.choice(_CONTROL)}b"
    if choice == 1:
        return ""
    if choice == 2:
        return "x" * (257 + rng.randrange(100))
    return "tab\tid"


def _mistype(rng: random.Random) -> Any:
    return rng.choice([123, -1.5, True, None, ["a"], {"a": 1}])


def _fuzz_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(8 if depth < 4 else 5)
    if kind == 0:
        return rng.randrange(-10**12, 10**12)
    if kind == 1:
        return rng.uniform(-1e12, 1e12)
    if kind == 2:
        return "".join(chr(rng.randrange(0x20, 0x2FFF)) for _ in range(rng.randrange(0, 12)))
    if kind == 3:
        return rng.choice([True, False, None])
    if kind == 4:
        return ""
    if kind == 5:
        return [_fuzz_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    return {rng.choice(["user_id", "item_ids", "k", "context", "items", "zz", "impression_id", "text"]):
            _fuzz_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))}


def _fuzz_object(rng: random.Random, path: str) -> dict[str, Any]:
    """A valid body with one field replaced by a random value, or a random field added."""
    body = {_RANK: _valid_rank, _CLICK: _valid_click, _ITEMS: _valid_item}[path](rng)
    if rng.random() < 0.3:
        body[f"field_{rng.randrange(100)}"] = _fuzz_value(rng)
    else:
        body[rng.choice(sorted(body))] = _fuzz_value(rng)
    return body


def _rejected_by_schema(path: str, body: bytes) -> bool:
    for struct in _STRUCTS[path]:
        try:
            msgspec.json.decode(body, type=struct)
            return False
        except (msgspec.MsgspecError, ValueError, RecursionError):
            continue
    return True


def _http_kinds(now: float, api_key: str) -> dict[str, tuple[Callable[[random.Random], HttpPoison], int | None]]:
    """Poison kind -> (builder, cap on how many of it, None: no cap)."""
    fut = now + 23 * 3600.0

    def kind(name, path, make, auth="key", rejected_by="decoder", raw=False):
        def build(rng: random.Random) -> HttpPoison:
            payload = make(rng)
            return HttpPoison(name, path, payload if raw else _j(payload), auth, rejected_by)
        return build

    def surrogate_click(rng):
        field = rng.choice(["impression_id", "user_id", "item_id"])
        text = json.dumps(_valid_click(rng))
        return text.replace(f'"{field}": "', f'"{field}": "\\ud800', 1).encode()

    def surrogate_rank(rng):
        return json.dumps(_valid_rank(rng)).replace('"user_id": "', '"user_id": "\\udc00x', 1).encode()

    def bad_utf8(rng):
        body = json.dumps(_valid_click(rng)).encode()
        return body.replace(b'"item-', b'"\xff\xfeitem-', 1)

    def deep(path):
        def make(rng):
            depth = rng.choice([5000, 20000, 100000])
            if path == _ITEMS:
                return ('{"items": [' + _deep(depth) + "]}").encode()
            if path == _CLICK:
                return ('{"impression_id": ' + _deep(depth, "{\"a\":", "}").replace("}", "1}", 1) + "}").encode()
            return ('{"user_id": "u", "item_ids": ["a"], "context": ' + _deep(depth) + "}").encode()
        return make

    def huge_context(rng):
        body = _valid_rank(rng)
        body["context"] = {"note": "A" * (1024 * 1024)}
        return body

    def tab_in_id(path):
        def make(rng):
            if path == _RANK:
                body = _valid_rank(rng)
                body["item_ids"][rng.randrange(len(body["item_ids"]))] = _bad_id(rng)
            elif path == _CLICK:
                body = _valid_click(rng)
                body[rng.choice(["impression_id", "user_id", "item_id"])] = _bad_id(rng)
            else:
                body = _valid_item(rng)
                body["item_id"] = _bad_id(rng)
            return body
        return make

    def future(path):
        def make(rng):
            body = _valid_rank(rng) if path == _RANK else _valid_click(rng)
            body["served_at" if path == _RANK else "clicked_at"] = fut + rng.uniform(0, 3600)
            return body
        return make

    def absurd_time(rng):
        body = _valid_click(rng)
        body["clicked_at"] = rng.choice([0.0, -5.0, 1e12, 123.0])
        return body

    def wrong_types(path):
        def make(rng):
            while True:  # some values fit some fields (k may be an int or null): draw again
                body = {_RANK: _valid_rank, _CLICK: _valid_click, _ITEMS: _valid_item}[path](rng)
                body[rng.choice(sorted(body))] = _mistype(rng)
                if _rejected_by_schema(path, _j(body)):
                    return body
        return make

    def missing(path):
        def make(rng):
            body = {_RANK: _valid_rank, _CLICK: _valid_click, _ITEMS: _valid_item}[path](rng)
            required = {_RANK: ["user_id", "item_ids"], _CLICK: ["impression_id", "user_id", "item_id"],
                        _ITEMS: ["item_id"]}[path]
            del body[rng.choice(required)]
            return body
        return make

    def unknown(path):
        def make(rng):
            body = {_RANK: _valid_rank, _CLICK: _valid_click, _ITEMS: _valid_item}[path](rng)
            body[rng.choice(["admin", "__proto__", "user", "role", "sql"])] = "1; DROP TABLE x"
            return body
        return make

    def bad_image(rng):
        body = _valid_item(rng)
        body["image"] = rng.choice(["not base64!!", "%%%%", "AAA", "====", "\u00e9\u00e9"])
        return body

    def big_image(rng):
        body = _valid_item(rng)
        body["image"] = base64.b64encode(b"\x89PNG" + b"\x00" * (600 * 1024)).decode()
        return body

    def oversize(rng):
        return b'{"user_id": "u", "item_ids": ["a"], "context": {"x": "' + b"B" * (5 * 1024 * 1024) + b'"}}'

    def rank_limits(rng):
        body = _valid_rank(rng)
        choice = rng.randrange(4)
        if choice == 0:
            body["item_ids"] = []
        elif choice == 1:
            body["item_ids"] = ["dup", "dup"]
        elif choice == 2:
            body["k"] = rng.choice([0, -3])
        else:
            body["context"] = {f"k{i}": "v" for i in range(40)}
        return body

    def too_many_candidates(rng):
        body = _valid_rank(rng)
        body["item_ids"] = [f"c{i}" for i in range(1001 + rng.randrange(50))]
        return body

    def not_json(rng):
        return rng.choice([b"", b"{", b"null", b"[]", b"42", b'"str"', b"{'a': 1}", b"\x00\x01\x02",
                           b'{"user_id": "u", "item_ids": ["a"],}'])

    def fuzz(path):
        def make(rng):
            while True:
                body = _j(_fuzz_object(rng, path))
                if _rejected_by_schema(path, body):
                    return body
        return make

    def items_batch_bad(rng):
        return {"items": [_valid_item(rng), {"item_id": "a\x00b"}]}

    kinds = {
        "rank_lone_surrogate": (kind("rank_lone_surrogate", _RANK, surrogate_rank, raw=True), None),
        "click_lone_surrogate": (kind("click_lone_surrogate", _CLICK, surrogate_click, raw=True), None),
        "click_bad_utf8": (kind("click_bad_utf8", _CLICK, bad_utf8, raw=True), None),
        "rank_deep_nesting": (kind("rank_deep_nesting", _RANK, deep(_RANK), raw=True), None),
        "click_deep_nesting": (kind("click_deep_nesting", _CLICK, deep(_CLICK), raw=True), None),
        "items_deep_nesting": (kind("items_deep_nesting", _ITEMS, deep(_ITEMS), raw=True), None),
        "rank_1mb_context": (kind("rank_1mb_context", _RANK, huge_context), 20),
        "rank_control_char_id": (kind("rank_control_char_id", _RANK, tab_in_id(_RANK)), None),
        "click_control_char_id": (kind("click_control_char_id", _CLICK, tab_in_id(_CLICK)), None),
        "items_control_char_id": (kind("items_control_char_id", _ITEMS, tab_in_id(_ITEMS)), None),
        "rank_served_at_23h_ahead": (kind("rank_served_at_23h_ahead", _RANK, future(_RANK),
                                          rejected_by="future"), None),
        "click_clicked_at_23h_ahead": (kind("click_clicked_at_23h_ahead", _CLICK, future(_CLICK),
                                            rejected_by="future"), None),
        "click_absurd_time": (kind("click_absurd_time", _CLICK, absurd_time), None),
        "rank_wrong_types": (kind("rank_wrong_types", _RANK, wrong_types(_RANK)), None),
        "click_wrong_types": (kind("click_wrong_types", _CLICK, wrong_types(_CLICK)), None),
        "items_wrong_types": (kind("items_wrong_types", _ITEMS, wrong_types(_ITEMS)), None),
        "rank_missing_field": (kind("rank_missing_field", _RANK, missing(_RANK)), None),
        "click_missing_field": (kind("click_missing_field", _CLICK, missing(_CLICK)), None),
        "items_missing_field": (kind("items_missing_field", _ITEMS, missing(_ITEMS)), None),
        "rank_unknown_field": (kind("rank_unknown_field", _RANK, unknown(_RANK)), None),
        "click_unknown_field": (kind("click_unknown_field", _CLICK, unknown(_CLICK)), None),
        "items_unknown_field": (kind("items_unknown_field", _ITEMS, unknown(_ITEMS)), None),
        "items_bad_base64_image": (kind("items_bad_base64_image", _ITEMS, bad_image), None),
        "items_image_over_512k": (kind("items_image_over_512k", _ITEMS, big_image), 20),
        "items_batch_one_bad": (kind("items_batch_one_bad", _ITEMS, items_batch_bad), None),
        "rank_oversize_body": (kind("rank_oversize_body", _RANK, oversize, raw=True, rejected_by="size"), 10),
        "rank_limits": (kind("rank_limits", _RANK, rank_limits), None),
        "rank_1001_candidates": (kind("rank_1001_candidates", _RANK, too_many_candidates,
                                      rejected_by="candidates"), None),
        "rank_not_json": (kind("rank_not_json", _RANK, not_json, raw=True), None),
        "click_not_json": (kind("click_not_json", _CLICK, not_json, raw=True), None),
        "rank_fuzz": (kind("rank_fuzz", _RANK, fuzz(_RANK), raw=True), None),
        "click_fuzz": (kind("click_fuzz", _CLICK, fuzz(_CLICK), raw=True), None),
        "items_fuzz": (kind("items_fuzz", _ITEMS, fuzz(_ITEMS), raw=True), None),
        # Valid bodies, but without the key or with a wrong one: must get 401.
        "click_without_key": (kind("click_without_key", _CLICK, _valid_click, auth="none", rejected_by="auth"), None),
        "click_wrong_key": (kind("click_wrong_key", _CLICK, _valid_click, auth="wrong", rejected_by="auth"), None),
        "items_without_key": (kind("items_without_key", _ITEMS, _valid_item, auth="none", rejected_by="auth"), None),
        "items_wrong_key": (kind("items_wrong_key", _ITEMS, _valid_item, auth="wrong", rejected_by="auth"), None),
    }
    return kinds


def _allocate(n: int, caps: dict[str, int | None], rng: random.Random) -> dict[str, int]:
    """``n`` split as evenly as possible over kinds, heavy kinds held to their caps."""
    counts = {k: 0 for k in caps}
    open_kinds = list(caps)
    left = n
    while left > 0 and open_kinds:
        share = max(1, left // len(open_kinds))
        for k in list(open_kinds):
            if left <= 0:
                break
            take = min(share, left) if caps[k] is None else min(share, left, caps[k] - counts[k])
            counts[k] += take
            left -= take
            if caps[k] is not None and counts[k] >= caps[k]:
                open_kinds.remove(k)
    return counts


def http_poisons(n: int, seed: int = 0, now: float | None = None, api_key: str = "key") -> list[HttpPoison]:
    """``n`` hostile requests of every kind (see :func:`_http_kinds`), shuffled, seeded.

    Every kind gets about ``n / kinds``; heavy ones (1 MB bodies and more) at most
    their cap. ``now`` anchors the future-timestamp kinds (default: the clock).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, but {n} is given")
    rng = random.Random(seed)
    kinds = _http_kinds(time.time() if now is None else now, api_key)
    counts = _allocate(n, {k: cap for k, (_, cap) in kinds.items()}, rng)
    out = [kinds[k][0](rng) for k, c in counts.items() for _ in range(c)]
    rng.shuffle(out)
    return out


# --------------------------------------------------------------------------- poison Kafka


@dataclass(frozen=True)
class KafkaPoison:
    """One hostile record for the ``topic`` (``"impressions"`` or ``"clicks"``) input."""

    kind: str
    topic: str
    key: bytes | None
    value: bytes | None


def _impression(rng: random.Random, now: float) -> dict[str, Any]:
    return {"type": "impression", "impression_id": f"poison-{rng.randrange(10**9)}", "request_id": "r",
            "user_id": f"user-{rng.randrange(1000)}", "item_id": f"item-{rng.randrange(500)}",
            "position": rng.randrange(10), "served_at": now - rng.uniform(0, 5), "context": {"device": "ios"},
            "v": 1}


def _click(rng: random.Random, now: float) -> dict[str, Any]:
    return {"type": "click", "impression_id": f"poison-{rng.randrange(10**9)}", "user_id": f"user-{rng.randrange(1000)}",
            "item_id": f"item-{rng.randrange(500)}", "clicked_at": now - rng.uniform(0, 5), "v": 1}


def _wire_rejects(topic: str, value: bytes) -> bool:
    from em3 import codec
    from em3.errors import DecodeError

    try:
        (codec.decode_impression if topic == "impressions" else codec.decode_click)(value)
    except DecodeError:
        return True
    return False


def _kafka_kinds(now: float) -> dict[str, tuple[Callable[[random.Random], tuple[str, bytes | None]], int | None]]:
    """Kind -> (builder returning (topic, value), cap)."""

    def rec(rng, topic):
        return _impression(rng, now) if topic == "impressions" else _click(rng, now)

    def on_either(make):
        def build(rng):
            topic = rng.choice(["impressions", "clicks"])
            return topic, make(rng, topic)
        return build

    def bad_bytes(rng, topic):
        return b"\xff" + bytes(rng.randrange(0x80, 0x100) for _ in range(rng.randrange(0, 64)))

    def surrogate_escaped(rng, topic):
        body = rec(rng, topic)
        return json.dumps(body).replace('"user_id": "', '"user_id": "\\ud800', 1).encode()

    def surrogate_raw(rng, topic):
        body = json.dumps(rec(rng, topic)).encode()
        return body.replace(b'"poison-', b'"\xed\xa0\x80poison-', 1)

    def truncated(rng, topic):
        body = json.dumps(rec(rng, topic)).encode()
        return body[: rng.randrange(1, len(body) - 1)]

    def control_id(rng, topic):
        body = rec(rng, topic)
        body[rng.choice(["impression_id", "user_id", "item_id"])] = _bad_id(rng)
        return _j(body)

    def huge(rng, topic):
        body = _impression(rng, now)
        body["context"] = {"blob": "Z" * (900 * 1024)}
        return _j(body)

    def future(rng, topic):
        body = rec(rng, topic)
        body["served_at" if topic == "impressions" else "clicked_at"] = now + 23 * 3600.0 + rng.uniform(0, 3600)
        return _j(body)

    def absurd(rng, topic):
        body = rec(rng, topic)
        body["served_at" if topic == "impressions" else "clicked_at"] = rng.choice([0.0, -1.0, 5e12])
        return _j(body)

    def missing(rng, topic):
        body = rec(rng, topic)
        required = [k for k in body if k not in ("type", "v", "context", "position")] or ["impression_id"]
        del body[rng.choice(required)]
        return _j(body)

    def wrong_type(rng, topic):
        body = rec(rng, topic)
        body["type"] = rng.choice(["sample", "item", "bogus", 7, None])
        return _j(body)

    def version(rng, topic):
        body = rec(rng, topic)
        body["v"] = rng.choice([99, 0, 2, "1", 1.5])
        return _j(body)

    def no_version(rng, topic):
        body = rec(rng, topic)
        del body["v"]
        return _j(body)

    def deep(rng, topic):
        depth = rng.choice([5000, 20000, 100000])
        body = json.dumps(rec(rng, topic))
        return body.replace('"v": 1', '"v": 1, "extra": ' + _deep(depth), 1).encode()

    def big_context(rng, topic):
        body = _impression(rng, now)
        if rng.random() < 0.5:
            body["context"] = {f"k{i}": "v" for i in range(33 + rng.randrange(100))}
        else:
            body["context"] = {"k": "v" * (257 + rng.randrange(10_000))}
        return _j(body)

    def mistyped(rng, topic):
        while True:  # a value may fit the field it lands on: draw again
            body = rec(rng, topic)
            field = rng.choice([k for k in body if k not in ("type", "v")])
            body[field] = _mistype(rng) if field != "context" else "not a map"
            if _wire_rejects(topic, _j(body)):
                return _j(body)

    def not_object(rng, topic):
        return rng.choice([b"[]", b"42", b'"impression"', b"null", b"true", b"[{\"type\": \"impression\"}]"])

    def empty(rng, topic):
        return rng.choice([b"", None])

    def out_of_range(rng, topic):
        body = _impression(rng, now)
        field, value = rng.choice([("position", -1), ("position", 10**6), ("propensity", 0.0),
                                   ("propensity", 1.5), ("model_version", -4)])
        body[field] = value
        return _j(body)

    def fuzz(rng, topic):
        while True:
            body = rec(rng, topic)
            if rng.random() < 0.3:
                body[f"f{rng.randrange(100)}"] = _fuzz_value(rng)  # unknown fields are ignored on the wire...
            body[rng.choice(sorted(body))] = _fuzz_value(rng)     # ...so also break a known one
            if _wire_rejects(topic, _j(body)):
                return _j(body)

    return {
        "bad_bytes": (on_either(bad_bytes), None),
        "lone_surrogate_escaped": (on_either(surrogate_escaped), None),
        "surrogate_utf8_bytes": (on_either(surrogate_raw), None),
        "truncated_json": (on_either(truncated), None),
        "control_char_id": (on_either(control_id), None),
        "record_900kb": (lambda rng: ("impressions", huge(rng, "impressions")), 12),
        "time_23h_ahead": (on_either(future), None),
        "absurd_time": (on_either(absurd), None),
        "missing_field": (on_either(missing), None),
        "wrong_type_field": (on_either(wrong_type), None),
        "unknown_version": (on_either(version), None),
        "missing_version": (on_either(no_version), None),
        "deep_nesting": (on_either(deep), None),
        "huge_context": (lambda rng: ("impressions", big_context(rng, "impressions")), None),
        "mistyped_field": (on_either(mistyped), None),
        "not_an_object": (on_either(not_object), None),
        "empty_or_null_value": (on_either(empty), None),
        "out_of_range": (lambda rng: ("impressions", out_of_range(rng, "impressions")), None),
        "fuzz": (on_either(fuzz), None),
    }


def kafka_poisons(n: int, seed: int = 0, now: float | None = None) -> list[KafkaPoison]:
    """``n`` hostile records of every kind, shuffled, seeded (keys are user-like ids)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, but {n} is given")
    rng = random.Random(seed)
    kinds = _kafka_kinds(time.time() if now is None else now)
    counts = _allocate(n, {k: cap for k, (_, cap) in kinds.items()}, rng)
    out = []
    for name, count in counts.items():
        for _ in range(count):
            topic, value = kinds[name][0](rng)
            out.append(KafkaPoison(name, topic, f"user-{rng.randrange(1000)}".encode(), value))
    rng.shuffle(out)
    return out


# --------------------------------------------------------------------------- the live stack


def _pid_children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = defaultdict(list)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children[ppid].append(int(entry))
    return children


def _descendants(pid: int) -> list[int]:
    tree, out, todo = _pid_children(), [], [pid]
    while todo:
        p = todo.pop()
        for c in tree.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class Supervised:
    """A component subprocess; a SIGKILL from us is a kill (restarted at once, as a
    supervisor would), an exit on its own is a crash (counted, then restarted)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], cwd: Path, log_dir: Path) -> None:
        self.name, self.argv, self.env, self.cwd, self.log_dir = name, argv, env, cwd, log_dir
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.kills = 0
        self.crashes: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def start(self) -> None:
        from em3.app.services import die_with_parent

        self.starts += 1
        log_file = open(self.log_dir / f"{self.name}.{self.starts}.log", "wb")
        self.proc = subprocess.Popen([sys.executable, *self.argv], env=self.env, cwd=self.cwd, stdout=log_file,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
        log_file.close()

    def kill_and_restart(self) -> int:
        with self.lock:
            pid = self.proc.pid
            os.kill(pid, signal.SIGKILL)
            self.proc.wait(30)
            self.kills += 1
            self.start()
            return pid

    def check(self) -> None:
        with self.lock:
            if self.proc is None or self.proc.poll() is None:
                return
            path = self.log_dir / f"{self.name}.{self.starts}.log"
            tail = path.read_text(errors="replace")[-1500:] if path.exists() else ""
            self.crashes.append({"at": time.time(), "code": self.proc.returncode, "log_tail": tail})
            log.error("%s exited on its own with %s; restarting it. Log tail:\n%s", self.name,
                      self.proc.returncode, tail)
            self.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                return
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class Recorder:
    """Everything the traffic and poison threads observe (thread-safe enough: each
    list is appended to by one thread, read after they stop)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.served: dict[str, float] = {}          # impression id -> when its response came
        self.ranks: list[tuple[float, float, str, int | None]] = []  # start, end, outcome, version
        self.versions = Counter()
        self.clicks = Counter()
        self.http_status = defaultdict(Counter)     # poison kind -> status
        self.poison_5xx: list[dict[str, Any]] = []
        self.poison_connection_errors: list[dict[str, Any]] = []
        self.unauth_accepted: list[str] = []
        self.poison_sent = 0
        self.server_down: list[list[float]] = []    # [killed_at, ready_again_at]
        self.logger_counts: dict[int, dict[str, float]] = {}  # server pid -> last scraped logger counters


def _server_is_down(rec: Recorder, t: float) -> bool:
    return any(a <= t <= (b if b is not None else float("inf")) for a, b in rec.server_down)


class Traffic:
    """Simulated users: paced ``/v1/rank`` calls, clicks posted when due."""

    def __init__(self, world: Any, url: str, api_key: str, rate: float, rec: Recorder, seed: int) -> None:
        import httpx

        self.world, self.url, self.rate, self.rec = world, url, rate, rec
        self.headers = {"Authorization": f"Bearer {api_key}"}
        self.stop = threading.Event()
        self.world_lock = threading.Lock()
        self.pending: list[tuple[float, int, dict[str, Any]]] = []
        self.pending_lock = threading.Lock()
        self.n = 0
        self.httpx = httpx
        self.threads = [threading.Thread(target=self._ranker, args=(i, 2), daemon=True) for i in range(2)]
        self.threads.append(threading.Thread(target=self._clicker, daemon=True))

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _ranker(self, index: int, of: int) -> None:
        client = self.httpx.Client(timeout=10.0)
        period = of / self.rate
        next_at = time.monotonic() + index * period / of
        while not self.stop.is_set():
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            next_at = max(next_at + period, time.monotonic() - period)
            with self.world_lock:
                req = self.world.next_request(time.time())
            body = {"user_id": req.user_id, "item_ids": list(req.candidates), "context": dict(req.context), "k": 10}
            t0 = time.time()
            outcome, version = "error", None
            try:
                r = client.post(f"{self.url}/v1/rank", json=body)
                outcome = str(r.status_code)
                if r.status_code == 200:
                    data = r.json()
                    version = int(data["model_version"])
                    now = time.time()
                    with self.rec.lock:
                        for item in data["items"]:
                            self.rec.served[item["impression_id"]] = now
                        self.rec.versions[version] += 1
                    with self.world_lock:
                        feedback = self.world.respond(req.user_id, [i["item_id"] for i in data["items"]], now)
                    with self.pending_lock:
                        for fb, item in zip(feedback, data["items"]):
                            if fb.clicked:
                                self.n += 1
                                heapq.heappush(self.pending, (now + fb.delay_s, self.n, {
                                    "impression_id": item["impression_id"], "user_id": req.user_id,
                                    "item_id": item["item_id"]}))
            except self.httpx.TimeoutException:
                outcome = "timeout"
            except self.httpx.HTTPError as exc:
                outcome = f"error:{type(exc).__name__}"
            self.rec.ranks.append((t0, time.time(), outcome, version))
        client.close()

    def _clicker(self) -> None:
        client = self.httpx.Client(timeout=10.0, headers=self.headers)
        while not (self.stop.is_set() and not self.pending):
            with self.pending_lock:
                due = self.pending[0][0] if self.pending else None
                item = heapq.heappop(self.pending)[2] if due is not None and due <= time.time() else None
            if item is None:
                time.sleep(0.02)
                continue
            try:
                r = client.post(f"{self.url}/v1/click", json=item)
                self.rec.clicks[str(r.status_code)] += 1
            except self.httpx.HTTPError as exc:
                self.rec.clicks[f"error:{type(exc).__name__}"] += 1
        client.close()


def _paced(items: list[Any], span_s: float, stop: threading.Event) -> Iterator[Any]:
    """Yield ``items`` evenly spread over ``span_s`` seconds, until ``stop`` is set."""
    period = span_s / max(1, len(items))
    start = time.monotonic()
    for n, item in enumerate(items):
        if stop.is_set():
            return
        delay = start + n * period - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        yield item


def _send_http_poisons(poisons: list[HttpPoison], url: str, api_key: str, span_s: float, rec: Recorder,
                       stop: threading.Event) -> None:
    """Send ``poisons`` spread over ``span_s``; a refused connection while the server is
    down (killed by us) is retried, any other transport error is recorded."""
    import httpx

    client = httpx.Client(timeout=30.0)
    for p in _paced(poisons, span_s, stop):
        headers = {"content-type": "application/json"}
        if p.auth == "key":
            headers["authorization"] = f"Bearer {api_key}"
        elif p.auth == "wrong":
            headers["authorization"] = f"Bearer {api_key[::-1]}x"
        for attempt in range(120):
            t = time.time()
            try:
                r = client.post(url + p.path, content=p.body, headers=headers)
            except httpx.HTTPError as exc:
                if _server_is_down(rec, t) or _server_is_down(rec, time.time()):
                    time.sleep(1.0)
                    continue
                rec.poison_connection_errors.append({"kind": p.kind, "error": repr(exc)[:200], "at": t})
                rec.http_status[p.kind][f"error:{type(exc).__name__}"] += 1
                break
            rec.http_status[p.kind][str(r.status_code)] += 1
            if r.status_code >= 500:
                rec.poison_5xx.append({"kind": p.kind, "status": r.status_code, "body": r.text[:200]})
            if p.auth != "key" and p.path != _RANK and 200 <= r.status_code < 300:
                rec.unauth_accepted.append(p.kind)
            break
        rec.poison_sent += 1
    client.close()


class KafkaPoisoner:
    """Produces the poison records over a span; remembers where each landed."""

    def __init__(self, settings: Any, poisons: list[KafkaPoison]) -> None:
        from stream.kafka import make_producer

        self.settings, self.poisons = settings, poisons
        self.producer = make_producer(settings.kafka, linger_ms=5, message_max_bytes=2_000_000)
        self.landed: dict[tuple[str, int, int], str] = {}
        self.failed: list[str] = []

    def run(self, span_s: float, stop: threading.Event) -> None:
        topics = {"impressions": self.settings.topics.impressions, "clicks": self.settings.topics.clicks}
        chunk = 25
        chunks = [self.poisons[i:i + chunk] for i in range(0, len(self.poisons), chunk)]
        for part in _paced(chunks, span_s, stop):
            for p in part:
                def report(err: Any, msg: Any, kind: str = p.kind) -> None:
                    if err is None:
                        self.landed[(msg.topic(), msg.partition(), msg.offset())] = kind
                    else:
                        self.failed.append(f"{kind}: {err}")
                while True:
                    try:
                        self.producer.produce(topics[p.topic], key=p.key, value=p.value, on_delivery=report)
                        break
                    except BufferError:
                        self.producer.poll(0.2)
            self.producer.poll(0)
        self.producer.flush(120)


class Auditor:
    """Reads the samples and dead-letter topics from the beginning, all along the run
    (one consumer for both, so the broker is asked once per fetch), and keeps what
    the accounting needs; :meth:`finish` reads on to the topics' current ends."""

    def __init__(self, settings: Any) -> None:
        from stream.kafka import OFFSET_BEGINNING, TopicPartition, make_consumer, partition_counts

        self.settings = settings
        self.topics = [settings.topics.samples, settings.topics.dead_letter]
        self.parts = [(t, p) for t, n in partition_counts(settings.kafka, self.topics).items() for p in range(n)]
        self.consumer = make_consumer(settings.kafka, f"chaos-audit-{time.time_ns()}", enable_partition_eof=True)
        self.consumer.assign([TopicPartition(t, p, OFFSET_BEGINNING) for t, p in self.parts])
        self.samples_by_impression: Counter = Counter()
        self.sample_ids: set[str] = set()
        self.sample_records = 0
        self.dead_impressions: dict[str, str] = {}
        self.poison_back: dict[tuple[str, int, int], str] = {}
        self.quarantined_samples: dict[str, str] = {}
        self.dl_reasons: Counter = Counter()
        self.errors = 0
        self.at_end: set[tuple[str, int]] = set()
        self.last_record = time.monotonic()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - the audit must outlive a record it cannot read
                self.errors += 1
                log.exception("audit: reading failed")

    def poll(self) -> None:
        for msg in self.consumer.consume(5000, timeout=0.5):
            err = msg.error()
            key = (msg.topic(), msg.partition())
            if err is not None:
                if err.code() == -191:  # _PARTITION_EOF
                    self.at_end.add(key)
                continue
            self.at_end.discard(key)
            self.last_record = time.monotonic()
            if msg.topic() == self.settings.topics.samples:
                self._sample(msg)
            else:
                self._dead_letter(msg)

    def _sample(self, msg: Any) -> None:
        obj = json.loads(msg.value())
        self.sample_records += 1
        self.sample_ids.add(obj["sample_id"])
        self.samples_by_impression[obj["impression"]["impression_id"]] += 1

    def _dead_letter(self, msg: Any) -> None:
        from stream.kafka import parse_dead_letter

        d = parse_dead_letter(msg)
        self.dl_reasons[d.reason] += 1
        if not d.reason:
            return
        self.poison_back[(d.source_topic, d.source_partition, d.source_offset)] = d.reason
        try:
            obj = json.loads(d.value)
        except (ValueError, RecursionError):  # poison, dead-lettered as it came (or cut to 64 KiB)
            return
        if not isinstance(obj, dict):
            return
        if d.source_topic == self.settings.topics.impressions and obj.get("type") == "impression":
            self.dead_impressions[str(obj.get("impression_id"))] = d.reason
        if d.source_topic == self.settings.topics.samples and "sample_id" in obj:
            self.quarantined_samples[str(obj["sample_id"])] = d.reason

    def finish(self, idle_timeout_s: float = 60.0, max_s: float = 600.0, close: bool = True) -> bool:
        """Read on until every partition reports its end; True if it got there."""
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(30)
        self.last_record = time.monotonic()
        deadline = time.monotonic() + max_s
        while len(self.at_end) < len(self.parts):
            if time.monotonic() > deadline or time.monotonic() - self.last_record > idle_timeout_s:
                break
            self.poll()
        done = len(self.at_end) == len(self.parts)
        if close:
            self.consumer.close()
        return done


def _end_offsets(settings: Any, topics: list[str]) -> dict[str, int]:
    """``topic:partition`` -> high watermark (how many records the join has to read)."""
    from stream.kafka import TopicPartition, make_consumer, partition_counts

    consumer = make_consumer(settings.kafka, f"chaos-offsets-{time.time_ns()}")
    try:
        out = {}
        for topic, n in partition_counts(settings.kafka, topics).items():
            for p in range(n):
                out[f"{topic}:{p}"] = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
        return out
    finally:
        consumer.close()


def _get(url: str, timeout_s: float = 3.0) -> Any:
    import httpx

    try:
        return httpx.get(url, timeout=timeout_s)
    except httpx.HTTPError:
        return None


def _logger_counters(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith("em3_serving_impressions_"):
            name, _, value = line.partition(" ")
            key = name[len("em3_serving_impressions_"):].removesuffix("_total")
            if key in ("enqueued", "produced", "dropped", "failed"):
                out[key] = float(value)
    return out


# --------------------------------------------------------------------------- the run


def _learner_actor_pid(driver: Supervised) -> int | None:
    if driver.proc is None or driver.proc.poll() is not None:
        return None
    for pid in _descendants(driver.proc.pid):
        if _cmdline(pid).startswith("ray::LearnerWorker"):
            return pid
    return None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration-s", type=float, default=None, help="traffic duration (default 240, quick 110)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model, 200 poisons of each sort, "
                        "5 s outages")
    parser.add_argument("--rate", type=float, default=5.0, help="simulated /v1/rank requests per second")
    parser.add_argument("--poison-requests", type=int, default=None, help="default 1200 (quick 200)")
    parser.add_argument("--poison-records", type=int, default=None, help="default 1200 (quick 200)")
    parser.add_argument("--outage-s", type=float, default=None, help="each Redis outage (default 20, quick 5)")
    parser.add_argument("--startup-timeout-s", type=float, default=900.0)
    parser.add_argument("--drain-timeout-s", type=float, default=300.0,
                        help="longest wait for the join to label everything after the traffic (while it progresses)")
    parser.add_argument("--keep-logs", default=None, help="copy the components' logs here")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if threading.current_thread() is threading.main_thread():  # SIGTERM stops the stack like Ctrl-C
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    duration = args.duration_s or (110.0 if args.quick else 240.0)
    n_http = args.poison_requests or (200 if args.quick else 1200)
    n_kafka = args.poison_records or (200 if args.quick else 1200)
    outage_s = args.outage_s or (5.0 if args.quick else 20.0)
    rng = random.Random(args.seed)
    t_start = time.monotonic()

    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        try:
            return _run(args, Path(tmp), duration, n_http, n_kafka, outage_s, rng, t_start)
        finally:
            if args.keep_logs:
                import shutil

                shutil.copytree(Path(tmp) / "logs", args.keep_logs, dirs_exist_ok=True)


def _run(args: Any, tmp: Path, duration: float, n_http: int, n_kafka: int, outage_s: float,
         rng: random.Random, t_start: float) -> dict[str, Any]:
    from em3.redis_stores import RedisAppliedLog, RedisContentStore, RedisSnapshotStore, connect
    from em3.app.services import LocalServices, free_port, wait_until
    from simulators.delays import LogNormalDelay
    from simulators.world import World, WorldConfig
    from stream.kafka import ensure_topics, parse_dead_letter

    logs = logs_dir = tmp / "logs"
    logs.mkdir()
    services = LocalServices(tmp / "services", durable=True, start_timeout_s=60.0)
    info = services.start()
    components: list[Supervised] = []
    stop_all = threading.Event()
    redis_pid = services.pids()["redis"]
    try:
        settings = info.settings()
        ensure_topics(settings.kafka, settings.topics, partitions=2)
        client = connect(settings.redis)
        store = RedisSnapshotStore(client, settings.redis_prefix, signing_key=settings.snapshot_key)
        world = World(WorldConfig(n_users=200, n_items=200, n_candidates=30, start_time=time.time(),
                                  horizon_s=duration + 3600.0, new_items_per_hour=0.0, base_attraction=0.2,
                                  quality_scale=1.0, preference_scale=4.0,
                                  delay=LogNormalDelay(median_s=1.5, sigma=0.5, max_s=15.0), seed=args.seed))
        RedisContentStore(client, settings.redis_prefix).put_many(world.catalog(time.time(), image_size=64))

        ray_tmp = Path("/tmp") / f"chaos-ray-{os.getpid()}"
        env = {**os.environ, **info.env(), "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
               os.environ.get("PYTHONPATH")])), "OMP_NUM_THREADS": "1", "RAY_TMPDIR": str(ray_tmp)}
        join_port, server_port = free_port(), free_port()
        join = Supervised("join", ["-m", "stream", "join", "--window-s", "20", "--allowed-lateness-s", "2",
                                   "--idle-timeout-s", "2", "--web-port", str(join_port)], env, tmp, logs)
        learn_argv = ["-m", "em3", "learn", "--model-line", LINE, "--variant", "em3", "--learners", "1"]
        if args.quick:
            learn_argv.append("--tiny")
        learner = Supervised("learner", learn_argv, env, tmp, logs)
        server = Supervised("server", ["-m", "em3", "serve", "--model-line", LINE, "--port", str(server_port),
                                       "--poll-interval", "1.0"], env, tmp, logs)
        url = f"http://127.0.0.1:{server_port}"
        join_url = f"http://127.0.0.1:{join_port}/join/metrics"
        for c in (join, learner):
            c.start()
            components.append(c)

        def check_all() -> None:
            for c in components:
                c.check()

        wait_until(lambda: _get(join_url) is not None and _get(join_url).status_code == 200, args.startup_timeout_s,
                   "the join's metrics view", check=check_all, interval_s=0.5)
        wait_until(lambda: store.latest_version(LINE) is not None, args.startup_timeout_s,
                   "the learner's first snapshot", check=check_all, interval_s=0.5)
        server.start()
        components.append(server)

        def server_ready() -> bool:
            r = _get(url + "/readyz")
            return r is not None and r.status_code == 200

        wait_until(server_ready, args.startup_timeout_s, "the server to be ready", check=check_all, interval_s=0.5)
        startup_s = time.monotonic() - t_start
        log.warning("stack up after %.0f s; traffic for %.0f s", startup_s, duration)

        rec = Recorder()
        actor_pid = wait_until(lambda: _learner_actor_pid(learner), 120, "the learner actor's pid")
        learner_actor_crashes: list[dict[str, Any]] = []
        expected_actor_death = [False]
        last_actor = [actor_pid]

        def monitor() -> None:
            while not stop_all.wait(0.5):
                check_all()
                pid = _learner_actor_pid(learner)
                if pid is not None and pid != last_actor[0]:
                    if not expected_actor_death[0]:
                        learner_actor_crashes.append({"at": time.time(), "old": last_actor[0], "new": pid})
                    expected_actor_death[0] = False
                    last_actor[0] = pid
                r = _get(url + "/metrics")
                if r is not None and r.status_code == 200 and server.proc is not None:
                    counts = _logger_counters(r.text)
                    if counts:
                        rec.logger_counts[server.proc.pid] = counts

        threading.Thread(target=monitor, daemon=True).start()

        traffic = Traffic(world, url, info.api_key, args.rate, rec, args.seed)
        now = time.time()
        http_list = http_poisons(n_http, seed=args.seed, now=now, api_key=info.api_key)
        kafka_list = kafka_poisons(n_kafka, seed=args.seed, now=now)
        poisoner = KafkaPoisoner(settings, kafka_list)
        auditor = Auditor(settings)
        auditor.start()
        t0 = time.time()
        traffic.start()
        span = 0.85 * duration
        threads = [threading.Thread(target=_send_http_poisons, args=(http_list, url, info.api_key, span, rec,
                                                                     stop_all), daemon=True),
                   threading.Thread(target=poisoner.run, args=(span, stop_all), daemon=True)]
        for t in threads:
            t.start()

        events: list[dict[str, Any]] = []
        help_needed: list[str] = []

        def at(fraction: float) -> None:
            delay = t0 + fraction * duration - time.time()
            if delay > 0:
                time.sleep(delay)

        # Forged snapshot: the latest blob and manifest under a new version, signature emptied.
        # It comes once the learner has published from samples (the join holds a click's
        # sample until its 20 s window closes), so the watch below asks whether the learner
        # publishes over a forged pointer, not how soon its first samples come.
        at(0.08)
        try:
            wait_until(lambda: (_latest_verified(store) or 0) >= 2, 120.0, "a version learned from samples",
                       interval_s=0.5)
            learned_before_forgery = True
        except TimeoutError:  # forge anyway: the watch below then reports what happened
            learned_before_forgery = False
        manifest, blob = store.get(LINE)
        forged = store.next_version(LINE)
        forged_manifest = msgspec.structs.replace(manifest, version=forged, signature="")
        p = settings.redis_prefix
        client.set(f"{p}snap:{LINE}:{forged}:blob", blob)
        client.set(f"{p}snap:{LINE}:{forged}:manifest", msgspec.json.encode(forged_manifest))
        client.zadd(f"{p}snap:{LINE}:versions", {str(forged): forged})
        client.set(f"{p}snap:{LINE}:latest", forged)
        client.publish(store.channel, json.dumps({"line": LINE, "version": forged}))
        forged_at = time.time()
        events.append({"event": "forged_snapshot", "version": forged, "from": manifest.version,
                       "t": round(forged_at - t0, 1), "learned_before": learned_before_forgery})
        # Does the line move on by itself (the learner publishes a signed version above
        # the forged one)? If not within the watch, an operator rolls the pointer back.
        watch_s = 10.0 if args.quick else 20.0
        try:
            wait_until(lambda: (_latest_verified(store) or 0) > forged, watch_s, "a signed version after the forgery",
                       interval_s=0.5)
            forgery_outcome = {"learner_published_past_it": True}
        except TimeoutError:
            good = _latest_verified(store)
            store.rollback(LINE, good)
            help_needed.append(f"pointer rolled back to v{good} after the forged v{forged}: no signed version "
                               f"was published in {watch_s:.0f} s")
            forgery_outcome = {"learner_published_past_it": False, "rolled_back_to": good,
                               "rolled_back_at_t": round(time.time() - t0, 1)}
        events[-1].update(forgery_outcome)

        def redis_outage(n: int) -> tuple[float, float]:
            os.kill(redis_pid, signal.SIGSTOP)
            began = time.time()
            try:
                time.sleep(outage_s)
            finally:
                os.kill(redis_pid, signal.SIGCONT)
            ended = time.time()
            events.append({"event": f"redis_outage_{n}", "t": round(began - t0, 1), "s": round(ended - began, 1)})
            return began, ended

        outages = []
        at(0.16)
        outages.append(redis_outage(1))

        def kill(component: Supervised, lo: float, hi: float) -> None:
            at(rng.uniform(lo, hi))
            t = time.time()
            if component is server:
                rec.server_down.append([t, None])
            pid = component.kill_and_restart()
            events.append({"event": f"sigkill_{component.name}", "pid": pid, "t": round(t - t0, 1)})

        kill(join, 0.28, 0.34)
        at(0.40)
        t = time.time()
        new_pid = services.restart_kafka(kill=True, timeout_s=60.0)
        events.append({"event": "broker_restart", "t": round(t - t0, 1), "s": round(time.time() - t, 1),
                       "new_pid": new_pid})

        at(rng.uniform(0.46, 0.52))
        pid = _learner_actor_pid(learner)
        if pid is None:
            raise RuntimeError("no learner actor process to kill")
        expected_actor_death[0] = True
        t = time.time()
        os.kill(pid, signal.SIGKILL)
        learner.kills += 1
        events.append({"event": "sigkill_learner_actor", "pid": pid, "t": round(t - t0, 1)})

        at(0.56)
        outages.append(redis_outage(2))

        kill(server, 0.66, 0.72)
        try:
            wait_until(server_ready, min(args.startup_timeout_s, 600.0), "the server to be ready after its restart",
                       interval_s=0.2)
            rec.server_down[-1][1] = time.time()
            events[-1]["ready_again_s"] = round(rec.server_down[-1][1] - rec.server_down[-1][0], 1)
        except TimeoutError:
            events[-1]["ready_again_s"] = None
        last_fault = time.time()

        at(1.0)
        traffic.stop.set()
        for th in traffic.threads[:2]:
            th.join(30)
        traffic_end = time.time()
        log.warning("traffic stopped; draining")
        for th in threads:
            th.join(300)
        traffic.threads[2].join(60)

        # -- drain: the join labels everything (the window closes by idleness), then
        # the learner applies every sample.
        def join_metrics() -> dict[str, Any]:
            r = _get(join_url)
            return r.json() if r is not None and r.status_code == 200 else {}

        def join_drained() -> bool:
            m = join_metrics()
            return bool(m) and m.get("pending_impressions", 1) == 0 and m.get("held_clicks", 1) == 0

        # The join may lag (a durable broker reads slowly): wait while it makes progress.
        drained, progress, last_change, drain_start = False, None, time.monotonic(), time.monotonic()
        while time.monotonic() - drain_start < args.drain_timeout_s:
            check_all()
            if join_drained():
                drained = True
                break
            m = join_metrics()
            if m.get("events_in") != progress:
                progress, last_change = m.get("events_in"), time.monotonic()
            elif time.monotonic() - last_change > 90:
                break
            time.sleep(1.0)
        join_at_drain_end = {k: join_metrics().get(k) for k in ("events_in", "pending_impressions", "held_clicks",
                                                                 "watermark_min", "event_time_delay_s",
                                                                 "next_offsets")}
        drain_s = time.monotonic() - drain_start
        time.sleep(3.0)

        audit_complete = auditor.finish(close=False)
        sample_ids = auditor.sample_ids
        samples_by_impression = auditor.samples_by_impression

        def applied() -> int:
            version = _latest_verified(store)
            return -1 if version is None else int(store.manifest(LINE, version).stats["totals"]["samples_applied"])

        learner_caught_up = True
        try:
            wait_until(lambda: applied() >= len(sample_ids), args.drain_timeout_s / 2, "the learner to apply every "
                       "sample", check=check_all, interval_s=1.0)
        except TimeoutError:
            learner_caught_up = False

        # The learner may dead-letter samples (quarantine) meanwhile: read the rest.
        late_complete = auditor.finish(idle_timeout_s=20.0, max_s=120.0)
        dead_impressions, poison_back = auditor.dead_impressions, auditor.poison_back
        quarantined_samples, dl_reasons = auditor.quarantined_samples, auditor.dl_reasons
        input_end = _end_offsets(settings, [settings.topics.impressions, settings.topics.clicks])
        final_join = join_metrics()
        final_ready = _get(url + "/readyz")
        final_ready = final_ready.json() if final_ready is not None else {}
        final_version = _latest_verified(store)
        final_manifest = store.manifest(LINE, final_version)
        chain = list(RedisAppliedLog(client, settings.redis_prefix).chain(LINE, final_version))
        applied_counts = Counter(i for _, ids in chain for values in ids.values() for i in values)
        versions_after_last_fault = [v for v in store.versions(LINE) if _created(store, v) > last_fault]
        pointer = store.latest_version(LINE)
        stop_all.set()
    finally:
        stop_all.set()
        try:
            os.kill(redis_pid, signal.SIGCONT)
        except OSError:
            pass
        for c in reversed(components):
            try:
                c.stop()
            except Exception as exc:  # noqa: BLE001 - keep stopping the rest
                log.warning("stopping %s failed: %r", c.name, exc)
        services.stop()
        import shutil

        shutil.rmtree(Path("/tmp") / f"chaos-ray-{os.getpid()}", ignore_errors=True)

    # -- accounting -------------------------------------------------------------
    served = dict(rec.served)
    joined = {i for i in served if samples_by_impression.get(i)}
    dead = {i for i in served if i not in joined and i in dead_impressions}
    unaccounted = [i for i in served if i not in joined and i not in dead]
    counted_lost = int(sum(c.get("dropped", 0) + c.get("failed", 0) for c in rec.logger_counts.values()))
    kills_of_server = [d[0] for d in rec.server_down]
    near_kill = [i for i in unaccounted if any(0 <= k - served[i] <= 1.0 for k in kills_of_server)]
    lost = max(0, len(unaccounted) - counted_lost)
    # Where the join had got to: its slowest partition's watermark (event time) when
    # the drain ended. An impression served after it may simply be unread yet.
    horizon = join_at_drain_end.get("watermark_min")
    beyond = [i for i in unaccounted if horizon is not None and served[i] > horizon + 2.0]

    landed = poisoner.landed
    not_back = {k: v for k, v in landed.items() if k not in poison_back}
    produced_ids = sample_ids
    quarantined = set(quarantined_samples) & produced_ids
    samples_lost = len(produced_ids - set(applied_counts) - quarantined)
    applied_twice = sum(c - 1 for c in applied_counts.values() if c > 1)

    in_outage = [r for r in rec.ranks if any(b <= r[0] <= e for b, e in outages)]
    failed_in_outage = [r for r in in_outage if r[2] != "200" or r[1] - r[0] > 10.0]
    crashed = sum(len(c.crashes) for c in components) + len(learner_actor_crashes)
    forged_served = rec.versions.get(forged, 0) > 0
    ranks_after_fault = [r for r in rec.ranks if r[0] > last_fault]
    learner_logs = sorted(logs_dir.glob("learner.*.log"))
    driver_saw_deaths = sum(p.read_text(errors="replace").count("learner died") for p in learner_logs)
    recovered = (crashed == 0 and not help_needed and drained and learner_caught_up and bool(final_ready.get("ready"))
                 and bool(versions_after_last_fault)
                 and all(r[2] == "200" for r in ranks_after_fault[-20:]))
    outcomes = Counter(r[2] for r in rec.ranks)
    result = {
        "poison_requests": rec.poison_sent,
        "poison_request_kinds": len({p.kind for p in http_list}),
        "poison_records": len(kafka_list),
        "poison_record_kinds": len({p.kind for p in kafka_list}),
        "http_5xx": len(rec.poison_5xx) + sum(1 for r in rec.ranks if r[2].startswith("5") and r[2] != "503")
        + sum(n for s, n in rec.clicks.items() if s.startswith("5") and s != "503"),
        "http_503": sum(1 for r in rec.ranks if r[2] == "503") + rec.clicks.get("503", 0),
        "poison_connection_errors": len(rec.poison_connection_errors),
        "crashed_components": crashed,
        "redis_outages": len(outages),
        "redis_outage_s": outage_s,
        "rank_requests_during_redis_outage": len(in_outage),
        "rank_failed_during_redis_outage": len(failed_in_outage),
        "broker_restarts": 1,
        "impressions_served": len(served),
        "impressions_joined": len(joined),
        "impressions_dead_lettered": len(dead),
        "impressions_counted_lost": counted_lost,
        "impressions_unaccounted": len(unaccounted),
        "impressions_lost": lost,
        "impressions_lost_near_server_kill": min(lost, len(near_kill)),
        "impressions_unaccounted_beyond_join_position": len(beyond) if horizon is not None else None,
        "impressions_unaccounted_before_join_position": (len(unaccounted) - len(beyond)
                                                         if horizon is not None else None),
        "samples_distinct": len(produced_ids),
        "samples_applied": sum(applied_counts.values()),
        "samples_quarantined": len(quarantined),
        "samples_lost": samples_lost,
        "applied_twice": applied_twice,
        "samples_method": "applied-ids chain (RedisAppliedLog) from the final verified snapshot, "
                          "against distinct sample ids on the samples topic",
        "applied_counter_in_snapshot": int(final_manifest.stats["totals"]["samples_applied"]),
        "kills": join.kills + learner.kills + server.kills,
        "help_needed": help_needed,
        "kills_by_component": {"join": join.kills, "learner_actor": learner.kills, "server": server.kills},
        "recovered_without_help": recovered,
        "unsigned_snapshot_served": forged_served,
        "unauthenticated_write_accepted": bool(rec.unauth_accepted),
        "poison_records_not_dead_lettered": len(not_back),
        "poison_records_not_delivered": len(poisoner.failed),
        "model": "em3 tiny (--quick)" if args.quick else "em3 (default ModelConfig.for_variant('em3'))",
        "runtime": "em3 learn --learners 1 (Ray actor), em3 serve, python -m stream join (faust), "
                   "Tansu durable + Redis with password",
        "wall_s": round(time.monotonic() - t_start, 1),
        "details": {
            "startup_s": round(startup_s, 1),
            "traffic_s": round(traffic_end - t0, 1),
            "events": events,
            "learner_driver_logged_actor_deaths": driver_saw_deaths,
            "rank_outcomes": dict(outcomes),
            "rank_failures_outside_server_restart": dict(Counter(
                r[2] for r in rec.ranks if r[2] != "200" and not _server_is_down(rec, r[0]))),
            "click_outcomes": dict(rec.clicks),
            "versions_served": len(rec.versions),
            "final_version": final_version,
            "final_pointer": pointer,
            "versions_published_after_last_fault": len(versions_after_last_fault),
            "join_drained": drained,
            "join_drain_s": round(drain_s, 1),
            "join_at_drain_end": join_at_drain_end,
            "input_high_watermarks": input_end,
            "join_backlog_records": sum(max(0, end - int((final_join.get("next_offsets") or {}).get(key, 0)))
                                        for key, end in input_end.items()),
            "learner_caught_up": learner_caught_up,
            "sample_records": auditor.sample_records,
            "audit_read_to_end": {"samples": audit_complete, "dead_letter": late_complete},
            "dead_letter_reasons": dict(dl_reasons),
            "join_final": {k: final_join.get(k) for k in ("events_in", "samples_out", "dead_letters", "quarantined",
                                                          "offset_resets", "pending_impressions", "degraded")},
            "server_ready_at_end": final_ready.get("ready"),
            "logger_counts": {str(k): v for k, v in rec.logger_counts.items()},
            "component_crashes": {c.name: [{"code": x["code"], "log_tail": x["log_tail"][-600:]} for x in c.crashes]
                                  for c in components if c.crashes},
            "learner_actor_crashes": learner_actor_crashes,
            "poison_5xx": rec.poison_5xx[:10],
            "poison_connection_error_samples": rec.poison_connection_errors[:10],
            "poison_http_status_by_kind": {k: dict(v) for k, v in sorted(rec.http_status.items())},
            "poison_records_not_back_by_kind": dict(Counter(not_back.values())),
            "unaccounted_impression_samples": unaccounted[:5],
        },
    }
    return result


def _latest_verified(store: Any) -> int | None:
    """The newest version of the line whose manifest verifies (the pointer may name a forged one)."""
    for version in sorted(store.versions(LINE), reverse=True):
        try:
            store.manifest(LINE, version)
            return version
        except Exception:  # noqa: BLE001 - forged, pruned: try the one before
            continue
    return None


def _created(store: Any, version: int) -> float:
    try:
        return store.manifest(LINE, version).created_at
    except Exception:  # noqa: BLE001
        return 0.0


if __name__ == "__main__":
    out = main()
    print(json.dumps(out))
