"""A simulated world of users and multimodal items with a hidden ground truth.

Seeded and reproducible; it knows nothing of the serving code. The A/B runner
(:mod:`simulators.ab`) asks it for requests and feeds it rankings.

The hidden preference model
---------------------------
Genres have latent vectors ``E[g]`` (unit norm, ``dim`` dimensions). An item's
*content factor* is the normalised mean of its genres' vectors; its latent
factor mixes content and an idiosyncratic part,
``v_i = normalise(content_weight * c_i + sqrt(1 - content_weight^2) * e_i)``, so
an item's text (title, genres) and poster, which show its genres, predict
who likes it: a new item is predictable from its content alone (cold start).
A user's factor is the same mix over the genres they like, and it drifts:
``u(t) = normalise(u_0 + drift_scale * (sin(w t + phi) d1 + cos(w t + phi) d2))``
with ``w = 2 pi / drift_period_s`` (interest drift). Each item also has a
quality ``b_i`` that content does not reveal (what ID embeddings learn).

Attraction is ``a = sigmoid(preference_scale * u(t) . v_i + b_i + c)``, with
``c`` fixed at construction so the mean attraction of a random user-item pair is
``base_attraction``. Clicks follow the position-based model: position ``k``
(0-based) is examined with probability ``1 / (1 + k)^position_bias_eta``; an
examined item is clicked with probability ``(1 - click_noise) a +
click_noise * base_attraction`` (click noise). Each click comes after a delay
drawn from ``delay`` (log-normal by default).

Conversions (the hidden conversion model)
-----------------------------------------
A click converts with probability
``p = sigmoid(conversion_preference_scale * u(t) . v_i + q_i + r_u + c')``: the same
taste as clicks, an item conversion quality ``q_i`` (standard deviation
``conversion_quality_scale``; half of its variance follows the item's genres, so
content predicts part of it, and it is independent of the click quality ``b_i``:
a catchy item need not sell), a user propensity ``r_u`` (``conversion_user_scale``),
and ``c'`` fixed so the mean ``p`` over random user-item pairs is ``conversion_rate``.
The conversion comes ``conversion_delay`` after the click (hours by default: delayed
feedback) with a value, the item's price (log-normal, median 30) times a noise of
10%. :meth:`World.conversion_probability` is the ground truth, for the best AUC any
model could reach. Conversions use their own random streams, so adding them changed
no click of any seeded run.

New items arrive as a Poisson process (``new_items_per_hour``); each request's
candidates mix the whole available catalogue and items younger than
``fresh_window_s`` (``fresh_share``).

Calibration from MovieLens-100K (``calibration="movielens"``, the default when
the recbole wheel is installed): the genres; items themselves (real titles,
years and genres; the initial catalogue holds the older movies and newer ones
arrive over time); a biased matrix factorisation fitted on all 100k ratings
(:func:`simulators._movielens.fit_factors`), whose item factors are the
idiosyncratic part ``e_i`` of real movies, whose user factors (of a resampled
real user, jittered) are the users' idiosyncratic part, and whose item biases
give item quality; each user's genre taste (the genre shares of the movies
that real user rated); and user activity (request rate proportional to that
user's number of ratings). Images are the synthetic posters of
:func:`em3.data.images.render_poster`.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from em3.constraints import (Annotated, Field, Float, Literal, NonNegFloat, OpenProbability, PositiveFloat,
                             PositiveInt, Probability, config_class)
from em3.types import ItemContent
from simulators._movielens import GENRES, fit_factors, movielens_stats
from simulators.delays import DelayDistribution, LogNormalDelay

__all__ = ["WorldConfig", "Request", "Feedback", "World"]

logger = logging.getLogger(__name__)

_DEVICES = ("ios", "android", "web")
_WORDS = ("Night", "River", "Secret", "Last", "Summer", "City", "Dark", "Golden", "Lost", "Wild",
          "Silent", "Broken", "Blue", "Iron", "Paper", "Winter", "Hidden", "Glass", "Red", "Distant")


@config_class
class WorldConfig:
    """Settings of a simulated world; every field is checked at construction.

    Parameters
    ----------
    n_users : int
        Users.
    n_items : int
        Items available at ``start_time`` (the initial catalogue).
    dim : int
        Latent dimension.
    n_candidates : int
        Candidates per request.
    start_time : float
        Event time (epoch seconds) at which the world starts.
    horizon_s : float
        How far ahead new items are generated.
    new_items_per_hour : float
        Arrival rate of new items (cold start); 0 for none.
    content_weight : float
        In [0, 1]: how much of an item's (and user's) latent factor its genres explain.
    preference_scale : float
        Logit scale of the user-item match.
    quality_scale : float
        Standard deviation of the item quality logit.
    base_attraction : float
        Mean attraction of a random user-item pair, in (0, 1).
    position_bias_eta : float
        Examination probability at position ``k`` is ``1 / (1 + k)^eta``.
    click_noise : float
        In [0, 1]: share of clicks unrelated to preference.
    drift_scale : float
        Amplitude of interest drift (0: none).
    drift_period_s : float
        Period of the drift.
    fresh_share : float
        Share of candidates drawn from items younger than ``fresh_window_s``.
    fresh_window_s : float
        Age below which an item counts as fresh.
    delay : DelayDistribution
        Impression-to-click delays.
    conversion_rate : float
        Mean conversion probability of a click on a random user-item pair, in [0, 1)
        (0: nobody converts).
    conversion_quality_scale, conversion_user_scale : float
        Standard deviations of the item conversion quality and user propensity logits.
    conversion_preference_scale : float
        Logit scale of the user-item match in the conversion probability.
    conversion_delay : DelayDistribution
        Click-to-conversion delays.
    calibration : {"auto", "movielens", "synthetic"}
        Where genres, tastes, activity and items come from.
    seed : int
        Seed of everything.
    """

    n_users: PositiveInt = 1000
    n_items: PositiveInt = 400
    dim: PositiveInt = 16
    n_candidates: PositiveInt = 50
    start_time: float = 1_700_000_000.0
    horizon_s: PositiveFloat = 7 * 86_400.0
    new_items_per_hour: NonNegFloat = 4.0
    content_weight: Probability = 0.8
    preference_scale: PositiveFloat = 3.0
    quality_scale: NonNegFloat = 0.5
    base_attraction: OpenProbability = 0.08
    position_bias_eta: NonNegFloat = 1.0
    click_noise: Probability = 0.05
    drift_scale: NonNegFloat = 0.3
    drift_period_s: PositiveFloat = 86_400.0
    fresh_share: Probability = 0.2
    fresh_window_s: PositiveFloat = 6 * 3600.0
    delay: DelayDistribution = field(default_factory=LogNormalDelay)
    conversion_rate: Annotated[Float, Field(ge=0, lt=1)] = 0.1
    conversion_quality_scale: NonNegFloat = 1.0
    conversion_user_scale: NonNegFloat = 0.5
    conversion_preference_scale: NonNegFloat = 1.0
    conversion_delay: DelayDistribution = field(
        default_factory=lambda: LogNormalDelay(median_s=3600.0, sigma=1.0, max_s=3 * 86_400.0))
    calibration: Literal["auto", "movielens", "synthetic"] = "auto"
    seed: int = 0


@dataclass(frozen=True)
class Request:
    """One user asking for a ranking at event time ``t``."""

    request_id: str
    user_id: str
    candidates: tuple[str, ...]
    context: Mapping[str, str]
    t: float


@dataclass(frozen=True)
class Feedback:
    """What the user did with the item shown at ``position``: a click ``delay_s``
    after the impression, and a conversion ``conversion_delay_s`` after that click,
    worth ``value``."""

    item_id: str
    position: int
    clicked: bool
    delay_s: float | None
    converted: bool = False
    conversion_delay_s: float | None = None
    value: float | None = None


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class World:
    """Users and items with a hidden preference model (see the module docstring).

    Parameters
    ----------
    config : WorldConfig, optional

    Notes
    -----
    Three random streams, all from ``config.seed``: the world's structure,
    requests (:meth:`next_request`) and responses (:meth:`respond`). The same
    seed and the same sequence of calls give the same run.
    """

    def __init__(self, config: WorldConfig | None = None) -> None:
        self.config = cfg = config or WorldConfig()
        structure = np.random.default_rng([cfg.seed, 0])
        self._req_rng = np.random.default_rng([cfg.seed, 1])
        self._resp_rng = np.random.default_rng([cfg.seed, 2])
        self._n_requests = 0
        stats = self._load_stats(cfg.calibration)
        self.calibrated = stats is not None
        self.genres = GENRES
        n_genres = len(GENRES)
        self._genre_vec = _normalise(structure.standard_normal((n_genres, cfg.dim)))  # (G, D)

        # Items: arrival times, genres, titles, quality.
        expected = cfg.new_items_per_hour * cfg.horizon_s / 3600.0
        n_new = int(structure.poisson(expected)) if expected > 0 else 0
        arrivals = np.sort(structure.uniform(0.0, cfg.horizon_s, size=n_new)) + cfg.start_time
        n_total = cfg.n_items + n_new
        self._arrival = np.concatenate([np.full(cfg.n_items, cfg.start_time - 1.0), arrivals])  # (I,)
        genres, titles, years, quality = self._make_items(structure, stats, n_total)
        self._item_genres = genres  # (I, G) multi-hot
        self._titles, self._years = titles, years
        content = _normalise(genres @ self._genre_vec)  # (I, D)
        own = _normalise(structure.standard_normal((n_total, cfg.dim)))
        factors = fit_factors(cfg.dim) if stats is not None else None
        real = self._ml_index >= 0
        if factors is not None:  # the idiosyncratic part of real movies: their fitted factors
            own[real] = _normalise(factors[1][self._ml_index[real]])
        w = cfg.content_weight
        self._item_vec = _normalise(w * content + math.sqrt(1 - w * w) * own)  # (I, D)
        self._quality = quality  # (I,)
        self.item_ids = tuple(self._item_id(i, stats) for i in range(n_total))
        self._item_index = {iid: i for i, iid in enumerate(self.item_ids)}

        # Users: taste over genres, activity, drift directions.
        u_own = _normalise(structure.standard_normal((cfg.n_users, cfg.dim)))
        if stats is not None:
            src = structure.integers(0, stats.user_genre_share.shape[0], size=cfg.n_users)
            taste = stats.user_genre_share[src] ** 2  # sharpen: real shares are diffuse
            activity = stats.user_ratings[src].astype(np.float64)
            # a real user's fitted factors, jittered so resampled copies differ
            u_own = _normalise(_normalise(factors[0][src]) + 0.3 * u_own / math.sqrt(cfg.dim))
        else:
            taste = structure.dirichlet(np.full(n_genres, 0.3), size=cfg.n_users)
            activity = structure.lognormal(4.0, 1.0, size=cfg.n_users)
        taste = taste / taste.sum(axis=1, keepdims=True)
        u_content = _normalise(taste @ self._genre_vec)
        self._user_vec = _normalise(w * u_content + math.sqrt(1 - w * w) * u_own)  # (U, D)
        self._drift_a = _normalise(structure.standard_normal((cfg.n_users, cfg.dim)))
        self._drift_b = _normalise(structure.standard_normal((cfg.n_users, cfg.dim)))
        self._drift_phase = structure.uniform(0, 2 * math.pi, size=cfg.n_users)
        self._activity = activity / activity.sum()
        self._activity_cdf = np.cumsum(self._activity)
        self.user_ids = tuple(f"u{k}" for k in range(cfg.n_users))
        self._user_index = {uid: k for k, uid in enumerate(self.user_ids)}
        self._bias = self._calibrate_bias(structure)
        self._init_conversions(cfg, n_total)
        logger.info("world: %d users, %d initial + %d arriving items, calibrated=%s",
                    cfg.n_users, cfg.n_items, n_new, self.calibrated)

    # -- construction ------------------------------------------------------------
    def _load_stats(self, calibration: str):
        if calibration == "synthetic":
            return None
        try:
            return movielens_stats()
        except FileNotFoundError:
            if calibration == "movielens":
                raise
            logger.info("MovieLens-100K not installed; the world is synthetic")
            return None

    def _make_items(self, rng: np.random.Generator, stats, n_total: int):
        cfg = self.config
        n_genres = len(GENRES)
        genres = np.zeros((n_total, n_genres))
        titles: list[str] = []
        years = np.zeros(n_total, dtype=np.int64)
        quality = np.zeros(n_total)
        self._ml_index = np.full(n_total, -1)
        if stats is not None:
            # Older movies form the catalogue; newer ones arrive later (sorted by year).
            has_genre = np.flatnonzero(stats.genres.sum(axis=1) > 0)
            order = has_genre[np.lexsort((rng.random(has_genre.size), stats.years[has_genre]))]
            take = order[: min(n_total, order.size)]
            k = take.size
            self._ml_index[:k] = take
            genres[:k] = stats.genres[take]
            titles.extend(stats.titles[i] for i in take)
            years[:k] = stats.years[take]
            bias = fit_factors(cfg.dim)[2]  # fitted item bias: how much better than average it is rated
            z = (bias - bias.mean()) / max(bias.std(), 1e-12)
            quality[:k] = cfg.quality_scale * z[take]
            popularity = stats.genre_popularity
        else:
            k = 0
            popularity = np.full(n_genres, 1.0 / n_genres)
        for i in range(k, n_total):  # synthetic items beyond the real ones
            n_g = 1 + int(rng.integers(0, 3))
            chosen = rng.choice(n_genres, size=n_g, replace=False, p=popularity)
            genres[i, chosen] = 1.0
            a, b = rng.choice(len(_WORDS), size=2, replace=False)
            titles.append(f"The {_WORDS[a]} {_WORDS[b]}")
            years[i] = 1999
            quality[i] = cfg.quality_scale * rng.standard_normal()
        return genres, tuple(titles), years, quality

    def _item_id(self, i: int, stats) -> str:
        ml = self._ml_index[i]
        return f"m{ml + 1}" if ml >= 0 else f"s{i}"

    def _calibrate_bias(self, rng: np.random.Generator) -> float:
        """The logit offset ``c`` that makes the mean attraction ``base_attraction``."""
        cfg = self.config
        u = rng.integers(0, cfg.n_users, size=4000)
        i = rng.integers(0, len(self.item_ids), size=4000)
        raw = cfg.preference_scale * np.einsum("nd,nd->n", self._user_vec[u], self._item_vec[i]) + self._quality[i]
        lo, hi = -20.0, 20.0
        for _ in range(60):  # bisection: mean sigmoid is increasing in c
            mid = (lo + hi) / 2
            if np.mean(1 / (1 + np.exp(-(raw + mid)))) < cfg.base_attraction:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    def _init_conversions(self, cfg: WorldConfig, n_total: int) -> None:
        """The hidden conversion model, from its own random streams (so the click
        world and every click drawn stay what they were without it)."""
        rng = np.random.default_rng([cfg.seed, 3])
        self._conv_rng = np.random.default_rng([cfg.seed, 4])
        genre_effect = rng.standard_normal(len(self.genres))  # (G,)
        by_genre = self._item_genres @ genre_effect / np.maximum(self._item_genres.sum(axis=1), 1.0)
        by_genre = (by_genre - by_genre.mean()) / max(float(by_genre.std()), 1e-12)
        own = rng.standard_normal(n_total)
        self._conv_quality = cfg.conversion_quality_scale * (math.sqrt(0.5) * by_genre + math.sqrt(0.5) * own)
        self._conv_user = cfg.conversion_user_scale * rng.standard_normal(cfg.n_users)  # (U,)
        self._price = np.round(np.exp(math.log(30.0) + 0.6 * rng.standard_normal(n_total)), 2)  # (I,)
        self._conv_bias = -math.inf
        if cfg.conversion_rate > 0:
            u = rng.integers(0, cfg.n_users, size=4000)
            i = rng.integers(0, n_total, size=4000)
            raw = (cfg.conversion_preference_scale * np.einsum("nd,nd->n", self._user_vec[u], self._item_vec[i])
                   + self._conv_quality[i] + self._conv_user[u])
            lo, hi = -20.0, 20.0
            for _ in range(60):
                mid = (lo + hi) / 2
                if np.mean(1 / (1 + np.exp(-(raw + mid)))) < cfg.conversion_rate:
                    lo = mid
                else:
                    hi = mid
            self._conv_bias = (lo + hi) / 2

    # -- ground truth ------------------------------------------------------------
    def conversion_probability(self, user_id: str, item_ids: Sequence[str], t: float) -> np.ndarray:
        """Hidden probability that a click of the user on each item converts."""
        idx = self._indices(item_ids)
        k = self._user(user_id)
        cfg = self.config
        logit = (cfg.conversion_preference_scale * (self._item_vec[idx] @ self._user_vec_at(k, t))
                 + self._conv_quality[idx] + self._conv_user[k] + self._conv_bias)
        return 1.0 / (1.0 + np.exp(-logit))

    def price(self, item_id: str) -> float:
        """The item's price (the median value of its conversions)."""
        return float(self._price[self._indices([item_id])[0]])

    def _user_vec_at(self, k: int, t: float) -> np.ndarray:
        cfg = self.config
        if cfg.drift_scale == 0:
            return self._user_vec[k]
        angle = 2 * math.pi * (t - cfg.start_time) / cfg.drift_period_s + self._drift_phase[k]
        v = self._user_vec[k] + cfg.drift_scale * (math.sin(angle) * self._drift_a[k] + math.cos(angle) * self._drift_b[k])
        return v / max(float(np.linalg.norm(v)), 1e-12)

    def _indices(self, item_ids: Sequence[str]) -> np.ndarray:
        try:
            return np.fromiter((self._item_index[i] for i in item_ids), dtype=np.int64, count=len(item_ids))
        except KeyError as exc:
            raise ValueError(f"unknown item id {exc.args[0]!r}") from None

    def _user(self, user_id: str) -> int:
        try:
            return self._user_index[user_id]
        except KeyError:
            raise ValueError(f"unknown user id {user_id!r}") from None

    def attraction(self, user_id: str, item_ids: Sequence[str], t: float) -> np.ndarray:
        """Hidden probability that the user clicks each item once examined (no noise, no position)."""
        idx = self._indices(item_ids)
        u = self._user_vec_at(self._user(user_id), t)
        logit = self.config.preference_scale * (self._item_vec[idx] @ u) + self._quality[idx] + self._bias
        return 1.0 / (1.0 + np.exp(-logit))

    def examination(self, positions: np.ndarray | Sequence[int]) -> np.ndarray:
        """Probability that each 0-based position is looked at."""
        return 1.0 / (1.0 + np.asarray(positions, dtype=np.float64)) ** self.config.position_bias_eta

    def click_probability(self, user_id: str, item_ids: Sequence[str], t: float,
                          positions: Sequence[int] | None = None) -> np.ndarray:
        """True click probability of each item at its position (default: rank order)."""
        cfg = self.config
        pos = np.arange(len(item_ids)) if positions is None else np.asarray(positions)
        a = self.attraction(user_id, item_ids, t)
        return self.examination(pos) * ((1 - cfg.click_noise) * a + cfg.click_noise * cfg.base_attraction)

    # -- interaction -----------------------------------------------------------------
    def available(self, t: float) -> int:
        """Number of items available at ``t`` (items ``item_ids[:n]``)."""
        return int(np.searchsorted(self._arrival, t, side="right"))

    def available_items(self, t: float) -> tuple[str, ...]:
        """Ids of the items available at ``t``."""
        return self.item_ids[: self.available(t)]

    def arrivals_between(self, t0: float, t1: float) -> tuple[str, ...]:
        """Items that arrive in ``(t0, t1]`` (to register their content)."""
        lo = int(np.searchsorted(self._arrival, t0, side="right"))
        return self.item_ids[lo: self.available(t1)]

    def arrival_time(self, item_id: str) -> float:
        """When ``item_id`` joined the catalogue."""
        return float(self._arrival[self._indices([item_id])[0]])

    def next_request(self, t: float) -> Request:
        """A user asks for a ranking at event time ``t``: user, candidates, context."""
        cfg = self.config
        rng = self._req_rng
        k = min(int(np.searchsorted(self._activity_cdf, rng.random() * self._activity_cdf[-1], side="right")),
                cfg.n_users - 1)
        n_avail = self.available(t)
        n_cand = min(cfg.n_candidates, n_avail)
        fresh_lo = int(np.searchsorted(self._arrival, t - cfg.fresh_window_s, side="right"))
        n_fresh = min(int(round(cfg.fresh_share * n_cand)), n_avail - fresh_lo)
        fresh = fresh_lo + rng.choice(n_avail - fresh_lo, size=n_fresh, replace=False) if n_fresh > 0 else np.empty(0, np.int64)
        rest = rng.choice(n_avail, size=min(n_avail, n_cand + n_fresh), replace=False)
        chosen = list(dict.fromkeys([*fresh.tolist(), *rest.tolist()]))[:n_cand]
        hour = int((t % 86_400) // 3600)
        context = {"hour": f"{hour:02d}", "device": _DEVICES[int(rng.integers(0, len(_DEVICES)))]}
        self._n_requests += 1
        return Request(f"req-{cfg.seed}-{self._n_requests}", self.user_ids[k],
                       tuple(self.item_ids[i] for i in chosen), context, float(t))

    def respond(self, user_id: str, ranked_item_ids: Sequence[str], t: float) -> list[Feedback]:
        """Show ``ranked_item_ids`` (position 0 first) to the user at ``t``; what they click."""
        if len(set(ranked_item_ids)) != len(ranked_item_ids):
            raise ValueError("ranked_item_ids must not repeat an item")
        n = len(ranked_item_ids)
        if n == 0:
            return []
        p = self.click_probability(user_id, ranked_item_ids, t)
        clicked = self._resp_rng.random(n) < p
        delays = self.config.delay.sample(self._resp_rng, int(clicked.sum()))
        out, j = [], 0
        for pos, item in enumerate(ranked_item_ids):
            if clicked[pos]:
                out.append(self._maybe_convert(user_id, item, pos, float(delays[j]), t))
                j += 1
            else:
                out.append(Feedback(item, pos, False, None))
        return out

    def _maybe_convert(self, user_id: str, item_id: str, position: int, delay_s: float, t: float) -> Feedback:
        if self.config.conversion_rate <= 0:
            return Feedback(item_id, position, True, delay_s)
        rng = self._conv_rng
        p = float(self.conversion_probability(user_id, [item_id], t + delay_s)[0])
        if rng.random() >= p:
            return Feedback(item_id, position, True, delay_s)
        after = float(self.config.conversion_delay.sample(rng, 1)[0])
        value = round(self.price(item_id) * float(np.exp(0.1 * rng.standard_normal())), 2)
        return Feedback(item_id, position, True, delay_s, True, after, value)

    # -- content ------------------------------------------------------------------------
    def item_factors(self, item_ids: Sequence[str]) -> np.ndarray:
        """The hidden latent factors ``v_i`` ``(N, dim)`` of ``item_ids``: ground truth, for
        measuring how much of it a model's item representation carries."""
        return self._item_vec[self._indices(item_ids)].copy()

    def item_genres(self, item_id: str) -> tuple[str, ...]:
        """Genres of an item."""
        row = self._item_genres[self._indices([item_id])[0]]
        return tuple(g for g, on in zip(GENRES, row) if on)

    def item_content(self, item_id: str, *, image: bool = True, image_size: int = 64) -> ItemContent:
        """Text, poster and attributes of an item (what a content model may see)."""
        i = int(self._indices([item_id])[0])
        genres = self.item_genres(item_id)
        year = int(self._years[i])
        title = self._titles[i]
        text = f"{title} ({year}) | {' '.join(genres)}" if year else f"{title} | {' '.join(genres)}"
        png = None
        if image:
            from em3.data.images import render_poster  # PIL, only when images are asked for

            png = render_poster(title, year or None, list(genres), image_size)
        return ItemContent(item_id=item_id, text=text, image=png,
                           attributes={"genres": "|".join(genres), "year": str(year),
                                       "arrived_at": f"{self._arrival[i]:.3f}"})

    def catalog(self, t: float, *, image: bool = True, image_size: int = 64) -> list[ItemContent]:
        """Content of every item available at ``t`` (to fill a content store)."""
        return [self.item_content(i, image=image, image_size=image_size) for i in self.available_items(t)]
