"""Off-policy evaluation on the Open Bandit Dataset sample, checked against Open Bandit Pipeline.

The standard OBD check: estimate the CTR of the Bernoulli Thompson Sampling
policy (ZOZOTOWN's production prior, action distribution by Monte Carlo) from
the uniform-random logs, and compare with the CTR logged under that policy.
Our estimators (simulators.ope) and obp's run on the same arrays; the
largest absolute difference between them is reported.

Usage::

    python benchmarks/ope_obd.py --campaign all --campaign men --campaign women

The last line printed is one JSON object: for one campaign
``{"campaign", "on_policy_ctr", "estimators": {name: {"estimate", "ci", "rel_error"}},
"max_abs_diff_vs_obp", ...}``; for several, ``{"campaigns": [...], "max_abs_diff_vs_obp"}``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simulators.obd import CAMPAIGNS, bts_action_dist, load_obd  # noqa: E402
from simulators.ope import (  # noqa: E402
    estimate_dr,
    estimate_ips,
    estimate_replay,
    estimate_snips,
    position_item_reward_model,
)


def run_campaign(campaign: str, n_sim: int, seed: int, ci: str, n_bootstrap: int, compare: bool) -> dict:
    started = time.perf_counter()
    logs = load_obd(campaign, "random")
    on_policy = load_obd(campaign, "bts").on_policy_value()
    action_dist = bts_action_dist(campaign, n_rounds=logs.n_rounds, n_sim=n_sim, random_state=seed)
    q_table = position_item_reward_model(logs.reward, logs.action, logs.position, logs.n_actions, logs.len_list)
    q_hat = np.ascontiguousarray(np.broadcast_to(q_table, action_dist.shape))
    kw = dict(ci=ci, n_bootstrap_samples=n_bootstrap, random_state=seed)
    ours = {
        "replay": estimate_replay(logs.reward, logs.action, action_dist, logs.position, **kw),
        "ips": estimate_ips(logs.reward, logs.action, logs.pscore, action_dist, logs.position, **kw),
        "snips": estimate_snips(logs.reward, logs.action, logs.pscore, action_dist, logs.position, **kw),
        "dr": estimate_dr(logs.reward, logs.action, logs.pscore, action_dist, q_hat, logs.position, **kw),
    }
    result = {
        "campaign": campaign,
        "on_policy_ctr": on_policy,
        "estimators": {
            name: {"estimate": e.estimate, "ci": [e.ci_low, e.ci_high],
                   "rel_error": abs(e.estimate - on_policy) / on_policy, "n": e.n}
            for name, e in ours.items()
        },
        "n_rounds": logs.n_rounds,
        "ci_method": ci,
        "n_sim": n_sim,
        "seed": seed,
    }
    if compare:
        from obp.ope import DoublyRobust, InverseProbabilityWeighting, SelfNormalizedInverseProbabilityWeighting
        from obp.policy import BernoulliTS

        args = dict(reward=logs.reward, action=logs.action, position=logs.position, pscore=logs.pscore,
                    action_dist=action_dist)
        theirs = {
            "ips": InverseProbabilityWeighting().estimate_policy_value(**args),
            "snips": SelfNormalizedInverseProbabilityWeighting().estimate_policy_value(**args),
            "dr": DoublyRobust().estimate_policy_value(**args, estimated_rewards_by_reg_model=q_hat),
        }
        diffs = {name: abs(ours[name].estimate - float(v)) for name, v in theirs.items()}
        policy = BernoulliTS(n_actions=logs.n_actions, len_list=logs.len_list, is_zozotown_prior=True,
                             campaign=campaign, random_state=seed)
        obp_dist = policy.compute_batch_action_dist(n_rounds=1, n_sim=n_sim)
        result["obp_estimates"] = {k: float(v) for k, v in theirs.items()}
        result["abs_diff_vs_obp"] = diffs
        result["max_abs_diff_vs_obp"] = max(diffs.values())
        result["action_dist_max_abs_diff_vs_obp"] = float(np.abs(obp_dist[0] - action_dist[0]).max())
    result["wall_s"] = time.perf_counter() - started
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--campaign", action="append", choices=CAMPAIGNS,
                        help="campaign to evaluate (repeatable; default: all)")
    parser.add_argument("--n-sim", type=int, default=100_000, help="Monte Carlo draws for the BTS policy")
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--ci", choices=("normal", "bootstrap"), default="normal")
    parser.add_argument("--n-bootstrap", type=int, default=10_000)
    parser.add_argument("--no-obp", action="store_true", help="skip the comparison with obp")
    args = parser.parse_args(argv)
    campaigns = args.campaign or ["all"]
    results = []
    for campaign in campaigns:
        r = run_campaign(campaign, args.n_sim, args.seed, args.ci, args.n_bootstrap, not args.no_obp)
        results.append(r)
        est = ", ".join(f"{k}={v['estimate']:.5f} ({v['rel_error']:.1%})" for k, v in r["estimators"].items())
        print(f"{campaign}: on-policy CTR {r['on_policy_ctr']:.5f}; {est}", file=sys.stderr)
    if len(results) == 1:
        out = results[0]
    else:
        diffs = [r["max_abs_diff_vs_obp"] for r in results if "max_abs_diff_vs_obp" in r]
        out = {"campaigns": results, "max_abs_diff_vs_obp": max(diffs) if diffs else None}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
