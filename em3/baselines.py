"""Strong simple baselines that EM3 has to beat on the same prequential stream.

Each baseline scores a batch of impressions with what it has learned so far
(:meth:`predict`), then learns the batch's labels (:meth:`update`): the same
test-then-train protocol as ``benchmarks/quality.py`` runs the model with.

* :class:`ItemCTR` -- a Beta-smoothed per-item click rate whose prior is the running
  global click rate: ``(clicks + a * ctr) / (impressions + a)``.
* :class:`UserItemBias` -- online logistic regression on a global, a user and an
  item bias, per-row Adagrad.
* :class:`FactorizationMachine` -- an online FM over user, item and genre features
  (pairwise factor interactions plus linear terms), per-row Adagrad.

Their settings were chosen on the tuning window (the first 20,000 MovieLens events;
``docs/results.md``): ``ItemCTR`` pseudo-count 5, ``UserItemBias`` rate 0.5, the FM
8 factors at rate 0.02 (init std 0.05), linear terms at 0.5.

They are plain numpy: no model, no content, no Ray. The feature function of the FM
is given by the caller (``benchmarks/quality.py`` adds MovieLens genres).

>>> m = ItemCTR(pseudo_count=2.0)
>>> from em3.types import Impression
>>> imps = [Impression("a", "r", "u", "hit", 0, 0.0), Impression("b", "r", "u", "miss", 0, 0.0)]
>>> m.update(imps, [1, 0]); m.update(imps, [1, 0])
>>> p = m.predict(imps)
>>> bool(p[0] > p[1])
True
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from em3.types import Impression

__all__ = ["ItemCTR", "UserItemBias", "FactorizationMachine", "BASELINES", "make_baseline"]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -30.0, 30.0)))


class _Vocab:
    """Grows a string -> row index map; rows of the tables follow it."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {}

    def rows(self, keys: Sequence[str]) -> np.ndarray:
        idx = self.index
        return np.fromiter((idx.setdefault(k, len(idx)) for k in keys), dtype=np.int64, count=len(keys))

    def __len__(self) -> int:
        return len(self.index)


class _RowAdagrad:
    """A table of rows ``(n, k)`` updated by row-wise Adagrad: one accumulator per
    row (the mean squared gradient of the row's entries), as TorchRec/FBGEMM fuse it;
    only the rows a batch touches change."""

    def __init__(self, width: int, lr: float, init_std: float = 0.0, seed: int = 0, eps: float = 1e-8) -> None:
        self.width, self.lr, self.init_std, self.eps = width, lr, init_std, eps
        self.rng = np.random.default_rng(seed)
        self.w = np.zeros((0, width))
        self.acc = np.zeros(0)

    def ensure(self, n: int) -> None:
        if n > len(self.w):
            grow = max(n, 2 * len(self.w), 64) - len(self.w)
            self.w = np.vstack([self.w, self.rng.normal(0.0, self.init_std, (grow, self.width))])
            self.acc = np.concatenate([self.acc, np.zeros(grow)])

    def step(self, rows: np.ndarray, grads: np.ndarray) -> None:
        """``grads`` ``(N, k)`` for ``rows`` ``(N,)`` (repeats are summed first)."""
        uniq, inv = np.unique(rows, return_inverse=True)
        g = np.zeros((len(uniq), self.width))
        np.add.at(g, inv, grads)
        self.acc[uniq] += (g * g).mean(1)
        self.w[uniq] -= self.lr * g / (np.sqrt(self.acc[uniq])[:, None] + self.eps)


class ItemCTR:
    """Beta-smoothed per-item click rate, shrunk toward the running global CTR."""

    def __init__(self, pseudo_count: float = 5.0) -> None:
        self.a = pseudo_count
        self.vocab = _Vocab()
        self.clicks = np.zeros(0)
        self.imps = np.zeros(0)
        # Before any data the prior is 1/2 at the weight of one impression. (A 10% start
        # ranked the whole first batch below everything else: -0.009 pooled AUC.)
        self.total_clicks = 0.5
        self.total_imps = 1.0

    def _rows(self, impressions: Sequence[Impression]) -> np.ndarray:
        rows = self.vocab.rows([i.item_id for i in impressions])
        if len(self.vocab) > len(self.imps):
            grow = len(self.vocab) - len(self.imps)
            self.clicks = np.concatenate([self.clicks, np.zeros(grow)])
            self.imps = np.concatenate([self.imps, np.zeros(grow)])
        return rows

    def predict(self, impressions: Sequence[Impression]) -> np.ndarray:
        rows = self._rows(impressions)
        prior = self.total_clicks / self.total_imps
        return (self.clicks[rows] + self.a * prior) / (self.imps[rows] + self.a)

    def update(self, impressions: Sequence[Impression], labels: Sequence[int]) -> None:
        rows = self._rows(impressions)
        y = np.asarray(labels, dtype=np.float64)
        np.add.at(self.clicks, rows, y)
        np.add.at(self.imps, rows, 1.0)
        self.total_clicks += y.sum()
        self.total_imps += len(y)


class UserItemBias:
    """Online logistic regression ``sigmoid(b + b_user + b_item)``, per-row Adagrad."""

    def __init__(self, lr: float = 0.5) -> None:
        self.users, self.items = _Vocab(), _Vocab()
        self.user_bias, self.item_bias = _RowAdagrad(1, lr), _RowAdagrad(1, lr)
        self.global_bias = _RowAdagrad(1, lr)
        self.global_bias.ensure(1)

    def _logits(self, impressions: Sequence[Impression]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        u = self.users.rows([i.user_id for i in impressions])
        it = self.items.rows([i.item_id for i in impressions])
        self.user_bias.ensure(len(self.users))
        self.item_bias.ensure(len(self.items))
        z = self.global_bias.w[0, 0] + self.user_bias.w[u, 0] + self.item_bias.w[it, 0]
        return z, u, it

    def predict(self, impressions: Sequence[Impression]) -> np.ndarray:
        return _sigmoid(self._logits(impressions)[0])

    def update(self, impressions: Sequence[Impression], labels: Sequence[int]) -> None:
        z, u, it = self._logits(impressions)
        g = (_sigmoid(z) - np.asarray(labels, dtype=np.float64))[:, None]  # d loss / d logit, per example
        self.user_bias.step(u, g)
        self.item_bias.step(it, g)
        self.global_bias.step(np.zeros(len(g), dtype=np.int64), g)


class FactorizationMachine:
    """Online factorisation machine (Rendle 2010) over string features.

    ``logit = b + sum_f w_f + sum_{f < g} <v_f, v_g>`` over the features that
    ``features(impression)`` returns (for example ``user=..``, ``item=..``,
    ``genre=..``, ``age=..``); linear weights and factors are trained by per-row
    Adagrad on the per-example log loss.
    """

    def __init__(self, features: Callable[[Impression], Sequence[str]], factors: int = 8, lr: float = 0.02,
                 linear_lr: float = 0.5, init_std: float = 0.05, seed: int = 0) -> None:
        self.features = features
        self.vocab = _Vocab()
        self.linear = _RowAdagrad(1, linear_lr)
        self.factors = _RowAdagrad(factors, lr, init_std=init_std, seed=seed)
        self.bias = _RowAdagrad(1, linear_lr)
        self.bias.ensure(1)

    def _encode(self, impressions: Sequence[Impression]):
        feats = [list(self.features(i)) for i in impressions]
        width = max(1, max(len(f) for f in feats))
        idx = np.zeros((len(feats), width), dtype=np.int64)
        mask = np.zeros((len(feats), width))
        for r, f in enumerate(feats):
            idx[r, : len(f)] = self.vocab.rows(f)
            mask[r, : len(f)] = 1.0
        self.linear.ensure(len(self.vocab))
        self.factors.ensure(len(self.vocab))
        v = self.factors.w[idx] * mask[..., None]  # (B, F, k)
        s = v.sum(1)  # (B, k)
        pair = 0.5 * ((s * s).sum(1) - (v * v).sum((1, 2)))  # (B,)
        z = self.bias.w[0, 0] + (self.linear.w[idx, 0] * mask).sum(1) + pair
        return z, idx, mask, v, s

    def predict(self, impressions: Sequence[Impression]) -> np.ndarray:
        return _sigmoid(self._encode(impressions)[0])

    def update(self, impressions: Sequence[Impression], labels: Sequence[int]) -> None:
        z, idx, mask, v, s = self._encode(impressions)
        g = _sigmoid(z) - np.asarray(labels, dtype=np.float64)  # (B,)
        rows, real = idx.reshape(-1), mask.reshape(-1) > 0
        g_lin = np.repeat(g, idx.shape[1])[:, None]
        g_fac = (g[:, None, None] * (s[:, None, :] - v)).reshape(-1, v.shape[-1])  # d pair / d v_f = s - v_f
        self.linear.step(rows[real], g_lin[real])
        self.factors.step(rows[real], g_fac[real])
        self.bias.step(np.zeros(len(g), dtype=np.int64), g[:, None])


#: Names accepted by :func:`make_baseline` (and ``benchmarks/quality.py --variants``).
BASELINES = ("item_ctr", "user_item_bias", "fm_genres")


def make_baseline(name: str, genres: Callable[[str], Sequence[str]] | None = None, seed: int = 0):
    """A fresh baseline by name; ``genres(item_id)`` feeds ``fm_genres``."""
    if name == "item_ctr":
        return ItemCTR()
    if name == "user_item_bias":
        return UserItemBias()
    if name == "fm_genres":
        lookup = genres or (lambda _item: ())

        def features(imp: Impression) -> list[str]:
            out = [f"user={imp.user_id}", f"item={imp.item_id}"]
            # Context features (age, gender, occupation) are left out: on the tuning
            # window they cost 0.02 AUC (a user's context repeats the user's own bias).
            return out + [f"genre={g}" for g in lookup(imp.item_id) if g]

        return FactorizationMachine(features, seed=seed)
    raise ValueError(f"baseline must be one of {BASELINES}, but {name!r} is given")
