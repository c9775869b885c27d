"""A tiny, fast stand-in for the EM3 model, for serving tests.

It has the two parts a server cares about, an ID part and a content part: an
item's row is its hashed ID embedding plus the mean of hashed text-token
embeddings; a candidate's logit is its dot product with the user's embedding
plus the mean of the history rows. Snapshots are safetensors bytes with a
SHA-256 in the manifest, verified like :func:`em3.snapshot.unpack` verifies
EM3 snapshots. A test double for unit tests of the pure ranking and reload logic
only: no command, integration test, benchmark or the demo can load it.

>>> cfg = ToyConfig(dim=4, buckets=16)
>>> manifest, blob = make_toy_snapshot("line", 1, cfg, seed=0)
>>> model = ToyLoader().load(manifest, blob, None)
>>> model.item_representations(["a"], [None]).shape
torch.Size([1, 4])
"""
from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import asdict
from typing import Any, Mapping, Sequence

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from em3.constraints import PositiveInt, config_class
from em3.errors import SnapshotError
from em3.types import ItemContent, SnapshotManifest
from serving.scoring import pinned_config_check

__all__ = ["ToyConfig", "ToyModel", "ToyLoader", "make_toy_snapshot", "corrupt"]


def _bucket(text: str, buckets: int) -> int:
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % buckets


@config_class
class ToyConfig:
    """Saved config of a :class:`ToyModel`."""

    dim: PositiveInt = 8
    buckets: PositiveInt = 1024
    history_len: PositiveInt = 20

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "toy", **asdict(self)}


class ToyModel:
    """Hashed ID + bag-of-tokens item rows; dot-product scores (click objective only)."""

    objectives = ("ctr",)

    def __init__(self, config: ToyConfig, tensors: Mapping[str, torch.Tensor], forward_delay_s: float = 0.0) -> None:
        self.config = config
        self.history_len = config.history_len
        self.item_table = tensors["item_table"]  # (B, D)
        self.token_table = tensors["token_table"]  # (B, D)
        self.user_table = tensors["user_table"]  # (B, D)
        self.bias = tensors["bias"]  # (1,)
        self.forward_delay_s = forward_delay_s

    @property
    def content_key(self) -> str:
        return hashlib.sha256(self.token_table.numpy().tobytes()).hexdigest()

    def item_content(self, item_ids: Sequence[str], contents: Sequence[ItemContent | None]) -> torch.Tensor:
        """Mean token embedding of each item's text ``(N, D)`` (zeros without text)."""
        b = self.config.buckets
        rows = torch.zeros(len(item_ids), self.config.dim)
        for n, content in enumerate(contents):
            tokens = content.text.lower().split() if content is not None else []
            if tokens:
                tok = torch.tensor([_bucket(t, b) for t in tokens], dtype=torch.long)
                rows[n] = self.token_table[tok].mean(dim=0)
        return rows

    def compose(self, item_ids: Sequence[str], content_rows: torch.Tensor,
                objective: str | None = None) -> torch.Tensor:
        ids = torch.tensor([_bucket(i, self.config.buckets) for i in item_ids], dtype=torch.long)
        return self.item_table[ids] + content_rows  # (N, D)

    def item_representations(
        self, item_ids: Sequence[str], contents: Sequence[ItemContent | None]
    ) -> torch.Tensor:
        return self.compose(item_ids, self.item_content(item_ids, contents))

    def score(
        self,
        user_id: str,
        context: Mapping[str, str],
        history_reps: torch.Tensor,
        candidate_reps: torch.Tensor,
    ) -> torch.Tensor:
        if self.forward_delay_s:
            time.sleep(self.forward_delay_s)
        user = self.user_table[_bucket(user_id, self.config.buckets)]  # (D,)
        if history_reps.shape[0]:
            user = user + history_reps.mean(dim=0)
        return candidate_reps @ user + self.bias  # (N,)


def make_toy_snapshot(
    line: str, version: int, config: ToyConfig | None = None, *, seed: int = 0,
    offsets: Mapping[str, int] | None = None,
) -> tuple[SnapshotManifest, bytes]:
    """A seeded random toy snapshot: manifest (with the blob's SHA-256) and blob."""
    config = config or ToyConfig()
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "item_table": torch.randn(config.buckets, config.dim, generator=g),
        "token_table": torch.randn(config.buckets, config.dim, generator=g),
        "user_table": torch.randn(config.buckets, config.dim, generator=g),
        "bias": torch.zeros(1),
    }
    blob = st_save(tensors)
    manifest = SnapshotManifest(
        model_line=line,
        version=version,
        parent_version=version - 1 if version > 1 else None,
        created_at=time.time(),
        config=config.to_dict(),
        offsets=dict(offsets or {}),
        sha256=hashlib.sha256(blob).hexdigest(),
        num_bytes=len(blob),
    )
    return manifest, blob


def corrupt(blob: bytes) -> bytes:
    """``blob`` with one byte flipped in the middle (its checksum no longer matches)."""
    mid = len(blob) // 2
    return blob[:mid] + bytes([blob[mid] ^ 0xFF]) + blob[mid + 1:]


class ToyLoader:
    """Loads toy snapshots, verifying checksum and (pinned or given) config."""

    def __init__(self, expected_config: Mapping[str, Any] | None = None, forward_delay_s: float = 0.0) -> None:
        if forward_delay_s < 0:
            raise ValueError(f"forward_delay_s must be >= 0, but {forward_delay_s} is given")
        self.expected_config = None if expected_config is None else dict(expected_config)
        self.forward_delay_s = forward_delay_s
        self._pinned: dict[str, Mapping[str, Any]] = {}
        self._lock = threading.Lock()

    def load(self, manifest: SnapshotManifest, blob: bytes, previous: Any) -> ToyModel:
        digest = hashlib.sha256(blob).hexdigest()
        if digest != manifest.sha256 or len(blob) != manifest.num_bytes:
            raise SnapshotError(
                f"checksum mismatch for {manifest.model_line!r} v{manifest.version}: "
                f"manifest says {manifest.sha256[:12]}, blob is {digest[:12]}"
            )
        expected = pinned_config_check(self._pinned, self._lock, manifest, self.expected_config)
        if dict(manifest.config) != dict(expected):
            raise SnapshotError(
                f"config mismatch for {manifest.model_line!r} v{manifest.version}: "
                f"expected {dict(expected)}, snapshot has {dict(manifest.config)}"
            )
        fields = {k: v for k, v in manifest.config.items() if k != "kind"}
        try:
            config = ToyConfig(**fields)
            tensors = st_load(blob)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise SnapshotError(f"unreadable toy snapshot: {exc}") from None
        return ToyModel(config, tensors, self.forward_delay_s)
