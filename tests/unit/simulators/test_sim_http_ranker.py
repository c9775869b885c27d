"""The HTTP ranker against a fake ranking service (httpx.MockTransport): arms, impression ids, clicks."""
from __future__ import annotations

import json

import pytest

from simulators.ab import ABConfig, ABRunner
from simulators.http_ranker import HTTPRanker
from simulators.world import World, WorldConfig

httpx = pytest.importorskip("httpx")


class FakeServer:
    """Buckets users by id parity, ranks candidates in reverse for arm 'b', logs impressions."""

    def __init__(self) -> None:
        self.impressions: dict[str, tuple[str, str]] = {}
        self.clicks: list[dict] = []
        self.items: list[dict] = []
        self.n = 0

    def __call__(self, request):
        body = json.loads(request.content)
        if request.url.path == "/v1/rank":
            self.n += 1
            assert "t" not in body["context"]
            arm = "a" if int(body["user_id"][1:]) % 2 == 0 else "b"
            ranked = body["item_ids"][: body["k"]] if arm == "a" else body["item_ids"][::-1][: body["k"]]
            rid = f"srv-{self.n}"
            items = []
            for pos, item in enumerate(ranked):
                imp = f"{rid}-{pos}"
                self.impressions[imp] = (body["user_id"], item)
                items.append({"item_id": item, "score": 1.0, "position": pos, "impression_id": imp,
                              "propensity": 1.0})
                if body.get("explain"):
                    items[-1]["explanation"] = {"modality": {"text": 0.5, "image": 0.25, "missing": 0.25},
                                                "position": pos}
            return httpx.Response(200, json={"request_id": rid, "arm": arm, "model_line": arm,
                                             "model_version": 3, "items": items, "unknown_item_ids": []})
        if request.url.path == "/v1/click":
            self.clicks.append(body)
            return httpx.Response(202, json={"accepted": True})
        if request.url.path == "/v1/items":
            self.items.extend(body["items"])
            return httpx.Response(200, json={"stored": len(body["items"])})
        return httpx.Response(404)


def test_runner_through_the_http_ranker():
    server = FakeServer()
    ranker = HTTPRanker(client=httpx.Client(base_url="http://srv", transport=httpx.MockTransport(server)))
    world = World(WorldConfig(seed=0, n_users=100, n_items=100, horizon_s=86_400.0))
    cfg = ABConfig(n_requests=300, k=5, check_every=100, arm_from_ranking=True)
    sink_events = []
    post = ranker.click_sink()

    def sink(event):
        sink_events.append(event)
        post(event)

    report = ABRunner(world, {"a": ranker, "b": ranker}, cfg, event_sink=sink).run()
    assert server.n == 300
    assert report.final["a"]["requests"] + report.final["b"]["requests"] == 300
    assert report.final["a"]["requests"] > 0 and report.final["b"]["requests"] > 0
    assert len(server.clicks) == ranker.clicks_posted > 0
    for click in server.clicks:  # every click joins an impression the server logged, same user and item
        assert server.impressions[click["impression_id"]] == (click["user_id"], click["item_id"])
    arms = {e.arm for e in sink_events if type(e).__name__ == "Impression"}
    assert arms == {"a", "b"}


def test_register_items_posts_base64_images_in_batches():
    server = FakeServer()
    ranker = HTTPRanker(client=httpx.Client(base_url="http://srv", transport=httpx.MockTransport(server)))
    world = World(WorldConfig(seed=0, n_users=10, n_items=20))
    sent = ranker.register_items((world.item_content(i, image_size=16) for i in world.item_ids[:7]), batch_size=3)
    assert sent == 7 and len(server.items) == 7
    import base64

    assert base64.b64decode(server.items[0]["image"])[:4] == b"\x89PNG"


def test_failed_clicks_are_counted():
    def refuse(request):
        return httpx.Response(503, json={"error": "unavailable"})

    ranker = HTTPRanker(client=httpx.Client(base_url="http://srv", transport=httpx.MockTransport(refuse)))
    from em3.types import Click

    assert ranker.post_click(Click("i", "u", "x", 1.7e9)) is False
    assert ranker.click_errors == 1


def test_explain_asks_the_server_and_returns_its_explanations():
    seen = []
    server = FakeServer()

    def handler(request):
        seen.append(json.loads(request.content))
        return server(request)

    ranker = HTTPRanker(client=httpx.Client(base_url="http://srv", transport=httpx.MockTransport(handler)))
    plain = ranker.rank("u2", ["x", "y", "z"], {"t": "1"}, 2)
    explained = ranker.rank("u2", ["x", "y", "z"], {"t": "1"}, 2, explain=True)
    assert "explain" not in seen[0] and seen[1]["explain"] is True
    assert plain.explanations is None
    assert [e["position"] for e in explained.explanations] == [0, 1]
