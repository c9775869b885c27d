"""The HTTP contract, through FastAPI's TestClient on in-memory parts."""
from __future__ import annotations

import base64
import json

import pytest
from fastapi.testclient import TestClient

from em3 import codec
from em3.experiment import ArmConfig, ExperimentConfig
from serving.app import create_app
from serving.ranking import RankingConfig


@pytest.fixture
def runtime(make_runtime, publish):
    publish(1)
    rt = make_runtime(max_body_bytes=20_000, ranking=RankingConfig(max_candidates=50))
    rt.logger.start()
    for r in rt.reloaders.values():
        r.check()
    return rt


@pytest.fixture
def client(runtime):
    return TestClient(create_app(runtime))


def test_rank_returns_ranked_items_with_ids_version_and_unknowns(client, runtime, fake_producer):
    body = {"user_id": "u1", "item_ids": ["i1", "i2", "ghost", "i3"], "context": {"device": "ios"}, "k": 3,
            "served_at": 1.75e9}
    r = client.post("/v1/rank", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model_line"] == "main" and out["model_version"] == 1 and out["arm"] == "main"
    assert out["unknown_item_ids"] == ["ghost"]
    assert len(out["items"]) == 3
    scores = [i["score"] for i in out["items"]]
    assert scores == sorted(scores, reverse=True)
    assert [i["position"] for i in out["items"]] == [0, 1, 2]
    assert len({i["impression_id"] for i in out["items"]}) == 3
    assert all(i["impression_id"].startswith(out["request_id"]) for i in out["items"])
    runtime.logger.flush(5.0)
    logged = [codec.decode_impression(v) for t, _, v in fake_producer.records if t == "t.impressions"]
    assert [i.impression_id for i in logged] == [i["impression_id"] for i in out["items"]]
    assert all(i.model_version == 1 and i.arm == "main" and i.propensity == 1.0 for i in logged)
    assert logged[0].context == {"device": "ios"} and logged[0].served_at == 1.75e9


def test_rank_is_in_the_openapi_schema_and_served_without_the_edge(client, runtime):
    schema = client.get("/openapi.json").json()
    rank = schema["paths"]["/v1/rank"]["post"]
    assert rank["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/RankRequest")
    assert rank["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/RankOut")
    assert {"422", "503"} <= set(rank["responses"])
    # The FastAPI app alone (no edge middleware) answers the same way.
    bare = TestClient(create_app(runtime).app)
    out = bare.post("/v1/rank", json={"user_id": "u1", "item_ids": ["i1", "i2"], "k": 1})
    assert out.status_code == 200 and out.json()["model_version"] == 1 and len(out.json()["items"]) == 1


def test_503_until_a_snapshot_is_loaded(make_runtime):
    client = TestClient(create_app(make_runtime()))
    assert client.get("/readyz").status_code == 503
    r = client.post("/v1/rank", json={"user_id": "u1", "item_ids": ["i1"]})
    assert r.status_code == 503 and r.json()["error"] == "not_ready"
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize(
    "body, field, reason",
    [
        ({"item_ids": ["i1"]}, "user_id", "Field required"),
        ({"user_id": "u1", "item_ids": []}, "item_ids", "length >= 1"),
        ({"user_id": "u1", "item_ids": ["i1"], "k": 0}, "k", ">= 1"),
        ({"user_id": "u1", "item_ids": ["i1", "i2", "i1"]}, "item_ids", "item_ids[2] = 'i1' repeats item_ids[0]"),
        ({"user_id": "u1", "item_ids": ["i1", ""]}, "item_ids[1]", "length >= 1"),
        ({"user_id": "", "item_ids": ["i1"]}, "user_id", "length >= 1"),
        ({"user_id": "u1", "item_ids": "i1"}, "item_ids", "Expected `array`, got `str`"),
        ({"user_id": "u1", "item_ids": ["i1"], "context": {"d": 3}}, "context[...]", "Expected `str`, got `int`"),
        ({"user_id": "u1", "item_ids": ["i1"], "extra": 1}, "extra", "unknown field"),
        ({"user_id": "u1", "item_ids": ["i1"], "served_at": 12.0}, "served_at", ">= 946684800.0"),
        ({"user_id": "u1", "item_ids": ["i1"], "served_at": 4.0e9}, "served_at", "ahead of the server's clock"),
        ({"user_id": "u\tx", "item_ids": ["i1"]}, "user_id", "matching regex"),
        ({"user_id": "u" * 257, "item_ids": ["i1"]}, "user_id", "length <= 256"),
        ({"user_id": "\ud800", "item_ids": ["i1"]}, "body", "lone surrogate"),
        ({"user_id": "u1", "item_ids": ["i1"], "context": {"k": "v" * 1000}}, "context[...]", "length <= 256"),
    ],
)
def test_422_names_the_field_and_the_reason(client, body, field, reason):
    # json.dumps escapes a lone surrogate as \\ud800 (valid JSON, not valid UTF-8 once decoded)
    r = client.post("/v1/rank", content=json.dumps(body).encode(), headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert any(d["field"] == field and reason in d["reason"] for d in detail), detail


def test_malformed_json_is_a_422(client):
    r = client.post("/v1/rank", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422


def test_oversized_body_is_a_413(client):
    r = client.post("/v1/rank", json={"user_id": "u1", "item_ids": ["x" * 200] * 200})
    assert r.status_code == 413
    assert r.json()["detail"][0]["field"] == "body"


def test_click_is_produced_to_the_clicks_topic(client, runtime, fake_producer):
    r = client.post("/v1/click", json={"impression_id": "r-0", "user_id": "u1", "item_id": "i1",
                                       "clicked_at": 1.7e9})
    assert r.status_code == 202, r.text
    clicks = [codec.decode_click(v) for t, k, v in fake_producer.records if t == "t.clicks"]
    assert clicks[0].impression_id == "r-0" and clicks[0].clicked_at == 1.7e9
    assert runtime.popularity.get_many("clicks", ["i1"]) == [1.0]
    r = client.post("/v1/click", json={"impression_id": "r-0", "user_id": "u1", "item_id": "i1", "clicked_at": 5})
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "clicked_at"


def test_conversion_is_produced_to_the_conversions_topic(client, runtime, fake_producer):
    r = client.post("/v1/conversion", json={"impression_id": "r-0", "user_id": "u1", "item_id": "i1",
                                            "converted_at": 1.7e9, "value": 49.9})
    assert r.status_code == 202 and r.json()["converted_at"] == 1.7e9, r.text
    r = client.post("/v1/conversion", json={"impression_id": "r-1", "user_id": "u1", "item_id": "i2"})
    assert r.status_code == 202
    got = [(k, codec.decode_conversion(v)) for t, k, v in fake_producer.records if t == "t.conversions"]
    assert [(k, c.impression_id, c.value) for k, c in got] == [(b"u1", "r-0", 49.9), (b"u1", "r-1", None)]
    assert runtime.metrics.conversions._value.get() == 2


@pytest.mark.parametrize("body, field", [
    ({"user_id": "u1", "item_id": "i1"}, "impression_id"),
    ({"impression_id": "r", "user_id": "u1", "item_id": "i1", "value": -5}, "value"),
    ({"impression_id": "r", "user_id": "u1", "item_id": "i1", "value": "12"}, "value"),
    ({"impression_id": "r", "user_id": "u1", "item_id": "i1", "value": 1e30}, "value"),
    ({"impression_id": "r", "user_id": "u1", "item_id": "i1", "converted_at": 5}, "converted_at"),
    ({"impression_id": "r", "user_id": "u1", "item_id": "i1", "converted_at": 4.0e9}, "converted_at"),
    ({"impression_id": "r\t", "user_id": "u1", "item_id": "i1"}, "impression_id"),
    ({"impression_id": "r", "user_id": "u1", "item_id": "i1", "clicked_at": 1.7e9}, "clicked_at"),  # unknown field
])
def test_bad_conversions_get_422_and_never_reach_kafka(client, fake_producer, body, field):
    r = client.post("/v1/conversion", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["field"] == field
    assert not fake_producer.records


def test_items_register_update_and_cold_start(client, runtime):
    r = client.post("/v1/rank", json={"user_id": "u1", "item_ids": ["new-1", "i1"]})
    assert r.json()["unknown_item_ids"] == ["new-1"]
    image = base64.b64encode(b"\x89PNG not really").decode()
    r = client.post("/v1/items", json={"item_id": "new-1", "text": "a new thing", "image": image,
                                      "attributes": {"genre": "x"}})
    assert r.status_code == 200, r.text
    assert runtime.content.get_many(["new-1"])[0].image == b"\x89PNG not really"
    r = client.post("/v1/rank", json={"user_id": "u1", "item_ids": ["new-1", "i1"]})
    assert r.json()["unknown_item_ids"] == []
    r = client.post("/v1/items", json={"items": [{"item_id": "b1"}, {"item_id": "b2", "text": "t"}]})
    assert r.json() == {"registered": ["b1", "b2"]}
    r = client.post("/v1/items", json={"item_id": "bad", "image": "%%%"})
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "image"
    r = client.post("/v1/items", json={"items": [{"item_id": "ok"}, {"text": "no id"}]})
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "items[1].item_id"


def test_readyz_and_metrics_report_versions_and_failures(client, runtime, memory_store, toy_config):
    from serving.toy import corrupt, make_toy_snapshot

    manifest, blob = make_toy_snapshot("main", 2, toy_config, seed=2)
    memory_store.publish(manifest, corrupt(blob))
    runtime.reloaders["main"].check()
    client.post("/v1/rank", json={"user_id": "u1", "item_ids": ["i1"]})
    ready = client.get("/readyz")
    assert ready.status_code == 200
    src = ready.json()["sources"]["main"]
    assert src["version"] == 1 and src["pointer"] == 2 and src["stale"] and ready.json()["degraded"]
    text = client.get("/metrics").text
    assert 'em3_serving_model_version{line="main",source="main"} 1.0' in text
    assert 'em3_serving_reload_failures_total{line="main",reason="snapshot",source="main"} 1.0' in text
    assert 'em3_serving_requests_total{endpoint="/v1/rank",status="200"}' in text
    assert "em3_serving_impressions_dropped_total 0.0" in text
    assert "em3_serving_impressions_in_flight " in text


def test_baseline_arms_log_their_propensities(make_runtime, fake_producer):
    exp = ExperimentConfig("e", (ArmConfig("rnd", 0.5, "random"), ArmConfig("pop", 0.5, "popularity")), salt="s")
    runtime = make_runtime(exp)
    runtime.logger.start()
    client = TestClient(create_app(runtime))
    assert client.get("/readyz").status_code == 200  # baselines need no snapshot
    seen = set()
    for n in range(40):
        out = client.post("/v1/rank", json={"user_id": f"user{n}", "item_ids": ["i1", "i2", "i3", "i4"],
                                            "k": 2}).json()
        seen.add(out["arm"])
        expected = 0.25 if out["arm"] == "rnd" else 1.0
        assert [i["propensity"] for i in out["items"]] == [expected, expected]
        assert out["model_version"] == 0 and out["model_line"] in ("random", "popularity")
    assert seen == {"rnd", "pop"}
    runtime.logger.flush(5.0)
    logged = [codec.decode_impression(v) for t, _, v in fake_producer.records if t == "t.impressions"]
    assert len(logged) == 80 and {i.arm for i in logged} == {"rnd", "pop"}
    assert json.loads(client.get("/readyz").text)["ready"] is True


def test_impression_counts_reach_the_popularity_store_in_batches(make_runtime):
    from em3.types import Impression
    from serving.server import _CountBuffer

    store = make_runtime().popularity  # the in-memory popularity store of the fixture
    buf = _CountBuffer(store, "impressions", every_s=0.0)
    buf.add([Impression(f"r-{n}", "r", "u", f"i{n % 2}", n, 1.7e9) for n in range(5)])
    assert store.get_many("impressions", ["i0", "i1"]) == [3.0, 2.0]


def test_streamed_oversized_body_is_a_413(client):
    def chunks():
        for _ in range(30):
            yield b"x" * 1000

    r = client.post("/v1/rank", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_an_unexpected_error_is_a_500_not_a_dropped_connection(client, runtime, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("bug")

    monkeypatch.setattr(runtime, "rank", boom)
    r = client.post("/v1/rank", json={"user_id": "u1", "item_ids": ["i1"]})
    assert r.status_code == 500 and r.json() == {"error": "internal"}
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize("path", ["/v1/click", "/v1/conversion", "/v1/items", "/v1/rank"])
@pytest.mark.parametrize("body", [
    b"[" * 50_000 + b"]" * 50_000,                                  # deeply nested (was a RecursionError 500)
    b'{"items": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    b'{"impression_id": "a", "user_id": "\\ud800", "item_id": "i"}',  # lone surrogate (was a 500)
    b"\xff\xfe\x00",
    b'{"item_id": "x\\u0000y"}',
])
def test_hostile_bodies_get_4xx_never_5xx(client, fake_producer, path, body):
    r = client.post(path, content=body, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert not fake_producer.records  # nothing reached Kafka


def test_writes_need_the_api_key_unless_the_network_is_trusted(make_runtime, fake_producer):
    click = {"impression_id": "r-0", "user_id": "u1", "item_id": "i1"}
    keyless = TestClient(create_app(make_runtime(trusted_network=False)))
    r = keyless.post("/v1/click", json=click)
    assert r.status_code == 401 and "EM3_API_KEY" in r.json()["detail"]
    keyed = TestClient(create_app(make_runtime(trusted_network=False, api_key="s3cret")))
    for headers in ({}, {"x-api-key": "wrong"}, {"authorization": "Bearer wrong"}):
        assert keyed.post("/v1/click", json=click, headers=headers).status_code == 401
        assert keyed.post("/v1/items", json={"item_id": "x"}, headers=headers).status_code == 401
        assert keyed.post("/v1/conversion", json=click, headers=headers).status_code == 401
    assert not fake_producer.records
    assert keyed.post("/v1/click", json=click, headers={"x-api-key": "s3cret"}).status_code == 202
    assert keyed.post("/v1/click", json=click, headers={"authorization": "Bearer s3cret"}).status_code == 202
    assert keyed.post("/v1/rank", json={"user_id": "u1", "item_ids": ["i1"]}).status_code in (200, 503)  # reads stay open
