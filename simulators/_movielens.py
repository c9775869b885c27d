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

__all__ = ["MovieLensStats", "movielens_stats", "GENRES"]

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
    """

    titles: tuple[str, ...]
    years: np.ndarray
    genres: np.ndarray
    movie_ratings: np.ndarray
    user_ratings: np.ndarray
    user_genre_share: np.ndarray
    genre_popularity: np.ndarray


def _rows(path: Path) -> list[list[str]]:
    with open(path, encoding="utf-8", errors="replace") as fh:
        next(fh)
        return [line.rstrip("\n").split("\t") for line in fh if line.strip()]


@lru_cache(maxsize=2)
def movielens_stats(path: str | None = None) -> MovieLensStats:
    """Read and summarise MovieLens-100K (cached).

    Raises
    ------
    FileNotFoundError
        When the recbole wheel (or ``path``) does not hold the dataset.
    """
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
    for n, row in enumerate(inter):
        u[n] = user_index.setdefault(row[0], len(user_index))
        m[n] = movie_index.get(row[1], -1)
    keep = m >= 0
    u, m = u[keep], m[keep]
    n_users = len(user_index)
    movie_ratings = np.bincount(m, minlength=len(items))
    user_ratings = np.bincount(u, minlength=n_users)
    share = np.zeros((n_users, len(GENRES)))
    np.add.at(share, u, genres[m])
    share = (share + 0.1) / (share + 0.1).sum(axis=1, keepdims=True)
    popularity = (genres * movie_ratings[:, None]).sum(axis=0)
    popularity = popularity / popularity.sum()
    logger.debug("MovieLens-100K stats: %d movies, %d users", len(items), n_users)
    return MovieLensStats(titles, years, genres, movie_ratings, user_ratings, share, popularity)
