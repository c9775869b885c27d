"""Scale: snapshot swaps whose cost does not grow with the catalogue.

What it runs, per catalogue size (10,000, 100,000 and 1,000,000 items by default):

1. **Learner** (a subprocess, so the server's memory is measured alone): the
   default ``em3`` model (``ModelConfig()``: MiniLM and EfficientNet-Lite0 with
   LoRA) in an ``OnlineLearner``, publishing through ``SnapshotPublisher`` to a real
   Redis (the embedded one). It learns one batch and publishes a full snapshot,
   then learns ``--deltas`` more batches of ``--batch-size`` samples with the content
   towers resting (``content_every`` larger than the run: *ranker-only* steps) and
   publishes each as a delta; finally one batch that trains the towers, published
   as a delta too (it changes the content key).
2. **Server** (this process): ``RankingService`` and ``SnapshotReloader`` with
   ``EM3Loader``, the code ``em3 serve`` runs, over a catalogue whose items repeat
   the MovieLens-100K contents (text and poster) under new ids. It loads the full
   snapshot (filling the content table once; identical contents are computed
   once), then steps the line's pointer through the deltas while a thread ranks
   requests (100 candidates drawn from the catalogue, a 20-item history) and
   records their latency. ``swap_apply_s`` is the reloader's time to fetch, verify
   and apply one ranker-only delta and swap (the median over the deltas).
3. **Content refresh**: the last delta changes the towers; the reloader swaps at
   once and keeps the old content rows while the catalogue's rows are recomputed
   in the background (``refresh_s``, ``refresh_items_per_s``). Because the catalogue
   repeats 1,682 contents, that refresh computes each distinct content once; the
   towers' own throughput on distinct contents is measured separately
   (``tower_items_per_s``) and ``refresh_s_if_distinct`` is the catalogue size over
   it: what a catalogue of all-distinct items would take on this machine.

Run::

    python benchmarks/scale.py                       # 10k, 100k, 1M items
    python benchmarks/scale.py --items 10000 --deltas 3

The last line is one JSON object: ``{"model", "runtime", "runs": [{"items",
"swap_apply_s", "full_snapshot_bytes", "delta_bytes", "touched_rows", ...}], ...}``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LINE = "scale"
PREFIX = "scale:"


class RepeatedCatalog:
    """``n`` items ``item-0 .. item-(n-1)`` whose contents repeat a pool of real item
    contents (MovieLens-100K titles, genres and posters); a ``ContentSource``."""

    def __init__(self, n: int, pool) -> None:
        from em3.types import ItemContent

        self.n, self.pool, self._cls = n, list(pool), ItemContent

    def _content(self, item_id: str):
        k = int(item_id.rsplit("-", 1)[1])
        base = self.pool[k % len(self.pool)]
        return self._cls(item_id, text=base.text, image=base.image, attributes=base.attributes)

    def ids(self):
        return (f"item-{k}" for k in range(self.n))

    def get_many(self, item_ids):
        out = []
        for item_id in item_ids:
            try:
                k = int(item_id.rsplit("-", 1)[1])
            except (IndexError, ValueError):
                k = -1
            out.append(self._content(item_id) if 0 <= k < self.n else None)
        return out

    def get(self, item_id):
        return self.get_many([item_id])[0]


def _pool():
    from em3.data import load_ml100k

    return list(load_ml100k(max_events=1000).items.values())


def _samples(batch: int, step: int, n_items: int, rng: np.random.Generator):
    from em3.types import Impression, Sample

    users = rng.integers(0, 50_000, batch)
    items = rng.integers(0, n_items, batch)
    t0 = 1.75e9 + step * batch
    return [Sample(Impression(f"s{step}-{k}", f"r{step}-{k}", f"u{users[k]}", f"item-{items[k]}", 0, t0 + k),
                   int(rng.random() < 0.3), t0 + k + 1) for k in range(batch)]


def learner_main(args) -> None:
    """Publish one full snapshot, ``deltas`` ranker-only deltas and one tower delta."""
    import torch

    from em3.config import RedisSettings
    from em3.model import ModelConfig
    from em3.redis_stores import RedisAppliedLog, RedisSnapshotStore, connect
    from learners import OnlineLearner
    from learners.publisher import PublisherConfig, SnapshotPublisher

    torch.set_num_threads(1)
    client = connect(RedisSettings(args.redis_url))
    store = RedisSnapshotStore(client, PREFIX, keep=args.deltas + 4, signing_key=os.environ["EM3_SNAPSHOT_KEY"])
    config = ModelConfig()
    catalog = RepeatedCatalog(args.learn_items, _pool())
    rest = args.deltas + 10  # towers rest on every step but the first and the last
    learner = OnlineLearner(config, catalog, device="cpu", seed=0, content_every=rest)
    pub = SnapshotPublisher(store, RedisAppliedLog(client, PREFIX), LINE, config.to_dict(),
                            PublisherConfig(full_every=args.deltas + 2, full_every_s=3600))
    rng = np.random.default_rng(0)
    parent = None
    for step in range(args.deltas + 2):
        if step == args.deltas + 1:
            learner.steps = 0  # the last step trains the towers: a delta that changes the content key
        samples = _samples(args.batch_size, step, args.learn_items, rng)
        learner.learn_batch(samples, [[f"item-{(step * 7 + k) % args.learn_items}" for k in range(20)]] * len(samples))
        m = pub.publish(learner.state_dict(), parent=parent, offsets={}, applied_ids={}, stats={})
        parent = m.version
        print(json.dumps({"version": m.version, "kind": m.kind, "bytes": m.num_bytes,
                          "delta": m.stats.get("delta")}), flush=True)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _tower_items_per_s(model, pool, n: int = 512) -> float:
    """The content towers' throughput on distinct contents (``n`` of the pool)."""
    ids = [f"distinct-{k}" for k in range(n)]
    contents = [pool[k % len(pool)] for k in range(n)]
    t0 = time.perf_counter()
    for start in range(0, n, 64):
        model.item_content(ids[start:start + 64], contents[start:start + 64])
    return n / (time.perf_counter() - t0)


def serve_run(n_items: int, store, versions: list[dict], pool, args) -> dict:
    """One catalogue size: load the full snapshot, swap through the deltas under load."""
    import torch

    from serving.ranking import RankingConfig, RankingService
    from serving.reloader import ReloaderConfig, SnapshotReloader
    from serving.scoring import EM3Loader

    class History:
        def get(self, user_id, limit):
            k = abs(hash(user_id)) % n_items
            return [f"item-{(k + 13 * j) % n_items}" for j in range(min(limit, 20))]

    torch.set_num_threads(1)
    rss_before = _rss_mb()
    catalog = RepeatedCatalog(n_items, pool)
    service = RankingService(catalog, History(), RankingConfig(precompute_max_items=n_items,
                                                                cache_max_items=n_items + 10_000,
                                                                content_refresh_s=0.0, rep_batch_size=256))
    reloader = SnapshotReloader(store, EM3Loader(), service.prepare, ReloaderConfig(LINE))
    full, deltas, tower = versions[0], versions[1:-1], versions[-1]
    store.rollback(LINE, full["version"])
    t0 = time.perf_counter()
    assert reloader.check(), reloader.status().last_error
    fill_s = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    latencies: list[float] = []
    failed = [0]
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            cands = [f"item-{k}" for k in rng.integers(0, n_items, 100)]
            t = time.perf_counter()
            try:
                service.rank(reloader.current, f"user-{rng.integers(0, 10_000)}", list(dict.fromkeys(cands)), k=10)
                latencies.append(time.perf_counter() - t)
            except Exception:  # noqa: BLE001 - counted
                failed[0] += 1
            time.sleep(0.002)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    time.sleep(0.5)
    base_latencies = len(latencies)
    swaps = []
    for v in deltas:
        store.rollback(LINE, v["version"])
        t = time.perf_counter()
        ok = reloader.check()
        swaps.append(time.perf_counter() - t)
        if not ok or reloader.current.version != v["version"]:
            failed[0] += 1
        time.sleep(0.3)
    during = latencies[base_latencies:]
    key_before = reloader.current.content.key
    store.rollback(LINE, tower["version"])
    t = time.perf_counter()
    if not reloader.check():
        failed[0] += 1
    tower_swap_s = time.perf_counter() - t
    table = reloader.current.content
    while table.key == key_before and time.perf_counter() - t < args.refresh_timeout_s:
        time.sleep(0.05)
    refreshed = table.key != key_before
    stop.set()
    thread.join(5)
    tower_rate = _tower_items_per_s(reloader.current.model, pool)
    last = table.last_refresh
    return {
        "items": n_items,
        "swap_apply_s": round(statistics.median(swaps), 4),
        "swap_apply_s_max": round(max(swaps), 4),
        "full_snapshot_bytes": full["bytes"],
        "delta_bytes": int(statistics.median(d["bytes"] for d in deltas)),
        "touched_rows": int(statistics.median(d["delta"]["rows"] for d in deltas)),
        "touched_fraction": round(statistics.median(d["delta"]["rows"] for d in deltas) / args.table_rows, 5),
        "delta_whole_tensors": int(statistics.median(d["delta"]["whole_tensors"] for d in deltas)),
        "server_rss_mb": round(_rss_mb(), 1),
        "server_rss_growth_mb": round(_rss_mb() - rss_before, 1),
        "first_load_s": round(fill_s, 2),
        "rank_p50_ms_during_swaps": round(1000 * float(np.percentile(during, 50)), 2) if during else None,
        "rank_p99_ms_during_swaps": round(1000 * float(np.percentile(during, 99)), 2) if during else None,
        "requests_during_swaps": len(during),
        "tower_delta_swap_s": round(tower_swap_s, 4),
        "refresh_done": refreshed,
        "refresh_s": round(last.get("seconds", float("nan")), 2) if refreshed else None,
        "refresh_items_per_s": round(last.get("items_per_s", 0.0)) if refreshed else None,
        "tower_items_per_s": round(tower_rate, 1),
        "refresh_s_if_distinct": round(n_items / tower_rate, 1),
        "failed": failed[0],
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", default="10000,100000,1000000", help="comma-separated catalogue sizes")
    p.add_argument("--deltas", type=int, default=5, help="ranker-only deltas to swap through")
    p.add_argument("--batch-size", type=int, default=128, help="samples per learner step (rows it touches)")
    p.add_argument("--learn-items", type=int, default=1_000_000, help="items the learner's samples draw from")
    p.add_argument("--refresh-timeout-s", type=float, default=300.0)
    p.add_argument("--role", default="server", choices=["server", "learner"], help=argparse.SUPPRESS)
    p.add_argument("--redis-url", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.role == "learner":
        learner_main(args)
        return {}

    from em3.app.services import LocalServices
    from em3.config import RedisSettings
    from em3.model import ModelConfig
    from em3.redis_stores import RedisSnapshotStore, connect

    cfg = ModelConfig()
    args.table_rows = cfg.user_buckets + cfg.item_buckets + cfg.context_buckets
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, LocalServices(Path(tmp)) as services:
        info = services.info
        env = {**os.environ, **info.env(), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, __file__, "--role", "learner", "--redis-url", info.redis_url,
               "--deltas", str(args.deltas), "--batch-size", str(args.batch_size),
               "--learn-items", str(args.learn_items)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if out.returncode:
            raise SystemExit(f"learner failed:\n{out.stderr[-3000:]}")
        versions = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
        store = RedisSnapshotStore(connect(RedisSettings(info.redis_url)), PREFIX, keep=args.deltas + 4,
                                   signing_key=info.snapshot_key)
        pool = _pool()
        runs = []
        for n in [int(x) for x in args.items.split(",") if x.strip()]:
            run = serve_run(n, store, versions, pool, args)
            print(json.dumps(run), flush=True)
            runs.append(run)
    small, large = runs[0], runs[-1]
    checks = {
        "swap_apply_s_largest_le_1": large["swap_apply_s"] <= 1.0,
        "swap_apply_s_largest_le_2x_smallest": large["swap_apply_s"] <= 2 * small["swap_apply_s"],
        "delta_le_0.1_full_at_le_1pct_rows": all(r["delta_bytes"] <= 0.1 * r["full_snapshot_bytes"]
                                                  for r in runs if r["touched_fraction"] <= 0.01),
        "failed_0": all(r["failed"] == 0 for r in runs),
    }
    report = {"model": "em3 (default ModelConfig: MiniLM + EfficientNet-Lite0, LoRA)",
              "runtime": "learner subprocess (OnlineLearner + SnapshotPublisher); server in this process "
                         "(RankingService + SnapshotReloader + EM3Loader, as `em3 serve`); real Redis",
              "versions": versions, "runs": runs, "checks": checks,
              "settings": {"deltas": args.deltas, "batch_size": args.batch_size, "table_rows": args.table_rows,
                           "threads": 1}, "wall_s": round(time.perf_counter() - t_start, 1)}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
