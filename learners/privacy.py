"""What a model line owes to deleted users: reset their rows in the next snapshot.

The deletion agent (:mod:`stream.erasure`) leaves each erased user's pseudonym in
``{p}privacy:pending`` until every active model line has published a snapshot
with that user's rows reset. A line's publisher (the single learner, or a
fleet's aggregator) asks :meth:`ErasureDuty.owed` before each publish, resets the
rows (:meth:`learners.online.OnlineLearner.forget_users`, or
:func:`em3.model.reset_user_rows` on a merged state), publishes, then reports the
version with :meth:`ErasureDuty.done`. Samples of erased users still in flight are
dropped by the loop (:class:`em3.privacy.TombstoneFilter`), so the rows stay reset.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable, Mapping

__all__ = ["ErasureDuty"]

log = logging.getLogger(__name__)


class ErasureDuty:
    """The erasures one model line owes (see the module docstring).

    Parameters
    ----------
    store : RedisPrivacyStore-like
        ``pending``, ``owed_by``, ``reset_done`` and ``heartbeat``.
    line : str
        The model line.
    """

    def __init__(self, store: Any, line: str) -> None:
        self.store = store
        self.line = line
        self.rows_reset = 0

    def owed(self) -> dict[str, str]:
        """``tombstone id -> pseudonym`` of the users this line has not reset yet. Asked
        every cycle, so it also tells the deletion agent this line's learner is alive
        (a heartbeat: the agent waits only for lines alive within the last 10 minutes)."""
        self.store.heartbeat(self.line)
        pending = self.store.pending()
        return self.store.owed_by(self.line, pending) if pending else {}

    def done(self, version: int, owed: Mapping[str, str], rows: Iterable[int] = ()) -> None:
        """``version`` (published) has the rows of ``owed`` reset; also a heartbeat."""
        if owed:
            self.store.reset_done(self.line, version, list(owed))
            self.rows_reset += len(set(rows))
            log.info("%s v%d: rows of %d deleted users reset", self.line, version, len(owed))
        self.store.heartbeat(self.line)
