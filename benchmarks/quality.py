"""Ranking quality of EM3, its ablations and strong simple baselines on a real,
time-ordered stream.

Prequential (test-then-train) over MovieLens-100K in time order: each mini-batch is
scored with the current model, then learned. Reports AUC, GAUC (per user), log loss,
the mean prediction against the click rate (calibration), and ``cold_auc`` (AUC over
each item's first 5 impressions in the stream), plus a chronological 80/20 split
figure for model variants: the model as trained (one prequential pass) on the first
80% of events, frozen, scored on the last 20%. Model variants also report their
Fusion-Q-Former's attention mass per modality (``modality_attention``), training
samples/s (wall clock of the prequential loop), ``core_s_per_1m`` (CPU core-seconds
of the process over that loop per million samples) and ``snapshot_bytes`` (the full
snapshot a learner of the variant publishes); ``benchmarks/stages.py`` builds the
staged-adoption table from them.

Variants are :data:`em3.model.VARIANTS` (the model, through the same
``OnlineLearner`` with the same defaults that ``em3 learn`` and the demo use) and the
baselines of :mod:`em3.baselines` (``item_ctr``, ``user_item_bias``, ``fm_genres``).

Tuning protocol: every default is chosen on the first 20,000 events (the default
``--max-events``); figures are reported on all 100,000 (``--max-events 0``) as the
mean over seeds, each seed beside it:

    python benchmarks/quality.py --dataset ml100k --max-events 0 --seeds 0,1,2 \
        --variants em3,id_only,content_frozen,no_cic,text_only,image_only,item_ctr,user_item_bias

The last line printed is one JSON object ``{"dataset", "model", "runtime",
"variants": {NAME: {figures..., "seeds": {SEED: {...}}}}, "settings"}``.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from em3.baselines import BASELINES  # noqa: E402
from em3.model.config import VARIANTS  # noqa: E402

logger = logging.getLogger("benchmarks.quality")

COLD_K = 5
#: The tuning window: every default of ModelConfig and the learner is chosen on the
#: first this-many events; figures are reported on all of them (``--max-events 0``).
TUNING_EVENTS = 20_000


def _cold_mask(samples) -> np.ndarray:
    """True at each item's first :data:`COLD_K` impressions in the stream."""
    seen: dict[str, int] = {}
    cold = np.zeros(len(samples), dtype=bool)
    for i, s in enumerate(samples):
        k = seen.get(s.impression.item_id, 0)
        cold[i] = k < COLD_K
        seen[s.impression.item_id] = k + 1
    return cold


def _metrics(samples, preds: np.ndarray) -> dict:
    from em3.metrics import auc, gauc, logloss

    cold = _cold_mask(samples)
    labels = np.array([s.label for s in samples], dtype=np.int8)
    users = np.array([s.impression.user_id for s in samples], dtype=object)
    return {"auc": auc(labels, preds), "gauc": gauc(users, labels, preds), "cold_auc": auc(labels[cold], preds[cold]),
            "warm_auc": auc(labels[~cold], preds[~cold]), "logloss": logloss(labels, preds),
            "mean_pred": float(preds.mean()), "ctr": float(labels.mean()), "n": len(samples),
            "cold_n": int(cold.sum())}


def run_baseline(name: str, samples, items, *, batch_size: int, seed: int) -> dict:
    """Prequential run of a simple baseline (:mod:`em3.baselines`); returns its metrics."""
    from em3.baselines import make_baseline

    t0 = time.perf_counter()
    model = make_baseline(name, genres=lambda iid: items[iid].attributes.get("genres", "").split("|")
                          if iid in items else (), seed=seed)
    preds = np.zeros(len(samples))
    for start in range(0, len(samples), batch_size):
        batch = samples[start:start + batch_size]
        imps = [s.impression for s in batch]
        preds[start:start + len(batch)] = model.predict(imps)
        model.update(imps, [s.label for s in batch])
    out = _metrics(samples, preds)
    wall = time.perf_counter() - t0
    out.update({"samples_per_s": len(samples) / wall, "wall_s": wall, "trainable_params": 0})
    return _rounded(out)


def run_variant(name: str, samples, histories, store, *, batch_size: int, device: str, seed: int,
                overrides: dict, learner_kwargs: dict, split: float = 0.8, log_every: int = 20,
                inspect=None) -> dict:
    """Prequential run of one model variant; returns its metrics (and, with ``inspect``,
    a callable taking the trained learner, the figures it returns)."""
    from em3.metrics import auc, gauc, logloss
    from em3.model import ModelConfig
    from learners import OnlineLearner

    t_start = time.perf_counter()
    cfg = ModelConfig.for_variant(name, **{"seed": seed, **overrides})
    learner = OnlineLearner(cfg, store, device=device, seed=seed, **learner_kwargs)
    n = len(samples)
    labels = np.array([s.label for s in samples], dtype=np.int8)
    preds = np.zeros(n, dtype=np.float64)
    cut = int(n * split)
    split_preds = None
    t_loop, cpu_loop = time.perf_counter(), time.process_time()
    step = 0
    for lo, hi in ((0, cut), (cut, n)):
        if lo == cut and cut < n:  # the frozen 80% model scores the last 20% first
            split_preds = learner.score(samples[cut:], histories[cut:], batch_size=1024)
        for start in range(lo, hi, batch_size):
            stop = min(hi, start + batch_size)
            # The forward pass before the update gives the test-then-train predictions.
            stats = learner.learn_batch(samples[start:stop], histories[start:stop], return_probs=True)
            preds[start:stop] = stats["probs"]
            step += 1
            if step % log_every == 0:
                logger.info("%s: %5.1f%% events, loss %.4f, auc so far %.4f, %.0f ev/s", name, 100 * stop / n,
                            stats["rank_loss"], auc(labels[:stop], preds[:stop]),
                            stop / (time.perf_counter() - t_loop))
    loop_s = time.perf_counter() - t_loop
    # CPU time of every thread of this process over the loop: core-seconds, which
    # other processes on a shared machine inflate less than wall time.
    loop_cpu_s = time.process_time() - cpu_loop
    out = _metrics(samples, preds)
    out.update({"samples_per_s": n / loop_s, "trainable_params": learner.num_trainable_params(),
                "core_s_per_1m": loop_cpu_s / n * 1e6, "snapshot_bytes": _snapshot_bytes(learner, cfg),
                "wall_s": time.perf_counter() - t_start})
    if inspect is not None:
        out.update(inspect(learner))
    attention = learner.modality_attention(sorted({s.impression.item_id for s in samples}))
    if attention:
        out["modality_attention"] = attention
    if split_preds is not None:
        y, c = labels[cut:], _cold_mask(samples)[cut:]
        users = np.array([s.impression.user_id for s in samples[cut:]], dtype=object)
        out.update({"split_auc": auc(y, split_preds), "split_gauc": gauc(users, y, split_preds),
                    "split_logloss": logloss(y, split_preds),
                    "split_cold_auc": auc(y[c], split_preds[c]) if c.any() else float("nan")})
    return _rounded(out)


def _snapshot_bytes(learner, cfg) -> int:
    """Bytes of the full snapshot a learner of ``cfg`` publishes (safetensors of its
    trainable state and counters, :func:`em3.snapshot.pack`)."""
    from em3.snapshot import pack

    return pack(learner.state_dict(), model_line="quality", version=1, config=cfg)[1].num_bytes


def _identical_variants(names: list[str], overrides: dict) -> dict[str, str]:
    """``{variant: earlier variant}`` for model variants whose ModelConfig (label aside)
    equals an earlier one's: e.g. ``no_cic`` while the default CIC weight is 0. They are
    run once; the report marks the copy with ``same_config_as``."""
    from em3.model import ModelConfig

    seen: dict[str, str] = {}
    out: dict[str, str] = {}
    for name in names:
        if name in BASELINES:
            continue
        key = json.dumps({**ModelConfig.for_variant(name, **overrides).to_dict(), "variant": ""}, sort_keys=True)
        if key in seen:
            out[name] = seen[key]
        else:
            seen[key] = name
    return out


def _rounded(out: dict) -> dict:
    return {k: (round(v, 5) if isinstance(v, float) else _rounded(v) if isinstance(v, dict) else v)
            for k, v in out.items()}


def _mean_over_seeds(per_seed: dict[int, dict]) -> dict:
    """Mean of every numeric figure over seeds (nested dicts too), plus ``seeds``."""
    def mean(rows: list) -> object:
        if all(isinstance(r, dict) for r in rows):
            return {k: mean([r[k] for r in rows]) for k in rows[0] if all(k in r for r in rows)}
        if all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in rows):
            return float(np.mean(rows))
        return rows[0]

    out = _rounded(mean(list(per_seed.values())))
    out["seeds"] = {str(seed): r for seed, r in per_seed.items()}
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="ml100k", choices=["ml100k"])
    p.add_argument("--variants", default="em3,id_only,item_ctr,user_item_bias",
                   help=f"model variants ({', '.join(VARIANTS)}) and baselines ({', '.join(BASELINES)})")
    p.add_argument("--max-events", type=int, default=TUNING_EVENTS,
                   help=f"first N events in time order (default {TUNING_EVENTS:,}: the tuning window every default "
                        "is chosen on); 0 for all 100,000, the reported figures")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; figures are means, per seed beside them")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=None, help="dense learning rate (default: the learners' default)")
    p.add_argument("--learner-set", action="append", default=[], metavar="KEY=JSON",
                   help="OnlineLearner keyword override, e.g. --learner-set sparse_lr=0.05")
    p.add_argument("--history-len", type=int, default=100)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                   help="ModelConfig override for every model variant, e.g. --set cic_weight=0.01")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)

    import torch

    from em3.data import click_histories, load_ml100k
    from em3.stores import InMemoryContentStore
    from learners.online import LEARNER_DEFAULTS

    torch.set_num_threads(args.threads)
    overrides = {"history_len": args.history_len}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value)
    learner_kwargs = {} if args.lr is None else {"lr": args.lr}
    for item in args.learner_set:
        key, _, value = item.partition("=")
        learner_kwargs[key] = json.loads(value)
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS and n not in BASELINES]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {sorted(VARIANTS) + list(BASELINES)}")
    data = load_ml100k(max_events=args.max_events or None)
    histories = click_histories(data.samples, args.history_len)
    store = InMemoryContentStore(data.items.values())
    runs: dict[str, dict[int, dict]] = {n: {} for n in names}
    same_as = _identical_variants(names, overrides)
    for seed in seeds:
        for name in names:
            if name in same_as:  # the same ModelConfig as an earlier variant: the same run
                runs[name][seed] = runs[same_as[name]][seed]
                continue
            logger.info("variant %s, seed %d ...", name, seed)
            torch.manual_seed(seed)
            if name in BASELINES:
                r = run_baseline(name, data.samples, data.items, batch_size=args.batch_size, seed=seed)
            else:
                r = run_variant(name, data.samples, histories, store, batch_size=args.batch_size,
                                device=args.device, seed=seed, overrides=overrides, learner_kwargs=learner_kwargs)
            runs[name][seed] = r
            logger.info("%s seed %d: %s", name, seed, r)
    results = {name: _mean_over_seeds(per_seed) for name, per_seed in runs.items()}
    for name, first in same_as.items():
        results[name]["same_config_as"] = first
    cols = ["auc", "gauc", "cold_auc", "logloss", "mean_pred", "split_auc", "samples_per_s", "wall_s"]
    print(f"means over seeds {seeds}, {len(data.samples):,} events")
    print("| variant | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name, r in results.items():
        print(f"| {name} | " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    report = {"dataset": args.dataset, "model": "default ModelConfig per variant (em3.model.VARIANTS)",
              "runtime": f"in-process OnlineLearner, {args.device}, {args.threads} threads",
              "variants": results,
              "settings": {"events": len(data.samples), "max_events": args.max_events, "seeds": seeds,
                           "batch_size": args.batch_size, "learner": {**LEARNER_DEFAULTS, **learner_kwargs},
                           "history_len": args.history_len, "device": args.device, "threads": args.threads,
                           "overrides": overrides, "cold_k": COLD_K}}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
