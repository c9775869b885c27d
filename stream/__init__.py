"""The streaming data path: Kafka I/O, the impression-click join and its state.

Modules (imported lazily; only :mod:`stream.kafka` imports the Kafka client, only
:mod:`stream.state` imports redis, only :mod:`stream.app` imports faust):

``stream.join``       the pure join core (:class:`~stream.join.JoinCore`, :class:`~stream.join.JoinConfig`)
``stream.worker``     the batched Kafka loop around it (:class:`~stream.worker.JoinWorker`)
``stream.state``      per-partition join state in Redis (:class:`~stream.state.RedisJoinStateStore`)
``stream.app``        the faust app hosting the worker (:func:`~stream.app.create_app`, :func:`~stream.app.run_worker`)
``stream.dedup``      consumer-side dedup by sample id (:class:`~stream.dedup.DedupWindow`)
``stream.wire``       hot-path decode/encode (:func:`~stream.wire.encode_sample`)
``stream.synthetic``  a seeded synthetic impression/click stream
``stream.kafka``      producers, consumers, topics, dead-letter headers
``stream.cli``        ``em3 topics|generate|join|samples``
"""
from __future__ import annotations

__all__ = ["join", "worker", "state", "app", "dedup", "wire", "synthetic", "kafka", "cli"]
