"""Losses: per-sample-weighted BCE with fake-negative correction, the ESMM CTCVR
loss, and the Content-ID contrastive (InfoNCE) loss of EM3."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["weighted_bce", "ctcvr_bce", "content_id_infonce", "within_group_bpr"]


def weighted_bce(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None,
                 correction: torch.Tensor | None = None, mode: str = "cancel") -> torch.Tensor:
    """Mean per-sample-weighted binary cross-entropy on logits.

    Correction samples (``Sample.correction``: a click that arrived after the join
    already emitted a negative for the impression, which the model has learned) are
    handled as in Ktena et al. 2019's fake-negative setting:

    - ``"cancel"`` (default): the sample contributes ``-log p + log(1 - p)``, i.e. a
      positive plus a term that cancels the earlier fake negative (its gradient is
      the negative of that negative's gradient at the current parameters). Its
      gradient w.r.t. the logit is exactly ``-1``: bounded, so a burst of late
      clicks cannot blow up a step.
    - ``"positive"``: an ordinary positive (the fake negative is left in place).

    Parameters
    ----------
    logits, labels : Tensor ``(B,)``
    weights : Tensor ``(B,)``, optional
        Per-sample weights (default 1).
    correction : bool Tensor ``(B,)``, optional
        True for correction samples (their label must be 1).
    mode : {"cancel", "positive"}

    Returns
    -------
    Tensor
        Scalar: ``sum(w * loss) / B``.
    """
    labels = labels.to(logits.dtype)
    loss = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")  # (B,)
    if correction is not None and mode == "cancel" and bool(correction.any()):
        # + log(1 - p) = - softplus(z): undoes the earlier "-log(1 - p)" negative.
        loss = loss - correction.to(logits.dtype) * F.softplus(logits)
    if weights is not None:
        loss = loss * weights.to(logits.dtype)
    return loss.mean() if loss.numel() else logits.sum() * 0.0


def ctcvr_bce(ctr_logits: torch.Tensor, cvr_logits: torch.Tensor, labels: torch.Tensor,
              weights: torch.Tensor | None = None, correction: torch.Tensor | None = None,
              mode: str = "cancel") -> torch.Tensor:
    """ESMM's CTCVR loss (Ma et al., SIGIR 2018): binary cross-entropy of
    ``pCTCVR = sg(pCTR) * pCVR`` against "clicked and converted", over every
    impression.

    pCVR is ``P(conversion | click)``; training it only on clicked impressions
    (the usual CVR model) fits it on a sample that differs from the impressions it
    ranks (sample selection bias). Here the CVR head is trained through the product
    on the whole impression space: at an unclicked impression the label is 0 and
    the gradient reaching pCVR is weighted by pCTR, so where the click model says a
    click was unlikely, little is concluded about conversion. The minimiser is
    ``pCVR = P(click and conversion) / pCTR``, calibrated wherever pCTR is.
    ``sg`` (stop-gradient): pCTR is detached, so this loss trains the CVR head only
    and the click model is the same with or without conversions.

    ``correction`` marks conversion samples, which arrive after the click's sample
    was learned as "no conversion" (delayed feedback); with ``mode="cancel"`` they
    contribute ``-log p + log(1 - p)``, a positive that also cancels that earlier
    fake negative (as :func:`weighted_bce` does for late clicks).

    Parameters
    ----------
    ctr_logits, cvr_logits, labels : Tensor ``(B,)``
        ``labels``: 1 where the impression was clicked and converted.
    weights : Tensor ``(B,)``, optional
    correction : bool Tensor ``(B,)``, optional
    mode : {"cancel", "positive"}

    Returns
    -------
    Tensor
        Scalar: ``sum(w * loss) / B``.

    >>> z = torch.tensor([0.0, 2.0]); y = torch.tensor([0.0, 1.0])
    >>> full = ctcvr_bce(torch.tensor([10.0, 10.0]), z, y)  # pCTR ~ 1: plain BCE on pCVR
    >>> round(float(full), 4) == round(float(weighted_bce(z, y)), 4)
    True
    """
    labels = labels.to(cvr_logits.dtype)
    log_p = F.logsigmoid(ctr_logits.detach().to(cvr_logits.dtype)) + F.logsigmoid(cvr_logits)  # (B,) log pCTCVR
    log_q = torch.log1p(-torch.exp(log_p).clamp(max=1.0 - 1e-6))  # (B,) log(1 - pCTCVR)
    loss = -(labels * log_p + (1.0 - labels) * log_q)  # (B,)
    if correction is not None and mode == "cancel" and bool(correction.any()):
        loss = loss + correction.to(loss.dtype) * log_q  # undoes the earlier "-log(1 - p)" negative
    if weights is not None:
        loss = loss * weights.to(loss.dtype)
    return loss.mean() if loss.numel() else cvr_logits.sum() * 0.0


def within_group_bpr(logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Pairwise (BPR) loss between the clicked and unclicked rows of each group.

    ``loss = mean over pairs (i, j) of softplus(z_j - z_i)``, over every pair in the
    batch with ``groups[i] == groups[j]``, ``labels[i] = 1`` and ``labels[j] = 0``: it
    asks for the ranking within a group (a user) and is blind to any per-group
    offset, which the pointwise loss learns.

    Parameters
    ----------
    logits, labels : Tensor ``(B,)``
    groups : Tensor ``(B,)`` of ints (e.g. user rows)

    Returns
    -------
    Tensor
        Scalar; 0 (with a gradient path) when the batch has no such pair.

    >>> z = torch.tensor([2.0, 0.0, 5.0]); y = torch.tensor([1.0, 0.0, 0.0])
    >>> round(float(within_group_bpr(z, y, torch.tensor([0, 0, 1]))), 4)  # one pair: softplus(0 - 2)
    0.1269
    """
    same = groups.unsqueeze(0) == groups.unsqueeze(1)  # (B, B)
    pos, neg = labels > 0.5, labels < 0.5
    pairs = same & pos.unsqueeze(1) & neg.unsqueeze(0)  # (B, B): row i clicked, column j not
    if not bool(pairs.any()):
        return logits.sum() * 0.0
    diff = logits.unsqueeze(0) - logits.unsqueeze(1)  # (B, B): z_j - z_i
    return F.softplus(diff[pairs]).mean()


def content_id_infonce(content: torch.Tensor, ids: torch.Tensor, temperature: float,
                       negatives: torch.Tensor | None = None,
                       same_id: torch.Tensor | None = None) -> torch.Tensor:
    """Content-ID contrastive loss: each item's content embedding must pick out its
    own ID embedding among the other items' (in-batch) and optional sampled ones.

    ``loss = mean_i -log( exp(s_ii / tau) / (sum_j exp(s_ij / tau) + sum_k exp(s_ik' / tau)) )``
    with ``s`` the cosine similarity of content ``i`` and ID ``j`` (or sampled ID
    ``k``).

    Parameters
    ----------
    content, ids : Tensor ``(N, d)``
        Row ``i`` of both belongs to the same item (items unique).
    temperature : float
    negatives : Tensor ``(N, M, d)`` or ``(M, d)``, optional
        Extra ID embeddings used as negatives (per item, or shared).
    same_id : bool Tensor ``(N, N)``, optional
        True where items ``i != j`` share an ID bucket (hash collision); those
        "negatives" are masked out.

    Returns
    -------
    Tensor
        Scalar loss; 0 for fewer than two items and no sampled negatives.
    """
    n = content.shape[0]
    if n == 0 or (n < 2 and negatives is None):
        return content.sum() * 0.0
    c = F.normalize(content, dim=-1)  # (N, d)
    e = F.normalize(ids, dim=-1)  # (N, d)
    logits = c @ e.T / temperature  # (N, N)
    if same_id is not None:
        off_diag = same_id & ~torch.eye(n, dtype=torch.bool, device=same_id.device)
        logits = logits.masked_fill(off_diag, float("-inf"))
    if negatives is not None:
        neg = F.normalize(negatives, dim=-1)
        if neg.dim() == 2:
            extra = c @ neg.T  # (N, M)
        else:
            extra = torch.einsum("nd,nmd->nm", c, neg)  # (N, M)
        logits = torch.cat([logits, extra / temperature], dim=1)  # (N, N + M)
    target = torch.arange(n, device=content.device)
    return F.cross_entropy(logits, target)
