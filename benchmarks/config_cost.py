"""What the declared config classes cost: construction time, and how many configs the
hot paths build (per event in the join, per request in ranking and A/B routing, per
simulated request in the A/B runner).

    python3 benchmarks/config_cost.py [--repeat 2000]

Construction is timed (microseconds, best of three) for every config class with
its defaults (required fields filled with small valid values), for
``ModelConfig.from_dict`` (what a server and a fleet's averaging round run per
snapshot) and ``load_settings`` (once per process); the import of the CLI is timed in
fresh interpreters (milliseconds). The counts come from wrapping every config class's
``__init__`` while the hot loops run. The script imports whatever
``PYTHONPATH`` points at (this checkout when unset), so the same command measures
another checkout, e.g. the hand-written checks before: ``PYTHONPATH=/path/to/old
python3 benchmarks/config_cost.py``. The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

# benchmarks/serving.py would shadow the serving package; PYTHONPATH, if set, picks the checkout.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
if not os.environ.get("PYTHONPATH"):
    sys.path.insert(0, str(_HERE.parent))

# (module, class, required kwargs) of every config class.
CLASSES: list[tuple[str, str, Callable[[], dict[str, Any]]]] = [
    ("em3.model.config", "ModelConfig", dict),
    ("em3.experiment", "ArmConfig", lambda: {"name": "a", "fraction": 1.0, "model_line": "m"}),
    ("em3.config", "KafkaSettings", lambda: {"bootstrap_servers": "127.0.0.1:9092"}),
    ("em3.config", "RedisSettings", lambda: {"url": "redis://127.0.0.1:6379/0"}),
    ("stream.join", "JoinConfig", dict),
    ("stream.worker", "WorkerConfig", dict),
    ("stream.app", "AppConfig", dict),
    ("stream.synthetic", "StreamSpec", dict),
    ("learners.loop", "LoopConfig", dict),
    ("learners.publisher", "SnapshotPolicy", dict),
    ("learners.publisher", "PublisherConfig", dict),
    ("learners.worker", "LearnConfig", lambda: {"model_line": "m", "model_config": {}}),
    ("serving.ranking", "RankingConfig", dict),
    ("serving.reloader", "ReloaderConfig", lambda: {"model_line": "m"}),
    ("serving.logger", "ImpressionLoggerConfig", lambda: {"topic": "t"}),
    ("serving.toy", "ToyConfig", dict),
    ("simulators.delays", "LogNormalDelay", dict),
    ("simulators.world", "WorldConfig", dict),
    ("simulators.replay", "ReplayConfig", dict),
    ("simulators.ab", "ABConfig", dict),
]


def _class(module: str, name: str) -> type:
    return getattr(importlib.import_module(module), name)


def _time_us(fn: Callable[[], Any], repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(3):  # best of three runs of `repeat` calls
        t0 = time.perf_counter()
        for _ in range(repeat):
            fn()
        best = min(best, (time.perf_counter() - t0) / repeat)
    return round(best * 1e6, 2)


def construction_costs(repeat: int) -> dict[str, float]:
    """Microseconds per construction of each class, and per ``ModelConfig.from_dict``."""
    out = {}
    for module, name, required in CLASSES:
        cls, kwargs = _class(module, name), required()
        out[name] = _time_us(lambda: cls(**kwargs), repeat)
    model_config = _class("em3.model.config", "ModelConfig")
    saved = model_config.tiny().to_dict()
    out["ModelConfig.from_dict"] = _time_us(lambda: model_config.from_dict(saved), repeat)
    experiment = _class("em3.experiment", "ExperimentConfig")
    exp = experiment.from_dict({"name": "x", "arms": [{"name": "a", "fraction": 0.5, "model_line": "a"},
                                                      {"name": "b", "fraction": 0.5, "model_line": "b"}]})
    out["ExperimentConfig.arm_for"] = _time_us(lambda: exp.arm_for("user-42"), repeat)
    load_settings = importlib.import_module("em3.config").load_settings
    out["load_settings"] = _time_us(lambda: load_settings({}), max(1, repeat // 10))
    return out


class _Counting:
    """Counts constructions of every config class while active."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._saved: list[tuple[type, Any]] = []

    def __enter__(self) -> "_Counting":
        for module, name, _ in CLASSES + [("em3.experiment", "ExperimentConfig", dict),
                                         ("em3.config", "Settings", dict), ("em3.config", "TopicNames", dict)]:
            cls = _class(module, name)
            init = cls.__init__

            def counted(self_: Any, *args: Any, __init=init, __name=name, **kwargs: Any) -> None:
                self.counts[__name] += 1
                __init(self_, *args, **kwargs)

            self._saved.append((cls, init))
            cls.__init__ = counted
        return self

    def __exit__(self, *exc: Any) -> None:
        for cls, init in self._saved:
            cls.__init__ = init


def hot_path_counts() -> dict[str, dict[str, Any]]:
    """Config constructions while the hot loops run (built outside the loops)."""
    from em3.experiment import ExperimentConfig
    from em3.stores import InMemoryContentStore, InMemoryHistoryStore
    from em3.types import Impression, ItemContent
    from serving.ranking import RankingService
    from serving.toy import ToyConfig, ToyLoader, make_toy_snapshot
    from simulators.ab import ABConfig, ABRunner
    from simulators.rankers import RandomRanker
    from simulators.world import World, WorldConfig
    from stream.join import JoinConfig, JoinCore
    from stream.synthetic import StreamSpec, arrival_order, generate_stream

    with _Counting() as probe:  # the instrument itself counts
        JoinConfig(), ABConfig()
    if sum(probe.counts.values()) != 2:
        raise RuntimeError(f"the construction counter is broken: {dict(probe.counts)}")
    out: dict[str, dict[str, Any]] = {}
    # The join's per-event path.
    imps, clicks = generate_stream(StreamSpec(impressions=20_000, users=2_000, items=500, seed=1))
    events = list(arrival_order(imps, clicks, jitter_s=1.0, seed=1))
    core = JoinCore(JoinConfig(window_s=30.0))
    with _Counting() as c:
        for event in events:
            if isinstance(event, Impression):
                core.add_impression(event)
            else:
                core.add_click(event)
        core.advance_watermark(float("inf"))
        samples = len(core.take_output().samples)
    out["join"] = {"events": len(events), "samples": samples, "configs_built": sum(c.counts.values())}
    # The ranking path of one request: pick the arm, rank its candidates.
    catalog = [ItemContent(f"i{n}", text=f"item {n} genre{n % 3}") for n in range(300)]
    history = InMemoryHistoryStore()
    history.append_many([(f"u{n % 50}", f"i{n % 300}", 1.7e9 + n) for n in range(500)])
    service = RankingService(InMemoryContentStore(catalog), history)
    manifest, blob = make_toy_snapshot("a", 1, ToyConfig(dim=8, buckets=512), seed=1)
    state = service.prepare("a", manifest, ToyLoader().load(manifest, blob, None), None)
    experiment = ExperimentConfig.from_dict({"name": "x", "arms": [{"name": "a", "fraction": 1.0, "model_line": "a"}]})
    with _Counting() as c:
        for n in range(2_000):
            experiment.arm_for(f"u{n % 50}")
            service.rank(state, f"u{n % 50}", [f"i{(n + k) % 300}" for k in range(50)], k=10)
    out["rank"] = {"requests": 2_000, "configs_built": sum(c.counts.values())}
    # The A/B runner's per-request path (simulated users, two arms).
    world = World(WorldConfig(n_users=200, n_items=100, calibration="synthetic", seed=2))
    runner = ABRunner(world, {"a": RandomRanker("a", 1), "b": RandomRanker("b", 2)},
                      ABConfig(n_requests=2_000, seed=2, check_every=500, min_samples=50))
    with _Counting() as c:
        report = runner.run()
    out["ab"] = {"requests": report.requests, "configs_built": sum(c.counts.values())}
    return out


def import_ms(runs: int) -> float:
    """Best-of-``runs`` milliseconds to import the CLI (``em3.app.cli``, which loads the
    settings loader) in a fresh interpreter with this one's ``sys.path``."""
    import subprocess

    code = "import time; t = time.perf_counter(); import em3.app.cli; print(time.perf_counter() - t)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    times = [float(subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True,
                                  text=True).stdout) for _ in range(runs)]
    return round(min(times) * 1e3, 1)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2000, help="constructions per timing run")
    parser.add_argument("--import-runs", type=int, default=5, help="fresh interpreters timing the CLI import")
    args = parser.parse_args(argv)
    costs = construction_costs(args.repeat)
    costs["import em3.app.cli (ms)"] = import_ms(args.import_runs)
    for name, us in costs.items():
        print(f"{name:28s} {us:9.2f}", file=sys.stderr)
    counts = hot_path_counts()
    for path, row in counts.items():
        print(f"{path}: {row}", file=sys.stderr)
    config_kind = "pydantic dataclasses" if dataclasses.is_dataclass(_class("stream.join", "JoinConfig")) and \
        hasattr(_class("stream.join", "JoinConfig"), "__pydantic_fields__") else "stdlib dataclasses"
    report = {"benchmark": "config_cost", "config_classes": config_kind, "model": "none (config objects only)",
              "runtime": f"CPython {platform.python_version()}, CPU",
              "construction_us": costs, "hot_paths": counts}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
