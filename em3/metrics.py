"""Pure evaluation metrics: AUC, GAUC, log loss, and a prequential tracker.

All functions take array-likes and return floats; ``nan`` where a metric is
undefined (for example AUC with one class only).

>>> auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
0.75
>>> gauc(["a", "a", "b", "b", "c"], [0, 1, 1, 0, 1], [0.2, 0.9, 0.1, 0.3, 0.5])
0.5
"""
from __future__ import annotations

from collections import deque
from typing import Hashable, Iterable, Sequence

import numpy as np

__all__ = ["auc", "gauc", "logloss", "PrequentialTracker"]


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    boundaries = np.flatnonzero(np.diff(xs)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(x)]])
    avg = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def auc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties count one half)."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores must have the same length, but {y.shape} and {s.shape} are given")
    n_pos = float(y.sum())
    n_neg = float(len(y) - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = _ranks(s)
    return float((r[y == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def gauc(groups: Sequence[Hashable], labels: Sequence[int] | np.ndarray,
         scores: Sequence[float] | np.ndarray) -> float:
    """Group (per-user) AUC: mean of per-group AUCs weighted by the group's
    impression count, skipping groups with one class only."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    g = np.asarray(list(groups) if not isinstance(groups, np.ndarray) else groups)
    if not (len(g) == len(y) == len(s)):
        raise ValueError(f"groups, labels and scores must align, but {len(g)}, {len(y)}, {len(s)} are given")
    if len(y) == 0:
        return float("nan")
    _, inverse = np.unique(g, return_inverse=True)
    order = np.argsort(inverse, kind="mergesort")
    bounds = np.flatnonzero(np.diff(inverse[order])) + 1
    total = weight = 0.0
    for idx in np.split(order, bounds):
        yy = y[idx]
        pos = yy.sum()
        if pos == 0 or pos == len(yy):
            continue
        total += auc(yy, s[idx]) * len(idx)
        weight += len(idx)
    return total / weight if weight else float("nan")


def logloss(labels: Sequence[int] | np.ndarray, probs: Sequence[float] | np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities (clipped to ``[eps, 1 - eps]``)."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.clip(np.asarray(probs, dtype=np.float64).ravel(), eps, 1 - eps)
    if y.shape != p.shape:
        raise ValueError(f"labels and probs must have the same length, but {y.shape} and {p.shape} are given")
    if len(y) == 0:
        return float("nan")
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


class PrequentialTracker:
    """Test-then-train bookkeeping: every prediction is recorded before the model
    learns the same examples; metrics over all of them and over a sliding window.

    Parameters
    ----------
    window : int
        Number of most recent predictions in the sliding window.

    >>> t = PrequentialTracker(window=2)
    >>> t.update([0, 1, 1], [0.2, 0.8, 0.1], groups=["u", "u", "v"])
    >>> t.count, t.window_auc()
    (3, nan)
    """

    def __init__(self, window: int = 10_000) -> None:
        if window <= 0:
            raise ValueError(f"window must be > 0, but {window} is given")
        self.window = window
        self._labels: list[np.ndarray] = []
        self._scores: list[np.ndarray] = []
        self._groups: list[np.ndarray] = []
        self._recent: deque[tuple[int, float]] = deque(maxlen=window)

    @property
    def count(self) -> int:
        return sum(len(a) for a in self._labels)

    def update(self, labels: Iterable[int], scores: Iterable[float], groups: Iterable[Hashable] | None = None) -> None:
        y = np.asarray(list(labels), dtype=np.int8)
        s = np.asarray(list(scores), dtype=np.float64)
        if y.shape != s.shape:
            raise ValueError(f"labels and scores must align, but {y.shape} and {s.shape} are given")
        g = np.asarray(list(groups) if groups is not None else [""] * len(y), dtype=object)
        if len(g) != len(y):
            raise ValueError(f"groups must align with labels, but {len(g)} and {len(y)} are given")
        self._labels.append(y)
        self._scores.append(s)
        self._groups.append(g)
        self._recent.extend(zip(y.tolist(), s.tolist()))

    def _all(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self._labels:
            return np.zeros(0, np.int8), np.zeros(0), np.zeros(0, dtype=object)
        return np.concatenate(self._labels), np.concatenate(self._scores), np.concatenate(self._groups)

    def window_auc(self) -> float:
        if not self._recent:
            return float("nan")
        y, s = zip(*self._recent)
        return auc(y, s)

    def window_logloss(self) -> float:
        if not self._recent:
            return float("nan")
        y, s = zip(*self._recent)
        return logloss(y, s)

    def summary(self) -> dict[str, float]:
        """``auc``, ``gauc``, ``logloss`` over everything, plus the window's, and ``n``."""
        y, s, g = self._all()
        return {"auc": auc(y, s), "gauc": gauc(g, y, s), "logloss": logloss(y, s),
                "window_auc": self.window_auc(), "window_logloss": self.window_logloss(), "n": int(len(y))}
