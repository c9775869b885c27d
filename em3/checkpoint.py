"""Learner checkpoints: what training needs beyond a snapshot's weights, as bytes.

A snapshot (:mod:`em3.snapshot`) holds the model's learned state, which is all a
server needs. A learner that restarts from it with fresh optimizer state does not
continue where it stopped: Adam's moments and step counts, row-wise Adagrad's
accumulators, its own step counter (which steps train the content towers), its RNG
and the cache of history items' content embeddings all shape the next updates. A
checkpoint holds those, beside the snapshot it belongs to, so a restarted learner
ends with the same parameters as one that never stopped.

Format: one safetensors blob (tensors; no pickle anywhere) whose header metadata
``"learner"`` holds small JSON (counters, the cache's item ids), and a
:class:`em3.types.CheckpointManifest` naming the snapshot by ``version`` and by the
digest of its whole state (``state_sha256``, the same for a full snapshot and a
delta), with the blob's sha256 and length; stores sign the manifest like a
snapshot's (:mod:`em3.signing`). :func:`unpack_checkpoint` refuses a checkpoint whose
bytes, or whose snapshot digest, do not match.

>>> import torch
>>> blob, m = pack_checkpoint({"adam/w/step": torch.tensor(3.0)}, {"steps": 3}, model_line="main",
...                           version=7, state_sha256="a" * 64)
>>> tensors, meta = unpack_checkpoint(blob, m, state_sha256="a" * 64)
>>> float(tensors["adam/w/step"]), meta["steps"], m.version
(3.0, 3, 7)
"""
from __future__ import annotations

import time
from typing import Any, Mapping

import msgspec
import torch

from em3.errors import SnapshotError
from em3.snapshot import sha256_hex
from em3.types import CheckpointManifest

__all__ = ["pack_checkpoint", "unpack_checkpoint", "FORMAT"]

FORMAT = "safetensors"
_BLOB_FORMAT = "em3-learner-checkpoint"


def pack_checkpoint(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], *, model_line: str, version: int,
                    state_sha256: str, rank: int = 0,
                    created_at: float | None = None) -> tuple[bytes, CheckpointManifest]:
    """Serialise a learner's ``tensors`` and JSON-ready ``meta`` as the checkpoint of
    snapshot ``version`` (whose whole state has digest ``state_sha256``)."""
    from safetensors.torch import save

    out = {}
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"tensors[{name!r}] must be a Tensor, but {type(value).__name__} is given")
        out[name] = value.detach().to("cpu").contiguous()
    learner = msgspec.json.encode(dict(meta)).decode()
    blob = save(out, metadata={"format": _BLOB_FORMAT, "learner": learner})
    manifest = CheckpointManifest(model_line=str(model_line), version=int(version), state_sha256=state_sha256,
                                  sha256=sha256_hex(blob), num_bytes=len(blob),
                                  created_at=time.time() if created_at is None else float(created_at),
                                  rank=int(rank), format=FORMAT)
    return blob, manifest


def _header_metadata(blob: bytes, where: str) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob's JSON header."""
    if len(blob) < 8:
        raise SnapshotError(f"{where} is unreadable: {len(blob)} bytes")
    size = int.from_bytes(blob[:8], "little")
    if size > len(blob) - 8:
        raise SnapshotError(f"{where} is unreadable: header of {size} bytes in a blob of {len(blob)}")
    try:
        header = msgspec.json.decode(blob[8 : 8 + size])
    except msgspec.DecodeError as exc:
        raise SnapshotError(f"{where} is unreadable: {exc}") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != _BLOB_FORMAT:
        raise SnapshotError(f"{where} is not a learner checkpoint")
    return meta


def unpack_checkpoint(blob: bytes, manifest: CheckpointManifest,
                      state_sha256: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Verify ``blob`` against ``manifest`` (and, given ``state_sha256``, that it belongs
    to the snapshot state with that digest); return ``(tensors, meta)``.

    Raises
    ------
    em3.errors.SnapshotError
        On a format, length, checksum or snapshot-digest mismatch, unreadable bytes,
        or a floating tensor holding NaN or infinity.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    where = f"checkpoint {manifest.model_line} v{manifest.version} (rank {manifest.rank})"
    if manifest.format != FORMAT:
        raise SnapshotError(f"{where}: format must be {FORMAT!r}, but {manifest.format!r} is given")
    if state_sha256 is not None and manifest.state_sha256 != state_sha256:
        raise SnapshotError(f"{where} belongs to another state than the snapshot's "
                            f"({manifest.state_sha256[:16]}... vs {state_sha256[:16]}...)")
    if len(blob) != manifest.num_bytes:
        raise SnapshotError(f"{where}: blob has {len(blob)} bytes, manifest says {manifest.num_bytes}")
    if sha256_hex(blob) != manifest.sha256:
        raise SnapshotError(f"{where}: checksum mismatch")
    meta_text = _header_metadata(blob, where).get("learner", "{}")
    try:
        tensors = load(blob)
        meta = msgspec.json.decode(meta_text)
    except (SafetensorError, ValueError, RuntimeError, msgspec.DecodeError) as exc:
        raise SnapshotError(f"{where} is unreadable: {exc}") from None
    if not isinstance(meta, dict):
        raise SnapshotError(f"{where}: its metadata is not an object")
    bad = [n for n, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise SnapshotError(f"{where} holds non-finite values in {', '.join(sorted(bad)[:3])}; refused")
    return tensors, meta
