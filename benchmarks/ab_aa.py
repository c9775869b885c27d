"""A/A false-positive rate and planted-lift power of the always-valid sequential test (mSPRT).

Each run is a seeded A/B experiment on two Bernoulli click streams, looked at
after every observation pair (the most peeking possible). In A/A runs both
arms have CTR ``--ctr``; the rate of runs in which the mSPRT ever rejects is
the false-positive rate, to be at most ``alpha``. In planted-lift runs arm B's
CTR is ``ctr * (1 + lift)``; the rate of rejections is the power. For
comparison, the same A/A streams under a fixed-horizon z-test looked at once
(valid) and peeked at every ``--peek-every`` observations (invalid).

``--world-runs N`` adds N seeded experiments of the full A/B runner on the
simulated world (random vs random for A/A, random vs a noisy oracle for the
lift), slower (about half a second each).

Usage::

    python benchmarks/ab_aa.py --runs 1000

The last line printed is one JSON object with ``aa_false_positive_rate``,
``alpha`` and ``planted_lift_power``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simulators.sequential import msprt_path, peeking_z_test_rejects, z_test  # noqa: E402


def simulate(p_a: float, p_b: float, runs: int, horizon: int, tau2: float, alpha: float, seed: int,
             min_samples: int, peek_every: int, chunk: int = 100) -> dict:
    rng = np.random.default_rng(seed)
    reject, stop, peek, once = [], [], [], []
    n = np.arange(1, horizon + 1, dtype=np.float64)
    looks = slice(peek_every - 1, None, peek_every)
    for start in range(0, runs, chunk):
        b = min(chunk, runs - start)
        a_sum = (rng.random((b, horizon)) < p_a).cumsum(axis=1)  # (b, T)
        b_sum = (rng.random((b, horizon)) < p_b).cumsum(axis=1)  # (b, T)
        nn = np.broadcast_to(n, (b, horizon))
        out = msprt_path(nn, a_sum, nn, b_sum, tau2=tau2, alpha=alpha, min_samples=min_samples)
        reject.append(out["reject"])
        stop.append(out["stop_index"])
        peek.append(peeking_z_test_rejects(nn[:, looks], a_sum[:, looks], nn[:, looks], b_sum[:, looks], alpha))
        once.append(z_test(nn[:, -1], a_sum[:, -1], nn[:, -1], b_sum[:, -1]) <= alpha)
    reject_all = np.concatenate(reject)
    stops = np.concatenate(stop)
    return {
        "msprt_rejection_rate": float(reject_all.mean()),
        "median_stop_fraction": float(np.median(stops[reject_all] + 1) / horizon) if reject_all.any() else None,
        "peeking_z_test_rejection_rate": float(np.concatenate(peek).mean()),
        "fixed_horizon_z_test_rejection_rate": float(np.concatenate(once).mean()),
    }


def world_runs(runs: int, alpha: float, tau2: float, n_requests: int, seed: int) -> dict:
    from simulators.ab import ABConfig, ABRunner
    from simulators.rankers import OracleRanker, RandomRanker
    from simulators.world import World, WorldConfig

    aa = lift = 0
    for r in range(runs):
        s = seed + r
        world = World(WorldConfig(seed=s, n_users=300, n_items=200, horizon_s=86_400.0))
        cfg = ABConfig(n_requests=n_requests, seed=s, alpha=alpha, tau2=tau2, check_every=50)
        aa += ABRunner(world, {"a": RandomRanker("a", s), "b": RandomRanker("b", s + 10**6)}, cfg).run().tests["b"]["reject"]
        world = World(WorldConfig(seed=s, n_users=300, n_items=200, horizon_s=86_400.0))
        arms = {"a": RandomRanker("a", s), "b": OracleRanker(world, "b", noise=3.0, seed=s)}
        lift += ABRunner(world, arms, cfg).run().tests["b"]["reject"]
    return {"runs": runs, "n_requests": n_requests, "aa_false_positive_rate": aa / runs,
            "planted_lift_power": lift / runs}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1000, help="seeded runs per setting (>= 200)")
    parser.add_argument("--horizon", type=int, default=20_000, help="observations per arm per run")
    parser.add_argument("--ctr", type=float, default=0.05)
    parser.add_argument("--lift", type=float, default=0.2, help="planted relative lift of arm B")
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--tau2", type=float, default=1e-4, help="mSPRT mixing variance")
    parser.add_argument("--min-samples", type=int, default=100)
    parser.add_argument("--peek-every", type=int, default=500)
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--world-runs", type=int, default=0)
    parser.add_argument("--world-requests", type=int, default=3000)
    args = parser.parse_args(argv)
    if args.runs < 200:
        parser.error(f"--runs must be >= 200, but {args.runs} is given")
    started = time.perf_counter()
    common = dict(runs=args.runs, horizon=args.horizon, tau2=args.tau2, alpha=args.alpha,
                  min_samples=args.min_samples, peek_every=args.peek_every)
    aa = simulate(args.ctr, args.ctr, seed=args.seed, **common)
    planted = simulate(args.ctr, args.ctr * (1 + args.lift), seed=args.seed + 1, **common)
    out = {
        "aa_false_positive_rate": aa["msprt_rejection_rate"],
        "alpha": args.alpha,
        "planted_lift_power": planted["msprt_rejection_rate"],
        "runs": args.runs,
        "mc_slack_3sd": 3 * math.sqrt(args.alpha * (1 - args.alpha) / args.runs),
        "horizon_per_arm": args.horizon,
        "looks": "every observation",
        "base_ctr": args.ctr,
        "planted_relative_lift": args.lift,
        "tau2": args.tau2,
        "planted_median_stop_fraction": planted["median_stop_fraction"],
        "aa_peeking_z_test_fpr": aa["peeking_z_test_rejection_rate"],
        "aa_fixed_horizon_z_test_fpr": aa["fixed_horizon_z_test_rejection_rate"],
        "planted_fixed_horizon_z_test_power": planted["fixed_horizon_z_test_rejection_rate"],
        "peek_every": args.peek_every,
    }
    if args.world_runs > 0:
        out["world"] = world_runs(args.world_runs, args.alpha, args.tau2, args.world_requests, args.seed)
    out["wall_s"] = time.perf_counter() - started
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
