"""Bounded ID tables end to end in one process: a learner admits and evicts IDs, its
publisher ships full and delta snapshots, and a server that reloads them scores an
admitted ID with its own row and stops using a row as soon as it changes owner."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from em3.errors import EM3Warning
from em3.idtable import fingerprint
from em3.model import ModelConfig, user_rows, user_rows_in
from em3.stores import InMemoryContentStore
from em3.types import Impression, Sample
from learners import OnlineLearner
from learners.publisher import PublisherConfig, SnapshotPublisher
from learners.testing import InMemoryAppliedLog, InMemorySnapshotStore
from serving.ranking import RankingService
from serving.reloader import ReloaderConfig, SnapshotReloader
from serving.scoring import EM3Loader

FALLBACK = 4


class _NoHistory:
    def get(self, user_id, limit):
        return []


def _batch(items: list[str], t: float, tag: str) -> list[Sample]:
    return [Sample(Impression(f"{tag}-{k}", "r", f"u{k % 3}", iid, 0, t), k % 2, t) for k, iid in enumerate(items)]


def _served(reloader):
    return reloader.current.model


def test_a_server_scores_an_admitted_id_with_its_own_row_and_sees_its_eviction():
    cfg = ModelConfig.tiny("id_only", user_buckets=16, item_buckets=12, id_table="bounded",
                           id_fallback_buckets=FALLBACK, id_admit_after=2)  # 8 own item rows
    content = InMemoryContentStore([])
    lrn = OnlineLearner(cfg, content, device="cpu", seed=0)
    snaps, applied = InMemorySnapshotStore(), InMemoryAppliedLog()
    pub = SnapshotPublisher(snaps, applied, "main", cfg.to_dict(), PublisherConfig(full_every=3))
    reloader = SnapshotReloader(snaps, EM3Loader(), RankingService(content, _NoHistory()).prepare,
                                ReloaderConfig("main"))
    version = None

    def publish_and_reload():
        nonlocal version
        version = pub.publish(lrn.state_dict(), parent=version, offsets={"t:0": 1}, applied_ids={}, stats={}).version
        assert reloader.check() and reloader.current.version == version

    publish_and_reload()
    served = _served(reloader).model
    assert served.item_emb.buckets_of(["hot"]).item() < FALLBACK  # nobody admitted yet

    lrn.learn_batch(_batch(["hot", "hot", "a", "b"], 1.75e9, "x"), [[]] * 4)
    publish_and_reload()
    own = lrn.model.item_emb.buckets_of(["hot"]).item()
    served = _served(reloader)
    assert own >= FALLBACK and served.model.item_emb.buckets_of(["hot"]).item() == own
    assert served.model.item_emb.keys[own - FALLBACK].item() == fingerprint("hot", "item")
    # The server's row for "hot" is the learner's: same representation and score.
    lrn.learn_batch(_batch(["hot", "a"], 1.75e9 + 1, "y"), [[]] * 2)
    publish_and_reload()
    served = _served(reloader)
    want = lrn.item_representations(["hot"])
    got = served.compose(["hot"], torch.zeros(1, 0))
    assert torch.allclose(got, want, atol=1e-6)
    assert reloader.current.manifest.kind == "delta"

    # A flood of new IDs (each seen 4 times) fills the 8 own rows; "hot" (3 impressions)
    # is the least recently seen protected row, out-counted, and loses its row to one of them.
    flood = [f"new{k}" for k in range(8)]
    lrn.learn_batch(_batch(flood * 4, 1.75e9 + 100, "z"), [[]] * 32)
    assert lrn.model.item_emb.buckets_of(["hot"]).item() < FALLBACK
    publish_and_reload()
    served = _served(reloader)
    new_owner = served.model.item_emb.keys[own - FALLBACK].item()
    assert new_owner not in (0, fingerprint("hot", "item"))
    assert served.model.item_emb.buckets_of(["hot"]).item() < FALLBACK  # back on its fallback row
    got = served.compose(["hot"], torch.zeros(1, 0))
    assert torch.allclose(got, lrn.item_representations(["hot"]), atol=1e-6)
    owner = [k for k in flood if fingerprint(k, "item") == new_owner][0]
    assert not torch.allclose(got, served.compose([owner], torch.zeros(1, 0)))


def test_a_learner_restarted_from_state_and_checkpoint_keeps_the_map_and_the_admission_counts():
    cfg = ModelConfig.tiny("id_only", user_buckets=16, item_buckets=12, id_table="bounded",
                           id_fallback_buckets=FALLBACK, id_admit_after=3)
    content = InMemoryContentStore([])
    lrn = OnlineLearner(cfg, content, device="cpu", seed=0)
    lrn.learn_batch(_batch(["a", "a", "a", "b", "b"], 1.75e9, "x"), [[]] * 5)
    back = OnlineLearner(cfg, content, device="cpu", seed=0)
    back.load_state_dict(lrn.state_dict())
    back.load_checkpoint(*lrn.checkpoint())
    assert back.model.item_emb.buckets_of(["a", "b"]).tolist() == lrn.model.item_emb.buckets_of(["a", "b"]).tolist()
    for learner in (lrn, back):  # "b" has 2 of its 3 impressions in both
        learner.learn_batch(_batch(["b"], 1.75e9 + 1, "y"), [[]])
    row = lrn.model.item_emb.buckets_of(["b"]).item()
    assert back.model.item_emb.buckets_of(["b"]).item() == row >= FALLBACK
    # Its own counters start from the same sketched impressions and clicks in both.
    assert back.model.item_clicks[row] == lrn.model.item_clicks[row] > 0
    assert back.model.item_impressions[row] == lrn.model.item_impressions[row] == 3
    # The doorkeeper travelled too: "a" and "b" (first impressions) are in both.
    door, back_door = lrn.model.item_emb.ids.sketch.door, back.model.item_emb.ids.sketch.door
    assert door.any() and np.array_equal(door, back_door)


def test_a_checkpoint_from_before_tinylfu_loads_with_a_warning_and_keeps_its_counts():
    cfg = ModelConfig.tiny("id_only", user_buckets=16, item_buckets=12, id_table="bounded",
                           id_fallback_buckets=FALLBACK, id_admit_after=3)
    content = InMemoryContentStore([])
    lrn = OnlineLearner(cfg, content, device="cpu", seed=0)
    lrn.learn_batch(_batch(["a", "a", "b", "b"], 1.75e9, "x"), [[]] * 4)
    tensors, meta = lrn.checkpoint()
    assert meta["idtable/item"]["counts"] == "all"
    wide = {"idtable/item/sketch": torch.full((4, 64), 3, dtype=torch.int32),  # the old default was wider
            "idtable/item/sketch_clicks": torch.ones(4, 64)}
    old = {**{k: v for k, v in tensors.items() if not k.endswith("/doorkeeper")}, **wide}  # no doorkeeper then
    old_meta = {k: ({"additions": v["additions"], "now": v["now"]} if k.startswith("idtable/") else v)
                for k, v in meta.items()}
    back = OnlineLearner(cfg, content, device="cpu", seed=0)
    back.load_state_dict(lrn.state_dict())
    with pytest.warns(EM3Warning, match="predates TinyLFU"):
        back.load_checkpoint(old, old_meta)
    sketch = back.model.item_emb.ids.sketch
    assert sketch.width == 64 and sketch.sample_size == 80 * back.model.item_emb.ids.capacity
    assert not sketch.door.any()  # it had no doorkeeper: an empty one
    assert (sketch.table == 3).all() and (sketch.values == 1).all() and sketch.additions == meta["idtable/item"]["additions"]
    with pytest.raises(ValueError, match="admission sketch"):
        back.load_checkpoint({**tensors, "idtable/item/sketch": tensors["idtable/item/sketch"][:2]}, meta)
    with pytest.raises(ValueError, match="click sketch"):  # refused before anything is loaded
        back.load_checkpoint({**tensors, "idtable/item/sketch_clicks": tensors["idtable/item/sketch_clicks"][:, :8]},
                             meta)


def test_deleting_a_user_frees_its_own_row_and_resets_it():
    cfg = ModelConfig.tiny("id_only", user_buckets=16, item_buckets=12, id_table="bounded",
                           id_fallback_buckets=FALLBACK, id_admit_after=1)
    lrn = OnlineLearner(cfg, InMemoryContentStore([]), device="cpu", seed=0)
    for n in range(2):  # admitted after the first batch, trained on its own row in the second
        lrn.learn_batch(_batch(["a", "b", "c"], 1.75e9 + n, f"x{n}"), [[]] * 3)
    row = lrn.model.user_emb.buckets_of(["u0"]).item()
    assert row >= FALLBACK and lrn.model.user_impressions[row] > 0
    # An auditor reading a saved state (benchmarks/privacy.py) finds the same row.
    assert user_rows_in(cfg.to_dict(), lrn.state_dict(), ["u0"]) == ([row], [True])
    fallback_row = user_rows(FALLBACK, ["u0"])[0]  # trained by u0's first batch, before admission
    assert (lrn.state_dict()["user_emb.table.weight"][fallback_row] != 0).any()
    assert lrn.forget_users(["u0"]) == [fallback_row, row]
    state = lrn.state_dict()
    assert lrn.model.user_emb.buckets_of(["u0"]).item() == fallback_row
    assert user_rows_in(cfg.to_dict(), state, ["u0"]) == ([fallback_row], [False])
    assert (state["user_emb.table.weight"][fallback_row] == 0).all() and state["user_impressions"][fallback_row] == 0
    assert state["user_emb.keys"][row - FALLBACK] == 0  # the map no longer names the user
    assert (state["user_emb.table.weight"][row] == 0).all() and state["user_impressions"][row] == 0
    assert lrn.model.user_emb.buckets_of(["u0"]).item() < FALLBACK
    acc = lrn.sparse_optimizer.state[lrn.model.user_emb.table.weight]["acc"]
    assert acc[row] == 0


def test_a_fleet_of_data_parallel_learners_refuses_bounded_tables():
    import pytest

    from em3.errors import ImproperlyConfigured
    from learners.aggregate import Aggregator

    cfg = ModelConfig.tiny("id_only", user_buckets=16, item_buckets=12, id_table="bounded",
                           id_fallback_buckets=FALLBACK)
    pub = SnapshotPublisher(InMemorySnapshotStore(), InMemoryAppliedLog(), "main", cfg.to_dict(), PublisherConfig())
    with pytest.raises(ImproperlyConfigured, match="id_table='hashed'"):
        Aggregator(pub, None, world=2)


def test_em3_learn_id_table_flag_gives_a_bounded_config():
    import argparse

    from learners import cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    for extra, kind in (([], "hashed"), (["--id-table", "bounded"], "bounded"), (["--tiny", "--id-table", "bounded"], "bounded")):
        args = parser.parse_args(["learn", "--model-line", "x", "--variant", "id_only", *extra])
        model = ModelConfig.from_dict(cli.learn_config_from_args(args).model_config)
        assert model.id_table == kind and model.id_fallback_buckets < model.item_buckets
