"""Learners: the pure :class:`OnlineLearner` (``learn_batch`` / ``score`` /
``state_dict``); the Ray actor wrapper and snapshot publisher build on it."""
from learners.online import OnlineLearner, resolve_device

__all__ = ["OnlineLearner", "resolve_device"]
