import json
import struct

import pytest
import torch

from em3.codec import decode_manifest, manifest_to_json
from em3.errors import SnapshotError
from em3.model import ModelConfig
from em3.snapshot import pack, unpack
from em3.stores import InMemoryContentStore
from em3.types import ItemContent, Impression, Sample
from learners import OnlineLearner


@pytest.fixture(scope="module")
def learner():
    items = [ItemContent(f"i{k}", text=f"film number {k} | Comedy") for k in range(8)]
    lrn = OnlineLearner(ModelConfig.tiny(image_model="none"), InMemoryContentStore(items), device="cpu", seed=0)
    samples = [Sample(Impression(f"m{k}", f"r{k}", f"u{k % 3}", f"i{k % 8}", 0, 1.7e9 + k), k % 2, 1.7e9 + k)
               for k in range(16)]
    lrn.learn_batch(samples, [["i1", "i2"]] * 16)
    return lrn, samples


def _pack(lrn, **extra):
    fields = dict(model_line="main", version=3, parent_version=2, created_at=1.7e9,
                  config=lrn.config, offsets={"samples:0": 120}, stats={"n": 16})
    fields.update(extra)
    return pack(lrn.state_dict(), **fields)


def test_roundtrip_restores_every_tensor_and_the_scores(learner):
    lrn, samples = learner
    blob, manifest = _pack(lrn)
    manifest = decode_manifest(manifest_to_json(manifest))  # through the codec, as in Redis
    assert manifest.num_bytes == len(blob) and manifest.offsets == {"samples:0": 120}
    assert manifest.config == json.loads(json.dumps(lrn.config.to_dict()))
    state = unpack(blob, manifest, expected_config=lrn.config)
    original = lrn.state_dict()
    assert state.keys() == original.keys()
    assert all(torch.equal(state[k], original[k]) for k in state)
    fresh = OnlineLearner(lrn.config, lrn.content, device="cpu", seed=5)
    fresh.load_state_dict(state)
    hist = [["i1"]] * len(samples)
    assert (fresh.score(samples, hist) == lrn.score(samples, hist)).all()


def test_mapping_form_and_safetensors_bytes(learner):
    lrn, _ = learner
    blob, manifest = pack(lrn.state_dict(), {"model_line": "x", "version": 1, "config": lrn.config.to_dict()})
    header_len = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8 : 8 + header_len])  # a safetensors header, not a pickle
    assert "__metadata__" in header and not blob.startswith(b"\x80")
    assert unpack(blob, manifest, lrn.config.to_dict()).keys() == lrn.state_dict().keys()


def test_checksum_and_length_mismatch_are_refused(learner):
    lrn, _ = learner
    blob, manifest = _pack(lrn)
    corrupt = bytearray(blob)
    corrupt[-5] ^= 0xFF
    with pytest.raises(SnapshotError, match="checksum mismatch"):
        unpack(bytes(corrupt), manifest, lrn.config)
    with pytest.raises(SnapshotError, match="bytes"):
        unpack(blob[:-1], manifest, lrn.config)


def test_config_mismatch_is_refused_with_the_differing_keys(learner):
    lrn, _ = learner
    blob, manifest = _pack(lrn)
    with pytest.raises(SnapshotError, match="embed_dim: snapshot 16 vs expected 32"):
        unpack(blob, manifest, lrn.config.replace(embed_dim=32))


def test_pack_validates_fields(learner):
    lrn, _ = learner
    with pytest.raises(ValueError, match="version is required"):
        pack(lrn.state_dict(), model_line="x")
    with pytest.raises(ValueError, match="sha256 is computed"):
        pack(lrn.state_dict(), model_line="x", version=1, sha256="abc")
    with pytest.raises(TypeError, match="must be a Tensor"):
        pack({"w": [1, 2]}, model_line="x", version=1)


def test_non_finite_weights_are_refused_even_with_a_matching_checksum(learner):
    lrn, _ = learner
    state = lrn.state_dict()
    name = next(n for n, t in state.items() if t.is_floating_point() and "mlp" in n)
    state[name] = state[name].clone()
    state[name].view(-1)[0] = float("nan")
    blob, manifest = pack(state, {"model_line": "x", "version": 2, "config": lrn.config.to_dict()})
    with pytest.raises(SnapshotError, match="non-finite values in 1 tensors"):
        unpack(blob, manifest, lrn.config)
    state[name].view(-1)[0] = float("inf")
    blob, manifest = pack(state, {"model_line": "x", "version": 3, "config": lrn.config.to_dict()})
    with pytest.raises(SnapshotError, match=name):
        unpack(blob, manifest, lrn.config)
