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

Closed loop (``--closed-loop``): A/A experiments of two *learning* arms through the
real serving path, in one process (:mod:`em3.app.closed_loop`): simulated users,
the server's router and hot reloads, the join, one learner per line honouring the
experiment's training-data policy, the user-level mSPRT (and, beside it on the
same looks, the naive per-request one). Each run is one seed: a fresh world,
salt, arrivals and models. Designs (``--designs``), the same seeds for each:

* ``split`` (reported as ``aa_false_positive_rate``): the design users run, the
  default policy; both lines start from the same seeds, as ``em3 learn`` gives
  every line seed 0, and each learns only from its own arm's traffic;
* ``split_independent``: the same, the lines seeded differently;
* ``pooled``: both lines learn from all traffic; with equal seeds their models
  stay identical (the arms are one system served twice);
* ``frozen``: no learning; both arms serve the same initial snapshot.

Per design: the rejection rates of the user-level and per-request mSPRT (ever,
over all looks) and of each fixed-horizon test at the end, the spread of the
final difference across runs against the standard error the user-level test
assumed (``variance_ratio`` = var(diff) / mean(se^2): 1 when the test sees all
the variance), the fixed-horizon rate once the variance is inflated by that ratio
(estimated on the other half of the runs: 2-fold cross-fitting by seed parity), CTR
and prequential AUC of the arms. ``--rows-out FILE`` keeps every run's row (JSON
lines).

    python benchmarks/ab_aa.py --closed-loop                 # 200 runs per design, 2 workers
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from statistics import NormalDist

# Run as a script, every process here runs one thread (the closed loop's parallelism is
# its worker pool, forked from this one). Set before numpy and torch load: with their
# default thread pools, two workers on two cores spin against each other, and a
# closed-loop run took 54-70 s instead of 6. Importing the module changes nothing.
if __name__ == "__main__":
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

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


# -- closed loop ---------------------------------------------------------------------

#: design -> ClosedLoopConfig fields
DESIGNS = {
    "split": {"training_data": "split", "line_seeds": (0, 0)},
    "split_independent": {"training_data": "split", "line_seeds": (0, 1)},
    "pooled": {"training_data": "pooled", "line_seeds": (0, 0)},
    "frozen": {"training_data": "split", "line_seeds": (0, 0), "learn": False},
}


def _closed_loop_run(task: tuple[str, int, dict]) -> dict:
    """One seeded A/A run of ``design`` (in a worker process)."""
    import torch

    from em3.app.closed_loop import ClosedLoop, ClosedLoopConfig
    from simulators.ab import ABConfig
    from simulators.world import World, WorldConfig

    design, seed, p = task
    torch.set_num_threads(1)
    world = World(WorldConfig(seed=seed, n_users=p["users"], n_items=p["items"], n_candidates=p["candidates"],
                              new_items_per_hour=0.0, calibration="synthetic"))
    config = ClosedLoopConfig(learn_every_s=p["learn_every_s"], join_window_s=p["window_s"],
                              batch_size=p["batch_size"], **DESIGNS[design])
    t0, c0 = time.perf_counter(), time.process_time()
    loop = ClosedLoop(world, config, salt=f"aa-{seed}")
    ab = ABConfig(n_requests=p["requests"], k=p["k"], request_rate_per_s=p["rate"], seed=seed,
                  alpha=p["alpha"], tau2=p["tau2"], min_samples=p["min_users"], check_every=p["check_every"],
                  unit="user", shadow_unit="request")
    report = loop.run(ab)
    user, request = report.tests["aa_b"], report.shadow_tests["aa_b"]
    fixed = user["fixed_horizon"]
    z = 1.959963984540054  # the fixed-horizon interval is diff +- z se at alpha 0.05 per test
    se = (fixed["ci_high"] - fixed["ci_low"]) / (2 * z) if math.isfinite(fixed["ci_high"]) else math.nan
    aucs = (report.timeline[-1].get("metrics") or {}).get("prequential_auc", {})
    return {
        "design": design, "seed": seed, "user_reject": bool(user["reject"]),
        "request_reject": bool(request["reject"]),
        "user_fixed_reject": fixed["p_value"] <= p["alpha"],
        "request_fixed_reject": request["fixed_horizon"]["p_value"] <= p["alpha"],
        "diff": fixed["diff"], "se": se,
        "users": [report.final[a]["users"] for a in report.arms],
        "ctr": [report.final[a]["ctr"] for a in report.arms],
        "auc": [aucs.get(a, math.nan) for a in report.arms],
        "cycles": loop.cycles, "samples": loop.samples, "max_param_diff": loop.state_difference(),
        "seconds": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
    }


def _crossfit_inflated_fpr(rows: list[dict], alpha: float) -> tuple[float, list[float]]:
    """Fixed-horizon false-positive rate with the user-level variance inflated by the
    A/A variance ratio, each half of the runs (by seed parity) inflated by the ratio
    measured on the other half, so no run is tested with a factor it helped estimate."""
    z = NormalDist().inv_cdf(1 - alpha / 2)
    halves = [[r for r in rows if r["seed"] % 2 == h] for h in (0, 1)]
    ratios, rejects = [], []
    for h in (0, 1):
        other = halves[1 - h]
        ratio = float(np.var([r["diff"] for r in other], ddof=1) / np.nanmean([r["se"] ** 2 for r in other]))
        ratios.append(ratio)
        rejects += [abs(r["diff"]) > z * r["se"] * math.sqrt(max(ratio, 1.0)) for r in halves[h]]
    return float(np.mean(rejects)), ratios


def _summary(rows: list[dict], alpha: float) -> dict:
    diffs = np.array([r["diff"] for r in rows])
    se2 = np.array([r["se"] ** 2 for r in rows])
    n = len(rows)
    inflated_fpr, half_ratios = _crossfit_inflated_fpr(rows, alpha)
    return {
        "runs": n,
        "user_level_fpr": float(np.mean([r["user_reject"] for r in rows])),
        "request_level_fpr": float(np.mean([r["request_reject"] for r in rows])),
        "user_level_fixed_horizon_fpr": float(np.mean([r["user_fixed_reject"] for r in rows])),
        "request_level_fixed_horizon_fpr": float(np.mean([r["request_fixed_reject"] for r in rows])),
        "mc_se_of_fpr_at_alpha": math.sqrt(alpha * (1 - alpha) / n),
        "mean_diff": float(diffs.mean()),
        "sd_diff": float(diffs.std(ddof=1)),
        "rms_se_user_level": float(math.sqrt(np.nanmean(se2))),
        "variance_ratio": float(diffs.var(ddof=1) / np.nanmean(se2)),
        "user_level_fixed_horizon_fpr_inflated_crossfit": inflated_fpr,
        "variance_ratio_halves": half_ratios,
        "mean_ctr": float(np.mean([np.mean(r["ctr"]) for r in rows])),
        "mean_prequential_auc": float(np.nanmean([np.nanmean(r["auc"]) for r in rows])),
        "mean_users_per_arm": float(np.mean([np.mean(r["users"]) for r in rows])),
        "mean_cycles": float(np.mean([r["cycles"] for r in rows])),
        "runs_with_identical_models": int(sum(r["max_param_diff"] == 0.0 for r in rows)),
        "mean_run_s": float(np.mean([r["seconds"] for r in rows])),
        "mean_run_cpu_s": float(np.mean([r["cpu_s"] for r in rows])),
    }


def closed_loop(args: argparse.Namespace) -> dict:
    from concurrent.futures import ProcessPoolExecutor

    designs = [d for d in args.designs.split(",") if d]
    unknown = [d for d in designs if d not in DESIGNS]
    if unknown or "split" not in designs:
        raise SystemExit(f"--designs must include split and name only {sorted(DESIGNS)}, but {designs} are given")
    params = {"users": args.cl_users, "items": args.cl_items, "candidates": args.cl_candidates, "k": args.cl_k,
              "requests": args.cl_requests, "rate": args.cl_rate, "learn_every_s": args.cl_learn_every_s,
              "window_s": args.cl_window_s, "batch_size": args.cl_batch_size, "alpha": args.alpha,
              "tau2": args.cl_tau2, "min_users": args.cl_min_users, "check_every": args.cl_check_every}
    runs = {d: (args.runs if d == "split" else args.other_runs) for d in designs}
    tasks = [(d, args.seed + r, params) for d in designs for r in range(runs[d])]
    started = time.perf_counter()
    rows: dict[str, list[dict]] = {d: [] for d in designs}
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        for n, row in enumerate(pool.map(_closed_loop_run, tasks, chunksize=2), 1):
            rows[row["design"]].append(row)
            if n % 20 == 0:
                print(f"{n}/{len(tasks)} runs, {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    summaries = {d: _summary(rows[d], args.alpha) for d in designs}
    if args.rows_out:
        with open(args.rows_out, "w") as f:
            for design_rows in rows.values():
                f.writelines(json.dumps(r) + "\n" for r in design_rows)
    cpu_s = sum(r["cpu_s"] for design_rows in rows.values() for r in design_rows)
    primary = summaries["split"]
    return {
        "aa_false_positive_rate": primary["user_level_fpr"],
        "naive_request_level_fpr": primary["request_level_fpr"],
        "alpha": args.alpha,
        "runs": primary["runs"],
        "unit": "user",
        "design": "split training data (the default policy), both lines seeded alike as em3 learn does",
        "target": "aa_false_positive_rate <= alpha + 0.03",
        "target_met": primary["user_level_fpr"] <= args.alpha + 0.03,
        "designs": summaries,
        "params": params,
        "model": "id_only (em3.model.ModelConfig.tiny), real OnlineLearner / LineTrainer / ServingRuntime",
        "runtime": "in_process",
        "workers": args.workers,
        "wall_s": round(time.perf_counter() - started, 1),
        "cpu_s_in_runs": round(cpu_s, 1),
        "wall_s_if_cpus_were_free": round(cpu_s / args.workers, 1),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=None,
                        help="seeded runs per setting (>= 200; default 1000, 200 with --closed-loop)")
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
    cl = parser.add_argument_group("closed loop (--closed-loop)")
    cl.add_argument("--closed-loop", action="store_true", help="A/A of two learning arms through the serving path")
    cl.add_argument("--designs", default="split,split_independent,pooled,frozen",
                    help=f"comma-separated, from {sorted(DESIGNS)}")
    cl.add_argument("--other-runs", type=int, default=100, help="runs of each design other than split")
    cl.add_argument("--workers", type=int, default=2, help="worker processes")
    cl.add_argument("--rows-out", default=None, help="write every run's row here (JSON lines)")
    cl.add_argument("--cl-users", type=int, default=300)
    cl.add_argument("--cl-items", type=int, default=100)
    cl.add_argument("--cl-candidates", type=int, default=20)
    cl.add_argument("--cl-k", type=int, default=10)
    cl.add_argument("--cl-requests", type=int, default=800)
    cl.add_argument("--cl-rate", type=float, default=2.0, help="requests per event second")
    cl.add_argument("--cl-learn-every-s", type=float, default=60.0)
    cl.add_argument("--cl-window-s", type=float, default=60.0)
    cl.add_argument("--cl-batch-size", type=int, default=256)
    cl.add_argument("--cl-tau2", type=float, default=1e-4)
    cl.add_argument("--cl-min-users", type=int, default=50, help="users per arm before the test may reject")
    cl.add_argument("--cl-check-every", type=int, default=100, help="requests between looks")
    args = parser.parse_args(argv)
    if args.runs is None:
        args.runs = 200 if args.closed_loop else 1000
    if args.runs < 200:
        parser.error(f"--runs must be >= 200, but {args.runs} is given")
    if args.closed_loop:
        out = closed_loop(args)
        print(json.dumps(out))
        return out
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
