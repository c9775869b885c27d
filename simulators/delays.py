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

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

__all__ = ["DelayDistribution", "FixedDelay", "ExponentialDelay", "LogNormalDelay", "make_delay"]


@runtime_checkable
class DelayDistribution(Protocol):
    """Draws ``n`` non-negative delays in seconds."""

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray: ...


@dataclass(frozen=True)
class FixedDelay:
    """Every click ``delay_s`` seconds after its impression."""

    delay_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.delay_s >= 0:
            raise ValueError(f"delay_s must be >= 0, but {self.delay_s} is given")

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.full(n, float(self.delay_s))


@dataclass(frozen=True)
class ExponentialDelay:
    """Exponential delays with mean ``mean_s``, shifted by ``min_s``."""

    mean_s: float = 60.0
    min_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.mean_s > 0:
            raise ValueError(f"mean_s must be > 0, but {self.mean_s} is given")
        if not self.min_s >= 0:
            raise ValueError(f"min_s must be >= 0, but {self.min_s} is given")

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return self.min_s + rng.exponential(self.mean_s, size=n)


@dataclass(frozen=True)
class LogNormalDelay:
    """Log-normal delays: ``median_s * exp(sigma * N(0, 1))``, capped at ``max_s``.

    Heavy-tailed like real click delays: most clicks within a minute, a few
    hours later (Chapelle 2014 reports such tails for display ads).
    """

    median_s: float = 20.0
    sigma: float = 1.2
    max_s: float = 6 * 3600.0

    def __post_init__(self) -> None:
        if not self.median_s > 0:
            raise ValueError(f"median_s must be > 0, but {self.median_s} is given")
        if not self.sigma >= 0:
            raise ValueError(f"sigma must be >= 0, but {self.sigma} is given")
        if not self.max_s > 0:
            raise ValueError(f"max_s must be > 0, but {self.max_s} is given")

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
