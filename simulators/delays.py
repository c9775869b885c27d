"""Impression-to-click delay distributions, seeded.

Delayed feedback (Chapelle 2014) is what makes the stream join hard: a click
can arrive seconds or hours after its impression. The world and the log
adapters draw delays from one of these; each ``sample`` takes an explicit
``numpy.random.Generator`` so runs are reproducible.

>>> import numpy as np
>>> d = LogNormalDelay(median_s=30.0, sigma=1.0)
>>> x = d.sample(np.random.default_rng(0), 10_000)
>>> bool(25.0 < float(np.median(x)) < 35.0)
True
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from em3.constraints import NonNegFloat, PositiveFloat, config_class

__all__ = ["DelayDistribution", "FixedDelay", "ExponentialDelay", "LogNormalDelay", "make_delay"]


@runtime_checkable
class DelayDistribution(Protocol):
    """Draws ``n`` non-negative delays in seconds."""

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray: ...


@config_class
class FixedDelay:
    """Every click ``delay_s`` seconds after its impression."""

    delay_s: NonNegFloat = 0.0

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.full(n, float(self.delay_s))


@config_class
class ExponentialDelay:
    """Exponential delays with mean ``mean_s``, shifted by ``min_s``."""

    mean_s: PositiveFloat = 60.0
    min_s: NonNegFloat = 0.0

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return self.min_s + rng.exponential(self.mean_s, size=n)


@config_class
class LogNormalDelay:
    """Log-normal delays: ``median_s * exp(sigma * N(0, 1))``, capped at ``max_s``.

    Heavy-tailed like real click delays: most clicks within a minute, a few
    hours later (Chapelle 2014 reports such tails for display ads).
    """

    median_s: PositiveFloat = 20.0
    sigma: NonNegFloat = 1.2
    max_s: PositiveFloat = 6 * 3600.0

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.minimum(self.median_s * np.exp(self.sigma * rng.standard_normal(n)), self.max_s)


def make_delay(spec: str) -> DelayDistribution:
    """Parse ``"fixed:5"``, ``"exp:60"`` or ``"lognormal:20,1.2"`` (CLI flags).

    >>> make_delay("exp:30")
    ExponentialDelay(mean_s=30.0, min_s=0.0)
    """
    kind, _, args = spec.partition(":")
    values = [float(a) for a in args.split(",") if a.strip()] if args else []
    if kind == "fixed":
        return FixedDelay(*values)
    if kind in ("exp", "exponential"):
        return ExponentialDelay(*values)
    if kind in ("lognormal", "lognorm"):
        return LogNormalDelay(*values)
    raise ValueError(f"delay spec must be fixed:S, exp:MEAN or lognormal:MEDIAN[,SIGMA], but {spec!r} is given")
