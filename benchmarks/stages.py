"""Staged adoption of EM3 on MovieLens-100K: what each step adds and what it costs.

The ladder a team would climb, each stage the one before plus one change:

1. ``id_only``       hashed IDs, click statistics, target attention over a short
                      history (``--base-history``, 20 clicks);
2. ``+text (LoRA)``  the text tower (MiniLM, LoRA on its top layer) and the
                      Fusion-Q-Former (variant ``text_only``);
3. ``+image``        the image tower too (EfficientNet-Lite0, LoRA on its head): the
                      default ``em3`` model;
4. ``history 50``, 5. ``history 100``, 6. ``history 200``: the same model attending
   over longer click histories.

Each stage runs the quality protocol of ``benchmarks/quality.py`` (its
``run_variant``: prequential test-then-train over the stream in time order, the same
``OnlineLearner`` and defaults ``em3 learn`` uses) and reports AUC, GAUC and cold AUC
(each item's first 5 impressions), each with its lift over the stage before;
training samples/s (wall clock of the prequential loop); trainable parameters;
snapshot bytes (the full snapshot a learner publishes); and the compute cost
``core_s_per_1m``: CPU core-seconds of the process per million samples trained
(``time.process_time`` over the loop, so all torch threads count and other load on a
shared machine inflates it less than wall time). ``core_h_per_1m`` is the same in
core-hours. No GPU run exists for these figures (the development machines have no
GPU); ``gpu`` is null.

``choice`` names the stage to adopt for each of ``--thresholds`` (a lift worth that
much per added core-hour per million samples; :func:`choose_stage`), in AUC and in
cold AUC; ``--from-json`` derives it again from a written report without training.

The full stream with real encoders takes about 15 minutes per seed of a quiet
2-core CPU for the ladder (from ``quality.py``'s full-stream timings);
``--max-events`` takes the first N events (``docs/adoption.md`` says which was used)::

    OMP_NUM_THREADS=1 python benchmarks/stages.py --max-events 30000 --threads 1 --seeds 0,1 \\
        --json-out docs/results/stages.json
    python benchmarks/stages.py --from-json docs/results/stages.json --thresholds 0.005

The last line printed is one JSON object ``{"stages": [{"name", "auc", "gauc",
"cold_auc", "auc_lift", "gauc_lift", "cold_auc_lift", "samples_per_s",
"trainable_params", "snapshot_bytes", "core_s_per_1m", ...}], "variant", "runtime",
"settings"}``.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import quality  # noqa: E402  (the quality protocol: run_variant, _mean_over_seeds)

logger = logging.getLogger("benchmarks.stages")

#: The figures a stage's lift is computed on.
QUALITY_KEYS = ("auc", "gauc", "cold_auc")


@dataclass(frozen=True)
class Stage:
    """One rung of the ladder: a model variant (:data:`em3.model.VARIANTS`) and the
    history length its ranker attends over."""

    name: str
    variant: str
    history_len: int


def ladder(base_history: int) -> list[Stage]:
    """The six stages, in adoption order.

    >>> [s.name for s in ladder(20)]
    ['id_only', '+text (LoRA)', '+image', 'history 50', 'history 100', 'history 200']
    """
    return [
        Stage("id_only", "id_only", base_history),
        Stage("+text (LoRA)", "text_only", base_history),
        Stage("+image", "em3", base_history),
        Stage("history 50", "em3", 50),
        Stage("history 100", "em3", 100),
        Stage("history 200", "em3", 200),
    ]


def with_lifts(rows: list[dict]) -> list[dict]:
    """Each row plus ``{key}_lift`` (the change of each quality figure over the row
    before; None for the first) and ``added_core_s_per_1m`` (the change in cost).

    >>> out = with_lifts([{"auc": 0.70, "gauc": 0.68, "cold_auc": 0.60, "core_s_per_1m": 100.0},
    ...                   {"auc": 0.71, "gauc": 0.69, "cold_auc": 0.65, "core_s_per_1m": 400.0}])
    >>> out[0]["auc_lift"] is None, round(out[1]["cold_auc_lift"], 4), out[1]["added_core_s_per_1m"]
    (True, 0.05, 300.0)
    """
    out = []
    for n, row in enumerate(rows):
        prev = rows[n - 1] if n else None
        row = dict(row)
        for key in QUALITY_KEYS:
            row[f"{key}_lift"] = None if prev is None else round(row[key] - prev[key], 5)
        row["added_core_s_per_1m"] = None if prev is None else round(row["core_s_per_1m"] - prev["core_s_per_1m"], 2)
        out.append(row)
    return out


def lift_per_cost(rows: list[dict], key: str = "auc") -> list[float | None]:
    """``{key}_lift`` per added core-hour per million samples, per stage (None for the
    first stage, and where the stage added no cost).

    >>> lift_per_cost([{"auc_lift": None, "added_core_s_per_1m": None},
    ...                {"auc_lift": 0.01, "added_core_s_per_1m": 3600.0}])
    [None, 0.01]
    """
    out: list[float | None] = []
    for row in rows:
        lift, added = row.get(f"{key}_lift"), row.get("added_core_s_per_1m")
        out.append(None if lift is None or not added or added <= 0 else round(lift / (added / 3600.0), 6))
    return out


def choose_stage(rows: list[dict], key: str, threshold: float, noise: float = 0.0) -> dict:
    """The stage to adopt when a lift in ``key`` is worth ``threshold`` per added CPU
    core-hour per million samples (incremental cost-effectiveness along the ladder).

    Stages are taken in ladder order (each adds to the one before, so it cannot
    really cost less; a measured cost at or below the last kept stage's is
    measurement noise and counts as no added cost). A stage is *kept* when it beats
    the last kept stage by more than ``noise`` (the seed-to-seed spread: a smaller
    lift is not a lift); the others are never chosen. Each kept stage's ratio is its
    gain over the last kept stage per added core-hour; the choice is the last kept
    stage whose ratio reaches ``threshold``, stopping at the first that does not.
    Returns ``{"stage", "kept": [names], "ratios": {name: ratio}}`` (a ratio is None
    where the stage added no measurable cost).

    >>> rows = [{"name": "a", "auc": 0.70, "core_s_per_1m": 36.0},
    ...         {"name": "b", "auc": 0.72, "core_s_per_1m": 3636.0},   # +0.02 for 1 core-hour
    ...         {"name": "c", "auc": 0.719, "core_s_per_1m": 7236.0},  # costs more, no better
    ...         {"name": "d", "auc": 0.725, "core_s_per_1m": 14436.0}] # +0.005 for 3 more core-hours
    >>> choose_stage(rows, "auc", threshold=0.01)["stage"], choose_stage(rows, "auc", threshold=0.001)["stage"]
    ('b', 'd')
    >>> choose_stage(rows, "auc", threshold=0.001)["kept"]
    ['a', 'b', 'd']
    """
    kept = [rows[0]]
    for row in rows[1:]:
        if row[key] > kept[-1][key] + noise:
            kept.append(row)
    ratios: dict[str, float | None] = {}
    chosen = kept[0]
    for prev, row in zip(kept, kept[1:]):
        added_h = (row["core_s_per_1m"] - prev["core_s_per_1m"]) / 3600.0
        ratio = (row[key] - prev[key]) / added_h if added_h > 0 else None  # None: free
        ratios[row["name"]] = None if ratio is None else round(ratio, 6)
        if ratio is not None and ratio < threshold:
            break
        chosen = row
    return {"stage": chosen["name"], "kept": [r["name"] for r in kept], "ratios": ratios}


def seed_noise(rows: list[dict], key: str, default: float) -> float:
    """Half the largest seed-to-seed range of ``key`` over the stages (each row's
    ``seeds``), or ``default`` with fewer than two seeds.

    >>> seed_noise([{"seeds": {"0": {"auc": 0.70}, "1": {"auc": 0.704}}},
    ...             {"seeds": {"0": {"auc": 0.71}, "1": {"auc": 0.711}}}], "auc", 0.001)
    0.002
    """
    spans = [max(v[key] for v in r["seeds"].values()) - min(v[key] for v in r["seeds"].values())
             for r in rows if len(r.get("seeds", {})) >= 2]
    return round(max(spans) / 2, 6) if spans else default


def derive(rows: list[dict], thresholds: list[float], noise: float | None) -> tuple[list[dict], dict]:
    """Lifts, lift per added cost and the stage to adopt per metric and threshold, from
    each stage's figures (``noise`` None: :func:`seed_noise`, default 0.001)."""
    rows = with_lifts(rows)
    for key in QUALITY_KEYS:
        for row, value in zip(rows, lift_per_cost(rows, key)):
            row[f"{key}_lift_per_core_h_per_1m"] = value
    choice = {}
    for key in ("auc", "cold_auc"):
        n = seed_noise(rows, key, 0.001) if noise is None else noise
        choice[key] = {"noise": n, "by_threshold": {str(t): choose_stage(rows, key, t, n) for t in thresholds}}
    return rows, choice


def run(args: argparse.Namespace) -> dict:
    import torch

    from em3.data import click_histories, load_ml100k
    from em3.stores import InMemoryContentStore
    from learners.online import LEARNER_DEFAULTS

    torch.set_num_threads(args.threads)
    stages = ladder(args.base_history)
    if args.stages:
        wanted = [s.strip() for s in args.stages.split(",") if s.strip()]
        unknown = [w for w in wanted if w not in {s.name for s in stages}]
        if unknown:
            raise SystemExit(f"stages.py: unknown stages {unknown}; choose from {[s.name for s in stages]}")
        stages = [s for s in stages if s.name in wanted]
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    data = load_ml100k(max_events=args.max_events or None)
    # One set of histories at the longest length; each stage's model truncates them
    # to its own history_len (OnlineLearner._prepare).
    histories = click_histories(data.samples, max(s.history_len for s in stages))
    store = InMemoryContentStore(data.items.values())
    rows = []
    for stage in stages:
        per_seed = {}
        for seed in seeds:
            logger.info("stage %s (variant %s, history %d), seed %d ...", stage.name, stage.variant,
                        stage.history_len, seed)
            torch.manual_seed(seed)
            t0 = time.perf_counter()
            per_seed[seed] = quality.run_variant(
                stage.variant, data.samples, histories, store, batch_size=args.batch_size, device=args.device,
                seed=seed, overrides={"history_len": stage.history_len}, learner_kwargs={})
            logger.info("stage %s seed %d: %.0f s, %s", stage.name, seed, time.perf_counter() - t0,
                        {k: per_seed[seed].get(k) for k in ("auc", "gauc", "cold_auc", "samples_per_s")})
        fig = quality._mean_over_seeds(per_seed)
        rows.append({"name": stage.name, "variant": stage.variant, "history_len": stage.history_len,
                     **{k: fig[k] for k in (*QUALITY_KEYS, "logloss", "samples_per_s", "trainable_params",
                                            "snapshot_bytes", "core_s_per_1m", "wall_s")},
                     "core_h_per_1m": round(fig["core_s_per_1m"] / 3600.0, 4),
                     "trainable_params": int(fig["trainable_params"]), "snapshot_bytes": int(fig["snapshot_bytes"]),
                     "gpu_core_s_per_1m": None,
                     "modality_attention": fig.get("modality_attention"),
                     "seeds": fig["seeds"]})
    rows, choice = derive(rows, args.thresholds, args.noise)
    return {
        "stages": rows,
        "choice": choice,
        "variant": "ladder: id_only, text_only, em3 (default ModelConfig per variant, em3.model.VARIANTS) "
                   "at the stated history_len",
        "runtime": f"in-process OnlineLearner, {args.device}, {args.threads} torch threads, no GPU run",
        "dataset": "ml100k",
        "settings": {"events": len(data.samples), "max_events": args.max_events, "seeds": seeds,
                     "batch_size": args.batch_size, "learner": dict(LEARNER_DEFAULTS),
                     "base_history": args.base_history, "device": args.device, "threads": args.threads,
                     "cold_k": quality.COLD_K,
                     "cost": "core_s_per_1m: process CPU seconds (all threads) of the prequential loop per "
                             "1M samples"},
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-events", type=int, default=30_000,
                   help="first N MovieLens events in time order (0: all 100,000)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; figures are means over them")
    p.add_argument("--base-history", type=int, default=20, help="history length of the first three stages")
    p.add_argument("--stages", default="", help="comma-separated stage names to run (default: all six)")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--json-out", default=None, help="also write the JSON report to this file")
    p.add_argument("--thresholds", type=lambda v: [float(x) for x in v.split(",")], default=[0.01, 0.001, 0.0001],
                   help="lifts per added core-hour per 1M samples at which to report the stage to adopt")
    p.add_argument("--noise", type=float, default=None,
                   help="a lift at most this large counts as none when choosing (default: half the largest "
                        "seed-to-seed range of the metric over the stages; 0.001 with one seed)")
    p.add_argument("--from-json", default=None,
                   help="train nothing: take the stages' figures from a report this script wrote and derive the "
                        "lifts and choices again (other --thresholds or --noise)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if args.from_json:
        report = json.loads(Path(args.from_json).read_text())
        base = [{k: v for k, v in row.items() if not k.endswith(("_lift", "_lift_per_core_h_per_1m"))
                 and k != "added_core_s_per_1m"} for row in report["stages"]]
        report["stages"], report["choice"] = derive(base, args.thresholds, args.noise)
        report["settings"]["derived_from"] = args.from_json
    else:
        report = run(args)
    cols = ["auc", "auc_lift", "gauc", "cold_auc", "cold_auc_lift", "samples_per_s", "core_s_per_1m",
            "trainable_params", "snapshot_bytes"]
    print(f"{report['settings']['events']:,} events, seeds {report['settings']['seeds']}")
    print("| stage | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for row in report["stages"]:
        print(f"| {row['name']} | " + " | ".join(str(row.get(c)) for c in cols) + " |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report), flush=True)
    return report


if __name__ == "__main__":
    main()
