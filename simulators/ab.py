"""Online A/B runner: simulated users, rankers as arms, CTR with CIs, an always-valid verdict.

The loop, in event time: requests arrive as a Poisson process; each is
assigned to an arm (by a salted hash of the request or the user id), the arm's
:class:`simulators.rankers.Ranker` ranks the candidates, the world responds,
and the impressions and (delayed) clicks become events. Events are handed, in
event-time order and only once their time has come, to ``event_sink`` (for
example a Kafka producer) and to the arm's ranker if it learns online.

The metric
----------
The unit is a request; its outcome is its CTR (clicks / items shown), counting
clicks that come within ``attribution_window_s``. A request enters the
statistics only once its window has closed, so no observation changes after it
is counted, as the sequential test requires. Per arm the runner reports the
mean per-request CTR with a normal-approximation interval; every treatment arm
is compared with the control by :class:`simulators.sequential.SequentialTest`
(mSPRT on the difference of means, sums of squares included), at
``alpha / (number of treatments)`` each (Bonferroni). With ``stop_early`` the
experiment ends as soon as every treatment has a verdict.

Conversions (a click's purchase, hours later in the world's default) travel to
``event_sink`` when they happen (rankers' ``observe`` gets impressions and clicks
only). Each arm's readout counts the conversions of its counted clicks that come
within ``conversion_window_s`` of the click, as they happen: ``conversions``,
``cvr`` (conversions / clicks), ``conversions_per_user`` and ``conversion_value``
beside CTR. At the end the runner waits (in event time) for the last conversion
window, so the final figures hold every conversion.

Rankers that return scores (``Ranking.scores``) get a prequential AUC per
arm: the AUC of the scores they served with against the clicks that followed
(within the window), over all completed requests so far. ``metrics``
(optional) is called at every look with the event time and may return more
series (``{"freshness_s": {"em3": 42.0}}``, or an AUC the learners measured),
which land in ``timeline[i]["metrics"]`` for :mod:`simulators.report` to plot.
"""
from __future__ import annotations

import hashlib
import heapq
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from statistics import NormalDist
from typing import Any, Callable, Mapping

import numpy as np

from em3.constraints import Literal, OpenProbability, PositiveFloat, PositiveInt, config_class
from em3.experiment import ArmPropensity, TrainingData
from em3.types import Click, Conversion, Impression
from simulators.rankers import Ranker
from simulators.sequential import DEFAULT_TAU2, RatioStats, SequentialTest, fixed_horizon
from simulators.world import World

__all__ = ["ABConfig", "ArmStats", "ABReport", "ABRunner", "run_ab", "assign_arm", "auc"]

logger = logging.getLogger(__name__)


@config_class
class ABConfig:
    """Settings of one experiment.

    Parameters
    ----------
    n_requests : int
        Requests to simulate (fewer if ``stop_early`` ends it).
    k : int
        Items shown per request.
    request_rate_per_s : float
        Mean requests per event-time second (Poisson arrivals).
    start_time : float, optional
        Event time of the first request's clock (default: the world's start).
    split : mapping of str to float, optional
        Traffic share per arm (default: equal). Must sum to 1.
    control : str, optional
        The control arm (default: the first arm).
    assignment : {"user", "request"}
        Randomisation unit. ``"user"`` (default, as servers bucket) keeps a user
        in one arm.
    unit : {"user", "request"}
        Unit of analysis. ``"user"`` (default): the metric is CTR = clicks /
        impressions summed per user, its variance by the delta method over users
        (one user's requests are correlated, so a request-level test is too
        confident); ``min_samples`` then counts users. ``"request"``: each
        request's CTR is one i.i.d. observation (only right with request-level
        assignment; kept to show the difference).
    shadow_unit : {"user", "request"}, optional
        A second unit of analysis, for comparison only. Its sequential test runs
        beside the main one on the same looks (``ABReport.shadow_tests``; the naive
        per-request test beside the user-level one, say) and never stops the
        experiment.
    alpha : float
        Family-wise significance level.
    tau2 : float
        mSPRT mixing variance (see :mod:`simulators.sequential`).
    min_samples : int
        Per-arm units (users, or requests) before the test may reject.
    check_every : int
        Requests between looks.
    attribution_window_s : float
        Clicks later than this after their impression do not count.
    conversion_window_s : float
        Conversions later than this after their click do not count (the join's
        ``--conversion-window-s``).
    stop_early : bool
        End when every treatment has a verdict (the report's ``stop_reason`` is
        then ``"evidence"``).
    training_data : {"split", "pooled", "weighted"}
        What learning rankers observe (:data:`em3.experiment.TRAINING_DATA`): only
        their own arm's events (``split``), every arm's (``pooled``), or every arm's
        with Si's weights (``weighted``, :class:`em3.experiment.ArmPropensity`).
    arm_from_ranking : bool
        If True, the arm is the one the ranker reports (``Ranking.arm``), not
        the runner's assignment: for a server that buckets users itself (map
        every arm name to the same client ranker).
    seed : int
        Seed of arrivals and assignment.
    """

    n_requests: PositiveInt = 20_000
    k: PositiveInt = 10
    request_rate_per_s: PositiveFloat = 2.0
    start_time: float | None = None
    split: Mapping[str, float] | None = None
    control: str | None = None
    assignment: Literal["user", "request"] = "user"
    unit: Literal["user", "request"] = "user"
    shadow_unit: Literal["user", "request"] | None = None
    alpha: OpenProbability = 0.05
    tau2: PositiveFloat = DEFAULT_TAU2
    min_samples: PositiveInt = 200
    check_every: PositiveInt = 500
    attribution_window_s: PositiveFloat = 600.0
    conversion_window_s: PositiveFloat = 86_400.0
    stop_early: bool = False
    training_data: TrainingData = "split"
    arm_from_ranking: bool = False
    seed: int = 0


@dataclass
class ArmStats:
    """Running per-arm totals over requests whose attribution window has closed."""

    requests: int = 0
    impressions: int = 0
    clicks: int = 0
    sum_ctr: float = 0.0
    sumsq_ctr: float = 0.0
    users: RatioStats = field(default_factory=RatioStats)
    conversions: int = 0
    conversion_value: float = 0.0

    def add_conversion(self, value: float) -> None:
        self.conversions += 1
        self.conversion_value += value

    def add(self, shown: int, clicks: int, user_id: str = "") -> None:
        ctr = clicks / shown if shown else 0.0
        self.requests += 1
        self.impressions += shown
        self.clicks += clicks
        self.sum_ctr += ctr
        self.sumsq_ctr += ctr * ctr
        self.users.add(user_id, shown, clicks)

    def estimate(self, unit: str) -> tuple[int, float, float]:
        """``(units, CTR, variance of the CTR)`` for the unit of analysis."""
        if unit == "user":
            ctr, var = self.users.estimate()
            return self.users.units, ctr, var
        n = self.requests
        if n == 0:
            return 0, math.nan, math.inf
        mean = self.sum_ctr / n
        return n, mean, max(self.sumsq_ctr / n - mean * mean, 0.0) / max(n - 1, 1)

    def summary(self, alpha: float, unit: str = "user") -> dict[str, float]:
        """CTR (per the unit of analysis) with a normal-approximation ``1 - alpha`` interval,
        and the conversions beside it: ``cvr`` (conversions / clicks),
        ``conversions_per_user``, ``conversion_value``."""
        n, mean, var = self.estimate(unit)
        if n == 0:
            return {"requests": 0, "users": 0, "impressions": 0, "clicks": 0, "ctr": math.nan,
                    "ci_low": math.nan, "ci_high": math.nan, "conversions": 0, "cvr": math.nan,
                    "conversions_per_user": math.nan, "conversion_value": 0.0}
        half = NormalDist().inv_cdf(1 - alpha / 2) * math.sqrt(var) if math.isfinite(var) else math.inf
        users = self.users.units
        return {"requests": self.requests, "users": users, "impressions": self.impressions,
                "clicks": self.clicks, "ctr": mean, "ci_low": mean - half, "ci_high": mean + half,
                "conversions": self.conversions,
                "cvr": self.conversions / self.clicks if self.clicks else math.nan,
                "conversions_per_user": self.conversions / users if users else math.nan,
                "conversion_value": self.conversion_value}


@dataclass
class ABReport:
    """Everything an experiment produced; :meth:`to_json` is the JSON report.

    ``stop_reason`` says why it ended: ``"evidence"`` (every treatment reached a
    verdict, with ``stop_early``), ``"time_budget"`` (``should_stop`` said so) or
    ``"request_budget"`` (it ran its ``n_requests``).
    """

    config: dict[str, Any]
    arms: list[str]
    control: str
    requests: int
    stop_reason: str
    final: dict[str, dict[str, float]]
    tests: dict[str, dict[str, Any]]
    timeline: list[dict[str, Any]] = field(default_factory=list)
    #: the same comparisons under ``ABConfig.shadow_unit`` (empty without one)
    shadow_tests: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        """JSON text (NaN and infinities written as null)."""
        return json.dumps(_clean(self.to_dict()), indent=indent)


def _clean(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        return _clean(obj.item())
    return obj


def auc(scores, labels) -> float:
    """Area under the ROC curve of ``scores`` for 0/1 ``labels`` (ties count half); NaN if one class is absent.

    >>> auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    0.75
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(s.size)
    sorted_s = s[order]
    # average ranks over ties
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], s.size]
    avg = (starts + ends + 1) / 2.0  # 1-based average rank of each tie block
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def assign_arm(key: str, arms: list[str], cumulative: list[float], salt: str) -> str:
    """Deterministic arm of ``key``: a salted hash mapped to ``[0, 1)`` and cut by the split.

    >>> assign_arm("req-1", ["a", "b"], [0.5, 1.0], "s") in ("a", "b")
    True
    """
    digest = hashlib.blake2b(f"{salt}|{key}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2.0**64
    for arm, edge in zip(arms, cumulative):
        if u < edge:
            return arm
    return arms[-1]


class ABRunner:
    """Runs one experiment of ``arms`` on ``world``.

    Parameters
    ----------
    world : World
        The simulated users and items.
    arms : mapping of str to Ranker
        Arm name to ranker; the first is the control unless ``config.control`` says otherwise.
    config : ABConfig, optional
    event_sink : callable, optional
        Called with every Impression and Click in event-time order.
    metrics : callable, optional
        ``metrics(t) -> {series: {arm: value}}`` at every look (see module docstring).
    should_stop : callable, optional
        Checked before each request; True ends the experiment there: a wall-clock
        budget (the report's ``stop_reason`` is then ``"time_budget"``).
    """

    def __init__(self, world: World, arms: Mapping[str, Ranker], config: ABConfig | None = None, *,
                 event_sink: Callable[[Impression | Click], None] | None = None,
                 metrics: Callable[[float], Mapping[str, Mapping[str, float]]] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> None:
        self.config = cfg = config or ABConfig()
        if len(arms) < 2:
            raise ValueError(f"arms must hold at least 2 rankers, but {len(arms)} is given")
        self.world = world
        self.arms = dict(arms)
        self.arm_names = list(self.arms)
        self.control = cfg.control or self.arm_names[0]
        if self.control not in self.arms:
            raise ValueError(f"control must be one of {self.arm_names}, but {self.control!r} is given")
        split = dict(cfg.split) if cfg.split is not None else {a: 1.0 / len(arms) for a in self.arm_names}
        if set(split) != set(self.arm_names) or any(v < 0 for v in split.values()) \
                or not math.isclose(sum(split.values()), 1.0, abs_tol=1e-9):
            raise ValueError(f"split must give each arm of {self.arm_names} a share >= 0, summing to 1, "
                             f"but {split} is given")
        self._cumulative = list(np.cumsum([split[a] for a in self.arm_names]))
        self.treatments = [a for a in self.arm_names if a != self.control]
        self.event_sink = event_sink
        self.metrics = metrics
        self.should_stop = should_stop

    def run(self) -> ABReport:
        """Simulate the experiment and return its report."""
        cfg, world = self.config, self.world
        rng = np.random.default_rng([cfg.seed, 7])
        salt = f"ab-{cfg.seed}"
        t = cfg.start_time if cfg.start_time is not None else world.config.start_time
        per_test_alpha = cfg.alpha / len(self.treatments)
        tests = {a: SequentialTest(cfg.tau2, per_test_alpha, 0.0, cfg.min_samples) for a in self.treatments}
        shadow = {a: SequentialTest(cfg.tau2, per_test_alpha, 0.0, cfg.min_samples)
                  for a in self.treatments} if cfg.shadow_unit else {}
        stats = {a: ArmStats() for a in self.arm_names}
        pending_events: list[tuple[float, int, str, Impression | Click | Conversion]] = []
        outcomes: list[tuple[float, str, int, int]] = []  # (served_at, arm, shown, clicks in window)
        # Conversions of counted clicks within the conversion window: (converted_at, seq, arm, value),
        # counted in the readout when their time comes.
        conversions_due: list[tuple[float, int, str, float]] = []
        scored: list[tuple[str, list[float], list[int]] | None] = []  # per request: arm, scores, labels
        auc_data: dict[str, tuple[list[float], list[int]]] = {a: ([], []) for a in self.arm_names}
        counted = 0
        seq = 0
        timeline: list[dict[str, Any]] = []
        stopped_at: dict[str, tuple[int, float]] = {}
        stop_reason = "request_budget"
        n_done = 0

        propensity = ArmPropensity()

        def deliver(until: float) -> None:
            batch: dict[str, list] = {a: [] for a in self.arm_names}
            while pending_events and pending_events[0][0] <= until:
                _, _, arm, event = heapq.heappop(pending_events)
                if self.event_sink is not None:
                    self.event_sink(event)
                if not isinstance(event, Conversion):  # rankers learn from impressions and clicks
                    batch[arm].append(event)
            if cfg.training_data == "weighted":
                for a in self.arm_names:
                    for e in batch[a]:
                        if isinstance(e, Impression):
                            propensity.observe(a, e.item_id)
            for name, ranker in self.arms.items():
                observe = getattr(ranker, "observe", None)
                if observe is None:
                    continue
                if cfg.training_data == "split":
                    events = batch[name]
                else:
                    events = sorted((e for a in self.arm_names for e in batch[a]),
                                    key=lambda e: e.served_at if isinstance(e, Impression) else e.clicked_at)
                if not events:
                    continue
                if cfg.training_data == "weighted":
                    observe(events, [propensity.weight(name, e.item_id) for e in events])
                else:
                    observe(events)

        def look(now: float, conversions_until: float | None = None) -> None:
            nonlocal counted
            until = now if conversions_until is None else conversions_until
            while conversions_due and conversions_due[0][0] <= until:
                _, _, c_arm, value = heapq.heappop(conversions_due)
                stats[c_arm].add_conversion(value)
            while counted < len(outcomes) and outcomes[counted][0] + cfg.attribution_window_s <= now:
                _, arm, shown, clicks, user = outcomes[counted]
                stats[arm].add(shown, clicks, user)
                if scored[counted] is not None:
                    s_arm, s_scores, s_labels = scored[counted]
                    auc_data[s_arm][0].extend(s_scores)
                    auc_data[s_arm][1].extend(s_labels)
                counted += 1
            c = stats[self.control]
            entry: dict[str, Any] = {"t": now, "requests": n_done,
                                     "arms": {a: stats[a].summary(cfg.alpha, cfg.unit) for a in self.arm_names},
                                     "tests": {}}
            n_c, mean_c, var_c = c.estimate(cfg.unit)
            for a in self.treatments:
                n_t, mean_t, var_t = stats[a].estimate(cfg.unit)
                r = tests[a].update_estimates(n_c, mean_c, var_c, n_t, mean_t, var_t)
                diff = r.diff if min(n_c, n_t) > 0 else math.nan
                entry["tests"][a] = {"diff": diff, "p_value": r.p_value, "ci_low": r.ci_low,
                                     "ci_high": r.ci_high, "reject": r.reject}
                if r.reject and a not in stopped_at:
                    stopped_at[a] = (n_done, now)
            if shadow:
                n_sc, mean_sc, var_sc = c.estimate(cfg.shadow_unit)
                for a, test in shadow.items():
                    test.update_estimates(n_sc, mean_sc, var_sc, *stats[a].estimate(cfg.shadow_unit))
            metrics: dict[str, dict[str, float]] = {}
            aucs = {a: auc(sc, lb) for a, (sc, lb) in auc_data.items() if sc}
            if aucs:
                metrics["prequential_auc"] = aucs
            if self.metrics is not None:
                for name, series in self.metrics(now).items():
                    metrics.setdefault(name, {}).update(series)
            if metrics:
                entry["metrics"] = metrics
            timeline.append(entry)

        for i in range(cfg.n_requests):
            if self.should_stop is not None and self.should_stop():
                stop_reason = "time_budget"
                break
            t += float(rng.exponential(1.0 / cfg.request_rate_per_s))
            deliver(t)
            req = world.next_request(t)
            key = req.request_id if cfg.assignment == "request" else req.user_id
            arm = assign_arm(key, self.arm_names, self._cumulative, salt)
            context = {**req.context, "t": repr(t)}
            ranking = self.arms[arm].rank(req.user_id, req.candidates, context, cfg.k)
            if cfg.arm_from_ranking:
                if ranking.arm not in self.arms:
                    raise ValueError(f"the ranker answered for arm {ranking.arm!r}, not one of {self.arm_names}")
                arm = ranking.arm
            shown = ranking.item_ids[: cfg.k]
            feedback = world.respond(req.user_id, shown, t)
            props = ranking.propensities or (1.0,) * len(shown)
            request_id = ranking.request_id or req.request_id
            imp_ids = ranking.impression_ids or tuple(f"{request_id}-{p}" for p in range(len(shown)))
            clicks_in_window = 0
            labels: list[int] = []
            for fb in feedback:
                imp = Impression(imp_ids[fb.position], request_id, req.user_id, fb.item_id,
                                 fb.position, t, model_line=ranking.arm, model_version=ranking.model_version,
                                 arm=arm, propensity=float(min(max(props[fb.position], 1e-12), 1.0)),
                                 context=dict(req.context))
                heapq.heappush(pending_events, (t, seq, arm, imp))
                seq += 1
                if fb.clicked:
                    ct = t + float(fb.delay_s or 0.0)
                    heapq.heappush(pending_events, (ct, seq, arm, Click(imp.impression_id, req.user_id, fb.item_id, ct)))
                    seq += 1
                    converted = fb.converted and fb.conversion_delay_s is not None
                    if converted:
                        vt = ct + float(fb.conversion_delay_s)
                        heapq.heappush(pending_events, (vt, seq, arm, Conversion(
                            imp.impression_id, req.user_id, fb.item_id, vt, fb.value)))
                        seq += 1
                    if (fb.delay_s or 0.0) <= cfg.attribution_window_s:
                        clicks_in_window += 1
                        labels.append(1)
                        if converted and fb.conversion_delay_s <= cfg.conversion_window_s:
                            heapq.heappush(conversions_due, (vt, seq, arm, float(fb.value or 0.0)))
                            seq += 1
                        continue
                labels.append(0)
            outcomes.append((t, arm, len(shown), clicks_in_window, req.user_id))
            scored.append((arm, list(ranking.scores[: len(shown)]), labels) if ranking.scores is not None else None)
            n_done = i + 1
            if n_done % cfg.check_every == 0:
                look(t)
                if cfg.stop_early and len(stopped_at) == len(self.treatments):
                    stop_reason = "evidence"
                    break
        end = t + cfg.attribution_window_s
        last_conversion = max((vt for vt, *_ in conversions_due), default=end)
        deliver(max(end, last_conversion))  # the last conversions, hours later, reach the sink too
        look(end, conversions_until=math.inf)
        final = {a: stats[a].summary(cfg.alpha, cfg.unit) for a in self.arm_names}
        n_c, mean_c, var_c = stats[self.control].estimate(cfg.unit)
        verdicts: dict[str, dict[str, Any]] = {}
        for a in self.treatments:
            last = tests[a].last
            if last is None:  # pragma: no cover - look() always runs at the end
                raise RuntimeError("the sequential test was never updated")
            verdict = "no_difference_detected"
            if last.reject:
                verdict = "treatment_better" if last.ci_low > 0 else "control_better"
            base = final[self.control]["ctr"]
            _, mean_t, var_t = stats[a].estimate(cfg.unit)
            verdicts[a] = {
                **last.to_dict(), "verdict": verdict, "alpha_per_test": per_test_alpha, "unit": cfg.unit,
                "fixed_horizon": fixed_horizon(mean_c, var_c, mean_t, var_t, per_test_alpha),
                "relative_lift": (last.diff / base) if base and base > 0 else math.nan,
                "stopped_at_request": stopped_at.get(a, (None, None))[0],
                "stopped_at_time": stopped_at.get(a, (None, None))[1],
            }
        shadow_verdicts: dict[str, dict[str, Any]] = {}
        if shadow:
            n_sc, mean_sc, var_sc = stats[self.control].estimate(cfg.shadow_unit)
            for a, test in shadow.items():
                last = test.last
                _, mean_t, var_t = stats[a].estimate(cfg.shadow_unit)
                shadow_verdicts[a] = {**last.to_dict(), "unit": cfg.shadow_unit,
                                      "fixed_horizon": fixed_horizon(mean_sc, var_sc, mean_t, var_t, per_test_alpha)}
        cfg_dict = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in asdict(cfg).items()}
        return ABReport(cfg_dict, self.arm_names, self.control, n_done, stop_reason, final, verdicts, timeline,
                        shadow_verdicts)


def run_ab(world: World, arms: Mapping[str, Ranker], config: ABConfig | None = None, **kwargs: Any) -> ABReport:
    """Convenience: ``ABRunner(world, arms, config, **kwargs).run()``."""
    return ABRunner(world, arms, config, **kwargs).run()
