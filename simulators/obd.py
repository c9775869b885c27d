"""The Open Bandit Dataset sample that ships inside the ``obp`` wheel.

The Open Bandit Dataset (Saito et al.) holds real ZOZOTOWN logs: which fashion
item was shown at which of three positions, whether it was clicked, and the
propensity with which the logging policy (uniform random, or Bernoulli
Thompson Sampling) showed it. The sample has 10,000 rounds per campaign
(``all``, ``men``, ``women``) and policy (``random``, ``bts``).

obp's own loader breaks on pandas 2, so this module reads the CSVs with the
``csv`` module. It imports nothing from obp: the wheel is only where the files
are found. Preprocessing follows ``obp.dataset.OpenBanditDataset.load_raw_data``:
rows sorted by timestamp, ``action = item_id``, positions mapped to ``0..2``.

:func:`bts_action_dist` reproduces ``obp.policy.BernoulliTS(is_zozotown_prior=True)
.compute_batch_action_dist`` without obp: the probability that each item lands
at each position when the production priors are sampled, by Monte Carlo.
"""
from __future__ import annotations

import csv
import importlib.util
import logging
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import numpy as np

from simulators._zozotown_prior import ZOZOTOWN_PRIOR

__all__ = [
    "CAMPAIGNS",
    "POLICIES",
    "LEN_LIST",
    "OBDLog",
    "obd_data_dir",
    "load_obd",
    "bts_action_dist",
    "zozotown_prior",
]

logger = logging.getLogger(__name__)

CAMPAIGNS = ("all", "men", "women")
POLICIES = ("random", "bts")
LEN_LIST = 3  # ZOZOTOWN shows three items per impression


@dataclass(frozen=True)
class OBDLog:
    """One campaign's logs under one policy, as numpy arrays (one row per round).

    Attributes
    ----------
    campaign, policy : str
        Which sample this is.
    n_actions : int
        Number of items in the campaign.
    len_list : int
        Positions per impression (3).
    action : numpy.ndarray of int64, shape (n_rounds,)
        Item shown (item id, ``0..n_actions-1``).
    position : numpy.ndarray of int64, shape (n_rounds,)
        Position, ``0..len_list-1`` (the CSV's 1..3, dense-ranked).
    reward : numpy.ndarray of int64, shape (n_rounds,)
        Click (1) or not (0).
    pscore : numpy.ndarray of float64, shape (n_rounds,)
        Propensity of the shown item at that position under the logging policy.
    timestamp : numpy.ndarray of float64, shape (n_rounds,)
        Event time, seconds since the Unix epoch.
    user_features : numpy.ndarray of str, shape (n_rounds, 4)
        Hashed categorical user features.
    user_item_affinity : numpy.ndarray of float64, shape (n_rounds, n_actions)
        The dataset's user-item affinity features.
    item_feature_numeric : numpy.ndarray of float64, shape (n_actions,)
        ``item_feature_0`` (a standardised price-like feature).
    item_features_categorical : numpy.ndarray of str, shape (n_actions, 3)
        Hashed categorical item features ``item_feature_1..3``.
    """

    campaign: str
    policy: str
    n_actions: int
    len_list: int
    action: np.ndarray
    position: np.ndarray
    reward: np.ndarray
    pscore: np.ndarray
    timestamp: np.ndarray
    user_features: np.ndarray
    user_item_affinity: np.ndarray
    item_feature_numeric: np.ndarray
    item_features_categorical: np.ndarray

    @property
    def n_rounds(self) -> int:
        """Number of logged rounds."""
        return int(self.action.shape[0])

    def on_policy_value(self) -> float:
        """Mean reward of the logs: the logging policy's CTR per shown item."""
        return float(self.reward.mean())


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, but {value!r} is given")


def obd_data_dir() -> Path:
    """The ``obp/dataset/obd`` folder of the installed obp wheel.

    Raises
    ------
    FileNotFoundError
        When obp is not installed (``pip install obp==0.4.1``, no import needed).
    """
    spec = importlib.util.find_spec("obp")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the Open Bandit Dataset sample ships in the obp wheel; pip install obp==0.4.1")
    path = Path(list(spec.submodule_search_locations)[0]) / "dataset" / "obd"
    if not path.is_dir():
        raise FileNotFoundError(f"no Open Bandit Dataset sample at {path}")
    return path


def _parse_time(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


@lru_cache(maxsize=8)
def _load_cached(campaign: str, policy: str, data_dir: str) -> OBDLog:
    folder = Path(data_dir) / policy / campaign
    with open(folder / "item_context.csv", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        col = {name: i for i, name in enumerate(header)}
        items = sorted(reader, key=lambda r: int(r[col["item_id"]]))
    n_actions = len(items)
    item_numeric = np.array([float(r[col["item_feature_0"]]) for r in items])
    item_cat = np.array([[r[col[f"item_feature_{k}"]] for k in (1, 2, 3)] for r in items], dtype=str)

    with open(folder / f"{campaign}.csv", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        col = {name: i for i, name in enumerate(header)}
        rows = list(reader)
    # Sort by event time (stable); the ISO strings share one format and zone.
    ts_col = col["timestamp"]
    rows.sort(key=lambda r: r[ts_col])
    user_cols = [col[f"user_feature_{k}"] for k in range(4)]
    aff_cols = [col[f"user-item_affinity_{k}"] for k in range(n_actions)]
    action = np.array([int(r[col["item_id"]]) for r in rows], dtype=np.int64)
    raw_pos = np.array([int(r[col["position"]]) for r in rows], dtype=np.int64)
    _, position = np.unique(raw_pos, return_inverse=True)  # dense rank, 0-based
    log = OBDLog(
        campaign=campaign,
        policy=policy,
        n_actions=n_actions,
        len_list=LEN_LIST,
        action=action,
        position=position.astype(np.int64),
        reward=np.array([int(r[col["click"]]) for r in rows], dtype=np.int64),
        pscore=np.array([float(r[col["propensity_score"]]) for r in rows], dtype=np.float64),
        timestamp=np.array([_parse_time(r[ts_col]) for r in rows], dtype=np.float64),
        user_features=np.array([[r[c] for c in user_cols] for r in rows], dtype=str),
        user_item_affinity=np.array([[float(r[c]) for c in aff_cols] for r in rows], dtype=np.float64),
        item_feature_numeric=item_numeric,
        item_features_categorical=item_cat,
    )
    for arr in (log.action, log.position, log.reward, log.pscore, log.timestamp, log.user_features,
                log.user_item_affinity, log.item_feature_numeric, log.item_features_categorical):
        arr.setflags(write=False)
    logger.debug("loaded OBD %s/%s: %d rounds, %d items", policy, campaign, log.n_rounds, n_actions)
    return log


def load_obd(campaign: str = "all", policy: str = "random", data_dir: str | Path | None = None) -> OBDLog:
    """Read one campaign's logs under one policy (cached; arrays are read-only).

    Parameters
    ----------
    campaign : {"all", "men", "women"}
    policy : {"random", "bts"}
    data_dir : str or Path, optional
        A folder laid out like ``obp/dataset/obd``; by default the obp wheel's.

    Returns
    -------
    OBDLog
    """
    _check_choice("campaign", campaign, CAMPAIGNS)
    _check_choice("policy", policy, POLICIES)
    root = Path(data_dir) if data_dir is not None else obd_data_dir()
    return _load_cached(campaign, policy, str(root.resolve()))


def zozotown_prior(campaign: str) -> tuple[np.ndarray, np.ndarray]:
    """The production Beta prior ``(alpha, beta)`` of the campaign, one entry per item."""
    _check_choice("campaign", campaign, CAMPAIGNS)
    prior = ZOZOTOWN_PRIOR[campaign]
    return np.array(prior["alpha"], dtype=np.float64), np.array(prior["beta"], dtype=np.float64)


def bts_action_dist(
    campaign: str = "all", n_rounds: int = 1, n_sim: int = 100_000, random_state: int = 12345,
    len_list: int = LEN_LIST, chunk_size: int = 10_000,
) -> np.ndarray:
    """Action distribution of Bernoulli TS with ZOZOTOWN's production prior.

    Each simulation draws one Beta sample per item and ranks items by it; the
    top ``len_list`` fill the positions. The result counts how often each item
    lands at each position. It uses ``numpy.random.RandomState(random_state)``
    and draws in the same order as obp's ``BernoulliTS(is_zozotown_prior=True,
    campaign=..., random_state=...).compute_batch_action_dist(n_rounds, n_sim)``,
    so both give the same array for the same seed, but vectorised (about 100x
    faster than obp's loop).

    Parameters
    ----------
    campaign : {"all", "men", "women"}
    n_rounds : int
        Rows of the result (the distribution is the same for every round).
    n_sim : int
        Monte Carlo simulations.
    random_state : int
        Seed.
    len_list : int
        Positions.
    chunk_size : int
        Simulations drawn at once (memory only; the result does not depend on it).

    Returns
    -------
    numpy.ndarray
        Shape ``(n_rounds, n_actions, len_list)``; each ``[r, :, k]`` sums to 1.
    """
    for name, value in (("n_rounds", n_rounds), ("n_sim", n_sim), ("len_list", len_list),
                        ("chunk_size", chunk_size)):
        if value <= 0:
            raise ValueError(f"{name} must be > 0, but {value} is given")
    alpha, beta = zozotown_prior(campaign)
    n_actions = alpha.shape[0]
    if len_list > n_actions:
        raise ValueError(f"len_list must be <= n_actions ({n_actions}), but {len_list} is given")
    rng = np.random.RandomState(random_state)
    counts = np.zeros((n_actions, len_list))
    done = 0
    while done < n_sim:
        b = min(chunk_size, n_sim - done)
        draws = rng.beta(alpha, beta, size=(b, n_actions))  # (b, n_actions)
        top = np.argsort(draws, axis=1)[:, ::-1][:, :len_list]  # (b, len_list)
        for pos in range(len_list):
            counts[:, pos] += np.bincount(top[:, pos], minlength=n_actions)
        done += b
    return np.tile(counts / n_sim, (n_rounds, 1, 1))
