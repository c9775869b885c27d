"""The small scoring interface the server ranks through, and its EM3 adapter.

A server never calls a model's training API. It needs two things from a loaded
snapshot, which :class:`RankingModel` names:

* ``item_representations(item_ids, contents)``: one row per item, computed from
  its content and ID parts, once per item and snapshot version (the server
  caches the rows);
* ``score(user_id, context, history_reps, candidate_reps)``: one logit per
  candidate.

A :class:`ModelLoader` turns a verified snapshot (manifest and blob) into a
:class:`RankingModel`. :class:`EM3Loader` is the production one (the EM3 model
of :mod:`em3.model`, verified by :func:`em3.snapshot.unpack`);
:mod:`serving.toy` holds a tiny stand-in used by unit tests.
"""
from __future__ import annotations

import copy
import logging
import threading
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import torch

from em3.errors import SnapshotError
from em3.types import ItemContent, SnapshotManifest

__all__ = ["RankingModel", "ModelLoader", "EM3Loader", "EM3RankingModel", "pinned_config_check"]

logger = logging.getLogger(__name__)


@runtime_checkable
class RankingModel(Protocol):
    """What a server needs from one loaded snapshot.

    Implementations must be safe to call from several threads at once
    (inference only, no state changes) and must not change after loading.
    """

    def item_representations(
        self, item_ids: Sequence[str], contents: Sequence[ItemContent | None]
    ) -> torch.Tensor:
        """Rows ``(N, D)`` for ``item_ids``; ``contents[i]`` is ``None`` when the item
        has no registered content (the model then masks the content part)."""
        ...

    def score(
        self,
        user_id: str,
        context: Mapping[str, str],
        history_reps: torch.Tensor,
        candidate_reps: torch.Tensor,
    ) -> torch.Tensor:
        """Logits ``(N,)`` for ``candidate_reps`` ``(N, D)`` given ``history_reps``
        ``(H, D)`` (newest first; ``H`` may be 0)."""
        ...


@runtime_checkable
class ModelLoader(Protocol):
    """Builds a :class:`RankingModel` from a published snapshot.

    ``load`` verifies the blob (checksum, config) and raises
    :class:`em3.errors.SnapshotError` when it is bad. ``previous`` is the model
    currently served on the same line (or ``None``); a loader may share its
    frozen, never-trained parts with the new model, but must never modify it:
    requests may still be using it.
    """

    def load(
        self, manifest: SnapshotManifest, blob: bytes, previous: RankingModel | None
    ) -> RankingModel: ...


def pinned_config_check(
    pinned: dict[str, Mapping[str, Any]], lock: threading.Lock, manifest: SnapshotManifest,
    expected: Mapping[str, Any] | None,
) -> Mapping[str, Any]:
    """The config a snapshot of ``manifest.model_line`` must carry.

    With ``expected`` given, that; otherwise the config of the first snapshot
    loaded for the line, which stays pinned for the life of the server, so a
    learner that starts publishing a differently shaped model into the line
    is refused instead of served.
    """
    if expected is not None:
        return expected
    with lock:
        return pinned.setdefault(manifest.model_line, dict(manifest.config))


def _share_frozen_copy(model: Any) -> Any:
    """A copy of ``model`` that shares everything except trainable parameters and buffers.

    Frozen parameters, tokenizers, configs and the frozen-prefix cache are the
    same objects in both (they never change after construction, or only through
    the cache, which the caller locks); trainable parameters and buffers are new
    tensors, so loading a snapshot into the copy leaves ``model`` untouched.
    """
    memo: dict[int, Any] = {}
    for module in model.modules():
        for name, value in vars(module).items():
            if name in ("_parameters", "_buffers", "_modules") or isinstance(value, (torch.Tensor, torch.nn.Module)):
                continue
            if not isinstance(value, (int, float, bool, str, type(None))):
                memo[id(value)] = value
        for param in module.parameters(recurse=False):
            if not param.requires_grad:
                memo[id(param)] = param
    return copy.deepcopy(model, memo)


class EM3RankingModel:
    """Adapts :class:`em3.model.EM3Model` to :class:`RankingModel` (inference only).

    ``item_representations`` fills the model's frozen-prefix cache, a plain LRU
    dict shared with the versions before and after this one, so those calls are
    serialised by ``rep_lock`` (one per line); ``score`` only reads and runs
    concurrently.
    """

    def __init__(self, model: Any, rep_lock: threading.Lock | None = None) -> None:
        self.model = model.eval()
        self.history_len = int(model.config.history_len)
        self.rep_lock = rep_lock or threading.Lock()

    @torch.inference_mode()
    def item_representations(
        self, item_ids: Sequence[str], contents: Sequence[ItemContent | None]
    ) -> torch.Tensor:
        with self.rep_lock:
            return self.model.item_representations(list(item_ids), list(contents))  # (N, R)

    @torch.inference_mode()
    def score(
        self,
        user_id: str,
        context: Mapping[str, str],
        history_reps: torch.Tensor,
        candidate_reps: torch.Tensor,
    ) -> torch.Tensor:
        return self.model.score_candidates(user_id, dict(context), history_reps, candidate_reps)  # (C,)


class EM3Loader:
    """Loads EM3 snapshots: :func:`em3.snapshot.unpack` verifies checksum and config,
    then the trainable state goes into a model.

    The first version of a line builds a fresh :class:`em3.model.EM3Model`
    (pretrained encoders load once); later versions copy the previous model
    sharing its frozen encoders and prefix cache, and load only the trainable
    state, so a swap costs milliseconds plus the catalog precompute.

    Parameters
    ----------
    expected_config : mapping, optional
        The :class:`em3.model.config.ModelConfig` dict every snapshot must carry.
        ``None`` pins each line to the config of its first loaded snapshot.
    cache_items : int
        Frozen-prefix cache capacity of each line's model.
    """

    def __init__(self, expected_config: Mapping[str, Any] | None = None, cache_items: int = 50_000) -> None:
        if cache_items < 0:
            raise ValueError(f"cache_items must be >= 0, but {cache_items} is given")
        self.expected_config = None if expected_config is None else dict(expected_config)
        self.cache_items = cache_items
        self._pinned: dict[str, Mapping[str, Any]] = {}
        self._lock = threading.Lock()

    def load(
        self, manifest: SnapshotManifest, blob: bytes, previous: RankingModel | None
    ) -> RankingModel:
        # Heavy imports stay lazy: `em3 serve --help` must not load torch models.
        from em3 import snapshot
        from em3.model import EM3Model, ModelConfig

        expected = pinned_config_check(self._pinned, self._lock, manifest, self.expected_config)
        state = snapshot.unpack(blob, manifest, expected)  # raises SnapshotError
        try:
            config = ModelConfig.from_dict(manifest.config)
        except (TypeError, ValueError) as exc:
            raise SnapshotError(f"snapshot config is not a ModelConfig: {exc}") from None
        if isinstance(previous, EM3RankingModel) and previous.model.config == config:
            model, rep_lock = _share_frozen_copy(previous.model), previous.rep_lock
        else:
            model, rep_lock = EM3Model(config, cache_items=self.cache_items), None
        try:
            model.load_trainable_state_dict(state)
        except (ValueError, RuntimeError, KeyError) as exc:
            raise SnapshotError(f"snapshot state does not fit the model: {exc}") from None
        return EM3RankingModel(model, rep_lock)
