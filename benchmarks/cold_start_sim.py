"""The demo's world and lines in simulated time: a fast, deterministic cold-start check.

``em3 demo`` runs its world against the real stack (broker, join, Ray learners,
server) paced by the wall clock, so one run takes five minutes and what each
learner has seen when a request comes moves from run to run. This script runs the
same world (:func:`em3.app.demo.make_world` with a :class:`em3.app.demo.DemoConfig`),
the same A/B runner and the same model lines (``ModelConfig.for_variant``, the
learners' defaults), but in-process and in simulated time: each line is an
:class:`learners.OnlineLearner` that ranks by its own click probabilities and learns
its arm's labelled impressions in micro-batches (every ``--batch-every-s`` seconds
of event time, each impression labelled ``window_s`` after it was served, as the
stream join does; the user's history is the items they clicked before it).
Each line ranks with the server's slot for new items (``DemoConfig.fresh_slot``,
:func:`serving.ranking.promote_fresh`); ``--set fresh_slot=null`` ranks by score alone.

It is a tool for choosing the demo's world settings on seeds other than the ones
reported, not the demo's figure: that comes from ``em3 demo`` itself (``docs/results.md``).

    python benchmarks/cold_start_sim.py --seeds 1,2,3
    python benchmarks/cold_start_sim.py --seeds 1 --set new_items_per_minute=40
    python benchmarks/cold_start_sim.py --seeds 1,2,3,4,5 --set fresh_slot=null   # no slot for new items
    python benchmarks/cold_start_sim.py --seeds 1,2 --content-alignment [--model-set fusion_pooled_skip=false]
    python benchmarks/cold_start_sim.py --seeds 1 --positive-timing click   # the join's old timing: calibration

The last line printed is one JSON object: per seed and line, the CTR on cold-start
items (those that arrived during the run), over all their impressions and over each
item's first 10 in the line (``first``), with their mean position, and the ratio of
the first line's to the second's; and ``rank_spearman``: at the end, how well each
line orders, for its own users, the items nobody has seen yet (content only), the
items that arrived during the run, and the initial catalogue, against the world's
true attraction; ``calibration``: each line's mean predicted probability against its
CTR over its prequential pairs, the whole run and the last minute (the demo's window).
``--content-alignment`` measures instead how well each variant's
untrained content embedding tracks the world's hidden item factors.
"""
from __future__ import annotations

import argparse
import bisect
import json
import logging
import sys
import time
from collections import defaultdict, deque
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

logger = logging.getLogger("benchmarks.cold_start_sim")


class SimulatedLine:
    """One model line as an in-process :class:`simulators.rankers.LearningRanker`."""

    def __init__(self, arm: str, variant: str, content: Any, *, seed: int, window_s: float, batch_every_s: float,
                 model_overrides: Mapping[str, Any], model_scale: str = "default",
                 positive_timing: str = "window_close", fresh_slot: int | None = None) -> None:
        from em3.model import ModelConfig
        from learners import OnlineLearner

        self.arm, self.window_s, self.batch_every_s = arm, window_s, batch_every_s
        # When a clicked impression's sample is learned: when its window closes, with the
        # negatives served beside it (the join's default), or when the click comes ("click").
        self.positive_timing = positive_timing
        self.fresh_slot = fresh_slot  # the server's slot for new items (serving.ranking.promote_fresh)
        self.click_time: dict[str, float] = {}
        make = ModelConfig.tiny if model_scale == "tiny" else ModelConfig.for_variant
        config = make(variant, **{"seed": seed, **model_overrides})
        self.learner = OnlineLearner(config, content, device="cpu", seed=seed)
        self.history_len = config.history_len
        self.served: deque = deque()  # impressions waiting for their label
        self.clicked: set[str] = set()
        self.users: set[str] = set()  # every user this line ranked for
        self.clicks_of: dict[str, tuple[list[float], list[str]]] = defaultdict(lambda: ([], []))
        self.next_batch = None
        self.steps = 0
        self.prequential: list[tuple[float, int, float]] = []  # (served_at, label, probability before learning)

    def history(self, user_id: str, t: float) -> list[str]:
        times, items = self.clicks_of.get(user_id, ((), ()))
        n = bisect.bisect_left(times, t)
        return list(items[max(0, n - self.history_len): n][::-1])

    def _learn_until(self, now: float) -> None:
        from em3.types import Sample

        if self.next_batch is None:
            self.next_batch = now + self.batch_every_s
        while self.next_batch <= now:
            due = self.next_batch - self.window_s
            batch = []
            if self.positive_timing == "click":
                waiting = deque()
                for imp in self.served:
                    at = self.click_time.get(imp.impression_id)
                    if at is not None and at <= self.next_batch:
                        batch.append(Sample(imp, 1, at))
                    else:
                        waiting.append(imp)
                self.served = waiting
            while self.served and self.served[0].served_at <= due:
                imp = self.served.popleft()
                batch.append(Sample(imp, int(imp.impression_id in self.clicked), imp.served_at + self.window_s))
            if batch:
                stats = self.learner.learn_batch(batch, [self.history(s.impression.user_id, s.impression.served_at)
                                                         for s in batch], return_probs=True)
                self.prequential.extend(zip((s.impression.served_at for s in batch), (s.label for s in batch),
                                            np.asarray(stats["probs"], dtype=float).tolist()))
                self.steps += 1
            self.next_batch += self.batch_every_s

    def rank(self, user_id: str, candidates: Sequence[str], context: Mapping[str, str], k: int) -> Any:
        from em3.types import Impression
        from simulators.rankers import Ranking

        t = float(context["t"])
        self.users.add(user_id)
        self._learn_until(t)
        ctx = {key: v for key, v in context.items() if key != "t"}
        imps = [Impression(f"c{j}", "r", user_id, c, 0, t, context=ctx) for j, c in enumerate(candidates)]
        history = self.history(user_id, t)
        p = self.learner.score(imps, [history] * len(imps))
        order = np.argsort(-p, kind="stable").tolist()
        if self.fresh_slot is not None:
            from serving.ranking import RankingConfig, promote_fresh

            counts = self.learner.model.impression_counts(list(candidates))
            if counts is not None:
                order, _ = promote_fresh(order, counts.tolist(), self.fresh_slot,
                                         RankingConfig().fresh_impressions, k)
        order = order[:k]
        return Ranking(tuple(candidates[i] for i in order), self.arm, scores=tuple(float(p[i]) for i in order))

    def observe(self, events: Sequence[Any], weights: Sequence[float] | None = None) -> None:
        from em3.types import Click, Impression

        for e in events:
            if isinstance(e, Impression):
                self.served.append(e)
            elif isinstance(e, Click):
                self.clicked.add(e.impression_id)
                self.click_time.setdefault(e.impression_id, e.clicked_at)
                times, items = self.clicks_of[e.user_id]
                n = bisect.bisect_right(times, e.clicked_at)
                times.insert(n, e.clicked_at)
                items.insert(n, e.item_id)


def calibration(pairs: Sequence[tuple[float, int, float]], last_s: float = 60.0) -> dict[str, Any]:
    """Mean predicted probability against the CTR of a line's prequential pairs
    ``(served_at, label, probability)``: over the run and over its last ``last_s``
    seconds (the demo's window)."""
    if not pairs:
        return {}
    t, y, p = (np.array(x, dtype=float) for x in zip(*pairs))
    last = t >= t.max() - last_s

    def one(m: np.ndarray) -> dict[str, float]:
        return {"n": int(m.sum()), "mean_prob": round(float(p[m].mean()), 4), "ctr": round(float(y[m].mean()), 4)}

    return {"all": one(np.ones_like(last, dtype=bool)), "last_minute": one(last)}


def ranking_quality(line: SimulatedLine, world: Any, item_ids: Sequence[str], t: float, users: int = 40) -> float:
    """Mean over the first ``users`` of the line's users (those it ranked for) of the
    Spearman correlation between the line's scores of ``item_ids`` and the world's
    true attraction: how well the line orders those items, whatever it showed."""
    from em3.types import Impression

    out = []
    for user in sorted(line.users)[:users]:
        imps = [Impression(f"q{j}", "q", user, i, 0, t, context={"hour": "12", "device": "web"})
                for j, i in enumerate(item_ids)]
        p = line.learner.score(imps, [line.history(user, t)] * len(imps))
        truth = world.attraction(user, list(item_ids), t)
        rp, rt = np.argsort(np.argsort(p)), np.argsort(np.argsort(truth))
        out.append(float(np.corrcoef(rp, rt)[0, 1]))
    return round(float(np.mean(out)), 4) if out else float("nan")


def run_seed(seed: int, overrides: Mapping[str, Any], model_overrides: Mapping[str, Any],
             batch_every_s: float, positive_timing: str = "window_close") -> dict[str, Any]:
    from em3.app.demo import DemoConfig, LINE_VARIANTS, ColdStartTracker, make_world
    from em3.stores import InMemoryContentStore
    from simulators.ab import ABConfig, ABRunner

    config = DemoConfig(seed=seed, **overrides)
    t0 = 1.75e9
    world = make_world(config, t0)
    content = InMemoryContentStore(world.item_content(i) for i in world.item_ids)  # posters drawn once
    lines = {line: SimulatedLine(line, LINE_VARIANTS[line], content, seed=seed, window_s=config.window_s,
                                 batch_every_s=batch_every_s, model_overrides=model_overrides,
                                 model_scale=config.model_scale, positive_timing=positive_timing,
                                 fresh_slot=config.fresh_slot)
             for line in config.lines}
    cold = ColdStartTracker(world, t0, lambda e: None)
    n_requests = int(config.request_rate_per_s * config.minutes * 60)
    ab = ABConfig(n_requests=n_requests, request_rate_per_s=config.request_rate_per_s, k=config.k,
                  attribution_window_s=config.window_s, seed=seed, start_time=t0, training_data=config.training_data)
    started = time.perf_counter()
    report = ABRunner(world, lines, ab, event_sink=cold).run()
    summary = cold.summary()
    first, control = config.lines[0], config.lines[1]

    def ratio(a: Mapping[str, Any], b: Mapping[str, Any]) -> float | None:
        return round(a["ctr"] / b["ctr"], 4) if b.get("ctr") else None

    t_end = t0 + n_requests / config.request_rate_per_s
    new = world.arrivals_between(t0, t_end)
    old = world.available_items(t0)
    unseen = world.arrivals_between(t_end, t_end + 600.0)  # content only: nobody has seen them
    quality = {line: {"unseen_items": ranking_quality(s, world, unseen, t_end),
                      "cold_items": ranking_quality(s, world, new, t_end),
                      "catalogue": ranking_quality(s, world, old, t_end)} for line, s in lines.items()}
    out = {"seed": seed, "requests": report.requests, "rank_spearman": quality,
           "wall_s": round(time.perf_counter() - started, 1),
           "cold_ctr_ratio": ratio(summary[first], summary[control]),
           "first_ctr_ratio": ratio(summary[first]["first"], summary[control]["first"]),
           "ctr": {a: round(s["ctr"], 4) for a, s in report.final.items()},
           "cold_start": summary, "steps": {line: s.steps for line, s in lines.items()},
           "calibration": {line: calibration(s.prequential) for line, s in lines.items()}}
    logger.info("seed %d: cold ratio %s, first-10 ratio %s, %.0f s", seed, out["cold_ctr_ratio"],
                out["first_ctr_ratio"], out["wall_s"])
    return out


def content_alignment(seed: int, variants: Sequence[str], model_overrides: Mapping[str, Any],
                      n_items: int = 300) -> dict[str, Any]:
    """How well each variant's content embedding, untrained, tracks the world's hidden
    item factors: the correlation, over the pairs of the first ``n_items`` items, of
    the cosine similarity of their (centred) content embeddings with that of their
    hidden factors. References: MiniLM's mean pooling of the same texts and the
    items' genres (multi-hot)."""
    import torch

    from em3.app.demo import DemoConfig, make_world
    from em3.model import ModelConfig
    from em3.model.fusion import pooled_tokens
    from em3.stores import InMemoryContentStore
    from learners import OnlineLearner

    world = make_world(DemoConfig(seed=seed), 1.75e9)
    ids = list(world.item_ids)[:n_items]
    store = InMemoryContentStore(world.item_content(i) for i in ids)
    genres = sorted({g for i in ids for g in world.item_genres(i)})
    multi_hot = np.array([[g in world.item_genres(i) for g in genres] for i in ids], dtype=np.float64)

    def similarities(x: np.ndarray) -> np.ndarray:
        x = x - x.mean(0)
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return (x @ x.T)[np.triu_indices(len(x), 1)]

    truth = similarities(world.item_factors(ids))

    def corr(x: np.ndarray) -> float:
        return round(float(np.corrcoef(similarities(np.asarray(x, dtype=np.float64)), truth)[0, 1]), 4)

    out: dict[str, Any] = {"genres_multi_hot": corr(multi_hot)}
    for variant in variants:
        config = ModelConfig.for_variant(variant, **{"seed": seed, **model_overrides})
        learner = OnlineLearner(config, store, device="cpu", seed=seed)
        out[variant] = corr(learner.item_representations(ids).numpy()[:, :config.embed_dim])
        if variant == "em3":
            with torch.no_grad():
                tokens, masks = learner.model.modality_tokens(ids, store.get_many(ids))
                out["pooled_text"] = corr(pooled_tokens(tokens[:1], masks[:1]).float().numpy())
                out["pooled_image"] = corr(pooled_tokens(tokens[1:], masks[1:]).float().numpy())
                both = pooled_tokens(tokens, masks).float()
                normalised = torch.nn.functional.layer_norm(both, both.shape[-1:])
                out["pooled_both_layer_normalised"] = corr(normalised.numpy())
    return out


def _parse_set(pairs: Sequence[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        out[key] = json.loads(value)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="1,2,3", help="world and model seeds, comma-separated")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=JSON", help="a DemoConfig field")
    p.add_argument("--model-set", action="append", default=[], metavar="FIELD=JSON",
                   help="a ModelConfig field for every line (a diagnostic)")
    p.add_argument("--batch-every-s", type=float, default=0.2,
                   help="event-time seconds between learner steps (the learner loop's max_batch_wait_s)")
    p.add_argument("--positive-timing", choices=("window_close", "click"), default="window_close",
                   help="when a click's sample is learned (stream.join.JoinConfig.positive_timing)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--content-alignment", action="store_true",
                   help="only measure how well untrained content embeddings track the world's item factors")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import torch

    torch.set_num_threads(args.threads)
    overrides, model_overrides = _parse_set(args.set), _parse_set(args.model_set)
    if args.content_alignment:
        seeds = [int(s) for s in args.seeds.split(",")]
        print(json.dumps({"content_alignment": {s: content_alignment(s, ("em3", "text_only", "image_only"),
                                                                     model_overrides) for s in seeds},
                          "model_overrides": model_overrides, "model": "ModelConfig.for_variant, untrained",
                          "runtime": "in-process OnlineLearner, cpu"}))
        return 0
    runs = [run_seed(int(s), overrides, model_overrides, args.batch_every_s, args.positive_timing)
            for s in args.seeds.split(",")]
    ratios = [r["cold_ctr_ratio"] for r in runs if r["cold_ctr_ratio"] is not None]
    firsts = [r["first_ctr_ratio"] for r in runs if r["first_ctr_ratio"] is not None]
    print(json.dumps({"runs": runs, "mean_cold_ctr_ratio": round(float(np.mean(ratios)), 4) if ratios else None,
                      "mean_first_ctr_ratio": round(float(np.mean(firsts)), 4) if firsts else None,
                      "demo_overrides": overrides, "model_overrides": model_overrides,
                      "batch_every_s": args.batch_every_s, "positive_timing": args.positive_timing,
                      "model": "ModelConfig.for_variant per line (the demo's defaults)",
                      "runtime": "in-process OnlineLearner per line, simulated time, cpu"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
