"""POST /v1/rank with "explain": the tiny EM3 model through the server's own loader,
ranking service and HTTP app, on in-memory stores."""
from __future__ import annotations

import math

import pytest
import torch
from fastapi.testclient import TestClient

from em3 import snapshot
from em3.data.images import render_poster
from em3.experiment import ArmConfig, ExperimentConfig
from em3.model import EM3Model, ModelConfig
from em3.stores import InMemoryContentStore, InMemoryHistoryStore
from em3.types import ItemContent
from serving.app import create_app
from serving.ranking import EXPLAIN_TOP_HISTORY

CONFIG = ModelConfig.tiny()
ITEMS = [ItemContent(f"i{n}", text=f"Movie {n} ({1990 + n}) | genre{n % 3}",
                     image=render_poster(f"Movie {n}", 1990 + n, [f"genre{n % 3}"], 32) if n % 2 else None)
         for n in range(12)]
HISTORY = [f"i{n}" for n in range(7)]  # u1 clicked i0..i6, i6 last


@pytest.fixture(scope="module")
def em3_snapshot():
    model = EM3Model(CONFIG)
    ids = [i.item_id for i in ITEMS]
    model.observe_impressions(ids[:6] * 4, ["u1"] * 24, [1, 0, 1, 0] * 6)
    model.observe_conversions(ids[:6] * 2, ["u1"] * 12, [1.0] * 12, [1.0, 0.0, 0.0] * 4, [2.0, 0.0, 0.0] * 4)
    with torch.no_grad():
        model.item_emb.table.weight.add_(0.3 * torch.randn_like(model.item_emb.table.weight))
    blob, manifest = snapshot.pack(model.trainable_state_dict(), model_line="main", version=1, config=CONFIG)
    return manifest, blob


@pytest.fixture
def em3_runtime(memory_store, fake_producer, em3_snapshot):
    from em3.config import KafkaSettings, RedisSettings, Settings, TopicNames
    from serving.scoring import EM3Loader
    from serving.server import ServerConfig, ServingRuntime

    def make(experiment=None):
        memory_store.publish(*em3_snapshot)
        history = InMemoryHistoryStore()
        history.append_many([("u1", item_id, 1.7e9 + n) for n, item_id in enumerate(HISTORY)])
        settings = Settings(KafkaSettings("127.0.0.1:1"), RedisSettings("redis://127.0.0.1:1/0"), TopicNames("t."),
                            allow_raw_user_ids=True)
        config = ServerConfig(experiment or ExperimentConfig.single_line("main"), trusted_network=True)
        rt = ServingRuntime(config, EM3Loader(), memory_store, InMemoryContentStore(ITEMS), history,
                            producer=fake_producer, settings=settings)
        for r in rt.reloaders.values():
            r.check()
        made.append(rt)
        return rt

    made: list = []
    yield make
    for rt in made:
        rt.stop()


def _rank(client, **extra):
    body = {"user_id": "u1", "item_ids": ["i3", "i8", "i9", "i10", "ghost"], **extra}
    r = client.post("/v1/rank", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_explain_true_returns_an_explanation_per_ranked_item(em3_runtime):
    client = TestClient(create_app(em3_runtime()))
    out = _rank(client, explain=True)
    assert len(out["items"]) == 5 and out["unknown_item_ids"] == ["ghost"]
    for item in out["items"]:
        e = item["explanation"]
        assert set(e) == {"objective", "units", "score", "baseline_score", "content", "id", "terms", "history",
                          "modality", "content_rows_current"}
        assert e["objective"] == "ctr" and list(e["terms"]) == ["click"]
        assert e["score"] == pytest.approx(item["score"], abs=1e-6)  # the score is the logit explained
        assert e["content"] + e["id"] == pytest.approx(e["score"] - e["baseline_score"], abs=1e-5)
        assert set(e["modality"]) == {"text", "image", "missing"}
        assert sum(e["modality"].values()) == pytest.approx(1.0, abs=1e-5)
        weights = [h["weight"] for h in e["history"]]
        assert len(weights) == EXPLAIN_TOP_HISTORY and weights == sorted(weights, reverse=True)
        assert {h["item_id"] for h in e["history"]} <= set(HISTORY)
        assert e["content_rows_current"] is True
    by_id = {i["item_id"]: i["explanation"] for i in out["items"]}
    # No registered content: the Q-Former reads only the null token.
    assert by_id["ghost"]["modality"] == pytest.approx({"text": 0.0, "image": 0.0, "missing": 1.0})
    assert by_id["i10"]["modality"]["image"] == 0.0 and by_id["i10"]["modality"]["text"] > 0  # even: no image
    assert by_id["i9"]["modality"]["image"] > 0 and by_id["i9"]["modality"]["text"] > 0


def test_explain_false_or_absent_adds_nothing_and_ranks_the_same(em3_runtime):
    client = TestClient(create_app(em3_runtime()))
    plain, off, on = _rank(client), _rank(client, explain=False), _rank(client, explain=True)
    for out in (plain, off):
        assert all("explanation" not in item for item in out["items"])
    ranked = [[(i["item_id"], round(i["score"], 6)) for i in out["items"]] for out in (plain, off, on)]
    assert ranked[0] == ranked[1] == ranked[2]


@pytest.mark.parametrize("value", ["yes", "true", 1, 0, None, [], {}, 1.0])
def test_bad_explain_values_get_422_naming_the_field(em3_runtime, value):
    client = TestClient(create_app(em3_runtime()))
    r = client.post("/v1/rank", json={"user_id": "u1", "item_ids": ["i1"], "explain": value})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["field"] == "explain"
    assert client.get("/healthz").status_code == 200


def test_explain_on_a_baseline_arm_or_a_model_that_cannot_explain_gives_null(em3_runtime, make_runtime, publish):
    experiment = ExperimentConfig("e", (ArmConfig("rand", 1.0, "random"),))
    out = _rank(TestClient(create_app(em3_runtime(experiment))), explain=True)
    assert out["arm"] == "rand" and [i["explanation"] for i in out["items"]] == [None] * 5
    publish(1)
    toy = make_runtime()
    for r in toy.reloaders.values():
        r.check()
    out = TestClient(create_app(toy)).post("/v1/rank", json={"user_id": "u1", "item_ids": ["i1", "i2"],
                                                             "explain": True}).json()
    assert [i["explanation"] for i in out["items"]] == [None, None]


def test_explanations_survive_a_content_store_outage(em3_runtime):
    runtime = em3_runtime()
    client = TestClient(create_app(runtime))
    _rank(client)  # rows cached
    runtime.ranking.content.get_many = lambda ids: (_ for _ in ()).throw(ConnectionError("down (test)"))
    out = _rank(client, explain=True)
    for item in out["items"]:
        assert item["explanation"]["modality"] is None  # unknown without content
        e = item["explanation"]
        assert e["content"] + e["id"] == pytest.approx(e["score"] - e["baseline_score"], abs=1e-5)


def test_a_failing_explanation_serves_the_ranking_without_it_and_counts(em3_runtime):
    runtime = em3_runtime()
    client = TestClient(create_app(runtime))
    plain = _rank(client)

    def broken(*args, **kwargs):
        raise RuntimeError("explain bug (test)")

    runtime.ranking.explain = broken
    out = _rank(client, explain=True)  # 200, the same ranking
    assert [(i["item_id"], i["score"]) for i in out["items"]] == [(i["item_id"], i["score"]) for i in plain["items"]]
    assert [i["explanation"] for i in out["items"]] == [None] * 5
    assert runtime.ranking.explain_errors == 1
    assert "em3_serving_explain_errors_total 1.0" in client.get("/metrics").text


@pytest.mark.parametrize("objective, terms", [("ctr", {"click"}), ("ctcvr", {"click", "conversion", "odds"}),
                                              ("value", {"click", "conversion", "value"})])
def test_the_explanation_describes_the_score_the_arm_ranks_by(em3_runtime, objective, terms):
    client = TestClient(create_app(em3_runtime(ExperimentConfig.single_line("main", objective))))
    out = _rank(client, explain=True)
    scores = [i["score"] for i in out["items"]]
    assert scores == sorted(scores, reverse=True)
    for item in out["items"]:
        e = item["explanation"]
        assert e["objective"] == objective and set(e["terms"]) == terms
        assert e["score"] == pytest.approx(item["score"], abs=1e-5)  # what ranked the item
        assert e["content"] + e["id"] == pytest.approx(e["score"] - e["baseline_score"], abs=1e-5)
        for key in ("score", "baseline_score", "content", "id"):
            assert sum(t[key] for t in e["terms"].values()) == pytest.approx(e[key], abs=1e-5)
    if objective != "ctr":
        # The click term of a conversion objective is log pCTR: the ctr arm's logit, in nats.
        ctr = {i["item_id"]: i["score"] for i in _rank(TestClient(create_app(em3_runtime())))["items"]}
        for item in out["items"]:
            click = item["explanation"]["terms"]["click"]["score"]
            assert click == pytest.approx(-math.log1p(math.exp(-ctr[item["item_id"]])), abs=1e-5)


def test_openapi_documents_the_explanation(em3_runtime):
    schema = TestClient(create_app(em3_runtime())).get("/openapi.json").json()
    assert "explain" in schema["components"]["schemas"]["RankRequest"]["properties"]
    assert "ExplanationOut" in schema["components"]["schemas"]
