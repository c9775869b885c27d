"""Ranker: ID embeddings (hashed or bounded), DIN target attention over the behaviour
sequence, an MLP click head and an MLP conversion head.

Unseen IDs: by default every user, item and context value is mapped to a bucket of a
fixed-size table by a stable hash (BLAKE2b of ``"<salt>|<id>"``, not Python's salted
``hash``), so any string id, seen or not, gets an embedding and the tables never
grow. Distinct ids may share a bucket (with ``2**15`` buckets and 1,682 MovieLens
items about 4% of items collide). :class:`BoundedEmbedding` (``id_table="bounded"``)
keeps the same table but gives admitted IDs rows of their own (:mod:`em3.idtable`).
"""
from __future__ import annotations

import hashlib
from functools import lru_cache
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from em3.idtable import IdTable, TableUpdate

__all__ = ["stable_bucket", "HashEmbedding", "BoundedEmbedding", "TargetAttention", "ClickHead", "ConversionHead"]


@lru_cache(maxsize=1 << 20)
def stable_bucket(key: str, salt: str, buckets: int) -> int:
    """Bucket of ``key`` in ``[0, buckets)``, the same on every machine and run.

    >>> stable_bucket("item-1", "item", 1000) == stable_bucket("item-1", "item", 1000)
    True
    >>> 0 <= stable_bucket("never-seen", "user", 7) < 7
    True
    """
    digest = hashlib.blake2b(f"{salt}|{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % buckets


class HashEmbedding(nn.Module):
    """An embedding table indexed by hashed string ids."""

    def __init__(self, buckets: int, dim: int, salt: str, init_std: float = 0.1) -> None:
        super().__init__()
        self.buckets = buckets
        self.salt = salt
        self.table = nn.Embedding(buckets, dim)
        if init_std > 0:
            nn.init.normal_(self.table.weight, std=init_std)
        else:
            nn.init.zeros_(self.table.weight)

    def buckets_of(self, ids: Sequence[str]) -> torch.Tensor:
        """``(N,)`` long tensor of bucket indices."""
        return torch.tensor([stable_bucket(i, self.salt, self.buckets) for i in ids],
                            dtype=torch.long, device=self.table.weight.device)

    def forward(self, ids: Sequence[str]) -> torch.Tensor:
        return self.table(self.buckets_of(ids))  # (N, dim)

    def bag(self, features: Sequence[Mapping[str, str]]) -> torch.Tensor:
        """Sum of the embeddings of each row's ``key=value`` features; ``(N, dim)``."""
        flat: list[str] = []
        offsets: list[int] = []
        for feats in features:
            offsets.append(len(flat))
            flat.extend(f"{k}={v}" for k, v in sorted(feats.items()))
        idx = self.buckets_of(flat)
        off = torch.tensor(offsets, dtype=torch.long, device=idx.device)
        return nn.functional.embedding_bag(idx, self.table.weight, off, mode="sum")  # (N, dim)


class BoundedEmbedding(HashEmbedding):
    """A :class:`HashEmbedding` whose rows come from an :class:`em3.idtable.IdTable`:
    rows ``[0, fallback)`` are hashed and shared, the others belong to one admitted ID.

    The map is held twice: by the pure ``ids`` table (the index lookups use) and by
    the buffers ``keys``, ``last_seen`` and ``hits`` ``(capacity,)`` int64, which travel with the
    trainable state (snapshots, checkpoints). Writers call :meth:`observe` /
    :meth:`remove` (the buffers follow); readers that loaded new buffers call
    :meth:`sync`, which builds a *new* table object (a model copied for a new
    snapshot version never shares one with the version it came from).
    """

    def __init__(self, buckets: int, dim: int, salt: str, fallback: int, admit_after: int = 2,
                 expiry_s: float = 0.0, sketch_width: int = 0, init_std: float = 0.1) -> None:
        super().__init__(buckets, dim, salt, init_std)
        self.ids = IdTable(buckets, fallback, salt, admit_after, expiry_s, sketch_width)
        self.register_buffer("keys", torch.zeros(self.ids.capacity, dtype=torch.long))
        self.register_buffer("last_seen", torch.zeros(self.ids.capacity, dtype=torch.long))
        self.register_buffer("hits", torch.zeros(self.ids.capacity, dtype=torch.long))

    @property
    def fallback(self) -> int:
        return self.ids.fallback

    def buckets_of(self, ids: Sequence[str]) -> torch.Tensor:
        """``(N,)`` long tensor of rows: own rows of admitted IDs, fallback rows else."""
        return torch.from_numpy(self.ids.rows(ids)).to(self.table.weight.device)

    def _write(self) -> None:
        for buffer, array in zip((self.keys, self.last_seen, self.hits), self.ids.to_arrays()):
            buffer.copy_(torch.from_numpy(array))

    @torch.no_grad()
    def observe(self, ids: Sequence[str], now: float) -> TableUpdate:
        """Count trained-on impressions (:meth:`em3.idtable.IdTable.observe`)."""
        update = self.ids.observe(ids, now)
        self._write()
        return update

    @torch.no_grad()
    def remove(self, ids: Sequence[str]) -> np.ndarray:
        """Free the own rows of ``ids``; returns them."""
        rows = self.ids.remove(ids)
        self._write()
        return rows

    def sync(self) -> None:
        """Rebuild the index from the ``keys`` / ``last_seen`` buffers (after a load)."""
        self.ids = IdTable.from_arrays(self.keys.cpu().numpy(), self.last_seen.cpu().numpy(), self.hits.cpu().numpy(),
                                       **self.ids.settings())


class TargetAttention(nn.Module):
    """DIN attention: weight each history item by an MLP of (history, target).

    The DIN score MLP's first layer acts on ``[h, t, h - t, h * t]``; being linear, it
    equals ``A h + B t + C (h * t)`` with ``A = W1 + W3`` and ``B = W2 - W3``. We
    compute it in that form, so ``A h`` is computed once per unique item (not per
    (user, position)) and the ``(B, L, 4R)`` concatenation is never materialised:
    memory is ``O(B L H)``, which keeps sequences of 1,000 items affordable.
    Weights are a softmax over the unmasked positions; an empty history gives zeros.

    Call Args: ``target`` ``(B, R)``; ``history`` ``(B, L, R)``; ``hist_proj``
    ``(B, L, H)`` (= :meth:`project_history` of the history reps); ``mask``
    ``(B, L)`` bool, True at real items. Returns ``(B, R)``.
    """

    def __init__(self, item_dim: int, hidden: int) -> None:
        super().__init__()
        self.a = nn.Linear(item_dim, hidden)  # on h (carries the bias)
        self.b = nn.Linear(item_dim, hidden, bias=False)  # on t
        self.c = nn.Linear(item_dim, hidden, bias=False)  # on h * t
        self.act = nn.PReLU(hidden)
        self.score = nn.Linear(hidden, 1)

    def project_history(self, reps: torch.Tensor) -> torch.Tensor:
        """``A h`` for item reps ``(..., R)`` -> ``(..., H)``."""
        return self.a(reps)

    def weights(self, target: torch.Tensor, history: torch.Tensor, hist_proj: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` attention weights of each history position for each target: a
        softmax over the unmasked positions (rows sum to 1; all 0 without history)."""
        # C (h * t) = (h * t) @ C^T, computed as h @ (C diag t)^T without (B, L, R) products.
        ct = self.c.weight.unsqueeze(0) * target.unsqueeze(1)  # (B, H, R)
        pre = hist_proj + self.b(target).unsqueeze(1) + torch.bmm(history, ct.transpose(1, 2))  # (B, L, H)
        logits = self.score(self.act(pre.transpose(1, 2)).transpose(1, 2)).squeeze(-1)  # (B, L)
        logits = logits.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(logits, dim=-1)
        return torch.nan_to_num(weights, nan=0.0)  # (B, L); rows with no history are 0

    def forward(self, target: torch.Tensor, history: torch.Tensor, hist_proj: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        weights = self.weights(target, history, hist_proj, mask)  # (B, L)
        return torch.bmm(weights.unsqueeze(1), history).squeeze(1)  # (B, R)


class ClickHead(nn.Module):
    """Logit ``(B,)`` = MLP on ``[user ; context ; target ; interest ; target * interest ;
    P(user) * target]`` + ``<P(user), target>`` [+ the cold-start content match].

    ``P`` maps the user embedding to item width. The cross block and the direct dot
    product (a factorisation-machine term) give user-item interactions a short
    gradient path: an MLP alone learns them slowly, which matters online, where every
    example is seen once, and for users with little history.

    With ``content_dim`` set, the content match is added:
    ``gate * (<w * (interest_c - m), (target_c - m)> + b)``, where ``*_c`` are the
    first ``content_dim`` columns (the content part) of the attended interest and of
    the target, ``m`` a running mean of item content embeddings (:meth:`observe_content`),
    ``w`` per-dimension weights starting at ``match_init``, ``b`` a learned offset,
    and ``gate`` ``(B,)`` in ``[0, 1]`` the caller's per-target cold-start gate. A new
    item is then scored by how much its content resembles what the user engaged with;
    rows whose ``has_history`` ``(B,)`` is False get only ``gate * b``.

    With ``fade_content``, the MLP and the factorisation term read the target's
    content columns scaled by ``gate``: content speaks for a new item, its ID row
    and statistics for a warm one (the match reads them unscaled).
    """

    #: ``b`` is stored divided by this, so Adam (whose steps are about ``lr`` whatever
    #: the gradient's scale) moves it this much faster: an online run has only ~100
    #: steps to learn where cold items sit against warm ones.
    COLD_BIAS_STEP = 20.0

    def __init__(self, d: int, item_dim: int, hidden: Sequence[int], content_dim: int = 0,
                 match_init: float = 2.0, fade_content: bool = False) -> None:
        super().__init__()
        self.fade_content = fade_content and content_dim > 0
        self.user_cross = nn.Linear(d, item_dim, bias=False)
        layers: list[nn.Module] = []
        width = 2 * d + 4 * item_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.PReLU(h)]
            width = h
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)
        self.content_dim = content_dim
        self.content_match: nn.Parameter | None = None
        if content_dim:
            self.content_match = nn.Parameter(torch.full((content_dim,), float(match_init)))
            self.cold_bias = nn.Parameter(torch.zeros(()))
            # Sentence embeddings share a common direction; matching centred vectors
            # keeps it from acting as an item bias.
            self.register_buffer("content_mean", torch.zeros(content_dim))

    @torch.no_grad()
    def observe_content(self, content: torch.Tensor, momentum: float = 0.05) -> None:
        """Move the running content mean toward the mean of ``content`` ``(N, content_dim)``
        (call after each training step with the batch's item content embeddings)."""
        if self.content_match is not None and content.shape[0]:
            self.content_mean.lerp_(content.detach().float().mean(0), momentum)

    def forward(self, user: torch.Tensor, context: torch.Tensor, target: torch.Tensor,
                interest: torch.Tensor, gate: torch.Tensor | None = None,
                has_history: torch.Tensor | None = None) -> torch.Tensor:
        read = target
        if self.fade_content and gate is not None:
            c = self.content_dim
            read = torch.cat([target[:, :c] * gate.to(target.dtype).unsqueeze(-1), target[:, c:]], dim=-1)  # (B, R)
        cross = self.user_cross(user) * read  # (B, R)
        x = torch.cat([user, context, read, interest, read * interest, cross], dim=-1)  # (B, 2d + 4R)
        logit = self.mlp(x).squeeze(-1) + cross.sum(-1)  # (B,)
        if self.content_match is not None and gate is not None:
            c, dtype = self.content_dim, target.dtype
            mean = self.content_mean.to(dtype)
            match = ((interest[:, :c] - mean) * (target[:, :c] - mean) * self.content_match.to(dtype)).sum(-1)  # (B,)
            if has_history is not None:  # no history, nothing to match: the interest is all zeros
                match = match * has_history.to(match.dtype)
            logit = logit + gate.to(logit.dtype) * (match + self.COLD_BIAS_STEP * self.cold_bias.to(logit.dtype))
        return logit


class ConversionHead(nn.Module):
    """The deep part of the pCVR logit ``(B,)``: an MLP on ``[user ; context ; target ;
    interest ; target * interest]``, the representations the click head reads.

    The caller passes them detached (the CTCVR loss trains this head only, so the
    click model is unaffected), and adds the wide part (conversion-rate statistics
    and an offset). The last layer starts at zero, so an untrained head predicts the
    wide part alone: the running conversion rate.
    """

    def __init__(self, d: int, item_dim: int, hidden: Sequence[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = 2 * d + 3 * item_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.PReLU(h)]
            width = h
        last = nn.Linear(width, 1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.mlp = nn.Sequential(*layers, last)

    def forward(self, user: torch.Tensor, context: torch.Tensor, target: torch.Tensor,
                interest: torch.Tensor) -> torch.Tensor:
        x = torch.cat([user, context, target, interest, target * interest], dim=-1)  # (B, 2d + 3R)
        return self.mlp(x).squeeze(-1)  # (B,)
