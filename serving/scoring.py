"""The small scoring interface the server ranks through, and its EM3 adapter.

A server never calls a model's training API. It needs these from a loaded
snapshot, which :class:`RankingModel` names. An item's row has a slow part and a
fast part (two-speed content):

* ``item_content(item_ids, contents)``: the slow part, computed by the content
  towers from the item's content. It depends only on the towers' weights, which
  ``content_key`` identifies, so the server keeps these rows across snapshot
  versions and recomputes them in the background when the key changes;
* ``compose(item_ids, content_rows)``: the whole row from the content rows and the
  fast, table-read part (ID embedding, counters, biases), per request: a snapshot
  that changes only the ranker and the ID tables costs no recompute;
* ``score(user_id, context, history_reps, candidate_reps)``: one logit per
  candidate.

A model may also explain its scores (:class:`ExplainingModel`, optional: the
server answers ``"explain": true`` with ``null`` explanations for one that cannot).

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

__all__ = ["RankingModel", "CountingModel", "ExplainingModel", "ModelLoader", "EM3Loader", "EM3RankingModel",
           "pinned_config_check"]

logger = logging.getLogger(__name__)


@runtime_checkable
class RankingModel(Protocol):
    """What a server needs from one loaded snapshot.

    Implementations must be safe to call from several threads at once
    (inference only, no state changes) and must not change after loading.
    """

    content_key: str
    """Identifies the content towers' weights: models with equal keys give equal
    :meth:`item_content` rows."""

    objectives: tuple[str, ...]
    """What :meth:`score` can rank by (``ctr`` at least; ``ctcvr`` and ``value`` with a
    CVR head)."""

    def item_content(
        self, item_ids: Sequence[str], contents: Sequence[ItemContent | None]
    ) -> torch.Tensor:
        """Content rows ``(N, C)`` for ``item_ids`` (``C`` may be 0); ``contents[i]`` is
        ``None`` when the item has no registered content (the model then masks the
        content part)."""
        ...

    def compose(self, item_ids: Sequence[str], content_rows: torch.Tensor,
                objective: str | None = None) -> torch.Tensor:
        """Rows ``(N, D)`` for ``item_ids`` from their content rows ``(N, C)``; cheap.
        With ``objective``, the rows serve only :meth:`score` by that objective: a
        model may leave out columns it does not read (keeping the layout)."""
        ...

    def score(
        self,
        user_id: str,
        context: Mapping[str, str],
        history_reps: torch.Tensor,
        candidate_reps: torch.Tensor,
        objective: str = "ctr",
    ) -> torch.Tensor:
        """Scores ``(N,)`` for ``candidate_reps`` ``(N, D)`` given ``history_reps``
        ``(H, D)`` (newest first; ``H`` may be 0): click logits for ``objective="ctr"``,
        else what :meth:`em3.model.EM3Model.score_candidates` says for it."""
        ...


@runtime_checkable
class CountingModel(Protocol):
    """A :class:`RankingModel` that knows how many impressions of each item its
    learner had learned when the snapshot was taken (for the fresh slot,
    :class:`serving.ranking.RankingConfig`)."""

    def impression_counts(self, item_ids: Sequence[str]) -> torch.Tensor | None:
        """Learned impressions ``(N,)`` of ``item_ids``; None when this model counts none."""
        ...


@runtime_checkable
class ExplainingModel(Protocol):
    """A :class:`RankingModel` that can say why it scores as it does
    (:mod:`em3.model.explain`). Called only for requests that ask for it."""

    def explain_scores(
        self, user_id: str, context: Mapping[str, str], history_reps: torch.Tensor, candidate_reps: torch.Tensor,
        objective: str = "ctr",
    ) -> Any:
        """A :class:`em3.model.explain.ScoreExplanation` of ``candidate_reps`` ``(C, D)``:
        of the score :meth:`RankingModel.score` gives under ``objective``."""
        ...

    def modality_mass(self, item_ids: Sequence[str], contents: Sequence[ItemContent | None]) -> torch.Tensor | None:
        """``(N, 3)`` attention mass on text, image and missing content, or None."""
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


def _model_config(manifest: SnapshotManifest) -> Any:
    """The manifest's :class:`em3.model.ModelConfig`, checked against its declared
    constraints; a config that breaks them is a :class:`SnapshotError`."""
    from em3.model import ModelConfig

    try:
        return ModelConfig.from_dict(manifest.config)
    except (TypeError, ValueError) as exc:
        raise SnapshotError(f"snapshot config is not a valid ModelConfig: {exc}") from None


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
        self._content_key: str | None = None
        self.objectives: tuple[str, ...] = tuple(model.config.objectives)

    @property
    def content_key(self) -> str:
        if self._content_key is None:
            from em3.snapshot import state_digest

            tower = {n: t for n, t in self.model.trainable_state_dict().items() if n.startswith(CONTENT_PREFIXES)}
            self._content_key = state_digest(tower) if self.model.config.use_content else "none"
        return self._content_key

    @torch.inference_mode()
    def item_content(
        self, item_ids: Sequence[str], contents: Sequence[ItemContent | None]
    ) -> torch.Tensor:
        if not self.model.config.use_content:
            return torch.zeros(len(item_ids), 0)
        with self.rep_lock:
            return self.model.content_embeddings(list(item_ids), list(contents))  # (N, d)

    @torch.inference_mode()
    def compose(self, item_ids: Sequence[str], content_rows: torch.Tensor,
                objective: str | None = None) -> torch.Tensor:
        content = content_rows if self.model.config.use_content else None
        # Ranking by ctr reads no conversion column: zeros there skip their statistics.
        cvr_columns = objective != "ctr"
        return self.model.encode_items(list(item_ids), content=content, cvr_columns=cvr_columns).reps  # (N, R)

    def item_representations(
        self, item_ids: Sequence[str], contents: Sequence[ItemContent | None]
    ) -> torch.Tensor:
        """Whole rows ``(N, R)``: :meth:`compose` of :meth:`item_content`."""
        return self.compose(item_ids, self.item_content(item_ids, contents))

    @torch.inference_mode()
    def score(
        self,
        user_id: str,
        context: Mapping[str, str],
        history_reps: torch.Tensor,
        candidate_reps: torch.Tensor,
        objective: str = "ctr",
    ) -> torch.Tensor:
        return self.model.score_candidates(user_id, dict(context), history_reps, candidate_reps, objective)  # (C,)

    @torch.inference_mode()
    def impression_counts(self, item_ids: Sequence[str]) -> torch.Tensor | None:
        return self.model.impression_counts(list(item_ids))  # (N,) or None

    @torch.inference_mode()
    def explain_scores(
        self, user_id: str, context: Mapping[str, str], history_reps: torch.Tensor, candidate_reps: torch.Tensor,
        objective: str = "ctr",
    ) -> Any:
        from em3.model.explain import explain_candidates

        return explain_candidates(self.model, user_id, dict(context), history_reps, candidate_reps, objective)

    @torch.inference_mode()
    def modality_mass(self, item_ids: Sequence[str], contents: Sequence[ItemContent | None]) -> torch.Tensor | None:
        from em3.model.explain import modality_mass

        if not self.model.config.use_content:
            return None
        with self.rep_lock:  # the frozen-prefix cache is shared with the line's other versions
            return modality_mass(self.model, item_ids, contents)  # (N, 3)


#: Trainable tensors of the content towers (LoRA adapters, fusion, content norm).
CONTENT_PREFIXES = ("text.", "image.", "fusion.", "content_norm.")


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
        from em3.model import EM3Model

        config = _model_config(manifest)  # before pinning: a bad config never becomes the line's
        expected = pinned_config_check(self._pinned, self._lock, manifest, self.expected_config)
        state = snapshot.unpack(blob, manifest, expected)  # raises SnapshotError
        if isinstance(previous, EM3RankingModel) and previous.model.config == config:
            model, rep_lock = _share_frozen_copy(previous.model), previous.rep_lock
        else:
            model, rep_lock = EM3Model(config, cache_items=self.cache_items), None
        try:
            model.load_trainable_state_dict(state)
        except (ValueError, RuntimeError, KeyError) as exc:
            raise SnapshotError(f"snapshot state does not fit the model: {exc}") from None
        return EM3RankingModel(model, rep_lock)

    def load_delta(self, manifest: SnapshotManifest, blob: bytes, previous: RankingModel | None) -> RankingModel:
        """The model of delta snapshot ``manifest``: ``previous`` (which must be its
        base) with the delta applied (:func:`em3.snapshot.apply_delta` checks the base's
        digest and the result's). ``previous`` is not modified."""
        from em3 import snapshot

        config = _model_config(manifest)
        expected = pinned_config_check(self._pinned, self._lock, manifest, self.expected_config)
        delta = snapshot.unpack(blob, manifest, expected)  # raises SnapshotError
        if not isinstance(previous, EM3RankingModel) or previous.model.config != config:
            raise SnapshotError(f"delta v{manifest.version} needs its base v{manifest.base_version} loaded")
        state = snapshot.apply_delta(previous.model.trainable_state_dict(), delta, manifest)
        model = _share_frozen_copy(previous.model)
        model.load_trainable_state_dict(state)
        return EM3RankingModel(model, previous.rep_lock)
