"""Off-policy estimators: arrays in, numbers out.

Four estimators of the value (expected reward per round) of an evaluation
policy from logs collected by a behaviour policy:

* replay (Li, Chu, Langford and Wang 2011): keep the rounds where the
  evaluation policy would have taken the logged action; unbiased when the logs
  come from a uniformly random policy;
* IPS (inverse propensity scoring): ``mean(w * r)`` with ``w = pi_e / pi_b``;
* SNIPS (self-normalised IPS): ``sum(w * r) / sum(w)``;
* DR (doubly robust): a reward model's prediction under ``pi_e`` plus the
  IPS-weighted residual of the logged reward.

The array conventions are Open Bandit Pipeline's (``obp.ope``), so results can
be compared number for number: ``action_dist`` has shape
``(n_rounds, n_actions, len_list)``, ``position`` indexes the last axis, and
``estimated_rewards`` (DR's reward model) has the same shape as ``action_dist``.

Confidence intervals
--------------------
``ci="normal"`` (the default) is a normal approximation to the estimator's
sampling distribution: the estimate plus or minus ``z_{1-alpha/2}`` standard
errors, where the standard error is the sample standard deviation (``ddof=1``)
of the estimator's per-round influence terms over ``sqrt(n)``. For IPS and DR
the influence terms are the per-round rewards themselves; for SNIPS and replay
(ratio estimators) they are the delta-method terms ``w_i (r_i - V) / mean(w)``.
Replay with 0/1 rewards uses the Wilson score interval of the accepted
rounds' click rate instead (the normal one collapses to a point when no
accepted round was clicked). ``ci="bootstrap"`` is the percentile bootstrap of the per-round rewards with
an explicit seed, the same procedure as ``obp.utils.
estimate_confidence_interval_by_bootstrap`` (and with the same seed it draws
the same resamples).

>>> import numpy as np
>>> reward = np.array([1.0, 0.0, 1.0, 0.0])
>>> action = np.array([0, 1, 0, 1])
>>> pscore = np.full(4, 0.5)
>>> action_dist = np.zeros((4, 2, 1)); action_dist[:, 0, 0] = 1.0
>>> estimate_ips(reward, action, pscore, action_dist).estimate
1.0
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

__all__ = [
    "OPEEstimate",
    "estimate_replay",
    "estimate_ips",
    "estimate_snips",
    "estimate_dr",
    "ips_round_rewards",
    "snips_round_rewards",
    "dr_round_rewards",
    "replay_round_rewards",
    "bootstrap_ci",
    "normal_ci",
    "wilson_ci",
    "position_item_reward_model",
]

logger = logging.getLogger(__name__)

_CI_METHODS = ("normal", "bootstrap")


@dataclass(frozen=True)
class OPEEstimate:
    """One estimate of a policy value with its confidence interval.

    Attributes
    ----------
    name : str
        ``"replay"``, ``"ips"``, ``"snips"`` or ``"dr"``.
    estimate : float
        The point estimate of the policy value.
    ci_low, ci_high : float
        The ``1 - alpha`` confidence interval.
    std_err : float
        The normal-approximation standard error (reported whatever ``ci_method``).
    n : int
        Rounds used (for replay: rounds accepted).
    alpha : float
        Significance level of the interval.
    ci_method : str
        ``"normal"`` or ``"bootstrap"``.
    """

    name: str
    estimate: float
    ci_low: float
    ci_high: float
    std_err: float
    n: int
    alpha: float
    ci_method: str

    @property
    def ci(self) -> tuple[float, float]:
        """``(ci_low, ci_high)``."""
        return (self.ci_low, self.ci_high)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


# --- validation -----------------------------------------------------------------


def _check_common(
    reward: np.ndarray, action: np.ndarray, action_dist: np.ndarray, position: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    reward = np.asarray(reward, dtype=np.float64)
    action = np.asarray(action)
    action_dist = np.asarray(action_dist, dtype=np.float64)
    if action_dist.ndim != 3:
        raise ValueError(
            f"action_dist must be 3-dimensional (n_rounds, n_actions, len_list), "
            f"but shape {action_dist.shape} is given"
        )
    n_rounds, n_actions, len_list = action_dist.shape
    if reward.ndim != 1 or action.ndim != 1:
        raise ValueError(
            f"reward and action must be 1-dimensional, but shapes {reward.shape} and {action.shape} are given"
        )
    if reward.shape[0] != n_rounds or action.shape[0] != n_rounds:
        raise ValueError(
            f"reward, action and action_dist must have the same number of rounds, but "
            f"{reward.shape[0]}, {action.shape[0]} and {n_rounds} are given"
        )
    if n_rounds == 0:
        raise ValueError("n_rounds must be > 0, but 0 is given")
    if not np.issubdtype(action.dtype, np.integer):
        raise ValueError(f"action must hold integers, but dtype {action.dtype} is given")
    if action.min() < 0 or action.max() >= n_actions:
        raise ValueError(
            f"action must be in [0, {n_actions}), but values in [{action.min()}, {action.max()}] are given"
        )
    if not np.allclose(action_dist.sum(axis=1), 1.0):
        raise ValueError("action_dist must sum to 1 over actions (axis 1) for every round and position")
    if position is None:
        if len_list > 1:
            raise ValueError(f"position must be given when len_list > 1, but len_list is {len_list}")
        position = np.zeros(n_rounds, dtype=np.int64)
    else:
        position = np.asarray(position)
        if position.shape != (n_rounds,) or not np.issubdtype(position.dtype, np.integer):
            raise ValueError(
                f"position must be an integer array of shape ({n_rounds},), "
                f"but {position.dtype} of shape {position.shape} is given"
            )
        if position.min() < 0 or position.max() >= len_list:
            raise ValueError(
                f"position must be in [0, {len_list}), but values in "
                f"[{position.min()}, {position.max()}] are given"
            )
    return reward, action, action_dist, position


def _check_pscore(pscore: np.ndarray, n_rounds: int) -> np.ndarray:
    pscore = np.asarray(pscore, dtype=np.float64)
    if pscore.shape != (n_rounds,):
        raise ValueError(f"pscore must have shape ({n_rounds},), but {pscore.shape} is given")
    if not np.all(pscore > 0):
        raise ValueError(f"pscore must be > 0, but {pscore.min()} is given")
    return pscore


def _check_alpha(alpha: float) -> None:
    if not (0.0 < alpha < 1.0):
        raise ValueError(f"alpha must be in (0, 1), but {alpha} is given")


# --- per-round terms ------------------------------------------------------------


def _importance_weights(action, pscore, action_dist, position) -> np.ndarray:
    return action_dist[np.arange(action.shape[0]), action, position] / pscore  # (n,)


def ips_round_rewards(
    reward: np.ndarray, action: np.ndarray, pscore: np.ndarray, action_dist: np.ndarray,
    position: np.ndarray | None = None,
) -> np.ndarray:
    """Per-round IPS terms ``w_i r_i``; their mean is the IPS estimate.

    Returns
    -------
    numpy.ndarray
        Shape ``(n_rounds,)``.
    """
    reward, action, action_dist, position = _check_common(reward, action, action_dist, position)
    pscore = _check_pscore(pscore, reward.shape[0])
    return reward * _importance_weights(action, pscore, action_dist, position)


def snips_round_rewards(
    reward: np.ndarray, action: np.ndarray, pscore: np.ndarray, action_dist: np.ndarray,
    position: np.ndarray | None = None,
) -> np.ndarray:
    """Per-round SNIPS terms ``w_i r_i / mean(w)``; their mean is the SNIPS estimate."""
    reward, action, action_dist, position = _check_common(reward, action, action_dist, position)
    pscore = _check_pscore(pscore, reward.shape[0])
    w = _importance_weights(action, pscore, action_dist, position)
    mean_w = w.mean()
    if mean_w <= 0:
        raise ValueError("the evaluation policy gives zero probability to every logged action")
    return reward * w / mean_w


def dr_round_rewards(
    reward: np.ndarray, action: np.ndarray, pscore: np.ndarray, action_dist: np.ndarray,
    estimated_rewards: np.ndarray, position: np.ndarray | None = None,
) -> np.ndarray:
    """Per-round DR terms ``sum_a pi_e(a) q(a) + w_i (r_i - q(a_i))``.

    Parameters
    ----------
    estimated_rewards : numpy.ndarray
        Reward model predictions, shape ``(n_rounds, n_actions, len_list)``.
    """
    reward, action, action_dist, position = _check_common(reward, action, action_dist, position)
    pscore = _check_pscore(pscore, reward.shape[0])
    q = np.asarray(estimated_rewards, dtype=np.float64)
    if q.shape != action_dist.shape:
        raise ValueError(
            f"estimated_rewards must have the shape of action_dist {action_dist.shape}, but {q.shape} is given"
        )
    rows = np.arange(reward.shape[0])
    w = _importance_weights(action, pscore, action_dist, position)
    q_at_pos = q[rows, :, position]  # (n, n_actions)
    pi_at_pos = action_dist[rows, :, position]  # (n, n_actions)
    direct = (q_at_pos * pi_at_pos).sum(axis=1) / pi_at_pos.sum(axis=1)
    return direct + w * (reward - q[rows, action, position])


def replay_round_rewards(
    reward: np.ndarray, action: np.ndarray, action_dist: np.ndarray,
    position: np.ndarray | None = None, *, random_state: int | None = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Rejection-sampling replay (Li et al. 2011): which rounds are accepted.

    For each round the evaluation policy's action at the logged position is
    drawn from ``action_dist`` (deterministic when ``action_dist`` is one-hot);
    the round is accepted when it equals the logged action.

    Returns
    -------
    accepted : numpy.ndarray of bool
        Shape ``(n_rounds,)``.
    reward : numpy.ndarray of float
        The rewards, shape ``(n_rounds,)``.
    """
    reward, action, action_dist, position = _check_common(reward, action, action_dist, position)
    rows = np.arange(reward.shape[0])
    probs = action_dist[rows, :, position]  # (n, n_actions)
    if np.all((probs == 0.0) | (probs == 1.0)):
        chosen = probs.argmax(axis=1)
    else:
        rng = np.random.default_rng(random_state)
        cdf = np.cumsum(probs, axis=1)  # (n, n_actions)
        u = rng.random(reward.shape[0])[:, None] * cdf[:, -1:]
        chosen = np.minimum((cdf <= u).sum(axis=1), probs.shape[1] - 1)
    return chosen == action, reward


# --- intervals --------------------------------------------------------------------


def normal_ci(estimate: float, influence: np.ndarray, alpha: float = 0.05) -> tuple[float, float, float]:
    """Normal-approximation interval from per-round influence terms.

    Parameters
    ----------
    estimate : float
        The point estimate (the interval's centre).
    influence : numpy.ndarray
        Per-round terms whose sample standard deviation over ``sqrt(n)`` is the
        estimator's standard error.
    alpha : float
        Significance level; the interval has coverage ``1 - alpha``.

    Returns
    -------
    (low, high, std_err) : tuple of float

    >>> low, high, se = normal_ci(0.5, np.array([0.0, 1.0, 0.0, 1.0]), 0.05)
    >>> round(se, 4), round(high - 0.5, 4)
    (0.2887, 0.5658)
    """
    _check_alpha(alpha)
    n = influence.shape[0]
    se = float(np.std(influence, ddof=1) / math.sqrt(n)) if n > 1 else float("inf")
    z = NormalDist().inv_cdf(1.0 - alpha / 2.0)
    return estimate - z * se, estimate + z * se, se


def bootstrap_ci(
    samples: np.ndarray, alpha: float = 0.05, n_bootstrap_samples: int = 10_000,
    random_state: int = 0, chunk_size: int = 256,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``samples``.

    Resamples with ``numpy.random.RandomState(random_state).choice``, chunk by
    chunk; the draws are the same as one ``choice(samples, size=n)`` call per
    resample, which is what ``obp.utils.estimate_confidence_interval_by_bootstrap``
    does, so both give the same interval for the same seed.

    Returns
    -------
    (low, high) : tuple of float
    """
    _check_alpha(alpha)
    if n_bootstrap_samples <= 0:
        raise ValueError(f"n_bootstrap_samples must be > 0, but {n_bootstrap_samples} is given")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, but {chunk_size} is given")
    samples = np.asarray(samples, dtype=np.float64)
    n = samples.shape[0]
    rng = np.random.RandomState(random_state)
    means = np.empty(n_bootstrap_samples)
    done = 0
    while done < n_bootstrap_samples:
        b = min(chunk_size, n_bootstrap_samples - done)
        idx = rng.randint(0, n, size=(b, n))  # (b, n), the draws choice() makes
        means[done:done + b] = samples[idx].mean(axis=1)
        done += b
    low = float(np.percentile(means, 100 * (alpha / 2)))
    high = float(np.percentile(means, 100 * (1.0 - alpha / 2)))
    return low, high


def _finish(
    name: str, estimate: float, influence: np.ndarray, per_round: np.ndarray, alpha: float,
    ci: str, n_bootstrap_samples: int, random_state: int,
) -> OPEEstimate:
    if ci not in _CI_METHODS:
        raise ValueError(f"ci must be one of {_CI_METHODS}, but {ci!r} is given")
    low, high, se = normal_ci(estimate, influence, alpha)
    if ci == "bootstrap":
        low, high = bootstrap_ci(per_round, alpha, n_bootstrap_samples, random_state)
    return OPEEstimate(name, float(estimate), float(low), float(high), se, int(influence.shape[0]), alpha, ci)


# --- estimators -------------------------------------------------------------------


def estimate_ips(
    reward: np.ndarray, action: np.ndarray, pscore: np.ndarray, action_dist: np.ndarray,
    position: np.ndarray | None = None, *, alpha: float = 0.05, ci: str = "normal",
    n_bootstrap_samples: int = 10_000, random_state: int = 0,
) -> OPEEstimate:
    """Inverse propensity scoring.

    Parameters
    ----------
    reward, action, pscore : numpy.ndarray
        Logged rewards, actions (integers in ``[0, n_actions)``) and behaviour
        propensities, each of shape ``(n_rounds,)``.
    action_dist : numpy.ndarray
        Evaluation policy, shape ``(n_rounds, n_actions, len_list)``.
    position : numpy.ndarray, optional
        Logged positions, shape ``(n_rounds,)``; required when ``len_list > 1``.
    alpha : float
        Significance level of the interval.
    ci : {"normal", "bootstrap"}
        How the interval is computed (see the module docstring).
    n_bootstrap_samples, random_state : int
        Bootstrap size and seed (``ci="bootstrap"`` only).

    Returns
    -------
    OPEEstimate
    """
    per_round = ips_round_rewards(reward, action, pscore, action_dist, position)
    est = float(per_round.mean())
    return _finish("ips", est, per_round, per_round, alpha, ci, n_bootstrap_samples, random_state)


def estimate_snips(
    reward: np.ndarray, action: np.ndarray, pscore: np.ndarray, action_dist: np.ndarray,
    position: np.ndarray | None = None, *, alpha: float = 0.05, ci: str = "normal",
    n_bootstrap_samples: int = 10_000, random_state: int = 0,
) -> OPEEstimate:
    """Self-normalised inverse propensity scoring; parameters as :func:`estimate_ips`."""
    per_round = snips_round_rewards(reward, action, pscore, action_dist, position)
    est = float(per_round.mean())
    reward_, action_, action_dist_, position_ = _check_common(reward, action, action_dist, position)
    w = _importance_weights(action_, np.asarray(pscore, dtype=np.float64), action_dist_, position_)
    influence = w * (reward_ - est) / w.mean()
    return _finish("snips", est, influence, per_round, alpha, ci, n_bootstrap_samples, random_state)


def estimate_dr(
    reward: np.ndarray, action: np.ndarray, pscore: np.ndarray, action_dist: np.ndarray,
    estimated_rewards: np.ndarray, position: np.ndarray | None = None, *, alpha: float = 0.05,
    ci: str = "normal", n_bootstrap_samples: int = 10_000, random_state: int = 0,
) -> OPEEstimate:
    """Doubly robust estimator.

    Parameters as :func:`estimate_ips`, plus ``estimated_rewards`` (the reward
    model, shape ``(n_rounds, n_actions, len_list)``; see
    :func:`position_item_reward_model` for a simple one).
    """
    per_round = dr_round_rewards(reward, action, pscore, action_dist, estimated_rewards, position)
    est = float(per_round.mean())
    return _finish("dr", est, per_round, per_round, alpha, ci, n_bootstrap_samples, random_state)


def estimate_replay(
    reward: np.ndarray, action: np.ndarray, action_dist: np.ndarray,
    position: np.ndarray | None = None, *, alpha: float = 0.05, ci: str = "normal",
    n_bootstrap_samples: int = 10_000, random_state: int = 0,
) -> OPEEstimate:
    """Replay (Li, Chu, Langford and Wang 2011) by rejection sampling.

    Valid for logs from a uniformly random behaviour policy. For a stochastic
    ``action_dist`` the evaluation policy's choice in each round is drawn with
    ``numpy.random.default_rng(random_state)``; for a one-hot (deterministic)
    ``action_dist`` the result equals ``obp.ope.ReplayMethod``. The estimate is
    the mean reward over accepted rounds; its interval treats the accepted
    rounds' rewards as i.i.d.: Wilson for 0/1 rewards, otherwise normal
    (``ci="bootstrap"`` resamples them).

    Returns
    -------
    OPEEstimate
        ``n`` is the number of accepted rounds; the estimate is NaN (with an
        infinite interval) when no round is accepted.
    """
    accepted, reward_ = replay_round_rewards(reward, action, action_dist, position, random_state=random_state)
    kept = reward_[accepted]
    if kept.shape[0] == 0:
        logger.warning("replay accepted no round out of %d; the estimate is undefined", reward_.shape[0])
        return OPEEstimate("replay", float("nan"), -math.inf, math.inf, math.inf, 0, alpha, ci)
    est = float(kept.mean())
    result = _finish("replay", est, kept, kept, alpha, ci, n_bootstrap_samples, random_state)
    if ci == "normal" and np.all((kept == 0.0) | (kept == 1.0)):
        low, high = wilson_ci(float(kept.sum()), kept.shape[0], alpha)
        result = OPEEstimate("replay", est, low, high, result.std_err, result.n, alpha, ci)
    return result


def wilson_ci(successes: float, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Wilson score interval of a proportion (stays sensible with 0 or n successes).

    >>> low, high = wilson_ci(0, 100)
    >>> low, round(high, 4)
    (0.0, 0.037)
    """
    _check_alpha(alpha)
    if n <= 0:
        raise ValueError(f"n must be > 0, but {n} is given")
    z = NormalDist().inv_cdf(1.0 - alpha / 2.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


# --- a reward model for DR --------------------------------------------------------


def position_item_reward_model(
    reward: np.ndarray, action: np.ndarray, position: np.ndarray, n_actions: int, len_list: int,
    prior_strength: float = 10.0,
) -> np.ndarray:
    """Smoothed CTR per (action, position): a simple reward model for DR.

    Each cell is ``(clicks + m * p) / (shows + m)``, shrunk towards the
    position's mean reward ``p`` with strength ``m = prior_strength``.

    Returns
    -------
    numpy.ndarray
        Shape ``(n_actions, len_list)``; broadcast it to
        ``(n_rounds, n_actions, len_list)`` with ``numpy.broadcast_to`` for DR.
    """
    if n_actions <= 0:
        raise ValueError(f"n_actions must be > 0, but {n_actions} is given")
    if len_list <= 0:
        raise ValueError(f"len_list must be > 0, but {len_list} is given")
    if prior_strength < 0:
        raise ValueError(f"prior_strength must be >= 0, but {prior_strength} is given")
    reward = np.asarray(reward, dtype=np.float64)
    shows = np.zeros((n_actions, len_list))
    clicks = np.zeros((n_actions, len_list))
    np.add.at(shows, (action, position), 1.0)
    np.add.at(clicks, (action, position), reward)
    pos_mean = clicks.sum(axis=0) / np.maximum(shows.sum(axis=0), 1.0)  # (len_list,)
    return (clicks + prior_strength * pos_mean) / np.maximum(shows + prior_strength, 1e-12)
