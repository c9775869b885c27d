"""Training-step cost of EM3 with LoRA versus full fine-tuning, by sequence length.

Each (sequence length, mode) runs in its own subprocess so its peak RSS is its own.
The batch is ``--batch-size`` samples (default 256) whose histories hold
``seq_len`` items drawn from a synthetic catalogue of ``--catalog`` items (text
titles and synthetic posters), so every step encodes every unique item of the batch
(at most the catalogue) through the trainable encoder layers. One warm-up step fills
the frozen-prefix cache (LoRA) and is not timed.

    python benchmarks/train_step.py                 # seq_len 50, 200, 1000 x lora, full

The last line printed is ``{"runs": [{seq_len, mode, batch_size, samples_per_s,
peak_rss_mb, trainable_params, unique_items, step_s}, ...], "settings": {...}}``.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi", "Western", "Animation"]


def _one(seq_len: int, mode: str, batch_size: int, catalog: int, steps: int, device: str, threads: int,
         checkpointing: bool) -> dict:
    import numpy as np
    import torch

    from em3.data.images import render_poster
    from em3.model import ModelConfig
    from em3.stores import InMemoryContentStore
    from em3.types import Impression, ItemContent, Sample
    from learners import OnlineLearner

    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    items = []
    for k in range(catalog):
        g = [GENRES[k % 8], GENRES[(k * 3) % 8]]
        title = f"Film {k} of the {g[0].lower()} kind"
        items.append(ItemContent(f"it{k}", text=f"{title} ({1950 + k % 50}) | {' '.join(g)}",
                                 image=render_poster(title, 1950 + k % 50, g, 96)))
    variant = "em3" if mode == "lora" else "full_finetune"
    cfg = ModelConfig.for_variant(variant, history_len=seq_len)
    learner = OnlineLearner(cfg, InMemoryContentStore(items), device=device, seed=0,
                            gradient_checkpointing=checkpointing)

    def batch(step: int):
        samples, hists = [], []
        for b in range(batch_size):
            t = 1.7e9 + step * batch_size + b
            imp = Impression(f"m{t}", f"r{t}", f"u{rng.integers(5000)}", f"it{rng.integers(catalog)}", 0, t)
            samples.append(Sample(imp, int(rng.random() < 0.3), t))
            hists.append([f"it{i}" for i in rng.integers(catalog, size=seq_len)])
        return samples, hists

    learner.learn_batch(*batch(0))  # warm-up: fills the prefix cache, allocator
    times, uniq = [], 0
    for s in range(steps):
        data = batch(s + 1)
        t0 = time.perf_counter()
        stats = learner.learn_batch(*data)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        uniq = stats["unique_items"]
    step_s = float(np.mean(times))
    out = {"seq_len": seq_len, "mode": mode, "batch_size": batch_size, "samples_per_s": round(batch_size / step_s, 2),
           "step_s": round(step_s, 3), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
           "trainable_params": learner.num_trainable_params(), "unique_items": uniq}
    if device.startswith("cuda"):
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", default="50,200,1000")
    p.add_argument("--modes", default="lora,full")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--catalog", type=int, default=400, help="synthetic catalogue size (unique items per batch <= it)")
    p.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--one", nargs=2, metavar=("SEQ_LEN", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(_one(int(args.one[0]), args.one[1], args.batch_size, args.catalog, args.steps,
                              args.device, args.threads, args.gradient_checkpointing)))
        return {}
    runs = []
    for mode in args.modes.split(","):
        for seq_len in [int(x) for x in args.seq_lens.split(",")]:
            cmd = [sys.executable, __file__, "--one", str(seq_len), mode, "--batch-size", str(args.batch_size),
                   "--catalog", str(args.catalog), "--steps", str(args.steps), "--device", args.device,
                   "--threads", str(args.threads)] + (["--gradient-checkpointing"] if args.gradient_checkpointing else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                run = {"seq_len": seq_len, "mode": mode, "batch_size": args.batch_size,
                       "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
            else:
                run = json.loads(proc.stdout.strip().splitlines()[-1])
            print(json.dumps(run), file=sys.stderr)
            runs.append(run)
    report = {"runs": runs, "settings": {"batch_size": args.batch_size, "catalog": args.catalog, "steps": args.steps,
                                         "device": args.device, "threads": args.threads,
                                         "gradient_checkpointing": args.gradient_checkpointing}}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
