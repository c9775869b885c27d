"""Learners: the pure :class:`OnlineLearner` (``learn_batch`` / ``score`` /
``state_dict``); the Ray actor wrapper and snapshot publisher build on it."""
from learners.online import OnlineLearner, resolve_device

__all__ = ["OnlineLearner", "resolve_device"]

# --- learner machinery: loop, snapshots, dedup, workers, fleet (Ray parts imported lazily) ---
from learners.aggregate import Aggregator, average_deltas
from stream.dedup import DedupWindow
from learners.loop import CycleResult, LearnerLoop, LoopConfig, MemorySampleSource, SampleSource
from learners.publisher import LineMovedError, PublisherConfig, ResumePoint, SnapshotPolicy, SnapshotPublisher
from learners.worker import LearnConfig, LearnerWorker, LineTrainer

__all__ += [
    "Aggregator", "average_deltas", "DedupWindow", "CycleResult", "LearnerLoop", "LoopConfig",
    "MemorySampleSource", "SampleSource", "LineMovedError", "PublisherConfig", "ResumePoint",
    "SnapshotPolicy", "SnapshotPublisher", "LearnConfig", "LearnerWorker", "LineTrainer",
    "LearnerFleet", "ActorResources",
]


def __getattr__(name: str):
    # Ray is imported only when the fleet is used (only actor.py imports ray).
    if name == "LearnerFleet":
        from learners.scaleout import LearnerFleet

        return LearnerFleet
    if name == "ActorResources":
        from learners.actor import ActorResources

        return ActorResources
    raise AttributeError(f"module 'learners' has no attribute {name!r}")
