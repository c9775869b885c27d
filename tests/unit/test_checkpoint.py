"""Learner checkpoints: the format refuses what does not belong, signatures do not
cross between snapshots and checkpoints, the learner's round trip is exact and a
checkpoint of another optimizer setup is refused without touching the learner."""
from __future__ import annotations

import msgspec
import pytest
import torch

from em3 import snapshot
from em3.checkpoint import pack_checkpoint, unpack_checkpoint
from em3.errors import SignatureError, SnapshotError
from em3.model import ModelConfig
from em3.signing import sign_manifest, verify_manifest
from em3.stores import InMemoryContentStore, decode_batches, encode_batches
from learners.online import OnlineLearner
from learners.testing import InMemorySnapshotStore, synthetic_items, synthetic_samples

DIGEST = "ab" * 32


def _checkpoint(**kw):
    tensors = {"adam/w/exp_avg": torch.randn(3, 2), "adam/w/step": torch.tensor(4.0),
               "rng/generator": torch.Generator().manual_seed(1).get_state()}
    return pack_checkpoint(tensors, {"steps": 4, "history_ids": ["a"]}, model_line="main", version=3,
                           state_sha256=DIGEST, **kw)


def test_a_checkpoint_round_trips_and_refuses_another_state_other_bytes_or_a_snapshot_blob():
    blob, manifest = _checkpoint(rank=1)
    tensors, meta = unpack_checkpoint(blob, manifest, state_sha256=DIGEST)
    assert manifest.rank == 1 and meta == {"steps": 4, "history_ids": ["a"]}
    assert float(tensors["adam/w/step"]) == 4.0 and tensors["rng/generator"].dtype == torch.uint8
    with pytest.raises(SnapshotError, match="another state"):
        unpack_checkpoint(blob, manifest, state_sha256="cd" * 32)
    with pytest.raises(SnapshotError, match="checksum"):
        unpack_checkpoint(blob[:-1] + bytes([blob[-1] ^ 1]), manifest)
    snap_blob, _ = snapshot.pack({"w": torch.ones(2)}, model_line="main", version=3)
    forged = msgspec.structs.replace(manifest, sha256=snapshot.sha256_hex(snap_blob), num_bytes=len(snap_blob))
    with pytest.raises(SnapshotError, match="not a learner checkpoint"):
        unpack_checkpoint(snap_blob, forged)
    bad, m = pack_checkpoint({"adam/w/exp_avg": torch.tensor([float("nan")])}, {}, model_line="main", version=3,
                             state_sha256=DIGEST)
    with pytest.raises(SnapshotError, match="non-finite"):
        unpack_checkpoint(bad, m)


def test_checkpoint_signatures_do_not_pass_for_snapshot_signatures():
    _, manifest = _checkpoint()
    signed = sign_manifest(manifest, "key")
    verify_manifest(signed, "key")
    snap = snapshot.pack({"w": torch.ones(2)}, model_line="main", version=3)[1]
    snap = msgspec.structs.replace(snap, sha256=manifest.sha256, state_sha256=DIGEST)
    with pytest.raises(SignatureError, match="wrong signature"):
        verify_manifest(msgspec.structs.replace(manifest, signature=sign_manifest(snap, "key").signature), "key")
    with pytest.raises(SignatureError, match="unsigned"):
        verify_manifest(manifest, "key")


def test_a_store_refuses_checkpoints_of_another_version_or_two_for_one_rank():
    store = InMemorySnapshotStore(signing_key="key")
    blob, manifest = snapshot.pack({"w": torch.ones(2)}, model_line="main", version=3)
    ckpt_blob, ckpt = _checkpoint()
    with pytest.raises(ValueError, match="cannot be published"):
        store.publish(manifest, blob, checkpoints=[(ckpt, ckpt_blob)])  # DIGEST is not the state's
    ckpt = msgspec.structs.replace(ckpt, state_sha256=manifest.state_sha256)
    with pytest.raises(ValueError, match="one checkpoint per learner rank"):
        store.publish(manifest, blob, checkpoints=[(ckpt, ckpt_blob), (ckpt, ckpt_blob)])
    store.publish(manifest, blob, checkpoints=[(ckpt, ckpt_blob)])
    got, got_blob = store.get_checkpoint("main", 3)
    assert got_blob == ckpt_blob and got.signature
    with pytest.raises(SnapshotError, match="no checkpoint of learner 1"):
        store.get_checkpoint("main", 3, rank=1)


def test_batch_order_rebuilds_every_batch_and_refuses_one_that_does_not_fit():
    ids = {"t:1": ["c"], "t:0": ["a", "b", "d"]}
    order = encode_batches(ids, [["t:0", "t:1", "t:0"], ["t:0"]])
    assert decode_batches(ids, order) == [[("t:0", "a"), ("t:1", "c"), ("t:0", "b")], [("t:0", "d")]]
    with pytest.raises(ValueError):
        encode_batches(ids, [["t:0", "t:1"]])  # leaves ids out
    with pytest.raises(ValueError):
        decode_batches(ids, [[0, 1, 1]])  # t:1 has one id


def test_a_learner_restored_from_its_checkpoint_continues_exactly_and_refuses_a_foreign_one():
    config = ModelConfig.tiny("em3")
    content = InMemoryContentStore(synthetic_items())
    samples = synthetic_samples(240, seed=2)
    batches = [samples[k : k + 40] for k in range(0, 240, 40)]
    histories = lambda b: [[f"i{(n * 7 + j) % 30}" for j in range(n % 4)] for n in range(len(b))]  # noqa: E731

    def learner(**kw) -> OnlineLearner:
        return OnlineLearner(config, content, lr=1e-2, device="cpu", seed=3, **kw)

    a = learner()
    for b in batches[:3]:
        a.learn_batch(b, histories(b))
    tensors, meta = a.checkpoint()
    assert meta["steps"] == 3 and len(meta["history_ids"]) == tensors["history/content"].shape[0] > 0
    b_ = learner()
    b_.load_state_dict(a.state_dict())
    b_.load_checkpoint(tensors, meta)
    for b in batches[3:]:
        a.learn_batch(b, histories(b))
        b_.learn_batch(b, histories(b))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b_.state_dict().values()))

    adam_tables = learner(sparse_optimizer="adam")
    before = adam_tables.checkpoint()[0]
    with pytest.raises(ValueError, match="does not have"):
        adam_tables.load_checkpoint(tensors, meta)  # row-wise Adagrad state, but its tables train with Adam
    assert set(adam_tables.checkpoint()[0]) == set(before) and adam_tables.steps == 0
