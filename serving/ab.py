"""The non-learned baseline arms of an A/B experiment: popularity and random order.

The experiment itself (arms, bucketing, training-data policy) is
:mod:`em3.experiment`, shared with the learners and simulators.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Sequence

__all__ = ["PopularityRanker", "RandomRanker", "BaselineResult"]


@dataclass(frozen=True)
class BaselineResult:
    """Ranked ids with scores and the propensity of each shown slot."""

    item_ids: list[str]
    scores: list[float]
    propensities: list[float]


class PopularityRanker:
    """Candidates by descending counter; ties in candidate order. Deterministic
    (propensity 1). ``counts`` maps ids to counters (``RedisPopularityStore.get_many``)."""

    def __init__(self, store: Any, kind: str = "clicks") -> None:
        self.store = store
        self.kind = kind

    def rank(self, item_ids: Sequence[str], k: int) -> BaselineResult:
        counts = self.store.get_many(self.kind, list(item_ids))
        order = sorted(range(len(item_ids)), key=lambda n: (-counts[n], n))[:k]
        return BaselineResult(
            [item_ids[n] for n in order], [float(counts[n]) for n in order], [1.0] * len(order)
        )


class RandomRanker:
    """A uniformly random order. Each shown (item, position) had probability
    ``1 / n`` among ``n`` candidates, which is logged as the propensity.

    The order comes from a generator seeded by ``seed`` and the request id, so
    a logged request can be replayed exactly.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def rank(self, item_ids: Sequence[str], k: int, request_id: str) -> BaselineResult:
        rng = random.Random(f"{self.seed}:{request_id}")
        order = list(range(len(item_ids)))
        rng.shuffle(order)
        order = order[:k]
        p = 1.0 / len(item_ids) if item_ids else 1.0
        return BaselineResult([item_ids[n] for n in order], [0.0] * len(order), [p] * len(order))
