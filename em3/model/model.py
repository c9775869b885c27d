"""EM3Model: content encoders + fusion + hashed IDs + DIN ranker, in one module.

An item's representation is ``[content ; id]`` (``(N, 2d)``; ``[id]`` for
``id_only``), computed once per unique item of a batch (history and targets together;
a learner may pass cached content embeddings for history items). Extra columns follow
(``ModelConfig.rep_dim``): with the content-match term on
(``ModelConfig.content_match``, the default for content variants) the item's
cold-start gate ``tau / (tau + n)``, ``n`` = impressions its ID row has been trained
on; with click statistics or bias terms on, the item's share of the wide logit (its
weighted smoothed click-rate logit and popularity, its bias). The counters behind them
(:data:`COUNTER_STATE`, advanced by :meth:`EM3Model.observe_impressions`) travel in
snapshots, so a serving cache of representations holds everything a request needs;
the user's statistic is read from the same counters at scoring time.

Serving path (per snapshot version): ``reps = model.item_representations(ids, contents)``
once for the catalog, then ``model.score_candidates(user, context, reps[hist], reps[cands])``
per request; both under ``torch.no_grad()`` and ``model.eval()``.

The model does no I/O: an item's image must arrive as bytes in ``ItemContent.image``;
``image_ref`` is never resolved here (a content store resolves it), and an item with
neither gets its image modality masked.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from em3.idtable import IdTable
from em3.model.config import ModelConfig
from em3.model.encoders import ImageEncoder, PrefixCache, TextEncoder, content_digest, decode_image
from em3.model.fusion import FusionQFormer, MeanFusion
from em3.model.losses import content_id_infonce
from em3.model.ranker import BoundedEmbedding, ClickHead, ConversionHead, HashEmbedding, TargetAttention, stable_bucket
from em3.types import ItemContent

__all__ = ["EM3Model", "ItemEncoding", "COUNTER_STATE", "USER_ROW_STATE", "ITEM_ROW_STATE", "ID_MAP_STATE",
           "user_rows", "user_rows_in", "reset_user_rows", "sum_terms"]

# State learned from data but not by gradient: saved in snapshots with the trainable
# tensors, and merged across data-parallel learners by summing changes.
COUNTER_STATE = ("item_impressions", "item_clicks", "user_impressions", "user_clicks", "global_counts",
                 "cvr_item_counts", "cvr_user_counts", "cvr_global_counts")
#: The id -> row maps of bounded ID tables (``id_table="bounded"``, :mod:`em3.idtable`):
#: int64 buffers saved with the trainable state, so snapshots carry the map.
ID_MAP_STATE = tuple(f"{t}_emb.{a}" for t in ("user", "item") for a in ("keys", "last_seen", "hits"))
_STATE_BUFFERS = COUNTER_STATE + ("head.content_mean",) + ID_MAP_STATE
#: The state tensors with one row per user bucket: what a user's deletion resets.
USER_ROW_STATE = ("user_emb.table.weight", "user_bias.table.weight", "user_impressions", "user_clicks",
                  "cvr_user_counts")
#: The state tensors with one row per item row: what a new owner of a row resets.
ITEM_ROW_STATE = ("item_emb.table.weight", "item_bias.table.weight", "item_impressions", "item_clicks",
                  "cvr_item_counts")
#: Of those, the learned (gradient) rows: an admitted ID starts from its fallback row's.
_WARM_ROWS = ("user_emb.table.weight", "user_bias.table.weight", "item_emb.table.weight", "item_bias.table.weight")


def sum_terms(terms: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The sum of :meth:`EM3Model.objective_terms` in their order: the ranked score.

    >>> sum_terms({"click": torch.tensor([-1.0]), "conversion": torch.tensor([-2.0])})
    tensor([-3.])
    """
    total = None
    for term in terms.values():
        total = term if total is None else total + term
    if total is None:
        raise ValueError("terms must hold at least one term, but none is given")
    return total


def user_rows(user_buckets: int, user_ids: Sequence[str]) -> list[int]:
    """The rows (buckets) of ``user_ids`` in every :data:`USER_ROW_STATE` tensor.

    >>> user_rows(16, ["a", "a"]) == [user_rows(16, ["a"])[0]] * 2
    True
    """
    return [stable_bucket(u, "user", user_buckets) for u in user_ids]


def user_rows_in(config: Mapping, state: Mapping[str, torch.Tensor], user_ids: Sequence[str]
                 ) -> tuple[list[int], list[bool]]:
    """The rows of ``user_ids`` in a saved ``state`` of a model with ``config`` (a
    snapshot manifest's config), and whether each holds an own row: with hashed tables
    the hash buckets (never own); with bounded tables (``id_table="bounded"``) the
    rows the state's map gives (:data:`ID_MAP_STATE`): an own row, or the fallback row.

    >>> user_rows_in({"user_buckets": 16}, {}, ["a"]) == (user_rows(16, ["a"]), [False])
    True
    """
    buckets = int(config["user_buckets"])
    if config.get("id_table", "hashed") != "bounded":
        return user_rows(buckets, user_ids), [False] * len(user_ids)
    table = IdTable.from_arrays(*(state[f"user_emb.{a}"].cpu().numpy() for a in ("keys", "last_seen", "hits")),
                                rows=buckets, fallback=int(config["id_fallback_buckets"]), salt="user")
    return table.rows(user_ids).tolist(), table.owns(user_ids).tolist()


@torch.no_grad()
def reset_user_rows(state: Mapping[str, torch.Tensor], rows: Sequence[int]) -> list[str]:
    """Zero ``rows`` of every :data:`USER_ROW_STATE` tensor of ``state`` in place (the
    embedding row, the bias, the impression and click counters): nothing learned from
    those users is left in them. Returns the names of the tensors reset.

    >>> st = {"user_emb.table.weight": torch.ones(4, 2), "user_clicks": torch.ones(4), "w": torch.ones(4)}
    >>> reset_user_rows(st, [1]), st["user_emb.table.weight"][1].tolist(), st["w"].tolist()
    (['user_emb.table.weight', 'user_clicks'], [0.0, 0.0], [1.0, 1.0, 1.0, 1.0])
    """
    names = [n for n in USER_ROW_STATE if n in state]
    if not rows:
        return names
    for name in names:
        t = state[name]
        t.index_fill_(0, torch.as_tensor(sorted(set(rows)), dtype=torch.long, device=t.device), 0.0)
    return names

logger = logging.getLogger(__name__)


@dataclass
class ItemEncoding:
    """What :meth:`EM3Model.encode_items` returns for ``N`` unique items.

    ``reps`` ``(N, R)`` (``R`` = ``config.item_dim``, plus the gate column with the
    content-match term); ``content`` ``(N, d)`` or None (``id_only``); ``ids``
    ``(N, d)`` ID embeddings; ``buckets`` ``(N,)`` their table rows.
    """

    reps: torch.Tensor
    content: torch.Tensor | None
    ids: torch.Tensor
    buckets: torch.Tensor


@dataclass
class _Cached:
    """Per-item inputs and frozen-prefix activations kept in the LRU cache."""

    token_ids: list[int] | None
    text_prefix: torch.Tensor | None  # (T, H) when the text tower is cacheable
    pixels: torch.Tensor | None  # (3, S, S) when the image tower is not cacheable
    image_prefix: torch.Tensor | None  # (C, h, w) when cacheable


class EM3Model(nn.Module):
    """The EM3 ranking model.

    Parameters
    ----------
    config : ModelConfig
    cache_items : int
        Capacity (items) of the frozen-prefix LRU cache; runtime only.
    gradient_checkpointing : bool
        Recompute trainable encoder layers in backward instead of storing them.
    batch_invariant_prefix : bool
        Compute each item's frozen-prefix activations on its own rather than in one
        padded batch with the other misses; runtime only. A batched matmul's rounding
        depends on the batch's shape (measured here: up to 2e-6 apart for MiniLM's
        frozen layers between two groupings of the same items), so the cached value
        of an item would depend on which items missed the cache with it. Learners turn
        it on, so that a restarted learner (empty cache) computes the same
        activations as one that never stopped; it cost about 13% more per item
        (21 vs 18 ms, MiniLM, one thread), once per item.
    """

    def __init__(self, config: ModelConfig, *, cache_items: int = 20_000,
                 gradient_checkpointing: bool = False, batch_invariant_prefix: bool = False) -> None:
        super().__init__()
        self.config = config
        self.batch_invariant_prefix = batch_invariant_prefix
        torch.manual_seed(config.seed)
        d = config.embed_dim
        self.text = TextEncoder(config) if config.has_text else None
        self.image = ImageEncoder(config) if config.has_image else None
        torch.manual_seed(config.seed + 1)
        in_dims = [enc.hidden_size for enc in (self.text, self.image) if enc is not None]
        self.fusion: nn.Module | None = None
        self.content_norm: nn.Module | None = None
        if config.use_content:
            # Content rows start at the ID embeddings' scale (|x| ~ 0.1 per dim), so
            # neither part of [content ; id] swamps the other at the start.
            self.content_norm = nn.LayerNorm(d)
            nn.init.constant_(self.content_norm.weight, 0.1)
            if config.fusion == "qformer":
                self.fusion = FusionQFormer(in_dims, d, config.query_num, config.fusion_layers, config.fusion_heads,
                                            pooled_skip=config.fusion_pooled_skip)
            else:
                self.fusion = MeanFusion(in_dims, d)
        self.user_emb = self._id_table(config.user_buckets, d, "user", 0.1)
        # Item rows start near zero: an unseen item's ID part adds (almost) no noise,
        # so a cold item is scored by its content (and the user) until it has data.
        self.item_emb = self._id_table(config.item_buckets, d, "item", 0.01)
        self.context_emb = HashEmbedding(config.context_buckets, d, "context")
        if config.bias_terms:
            # The wide part: a global, a user and an item bias added to the logit.
            # Trained by row-wise Adagrad at a large rate, they learn each item's and
            # user's click rate within a few impressions. (Context-feature biases at that
            # rate cost 0.027 AUC on the tuning window: rows shared by every request
            # oscillate; context reaches the logit through the click head instead.)
            self.global_bias = nn.Parameter(torch.zeros(()))
            self.user_bias = HashEmbedding(config.user_buckets, 1, "user", init_std=0.0)
            self.item_bias = HashEmbedding(config.item_buckets, 1, "item", init_std=0.0)
        self.attention = TargetAttention(config.item_dim, config.attention_hidden)
        self.head = ClickHead(d, config.item_dim, config.mlp_hidden, content_dim=d if config.content_match else 0,
                              match_init=config.content_match_init,
                              fade_content=config.content_match and config.content_fade)
        if config.content_match or config.stat_features:
            self.register_buffer("item_impressions", torch.zeros(config.item_buckets))
        if config.stat_features:
            # Real-time statistics, counted as samples are learned and carried by every
            # snapshot: clicks and impressions per item and per user row, and in total
            # (``global_counts`` = [impressions, clicks]).
            self.register_buffer("item_clicks", torch.zeros(config.item_buckets))
            self.register_buffer("user_impressions", torch.zeros(config.user_buckets))
            self.register_buffer("user_clicks", torch.zeros(config.user_buckets))
            self.register_buffer("global_counts", torch.zeros(2))
            # Weights of the smoothed item and user click-rate logits in the logit.
            self.stat_weights = nn.Parameter(torch.tensor([1.0, config.user_stat_weight_init]))
        if config.popularity_term:
            # Weight of the item's popularity (its log impression count) in the logit.
            self.popularity_weight = nn.Parameter(torch.tensor(float(config.popularity_weight_init)))
        if config.has_cvr:
            # The CVR head (ESMM). Built from its own seed without touching the global
            # generator, so adding it changes nothing else in the model or its training.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed + 2)
                self.cvr_head = ConversionHead(d, config.item_dim, config.cvr_hidden)
            # Counted as samples are learned, like the click statistics: per item row
            # [clicks, conversions, conversion value], per user row [clicks,
            # conversions], and in total [clicks, conversions, value].
            self.register_buffer("cvr_item_counts", torch.zeros(config.item_buckets, 3))
            self.register_buffer("cvr_user_counts", torch.zeros(config.user_buckets, 2))
            self.register_buffer("cvr_global_counts", torch.zeros(3))
            # Weights of the item and user conversion-rate statistics, and an offset
            # on the running conversion rate.
            self.cvr_stat_weights = nn.Parameter(torch.tensor([1.0, 0.25]))
            self.cvr_bias = nn.Parameter(torch.zeros(()))
        self.cache = PrefixCache(cache_items)
        self.set_gradient_checkpointing(gradient_checkpointing)

    # ------------------------------------------------------------------ state
    def _id_table(self, rows: int, dim: int, salt: str, init_std: float) -> HashEmbedding:
        cfg = self.config
        if cfg.id_table == "bounded":
            return BoundedEmbedding(rows, dim, salt, cfg.id_fallback_buckets, cfg.id_admit_after, cfg.id_expiry_s,
                                    cfg.id_sketch_width, init_std=init_std)
        return HashEmbedding(rows, dim, salt, init_std=init_std)

    @property
    def bounded(self) -> bool:
        """Whether user and item IDs have own rows (``id_table="bounded"``)."""
        return isinstance(self.item_emb, BoundedEmbedding)

    @torch.no_grad()
    def _reset_rows(self, names: Sequence[str], rows: Sequence[int], source: Sequence[int] | None = None) -> list[str]:
        """Zero ``rows`` of the tensors ``names`` (those the model has); with ``source``
        (one row each), the :data:`_WARM_ROWS` among them copy those rows instead."""
        own = dict(self.named_parameters())
        own.update(self.named_buffers())
        present = [n for n in names if n in own]
        if not len(rows):
            return present
        index = torch.as_tensor(list(rows), dtype=torch.long, device=self.device)
        for name in present:
            t = own[name]
            if source is not None and name in _WARM_ROWS:
                t.index_copy_(0, index, t.index_select(0, torch.as_tensor(list(source), dtype=torch.long,
                                                                          device=self.device)))
            else:
                t.index_fill_(0, index, 0.0)
        return present

    @torch.no_grad()
    def observe_ids(self, item_ids: Sequence[str], user_ids: Sequence[str], now: float) -> dict[str, list[int]]:
        """Bounded tables: count trained-on impressions of ``item_ids`` and ``user_ids``
        at event time ``now``, admitting and evicting IDs (:meth:`em3.idtable.IdTable.observe`).
        Rows that change owner are reset: counters to 0, embedding and bias rows to
        those of the fallback row the new ID used until now (what it learned there,
        shared with the tail), or 0 for a row left free. Returns ``{tensor name:
        rows reset}`` (a learner resets its optimizer state there too); empty for
        hashed tables."""
        if not self.bounded:
            return {}
        out: dict[str, list[int]] = {}
        buffers = dict(self.named_buffers())
        for emb, ids, names, counters in (
                (self.item_emb, item_ids, ITEM_ROW_STATE, ("item_impressions", "item_clicks")),
                (self.user_emb, user_ids, USER_ROW_STATE, ("user_impressions", "user_clicks"))):
            update = emb.observe(list(ids), now)
            if not update.changed:
                continue
            freed = sorted(set(update.evicted.tolist()) - set(update.admitted.tolist()))
            self._reset_rows(names, update.admitted.tolist(), update.admitted_from.tolist())
            self._reset_rows(names, freed)
            if len(update.admitted):  # the ID's own counts so far, from the admission sketch
                rows = torch.as_tensor(update.admitted, device=self.device)
                imps = torch.as_tensor(update.prior_impressions, dtype=torch.float32, device=self.device)
                for name, value in zip(counters, (imps, torch.minimum(torch.as_tensor(
                        update.prior_clicks, dtype=torch.float32, device=self.device), imps))):
                    if name in buffers:
                        buffers[name].index_copy_(0, rows, value)
            rows = sorted(set(update.admitted.tolist()) | set(freed))
            for name in names:
                out[name] = rows
        return out

    @torch.no_grad()
    def forget_users(self, user_ids: Sequence[str]) -> tuple[list[int], list[str]]:
        """Reset what the model learned from ``user_ids``: their rows of every
        :data:`USER_ROW_STATE` tensor are zeroed. With a bounded table, an own row is
        also freed (the map no longer names the user), and the user's fallback row is
        zeroed too: it learned the impressions before admission. Returns ``(rows,
        tensor names)``. A hashed row (or a fallback row) is shared: its other users
        lose it too."""
        rows = self.user_emb.buckets_of(list(user_ids)).tolist()
        if self.bounded:
            rows += self.user_emb.ids.fallback_rows(list(user_ids)).tolist()
            self.user_emb.remove(list(user_ids))
        rows = sorted(set(rows))
        return rows, self._reset_rows(USER_ROW_STATE, rows)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        for enc in (self.text, self.image):
            if enc is not None:
                enc.gradient_checkpointing = enabled

    def _learned_tensors(self) -> dict[str, torch.Tensor]:
        own = {n: p for n, p in self.named_parameters() if p.requires_grad}
        own.update((n, b) for n, b in self.named_buffers() if n in _STATE_BUFFERS)
        return own

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Every trainable tensor (LoRA, fusion, ranker, embeddings) and the learned
        buffers (the :data:`COUNTER_STATE` counters, the head's running content mean),
        detached, by name: what a snapshot holds."""
        return {n: p.detach() for n, p in self._learned_tensors().items()}

    def load_trainable_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load :meth:`trainable_state_dict` output; names and shapes must match exactly."""
        own = self._learned_tensors()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(f"trainable state does not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
        with torch.no_grad():
            for name, param in own.items():
                if tuple(state[name].shape) != tuple(param.shape):
                    raise ValueError(f"{name} has shape {tuple(state[name].shape)}, expected {tuple(param.shape)}")
                param.copy_(state[name].to(param.device, param.dtype))
        for emb in (self.user_emb, self.item_emb):
            if isinstance(emb, BoundedEmbedding):
                emb.sync()

    def num_trainable_params(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    @torch.no_grad()
    def observe_impressions(self, item_ids: Sequence[str], user_ids: Sequence[str] | None = None,
                            labels: Sequence[float] | None = None) -> None:
        """Count one trained-on impression per entry of ``item_ids`` (and of
        ``user_ids``), with its click ``labels`` (none: no clicks); call after each training step, never
        when only scoring. No-op for counters the config does not have."""
        if not len(item_ids):
            return
        ones = torch.ones(len(item_ids), device=self.device)
        rows = self.item_emb.buckets_of(item_ids)
        if hasattr(self, "item_impressions"):
            self.item_impressions.index_add_(0, rows, ones)
        if self.config.stat_features:
            y = torch.zeros_like(ones) if labels is None else torch.tensor(list(labels), dtype=torch.float32,
                                                                           device=self.device)
            self.item_clicks.index_add_(0, rows, y)
            if user_ids is not None:
                urows = self.user_emb.buckets_of(user_ids)
                self.user_impressions.index_add_(0, urows, ones)
                self.user_clicks.index_add_(0, urows, y)
            self.global_counts += torch.stack([ones.sum(), y.sum()])
        if self.bounded:  # clicks of IDs without an own row, for the counts they start with
            clicks = [0.0] * len(item_ids) if labels is None else list(labels)
            self.item_emb.ids.observe_labels(list(item_ids), clicks)
            if user_ids is not None:
                self.user_emb.ids.observe_labels(list(user_ids), clicks)

    @torch.no_grad()
    def observe_late_clicks(self, item_ids: Sequence[str], user_ids: Sequence[str]) -> None:
        """Count a click for impressions already counted as unclicked (late positives)."""
        if self.config.stat_features and len(item_ids):
            ones = torch.ones(len(item_ids), device=self.device)
            self.item_clicks.index_add_(0, self.item_emb.buckets_of(item_ids), ones)
            self.user_clicks.index_add_(0, self.user_emb.buckets_of(user_ids), ones)
            self.global_counts[1] += ones.sum()
            if self.bounded:
                self.item_emb.ids.observe_labels(list(item_ids), [1.0] * len(item_ids))
                self.user_emb.ids.observe_labels(list(user_ids), [1.0] * len(user_ids))

    @torch.no_grad()
    def observe_conversions(self, item_ids: Sequence[str], user_ids: Sequence[str], clicks: Sequence[float],
                            conversions: Sequence[float], values: Sequence[float]) -> None:
        """Count learned clicks, conversions and conversion values per item and user
        row (the CVR head's statistics); no-op without a CVR head. Call after each
        training step with its clicked samples (``clicks`` 1) and conversion
        samples (``conversions`` 1, ``values`` their value)."""
        if not self.config.has_cvr or not len(item_ids):
            return
        dev = self.device
        c = torch.tensor(list(clicks), dtype=torch.float32, device=dev)
        v = torch.tensor(list(conversions), dtype=torch.float32, device=dev)
        val = torch.tensor(list(values), dtype=torch.float32, device=dev)
        item_rows = torch.stack([c, v, val], dim=1)  # (N, 3)
        self.cvr_item_counts.index_add_(0, self.item_emb.buckets_of(item_ids), item_rows)
        self.cvr_user_counts.index_add_(0, self.user_emb.buckets_of(user_ids), item_rows[:, :2])
        self.cvr_global_counts += item_rows.sum(0)

    def _cvr_rate(self) -> torch.Tensor:
        """The running conversion rate per click, ``(conversions + 0.1) / (clicks + 1)``."""
        clicks, conversions = self.cvr_global_counts[0], self.cvr_global_counts[1]
        return ((conversions + 0.1) / (clicks + 1.0)).clamp(1e-4, 1 - 1e-4)

    def _rate_logits(self, hits: torch.Tensor, trials: torch.Tensor, pseudo_count: float,
                     p0: torch.Tensor) -> torch.Tensor:
        p = ((hits + pseudo_count * p0) / (trials + pseudo_count)).clamp(1e-4, 1 - 1e-4)
        return torch.logit(p) - torch.logit(p0)

    def item_cvr_stat(self, buckets: torch.Tensor) -> torch.Tensor:
        """``(N,)`` smoothed conversion-rate logit of items (conversions per click), relative
        to the running rate: 0 for an item never clicked."""
        counts = self.cvr_item_counts[buckets]  # (N, 3)
        return self._rate_logits(counts[:, 1], counts[:, 0], self.config.cvr_pseudo_count, self._cvr_rate())

    def user_cvr_stat(self, user_ids: Sequence[str]) -> torch.Tensor:
        """``(B,)`` smoothed conversion-rate logit of users, relative to the running rate."""
        counts = self.cvr_user_counts[self.user_emb.buckets_of(user_ids)]  # (B, 2)
        return self._rate_logits(counts[:, 1], counts[:, 0], self.config.cvr_pseudo_count, self._cvr_rate())

    def _global_value(self) -> torch.Tensor:
        """The mean value per conversion seen so far (1 until some value was seen)."""
        total = self.cvr_global_counts
        return torch.where(total[2] > 0, total[2] / total[1].clamp(min=1.0), torch.ones_like(total[2]))

    def item_log_value(self, buckets: torch.Tensor) -> torch.Tensor:
        """``(N,)`` log of the item's expected conversion value: its mean value per
        conversion, smoothed toward the global mean (pseudo count 2); the global mean
        is 1 until some value was seen, so the ``value`` objective ranks as ``ctcvr``
        when conversions carry no value."""
        v0 = self._global_value()
        counts = self.cvr_item_counts[buckets]  # (N, 3)
        return torch.log(((counts[:, 2] + 2.0 * v0) / (counts[:, 1] + 2.0)).clamp(min=1e-6))

    def _item_cvr_columns(self, buckets: torch.Tensor) -> torch.Tensor:
        """``(N, 2)``: the item's share of the pCVR logit, and its log expected value."""
        return torch.stack([self.cvr_stat_weights[0] * self.item_cvr_stat(buckets),
                            self.item_log_value(buckets)], dim=-1)

    def _cvr_logits(self, user_ids: Sequence[str], user: torch.Tensor, context: torch.Tensor,
                    target: torch.Tensor, interest: torch.Tensor, item_wide: torch.Tensor) -> torch.Tensor:
        """pCVR logits ``(B,)``: the head on detached inputs plus the wide part (the
        running rate, the item's and the user's statistics, an offset)."""
        deep = self.cvr_head(user.detach(), context.detach(), target.detach(), interest.detach())  # (B,)
        wide = (torch.logit(self._cvr_rate()) + self.cvr_bias
                + self.cvr_stat_weights[1] * self.user_cvr_stat(user_ids))  # (B,)
        return deep + item_wide.to(deep.dtype) + wide.to(deep.dtype)

    def _ctr_logits(self, clicks: torch.Tensor, imps: torch.Tensor, pseudo_count: float) -> torch.Tensor:
        """``logit(p) - logit(p0)`` of the Beta-smoothed rate ``p = (clicks + a p0) / (imps + a)``,
        ``p0`` the running global click rate: 0 for a row never seen."""
        n, c = self.global_counts[0], self.global_counts[1]
        p0 = (c + 1.0) / (n + 2.0)
        p = ((clicks + pseudo_count * p0) / (imps + pseudo_count)).clamp(1e-4, 1 - 1e-4)
        return torch.logit(p) - torch.logit(p0)

    def item_stat(self, buckets: torch.Tensor) -> torch.Tensor:
        """``(N,)`` smoothed click-rate logit of items by table row (see :meth:`_ctr_logits`)."""
        return self._ctr_logits(self.item_clicks[buckets], self.item_impressions[buckets],
                                self.config.item_pseudo_count)

    def item_popularity(self, buckets: torch.Tensor) -> torch.Tensor:
        """``(N,)`` popularity of items by table row: ``log(1 + n) - log(1 + m)``, ``n``
        the item's counted impressions and ``m`` the mean over item rows seen so far
        (0 for an item at the mean; negative for a new one once anything is counted).

        On MovieLens, items with more impressions are clicked more often than their
        smoothed click rate says (the rate of a rarely shown item is shrunk, and
        people rate what many watch). On the tuning window (first 20,000 events),
        adding 0.4 times this to the item statistic raised a counting-only score from
        0.6734 / 0.6725 to 0.6850 / 0.6843 AUC / GAUC, and in the model id_only by
        +0.011 AUC, +0.011 GAUC and +0.034 cold AUC (``docs/results.md``).
        """
        counts = self.item_impressions
        seen = (counts > 0).sum().clamp(min=1)
        mean = counts.sum() / seen
        return torch.log1p(counts[buckets]) - torch.log1p(mean)

    def user_stat(self, user_ids: Sequence[str]) -> torch.Tensor:
        """``(B,)`` smoothed click-rate logit of users."""
        rows = self.user_emb.buckets_of(user_ids)
        return self._ctr_logits(self.user_clicks[rows], self.user_impressions[rows], self.config.user_pseudo_count)

    def _own_impressions(self, buckets: torch.Tensor) -> torch.Tensor:
        """``(N,)`` impressions counted on each row, as the cold-start gate reads them: 0
        for a fallback row of a bounded table (an ID without its own row has had fewer
        than ``id_admit_after`` impressions: it is cold, whatever its row's other users did)."""
        counts = self.item_impressions[buckets]
        if self.bounded:
            counts = torch.where(buckets >= self.item_emb.fallback, counts, torch.zeros_like(counts))
        return counts

    @torch.no_grad()
    def impression_counts(self, item_ids: Sequence[str]) -> torch.Tensor | None:
        """``(N,)`` learned impressions of ``item_ids`` as the cold-start gate reads them
        (:meth:`_own_impressions`); None for a config that counts none."""
        if not hasattr(self, "item_impressions"):
            return None
        return self._own_impressions(self.item_emb.buckets_of(list(item_ids)))

    def _split(self, reps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``(reps[..., :item_dim], gate or None, item wide logit or None)`` of
        representations from :meth:`encode_items` (the last two are extra columns)."""
        col = self.config.item_dim
        gate = wide = None
        if self.config.content_match:
            gate, col = reps[..., col], col + 1
        if self.config.bias_terms or self.config.stat_features:
            wide = reps[..., col]
        return reps[..., : self.config.item_dim], gate, wide

    def _item_wide(self, buckets: torch.Tensor) -> torch.Tensor | None:
        """``(N,)`` the item's share of the wide logit: its bias, its weighted
        click-rate statistic and popularity (None when the config has none of them)."""
        parts = []
        if self.config.bias_terms:
            parts.append(self.item_bias.table(buckets).squeeze(-1))
        if self.config.stat_features:
            parts.append(self.stat_weights[0] * self.item_stat(buckets))
        if self.config.popularity_term:
            parts.append(self.popularity_weight * self.item_popularity(buckets))
        return sum(parts) if parts else None

    def _wide(self, user_ids: Sequence[str], item_wide: torch.Tensor | None) -> torch.Tensor | float:
        """The wide part of the logit, ``(B,)``: the item's share (from its
        representation) plus the global and user bias and the user's click-rate
        statistic (0 when the config has neither)."""
        if item_wide is None:
            return 0.0
        out = item_wide
        if self.config.bias_terms:
            out = out + self.global_bias + self.user_bias.table(self.user_emb.buckets_of(user_ids)).squeeze(-1)
        if self.config.stat_features:
            out = out + self.stat_weights[1] * self.user_stat(user_ids)
        return out

    @property
    def device(self) -> torch.device:
        return self.user_emb.table.weight.device

    # --------------------------------------------------------------- contents
    def _cached_inputs(self, item_ids: Sequence[str], contents: Sequence[ItemContent | None]) -> list[_Cached]:
        """Inputs and frozen-prefix activations per item, computing misses in one batch."""
        out: list[_Cached | None] = []
        misses: list[int] = []
        digests = [content_digest(c) for c in contents]
        for i, (iid, dig) in enumerate(zip(item_ids, digests)):
            hit = self.cache.get(iid, dig)
            out.append(hit)
            if hit is None:
                misses.append(i)
        if not misses:
            return out  # type: ignore[return-value]
        new = [self._prepare(contents[i]) for i in misses]
        with torch.no_grad():
            for group in ([[e] for e in new] if self.batch_invariant_prefix else [new]):
                self._fill_prefixes(group)
        for i, entry in zip(misses, new):
            out[i] = entry
            self.cache.put(item_ids[i], digests[i], entry)
        return out  # type: ignore[return-value]

    def _prepare(self, item: ItemContent | None) -> _Cached:
        tokens = pixels = None
        if item is not None and self.text is not None and item.text.strip():
            tokens = self.text.tokenize(item.text)
        if item is not None and self.image is not None and item.image:
            pixels = decode_image(item.image, self.config.image_size)
            if pixels is not None:
                pixels = pixels.to(self.device)
        return _Cached(tokens, None, pixels, None)

    def _fill_prefixes(self, entries: list[_Cached]) -> None:
        if self.text is not None and self.text.cacheable:
            rows = [e for e in entries if e.token_ids is not None]
            if rows:
                ids, mask = self._pad_tokens([e.token_ids for e in rows])  # (n, T)
                states = self.text.prefix(ids, mask)  # (n, T, H)
                for e, s, n in zip(rows, states, mask.sum(1).tolist()):
                    e.text_prefix = s[:n].clone()
        if self.image is not None and self.image.cacheable:
            rows = [e for e in entries if e.pixels is not None]
            if rows:
                acts = self.image.prefix(torch.stack([e.pixels for e in rows]))  # (n, C, h, w)
                for e, a in zip(rows, acts):
                    e.image_prefix, e.pixels = a.clone(), None

    def _pad_tokens(self, token_lists: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        t = max(1, max((len(x) for x in token_lists), default=1))
        ids = torch.zeros(len(token_lists), t, dtype=torch.long, device=self.device)
        mask = torch.zeros(len(token_lists), t, dtype=torch.bool, device=self.device)
        for i, toks in enumerate(token_lists):
            ids[i, : len(toks)] = torch.tensor(toks, dtype=torch.long)
            mask[i, : len(toks)] = True
        return ids, mask

    def _text_tokens(self, entries: Sequence[_Cached]) -> tuple[torch.Tensor, torch.Tensor]:
        n, h = len(entries), self.text.hidden_size
        has = [i for i, e in enumerate(entries) if e.token_ids is not None]
        t = max([len(entries[i].token_ids) for i in has], default=1)
        states = torch.zeros(n, t, h, device=self.device)
        mask = torch.zeros(n, t, dtype=torch.bool, device=self.device)
        if not has:
            return states, mask
        if self.text.cacheable:
            pre = torch.zeros(len(has), t, h, device=self.device)
            for row, i in enumerate(has):
                p = entries[i].text_prefix
                pre[row, : p.shape[0]] = p
        sub_ids, sub_mask = self._pad_tokens([entries[i].token_ids for i in has])  # (n', t)
        if not self.text.cacheable:
            pre = self.text.prefix(sub_ids, sub_mask)
        out = self.text(pre.to(states.dtype), sub_mask)  # (n', t, H)
        idx = torch.tensor(has, device=self.device)
        states = states.to(out.dtype).index_copy(0, idx, out)  # (N, T, H)
        mask[idx] = sub_mask
        return states, mask

    def _image_tokens(self, entries: Sequence[_Cached]) -> tuple[torch.Tensor, torch.Tensor]:
        has = [i for i, e in enumerate(entries) if e.image_prefix is not None or e.pixels is not None]
        if not has:
            n = len(entries)
            return torch.zeros(n, 1, self.image.hidden_size, device=self.device), \
                torch.zeros(n, 1, dtype=torch.bool, device=self.device)
        if self.image.cacheable:
            x = torch.stack([entries[i].image_prefix for i in has])
        else:
            x = self.image.prefix(torch.stack([entries[i].pixels for i in has]))
        out = self.image(x)  # (n', P, C)
        states = torch.zeros(len(entries), *out.shape[1:], device=self.device, dtype=out.dtype)
        idx = torch.tensor(has, device=self.device)
        states = states.index_copy(0, idx, out)  # (N, P, C)
        mask = torch.zeros(len(entries), out.shape[1], dtype=torch.bool, device=self.device)
        mask[idx] = True
        return states, mask

    def modality_tokens(self, item_ids: Sequence[str], contents: Sequence[ItemContent | None]
                        ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Encoder outputs per modality (text, then image): ``tokens[m]`` ``(N, T_m, H_m)``
        and ``masks[m]`` ``(N, T_m)``, the inputs of the fusion module."""
        entries = self._cached_inputs(item_ids, contents)
        tokens, masks = [], []
        if self.text is not None:
            s, m = self._text_tokens(entries)
            tokens.append(s)
            masks.append(m)
        if self.image is not None:
            s, m = self._image_tokens(entries)
            tokens.append(s)
            masks.append(m)
        return tokens, masks

    def content_embeddings(self, item_ids: Sequence[str], contents: Sequence[ItemContent | None]) -> torch.Tensor:
        """Fused content embedding ``(N, d)`` of each item (missing modalities masked)."""
        tokens, masks = self.modality_tokens(item_ids, contents)
        return self.content_norm(self.fusion(tokens, masks))  # (N, d)

    def encode_items(self, item_ids: Sequence[str], contents: Sequence[ItemContent | None] | None = None,
                     content: torch.Tensor | None = None, cvr_columns: bool = True) -> ItemEncoding:
        """Representations of ``N`` unique items; ``contents`` aligned with ``item_ids``,
        or their content embeddings ``content`` ``(N, d)`` already computed (a learner's
        cache of history items), which skips the encoders and fusion. Without
        ``cvr_columns`` the conversion columns (with a CVR head) are zeros: rows for
        ranking by ``ctr`` only, which never reads them (a server saves their
        statistics on every request)."""
        buckets = self.item_emb.buckets_of(item_ids)
        ids = self.item_emb.table(buckets)  # (N, d)
        item_wide = self._item_wide(buckets)
        bias = [] if item_wide is None else [item_wide.unsqueeze(-1)]  # (N, 1)
        if self.config.has_cvr:
            bias.append(self._item_cvr_columns(buckets) if cvr_columns else ids.new_zeros((ids.shape[0], 2)))  # (N, 2)
        if not self.config.use_content:
            return ItemEncoding(torch.cat([ids] + bias, dim=-1) if bias else ids, None, ids, buckets)
        if content is None:
            if contents is None or len(contents) != len(item_ids):
                raise ValueError(f"contents must align with item_ids ({len(item_ids)} items), "
                                 f"but {None if contents is None else len(contents)} are given")
            content = self.content_embeddings(item_ids, contents)  # (N, d)
        parts = [content, ids.to(content.dtype)]
        if self.config.content_match:
            tau = self.config.content_match_impressions
            gate = tau / (tau + self._own_impressions(buckets))  # (N,) 1 for a new item, 1/2 at tau impressions
            parts.append(gate.unsqueeze(-1).to(content.dtype))
        parts += [b.to(content.dtype) for b in bias]
        reps = torch.cat(parts, dim=-1)  # (N, 2d [+ gate] [+ item wide logit] [+ cvr logit part, log value])
        return ItemEncoding(reps, content, ids, buckets)

    def item_representations(self, item_ids: Sequence[str], contents: Sequence[ItemContent | None] | None = None) -> torch.Tensor:
        """``(N, R)`` representations for serving caches (call under ``no_grad``)."""
        return self.encode_items(item_ids, contents).reps

    # ---------------------------------------------------------------- ranking
    def forward(self, user_ids: Sequence[str], contexts: Sequence[Mapping[str, str]], item_reps: torch.Tensor,
                target_idx: torch.Tensor, hist_idx: torch.Tensor, hist_mask: torch.Tensor) -> torch.Tensor:
        """Click logits ``(B,)``.

        Call Args: ``item_reps`` ``(U, R)`` unique-item reps; ``target_idx`` ``(B,)``
        and ``hist_idx`` ``(B, L)`` rows of ``item_reps``; ``hist_mask`` ``(B, L)``.
        """
        return self.forward_tasks(user_ids, contexts, item_reps, target_idx, hist_idx, hist_mask, cvr=False)[0]

    def forward_tasks(self, user_ids: Sequence[str], contexts: Sequence[Mapping[str, str]], item_reps: torch.Tensor,
                      target_idx: torch.Tensor, hist_idx: torch.Tensor, hist_mask: torch.Tensor,
                      cvr: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Click logits ``(B,)`` and, with the CVR head (and ``cvr``), pCVR logits ``(B,)``
        (else None); arguments as :meth:`forward`."""
        cvr_cols = item_reps[..., -2] if cvr and self.config.has_cvr else None  # (U,)
        item_reps, gate, bias = self._split(item_reps)
        proj = self.attention.project_history(item_reps)  # (U, H)
        history = item_reps[hist_idx]  # (B, L, R)
        target = item_reps[target_idx]  # (B, R)
        interest = self.attention(target, history, proj[hist_idx], hist_mask)  # (B, R)
        user = self.user_emb(user_ids).to(item_reps.dtype)  # (B, d)
        context = self.context_emb.bag(contexts).to(item_reps.dtype)  # (B, d)
        deep = self.head(user, context, target, interest,
                         None if gate is None else gate[target_idx], hist_mask.any(dim=1))  # (B,)
        ctr = deep + self._wide(user_ids, None if bias is None else bias[target_idx])  # (B,)
        if cvr_cols is None:
            return ctr, None
        return ctr, self._cvr_logits(user_ids, user, context, target, interest, cvr_cols[target_idx])

    def score_candidates(self, user_id: str, context: Mapping[str, str], history_reps: torch.Tensor,
                         candidate_reps: torch.Tensor, objective: str = "ctr", return_weights: bool = False
                         ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Scores ``(C,)`` of ``C`` candidates for one request, by ``objective``
        (:data:`em3.model.config.OBJECTIVES`): ``ctr`` the click logit, ``ctcvr`` the
        logit of ``pCTR * pCVR``, ``value`` the log expected conversion value
        ``log(pCTR * pCVR * value)``. Each orders the candidates by what it names.
        The score is the sum of :meth:`objective_terms`, in their order.

        Call Args: ``history_reps`` ``(L, R)`` (newest first, ``L`` may be 0);
        ``candidate_reps`` ``(C, R)``; both rows of :meth:`item_representations`.
        With ``return_weights``, also the target-attention weights ``(C, L')`` over
        the first ``L' = min(L, history_len)`` history rows.
        """
        terms, weights = self.objective_terms(user_id, context, history_reps, candidate_reps, objective)
        scores = sum_terms(terms)  # (C,)
        return (scores, weights) if return_weights else scores

    def objective_terms(self, user_id: str, context: Mapping[str, str], history_reps: torch.Tensor,
                        candidate_reps: torch.Tensor, objective: str = "ctr"
                        ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The terms ``{name: (C,)}`` whose sum (:func:`sum_terms`) is the score of
        :meth:`score_candidates`, and the target-attention weights ``(C, L')``.

        ``ctr``: ``{"click": click logit}``. ``ctcvr``: ``{"click": log pCTR,
        "conversion": log pCVR, "odds": -log(1 - pCTR pCVR)}`` (the last turns log
        pCTCVR into its logit; near 0 while pCTCVR is small). ``value``: ``{"click":
        log pCTR, "conversion": log pCVR, "value": log of the item's expected value
        per conversion}``. Natural-log units throughout; arguments as
        :meth:`score_candidates`.
        """
        if objective not in self.config.objectives:
            raise ValueError(f"objective must be one of {self.config.objectives} for this model, "
                             f"but {objective!r} is given")
        cvr_cols = candidate_reps[..., -2:] if objective != "ctr" else None  # (C, 2)
        candidate_reps, gate, bias = self._split(candidate_reps)
        history_reps = self._split(history_reps)[0]
        c = candidate_reps.shape[0]
        hist = history_reps[: self.config.history_len]
        history = hist.unsqueeze(0).expand(c, -1, -1)  # (C, L, R)
        proj = self.attention.project_history(hist).unsqueeze(0).expand(c, -1, -1)  # (C, L, H)
        mask = torch.ones(c, hist.shape[0], dtype=torch.bool, device=candidate_reps.device)
        weights = self.attention.weights(candidate_reps, history, proj, mask)  # (C, L)
        interest = torch.bmm(weights.unsqueeze(1), history).squeeze(1)  # (C, R)
        user = self.user_emb([user_id]).to(candidate_reps.dtype).expand(c, -1)  # (C, d)
        ctx = self.context_emb.bag([context]).to(candidate_reps.dtype).expand(c, -1)  # (C, d)
        has_history = torch.full((c,), hist.shape[0] > 0, dtype=torch.bool, device=candidate_reps.device)
        deep = self.head(user, ctx, candidate_reps, interest, gate, has_history)  # (C,)
        ctr = deep + self._wide([user_id], bias)  # (C,): the user's terms (1,) broadcast
        if cvr_cols is None:
            return {"click": ctr}, weights
        cvr = self._cvr_logits([user_id], user, ctx, candidate_reps, interest, cvr_cols[:, 0])  # (C,)
        log_ctr = torch.nn.functional.logsigmoid(ctr)  # (C,)
        log_cvr = torch.nn.functional.logsigmoid(cvr)  # (C,)
        if objective == "value":
            return {"click": log_ctr, "conversion": log_cvr, "value": cvr_cols[:, 1]}, weights
        log_p = log_ctr + log_cvr  # (C,) log pCTCVR
        odds = -torch.log1p(-torch.exp(log_p).clamp(max=1.0 - 1e-6))  # (C,): logit(p) = log p + odds
        return {"click": log_ctr, "conversion": log_cvr, "odds": odds}, weights

    # ------------------------------------------------------------- explaining
    def _unseen_item_wide(self) -> torch.Tensor | None:
        """``(1,)`` the item wide logit of a never-seen row (bias 0, no impressions, no
        clicks), or None when the config has no wide part."""
        zero = torch.zeros(1, device=self.device)
        parts = []
        if self.config.bias_terms:
            parts.append(zero)
        if self.config.stat_features:
            parts.append(self.stat_weights[0] * self._ctr_logits(zero, zero, self.config.item_pseudo_count))
        if self.config.popularity_term:
            counts = self.item_impressions
            mean = counts.sum() / (counts > 0).sum().clamp(min=1)
            parts.append(self.popularity_weight * (torch.log1p(zero) - torch.log1p(mean)))
        return sum(parts) if parts else None

    @torch.no_grad()
    def baseline_rows(self, reps: torch.Tensor, content: bool = False, ids: bool = False) -> torch.Tensor:
        """A copy of representations ``reps`` ``(..., R)`` with parts replaced by their
        baselines (:mod:`em3.model.explain`).

        ``content``: the content embedding becomes the running mean of item content
        embeddings (``head.content_mean``; zeros without the content-match term).
        ``ids``: the row's fast part becomes a never-seen item's: ID embedding 0,
        cold-start gate 1, the item wide logit of an unseen row and, with the CVR
        head, an unseen item's conversion columns (rate statistic 0, the global mean
        value). No-op for parts the config does not have (content of ``id_only``).
        """
        out = reps.clone()
        d = self.config.embed_dim
        id_col = 0
        if self.config.use_content:
            id_col = d
            if content:
                mean = self.head.content_mean if self.config.content_match else torch.zeros(d, device=reps.device)
                out[..., :d] = mean.to(out.dtype)
        if ids:
            out[..., id_col: id_col + d] = 0.0
            col = self.config.item_dim
            if self.config.content_match:
                out[..., col] = 1.0  # tau / (tau + 0)
                col += 1
            wide = self._unseen_item_wide()
            if wide is not None:
                out[..., col] = wide.to(out.dtype)
            if self.config.has_cvr:  # an unseen item's conversion statistics and value
                out[..., -2] = 0.0
                out[..., -1] = torch.log(self._global_value().clamp(min=1e-6)).to(out.dtype)
        return out

    def cic_loss(self, enc: ItemEncoding, generator: torch.Generator | None = None) -> torch.Tensor:
        """Content-ID InfoNCE over the batch's unique items, plus sampled ID negatives."""
        if enc.content is None or self.config.cic_weight == 0:
            return enc.reps.sum() * 0.0
        negatives = None
        if self.config.cic_neg_num:
            rows = torch.randint(0, self.config.item_buckets, (self.config.cic_neg_num,),
                                 generator=generator).to(self.device)
            negatives = self.item_emb.table(rows)  # (M, d)
        same = enc.buckets.unsqueeze(0) == enc.buckets.unsqueeze(1)  # (N, N)
        return content_id_infonce(enc.content.float(), enc.ids.float(), self.config.cic_temperature,
                                  negatives=None if negatives is None else negatives.float(), same_id=same)
