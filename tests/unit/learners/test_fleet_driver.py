"""The fleet driver's handling of a learner actor that dies (pure logic: the Ray
calls of :mod:`learners.actor` are replaced by a scripted fake; the real actors are
killed in tests/integration/test_learner_ray.py and benchmarks/recovery.py)."""
from __future__ import annotations

import pytest

from learners import scaleout


class Died(Exception):
    pass


class Unavailable(Died):  # as in Ray: "temporarily unavailable" is a kind of "died"
    pass


class _Remote:
    def __init__(self, fn):
        self.remote = fn


class ScriptedWorker:
    """``run.remote`` returns the next outcome of ``run_script`` (an exception that
    ``get`` raises, or a version); ``pid.remote`` the next of ``pid_script`` (an
    exception while Ray restarts the actor, else a pid)."""

    def __init__(self, run_script, pid_script=()):
        self.run_script, self.pid_script = list(run_script), list(pid_script)
        self.run_calls = self.pid_calls = 0
        self.stop_calls_after_run = []
        self.run = _Remote(self._run)
        self.pid = _Remote(self._pid)
        self.stop = _Remote(self._stop)

    def _run(self, *_):
        self.run_calls += 1
        return self.run_script.pop(0)

    def _pid(self):
        self.pid_calls += 1
        return self.pid_script.pop(0) if self.pid_script else 4242

    def _stop(self):
        self.stop_calls_after_run.append(self.run_calls)


@pytest.fixture
def fake_ray(monkeypatch):
    def get(ref, timeout=None):
        if isinstance(ref, BaseException):
            raise ref
        return ref

    monkeypatch.setattr(scaleout.actor, "ActorDiedError", Died)
    monkeypatch.setattr(scaleout.actor, "RemoteError", Exception)
    monkeypatch.setattr(scaleout.actor, "wait_ready", lambda ref, timeout: True)
    monkeypatch.setattr(scaleout.actor, "get", get)
    monkeypatch.setattr(scaleout.time, "sleep", lambda s: None)


def _fleet(worker) -> scaleout.LearnerFleet:
    fleet = scaleout.LearnerFleet(settings=None, config=None)  # type: ignore[arg-type]
    fleet.workers = [worker]
    return fleet


def test_one_death_is_one_restart_however_long_ray_takes_to_bring_it_back(fake_ray):
    # Ray reports the in-flight call's death as "unavailable", then refuses calls
    # until the new process is up.
    worker = ScriptedWorker([Unavailable("killed"), 12], [Unavailable("restarting")] * 7)
    fleet = _fleet(worker)
    assert fleet.run(should_stop=lambda: False) == 12
    assert fleet.restarts == 1
    assert worker.run_calls == 2 and worker.pid_calls == 8


def test_two_deaths_count_twice(fake_ray):
    worker = ScriptedWorker([Died("a"), Unavailable("b"), 3], [Unavailable("r"), Unavailable("r")])
    fleet = _fleet(worker)
    assert fleet.run(should_stop=lambda: False) == 3
    assert fleet.restarts == 2


def test_a_stop_asked_before_the_death_reaches_the_restarted_actor(fake_ray):
    worker = ScriptedWorker([Died("killed"), 5])
    fleet = _fleet(worker)
    fleet._stop.set()  # stop() was called while the first actor was running
    assert fleet._run_single(stop=lambda: False, max_rounds=None) == 5
    # The restarted actor's run is told to stop too (it never heard the first stop).
    assert worker.stop_calls_after_run == [1, 2]


def test_a_stop_while_the_actor_is_down_returns_the_last_version(fake_ray):
    worker = ScriptedWorker([Died("killed")], [Unavailable("restarting")] * 100)
    fleet = _fleet(worker)
    fleet.version = 7
    calls = iter([False, False, False, True])  # stop turns true while Ray restarts it
    assert fleet._run_single(stop=lambda: next(calls), max_rounds=None) == 7
    assert fleet.restarts == 1 and worker.run_calls == 1
