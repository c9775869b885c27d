"""A closed-loop A/B experiment of learning arms in one process, through the real parts.

One run::

    World (simulators.world)                      simulated users, hidden truth
      -> ABRunner (simulators.ab)                 arrivals in event time, the
                                                  user-level sequential test
      -> ServingRuntime.rank (serving.server)     the experiment's router (salted
                                                  user bucket) and each arm's
                                                  served snapshot
      -> impressions, clicks (event time)
      -> JoinCore (stream.join)                   labels; positives to the history
      -> samples, encoded by em3.codec
      -> one LineTrainer per line (learners.worker): LoopConfig from the
         experiment's training-data policy (ExperimentConfig.loop_settings),
         OnlineLearner, SnapshotPublisher (full and delta snapshots)
      -> snapshot store -> the server's reloaders -> the next requests

What differs from production: Kafka and Redis are in-memory stand-ins with the
same interfaces (``learners.testing``, ``em3.stores``; the integration tests
cover the real ones), simulated user IDs are not pseudonymised, time is the simulation's event time (every
``learn_every_s`` event seconds each learner trains on the samples the join
emitted and publishes, and the server reloads at once), and everything runs in
one thread, so a run is a deterministic function of its seeds.

>>> ClosedLoopConfig(line_seeds=(0, 0)).same_seeds
True
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Mapping, Sequence

from em3 import codec
from em3.experiment import TRAINING_DATA, ArmConfig, ExperimentConfig
from em3.model import ModelConfig
from em3.privacy import Pseudonymizer
from em3.stores import InMemoryContentStore, InMemoryHistoryStore
from em3.types import Click, Conversion, Impression
from learners.loop import LoopConfig, MemorySampleSource
from learners.online import OnlineLearner
from learners.publisher import SnapshotPolicy, SnapshotPublisher
from learners.testing import InMemoryAppliedLog, InMemorySnapshotStore
from learners.worker import LearnConfig, LineTrainer
from serving.ranking import RankingConfig
from serving.scoring import EM3Loader
from serving.server import ServerConfig, ServingRuntime
from simulators.ab import ABConfig, ABReport, ABRunner
from simulators.rankers import Ranking
from simulators.world import World
from stream.join import JoinConfig, JoinCore

__all__ = ["ClosedLoopConfig", "RuntimeRanker", "ClosedLoop", "run_closed_loop"]

log = logging.getLogger(__name__)

_PARTITION = "samples:0"


@dataclass(frozen=True)
class ClosedLoopConfig:
    """The arms, their learners and the loop's cadence.

    Parameters
    ----------
    lines : tuple of str
        One model line per arm, equal traffic; each arm is named after its line.
    variant : str
        Model variant (:meth:`em3.model.ModelConfig.tiny`: the small config).
    line_seeds : tuple of int
        Per line, the seed of its model's initialisation and of its learner. Equal
        seeds (the default: ``em3 learn`` gives every line seed 0) start the arms
        from identical models.
    training_data : {"split", "pooled", "weighted"}
        The experiment's training-data policy, honoured by each learner's loop.
    learn : bool
        False: no learner trains; every arm serves its initial snapshot (frozen).
    learn_every_s : float
        Event seconds between two learner cycles (each followed by a publish and a
        reload).
    batch_size : int
        Samples per optimizer step.
    join_window_s : float
        Attribution window of the join, also the A/B metric's (a click later than
        this after its impression is a negative for learning and for the test).
    """

    lines: tuple[str, ...] = ("aa_a", "aa_b")
    variant: str = "id_only"
    line_seeds: tuple[int, ...] = (0, 0)
    training_data: str = "split"
    learn: bool = True
    learn_every_s: float = 30.0
    batch_size: int = 128
    join_window_s: float = 60.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "lines", tuple(self.lines))
        object.__setattr__(self, "line_seeds", tuple(self.line_seeds))
        if len(self.lines) < 2 or len(set(self.lines)) != len(self.lines):
            raise ValueError(f"lines must name at least 2 distinct lines, but {self.lines} are given")
        if len(self.line_seeds) != len(self.lines):
            raise ValueError(f"line_seeds must give one seed per line ({len(self.lines)}), "
                             f"but {len(self.line_seeds)} are given")
        if self.training_data not in TRAINING_DATA:
            raise ValueError(f"training_data must be one of {TRAINING_DATA}, but {self.training_data!r} is given")
        for name in ("learn_every_s", "join_window_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, but {getattr(self, name)!r} is given")
        if not isinstance(self.batch_size, int) or self.batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, but {self.batch_size!r} is given")

    @property
    def same_seeds(self) -> bool:
        return len(set(self.line_seeds)) == 1


class RuntimeRanker:
    """A :class:`simulators.rankers.Ranker` over an in-process :class:`ServingRuntime`
    (what :class:`simulators.http_ranker.HTTPRanker` is over HTTP): the server buckets
    the user, ranks with that arm's snapshot, and its answer names the arm and the
    impression ids (use with ``ABConfig(arm_from_ranking=True)``)."""

    def __init__(self, runtime: ServingRuntime, drop_context_keys: Sequence[str] = ("t",)) -> None:
        self.runtime = runtime
        self._drop = frozenset(drop_context_keys)

    def rank(self, user_id: str, candidates: Sequence[str], context: Mapping[str, str], k: int) -> Ranking:
        context = {key: v for key, v in context.items() if key not in self._drop}
        out = self.runtime.rank(user_id, list(candidates), context, k)
        return Ranking(
            item_ids=tuple(i for i, _, _, _ in out.items),
            arm=out.arm,
            propensities=tuple(p for _, _, _, p in out.items),
            model_version=out.model_version,
            impression_ids=tuple(imp for _, _, imp, _ in out.items),
            request_id=out.request_id,
            scores=tuple(s for _, s, _, _ in out.items),
        )


class ClosedLoop:
    """The parts of one run, wired (see the module docstring); :meth:`run` runs it.

    Parameters
    ----------
    world : World
    config : ClosedLoopConfig
    salt : str
        The experiment's bucketing salt (a new one reshuffles users between arms).
    """

    def __init__(self, world: World, config: ClosedLoopConfig, salt: str = "closed-loop") -> None:
        self.world = world
        self.config = config
        fraction = 1.0 / len(config.lines)
        self.experiment = ExperimentConfig(
            "closed-loop", tuple(ArmConfig(line, fraction, "line", line) for line in config.lines),
            salt=salt, training_data=config.training_data,
        )
        self.content = InMemoryContentStore(world.catalog(world.config.start_time, image=False))
        self.history = InMemoryHistoryStore()
        self.snapshots = InMemorySnapshotStore(keep=4)
        self.trainers: list[LineTrainer] = []
        for line, seed in zip(config.lines, config.line_seeds):
            model_config = ModelConfig.tiny(config.variant, seed=seed)
            learn = LearnConfig(
                line, model_config.to_dict(), device="cpu", seed=seed,
                loop=LoopConfig(batch_size=config.batch_size, max_batch_wait_s=1e-6, poll_timeout_s=1e-6,
                                **self.experiment.loop_settings(line)),
                policy=SnapshotPolicy(interval_s=None, every_steps=2**31 - 1),  # one cycle: all that is there
            )
            learner = OnlineLearner(model_config, self.content, lr=learn.lr, device="cpu", seed=seed)
            publisher = SnapshotPublisher(self.snapshots, InMemoryAppliedLog(), line, model_config.to_dict(),
                                          learn.publisher)
            trainer = LineTrainer(learner, MemorySampleSource({_PARTITION: []}), self.history, publisher, learn,
                                  history_len=model_config.history_len)
            trainer.start()  # publishes the initial weights as version 1
            self.trainers.append(trainer)
        ranking = RankingConfig(precompute_max_items=len(self.content))
        # Simulated users carry no personal data and nothing leaves the process: raw IDs
        # pass the edge unchanged, so the join's history and the server's lookups agree.
        self.runtime = ServingRuntime(
            ServerConfig(self.experiment, ranking, request_threads=None, precompute_threads=None, precompute_nice=0),
            EM3Loader(), self.snapshots, self.content, self.history, pseudonymizer=Pseudonymizer(allow_raw=True),
        )
        self.reload()
        self.join = JoinCore(JoinConfig(window_s=config.join_window_s, allowed_lateness_s=0.0,
                                        max_correction_delay_s=0.0, idle_timeout_s=None))
        self._pending: list[bytes] = []
        self._next_learn = world.config.start_time + config.learn_every_s
        self.cycles = 0
        self.samples = 0

    def reload(self) -> None:
        """Every arm's reloader loads its line's newest snapshot (as pub/sub would)."""
        for reloader in self.runtime.reloaders.values():
            reloader.check()

    def sink(self, event: Impression | Click | Conversion) -> None:
        """The A/B runner's ``event_sink``: events in event-time order go to the join."""
        if isinstance(event, Impression):
            t = event.served_at
        elif isinstance(event, Click):
            t = event.clicked_at
        else:
            t = event.converted_at
        if t >= self._next_learn:
            self.learn(t)
        if isinstance(event, Impression):
            self.join.add_impression(event)  # its label waits for a click or the window's end
        elif isinstance(event, Click):
            self.join.add_click(event)
            self._drain()  # a positive goes to the user's history at once, as the join's does
        else:
            self.join.add_conversion(event)  # the world's conversions, attributed as the join does

    def _drain(self) -> None:
        out = self.join.take_output()
        if out.history:
            self.history.append_many(out.history)
        self._pending.extend(codec.encode(s) for s in out.samples)

    def learn(self, now: float) -> None:
        """Close the windows that ended before ``now``, give every learner the new
        samples (each filters them by the policy), train one cycle each, publish, reload."""
        self.join.advance_watermark(now)  # every event before ``now`` was delivered
        self._drain()
        while self._next_learn <= now:
            self._next_learn += self.config.learn_every_s
        if not self.config.learn or not self._pending:
            return
        batch, self._pending = self._pending, []
        self.samples += len(batch)
        for trainer in self.trainers:
            source = trainer.source
            source.append(_PARTITION, batch)
            trainer.cycle(should_stop=lambda s=source: s.positions[_PARTITION] >= len(s.records[_PARTITION]))
        self.cycles += 1
        self.reload()

    def run(self, ab: ABConfig) -> ABReport:
        """The experiment: ``ab`` with the server's bucketing (``arm_from_ranking``) and this
        loop's policy and attribution window."""
        ab = dataclasses.replace(ab, arm_from_ranking=True, training_data=self.config.training_data,
                                 attribution_window_s=self.config.join_window_s)
        ranker = RuntimeRanker(self.runtime)
        return ABRunner(self.world, {line: ranker for line in self.config.lines}, ab, event_sink=self.sink).run()

    def state_difference(self) -> float:
        """Largest absolute difference between two lines' current parameters (0: identical models)."""
        import torch

        states = [t.learner.state_dict() for t in self.trainers]
        worst = 0.0
        for other in states[1:]:
            for key, value in states[0].items():
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    worst = max(worst, float((value - other[key]).abs().max()) if value.numel() else 0.0)
        return worst


def run_closed_loop(world: World, ab: ABConfig, config: ClosedLoopConfig, salt: str = "closed-loop") -> ABReport:
    """Convenience: ``ClosedLoop(world, config, salt).run(ab)``."""
    return ClosedLoop(world, config, salt).run(ab)
