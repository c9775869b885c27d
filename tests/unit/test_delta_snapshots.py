"""Delta snapshots: packing only what changed, the publisher's full/delta cadence,
resuming and serving through a chain, and refusing a delta that does not fit."""
from __future__ import annotations

import msgspec
import pytest
import torch

from em3 import snapshot
from em3.errors import SnapshotError
from em3.model import ModelConfig
from em3.stores import InMemoryContentStore
from em3.types import Impression, ItemContent, Sample
from learners import OnlineLearner
from learners.publisher import PublisherConfig, SnapshotPublisher
from learners.testing import InMemoryAppliedLog, InMemorySnapshotStore
from serving.ranking import RankingService
from serving.reloader import ReloaderConfig, SnapshotReloader
from serving.scoring import EM3Loader


def _table_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"table": torch.randn(1000, 16, generator=g), "dense": torch.randn(8, 8, generator=g),
            "count": torch.zeros(1000), "scalar": torch.tensor(1.0)}


def test_a_delta_carries_the_changed_rows_and_the_changed_dense_tensors_only():
    base = _table_state()
    new = {k: v.clone() for k, v in base.items()}
    new["table"][[3, 500]] += 1.0  # 0.2% of the rows
    new["count"][3] += 1
    new["dense"] += 0.1
    blob, m = snapshot.pack_delta(new, base, base_version=4, base_state_sha256=snapshot.state_digest(base),
                                  model_line="main", version=5)
    full, _ = snapshot.pack(new, model_line="main", version=5)
    assert m.kind == "delta" and m.base_version == 4 and m.stats["delta"] == {"whole_tensors": 1, "rows": 3}
    assert len(blob) < 0.1 * len(full)
    delta = snapshot.unpack(blob, m)
    assert "scalar" not in delta and "table" not in delta  # unchanged / sent as rows
    out = snapshot.apply_delta(base, delta, m)
    assert all(torch.equal(out[k], new[k]) for k in new)
    assert torch.equal(base["count"], torch.zeros(1000))  # the base is not modified
    assert m.state_sha256 == snapshot.state_digest(new)


def test_a_delta_on_the_wrong_base_or_with_a_wrong_result_is_refused():
    base = _table_state()
    new = {k: v.clone() for k, v in base.items()}
    new["table"][7] = 9.0
    blob, m = snapshot.pack_delta(new, base, base_version=1, base_state_sha256=snapshot.state_digest(base),
                                  model_line="main", version=2)
    delta = snapshot.unpack(blob, m)
    with pytest.raises(SnapshotError, match="base state does not match"):
        snapshot.apply_delta(_table_state(seed=1), delta, m)
    lying = msgspec.structs.replace(m, state_sha256="0" * 64)
    with pytest.raises(SnapshotError, match="does not give the published state"):
        snapshot.apply_delta(base, delta, lying)


def _publish(pub, state, parent):
    return pub.publish(state, parent=parent, offsets={"t:0": 1}, applied_ids={}, stats={})


def test_the_publisher_sends_a_full_snapshot_every_n_deltas_and_resumes_through_the_chain():
    snaps, applied = InMemorySnapshotStore(keep=2), InMemoryAppliedLog()
    pub = SnapshotPublisher(snaps, applied, "main", {"d": 1}, PublisherConfig(full_every=2))
    state, parent, kinds = _table_state(), None, []
    for step in range(5):
        state = {k: v.clone() for k, v in state.items()}
        state["table"][step] += 1.0
        m = _publish(pub, state, parent)
        parent = m.version
        kinds.append(m.kind)
    assert kinds == ["full", "delta", "delta", "full", "delta"]
    # keep=2 keeps v4 and v5, and nothing older: v5's chain is v4 (full) -> v5.
    assert snaps.versions("main") == [4, 5]
    point = SnapshotPublisher(snaps, applied, "main", {"d": 1}).resume()
    assert point.version == 5 and all(torch.equal(point.state[k], state[k]) for k in state)


def test_the_store_keeps_the_bases_of_the_deltas_it_keeps():
    snaps, applied = InMemorySnapshotStore(keep=1), InMemoryAppliedLog()
    pub = SnapshotPublisher(snaps, applied, "main", {"d": 1}, PublisherConfig(full_every=10))
    state, parent = _table_state(), None
    for step in range(4):
        state = {k: v.clone() for k, v in state.items()}
        state["count"][step] += 1
        parent = _publish(pub, state, parent).version
    assert snaps.versions("main") == [1, 2, 3, 4]  # v4 is a delta of v3 of v2 of the full v1
    assert [m.version for m, _ in snaps.get_chain("main", 4)] == [1, 2, 3, 4]
    assert [m.version for m, _ in snaps.get_chain("main", 4, have=2)] == [3, 4]
    manifest, whole = snapshot.load_state(snaps, "main")  # the latest is a delta
    assert manifest.version == 4 and manifest.kind == "delta"
    assert all(torch.equal(whole[k], state[k]) for k in state)


@pytest.fixture(scope="module")
def tiny_line():
    """A tiny EM3 learner's states after 0, 1 and 2 training batches."""
    items = [ItemContent(f"i{k}", text=f"film number {k} | Comedy") for k in range(8)]
    store = InMemoryContentStore(items)
    lrn = OnlineLearner(ModelConfig.tiny(image_model="none"), store, device="cpu", seed=0)
    states = [lrn.state_dict()]
    for b in range(2):
        samples = [Sample(Impression(f"m{b}-{k}", "r", f"u{k % 3}", f"i{(k + b) % 8}", 0, 1.7e9 + k), k % 2,
                          1.7e9 + k) for k in range(16)]
        lrn.learn_batch(samples, [["i1"]] * 16)
        states.append(lrn.state_dict())
    return lrn.config, store, [{k: v.detach().clone() for k, v in s.items()} for s in states]


def _served_state(reloader):
    return reloader.current.model.model.trainable_state_dict()


def test_a_server_applies_deltas_on_what_it_serves_and_a_late_server_loads_the_chain(tiny_line):
    config, content, states = tiny_line
    snaps, applied = InMemorySnapshotStore(), InMemoryAppliedLog()
    pub = SnapshotPublisher(snaps, applied, "main", config.to_dict(), PublisherConfig(full_every=5))
    service = RankingService(content, _NoHistory())
    early = SnapshotReloader(snaps, EM3Loader(), service.prepare, ReloaderConfig("main"))
    parent = _publish(pub, states[0], None).version
    assert early.check() and early.current.manifest.kind == "full"
    for state in states[1:]:
        parent = _publish(pub, state, parent).version
        assert early.check() and early.current.manifest.kind == "delta"
    late = SnapshotReloader(snaps, EM3Loader(), service.prepare, ReloaderConfig("main"))
    assert late.check() and late.current.version == parent
    for reloader in (early, late):
        served = _served_state(reloader)
        assert all(torch.equal(served[k], states[-1][k]) for k in states[-1])


def test_a_server_refuses_a_delta_whose_result_does_not_verify_and_keeps_serving(tiny_line):
    config, content, states = tiny_line
    snaps, applied = InMemorySnapshotStore(), InMemoryAppliedLog()
    pub = SnapshotPublisher(snaps, applied, "main", config.to_dict(), PublisherConfig(full_every=5))
    reloader = SnapshotReloader(snaps, EM3Loader(), RankingService(content, _NoHistory()).prepare,
                                ReloaderConfig("main"))
    v1 = _publish(pub, states[0], None).version
    assert reloader.check()
    m2 = _publish(pub, states[1], v1)
    manifest, blob = snaps.snaps["main"][m2.version]
    snaps.snaps["main"][m2.version] = (msgspec.structs.replace(manifest, state_sha256="f" * 64), blob)
    assert reloader.check() is False
    assert reloader.current.version == v1 and m2.version in reloader.status().bad_versions


def test_a_server_refuses_a_snapshot_whose_config_breaks_its_declaration_and_loads_the_next(tiny_line, caplog):
    config, content, states = tiny_line
    snaps, applied = InMemorySnapshotStore(), InMemoryAppliedLog()
    reloader = SnapshotReloader(snaps, EM3Loader(), RankingService(content, _NoHistory()).prepare,
                                ReloaderConfig("main"))
    bad = SnapshotPublisher(snaps, applied, "main", {**config.to_dict(), "embed_dim": 0, "fusion": "concat"})
    v1 = _publish(bad, states[0], None).version
    with caplog.at_level("ERROR", logger="serving.reloader"):
        assert reloader.check() is False and reloader.current is None and reloader.status().bad_versions == [v1]
    assert "ModelConfig: embed_dim must be > 0, but 0 is given; fusion must be one of 'qformer', 'mean', " \
           "but 'concat' is given" in caplog.text
    # The refused config was not pinned as the line's: the next good snapshot is served.
    good = SnapshotPublisher(snaps, applied, "main", config.to_dict(), PublisherConfig(check_pointer=False))
    v2 = _publish(good, states[1], v1).version
    assert reloader.check() and reloader.current.version == v2


class _NoHistory:
    def get(self, user_id, limit):
        return []
