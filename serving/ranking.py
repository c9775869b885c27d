"""The ranking service: pure logic between a loaded model, item content and user history.

Two-speed content. An item's row is its *content row* (what the content towers make
of its text and image: slow, on CPU about a millisecond an item) composed with its
*fast part* (ID embedding, counters, biases: a table read). Content rows live in a
:class:`ContentTable` per line, in an :class:`ItemRepCache`, and are kept across
snapshot versions; every request composes the rows it needs
(:meth:`RankingModel.compose`). So a swap to a version that changed the ranker and
the ID tables costs nothing per item, whatever the catalogue's size. When a version
changes the content towers (its ``content_key`` differs), the line keeps serving the
content rows it has and a background thread recomputes the catalogue's rows with
the new towers, in batches, at most once per ``content_refresh_s``; the new table
replaces the old in one assignment. The first version of a line fills the table
for the registered catalog once, off the request path; items that show up later
(new registrations, cold-start candidates) are computed on first use, from their
content, so a new item ranks at once. Candidates without registered content are
ranked by their ID part (or dropped, see :class:`RankingConfig`) and always
reported back.

Invalidation is race-free: each cache keeps an epoch per item, read before the
content is fetched; a row computed from content older than the latest
invalidation is never stored.
"""
from __future__ import annotations

import logging
import math
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence, get_args

import torch

from em3.constraints import Literal, NonNegFloat, NonNegInt, PositiveInt, config_class
from em3.model.encoders import content_digest
from em3.retry import Breaker
from em3.stores import ContentSource, HistorySource
from em3.types import ItemContent, SnapshotManifest
from serving.scoring import CountingModel, ExplainingModel, RankingModel

__all__ = [
    "RankingConfig",
    "ItemRepCache",
    "ContentTable",
    "ServingState",
    "RankedItem",
    "RankResult",
    "RankingService",
    "EXPLAIN_TOP_HISTORY",
    "UNKNOWN_POLICIES",
    "promote_fresh",
]

logger = logging.getLogger(__name__)

UnknownPolicy = Literal["score", "drop"]
UNKNOWN_POLICIES: tuple[str, ...] = get_args(UnknownPolicy)


@config_class
class RankingConfig:
    """Settings of the :class:`RankingService`.

    Parameters
    ----------
    history_len : int
        Most recent clicks read per user (capped by the model's own ``history_len``).
    max_candidates : int
        Most candidates one request may carry.
    cache_max_items : int
        Rows kept per snapshot version; the oldest inserted go first beyond it.
    precompute_max_items : int
        Most items whose content rows are computed when a line's first version is
        loaded, and by each background refresh.
    content_refresh_s : float
        Least time between the starts of two background refreshes of a line's
        content rows (each starts when a newly loaded version changed the content
        towers); 0 refreshes on every such version.
    unknown_ttl_s : float
        How long the ID-only row of an unregistered item is trusted before the
        content store is asked again.
    rep_batch_size : int
        Items per ``item_representations`` call. Small batches keep the precompute
        of a new version from holding the model's prefix-cache lock for long, so a
        request with a cold item waits at most one batch.
    unknown_candidates : {"score", "drop"}
        Rank unregistered candidates by their ID part, or leave them out.
    fresh_slot : int or None
        A slot for new items (cold-start exploration): the best-scored candidate that
        the line's model has learned fewer than ``fresh_impressions`` impressions of
        is shown at this position (0 is the top) when the model ranks it lower.
        Every line gets the same slot, so an A/B test compares which new items each
        model picks and how fast it learns them, at equal exposure. ``None`` (the
        default): rank by score alone.
    fresh_impressions : int
        Below this many learned impressions an item is fresh (the cold-start gate's
        ``content_match_impressions``, 10 by default).
    """

    history_len: PositiveInt = 100
    max_candidates: PositiveInt = 1000
    cache_max_items: PositiveInt = 200_000
    precompute_max_items: NonNegInt = 50_000
    content_refresh_s: NonNegFloat = 30.0
    unknown_ttl_s: NonNegFloat = 2.0
    rep_batch_size: PositiveInt = 64
    unknown_candidates: UnknownPolicy = "score"
    fresh_slot: NonNegInt | None = None
    fresh_impressions: PositiveInt = 10


@dataclass
class _Row:
    rep: torch.Tensor  # (D,)
    known: bool
    expires: float  # monotonic time; inf for registered items


class ItemRepCache:
    """Item rows of one snapshot version, in one ``(capacity, D)`` matrix.

    A request gathers all its rows with one ``index_select`` (:meth:`gather`)
    instead of stacking a tensor per item (measured: 0.25 ms -> 0.05 ms for 200
    rows). Every read and write holds one lock briefly; slots of evicted or
    invalidated rows are reused, so a reader must never keep a slot number.
    """

    def __init__(self, max_items: int) -> None:
        if max_items <= 0:
            raise ValueError(f"max_items must be > 0, but {max_items} is given")
        self.max_items = max_items
        self._slots: dict[str, int] = {}  # insertion order = age (oldest first)
        self._known: list[bool] = []
        self._expires: list[float] = []
        self._free: list[int] = []
        self._matrix: torch.Tensor | None = None  # (capacity, D)
        self._epochs: dict[str, int] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._slots)

    def keys(self) -> list[str]:
        """Cached ids, oldest inserted first."""
        with self._lock:
            return list(self._slots)

    def get(self, item_id: str, now: float) -> _Row | None:
        """The row of one item (a copy), or None if absent or expired."""
        with self._lock:
            slot = self._slots.get(item_id)
            if slot is None or self._expires[slot] < now:
                return None
            return _Row(self._matrix[slot].clone(), self._known[slot], self._expires[slot])

    def gather(self, item_ids: Sequence[str], now: float) -> tuple[torch.Tensor | None, list[bool], list[int]]:
        """``(rows, known, missing)``: rows ``(N, D)`` of ``item_ids`` (zeros where
        missing; None when the cache is empty), whether each has registered
        content, and the positions that are absent or expired."""
        with self._lock:
            slots = [self._slots.get(i, -1) for i in item_ids]
            missing = [n for n, s in enumerate(slots) if s < 0 or self._expires[s] < now]
            if self._matrix is None:
                return None, [False] * len(item_ids), list(range(len(item_ids)))
            known = [s >= 0 and self._known[s] for s in slots]
            for n in missing:
                slots[n], known[n] = 0, False
            rows = self._matrix.index_select(0, torch.tensor(slots, dtype=torch.long))  # (N, D)
        if missing:
            rows[missing] = 0.0
        return rows, known, missing

    def epochs(self, item_ids: Sequence[str]) -> list[int]:
        """Current invalidation epochs of ``item_ids`` (read before fetching content)."""
        with self._lock:
            return [self._epochs.get(i, 0) for i in item_ids]

    def _take_slot(self, dim: int, like: torch.Tensor) -> int:
        if self._free:
            return self._free.pop()
        used = len(self._known)
        if self._matrix is None or used >= self._matrix.shape[0]:
            grown = like.new_zeros((max(64, 2 * used), dim))
            if self._matrix is not None:
                grown[:used] = self._matrix[:used]
            self._matrix = grown
        self._known.append(False)
        self._expires.append(0.0)
        return used

    def _drop(self, item_id: str) -> None:
        slot = self._slots.pop(item_id, None)
        if slot is not None:
            self._free.append(slot)

    def put_many(
        self, item_ids: Sequence[str], reps: torch.Tensor, known: Sequence[bool],
        epochs: Sequence[int], expires: Sequence[float],
    ) -> int:
        """Store rows whose epoch is still current; returns how many were stored."""
        stored = 0
        with self._lock:
            if self._matrix is not None and reps.shape[1:] != self._matrix.shape[1:]:
                raise ValueError(f"rows must have shape (N, {self._matrix.shape[1]}), but {tuple(reps.shape)} is given")
            for n, item_id in enumerate(item_ids):
                if self._epochs.get(item_id, 0) != epochs[n]:
                    continue  # invalidated while being computed: content may be stale
                self._drop(item_id)  # re-insert at the end (newest)
                slot = self._take_slot(reps.shape[1], reps)
                self._matrix[slot] = reps[n]
                self._known[slot], self._expires[slot] = bool(known[n]), expires[n]
                self._slots[item_id] = slot
                stored += 1
            while len(self._slots) > self.max_items:
                self._drop(next(iter(self._slots)))
        return stored

    def invalidate(self, item_ids: Iterable[str]) -> None:
        with self._lock:
            for item_id in item_ids:
                self._epochs[item_id] = self._epochs.get(item_id, 0) + 1
                self._drop(item_id)


class ContentTable:
    """The content rows one line serves, shared by its versions: ``current`` is the
    pair ``(content_key, cache)``, replaced whole by a refresh (one assignment), so a
    request that reads it once sees one consistent table."""

    def __init__(self, key: str, cache: ItemRepCache) -> None:
        self.current: tuple[str, ItemRepCache] = (key, cache)
        self.refreshing = False
        self.refresh_started = -math.inf  # monotonic
        self.refreshes = 0
        self.last_refresh: dict[str, float] = {}

    @property
    def key(self) -> str:
        return self.current[0]

    @property
    def cache(self) -> ItemRepCache:
        return self.current[1]


@dataclass(frozen=True)
class ServingState:
    """One loaded snapshot with its line's content table: what a request reads."""

    model_line: str
    version: int
    manifest: SnapshotManifest | None
    model: RankingModel
    content: ContentTable
    loaded_at: float = field(default_factory=time.time)

    @property
    def cache(self) -> ItemRepCache:
        """The content rows served now."""
        return self.content.cache


@dataclass(frozen=True)
class RankedItem:
    item_id: str
    score: float
    position: int
    promoted: bool = False  # shown at the fresh slot, above its score's place


def promote_fresh(order: Sequence[int], counts: Sequence[float], slot: int, fresh_impressions: int,
                  k: int) -> tuple[list[int], int | None]:
    """The fresh slot (:class:`RankingConfig`): ``order`` (candidate indices, best
    first) with its best-ranked fresh candidate (``counts[i] < fresh_impressions``)
    moved up to position ``slot``, if it is below it and ``slot < k``; and that
    candidate's index (None when nothing moved). Everything else keeps its order.

    >>> promote_fresh([0, 1, 2, 3], [50, 40, 3, 0], slot=1, fresh_impressions=10, k=4)
    ([0, 2, 1, 3], 2)
    >>> promote_fresh([0, 1, 2], [50, 4, 0], slot=1, fresh_impressions=10, k=3)  # already there
    ([0, 1, 2], None)
    """
    order = list(order)
    if slot >= min(k, len(order)):
        return order, None
    fresh = next((pos for pos, i in enumerate(order) if counts[i] < fresh_impressions), None)
    if fresh is None or fresh <= slot:
        return order, None
    chosen = order.pop(fresh)
    order.insert(slot, chosen)
    return order, chosen


@dataclass(frozen=True)
class RankResult:
    """Top items, unregistered candidates, and where the time went (seconds);
    with ``explain``, one explanation per item (:meth:`RankingService.explain`)."""

    items: list[RankedItem]
    unknown_item_ids: list[str]
    history_len: int
    timings: Mapping[str, float]
    explanations: list[dict | None] | None = None


#: History items listed per explained item, by target-attention weight.
EXPLAIN_TOP_HISTORY = 5


class RankingService:
    """Ranks candidates for a user with a :class:`ServingState`.

    Parameters
    ----------
    content : ContentSource
        Registered item content (Redis in production).
    history : HistorySource
        Per-user click history, newest first (the join maintains it).
    config : RankingConfig
    """

    def __init__(self, content: ContentSource, history: HistorySource, config: RankingConfig | None = None) -> None:
        self.content = content
        self.history = history
        self.config = config or RankingConfig()
        self._live: "weakref.WeakSet[ItemRepCache]" = weakref.WeakSet()
        self._live_lock = threading.Lock()
        self.history_errors = 0
        self.content_errors = 0
        #: Explanations that failed: the ranking was served with ``None`` explanations.
        self.explain_errors = 0
        #: Rankings in which the fresh slot moved a new item up (``RankingConfig.fresh_slot``).
        self.fresh_promotions = 0
        #: Skip a failing store for a cool-down instead of paying its timeout per request.
        self.history_breaker = Breaker()
        self.content_breaker = Breaker()
        self.history_skipped = 0

    # -- versions ----------------------------------------------------------------
    def prepare(
        self, line: str, manifest: SnapshotManifest | None, model: RankingModel,
        previous: ServingState | None = None,
    ) -> ServingState:
        """A new :class:`ServingState` for ``model``. The first version of a line fills
        a content table for the registered catalog (up to ``precompute_max_items``);
        later versions share the previous one's table and, when ``model`` changed the
        content towers, start a background refresh of it. Runs in the reloader's
        thread, never per request."""
        version = manifest.version if manifest is not None else 0
        if previous is None:
            t0 = time.perf_counter()
            cache = self._fill(model, self._catalog_ids(previous=None))
            table = ContentTable(model.content_key, cache)
            logger.info("line %r v%s: %d content rows computed in %.3f s", line, version, len(cache),
                        time.perf_counter() - t0)
        else:
            table = previous.content
            if model.content_key != table.key:
                self._maybe_refresh(line, table, model)
        return ServingState(line, version, manifest, model, table)

    def _catalog_ids(self, previous: ItemRepCache | None) -> list[str]:
        """The registered catalog and the items ``previous`` holds (newest first), up to
        ``precompute_max_items``."""
        wanted: dict[str, None] = {}
        if previous is not None:
            for item_id in reversed(previous.keys()):
                wanted[item_id] = None
        ids_fn = getattr(self.content, "ids", None)
        if callable(ids_fn):
            try:
                for item_id in ids_fn():
                    wanted[item_id] = None
            except Exception as exc:  # noqa: BLE001 - a store outage must not stop a swap
                self.content_errors += 1
                logger.warning("could not list the catalog for precompute: %r", exc)
        return list(wanted)[: self.config.precompute_max_items]

    def _fill(self, model: RankingModel, ids: Sequence[str]) -> ItemRepCache:
        """A new, live content cache holding the rows of ``ids``, computed in batches;
        items with identical content (same text and image bytes) are computed once."""
        cache = ItemRepCache(self.config.cache_max_items)
        with self._live_lock:
            self._live.add(cache)  # invalidations from now on reach this cache
        bs = self.config.rep_batch_size
        same_content: dict[str, torch.Tensor] = {}
        for start in range(0, len(ids), bs):
            self._content_rows(model, cache, ids[start:start + bs], time.monotonic(), same_content)
        return cache

    def _maybe_refresh(self, line: str, table: ContentTable, model: RankingModel) -> None:
        """Start recomputing ``table`` with ``model``'s towers in a background thread,
        unless a refresh runs or one started less than ``content_refresh_s`` ago."""
        now = time.monotonic()
        if table.refreshing or now - table.refresh_started < self.config.content_refresh_s:
            return
        table.refreshing, table.refresh_started = True, now

        def run() -> None:
            try:
                t0 = time.perf_counter()
                ids = self._catalog_ids(previous=table.cache)
                cache = self._fill(model, ids)
                table.current = (model.content_key, cache)  # the swap: one assignment
                seconds = time.perf_counter() - t0
                table.refreshes += 1
                table.last_refresh = {"items": len(cache), "seconds": seconds,
                                      "items_per_s": len(cache) / seconds if seconds > 0 else 0.0}
                logger.info("line %r: content rows of %d items refreshed in %.3f s", line, len(cache), seconds)
            except Exception:  # noqa: BLE001 - the old rows stay served; the next version retries
                logger.exception("line %r: content refresh failed", line)
            finally:
                table.refreshing = False

        threading.Thread(target=run, name=f"content-refresh-{line}", daemon=True).start()

    def invalidate(self, item_ids: Sequence[str]) -> None:
        """Drop the rows of ``item_ids`` from every live cache (content changed)."""
        with self._live_lock:
            caches = list(self._live)
        for cache in caches:
            cache.invalidate(item_ids)

    # -- rows ---------------------------------------------------------------------
    def _content_rows(
        self, model: RankingModel, cache: ItemRepCache, item_ids: Sequence[str], now: float,
        same_content: dict[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, list[bool]] | None:
        """Content rows of ``item_ids`` from the content store and the towers, stored in
        ``cache`` (unless the store failed: then they are not cached). ``same_content``
        maps content digests to rows already computed with ``model``, and is added to."""
        if not item_ids:
            return None
        epochs = cache.epochs(item_ids)
        contents: list[ItemContent | None] = [None] * len(item_ids)
        fetched = False
        if self.content_breaker.allow():
            try:
                contents = list(self.content.get_many(item_ids))
                fetched = True
                self.content_breaker.success()
            except Exception as exc:  # noqa: BLE001 - Redis outage: rank by ID, do not cache
                self.content_errors += 1
                self.content_breaker.failure()
                logger.warning("content lookup failed for %d items: %r", len(item_ids), exc)
        if same_content is None:
            rows = model.item_content(item_ids, contents)  # (N, C)
        else:
            rows = self._memo_rows(model, item_ids, contents, same_content)
        known = [c is not None for c in contents]
        if fetched:
            ttl = self.config.unknown_ttl_s
            expires = [math.inf if k else now + ttl for k in known]
            cache.put_many(item_ids, rows, known, epochs, expires)
        return rows, known

    @staticmethod
    def _memo_rows(model: RankingModel, item_ids: Sequence[str], contents: Sequence[ItemContent | None],
                   same_content: dict[str, torch.Tensor]) -> torch.Tensor:
        digests = [content_digest(c) for c in contents]
        todo = list({d: n for n, d in enumerate(digests) if d not in same_content}.values())
        if todo:
            fresh = model.item_content([item_ids[n] for n in todo], [contents[n] for n in todo])  # (M, C)
            for row, n in zip(fresh, todo):
                same_content[digests[n]] = row
        return torch.stack([same_content[d] for d in digests]) if digests else torch.empty(0, 0)

    def representations(self, state: ServingState, item_ids: Sequence[str],
                        objective: str | None = None) -> tuple[torch.Tensor, list[bool]]:
        """Rows ``(N, D)`` for ``item_ids``: their content rows from the line's table
        (computing misses) composed with the model's fast part; and whether each item
        has registered content. With ``objective`` the rows serve ranking (and
        explaining) by that objective only (:meth:`RankingModel.compose`)."""
        now = time.monotonic()
        cache = state.content.cache
        rows, known, missing = cache.gather(item_ids, now)
        if missing:
            unique = list(dict.fromkeys(item_ids[n] for n in missing))
            fresh, flags = self._content_rows(state.model, cache, unique, now)  # type: ignore[misc]
            if rows is None:
                rows = fresh.new_zeros((len(item_ids), fresh.shape[1]))
            where = {item_id: j for j, item_id in enumerate(unique)}
            picks = [where[item_ids[n]] for n in missing]
            rows[missing] = fresh[picks].to(rows.dtype)
            for n, j in zip(missing, picks):
                known[n] = flags[j]
        if rows is None:
            return torch.empty(0, 0), known
        return state.model.compose(item_ids, rows, objective), known  # (N, D)

    # -- requests -----------------------------------------------------------------
    def user_history(self, state: ServingState, user_id: str) -> list[str]:
        limit = min(self.config.history_len, int(getattr(state.model, "history_len", self.config.history_len)))
        if not self.history_breaker.allow():
            self.history_skipped += 1  # the store failed moments ago: rank without history
            return []
        try:
            history = list(self.history.get(user_id, limit))
        except Exception as exc:  # noqa: BLE001 - rank without history rather than fail
            self.history_errors += 1
            self.history_breaker.failure()
            logger.warning("history lookup failed for user %r: %r", user_id, exc)
            return []
        self.history_breaker.success()
        return history

    def rank(
        self, state: ServingState, user_id: str, item_ids: Sequence[str],
        context: Mapping[str, str] | None = None, k: int | None = None, explain: bool = False,
        objective: str = "ctr",
    ) -> RankResult:
        """The top ``k`` of ``item_ids`` for ``user_id``, best first by ``objective``
        (``ctr``, ``ctcvr`` or ``value``; see :class:`em3.experiment.ArmConfig`).

        ``item_ids`` must be unique and at most ``max_candidates`` long. With
        ``explain``, each ranked item also gets its explanation (:meth:`explain`);
        without, nothing of it runs.
        """
        if len(item_ids) > self.config.max_candidates:
            raise ValueError(
                f"item_ids must hold at most {self.config.max_candidates} candidates, but {len(item_ids)} are given"
            )
        if k is not None and k <= 0:
            raise ValueError(f"k must be > 0, but {k} is given")
        t0 = time.perf_counter()
        history_ids = self.user_history(state, user_id)
        t1 = time.perf_counter()
        cand_reps, known = self.representations(state, item_ids, objective)  # (N, D)
        unknown = [i for i, flag in zip(item_ids, known) if not flag]
        keep = list(range(len(item_ids)))
        if self.config.unknown_candidates == "drop" and unknown:
            keep = [n for n, flag in enumerate(known) if flag]
            cand_reps = cand_reps[keep]  # (N', D)
        if history_ids:
            hist_reps, _ = self.representations(state, history_ids, objective)  # (H, D)
        else:
            hist_reps = cand_reps.new_zeros((0, cand_reps.shape[1] if cand_reps.ndim == 2 else 0))
        t2 = time.perf_counter()
        if keep:
            with torch.inference_mode():
                if objective == "ctr":
                    scores = state.model.score(user_id, context or {}, hist_reps, cand_reps)  # (N',)
                else:
                    scores = state.model.score(user_id, context or {}, hist_reps, cand_reps, objective=objective)
            scores = torch.nan_to_num(scores.float().reshape(-1), nan=-math.inf)
            order = torch.argsort(scores, descending=True, stable=True).tolist()
            promoted = self._promote_fresh(state, [item_ids[n] for n in keep], scores, order, k or len(keep))
            if promoted is not None:
                order = promoted[0]
            top = order[: (k or len(keep))]
            values = scores.tolist()
        else:
            top, values, promoted = [], [], None
        t3 = time.perf_counter()
        chosen = None if promoted is None else promoted[1]
        items = [RankedItem(item_ids[keep[j]], float(values[j]), pos, j == chosen) for pos, j in enumerate(top)]
        timings = {"history_s": t1 - t0, "reps_s": t2 - t1, "model_s": t3 - t2, "total_s": t3 - t0}
        if not explain:
            return RankResult(items, unknown, len(history_ids), timings)
        try:
            explanations = self.explain(state, user_id, context or {}, history_ids, hist_reps, cand_reps[top],
                                        [item.item_id for item in items], objective)
        except Exception:  # noqa: BLE001 - the ranking stands without its explanations, counted
            self.explain_errors += 1
            logger.warning("explaining a ranking failed; served without explanations", exc_info=True)
            explanations = [None] * len(items)
        timings["explain_s"] = time.perf_counter() - t3
        return RankResult(items, unknown, len(history_ids), timings, explanations)

    def _promote_fresh(self, state: ServingState, item_ids: Sequence[str], scores: torch.Tensor,
                       order: list[int], k: int) -> tuple[list[int], int] | None:
        """:func:`promote_fresh` with the line's model's impression counts, or None
        (no slot configured, a model that does not count, or nothing moved). A
        candidate without a finite score is never promoted."""
        slot = self.config.fresh_slot
        if slot is None or not isinstance(state.model, CountingModel):
            return None
        counts = state.model.impression_counts(item_ids)  # (N,) or None
        if counts is None:
            return None
        counts = torch.where(torch.isfinite(scores).cpu(), counts.float().cpu(), math.inf).tolist()
        order, chosen = promote_fresh(order, counts, slot, self.config.fresh_impressions, k)
        if chosen is None:
            return None
        self.fresh_promotions += 1
        return order, chosen

    def explain(
        self, state: ServingState, user_id: str, context: Mapping[str, str], history_ids: Sequence[str],
        history_reps: torch.Tensor, reps: torch.Tensor, item_ids: Sequence[str], objective: str = "ctr",
    ) -> list[dict | None]:
        """One explanation per item of ``item_ids`` (rows ``reps`` ``(N, D)``, as scored
        against ``history_reps`` of ``history_ids``), or None for each with a model that
        cannot explain (:class:`serving.scoring.ExplainingModel`).

        Each explains the score the items were ranked by under ``objective``:
        ``{"objective", "units", "score", "baseline_score", "content", "id"}`` (the
        Shapley split, ``content + id = score - baseline_score``; ``score`` is the
        item's ranked score), ``"terms"`` (the same split per term of the score,
        ``{"click": {...}}`` and with ``ctcvr`` ``"conversion"`` and ``"odds"``, with
        ``value`` ``"conversion"`` and ``"value"``; they add up to the totals; see
        :mod:`em3.model.explain`), ``"history"`` (the
        :data:`EXPLAIN_TOP_HISTORY` history items with the largest target-attention
        weight, ``[{"item_id", "weight"}]``), ``"modality"`` (``{"text", "image",
        "missing"}``, the Fusion-Q-Former's attention mass; None without one, or while
        the content store is unreachable) and ``"content_rows_current"`` (whether the
        content row scored came from this version's content towers, rather than an
        earlier version's while a refresh is due or running; the attention mass is
        always this version's). Costs four forward passes over ``N`` items and one
        fusion pass over their content; nothing when not called.
        """
        from em3.model.explain import MODALITIES

        model = state.model
        if not isinstance(model, ExplainingModel) or not item_ids:
            return [None] * len(item_ids)
        with torch.inference_mode():
            rows = model.explain_scores(user_id, context, history_reps, reps, objective=objective).rows(
                history_ids, EXPLAIN_TOP_HISTORY)
        contents = None
        if self.content_breaker.allow():
            try:
                contents = list(self.content.get_many(item_ids))
                self.content_breaker.success()
            except Exception as exc:  # noqa: BLE001 - explain what can be explained
                self.content_errors += 1
                self.content_breaker.failure()
                logger.warning("content lookup for an explanation failed: %r", exc)
        mass = None if contents is None else model.modality_mass(item_ids, contents)  # (N, 3) or None
        current = state.content.key == model.content_key
        for n, row in enumerate(rows):
            row["modality"] = None if mass is None else dict(zip(MODALITIES, mass[n].tolist()))
            row["content_rows_current"] = current
        return rows
