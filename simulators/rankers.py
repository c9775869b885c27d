"""The ranker interface the A/B runner talks to, and baseline rankers.

:class:`Ranker` is all the A/B runner needs: ``rank(user_id, candidates,
context, k)`` returns a :class:`Ranking` (the ranked item ids, the arm that
served them and, for stochastic rankers, each item's propensity). An HTTP
client for the real ranking service, an in-process learner, or a baseline
below all fit. A ranker that also learns online implements
:class:`LearningRanker` (``observe(events)``); the runner feeds it its arm's
impressions and clicks at their event times (clicks after their delays).

Baselines: :class:`RandomRanker` (uniform, with exact propensities),
:class:`PopularityRanker` (online click counts) and :class:`OracleRanker`
(the world's hidden truth: an upper bound, and a planted lift for tests).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from em3.types import Click, Impression

__all__ = [
    "Ranking",
    "Ranker",
    "LearningRanker",
    "RandomRanker",
    "PopularityRanker",
    "OracleRanker",
    "EpsilonGreedyRanker",
]


@dataclass(frozen=True)
class Ranking:
    """A ranked list from one arm.

    Attributes
    ----------
    item_ids : tuple of str
        Best first; at most ``k`` items, all from the candidates, no repeats.
    arm : str
        The arm (model line) that served it.
    propensities : tuple of float, optional
        Probability that each item was shown at its position (1.0 each for a
        deterministic ranker, the default when ``None``).
    model_version : int
        Version of the model that served it (0 if not versioned).
    impression_ids : tuple of str, optional
        Impression ids the server already logged for these items (then the
        runner uses them, so clicks join the server's impressions).
    request_id : str, optional
        The server's request id.
    scores : tuple of float, optional
        The score of each item (higher is better), for the prequential AUC.
    explanations : tuple of (dict or None), optional
        Why each item scored as it did, when the ranker was asked to explain
        (``POST /v1/rank`` with ``"explain": true``, see :mod:`em3.model.explain`).
    """

    item_ids: tuple[str, ...]
    arm: str
    propensities: tuple[float, ...] | None = None
    model_version: int = 0
    impression_ids: tuple[str, ...] | None = None
    request_id: str | None = None
    scores: tuple[float, ...] | None = None
    explanations: tuple[Mapping[str, Any] | None, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("propensities", "impression_ids", "scores", "explanations"):
            value = getattr(self, name)
            if value is not None and len(value) != len(self.item_ids):
                raise ValueError(
                    f"{name} must have one entry per item ({len(self.item_ids)}), but {len(value)} are given"
                )


@runtime_checkable
class Ranker(Protocol):
    """Anything that ranks candidates for a user."""

    def rank(self, user_id: str, candidates: Sequence[str], context: Mapping[str, str], k: int) -> Ranking:
        """Return the top ``k`` of ``candidates`` for ``user_id`` in ``context``."""
        ...


@runtime_checkable
class LearningRanker(Ranker, Protocol):
    """A ranker that learns from its own impressions and clicks."""

    def observe(self, events: Sequence[Impression | Click], weights: Sequence[float] | None = None) -> None:
        """Events in event-time order; clicks arrive after their delay. ``weights``
        (one per event, default 1) are training weights (weighted training data)."""
        ...


def _check_k(k: int) -> None:
    if k <= 0:
        raise ValueError(f"k must be > 0, but {k} is given")


class RandomRanker:
    """Uniformly random top-``k``; propensity of an item at a position is ``1 / n_candidates``.

    Parameters
    ----------
    arm : str
        Arm name.
    seed : int
        Seed of its own random stream.
    """

    def __init__(self, arm: str = "random", seed: int = 0) -> None:
        self.arm = arm
        self._rng = np.random.default_rng(seed)

    def rank(self, user_id: str, candidates: Sequence[str], context: Mapping[str, str], k: int) -> Ranking:
        _check_k(k)
        n = len(candidates)
        take = min(k, n)
        order = self._rng.choice(n, size=take, replace=False)
        return Ranking(tuple(candidates[i] for i in order), self.arm, tuple([1.0 / n] * take) if n else ())


class PopularityRanker:
    """Ranks by smoothed click-through rate seen so far (learns online via :meth:`observe`).

    Parameters
    ----------
    arm : str
        Arm name.
    prior_clicks, prior_impressions : float
        Beta-like smoothing: ``(clicks + prior_clicks) / (impressions + prior_impressions)``.
    """

    def __init__(self, arm: str = "popularity", prior_clicks: float = 1.0, prior_impressions: float = 20.0) -> None:
        if prior_impressions <= 0:
            raise ValueError(f"prior_impressions must be > 0, but {prior_impressions} is given")
        if prior_clicks < 0:
            raise ValueError(f"prior_clicks must be >= 0, but {prior_clicks} is given")
        self.arm = arm
        self.prior_clicks = prior_clicks
        self.prior_impressions = prior_impressions
        self.impressions: dict[str, float] = defaultdict(float)
        self.clicks: dict[str, float] = defaultdict(float)

    def observe(self, events: Sequence[Impression | Click], weights: Sequence[float] | None = None) -> None:
        for n, event in enumerate(events):
            w = 1.0 if weights is None else float(weights[n])
            if isinstance(event, Impression):
                self.impressions[event.item_id] += w
            else:
                self.clicks[event.item_id] += w

    def score(self, item_ids: Sequence[str]) -> np.ndarray:
        """Smoothed CTR of each item."""
        return np.array([(self.clicks.get(i, 0) + self.prior_clicks)
                         / (self.impressions.get(i, 0) + self.prior_impressions) for i in item_ids])

    def rank(self, user_id: str, candidates: Sequence[str], context: Mapping[str, str], k: int) -> Ranking:
        _check_k(k)
        scores = self.score(candidates)
        order = np.argsort(-scores, kind="stable")[:k]
        return Ranking(tuple(candidates[i] for i in order), self.arm, scores=tuple(scores[order].tolist()))


class OracleRanker:
    """Ranks by the world's hidden attraction at the world's current time.

    ``noise`` (logit-scale Gaussian, seeded) degrades it; ``noise=0`` is the
    best any model can do. It needs the world and the event time, which the
    runner passes in ``context["t"]``.
    """

    def __init__(self, world, arm: str = "oracle", noise: float = 0.0, seed: int = 0) -> None:
        if noise < 0:
            raise ValueError(f"noise must be >= 0, but {noise} is given")
        self.world = world
        self.arm = arm
        self.noise = noise
        self._rng = np.random.default_rng(seed)

    def rank(self, user_id: str, candidates: Sequence[str], context: Mapping[str, str], k: int) -> Ranking:
        _check_k(k)
        t = float(context.get("t", self.world.config.start_time))
        a = np.clip(self.world.attraction(user_id, candidates, t), 1e-12, 1 - 1e-12)
        logit = np.log(a) - np.log1p(-a)
        if self.noise > 0:
            logit = logit + self.noise * self._rng.standard_normal(logit.shape[0])
        order = np.argsort(-logit, kind="stable")[:k]
        return Ranking(tuple(candidates[i] for i in order), self.arm, scores=tuple(logit[order].tolist()))


class EpsilonGreedyRanker:
    """A :class:`PopularityRanker` that explores: each slot, with probability
    ``epsilon``, shows a uniformly random remaining candidate instead of the next
    best one. With ``epsilon=0`` it is greedy, and learns only about what it
    already shows; its exploring twin discovers items it would never show, which
    makes training on pooled A/B data (one arm learning from the other's
    exposures) visibly biased (``benchmarks/ab_interference.py``).
    """

    def __init__(self, arm: str, epsilon: float, seed: int = 0, prior_clicks: float = 1.0,
                 prior_impressions: float = 20.0) -> None:
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], but {epsilon} is given")
        self.arm = arm
        self.epsilon = epsilon
        self.learner = PopularityRanker(arm, prior_clicks, prior_impressions)
        self._rng = np.random.default_rng(seed)

    def observe(self, events: Sequence[Impression | Click], weights: Sequence[float] | None = None) -> None:
        self.learner.observe(events, weights)

    def rank(self, user_id: str, candidates: Sequence[str], context: Mapping[str, str], k: int) -> Ranking:
        _check_k(k)
        scores = self.learner.score(candidates)
        order = [int(i) for i in np.argsort(-scores, kind="stable")]
        chosen: list[int] = []
        taken: set[int] = set()
        for _ in range(min(k, len(candidates))):
            if self.epsilon > 0 and self._rng.random() < self.epsilon:
                rest = [i for i in range(len(candidates)) if i not in taken]
                pick = rest[int(self._rng.integers(len(rest)))]
            else:
                pick = next(i for i in order if i not in taken)
            chosen.append(pick)
            taken.add(pick)
        return Ranking(tuple(candidates[i] for i in chosen), self.arm,
                       scores=tuple(float(scores[i]) for i in chosen))
