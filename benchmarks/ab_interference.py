"""Does an online A/B test between learning arms measure the true effect? Bias and
coverage of the estimate under each training-data policy, against ground truth.

The simulated world knows the truth. For each replication (seed ``r``):

* **ground truth**: each arm's CTR when it serves 100% of the population alone
  (run as an A/A of two copies of the arm that share all feedback, which is one
  learner seeing all traffic), with the same world seed; the true effect is the
  mean over replications of ``CTR(treatment alone) - CTR(control alone)``;
* **the A/B test**: the two arms 50/50, users randomised, once per training-data
  policy (``ABConfig.training_data``): ``pooled`` (each arm's learner also learns
  from the other arm's exposures), ``split`` (each learns only from its own) and
  ``weighted`` (each learns from all exposures, weighted by
  :class:`em3.experiment.ArmPropensity` so that they look like its own: Si's
  weighted training); the estimate is the user-level CTR difference (delta
  method), with its fixed-horizon ``1 - alpha`` interval.

Reported per policy: the mean estimate, the bias (mean of estimate - truth), and
the coverage (share of replications whose interval holds the true effect).

The world is one where interference is real: the control explores (epsilon-greedy
popularity learner, epsilon 0.3) and the treatment is greedy (epsilon 0). Alone,
the greedy arm learns only about what it already shows; pooled, it learns from
the explorer's exposures which items are good, and looks better than it would be.

Run::

    python benchmarks/ab_interference.py --replications 50

The last line printed is one JSON object.
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

from simulators.ab import ABConfig, ABRunner  # noqa: E402
from simulators.rankers import EpsilonGreedyRanker  # noqa: E402
from simulators.sequential import fixed_horizon  # noqa: E402
from simulators.world import World, WorldConfig  # noqa: E402

ARMS = {"explore": 0.3, "greedy": 0.0}  # arm -> epsilon; the first is the control


def _world(args: argparse.Namespace, seed: int) -> World:
    return World(WorldConfig(n_users=args.users, n_items=args.items, n_candidates=args.candidates,
                             new_items_per_hour=0.0, seed=seed))


def _config(args: argparse.Namespace, seed: int, training_data: str) -> ABConfig:
    return ABConfig(n_requests=args.requests, k=args.k, request_rate_per_s=args.rate, seed=seed,
                    check_every=args.requests, min_samples=20, training_data=training_data, unit="user",
                    assignment="user", alpha=args.alpha)


def _solo_ctr(args: argparse.Namespace, arm: str, seed: int) -> float:
    """CTR of ``arm`` serving everyone: two copies that share all feedback."""
    world = _world(args, seed)
    copies = {f"{arm}-1": EpsilonGreedyRanker(f"{arm}-1", ARMS[arm], seed=seed),
              f"{arm}-2": EpsilonGreedyRanker(f"{arm}-2", ARMS[arm], seed=seed + 1)}
    report = ABRunner(world, copies, _config(args, seed, "pooled")).run()
    clicks = sum(s["clicks"] for s in report.final.values())
    shown = sum(s["impressions"] for s in report.final.values())
    return clicks / shown


def _ab(args: argparse.Namespace, seed: int, policy: str) -> dict[str, float]:
    world = _world(args, seed)
    arms = {name: EpsilonGreedyRanker(name, eps, seed=seed + n) for n, (name, eps) in enumerate(ARMS.items())}
    report = ABRunner(world, arms, _config(args, seed, policy)).run()
    return report.tests["greedy"]["fixed_horizon"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--replications", type=int, default=50)
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--users", type=int, default=600)
    p.add_argument("--items", type=int, default=400)
    p.add_argument("--candidates", type=int, default=50)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--rate", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument("--explore", type=float, default=ARMS["explore"], help="the control's epsilon")
    args = p.parse_args()
    ARMS["explore"] = args.explore
    t0 = time.time()
    truths: list[float] = []
    runs: dict[str, list[dict[str, float]]] = {"pooled": [], "split": [], "weighted": []}
    for r in range(args.replications):
        truth = _solo_ctr(args, "greedy", r) - _solo_ctr(args, "explore", r)
        truths.append(truth)
        for policy in runs:
            out = _ab(args, r, policy)
            runs[policy].append({**out, "truth": truth})
        print(f"replication {r}: truth {truth:+.4f}, "
              + ", ".join(f"{k} {v[-1]['diff']:+.4f}" for k, v in runs.items()), file=sys.stderr, flush=True)
    # The true effect is an expectation: the mean of the solo differences over the
    # replications (one replication's solo runs are themselves noisy draws).
    true_effect = float(np.mean(truths))
    policies: dict[str, object] = {}
    for policy, rows in runs.items():
        est = np.array([row["diff"] for row in rows])
        err = est - true_effect
        covered = [row["ci_low"] <= true_effect <= row["ci_high"] for row in rows]
        policies[policy] = {"estimate": float(est.mean()), "bias": float(err.mean()),
                            "rmse": float(math.sqrt((err**2).mean())), "ci_coverage": float(np.mean(covered))}
    better = min(("split", "weighted"), key=lambda k: abs(policies[k]["bias"]))  # type: ignore[index]
    print(json.dumps({
        "true_effect": true_effect, "true_effect_se": float(np.std(truths, ddof=1) / math.sqrt(len(truths)))
        if len(truths) > 1 else None, "replications": args.replications, "policies": policies,
        "unit": "user", "alpha": args.alpha, "arms": {"control": "explore (epsilon 0.3)", "treatment": "greedy"},
        "targets": {
            "split_coverage_ge_0.9": policies["split"]["ci_coverage"] >= 0.9,  # type: ignore[index]
            "weighted_coverage_ge_0.9": policies["weighted"]["ci_coverage"] >= 0.9,  # type: ignore[index]
            "better_of_split_weighted": better,
            "better_bias_le_half_pooled":
                abs(policies[better]["bias"]) <= 0.5 * abs(policies["pooled"]["bias"]),  # type: ignore[index]
        },
        "model": "EpsilonGreedyRanker (popularity learners in the simulated world)",
        "runtime": "in_process", "wall_s": round(time.time() - t0, 1),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
