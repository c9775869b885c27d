"""Serving objectives per model line: ctr, ctcvr (pCTR x pCVR) and expected value."""
from __future__ import annotations

import pytest
import torch

from em3 import snapshot
from em3.experiment import ArmConfig, ExperimentConfig
from em3.model import ModelConfig
from em3.stores import InMemoryContentStore
from em3.types import Impression, ItemContent, Sample
from learners import OnlineLearner
from learners.testing import InMemorySnapshotStore
from serving.ranking import RankingService
from serving.reloader import ReloaderConfig, SnapshotReloader
from serving.scoring import EM3Loader
from serving.server import ServerConfig


class _NoHistory:
    def get(self, user_id, limit):
        return []


def test_an_arm_names_one_objective_of_a_model_arm():
    assert ArmConfig("a", 1.0, model_line="m", objective="value").objective == "value"
    with pytest.raises(ValueError, match="objective must be one of"):
        ArmConfig("a", 1.0, model_line="m", objective="revenue")
    with pytest.raises(ValueError, match="objective is only for model arms"):
        ArmConfig("p", 1.0, kind="popularity", objective="ctcvr")
    exp = ExperimentConfig("x", (ArmConfig("a", 0.5, model_line="m"),
                                 ArmConfig("b", 0.5, model_line="m", objective="ctcvr")), salt="s")
    (source,) = ServerConfig(exp).sources()
    assert source.objectives == ("ctr", "ctcvr")  # one reloader, both objectives checked


@pytest.fixture(scope="module")
def line():
    """Snapshots of a tiny id_only line whose item b converts best and c is worth most."""
    items = [ItemContent(i, text=f"film {i}") for i in "abcd"]
    content = InMemoryContentStore(items)
    config = ModelConfig.tiny("id_only", history_len=5)
    learner = OnlineLearner(config, content, device="cpu", seed=0)
    t = 1.7e9
    for step in range(30):
        batch = []
        for k, item in enumerate("abcd" * 4):
            imp = Impression(f"m{step}-{k}", "r", f"u{k % 5}", item, 0, t)
            batch.append(Sample(imp, 1, t + 1))  # everyone clicks: the CTR is the same for all
            if item in "bc" and (item == "b" or k % 8 == 2):
                batch.append(Sample(imp, 1, t + 60, correction=True, conversion=1,
                                    value=500.0 if item == "c" else 5.0))
        learner.learn_batch(batch, [[]] * len(batch))
    blob, manifest = snapshot.pack(learner.state_dict(), model_line="main", version=1, config=config.to_dict(),
                                   parent_version=None, offsets={})
    store = InMemorySnapshotStore()
    store.publish(manifest, blob)
    return store, content, config


def _serve(line):
    """A ranking service and the state of the line's snapshot, loaded for every objective."""
    store, content, _ = line
    service = RankingService(content, _NoHistory())
    reloader = SnapshotReloader(store, EM3Loader(), service.prepare,
                                ReloaderConfig("main", objectives=("ctr", "ctcvr", "value")))
    assert reloader.check()
    return service, reloader.current


def test_a_line_ranks_by_the_objective_its_arm_names(line):
    service, state = _serve(line)
    assert state.model.objectives == ("ctr", "ctcvr", "value")
    top = {o: [r.item_id for r in service.rank(state, "u1", list("abcd"), k=1, objective=o).items]
           for o in ("ctcvr", "value")}
    assert top == {"ctcvr": ["b"], "value": ["c"]}
    ctr = service.rank(state, "u1", list("abcd"), objective="ctr").items
    ctcvr = service.rank(state, "u1", list("abcd"), objective="ctcvr").items
    by = {r.item_id: r.score for r in ctr}
    assert all(r.score < by[r.item_id] for r in ctcvr)  # P(click and conversion) < P(click)


def test_rows_composed_for_one_objective_score_as_the_full_rows(line):
    service, state = _serve(line)
    full, _ = service.representations(state, list("abcd"))
    for objective in ("ctr", "ctcvr", "value"):
        rows, _ = service.representations(state, list("abcd"), objective)
        assert rows.shape == full.shape
        want = state.model.score("u1", {}, full[:0], full, objective=objective)
        got = state.model.score("u1", {}, rows[:0], rows, objective=objective)
        torch.testing.assert_close(got, want)
    # Rows for ctr leave the conversion columns out (zeros); the others keep them.
    ctr_rows, _ = service.representations(state, list("abcd"), "ctr")
    assert torch.all(ctr_rows[:, -2:] == 0) and not torch.all(full[:, -2:] == 0)


def test_a_snapshot_without_the_cvr_head_is_refused_for_a_ctcvr_arm(line):
    _, content, config = line
    plain = config.replace(ctcvr_weight=0.0)
    learner = OnlineLearner(plain, content, device="cpu", seed=0)
    blob, manifest = snapshot.pack(learner.state_dict(), model_line="old", version=1, config=plain.to_dict(),
                                   parent_version=None, offsets={})
    store = InMemorySnapshotStore()
    store.publish(manifest, blob)
    service = RankingService(content, _NoHistory())
    ctcvr = SnapshotReloader(store, EM3Loader(), service.prepare, ReloaderConfig("old", objectives=("ctcvr",)))
    assert ctcvr.check() is False and ctcvr.current is None
    assert "CVR head" in ctcvr.status().last_error and ctcvr.status().bad_versions == [1]
    ctr = SnapshotReloader(store, EM3Loader(), service.prepare, ReloaderConfig("old"))
    assert ctr.check() and ctr.current.model.objectives == ("ctr",)
    assert torch.is_tensor(ctr.current.model.model.item_emb.table.weight)
