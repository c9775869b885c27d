"""Why the model scores an item as it does: three views of the score it is ranked by.

The score is the one the serving objective ranks by
(:meth:`em3.model.EM3Model.score_candidates`): ``ctr`` the click logit, ``ctcvr`` the
logit of pCTR x pCVR, ``value`` the log expected conversion value (:data:`UNITS`).

* **Modality mass** (:func:`modality_mass`): the share of the Fusion-Q-Former's
  cross-attention (queries, heads and layers averaged) on each modality's tokens:
  ``text``, ``image``, and ``missing`` (the learned null token, which stands for
  absent content and takes the attention no modality draws). The three sum to 1
  per item. Which modality the item's content embedding is read from.
* **History attention** (:func:`explain_candidates`, ``history_weights``): the
  target-attention weights of the user's history items for each candidate (a
  softmax: they sum to 1 over the history). Which past clicks the interest vector
  is built from (the click and the CVR heads read the same interest vector).
* **Content / ID split** (:func:`shapley_two`): the score minus a baseline score,
  split between two players, the *content* part and the *ID* part of every item row
  the score reads (the candidate's and the history items'). A coalition's value
  ``v(S)`` is the score with the parts outside ``S`` replaced by their baselines
  (:meth:`em3.model.EM3Model.baseline_rows`): content by the running mean of item
  content embeddings (an item of average content), the ID part by a never-seen
  item's (ID embedding 0, cold-start gate 1, click and conversion statistics of an
  unseen row, the global mean value per conversion). The user, the context and the
  user's statistics stay as they are. The two-player Shapley values are the average
  marginal contribution of each part over both orders: they are the only split
  that is symmetric, gives a part that changes nothing 0, and adds up exactly,
  ``content + id = score - baseline_score``.
  The same split is given per term of the score
  (:meth:`em3.model.EM3Model.objective_terms`): for ``ctcvr`` the click part
  ``log pCTR``, the conversion part ``log pCVR`` and ``odds = -log(1 - pCTCVR)``
  (logit minus log); for ``value`` the click part, the conversion part and the
  item's log expected value per conversion. A score is the sum of its terms in
  every coalition, and the Shapley value is linear, so the terms' splits add up
  to the score's. Four forward passes (the real one and three masked ones), all
  for the explained candidates only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from em3.model.model import sum_terms
from em3.types import ItemContent

__all__ = ["MODALITIES", "UNITS", "ScoreExplanation", "shapley_two", "modality_mass", "explain_candidates"]

#: Columns of :func:`modality_mass`.
MODALITIES = ("text", "image", "missing")


def shapley_two(v_none: Any, v_a: Any, v_b: Any, v_ab: Any) -> tuple[Any, Any]:
    """Shapley values of players ``a`` and ``b`` from the values of the four coalitions
    (numbers or tensors, elementwise).

    ``v_a`` is the value with only ``a`` present, ``v_ab`` with both. Each player gets
    its marginal contribution averaged over the two orders of arrival; the two add up
    to ``v_ab - v_none``.

    >>> shapley_two(0.0, 1.0, 2.0, 5.0)
    (2.0, 3.0)
    >>> a, b = shapley_two(0.5, 0.5, 1.5, 1.5)   # a changes nothing: it gets 0
    >>> a, b
    (0.0, 1.0)
    """
    phi_a = ((v_a - v_none) + (v_ab - v_b)) / 2
    phi_b = ((v_b - v_none) + (v_ab - v_a)) / 2
    return phi_a, phi_b


#: What the explained score of each objective is (``ScoreExplanation.units``).
UNITS = {
    "ctr": "logit of pCTR (nats); the click term is the same logit",
    "ctcvr": "logit of pCTCVR = log pCTR + log pCVR + odds, odds = -log(1 - pCTCVR) (nats)",
    "value": "log expected conversion value = log pCTR + log pCVR + log(item's expected value per conversion) "
             "(nats)",
}


@dataclass
class ScoreExplanation:
    """:func:`explain_candidates` for ``C`` candidates against ``L`` history items,
    ranked by ``objective``.

    ``score``, ``baseline``, ``content`` and ``id`` are ``(C,)``, ``score`` the score
    the candidates were ranked by, ``content + id == score - baseline``. ``terms``
    splits each of them by the score's terms (:meth:`em3.model.EM3Model.objective_terms`:
    ``click``, and with a conversion objective ``conversion`` and ``odds`` or
    ``value``), name -> ``(score, baseline, content, id)``, each ``(C,)``; the terms
    add up to the totals. ``history_weights`` is ``(C, L)`` (rows sum to 1, or are
    all 0 without history).
    """

    score: torch.Tensor
    baseline: torch.Tensor
    content: torch.Tensor
    id: torch.Tensor
    history_weights: torch.Tensor
    objective: str = "ctr"
    terms: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def rows(self, history_ids: Sequence[str], top: int = 5) -> list[dict[str, Any]]:
        """One JSON-ready dict per candidate: the objective, the units, the split of the
        score and of each of its terms, and the ``top`` history items by weight
        (``history_ids`` names the history rows, newest first)."""
        out = []
        weights = self.history_weights[:, : len(history_ids)].float()
        n = min(top, weights.shape[1])
        best_w, best_j = (weights.topk(n, dim=1) if n else (weights[:, :0], weights[:, :0].long()))
        for c in range(self.score.shape[0]):
            out.append({
                "objective": self.objective,
                "units": UNITS[self.objective],
                "score": float(self.score[c]),
                "baseline_score": float(self.baseline[c]),
                "content": float(self.content[c]),
                "id": float(self.id[c]),
                "terms": {name: {"score": float(t[0][c]), "baseline_score": float(t[1][c]),
                                 "content": float(t[2][c]), "id": float(t[3][c])}
                          for name, t in self.terms.items()},
                "history": [{"item_id": history_ids[j], "weight": float(w)}
                            for w, j in zip(best_w[c].tolist(), best_j[c].tolist())],
            })
        return out


@torch.no_grad()
def explain_candidates(model: Any, user_id: str, context: Mapping[str, str], history_reps: torch.Tensor,
                       candidate_reps: torch.Tensor, objective: str = "ctr") -> ScoreExplanation:
    """The content / ID split and the history attention of ``candidate_reps`` ``(C, R)``
    for one request ranked by ``objective``, ``history_reps`` ``(L, R)`` newest first
    (rows of :meth:`em3.model.EM3Model.item_representations`; ``model`` an ``EM3Model``).

    The split is that of the score :meth:`em3.model.EM3Model.score_candidates` ranks
    by under ``objective``; each term of the score gets its own split, and as the
    Shapley value is linear in the game, the terms' splits add up to the total's."""
    def terms(content: bool, ids: bool) -> dict[str, torch.Tensor]:
        """The score's terms with the parts not kept replaced by their baselines."""
        hist = model.baseline_rows(history_reps, content=not content, ids=not ids)
        cand = model.baseline_rows(candidate_reps, content=not content, ids=not ids)
        return {k: v.float() for k, v in model.objective_terms(user_id, context, hist, cand, objective)[0].items()}

    real, weights = model.objective_terms(user_id, context, history_reps, candidate_reps, objective)
    real = {k: v.float() for k, v in real.items()}
    v_none, v_content, v_id = terms(False, False), terms(True, False), terms(False, True)
    split = {}
    for name in real:
        phi_content, phi_id = shapley_two(v_none[name], v_content[name], v_id[name], real[name])
        split[name] = (real[name], v_none[name], phi_content, phi_id)
    total = [sum_terms({k: t[i] for k, t in split.items()}) for i in range(4)]
    return ScoreExplanation(*total, weights.float(), objective, split)


@torch.no_grad()
def modality_mass(model: Any, item_ids: Sequence[str], contents: Sequence[ItemContent | None], *,
                  attention_only: bool = False) -> torch.Tensor | None:
    """``(N, 3)``: the share of each item's content embedding that ``text``, ``image``
    and ``missing`` account for (:data:`MODALITIES`; a modality the model does not have
    gets 0): the Fusion-Q-Former's attention mass, and with its pooled skip each
    modality's pooled term (:meth:`em3.model.fusion.FusionQFormer.modality_share`);
    ``attention_only``: the queries' attention mass alone. Rows sum to 1. None for a
    model without a Fusion-Q-Former (``id_only``, mean fusion). Uses the model's
    frozen-prefix cache: callers that share it serialise the call."""
    fusion = getattr(model, "fusion", None)
    if fusion is None or not hasattr(fusion, "attention_mass"):
        return None
    tokens, masks = model.modality_tokens(list(item_ids), list(contents))
    share = fusion.attention_mass if attention_only else fusion.modality_share
    mass = share(tokens, masks).float()  # (N, 1 + M): null token, then each modality
    out = torch.zeros(mass.shape[0], len(MODALITIES))
    out[:, 2] = mass[:, 0]
    col = 1
    for slot, encoder in ((0, model.text), (1, model.image)):
        if encoder is not None:
            out[:, slot] = mass[:, col]
            col += 1
    return out  # (N, 3)
