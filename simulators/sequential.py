"""Always-valid sequential tests for the difference of two means (or CTRs).

The mixture sequential probability ratio test (mSPRT) of Johari, Pekelis and
Walsh ("Always valid inference", 2017/2022) compares arm B with arm A after
every observation and still keeps the false-positive rate at ``alpha``, however
often the experimenter looks and whenever they stop.

With ``n_a`` and ``n_b`` observations, the difference of sample means
``d = mean_b - mean_a`` is approximately ``N(theta, V)`` with the plug-in
variance ``V = s_a^2 / n_a + s_b^2 / n_b`` (for proportions ``s^2 = p (1 - p)``).
Mixing the likelihood ratio against ``H0: theta = theta0`` over
``theta ~ N(theta0, tau2)`` gives

``Lambda = sqrt(V / (V + tau2)) * exp(tau2 (d - theta0)^2 / (2 V (V + tau2)))``.

The always-valid p-value is the running minimum of ``min(1, 1 / Lambda)``; the
test rejects once ``Lambda >= 1 / alpha``. Inverting the test gives the
always-valid confidence sequence ``d +/- sqrt(2 V (V + tau2) / tau2 *
log(sqrt((V + tau2) / V) / alpha))``, intersected over time.

``tau2`` (the mixing variance) sets where the test has most power: effects with
``theta^2`` near ``tau2`` are found fastest. Choose it from the size of the
effects you hope to detect (for CTR differences of about 0.01, ``tau2 = 1e-4``).
The normal approximation needs some data: nothing is rejected before each arm
has ``min_samples`` observations and a positive variance.

**Unit of analysis.** Users are randomised, and one user's requests are
correlated, so treating each request as an independent trial makes the interval
too narrow and breaks the false-positive promise. :class:`RatioStats` keeps the
per-user sufficient statistics of a ratio metric (CTR = clicks / impressions,
both summed per user) and :func:`delta_ratio` gives its variance by the delta
method (Deng et al., "Applying the Delta Method in Metric Analytics", 2018):
with per-user clicks ``C`` and impressions ``I`` over ``n`` users,
``R = sum C / sum I`` and ``Var(R) ~ (Var C - 2 R Cov(C, I) + R^2 Var I) / (n mean(I)^2)``.
:meth:`SequentialTest.update_estimates` runs the same mSPRT on those estimates,
and :func:`fixed_horizon` is the one-look readout on them.

For comparison, :func:`z_test` is the fixed-horizon two-proportion z-test,
valid only when looked at once; :func:`peeking_z_test_rejects` shows how
looking after every batch inflates its false-positive rate.

>>> r = msprt(n_a=10_000, sum_a=500, n_b=10_000, sum_b=650, tau2=1e-4)
>>> r.reject, round(r.diff, 3)
(True, 0.015)
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

__all__ = [
    "MSPRTResult",
    "msprt",
    "msprt_estimates",
    "msprt_log_lr",
    "msprt_half_width",
    "SequentialTest",
    "msprt_path",
    "z_test",
    "peeking_z_test_rejects",
    "DEFAULT_TAU2",
    "RatioStats",
    "delta_ratio",
    "fixed_horizon",
]

DEFAULT_TAU2 = 1e-4


def _check(alpha: float, tau2: float, min_samples: int) -> None:
    if not (0.0 < alpha < 1.0):
        raise ValueError(f"alpha must be in (0, 1), but {alpha} is given")
    if not tau2 > 0:
        raise ValueError(f"tau2 must be > 0, but {tau2} is given")
    if min_samples < 1:
        raise ValueError(f"min_samples must be >= 1, but {min_samples} is given")


def _moments(n, s, q):
    """Mean and plug-in variance of the mean from count, sum, sum of squares."""
    n = np.asarray(n, dtype=np.float64)
    safe_n = np.maximum(n, 1.0)
    mean = np.asarray(s, dtype=np.float64) / safe_n
    var = np.maximum(np.asarray(q, dtype=np.float64) / safe_n - mean**2, 0.0)
    return mean, var / safe_n


def msprt_log_lr(diff, var, tau2: float, theta0: float = 0.0):
    """``log Lambda`` of the normal-mixture SPRT (elementwise on arrays).

    Parameters
    ----------
    diff : float or numpy.ndarray
        Observed difference of means.
    var : float or numpy.ndarray
        Its variance ``V`` (must be > 0 where it is used).
    tau2 : float
        Mixing variance.
    theta0 : float
        The null difference.
    """
    diff = np.asarray(diff, dtype=np.float64)
    var = np.asarray(var, dtype=np.float64)
    return 0.5 * np.log(var / (var + tau2)) + tau2 * (diff - theta0) ** 2 / (2.0 * var * (var + tau2))


def msprt_half_width(var, tau2: float, alpha: float):
    """Half-width of the (not yet intersected) always-valid interval at variance ``var``."""
    var = np.asarray(var, dtype=np.float64)
    return np.sqrt(2.0 * var * (var + tau2) / tau2 * np.log(np.sqrt((var + tau2) / var) / alpha))


@dataclass(frozen=True)
class MSPRTResult:
    """The state of an mSPRT after some observations.

    Attributes
    ----------
    n_a, n_b : int
        Observations per arm.
    mean_a, mean_b : float
        Arm means (CTRs).
    diff : float
        ``mean_b - mean_a``.
    log_lr : float
        ``log Lambda`` now (0 before the burn-in).
    p_value : float
        Always-valid p-value (running minimum when from :class:`SequentialTest`).
    ci_low, ci_high : float
        Always-valid confidence interval for ``theta`` (running intersection
        when from :class:`SequentialTest`).
    reject : bool
        Whether ``p_value <= alpha``.
    alpha, tau2 : float
        Settings.
    """

    n_a: int
    n_b: int
    mean_a: float
    mean_b: float
    diff: float
    log_lr: float
    p_value: float
    ci_low: float
    ci_high: float
    reject: bool
    alpha: float
    tau2: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def delta_ratio(n: float, s_c: float, s_i: float, q_c: float, q_i: float, q_ci: float) -> tuple[float, float]:
    """``(R, Var R)`` of the ratio ``sum C / sum I`` over ``n`` independent units, from
    the sums ``s_*``, the sums of squares ``q_c``, ``q_i`` and of products ``q_ci``.

    >>> r, v = delta_ratio(4, 2, 8, 2, 16, 4)   # 4 users, 2 impressions each, half of them clicked once
    >>> r, round(v, 6)
    (0.25, 0.020833)
    """
    if n < 2 or s_i <= 0:
        return (s_c / s_i if s_i > 0 else math.nan), math.inf
    r = s_c / s_i
    mean_c, mean_i = s_c / n, s_i / n
    correction = n / (n - 1)
    var_c = max(q_c / n - mean_c**2, 0.0) * correction
    var_i = max(q_i / n - mean_i**2, 0.0) * correction
    cov = (q_ci / n - mean_c * mean_i) * correction
    return r, max(var_c - 2 * r * cov + r * r * var_i, 0.0) / (n * mean_i**2)


class RatioStats:
    """Per-unit (user) statistics of a ratio metric, updated in O(1) per event.

    >>> st = RatioStats()
    >>> for user, shown, clicks in [("a", 2, 1), ("b", 2, 0), ("a", 2, 1), ("c", 4, 1)]:
    ...     st.add(user, shown, clicks)
    >>> st.units, st.impressions, st.clicks
    (3, 10, 3)
    >>> round(st.estimate()[0], 2)
    0.3
    """

    def __init__(self) -> None:
        self._per_unit: dict[str, tuple[int, int]] = {}
        self.s_c = self.s_i = self.q_c = self.q_i = self.q_ci = 0.0

    def add(self, unit: str, impressions: int, clicks: int) -> None:
        c0, i0 = self._per_unit.get(unit, (0, 0))
        c1, i1 = c0 + clicks, i0 + impressions
        self._per_unit[unit] = (c1, i1)
        self.s_c += c1 - c0
        self.s_i += i1 - i0
        self.q_c += c1 * c1 - c0 * c0
        self.q_i += i1 * i1 - i0 * i0
        self.q_ci += c1 * i1 - c0 * i0

    @property
    def units(self) -> int:
        return len(self._per_unit)

    @property
    def impressions(self) -> int:
        return int(self.s_i)

    @property
    def clicks(self) -> int:
        return int(self.s_c)

    def estimate(self) -> tuple[float, float]:
        """``(CTR, variance of the CTR)`` by the delta method over units."""
        return delta_ratio(self.units, self.s_c, self.s_i, self.q_c, self.q_i, self.q_ci)


def fixed_horizon(mean_a: float, var_a: float, mean_b: float, var_b: float, alpha: float = 0.05) -> dict[str, float]:
    """The one-look readout of ``mean_b - mean_a`` (normal, two-sided): diff, interval, p-value."""
    diff, var = mean_b - mean_a, var_a + var_b
    if not (var > 0 and math.isfinite(var)):
        return {"diff": diff, "ci_low": -math.inf, "ci_high": math.inf, "p_value": 1.0}
    se = math.sqrt(var)
    z = NormalDist().inv_cdf(1 - alpha / 2)
    p = 2 * (1 - NormalDist().cdf(abs(diff) / se))
    return {"diff": diff, "ci_low": diff - z * se, "ci_high": diff + z * se, "p_value": p}


def msprt(
    n_a: int, sum_a: float, n_b: int, sum_b: float, *, sumsq_a: float | None = None,
    sumsq_b: float | None = None, tau2: float = DEFAULT_TAU2, alpha: float = 0.05,
    theta0: float = 0.0, min_samples: int = 100,
) -> MSPRTResult:
    """The mSPRT at one look, from sufficient statistics (no running min).

    ``sumsq_*`` default to ``sum_*``, which is right for 0/1 outcomes (CTR).
    """
    _check(alpha, tau2, min_samples)
    sumsq_a = sum_a if sumsq_a is None else sumsq_a
    sumsq_b = sum_b if sumsq_b is None else sumsq_b
    mean_a, var_a = _moments(n_a, sum_a, sumsq_a)
    mean_b, var_b = _moments(n_b, sum_b, sumsq_b)
    return msprt_estimates(n_a, float(mean_a), float(var_a), n_b, float(mean_b), float(var_b), tau2=tau2,
                           alpha=alpha, theta0=theta0, min_samples=min_samples)


def msprt_estimates(
    n_a: int, mean_a: float, var_a: float, n_b: int, mean_b: float, var_b: float, *,
    tau2: float = DEFAULT_TAU2, alpha: float = 0.05, theta0: float = 0.0, min_samples: int = 100,
) -> MSPRTResult:
    """The mSPRT at one look from each arm's estimate and its variance (``var_*`` is the
    variance of the estimate, e.g. from :func:`delta_ratio`); ``n_*`` are units."""
    diff = float(mean_b - mean_a)
    var = float(var_a + var_b)
    ready = min(n_a, n_b) >= min_samples and var > 0 and math.isfinite(var)
    if not ready:
        return MSPRTResult(n_a, n_b, float(mean_a), float(mean_b), diff, 0.0, 1.0, -math.inf, math.inf,
                           False, alpha, tau2)
    log_lr = float(msprt_log_lr(diff, var, tau2, theta0))
    p = min(1.0, math.exp(-log_lr))
    hw = float(msprt_half_width(var, tau2, alpha))
    return MSPRTResult(n_a, n_b, float(mean_a), float(mean_b), diff, log_lr, p, diff - hw, diff + hw,
                       p <= alpha, alpha, tau2)


class SequentialTest:
    """A running mSPRT: feed it cumulative statistics at every look.

    Keeps the running minimum of the p-value and the running intersection of
    the confidence intervals, which is what makes them always valid. Once it
    rejects it stays rejected (``stopped_at`` records the look).

    Parameters
    ----------
    tau2 : float
        Mixing variance (> 0).
    alpha : float
        Significance level.
    theta0 : float
        Null difference ``mean_b - mean_a``.
    min_samples : int
        Per-arm observations before the test may reject.
    """

    def __init__(self, tau2: float = DEFAULT_TAU2, alpha: float = 0.05, theta0: float = 0.0,
                 min_samples: int = 100) -> None:
        _check(alpha, tau2, min_samples)
        self.tau2 = tau2
        self.alpha = alpha
        self.theta0 = theta0
        self.min_samples = min_samples
        self.p_value = 1.0
        self.ci = (-math.inf, math.inf)
        self.looks = 0
        self.stopped_at: int | None = None
        self.last: MSPRTResult | None = None

    def update(self, n_a: int, sum_a: float, n_b: int, sum_b: float, sumsq_a: float | None = None,
               sumsq_b: float | None = None) -> MSPRTResult:
        """Look at cumulative statistics of i.i.d. observations; returns the always-valid state."""
        return self._record(msprt(n_a, sum_a, n_b, sum_b, sumsq_a=sumsq_a, sumsq_b=sumsq_b, tau2=self.tau2,
                                  alpha=self.alpha, theta0=self.theta0, min_samples=self.min_samples))

    def update_estimates(self, n_a: int, mean_a: float, var_a: float, n_b: int, mean_b: float,
                         var_b: float) -> MSPRTResult:
        """Look at each arm's estimate and its variance (user-level: :class:`RatioStats`)."""
        return self._record(msprt_estimates(n_a, mean_a, var_a, n_b, mean_b, var_b, tau2=self.tau2,
                                            alpha=self.alpha, theta0=self.theta0, min_samples=self.min_samples))

    def _record(self, now: MSPRTResult) -> MSPRTResult:
        self.looks += 1
        self.p_value = min(self.p_value, now.p_value)
        self.ci = (max(self.ci[0], now.ci_low), min(self.ci[1], now.ci_high))
        reject = self.p_value <= self.alpha
        if reject and self.stopped_at is None:
            self.stopped_at = self.looks
        self.last = MSPRTResult(now.n_a, now.n_b, now.mean_a, now.mean_b, now.diff, now.log_lr,
                                self.p_value, self.ci[0], self.ci[1], reject, self.alpha, self.tau2)
        return self.last


def msprt_path(
    n_a: np.ndarray, sum_a: np.ndarray, n_b: np.ndarray, sum_b: np.ndarray, *,
    sumsq_a: np.ndarray | None = None, sumsq_b: np.ndarray | None = None, tau2: float = DEFAULT_TAU2,
    alpha: float = 0.05, theta0: float = 0.0, min_samples: int = 100,
) -> dict[str, np.ndarray]:
    """Vectorised mSPRT along the last axis (looks), for many runs at once.

    Parameters
    ----------
    n_a, sum_a, n_b, sum_b : numpy.ndarray
        Cumulative counts and sums at each look, shape ``(..., T)``.
    sumsq_a, sumsq_b : numpy.ndarray, optional
        Cumulative sums of squares (default: the sums, for 0/1 outcomes).

    Returns
    -------
    dict of numpy.ndarray
        ``log_lr``, ``p_value`` (running min), ``ci_low``/``ci_high``
        (running intersection), ``reject`` (bool, by the last look), each
        ``(..., T)`` except ``reject`` which is ``(...)``, and ``stop_index``
        (first look that rejects, -1 if none).
    """
    _check(alpha, tau2, min_samples)
    sumsq_a = sum_a if sumsq_a is None else sumsq_a
    sumsq_b = sum_b if sumsq_b is None else sumsq_b
    mean_a, var_a = _moments(n_a, sum_a, sumsq_a)
    mean_b, var_b = _moments(n_b, sum_b, sumsq_b)
    diff = mean_b - mean_a
    var = var_a + var_b
    ready = (np.minimum(n_a, n_b) >= min_samples) & (var > 0)
    safe_var = np.where(ready, var, 1.0)
    log_lr = np.where(ready, msprt_log_lr(diff, safe_var, tau2, theta0), 0.0)
    p_now = np.minimum(1.0, np.exp(-log_lr))
    hw = np.where(ready, msprt_half_width(safe_var, tau2, alpha), np.inf)
    p_value = np.minimum.accumulate(p_now, axis=-1)
    ci_low = np.maximum.accumulate(diff - hw, axis=-1)
    ci_high = np.minimum.accumulate(diff + hw, axis=-1)
    rejected = p_value <= alpha
    any_reject = rejected.any(axis=-1)
    stop_index = np.where(any_reject, rejected.argmax(axis=-1), -1)
    return {"log_lr": log_lr, "p_value": p_value, "ci_low": ci_low, "ci_high": ci_high,
            "reject": any_reject, "stop_index": stop_index}


def _z_stat(n_a, sum_a, n_b, sum_b):
    n_a = np.asarray(n_a, dtype=np.float64)
    n_b = np.asarray(n_b, dtype=np.float64)
    s_a = np.asarray(sum_a, dtype=np.float64)
    s_b = np.asarray(sum_b, dtype=np.float64)
    safe_a = np.maximum(n_a, 1.0)
    safe_b = np.maximum(n_b, 1.0)
    pooled = (s_a + s_b) / (safe_a + safe_b)
    se = np.sqrt(pooled * (1 - pooled) * (1 / safe_a + 1 / safe_b))
    valid = (n_a > 0) & (n_b > 0) & (se > 0)
    z = np.where(valid, (s_b / safe_b - s_a / safe_a) / np.where(valid, se, 1.0), 0.0)
    return z, valid


_erfc = np.frompyfunc(math.erfc, 1, 1)


def z_test(n_a, sum_a, n_b, sum_b):
    """Two-sided fixed-horizon two-proportion z-test (pooled variance).

    Valid only when the sample size is fixed in advance and the test is run
    once. Works elementwise on arrays; returns p-values (1 where undefined).

    >>> round(float(z_test(1000, 100, 1000, 130)), 4)
    0.0355
    """
    z, valid = _z_stat(n_a, sum_a, n_b, sum_b)
    p = np.asarray(_erfc(np.abs(z) / math.sqrt(2.0)), dtype=np.float64)
    return np.where(valid, p, 1.0)


def peeking_z_test_rejects(n_a, sum_a, n_b, sum_b, alpha: float = 0.05) -> np.ndarray:
    """Whether a z-test looked at after every look (last axis) ever rejects.

    This is the naive practice the mSPRT replaces; in A/A runs its
    false-positive rate climbs far above ``alpha`` as looks accumulate.
    """
    if not (0.0 < alpha < 1.0):
        raise ValueError(f"alpha must be in (0, 1), but {alpha} is given")
    z, valid = _z_stat(n_a, sum_a, n_b, sum_b)
    z_crit = NormalDist().inv_cdf(1.0 - alpha / 2.0)
    return (valid & (np.abs(z) >= z_crit)).any(axis=-1)
