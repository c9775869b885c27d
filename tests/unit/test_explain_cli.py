"""`em3 explain`: the server's explanation of one item, from a line's snapshot (full or
delta chain), the user's history and the item's content."""
from __future__ import annotations

import json

import pytest
import torch

from em3 import snapshot
from em3.app.cli import explain_item, main
from em3.model import EM3Model, ModelConfig
from em3.stores import InMemoryContentStore, InMemoryHistoryStore
from em3.types import ItemContent
from learners.testing import InMemorySnapshotStore

CONFIG = ModelConfig.tiny()
ITEMS = [ItemContent(f"i{n}", text=f"Movie {n} | genre{n % 3}") for n in range(8)]


@pytest.fixture(scope="module")
def stores():
    """A line whose latest version (2) is a delta on version 1 that moved item i5's ID row."""
    model = EM3Model(CONFIG)
    base = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    new = {k: v.clone() for k, v in base.items()}
    row = int(model.item_emb.buckets_of(["i5"])[0])
    new["item_emb.table.weight"][row] += 0.5
    snaps = InMemorySnapshotStore()
    blob, m = snapshot.pack(base, model_line="em3", version=1, config=CONFIG)
    snaps.publish(m, blob)
    blob, m = snapshot.pack_delta(new, base, base_version=1, base_state_sha256=snapshot.state_digest(base),
                                  model_line="em3", version=2, config=CONFIG)
    snaps.publish(m, blob)
    history = InMemoryHistoryStore()
    history.append_many([("u1", f"i{n}", 1.7e9 + n) for n in range(4)])
    return snaps, InMemoryContentStore(ITEMS), history, new


def test_explain_item_reads_the_latest_version_through_its_delta_chain(stores):
    snaps, content, history, new = stores
    out = explain_item(snaps, content, history, "em3", "u1", "i5", context={"device": "web"})
    assert (out["model_version"], out["snapshot_kind"], out["registered"], out["history_len"]) == (2, "delta", True, 4)
    e = out["explanation"]
    assert out["objective"] == e["objective"] == "ctr"
    assert e["score"] == pytest.approx(out["score"], abs=1e-6)
    assert e["content"] + e["id"] == pytest.approx(e["score"] - e["baseline_score"], abs=1e-5)
    assert sum(e["modality"].values()) == pytest.approx(1.0, abs=1e-5)
    assert {h["item_id"] for h in e["history"]} == {"i0", "i1", "i2", "i3"}
    assert sum(h["weight"] for h in e["history"]) == pytest.approx(1.0, abs=1e-5)
    # The same numbers as the model of version 2's whole state scores directly.
    model = EM3Model(CONFIG).eval()
    model.load_trainable_state_dict(new)
    with torch.no_grad():
        reps = model.item_representations(["i3", "i2", "i1", "i0", "i5"], [ITEMS[3], ITEMS[2], ITEMS[1], ITEMS[0],
                                                                         ITEMS[5]])
        logit = model.score_candidates("u1", {"device": "web"}, reps[:4], reps[4:])
    assert out["score"] == pytest.approx(float(logit[0]), abs=1e-5)
    # Version 1 (without the moved row) explains a different ID part.
    old = explain_item(snaps, content, history, "em3", "u1", "i5", version=1, context={"device": "web"})
    assert old["model_version"] == 1 and old["snapshot_kind"] == "full"
    assert abs(old["explanation"]["id"] - e["id"]) > 1e-3


@pytest.mark.parametrize("objective", ["ctr", "ctcvr", "value"])
def test_explain_item_explains_the_score_of_the_objective(stores, objective):
    snaps, content, history, new = stores
    out = explain_item(snaps, content, history, "em3", "u1", "i5", objective=objective)
    e = out["explanation"]
    assert out["objective"] == e["objective"] == objective
    assert e["score"] == pytest.approx(out["score"], abs=1e-6)
    assert sum(t["score"] for t in e["terms"].values()) == pytest.approx(out["score"], abs=1e-5)
    model = EM3Model(CONFIG).eval()
    model.load_trainable_state_dict(new)
    with torch.no_grad():
        reps = model.item_representations(["i3", "i2", "i1", "i0", "i5"], [ITEMS[3], ITEMS[2], ITEMS[1], ITEMS[0],
                                                                         ITEMS[5]])
        score = model.score_candidates("u1", {}, reps[:4], reps[4:], objective)
    assert out["score"] == pytest.approx(float(score[0]), abs=1e-5)


def test_explain_item_of_an_unregistered_item_and_a_user_without_history(stores):
    snaps, content, history, _ = stores
    out = explain_item(snaps, content, history, "em3", "nobody", "ghost")
    assert out["registered"] is False and out["history_len"] == 0
    assert out["explanation"]["history"] == []
    assert out["explanation"]["modality"] == pytest.approx({"text": 0.0, "image": 0.0, "missing": 1.0})


def test_the_command_refuses_without_a_snapshot_key_or_with_a_bad_context(monkeypatch, capsys):
    monkeypatch.delenv("EM3_SNAPSHOT_KEY", raising=False)
    monkeypatch.setenv("EM3_RUN_DIR", "/nonexistent-em3-run-dir")
    argv = ["explain", "--user", "u1", "--item", "i1", "--redis-url", "redis://127.0.0.1:1/0"]
    assert main(argv) == 2
    assert "EM3_SNAPSHOT_KEY" in capsys.readouterr().err
    monkeypatch.setenv("EM3_SNAPSHOT_KEY", "k")
    assert main(argv + ["--context", "no-equals-sign"]) == 2
    assert "--context must be KEY=VALUE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(argv + ["--objective", "clicks"])  # not an objective
    with pytest.raises(SystemExit):
        main(["explain", "--item", "i1"])  # --user is required


@pytest.mark.integration
def test_the_command_prints_the_explanation_from_redis(settings, redis_client, monkeypatch, capsys, stores):
    from em3.redis_stores import RedisContentStore, RedisHistoryStore, RedisSnapshotStore

    snaps, _, _, _ = stores
    store = RedisSnapshotStore(redis_client, settings.redis_prefix, signing_key=settings.snapshot_key)
    for version in (1, 2):  # the same full snapshot and delta, now in Redis
        manifest, blob = snaps.get("em3", version)
        store.publish(manifest, blob)
    RedisContentStore(redis_client, settings.redis_prefix).put_many(ITEMS)
    from em3.privacy import pseudonym

    key = "0123456789abcdef0123456789abcdef"
    RedisHistoryStore(redis_client, settings.redis_prefix).append_many(  # stores hold pseudonyms only
        [(pseudonym(key, "u1"), f"i{n}", 1.7e9 + n) for n in range(4)])
    monkeypatch.setenv("EM3_SNAPSHOT_KEY", settings.snapshot_key)
    monkeypatch.setenv("EM3_USER_ID_KEY", key)
    code = main(["explain", "--user", "u1", "--item", "i5", "--context", "device=web",
                 "--redis-url", settings.redis.url, "--redis-prefix", settings.redis_prefix])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    from em3.stores import InMemoryHistoryStore

    history = InMemoryHistoryStore()  # what the server holds: the user's pseudonym
    history.append_many([(pseudonym(key, "u1"), f"i{n}", 1.7e9 + n) for n in range(4)])
    expected = explain_item(stores[0], stores[1], history, "em3", pseudonym(key, "u1"), "i5",
                            context={"device": "web"})
    assert out["model_version"] == 2 and out["snapshot_kind"] == "delta"
    assert out["explanation"]["id"] == pytest.approx(expected["explanation"]["id"], abs=1e-6)
    assert out["explanation"]["history"] == pytest.approx(expected["explanation"]["history"])
