"""Thin Ray actors around :class:`learners.worker.LearnerWorker` and
:class:`learners.aggregate.Aggregator`, and the few Ray runtime calls the fleet
driver (:mod:`learners.scaleout`) and the demo make: the one module that imports ``ray``.

The logic lives in the plain classes; this module only decides resources and
fault tolerance: learners are restarted by Ray after a crash (``max_restarts=-1``)
with their constructor arguments, and an in-flight call on a dead learner fails
(``max_task_retries=0``) so the caller decides what to re-run. Learners are
threaded actors (``max_concurrency=2``) so ``stop``/``status``/``pid`` answer
while ``run`` or ``train_round`` is busy. A learner asks for ``num_gpus`` GPUs;
``device="auto"`` then takes the GPU Ray assigned, or the CPU when it assigned none.
"""
from __future__ import annotations

from typing import Any

import ray
from ray.exceptions import RayActorError, RayError

from em3.config import Settings
from em3.constraints import NonNegFloat, config_class
from learners.aggregate import RedisAggregator
from learners.worker import LearnConfig, LearnerWorker

__all__ = [
    "ActorResources", "start_learner_actor", "start_aggregator_actor", "ActorDiedError", "RemoteError",
    "ray_running", "start_ray", "stop_ray", "get", "wait_ready", "kill",
]


@config_class
class ActorResources:
    """Ray resources of one learner actor.

    Parameters
    ----------
    num_cpus : float
        CPUs reserved per learner (torch uses as many threads).
    num_gpus : float
        GPUs per learner (0: CPU only).
    """

    num_cpus: NonNegFloat = 1.0
    num_gpus: NonNegFloat = 0.0


def start_learner_actor(settings: Settings, config: LearnConfig, rank: int = 0, world: int = 1,
                        resources: ActorResources = ActorResources(), name: str | None = None):
    """A Ray actor handle running ``LearnerWorker(settings, config, rank, world)``."""
    cls = ray.remote(LearnerWorker).options(
        num_cpus=resources.num_cpus,
        num_gpus=resources.num_gpus,
        max_restarts=-1,
        max_task_retries=0,
        max_concurrency=2,
        name=name,
    )
    return cls.remote(settings, config, rank, world)


def start_aggregator_actor(settings: Settings, config: LearnConfig, world: int, name: str | None = None):
    """A Ray actor handle running ``RedisAggregator(settings, config, world)`` (no CPU reserved)."""
    cls = ray.remote(RedisAggregator).options(num_cpus=0, max_restarts=-1, max_task_retries=0, name=name)
    return cls.remote(settings, config, world)


# -- the Ray runtime, for the fleet driver and the demo (this is the one module of
# the project that imports ray; tests/unit/test_layers.py checks it) ---------------

#: A remote call whose actor died (killed, or its process crashed).
ActorDiedError = RayActorError
#: Any error raised by a remote call (the actor's own exception, wrapped).
RemoteError = RayError


def ray_running() -> bool:
    return ray.is_initialized()


def start_ray(address: str | None = None, **kwargs: Any) -> None:
    """``ray.init`` (a new local runtime, or a cluster at ``address``)."""
    ray.init(address=address, **kwargs)


def stop_ray() -> None:
    ray.shutdown()


def get(refs: Any, timeout: float | None = None) -> Any:
    """The results of remote calls (``ray.get``)."""
    return ray.get(refs, timeout=timeout)


def wait_ready(ref: Any, timeout: float) -> bool:
    """True once the remote call ``ref`` has finished (waits at most ``timeout``)."""
    ready, _ = ray.wait([ref], timeout=timeout)
    return bool(ready)


def kill(handle: Any) -> None:
    """Kill an actor for good (no restart)."""
    ray.kill(handle, no_restart=True)

