"""benchmarks/chaos.py's poison generators: many kinds, the counts asked for, and
every poison refused by the check meant to refuse it (so a schema regression that
lets one through fails here, fast, before a live chaos run)."""
import importlib.util
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from em3 import codec  # noqa: E402
from em3.errors import DecodeError  # noqa: E402
from em3.types import ClickRequest, ItemRequest, ItemsRequest, RankRequest  # noqa: E402
from stream.wire import decode_click_checked, decode_impression_checked  # noqa: E402

EXAMPLES = settings.default.max_examples  # the profile's: 100 in the full suite, 10 in the fast lane


def _load_chaos():
    # By path: putting benchmarks/ on sys.path would shadow the serving package
    # with benchmarks/serving.py.
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "chaos.py"
    spec = importlib.util.spec_from_file_location("chaos_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


chaos = _load_chaos()
KEY = "the-key"
MAX_BODY = 4 * 1024 * 1024  # em3 serve --max-body-bytes default
MAX_CANDIDATES = 1000       # em3 serve --max-candidates default
MAX_FUTURE_S = 300.0        # em3 serve --max-future default


@pytest.fixture(scope="module")
def app_decoder():
    pytest.importorskip("fastapi")
    from serving.app import _decode_body, _Invalid

    return _decode_body, _Invalid


def _server_refuses(poison: chaos.HttpPoison, decode_body, invalid, now: float) -> bool:
    """What the server does with ``poison``, checks in the server's order:
    body size (edge), API key (writes), schema, then the server's own limits."""
    if len(poison.body) > MAX_BODY:
        return poison.rejected_by == "size"
    if poison.path != chaos._RANK and poison.auth != "key":
        return poison.rejected_by == "auth"
    kinds = {chaos._RANK: (RankRequest,), chaos._CLICK: (ClickRequest,), chaos._ITEMS: (ItemsRequest, ItemRequest)}
    decoded = None
    for kind in kinds[poison.path]:
        try:
            decoded = decode_body(poison.body, kind)
            break
        except invalid:
            continue
    if decoded is None:
        return poison.rejected_by == "decoder"
    if isinstance(decoded, RankRequest):
        if len(decoded.item_ids) > MAX_CANDIDATES:
            return poison.rejected_by == "candidates"
        if decoded.served_at is not None and decoded.served_at > now + MAX_FUTURE_S:
            return poison.rejected_by == "future"
    if isinstance(decoded, ClickRequest) and decoded.clicked_at is not None:
        return decoded.clicked_at > now + MAX_FUTURE_S and poison.rejected_by == "future"
    return False


def test_http_poisons_have_the_asked_count_and_at_least_ten_kinds_each_well_represented():
    poisons = chaos.http_poisons(1200, seed=1, api_key=KEY)
    kinds = Counter(p.kind for p in poisons)
    assert len(poisons) == 1200
    assert len(kinds) >= 10
    assert {p.path for p in poisons} == {chaos._RANK, chaos._CLICK, chaos._ITEMS}
    assert min(kinds.values()) >= 10
    assert kinds["rank_oversize_body"] <= 10  # heavy kinds are capped


def test_http_poisons_are_seeded():
    now = time.time()
    assert chaos.http_poisons(200, seed=5, now=now) == chaos.http_poisons(200, seed=5, now=now)
    assert chaos.http_poisons(200, seed=5, now=now) != chaos.http_poisons(200, seed=6, now=now)


def test_every_http_poison_is_refused_by_its_check(app_decoder):
    decode_body, invalid = app_decoder
    now = time.time()
    poisons = chaos.http_poisons(1100, seed=0, now=now, api_key=KEY)
    accepted = [(p.kind, p.body[:120]) for p in poisons if not _server_refuses(p, decode_body, invalid, now)]
    assert accepted == []


@settings(max_examples=EXAMPLES // 4, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_http_poisons_of_any_seed_are_refused(app_decoder, seed):
    decode_body, invalid = app_decoder
    now = time.time()
    for p in chaos.http_poisons(80, seed=seed, now=now, api_key=KEY):
        if len(p.body) <= MAX_BODY:  # the 5 MB one costs time and is covered above
            assert _server_refuses(p, decode_body, invalid, now), (p.kind, p.body[:200])


def test_auth_poisons_carry_valid_bodies():
    """A keyless write must be refused for its missing key, not for its body."""
    for p in chaos.http_poisons(400, seed=2):
        if p.rejected_by == "auth":
            struct = ClickRequest if p.path == chaos._CLICK else ItemRequest
            import msgspec

            msgspec.json.decode(p.body, type=struct)
            assert p.auth in ("none", "wrong")


def _kafka_refused(p: chaos.KafkaPoison, latest: float) -> str:
    decode = decode_impression_checked if p.topic == "impressions" else decode_click_checked
    try:
        decode(p.value, latest)
    except DecodeError as exc:
        return exc.reason
    return ""


def test_kafka_poisons_have_the_asked_count_and_at_least_ten_kinds():
    poisons = chaos.kafka_poisons(1100, seed=3)
    kinds = Counter(p.kind for p in poisons)
    assert len(poisons) == 1100
    assert len(kinds) >= 10
    assert min(kinds.values()) >= 10
    assert {p.topic for p in poisons} == {"impressions", "clicks"}
    assert all(p.value is None or len(p.value) < 1_000_000 for p in poisons)  # fits a default Kafka message


def test_every_kafka_poison_is_dead_lettered_by_the_join_with_a_reason():
    now = time.time()
    poisons = chaos.kafka_poisons(1100, seed=0, now=now)
    reasons = {p.kind: set() for p in poisons}
    for p in poisons:
        reason = _kafka_refused(p, latest=now + 300.0)
        assert reason, (p.kind, p.topic, (p.value or b"")[:200])
        reasons[p.kind].add(reason)
    assert reasons["time_23h_ahead"] == {"absurd_timestamp"}
    assert reasons["bad_bytes"] == {"bad_bytes"}
    assert reasons["lone_surrogate_escaped"] == {"bad_json"}


def test_kafka_poisons_fail_the_plain_codec_except_the_future_ones():
    """Only the clock-relative check stops a 23 h-ahead record; everything else the schema stops."""
    now = time.time()
    for p in chaos.kafka_poisons(400, seed=4, now=now):
        decode = codec.decode_impression if p.topic == "impressions" else codec.decode_click
        if p.kind == "time_23h_ahead":
            decode(p.value)
            continue
        with pytest.raises(DecodeError):
            decode(p.value)


@settings(max_examples=EXAMPLES // 4, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_kafka_poisons_of_any_seed_are_refused(seed):
    now = time.time()
    for p in chaos.kafka_poisons(60, seed=seed, now=now):
        assert _kafka_refused(p, latest=now + 300.0), (p.kind, (p.value or b"")[:200])


def test_allocate_respects_caps_and_total():
    import random

    counts = chaos._allocate(100, {"a": None, "b": 3, "c": None}, random.Random(0))
    assert sum(counts.values()) == 100 and counts["b"] == 3
