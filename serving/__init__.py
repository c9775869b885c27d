"""Serving: hot-reloaded snapshots, cached item rows, A/B arms, impression logging, HTTP.

Public API (imported lazily, so ``import serving`` stays cheap)::

    from serving import ServerConfig, ServingRuntime, serve_in_thread, EM3Loader
    runtime = ServingRuntime.from_settings(settings, ServerConfig(ExperimentConfig.single_line("main")),
                                           EM3Loader())
    handle = serve_in_thread(runtime, port=0)   # handle.url, handle.stop()
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "ArmConfig",
    "ExperimentConfig",
    "bucket",
    "RankingConfig",
    "RankingService",
    "ServingState",
    "ReloaderConfig",
    "SnapshotReloader",
    "SnapshotWatcher",
    "ImpressionLogger",
    "ImpressionLoggerConfig",
    "RankingModel",
    "ModelLoader",
    "EM3Loader",
    "ServerConfig",
    "ServingRuntime",
    "create_app",
    "serve_in_thread",
    "serve_forever",
    "ServerHandle",
]

_WHERE = {
    "ArmConfig": "serving.ab",
    "ExperimentConfig": "serving.ab",
    "bucket": "serving.ab",
    "RankingConfig": "serving.ranking",
    "RankingService": "serving.ranking",
    "ServingState": "serving.ranking",
    "ReloaderConfig": "serving.reloader",
    "SnapshotReloader": "serving.reloader",
    "SnapshotWatcher": "serving.reloader",
    "ImpressionLogger": "serving.logger",
    "ImpressionLoggerConfig": "serving.logger",
    "RankingModel": "serving.scoring",
    "ModelLoader": "serving.scoring",
    "EM3Loader": "serving.scoring",
    "ServerConfig": "serving.server",
    "ServingRuntime": "serving.server",
    "create_app": "serving.app",
    "serve_in_thread": "serving.app",
    "serve_forever": "serving.app",
    "ServerHandle": "serving.app",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'serving' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
