"""Plot the staged-adoption ladder of ``benchmarks/stages.py``: quality against cost.

    python benchmarks/plot_stages.py docs/results/stages.json docs/adoption-stages.svg

Left: AUC, GAUC and cold AUC of each stage (lines) beside its compute cost (bars,
CPU core-hours per million samples trained, log scale). Right: each stage's lift in AUC
and cold AUC over the stage before, with the seed-to-seed noise band of each and the
core-seconds per million samples the stage adds. The
last line printed is one JSON object ``{"plot": PATH, "stages": N}``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def plot(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.hashsalt"] = "em3-stages"  # the same file for the same figures
    stages = report["stages"]
    names = [s["name"] for s in stages]
    cost = [s["core_s_per_1m"] / 3600.0 for s in stages]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.4))
    xs_all = list(range(len(stages)))
    cost_axis = left.twinx()
    cost_axis.bar(xs_all, cost, 0.55, color="0.85", zorder=0)
    cost_axis.set_yscale("log")
    cost_axis.set_ylabel("compute, CPU core-hours per 1M samples (bars, log)")
    left.set_zorder(cost_axis.get_zorder() + 1)
    left.patch.set_visible(False)
    for key, style in (("auc", "o-"), ("gauc", "s-"), ("cold_auc", "^-")):
        left.plot(xs_all, [s[key] for s in stages], style, label=key)
    left.set_xticks(xs_all, names, rotation=20, fontsize=8)
    left.set_ylabel("prequential figure (lines)")
    left.set_title("quality and cost of each stage")
    left.legend(fontsize=8, loc="upper left")
    left.grid(alpha=0.3)
    rest = stages[1:]
    xs = list(range(len(rest)))
    width = 0.38
    choice = report.get("choice", {})
    for offset, key, label in ((-width / 2, "auc", "AUC lift"), (width / 2, "cold_auc", "cold AUC lift")):
        bars = right.bar([x + offset for x in xs], [s[f"{key}_lift"] for s in rest], width, label=label)
        noise = choice.get(key, {}).get("noise")
        if noise:  # lifts inside the band are within the seed-to-seed spread
            right.axhspan(-noise, noise, color=bars.patches[0].get_facecolor(), alpha=0.12, lw=0)
    for x, row in zip(xs, rest):
        added = row.get("added_core_s_per_1m") or 0.0
        right.annotate(f"{added:+.0f} core-s", (x, 0), textcoords="offset points", xytext=(0, -14),
                       ha="center", fontsize=7, color="0.3")
    right.axhline(0.0, color="black", linewidth=0.8)
    right.set_xticks(xs, [s["name"] for s in rest], rotation=20, fontsize=8)
    right.set_ylabel("lift over the stage before")
    right.set_title("what each stage adds (shaded: seed noise; added cost per 1M samples)", fontsize=9)
    right.legend(fontsize=8)
    right.grid(alpha=0.3, axis="y")
    settings = report.get("settings", {})
    fig.suptitle(f"MovieLens-100K, first {settings.get('events', '?'):,} events, seeds {settings.get('seeds')}; "
                 f"{report.get('runtime', '')}", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, metadata={"Date": None})
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("report", help="JSON written by benchmarks/stages.py --json-out")
    p.add_argument("out", help="the plot (.svg or .png)")
    args = p.parse_args(argv)
    report = json.loads(Path(args.report).read_text())
    plot(report, Path(args.out))
    result = {"plot": args.out, "stages": len(report["stages"])}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
