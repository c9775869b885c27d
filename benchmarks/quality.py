"""Ranking quality of EM3 and its ablations on a real, time-ordered stream.

Prequential (test-then-train) over MovieLens-100K in time order: each mini-batch is
scored with the current model, then learned. Reports AUC, GAUC (per user), log loss,
and ``cold_auc`` (AUC over each item's first 5 impressions in the stream), plus a
chronological 80/20 split figure: the model as trained (one prequential pass) on the
first 80% of events, frozen, scored on the last 20%.

    python benchmarks/quality.py --dataset ml100k --variants em3,id_only,content_frozen,no_cic

The last line printed is one JSON object
``{"dataset": ..., "variants": {NAME: {...}}, "settings": {...}}``.
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

logger = logging.getLogger("benchmarks.quality")

COLD_K = 5


def run_variant(name: str, samples, histories, store, *, batch_size: int, lr: float, content_lr: float | None,
                device: str, seed: int, overrides: dict, split: float = 0.8, log_every: int = 20) -> dict:
    """Prequential run of one variant; returns its metrics."""
    from em3.metrics import auc, gauc, logloss
    from em3.model import ModelConfig
    from learners import OnlineLearner

    t_start = time.perf_counter()
    cfg = ModelConfig.for_variant(name, **overrides)
    learner = OnlineLearner(cfg, store, lr=lr, content_lr=content_lr, device=device, seed=seed)
    n = len(samples)
    seen: dict[str, int] = {}
    cold = np.zeros(n, dtype=bool)
    for i, s in enumerate(samples):
        k = seen.get(s.impression.item_id, 0)
        cold[i] = k < COLD_K
        seen[s.impression.item_id] = k + 1
    labels = np.array([s.label for s in samples], dtype=np.int8)
    users = np.array([s.impression.user_id for s in samples], dtype=object)
    preds = np.zeros(n, dtype=np.float64)
    cut = int(n * split)
    split_preds = None
    t_loop = time.perf_counter()
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
                done = stop / n
                logger.info("%s: %5.1f%% events, loss %.4f, auc so far %.4f, %.0f ev/s", name, 100 * done,
                            stats["rank_loss"], auc(labels[:stop], preds[:stop]),
                            stop / (time.perf_counter() - t_loop))
    loop_s = time.perf_counter() - t_loop
    out = {
        "auc": auc(labels, preds), "gauc": gauc(users, labels, preds), "cold_auc": auc(labels[cold], preds[cold]),
        "warm_auc": auc(labels[~cold], preds[~cold]),
        "logloss": logloss(labels, preds), "samples_per_s": n / loop_s,
        "trainable_params": learner.num_trainable_params(), "wall_s": time.perf_counter() - t_start,
        "n": n, "cold_n": int(cold.sum()),
    }
    if split_preds is not None:
        y, c = labels[cut:], cold[cut:]
        out.update({"split_auc": auc(y, split_preds), "split_gauc": gauc(users[cut:], y, split_preds),
                    "split_logloss": logloss(y, split_preds),
                    "split_cold_auc": auc(y[c], split_preds[c]) if c.any() else float("nan")})
    return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in out.items()}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="ml100k", choices=["ml100k"])
    p.add_argument("--variants", default="em3,id_only,content_frozen,no_cic")
    p.add_argument("--max-events", type=int, default=50_000,
                   help="first N events in time order (default 50,000, half the stream, to fit 30 minutes on a "
                        "shared 2-core CPU; 0 for all 100,000)")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--content-lr", type=float, default=None,
                   help="learning rate of LoRA and fusion (default: --lr / 16, the learners' default)")
    p.add_argument("--history-len", type=int, default=100)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                   help="ModelConfig override for every variant, e.g. --set cic_weight=0.01")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)

    import torch

    from em3.data import click_histories, load_ml100k
    from em3.stores import InMemoryContentStore
    from learners.online import CONTENT_LR_SCALE

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    overrides = {"history_len": args.history_len}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value)
    data = load_ml100k(max_events=args.max_events or None)
    histories = click_histories(data.samples, args.history_len)
    store = InMemoryContentStore(data.items.values())
    results = {}
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        logger.info("variant %s ...", name)
        results[name] = run_variant(name, data.samples, histories, store, batch_size=args.batch_size, lr=args.lr,
                                    content_lr=args.content_lr,
                                    device=args.device, seed=args.seed, overrides=overrides)
        logger.info("%s: %s", name, results[name])
    cols = ["auc", "gauc", "cold_auc", "logloss", "split_auc", "split_cold_auc", "samples_per_s",
            "trainable_params", "wall_s"]
    print("| variant | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name, r in results.items():
        print(f"| {name} | " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    content_lr = args.content_lr if args.content_lr is not None else args.lr * CONTENT_LR_SCALE
    report = {"dataset": args.dataset, "variants": results,
              "settings": {"events": len(data.samples), "batch_size": args.batch_size, "lr": args.lr,
                           "content_lr": content_lr,
                           "history_len": args.history_len, "device": args.device, "threads": args.threads,
                           "seed": args.seed, "overrides": overrides, "cold_k": COLD_K}}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
