"""Exponential backoff with jitter, for components that ride out outages.

Every long-running component (the join, the learners, the ranking server's
store calls) retries Redis and the broker with one of these instead of exiting:
the first retry comes after ``initial_s``, each next one after twice as long, up
to ``max_s``, each delay scaled by a random factor in [0.5, 1.0] so that a fleet
that lost the same dependency does not come back in lockstep.

>>> b = Backoff(initial_s=1.0, max_s=4.0, jitter=0.0)
>>> [b.next() for _ in range(4)]
[1.0, 2.0, 4.0, 4.0]
>>> b.reset(); b.next()
1.0
"""
from __future__ import annotations

import random
import time
from typing import Callable

__all__ = ["Backoff", "Breaker"]


class Backoff:
    """Delays for consecutive failures; :meth:`reset` after a success."""

    def __init__(self, initial_s: float = 0.5, max_s: float = 30.0, jitter: float = 0.5) -> None:
        if not 0 < initial_s <= max_s:
            raise ValueError(f"need 0 < initial_s <= max_s, but {initial_s} and {max_s} are given")
        if not 0.0 <= jitter < 1.0:
            raise ValueError(f"jitter must be in [0, 1), but {jitter} is given")
        self.initial_s = initial_s
        self.max_s = max_s
        self.jitter = jitter
        self.failures = 0

    def next(self) -> float:
        """The delay before the next try (counts one more failure)."""
        delay = min(self.max_s, self.initial_s * 2.0 ** self.failures)
        self.failures += 1
        return delay * (1.0 - self.jitter * random.random())

    def reset(self) -> None:
        self.failures = 0


class Breaker:
    """A circuit breaker: after a dependency fails, skip it for a cool-down.

    The ranking server asks Redis for a user's history on every request. When
    Redis is down, each try would cost a full socket timeout on the request path;
    with a breaker, one request pays it and the next ones skip the call (rank
    without history) until the cool-down ends, which grows like :class:`Backoff`
    while failures continue.

    >>> t = [0.0]
    >>> b = Breaker(cooldown_s=1.0, max_cooldown_s=4.0, clock=lambda: t[0])
    >>> b.allow(), b.failure(), b.allow()
    (True, None, False)
    >>> t[0] = 1.5; b.allow()
    True
    >>> b.success(); b.open
    False
    """

    def __init__(self, cooldown_s: float = 1.0, max_cooldown_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._backoff = Backoff(cooldown_s, max_cooldown_s, jitter=0.0)
        self._clock = clock
        self._open_until = 0.0
        self.trips = 0

    def allow(self) -> bool:
        """True when the dependency may be tried now."""
        return self._clock() >= self._open_until

    @property
    def open(self) -> bool:
        return not self.allow()

    def failure(self) -> None:
        self.trips += 1
        self._open_until = self._clock() + self._backoff.next()

    def success(self) -> None:
        self._backoff.reset()
        self._open_until = 0.0
