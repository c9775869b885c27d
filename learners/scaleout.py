"""``--learners N``: N Ray learner actors on one model line (the Ray calls go
through :mod:`learners.actor`, the one module that imports ``ray``).

* ``N == 1``: one actor in single mode (:meth:`learners.worker.LearnerWorker.run`)
  publishes the line's snapshots itself.
* ``N >= 2``: N actors, learner ``i`` owning partitions ``p % N == i`` of the
  samples topic (one consumer group for committed offsets), and an aggregator
  actor. The driver (:meth:`LearnerFleet.run`) runs synchronous rounds of
  periodic parameter averaging, see :mod:`learners.aggregate`.

Works against a running cluster (``ray_address="ray://..."`` or ``"auto"``) as well
as a local runtime started on demand. A learner killed mid-round is restarted by
Ray and re-runs the round from the last published snapshot.

Example (what ``em3 demo`` does in-process)::

    fleet = LearnerFleet(settings, LearnConfig("main", ModelConfig.tiny().to_dict()), learners=2)
    fleet.start()
    thread = threading.Thread(target=fleet.run, daemon=True); thread.start()
    ...
    fleet.stop(); thread.join(); fleet.shutdown()
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable


from em3.config import Settings
from em3.retry import Backoff
from learners import actor
from learners.actor import ActorResources, start_aggregator_actor, start_learner_actor
from learners.worker import LearnConfig

__all__ = ["LearnerFleet"]

log = logging.getLogger(__name__)

# Fleets of this process that hold actors, and whether a fleet (not the caller) started Ray.
_LIVE_FLEETS: set[int] = set()
_RAY_STARTED_BY_FLEETS = False


class LearnerFleet:
    """N learners of one model line on Ray.

    Parameters
    ----------
    settings : Settings
    config : LearnConfig
    learners : int
        Number of learner actors (data-parallel when >= 2).
    ray_address : str or None
        Connect to this cluster; None starts (or reuses) a local runtime.
    resources : ActorResources
        Per-learner CPUs and GPUs.
    ray_init_kwargs : dict, optional
        Extra ``ray.init`` arguments when this fleet starts Ray.

    Attributes
    ----------
    restarts : int
        Learner deaths the driver saw (a call that failed because its actor died),
        each counted once however long Ray takes to restart it; a learner killed
        between two rounds of a fleet is back before the next call and is not seen.
    """

    def __init__(self, settings: Settings, config: LearnConfig, learners: int = 1, *,
                 ray_address: str | None = None, resources: ActorResources = ActorResources(),
                 ray_init_kwargs: dict[str, Any] | None = None) -> None:
        if not isinstance(learners, int) or learners <= 0:
            raise ValueError(f"learners must be > 0, but {learners!r} is given")
        self.settings = settings
        self.config = config
        self.n = learners
        self.ray_address = ray_address
        self.resources = resources
        self.ray_init_kwargs = dict(ray_init_kwargs or {})
        self.workers: list[Any] = []
        self.aggregator: Any = None
        self.restarts = 0
        self.rounds = 0
        self.version: int | None = None
        self._stop = threading.Event()
        self._owns_ray = False

    # ------------------------------------------------------------- lifecycle
    def start(self) -> "LearnerFleet":
        """Connect to (or start) Ray and create the actors; returns self."""
        global _RAY_STARTED_BY_FLEETS
        if not actor.ray_running():
            kwargs = {"include_dashboard": False, "log_to_driver": False, **self.ray_init_kwargs}
            actor.start_ray(self.ray_address, **kwargs)
            _RAY_STARTED_BY_FLEETS = True
        _LIVE_FLEETS.add(id(self))
        self._owns_ray = _RAY_STARTED_BY_FLEETS
        self.workers = [start_learner_actor(self.settings, self.config, rank, self.n, self.resources)
                        for rank in range(self.n)]
        if self.n > 1:
            self.aggregator = start_aggregator_actor(self.settings, self.config, self.n)
        return self

    def stop(self) -> None:
        """Ask :meth:`run` to finish the current cycle or round, publish it and return."""
        self._stop.set()
        if self.n == 1 and self.workers:
            try:
                self.workers[0].stop.remote()
            except actor.ActorDiedError:  # pragma: no cover - already dead
                pass

    def shutdown(self) -> None:
        """Kill the actors (and Ray, if a fleet started it and this is the last live one)."""
        for handle in self.workers + ([self.aggregator] if self.aggregator is not None else []):
            try:
                actor.kill(handle)
            except Exception as exc:  # noqa: BLE001 - shutting down anyway
                log.debug("kill failed: %s", exc)
        self.workers, self.aggregator = [], None
        global _RAY_STARTED_BY_FLEETS
        _LIVE_FLEETS.discard(id(self))
        # Ray started by a fleet goes down with the last live fleet of this process
        # (several model lines may share it).
        if self._owns_ray and not _LIVE_FLEETS:
            actor.stop_ray()
            _RAY_STARTED_BY_FLEETS = False
        self._owns_ray = False

    def status(self, timeout: float = 120.0) -> list[dict[str, Any]]:
        """:meth:`learners.worker.LineTrainer.status` of each learner (positions, totals),
        answered while it trains (the actors take two calls at once)."""
        return actor.get([w.status.remote() for w in self.workers], timeout=timeout)

    def pids(self) -> list[int]:
        """Process ids of the learner actors (crash tests SIGKILL them)."""
        return actor.get([w.pid.remote() for w in self.workers], timeout=120)

    # ------------------------------------------------------------------- run
    def run(self, should_stop: Callable[[], bool] | None = None, max_rounds: int | None = None) -> int | None:
        """Train until stopped (or ``max_rounds`` rounds/cycles); returns the last version."""
        stop = should_stop or self._stop.is_set
        if self.n == 1:
            return self._run_single(stop, max_rounds)
        return self._run_fleet(stop, max_rounds)

    def _run_single(self, stop: Callable[[], bool], max_rounds: int | None) -> int | None:
        worker = self.workers[0]
        while True:
            ref = worker.run.remote(None, max_rounds)
            if self._stop.is_set():  # a restarted actor has not heard the stop yet
                worker.stop.remote()
            try:
                while not actor.wait_ready(ref, timeout=0.2):
                    if stop() and not self._stop.is_set():
                        self.stop()
                self.version = actor.get(ref)
                return self.version
            except actor.ActorDiedError as exc:
                self.restarts += 1
                log.warning("learner died (%s); Ray restarts it and it resumes from the latest snapshot", exc)
                if stop() or not self._await_restart(worker, stop):
                    return self.version

    def _await_restart(self, worker: Any, stop: Callable[[], bool]) -> bool:
        """Wait until Ray has restarted ``worker`` (it answers a cheap call), polling
        with exponential backoff; False if ``stop()`` turns true first. Calls made
        while the actor is restarting fail at once, so calling ``run`` again without
        this wait would spin, and count one death many times."""
        backoff = Backoff(initial_s=0.2, max_s=2.0)
        while not stop():
            try:
                actor.get(worker.pid.remote(), timeout=60)
                return True
            except actor.RemoteError as exc:  # unavailable, or no answer yet: still restarting
                delay = backoff.next()
                log.debug("learner not back yet (%s); asking again in %.1f s", exc, delay)
                time.sleep(delay)
        return False

    def _run_fleet(self, stop: Callable[[], bool], max_rounds: int | None) -> int | None:
        agg = self.aggregator
        init = self.workers[0].state.remote()
        try:
            self.version = actor.get(agg.start.remote(init))
        except actor.RemoteError as exc:
            self._resync(exc)
        while not stop() and (max_rounds is None or self.rounds < max_rounds):
            try:
                self._round()
            except actor.RemoteError as exc:
                # Anything but a learner dying in its round (handled inside): start the
                # round again from the latest published snapshot. Learners that already
                # trained past it find their positions ahead and seek back.
                self._resync(exc)
        return self.version

    def _round(self) -> None:
        agg = self.aggregator
        version, offsets = actor.get(agg.base.remote())
        state_ref = agg.base_state.remote()
        pending = {rank: w.train_round.remote(version, state_ref, offsets) for rank, w in enumerate(self.workers)}
        results: dict[int, Any] = {}
        while pending:
            for rank, ref in list(pending.items()):
                try:
                    results[rank] = actor.get(ref)
                except actor.ActorDiedError as exc:
                    self.restarts += 1
                    log.warning("learner %d died in a round (%s); re-running its round from v%s", rank, exc, version)
                    self._await_restart(self.workers[rank], lambda: False)
                    pending[rank] = self.workers[rank].train_round.remote(version, state_ref, offsets)
                    continue
                del pending[rank]
        info = actor.get(agg.merge_and_publish.remote([results[rank] for rank in range(self.n)]))
        self.version = info["version"]
        self.rounds += 1

    def _resync(self, exc: BaseException) -> None:
        """After a failure outside a learner's round (typically the aggregator died and
        Ray restarted it empty): resume the aggregator from the line's latest snapshot."""
        self.restarts += 1
        log.warning("round failed (%s); resuming the aggregator from the latest snapshot", exc)
        deadline = time.monotonic() + 300
        while True:
            try:
                self.version = actor.get(self.aggregator.start.remote(None))
                return
            except actor.RemoteError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def aggregator_pid(self) -> int | None:
        """Process id of the aggregator actor (None with one learner)."""
        if self.aggregator is None:
            return None
        return actor.get(self.aggregator.pid.remote(), timeout=120)
