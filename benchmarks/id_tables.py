"""Bounded, collision-aware ID tables (issue 14, item 4): memory, collisions and AUC.

Two parts, both through the real learner (:class:`learners.OnlineLearner`,
``learn_batch``, prequential: each batch is scored before it is learned):

1. **Synthetic scale runs**: ``10^4``, ``10^5`` and ``10^6`` distinct user IDs and as
   many distinct item IDs streamed through a learner with ``id_table="bounded"`` (the
   ``id_only`` model: the default content model runs at ~500 samples/s on this
   machine's CPUs, hours for 10^6 IDs). Each stream mixes a hot set (1% of the IDs,
   drawn with weights ``1/sqrt(rank)``, 20% of the events) with a tail of new IDs (90%
   of the others are new, the rest repeat one of the last 2,048 tail IDs), until it
   has shown the wanted number of distinct IDs; clicks follow a fixed per-ID logit.
   Each scale runs in its own process, so ``rss_mb`` (VmRSS at the end of the stream)
   compares across scales; ``rss_mb_by_quarter`` shows it within the stream.
   ``collision_rate_hot_ids``: of the 1% most frequent IDs of the stream (users and
   items), the fraction that do not hold an own row at the end (``_by_quartile``: of
   the hot set's most frequent quarter first);
   ``hashed_collision_rate_hot_ids``: the same IDs under today's hashed tables (a
   bucket shared with any other ID of the stream), from the hash alone.
2. **MovieLens-100K**: ``benchmarks/quality.py``'s prequential loop
   (:func:`benchmarks.quality.run_variant`), all 100,000 events, the same seeds,
   ``id_table="hashed"`` (today) against ``"bounded"`` with the default
   admission/eviction settings (chosen by reasoning, ``docs/architecture.md``).

    python benchmarks/id_tables.py                       # everything (~10-20 min here)
    python benchmarks/id_tables.py --scales 10000 --ml-seeds 0 --ml-max-events 20000   # quick
    python benchmarks/id_tables.py --tables-only --scales 1000000 --seeds 1,2,3 [--shift]  # admission alone

The last line printed is one JSON object ``{"runs": [...], "ml100k": {...}, "model",
"runtime", "settings"}``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

logger = logging.getLogger("benchmarks.id_tables")

HOT_FRACTION = 0.01
P_HOT = 0.2
P_NEW = 0.9
TAIL_WINDOW = 2048
T0 = 1.75e9


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class IdStream:
    """A seeded stream of IDs of one kind (``u`` or ``i``): a hot set and a tail of new IDs.

    Memory is O(hot set + tail window), whatever the number of distinct IDs.
    """

    def __init__(self, prefix: str, distinct: int, rng: np.random.Generator) -> None:
        self.prefix, self.rng = prefix, rng
        self.hot = max(1, int(distinct * HOT_FRACTION))
        self.tail_total = distinct - self.hot
        w = 1 / np.sqrt(np.arange(1, self.hot + 1))
        self.cdf = np.cumsum(w / w.sum())
        self.next_tail = 0
        self.window = np.zeros(TAIL_WINDOW, dtype=np.int64)

    @property
    def done(self) -> bool:
        return self.next_tail >= self.tail_total

    def draw(self, n: int) -> list[str]:
        out = []
        u = self.rng.random((n, 3))
        for a, b, c in u:
            if a < P_HOT or self.done:
                out.append(f"{self.prefix}h{int(np.searchsorted(self.cdf, b))}")
            elif c < P_NEW or self.next_tail == 0:
                k = self.next_tail
                self.window[k % TAIL_WINDOW] = k
                self.next_tail += 1
                out.append(f"{self.prefix}t{k}")
            else:
                k = int(self.window[int(b * min(self.next_tail, TAIL_WINDOW))])
                out.append(f"{self.prefix}t{k}")
        return out

    def hot_ids(self) -> list[str]:
        return [f"{self.prefix}h{k}" for k in range(self.hot)]

    def all_ids(self):
        yield from self.hot_ids()
        for k in range(self.next_tail):
            yield f"{self.prefix}t{k}"


def _logit(key: str, scale: float) -> float:
    """The ID's fixed click logit, uniform in ``[-1.7 scale, 1.7 scale]`` (uncached hash)."""
    u = int.from_bytes(hashlib.blake2b(f"truth|{key}".encode(), digest_size=4).digest(), "little")
    return scale * (u / 0xFFFFFFFF * 2 - 1) * 1.7


def run_scale(distinct: int, *, batch_size: int, seed: int, threads: int, overrides: dict | None = None) -> dict:
    """One synthetic run of ``distinct`` user and ``distinct`` item IDs (in this process);
    ``overrides``: ModelConfig fields beside the defaults (a diagnostic, not the default)."""
    import torch

    from em3.metrics import auc
    from em3.model import ModelConfig
    from em3.model.ranker import stable_bucket
    from em3.stores import InMemoryContentStore
    from em3.types import Impression, Sample
    from learners import OnlineLearner

    torch.set_num_threads(threads)
    cfg = ModelConfig.for_variant("id_only", **{"id_table": "bounded", "seed": seed, "history_len": 20,
                                                **(overrides or {})})
    learner = OnlineLearner(cfg, InMemoryContentStore([]), device="cpu", seed=seed)
    rng = np.random.default_rng(seed)
    users, items = IdStream("u", distinct, rng), IdStream("i", distinct, rng)
    labels, probs, rss = [], [], []
    t0, cpu0, n, step = time.perf_counter(), time.process_time(), 0, 0
    expected = 0.99 * distinct / (P_NEW * (1 - P_HOT))
    marks = [0.25, 0.5, 0.75]
    while not (users.done and items.done):
        us, its = users.draw(batch_size), items.draw(batch_size)
        p = 1 / (1 + np.exp(-np.array([_logit(u, 0.6) + _logit(i, 1.0) for u, i in zip(us, its)])))
        y = (rng.random(batch_size) < p).astype(np.int8)
        t = T0 + n / 100  # 100 impressions per second of event time
        batch = [Sample(Impression(f"e{n + k}", "r", u, i, 0, t), int(c), t) for k, (u, i, c) in
                 enumerate(zip(us, its, y))]
        stats = learner.learn_batch(batch, [[]] * batch_size, return_probs=True)
        labels.append(y)
        probs.append(stats["probs"])
        n += batch_size
        step += 1
        while marks and n >= marks[0] * expected:
            rss.append(round(_rss_mb(), 1))
            marks.pop(0)
        if step % 100 == 0:
            logger.info("%d distinct: %d events, %.0f ev/s, rss %.0f MB", distinct, n,
                        n / (time.perf_counter() - t0), _rss_mb())
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    rss_end = _rss_mb()
    rss.append(round(rss_end, 1))
    # Measured after the RSS: what the tables hold, and the collisions of the hot IDs.
    own = {}
    hot_collide, hashed_collide, hot_n = 0, 0, 0
    by_quartile = np.zeros(4)
    for name, stream, emb in (("user", users, learner.model.user_emb), ("item", items, learner.model.item_emb)):
        own[name] = len(emb.ids)
        hot = stream.hot_ids()
        missing = ~emb.ids.owns(hot)  # hot IDs in rank order: most frequent first
        hot_collide += int(missing.sum())
        by_quartile += [int(q.sum()) for q in np.array_split(missing, 4)]
        hot_n += len(hot)
        buckets = np.bincount(np.fromiter((stable_bucket(k, name, emb.buckets) for k in stream.all_ids()),
                                          dtype=np.int64), minlength=emb.buckets)
        hashed_collide += int((buckets[[stable_bucket(k, name, emb.buckets) for k in hot]] > 1).sum())
    capacity = learner.model.user_emb.ids.capacity + learner.model.item_emb.ids.capacity
    return {
        "distinct_ids": distinct, "distinct_ids_per_table": {"user": users.hot + users.next_tail,
                                                             "item": items.hot + items.next_tail},
        "events": n, "rows": own["user"] + own["item"], "rows_per_table": own, "capacity": capacity,
        "table_rows": cfg.user_buckets + cfg.item_buckets,
        "rss_mb": round(rss_end, 1), "rss_mb_by_quarter": rss,
        "id_table_mb": round(sum(e.ids.nbytes for e in (learner.model.user_emb, learner.model.item_emb)) / 2**20, 2),
        "collision_rate_hot_ids": hot_collide / hot_n, "hot_ids": hot_n,
        "collision_rate_hot_ids_by_quartile": [round(float(x), 4) for x in by_quartile / (hot_n / 4)],
        "config_overrides": overrides or {},
        "sketch": {name: {"width": emb.ids.sketch.width, "depth": emb.ids.sketch.depth,
                          "sample_size": emb.ids.sketch.sample_size, "doorkeeper_bits": emb.ids.sketch.door_bits}
                   for name, emb in (("user", learner.model.user_emb), ("item", learner.model.item_emb))},
        "hashed_collision_rate_hot_ids": round(hashed_collide / hot_n, 4),
        "auc": round(auc(np.concatenate(labels), np.concatenate(probs)), 4),
        "model": "id_only", "variant": "id_only, id_table=bounded (defaults: "
        f"fallback {cfg.id_fallback_buckets}, admit_after {cfg.id_admit_after}, expiry_s {cfg.id_expiry_s}, "
        "TinyLFU admission with a doorkeeper)",
        "runtime": f"in-process OnlineLearner.learn_batch, cpu, {threads} thread(s), batch {batch_size}",
        "wall_s": round(wall, 1), "core_s": round(cpu, 1), "samples_per_s": round(n / wall),
    }


def run_tables(distinct: int, *, batch_size: int, seed: int, shift: bool = False) -> dict:
    """The same stream as :func:`run_scale` (the same draws, batches and event times),
    through two pure :class:`em3.idtable.IdTable` at the model's default sizes, with no
    model: the admission policy alone, ~20 s for 10^6 IDs. The tool the admission
    settings were chosen with (``--tables-only``, on seeds other than the reported one).

    ``shift``: at half the stream the hot set is replaced by new IDs (the users' and items'
    prefixes change), and ``new_hot_missing_after`` gives the fraction of the new hot IDs
    without an own row 50,000 to 400,000 events later: how fast admission follows a
    change of popularity; ``old_hot_held_end``: how many of the old ones still hold one."""
    from em3 import idtable
    from em3.model import ModelConfig

    cfg = ModelConfig()
    rng = np.random.default_rng(seed)
    users, items = IdStream("u", distinct, rng), IdStream("i", distinct, rng)
    tables = {name: idtable.IdTable(rows, cfg.id_fallback_buckets, name, cfg.id_admit_after)
              for name, rows in (("user", cfg.user_buckets), ("item", cfg.item_buckets))}
    half = int(0.5 * 0.99 * distinct / (P_NEW * (1 - P_HOT)))
    old_hot = {"user": users.hot_ids(), "item": items.hot_ids()}
    marks: dict[int, float] = {}
    n, t0 = 0, time.perf_counter()
    while not (users.done and items.done):
        if shift and n >= half and users.prefix == "u":
            users.prefix, items.prefix = "v", "j"
        us, its = users.draw(batch_size), items.draw(batch_size)
        rng.random(batch_size)  # the clicks' draw of run_scale: the same stream after it
        for name, ids in (("user", us), ("item", its)):
            tables[name].observe(ids, T0 + n / 100)
        n += batch_size
        for m in (50_000, 100_000, 200_000, 400_000):
            if users.prefix == "v" and m not in marks and n - half >= m:
                marks[m] = float(np.mean([~tables[k].owns(s.hot_ids()) for k, s in
                                          (("user", users), ("item", items))]))
    missing = np.concatenate([~tables[k].owns(s.hot_ids()) for k, s in (("user", users), ("item", items))])
    out = {"seed": seed, "distinct_ids": distinct, "events": n, "hot_ids": len(missing),
           "hot_missing": int(missing.sum()), "collision_rate_hot_ids": float(missing.mean()),
           "rows": sum(len(t) for t in tables.values()),
           "sample_per_row": idtable.SAMPLE_PER_ROW, "doorkeeper_bits_per_sample": idtable.DOOR_BITS_PER_SAMPLE,
           "wall_s": round(time.perf_counter() - t0, 1)}
    if shift:
        out["new_hot_missing_after"] = {str(k): round(v, 4) for k, v in marks.items()}
        out["old_hot_held_end"] = round(float(np.mean([tables[k].owns(old_hot[k]) for k in tables])), 4)
    return out


def _table_figures(learner) -> dict:
    """Own rows held and the collisions of the 1% most frequent users and items seen."""
    model = learner.model
    return {"rows": sum(len(e.ids) for e in (model.user_emb, model.item_emb))} if model.bounded else {
        "rows": model.config.user_buckets + model.config.item_buckets}


def _ml_collisions(samples, table: str, learner) -> float:
    """Of the 1% most frequent users and items of the stream, the fraction on a row
    shared with another ID of the stream (hashed) or without an own row (bounded)."""
    from collections import Counter

    from em3.model.ranker import stable_bucket

    out, total = 0, 0
    for name, key, emb in (("user", lambda s: s.impression.user_id, learner.model.user_emb),
                           ("item", lambda s: s.impression.item_id, learner.model.item_emb)):
        counts = Counter(key(s) for s in samples)
        hot = [k for k, _ in counts.most_common(max(1, len(counts) // 100))]
        total += len(hot)
        if table == "bounded":
            out += int((~emb.ids.owns(hot)).sum())
        else:
            buckets = Counter(stable_bucket(k, name, emb.buckets) for k in counts)
            out += sum(buckets[stable_bucket(k, name, emb.buckets)] > 1 for k in hot)
    return out / total


def run_ml100k(seeds: list[int], max_events: int | None, variant: str, threads: int) -> dict:
    import torch

    from benchmarks.quality import run_variant
    from em3.data import click_histories, load_ml100k
    from em3.stores import InMemoryContentStore

    torch.set_num_threads(threads)
    data = load_ml100k(max_events=max_events)
    histories = click_histories(data.samples, 100)
    store = InMemoryContentStore(data.items.values())
    out: dict = {}
    for table in ("hashed", "bounded"):
        per_seed = {}
        for seed in seeds:
            torch.manual_seed(seed)
            r = run_variant(variant, data.samples, histories, store, batch_size=512, device="cpu", seed=seed,
                            overrides={"history_len": 100, "seed": seed, "id_table": table}, learner_kwargs={},
                            inspect=lambda lrn, t=table: {**_table_figures(lrn),
                                                          "collision_rate_hot_ids": _ml_collisions(data.samples, t, lrn)})
            per_seed[seed] = {k: r[k] for k in ("auc", "gauc", "cold_auc", "logloss", "rows",
                                                "collision_rate_hot_ids", "wall_s")}
            logger.info("ml100k %s seed %d: %s", table, seed, per_seed[seed])
        out[table] = {"auc": round(float(np.mean([r["auc"] for r in per_seed.values()])), 4),
                      "gauc": round(float(np.mean([r["gauc"] for r in per_seed.values()])), 4),
                      "cold_auc": round(float(np.mean([r["cold_auc"] for r in per_seed.values()])), 4),
                      "seeds": {str(k): v for k, v in per_seed.items()}}
    out["auc_bounded_minus_hashed"] = round(out["bounded"]["auc"] - out["hashed"]["auc"], 4)
    out["events"] = len(data.samples)
    out["model"] = variant
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scales", default="10000,100000,1000000", help="distinct IDs per table, one run each")
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ml-seeds", default="0,1,2", help="MovieLens seeds; empty to skip MovieLens")
    p.add_argument("--ml-max-events", type=int, default=0, help="0: all 100,000 events (the reported figure)")
    p.add_argument("--ml-variant", default="id_only", help="model variant for MovieLens (em3 is ~5x slower)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                   help="ModelConfig override of the synthetic runs (diagnostics; the defaults are the figure)")
    p.add_argument("--one-scale", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--tables-only", action="store_true",
                   help="the admission policy alone: the scales' streams through pure IdTables, for --seeds")
    p.add_argument("--seeds", default="1,2,3", help="with --tables-only: the streams' seeds (tuning: not 0)")
    p.add_argument("--shift", action="store_true", help="with --tables-only: the hot set changes at mid-stream")
    p.add_argument("--sample-per-row", type=int, default=None,
                   help="with --tables-only: em3.idtable.SAMPLE_PER_ROW for this run (a diagnostic)")
    p.add_argument("--doorkeeper-bits", type=int, default=None,
                   help="with --tables-only: em3.idtable.DOOR_BITS_PER_SAMPLE (0: no doorkeeper; a diagnostic)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    overrides = {k: json.loads(v) for k, _, v in (item.partition("=") for item in args.set)}
    if args.tables_only:
        from em3 import idtable

        if args.sample_per_row is not None:
            idtable.SAMPLE_PER_ROW = args.sample_per_row
        if args.doorkeeper_bits is not None:
            idtable.DOOR_BITS_PER_SAMPLE = args.doorkeeper_bits
        runs = [run_tables(int(d), batch_size=args.batch_size, seed=int(seed), shift=args.shift)
                for d in args.scales.split(",") if d.strip() for seed in args.seeds.split(",") if seed.strip()]
        for r in runs:
            logger.info("%s", r)
        report = {"tables_only": runs, "model": "none (pure em3.idtable.IdTable, the model's default sizes)",
                  "runtime": "in-process, numpy, one thread", "settings": {"batch_size": args.batch_size,
                                                                            "shift": args.shift}}
        print(json.dumps(report))
        return report
    if args.one_scale is not None:  # a child process: one scale, its own RSS
        report = run_scale(args.one_scale, batch_size=args.batch_size, seed=args.seed, threads=args.threads,
                           overrides=overrides)
        print(json.dumps(report))
        return report
    runs = []
    for distinct in [int(x) for x in args.scales.split(",") if x.strip()]:
        cmd = [sys.executable, __file__, "--one-scale", str(distinct), "--batch-size", str(args.batch_size),
               "--seed", str(args.seed), "--threads", str(args.threads)] + [f"--set={x}" for x in args.set]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
        done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, env=env)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        logger.info("scale %d: %s", distinct, runs[-1])
    seeds = [int(x) for x in args.ml_seeds.split(",") if x.strip()]
    ml = run_ml100k(seeds, args.ml_max_events or None, args.ml_variant, args.threads) if seeds else None
    from em3.model import ModelConfig

    cfg = ModelConfig()
    print("| distinct IDs / table | events | own rows (capacity) | rss MB (quarters) | hot collisions bounded / hashed | auc | wall s |")
    print("|---|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['distinct_ids']:,} | {r['events']:,} | {r['rows']:,} ({r['capacity']:,}) | {r['rss_mb']} "
              f"({' / '.join(map(str, r['rss_mb_by_quarter']))}) | {r['collision_rate_hot_ids']:.4f} / "
              f"{r['hashed_collision_rate_hot_ids']:.4f} | {r['auc']} | {r['wall_s']} |")
    if ml:
        print(f"ML-100K ({ml['model']}, {ml['events']:,} events, seeds {seeds}): AUC hashed {ml['hashed']['auc']} "
              f"bounded {ml['bounded']['auc']} ({ml['auc_bounded_minus_hashed']:+.4f})")
    report = {"runs": runs, "ml100k": ml,
              "model": "id_only (synthetic runs and MovieLens unless --ml-variant says otherwise)",
              "runtime": f"in-process OnlineLearner, cpu, {args.threads} thread(s); one process per scale",
              "settings": {"batch_size": args.batch_size, "seed": args.seed, "hot_fraction": HOT_FRACTION,
                           "p_hot": P_HOT, "p_new": P_NEW, "tail_window": TAIL_WINDOW,
                           "id_table": {"user_buckets": cfg.user_buckets, "item_buckets": cfg.item_buckets,
                                        "id_fallback_buckets": cfg.id_fallback_buckets,
                                        "id_admit_after": cfg.id_admit_after, "id_expiry_s": cfg.id_expiry_s,
                                        "id_sketch_width": cfg.id_sketch_width,
                                        "admission": "TinyLFU: every impression counted behind a "
                                                     "doorkeeper, halving after 80 x own rows, strictly "
                                                     "greater estimate than the SLRU victim"},
                           "ml_seeds": seeds, "ml_max_events": args.ml_max_events}}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
