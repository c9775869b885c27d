"""OnlineLearner: the pure learner that the Ray actor wraps.

It owns an :class:`em3.model.EM3Model` and an optimizer, fetches item content from
an :class:`em3.stores.ContentSource`, and exposes the small interface of
``learn_batch`` / ``score`` / ``state_dict`` / ``load_state_dict``. No I/O beyond the
content source it is given.

Each batch encodes every unique item once (targets and history items together), so
the ranking loss reaches the content modules through every occurrence of an item.
"""
from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections import OrderedDict
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from em3.errors import EM3Warning
from em3.model import EM3Model, ModelConfig
from em3.model.model import ItemEncoding
from em3.model.losses import ctcvr_bce, weighted_bce, within_group_bpr
from em3.stores import ContentSource
from em3.types import Impression, Sample
from learners.optim import RowWiseAdagrad, load_optimizer_tensors, optimizer_tensors

__all__ = ["OnlineLearner", "resolve_device", "CONTENT_LR_SCALE", "LEARNER_DEFAULTS", "SPARSE_OPTIMIZERS", "TASKS"]

logger = logging.getLogger(__name__)

#: Default learning rate of the content modules, as a fraction of ``lr``.
CONTENT_LR_SCALE = 1 / 16

#: Optimizers for the hashed ID tables and biases.
SPARSE_OPTIMIZERS = ("rowwise_adagrad", "adam")

#: The training defaults that ``em3 learn``, the demo's learners and
#: ``benchmarks/quality.py`` share; chosen on the tuning window (the first 20,000
#: MovieLens events, ``docs/results.md``).
LEARNER_DEFAULTS = {"lr": 2e-3, "sparse_optimizer": "rowwise_adagrad", "sparse_lr": 0.05, "bias_lr": 0.5,
                    "history_content": "cached", "content_every": 4}

#: How a training step gets the content embeddings of history items: ``live``
#: through the towers with gradient (every occurrence trains them), or ``cached``,
#: the embedding last computed for the item, without gradient (targets still train
#: the towers). Alone it measured +9% samples/s on the tuning window; with
#: ``content_every`` it is what lets most steps skip the towers.
HISTORY_CONTENT = ("cached", "live")

# Parameters trained as tables of rows (row-wise Adagrad by default).
_TABLE_PREFIXES = ("user_emb.", "item_emb.", "context_emb.")
_BIAS_PREFIXES = ("global_bias", "user_bias.", "item_bias.")
# stat_weights and popularity_weight stay with the dense (Adam) parameters.
_CONTENT_PREFIXES = ("text.", "image.", "fusion.", "content_norm.")
# The CVR head's parameters: their own Adam group and their own gradient clip, so
# the click model's steps are the same with or without them.
_CVR_PREFIXES = ("cvr_head.", "cvr_stat_weights", "cvr_bias")

#: What :meth:`OnlineLearner.score` can predict: click, conversion given a click,
#: click and conversion.
TASKS = ("ctr", "cvr", "ctcvr")


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class OnlineLearner:
    """Trains an EM3 model one mini-batch at a time.

    Parameters
    ----------
    model_config : ModelConfig
    content : ContentSource
        Where item content is read (``get_many``); missing items get ID-only
        content (both modalities masked).
    lr : float
        Adam learning rate of the ranker (and of the ID tables with
        ``sparse_optimizer="adam"``).
    content_lr : float, optional
        Adam learning rate of the content modules (LoRA adapters, fusion, content
        norm); default ``lr * CONTENT_LR_SCALE`` (``lr / 16``). Pretrained encoders
        take smaller steps than freshly initialised ranking weights; on MovieLens
        (``benchmarks/quality.py``) about ``lr / 16`` beat ``lr`` at three seeds, and
        ``lr / 5`` and ``lr / 50`` at one each (``docs/results.md``).
    sparse_optimizer : {"rowwise_adagrad", "adam"}
        Optimizer of the hashed ID embedding tables: row-wise Adagrad
        (:class:`learners.optim.RowWiseAdagrad`, only touched rows move) at
        ``sparse_lr``, or Adam at ``lr`` with the dense parameters.
    sparse_lr : float
        Row-wise Adagrad rate of the ID embedding tables.
    bias_lr : float
        Row-wise Adagrad rate of the bias terms (``ModelConfig.bias_terms``).
    device : str
        ``"auto"`` (CUDA with bf16 autocast when present, CPU otherwise), ``"cpu"``,
        ``"cuda"``, ``"cuda:1"`` ...
    seed : int
        Seeds the optimizer-side randomness (sampled CIC negatives). The model's
        initialisation is seeded by ``model_config.seed``.
    cache_items : int
        Capacity of the frozen-prefix cache (items).
    gradient_checkpointing : bool
        Trade compute for memory in the trainable encoder layers.
    max_grad_norm : float or None
        Gradient-norm clip of the dense parameters (None: no clipping).
    history_content : {"cached", "live"}
        See :data:`HISTORY_CONTENT`. Scoring (:meth:`score`) and serving always
        encode every item afresh.
    content_every : int
        With ``cached`` history content, train the content towers on every
        ``content_every``-th step only; the other steps read every item's cached
        content embedding (the ranker, ID tables and biases still learn). A
        cost knob: the towers dominate a step's time on CPU.
    batch_invariant_prefix : bool
        Compute each item's frozen encoder prefix on its own (see
        :class:`em3.model.EM3Model`), so that what a step computes does not depend
        on which items this process happened to encode before: a learner restarted
        from a :meth:`checkpoint` then continues exactly.
    """

    def __init__(self, model_config: ModelConfig, content: ContentSource, *, lr: float = LEARNER_DEFAULTS["lr"],
                 content_lr: float | None = None,
                 sparse_optimizer: str = LEARNER_DEFAULTS["sparse_optimizer"],
                 sparse_lr: float = LEARNER_DEFAULTS["sparse_lr"], bias_lr: float = LEARNER_DEFAULTS["bias_lr"],
                 device: str = "auto", seed: int = 0, cache_items: int = 20_000,
                 gradient_checkpointing: bool = False, max_grad_norm: float | None = 5.0,
                 history_content: str = LEARNER_DEFAULTS["history_content"],
                 content_every: int = LEARNER_DEFAULTS["content_every"],
                 batch_invariant_prefix: bool = True) -> None:
        if not (isinstance(content_every, int) and content_every >= 1):
            raise ValueError(f"content_every must be an int >= 1, but {content_every!r} is given")
        if history_content not in HISTORY_CONTENT:
            raise ValueError(f"history_content must be one of {HISTORY_CONTENT}, but {history_content!r} is given")
        for name, value in (("lr", lr), ("sparse_lr", sparse_lr), ("bias_lr", bias_lr)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, but {value} is given")
        if content_lr is not None and content_lr <= 0:
            raise ValueError(f"content_lr must be > 0, but {content_lr} is given")
        if sparse_optimizer not in SPARSE_OPTIMIZERS:
            raise ValueError(f"sparse_optimizer must be one of {SPARSE_OPTIMIZERS}, but {sparse_optimizer!r} is given")
        self.config = model_config
        self.content = content
        self.device = resolve_device(device)
        self.amp = self.device.type == "cuda"
        self.model = EM3Model(model_config, cache_items=cache_items, gradient_checkpointing=gradient_checkpointing,
                              batch_invariant_prefix=batch_invariant_prefix).to(self.device)
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        rowwise = _BIAS_PREFIXES + (_TABLE_PREFIXES if sparse_optimizer == "rowwise_adagrad" else ())
        dense = [(n, p) for n, p in named if not n.startswith(rowwise) and not n.startswith(_CVR_PREFIXES)]
        self.params = [p for _, p in dense]  # clipped; row-wise steps are normalised per row already
        self.cvr_params = [p for n, p in named if n.startswith(_CVR_PREFIXES)]  # clipped on their own
        groups = [{"params": [p for n, p in dense if not n.startswith(_CONTENT_PREFIXES)], "lr": lr},
                  {"params": [p for n, p in dense if n.startswith(_CONTENT_PREFIXES)],
                   "lr": lr * CONTENT_LR_SCALE if content_lr is None else content_lr},
                  {"params": self.cvr_params, "lr": lr}]
        self.optimizer = torch.optim.Adam([g for g in groups if g["params"]], lr=lr)
        tables = [{"params": [p for n, p in named if n.startswith(_BIAS_PREFIXES)], "lr": bias_lr}]
        if sparse_optimizer == "rowwise_adagrad":
            tables.append({"params": [p for n, p in named if n.startswith(_TABLE_PREFIXES)], "lr": sparse_lr})
        tables = [g for g in tables if g["params"]]
        self.sparse_optimizer = RowWiseAdagrad(tables) if tables else None
        self._names = {id(p): n for n, p in named}
        self.generator = torch.Generator().manual_seed(seed)
        self.max_grad_norm = max_grad_norm
        self.history_content = history_content
        self.content_every = content_every if history_content == "cached" else 1
        self.cache_items = cache_items
        self._history_content: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.steps = 0

    # --------------------------------------------------------------- batching
    def _autocast(self):
        if self.amp:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _prepare(self, impressions: Sequence[Impression], histories: Sequence[Sequence[str]]):
        if len(impressions) != len(histories):
            raise ValueError(f"histories must align with the batch ({len(impressions)} rows), "
                             f"but {len(histories)} are given")
        index: dict[str, int] = {}
        for imp in impressions:
            index.setdefault(imp.item_id, len(index))
        limit = self.config.history_len
        hists = [list(h)[:limit] for h in histories]
        for h in hists:
            for iid in h:
                index.setdefault(iid, len(index))
        length = max(1, max((len(h) for h in hists), default=1))
        hist_idx = torch.zeros(len(hists), length, dtype=torch.long)
        hist_mask = torch.zeros(len(hists), length, dtype=torch.bool)
        for row, h in enumerate(hists):
            if h:
                hist_idx[row, : len(h)] = torch.tensor([index[i] for i in h])
                hist_mask[row, : len(h)] = True
        target_idx = torch.tensor([index[imp.item_id] for imp in impressions], dtype=torch.long)
        n_targets = len({imp.item_id for imp in impressions})  # targets come first in ``index``
        dev = self.device
        return list(index), n_targets, target_idx.to(dev), hist_idx.to(dev), hist_mask.to(dev)

    def _logits(self, impressions: Sequence[Impression], histories: Sequence[Sequence[str]], train: bool = False):
        logits, _, enc = self._task_logits(impressions, histories, train, cvr=False)
        return logits, enc

    def _task_logits(self, impressions: Sequence[Impression], histories: Sequence[Sequence[str]],
                     train: bool = False, cvr: bool = True):
        """Click logits ``(B,)``, pCVR logits ``(B,)`` (None without the CVR head or
        ``cvr``), and the batch's :class:`ItemEncoding`."""
        ids, n_targets, target_idx, hist_idx, hist_mask = self._prepare(impressions, histories)
        if not self.config.use_content:
            enc = self.model.encode_items(ids)
        elif train and self.history_content == "cached":
            # Every ``content_every``-th step the targets go through the towers with
            # gradient; on the others every item reads its cached content embedding.
            live = n_targets if self.steps % self.content_every == 0 else 0
            enc = self._encode_cached(ids, live, n_targets)
        else:
            enc = self.model.encode_items(ids, self.content.get_many(ids))
        logits, cvr_logits = self.model.forward_tasks(
            [i.user_id for i in impressions], [i.context for i in impressions], enc.reps, target_idx, hist_idx,
            hist_mask, cvr=cvr and self.config.has_cvr)  # (B,), (B,) or None
        return logits.float(), None if cvr_logits is None else cvr_logits.float(), enc

    def _encode_cached(self, ids: list[str], n_live: int, n_targets: int) -> ItemEncoding:
        """The first ``n_live`` items through the content towers with gradient; the rest
        with the content embedding last computed for them (as a live target, or once
        without gradient on a miss). ID rows, gates and biases stay live for all.
        CIC and the running content mean see the ``n_targets`` targets only."""
        cache = self._history_content
        live, rest = ids[:n_live], ids[n_live:]
        parts: list[ItemEncoding] = []
        if live:
            parts.append(self.model.encode_items(live, self.content.get_many(live)))
            for iid, row in zip(live, parts[0].content.detach()):
                cache[iid] = row.clone()  # not a view: a view would keep the whole batch alive
                cache.move_to_end(iid)
        if rest:
            misses = [iid for iid in dict.fromkeys(rest) if iid not in cache]
            if misses:
                with torch.no_grad():
                    rows = self.model.content_embeddings(misses, self.content.get_many(misses))
                cache.update(zip(misses, rows.clone().unbind(0)))
            content = torch.stack([cache[iid] for iid in rest])  # (N - n_live, d)
            parts.append(self.model.encode_items(rest, content=content))
        while len(cache) > self.cache_items:
            cache.popitem(last=False)
        dtype = parts[0].reps.dtype
        reps = torch.cat([p.reps.to(dtype) for p in parts])
        content = torch.cat([p.content.to(dtype) for p in parts])[:n_targets]
        ids_emb = torch.cat([p.ids for p in parts])[:n_targets]
        buckets = torch.cat([p.buckets for p in parts])[:n_targets]
        return ItemEncoding(reps, content, ids_emb, buckets)

    # -------------------------------------------------------------- interface
    def learn_batch(self, samples: Sequence[Sample], histories: Sequence[Sequence[str]],
                    weights: Sequence[float] | None = None, return_probs: bool = False) -> dict[str, float]:
        """One optimizer step on ``samples``.

        Parameters
        ----------
        samples : sequence of Sample
        histories : sequence of sequence of str
            Per sample, the user's clicked item ids before the impression, newest
            first (truncated to ``history_len``).
        weights : sequence of float, optional
            Per-sample loss weights (default 1).
        return_probs : bool
            Also return ``probs``, the click probabilities of the forward pass that
            precedes the update: exactly the test-then-train (prequential)
            predictions, without a second forward pass.

        Returns
        -------
        dict
            ``loss``, ``rank_loss``, ``ctcvr_loss`` (0 without the CVR head),
            ``cic_loss``, ``pair_loss`` (the within-user pairwise loss, 0 when off),
            ``n``, ``positives``, ``corrections``, ``conversions``, ``unique_items``,
            ``seconds`` (floats and ints), and ``probs`` (``np.ndarray`` ``(B,)``,
            click probabilities) when asked.

        Notes
        -----
        The click loss (weight ``ctr_weight``) covers every sample but conversion
        samples; the CTCVR loss (``ctcvr_weight``, :func:`em3.model.losses.ctcvr_bce`)
        covers every sample but late clicks: an impression's first label says "no
        conversion yet", a conversion sample later corrects it, and a late click
        says nothing new about conversion. Without a CVR head conversion samples
        are not learned.
        """
        t0 = time.perf_counter()
        if not samples:
            return {"loss": 0.0, "rank_loss": 0.0, "ctcvr_loss": 0.0, "cic_loss": 0.0, "pair_loss": 0.0, "n": 0,
                    "positives": 0, "corrections": 0, "conversions": 0, "unique_items": 0, "seconds": 0.0}
        self.model.train()
        cfg = self.config
        dev = self.device
        labels = torch.tensor([s.label for s in samples], dtype=torch.float32, device=dev)
        corr = torch.tensor([s.correction for s in samples], dtype=torch.bool, device=dev)
        conv = torch.tensor([bool(s.conversion) for s in samples], dtype=torch.bool, device=dev)
        w = None if weights is None else torch.tensor(list(weights), dtype=torch.float32, device=dev)
        if w is not None and w.shape[0] != len(samples):
            raise ValueError(f"weights must have {len(samples)} entries, but {w.shape[0]} are given")
        n_conv = int(conv.sum().item())
        if self.model.bounded:
            # Admission and eviction remap the batch's IDs before the forward pass (as
            # TorchRec's managed-collision modules and Monolith's filters do): an ID reaching
            # ``id_admit_after`` impressions learns this batch on its own row. Labels play no part.
            first = [s for s in samples if not s.correction]
            if first:
                self._reset_optimizer_rows(self.model.observe_ids(
                    [s.impression.item_id for s in first], [s.impression.user_id for s in first],
                    max(s.impression.served_at for s in first)))
        with self._autocast():
            logits, cvr_logits, enc = self._task_logits([s.impression for s in samples], histories, train=True)
            if n_conv:  # the click loss leaves conversion samples out
                keep = ~conv
                rank = weighted_bce(logits[keep], labels[keep], None if w is None else w[keep], corr[keep],
                                    cfg.correction_mode)
            else:
                rank = weighted_bce(logits, labels, w, corr, cfg.correction_mode)
            cic = self.model.cic_loss(enc, self.generator)
            loss = cfg.ctr_weight * rank + cfg.cic_weight * cic
            pair = logits.sum() * 0.0
            if cfg.pairwise_weight:
                users = self.model.user_emb.buckets_of([s.impression.user_id for s in samples])
                keep = ~conv
                pair = within_group_bpr(logits[keep], labels[keep], users[keep])
                loss = loss + cfg.pairwise_weight * pair
            ctcvr = logits.sum() * 0.0
            if cvr_logits is not None:
                rows = ~(corr & ~conv)  # late clicks say nothing new about conversion
                ctcvr = ctcvr_bce(logits[rows], cvr_logits[rows], conv[rows].float(),
                                  None if w is None else w[rows], conv[rows], cfg.correction_mode)
                loss = loss + cfg.ctcvr_weight * ctcvr
        probs = torch.sigmoid(logits.detach()).cpu().numpy() if return_probs else None
        self.optimizer.zero_grad(set_to_none=True)
        if self.sparse_optimizer is not None:
            self.sparse_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
            if self.cvr_params:
                torch.nn.utils.clip_grad_norm_(self.cvr_params, self.max_grad_norm)
        self.optimizer.step()
        if self.sparse_optimizer is not None:
            self.sparse_optimizer.step()
        # Late-positive corrections repeat an impression already counted.
        fresh = [s for s in samples if not s.correction]
        self.model.observe_impressions([s.impression.item_id for s in fresh], [s.impression.user_id for s in fresh],
                                       [s.label for s in fresh])
        late = [s for s in samples if s.is_late_click and s.label]
        self.model.observe_late_clicks([s.impression.item_id for s in late], [s.impression.user_id for s in late])
        if cfg.has_cvr:
            counted = [s for s in samples if s.label]  # clicks (first or late) and conversions
            self.model.observe_conversions(
                [s.impression.item_id for s in counted], [s.impression.user_id for s in counted],
                [0.0 if s.conversion else 1.0 for s in counted], [float(s.conversion) for s in counted],
                [s.value if s.conversion else 0.0 for s in counted])
        if enc.content is not None:
            self.model.head.observe_content(enc.content)
        self.steps += 1
        stats = {"loss": float(loss.detach()), "rank_loss": float(rank.detach()), "ctcvr_loss": float(ctcvr.detach()),
                 "cic_loss": float(cic.detach()), "pair_loss": float(pair.detach()),
                 "n": len(samples), "positives": int(labels[~conv].sum().item()),
                 "corrections": int((corr & ~conv).sum().item()), "conversions": n_conv,
                 "unique_items": int(enc.reps.shape[0]), "seconds": time.perf_counter() - t0}
        if probs is not None:
            stats["probs"] = probs
        return stats

    @torch.no_grad()
    def score(self, records: Sequence[Sample | Impression], histories: Sequence[Sequence[str]],
              batch_size: int = 1024, task: str = "ctr") -> np.ndarray:
        """Probabilities ``(B,)`` for samples or impressions (no gradient): of a click
        (``task="ctr"``), of a conversion given a click (``"cvr"``), or of both
        (``"ctcvr"``, pCTR x pCVR); the last two need the CVR head.

        Batch-size independent: rows are scored in chunks of ``batch_size`` and the
        model has no batch-dependent layers (no dropout, frozen BatchNorm).
        """
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, but {batch_size} is given")
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, but {task!r} is given")
        if task != "ctr" and not self.config.has_cvr:
            raise ValueError(f"task {task!r} needs a model with a CVR head (ctcvr_weight > 0)")
        self.model.eval()
        imps = [r.impression if isinstance(r, Sample) else r for r in records]
        out = []
        for start in range(0, len(imps), batch_size):
            with self._autocast():
                logits, cvr_logits, _ = self._task_logits(imps[start : start + batch_size],
                                                          histories[start : start + batch_size], cvr=task != "ctr")
            if task == "ctr":
                p = torch.sigmoid(logits)
            elif task == "cvr":
                p = torch.sigmoid(cvr_logits)
            else:
                p = torch.sigmoid(logits) * torch.sigmoid(cvr_logits)
            out.append(p.cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

    @torch.no_grad()
    def item_representations(self, item_ids: Sequence[str]) -> torch.Tensor:
        """``(N, R)`` serving representations, content read from the learner's source."""
        self.model.eval()
        contents = self.content.get_many(list(item_ids)) if self.config.use_content else None
        with self._autocast():
            return self.model.item_representations(list(item_ids), contents).float()

    @torch.no_grad()
    def modality_attention(self, item_ids: Sequence[str]) -> dict[str, float]:
        """Mean share of the Fusion-Q-Former's cross-attention per modality (``text``,
        ``image``, ``missing`` = the null token; :func:`em3.model.explain.modality_mass`)
        over ``item_ids``; empty without a Fusion-Q-Former. Tells which modality the
        queries read (the pooled skip's part is not apportioned here: explanations give
        the whole embedding's share, :meth:`em3.model.fusion.FusionQFormer.modality_share`)."""
        from em3.model.explain import MODALITIES, modality_mass

        if not item_ids or not hasattr(self.model.fusion, "attention_mass"):
            return {}
        self.model.eval()
        total = torch.zeros(len(MODALITIES))
        for start in range(0, len(item_ids), 256):
            ids = list(item_ids[start:start + 256])
            total += modality_mass(self.model, ids, self.content.get_many(ids), attention_only=True).sum(0)
        return {n: round(float(v) / len(item_ids), 4) for n, v in zip(MODALITIES, total)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Trainable tensors (LoRA, fusion, ranker, embeddings) and the learned counters
        (:data:`em3.model.model.COUNTER_STATE`, running content mean), on CPU, contiguous."""
        return {k: v.detach().to("cpu").contiguous().clone() for k, v in self.model.trainable_state_dict().items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load :meth:`state_dict` output (e.g. from :func:`em3.snapshot.unpack`)."""
        self.model.load_trainable_state_dict(state)
        self._history_content.clear()

    def checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """What training needs beyond :meth:`state_dict` to continue exactly: ``(tensors,
        meta)`` with the dense optimizer's moments and step counts (``adam/...``), the
        row-wise Adagrad accumulators (``sparse/...``), the RNG states (``rng/...``),
        the cached content embeddings of history items (``history/content``, ``(N, d)``,
        least recently used first; their ids in ``meta["history_ids"]``) and the step
        counter (``meta["steps"]``, which decides the steps that train the towers).
        :func:`em3.checkpoint.pack_checkpoint` serialises it."""
        tensors = optimizer_tensors(self.optimizer, self._names, "adam")
        if self.sparse_optimizer is not None:
            tensors.update(optimizer_tensors(self.sparse_optimizer, self._names, "sparse"))
        tensors["rng/generator"] = self.generator.get_state()
        tensors["rng/torch"] = torch.get_rng_state()
        ids = list(self._history_content)
        if ids:
            tensors["history/content"] = torch.stack([self._history_content[i] for i in ids]).to("cpu")  # (N, d)
        meta: dict[str, Any] = {"steps": self.steps, "history_ids": ids}
        for name, table in self._id_tables():
            if table.sketch is not None:  # the admission counts (the map itself is in state_dict)
                tensors[f"idtable/{name}/sketch"] = torch.from_numpy(table.sketch.table.copy())  # (4, W) int32
                tensors[f"idtable/{name}/sketch_clicks"] = torch.from_numpy(table.sketch.values.copy())  # (4, W)
                tensors[f"idtable/{name}/doorkeeper"] = torch.from_numpy(table.sketch.door.copy())  # (bits/8,) uint8
                meta[f"idtable/{name}"] = {"additions": table.sketch.additions, "now": table.now,
                                           "counts": "all"}  # TinyLFU: admitted IDs counted too
        return tensors, meta

    def _id_tables(self):
        """``(name, IdTable)`` of the bounded ID tables (none with hashed tables)."""
        if not self.model.bounded:
            return []
        return [("user", self.model.user_emb.ids), ("item", self.model.item_emb.ids)]

    def load_checkpoint(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        """Restore :meth:`checkpoint` output (after :meth:`load_state_dict`, which empties
        the history-content cache). Raises ``ValueError``, leaving the learner as it
        was, when it does not fit this learner (other parameters or optimizers)."""
        known = set(self._names.values())
        prefixes = ("adam", "sparse") if self.sparse_optimizer is not None else ("adam",)
        for name in tensors:
            head, _, rest = name.partition("/")
            if head in ("adam", "sparse") and (head not in prefixes or rest.rpartition("/")[0] not in known):
                raise ValueError(f"checkpoint holds optimizer state {name!r}, which this learner does not have")
        ids = [str(i) for i in meta.get("history_ids", [])]
        content = tensors.get("history/content")
        rows = 0 if content is None else int(content.shape[0])
        if rows != len(ids) or (content is not None and content.shape[1:] != (self.config.embed_dim,)):
            raise ValueError(f"checkpoint's history cache holds {rows} rows for {len(ids)} ids")
        steps = meta.get("steps")
        if not isinstance(steps, int) or steps < 0:
            raise ValueError(f"checkpoint's step counter must be an int >= 0, but {steps!r} is given")
        for name, table in self._id_tables():
            sketch = tensors.get(f"idtable/{name}/sketch")
            if sketch is not None and (sketch.dim() != 2 or int(sketch.shape[0]) != table.sketch_depth):
                raise ValueError(f"checkpoint's {name} admission sketch has shape {tuple(sketch.shape)}, "
                                 f"this learner's has {table.sketch_depth} rows")
            clicks = tensors.get(f"idtable/{name}/sketch_clicks")
            if clicks is not None and (sketch is None or clicks.shape != sketch.shape):
                raise ValueError(f"checkpoint's {name} click sketch has shape {tuple(clicks.shape)}, "
                                 f"its admission sketch {None if sketch is None else tuple(sketch.shape)}")
        load_optimizer_tensors(self.optimizer, self._names, "adam", tensors)
        if self.sparse_optimizer is not None:
            load_optimizer_tensors(self.sparse_optimizer, self._names, "sparse", tensors)
        if "rng/generator" in tensors:
            self.generator.set_state(tensors["rng/generator"])
        if "rng/torch" in tensors:
            torch.set_rng_state(tensors["rng/torch"])
        for name, table in self._id_tables():
            sketch, info = tensors.get(f"idtable/{name}/sketch"), meta.get(f"idtable/{name}")
            if sketch is not None and isinstance(info, Mapping):
                if info.get("counts") != "all":
                    warnings.warn(f"the checkpoint's {name} admission sketch predates TinyLFU admission (it "
                                  "counted only IDs without an own row): it is kept, but IDs holding a row "
                                  "have only their (aged) counts from before their admission, so until the "
                                  "sketch has counted them again they lose their rows more easily",
                                  EM3Warning, stacklevel=2)
                # Its width is kept (counts are valid at any width); the halving follows this table.
                table.sketch = table.new_sketch(int(sketch.shape[1]))
                table.sketch.table[...] = sketch.numpy()
                clicks = tensors.get(f"idtable/{name}/sketch_clicks")
                if clicks is not None:
                    table.sketch.values[...] = clicks.numpy()
                door = tensors.get(f"idtable/{name}/doorkeeper")
                # A checkpoint from before the doorkeeper (or of another size) starts with an
                # empty one: each ID then counts one impression less until it is seen again.
                if door is not None and tuple(door.shape) == table.sketch.door.shape:
                    table.sketch.door[...] = door.numpy()
                table.sketch.additions = int(info.get("additions", 0))
                table.now = max(table.now, int(info.get("now", 0)))
        self._history_content.clear()
        if content is not None:
            for iid, row in zip(ids, content.to(self.device).unbind(0)):
                self._history_content[iid] = row.clone()
        self.steps = steps

    def num_trainable_params(self) -> int:
        return self.model.num_trainable_params()

    @torch.no_grad()
    def forget_users(self, user_ids: Sequence[str]) -> list[int]:
        """Reset the rows of ``user_ids`` (pseudonyms) to nothing learned: their ID
        embedding and bias rows and their impression and click counters are zeroed,
        and so are the row-wise optimiser accumulators of those rows, so they start
        over like new rows. Returns the rows reset.

        With hashed tables a row is a bucket: a user that shares it loses what it
        learned too. With bounded tables (``id_table="bounded"``) a user's own row is
        reset and freed (the map forgets the user); one not yet admitted shares a
        fallback row, reset as a hashed one is.
        """
        if not user_ids:
            return []
        rows, names = self.model.forget_users(list(user_ids))
        self._reset_optimizer_rows({name: rows for name in names})
        return rows

    @torch.no_grad()
    def _reset_optimizer_rows(self, rows_by_name: Mapping[str, Sequence[int]]) -> None:
        """Zero the optimizer state (row-wise Adagrad accumulators, Adam moments) of
        the given rows of each named tensor, so a reset row starts over like a new one."""
        params = dict(self.model.named_parameters())
        for name, rows in rows_by_name.items():
            param = params.get(name)
            if param is None or not len(rows):
                continue
            index = torch.as_tensor(list(rows), dtype=torch.long)
            for opt in (self.sparse_optimizer, self.optimizer):
                state = opt.state.get(param) if opt is not None else None
                for value in (state or {}).values():
                    if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == param.shape[0]:
                        value.index_fill_(0, index.to(value.device), 0.0)
