"""What the report page says, computed from ``report.json``: a pure view model.

:func:`build_page` reads the JSON report of an A/B run (:class:`simulators.ab.ABReport`
plus, for ``em3 demo``, the system figures it adds) and returns a :class:`Page`:
the verdict, whether learning showed, the charts (inline SVG) and the tables, every
cell a formatted string. The template only lays it out.

Sections that depend on optional keys appear only when the keys exist:

- ``headline`` (the demo's learning checks, with ``targets``): the learning card;
- ``final[arm]["cvr"]`` and ``["conversions"]`` (optionally ``cvr_ci_low`` /
  ``cvr_ci_high``), and ``timeline[i]["arms"][arm]["cvr"]``: CVR columns and chart;
- ``modality_contribution[arm]`` (or ``final[arm]["modality_contribution"]``): a list
  of ``{"t": seconds, "text": f, "image": f, "missing": f}``; ``t`` is seconds since the
  start, or Unix time (then taken relative to the experiment's start);
- ``cold_start``, ``learners``, ``freshness_s``, ``versions_served``, ``throughput``,
  ``join``, ``demo``: their tables.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from simulators.report import fmt
from simulators.report.svg import Bar, Rule, Series, bar_chart, line_chart, stacked_area

__all__ = ["Fact", "Comparison", "Verdict", "Check", "Learning", "Chart", "Table", "Page", "build_page",
           "STOP_REASONS"]

#: What each ``stop_reason`` of :class:`simulators.ab.ABReport` means to a reader.
STOP_REASONS = {
    "evidence": "on evidence",
    "time_budget": "on its time budget",
    "request_budget": "after all its planned requests",
}
_POLICIES = {
    "split": "each line learns only from its own arm's traffic",
    "pooled": "every line learns from all arms' traffic",
    "weighted": "every line learns from all arms' traffic, reweighted per item",
}
_MODALITIES = ("text", "image", "missing")


@dataclass(frozen=True)
class Fact:
    """One labelled fact under the verdict (unit, training data, stop reason)."""

    label: str
    value: str


@dataclass(frozen=True)
class Comparison:
    """One treatment against the control, in words and figures."""

    treatment: str
    control: str
    outcome: str
    sentence: str
    diff: str
    relative: str
    interval: str
    level: str


@dataclass(frozen=True)
class Verdict:
    """Who wins, by how much, how sure, and under which conditions."""

    headline: str
    winner: str | None
    comparisons: list[Comparison]
    facts: list[Fact]


@dataclass(frozen=True)
class Check:
    """One learning figure beside its target."""

    label: str
    figure: str
    target: str
    ok: bool


@dataclass(frozen=True)
class Learning:
    """Whether learning showed: the checks and the AUC curves against their target."""

    shows: bool
    checks: list[Check]
    chart: "Chart | None"


@dataclass(frozen=True)
class Chart:
    """A titled inline SVG chart with a one-line note on how to read it."""

    id: str
    title: str
    svg: str
    note: str = ""


@dataclass(frozen=True)
class Table:
    """A titled table; every cell is already formatted text."""

    id: str
    title: str
    head: list[str]
    rows: list[list[str]]
    note: str = ""
    kind: str = "wide"  # "wide": a row of its own; "kv": measure/value pairs, laid out side by side

    def __post_init__(self) -> None:
        for row in self.rows:
            if len(row) != len(self.head) or not all(isinstance(c, str) for c in row):
                raise TypeError(f"table {self.id!r}: each row must hold {len(self.head)} strings, but {row!r} is given")


@dataclass(frozen=True)
class Page:
    """Everything the template lays out, in reading order."""

    title: str
    verdict: Verdict
    learning: Learning | None
    charts: list[Chart]
    tables: list[Table]
    raw_json: str


def build_page(data: Mapping[str, Any], title: str) -> Page:
    """The page for one JSON report (see the module docstring for the keys read)."""
    clock = _Clock.of(data)
    return Page(
        title=title,
        verdict=_verdict(data),
        learning=_learning(data, clock) if "headline" in data else None,
        charts=_charts(data, clock),
        tables=_tables(data),
        raw_json=json.dumps(data, indent=2),
    )


# --------------------------------------------------------------------------- verdict


def _level(alpha: Any) -> str:
    return f"{100.0 * (1.0 - float(alpha)):g}%" if isinstance(alpha, (int, float)) else "95%"


def _comparison(data: Mapping[str, Any], arm: str, test: Mapping[str, Any]) -> Comparison:
    control = data["control"]
    outcome = test.get("verdict", "no_difference_detected")
    level = _level(test.get("alpha_per_test", test.get("alpha", 0.05)))
    ci = fmt.interval(test.get("ci_low"), test.get("ci_high"), fmt.pp)
    diff = fmt.pp(test.get("diff"))
    relative = fmt.signed_pct(test.get("relative_lift"))
    gap = f"{arm} − {control} = {diff} CTR ({relative} relative)"
    if ci == fmt.NONE:
        units = data.get("config", {}).get("min_samples")
        need = f" (it needs {fmt.count(units)} {test.get('unit', 'user')}s per arm)" if units else ""
        sentence = f"No verdict yet: {gap}; too few units for the always-valid interval{need}."
    elif outcome == "treatment_better":
        sentence = f"{arm} beats {control}: {gap}, always-valid {level} CI {ci}."
    elif outcome == "control_better":
        sentence = f"{control} beats {arm}: {gap}, always-valid {level} CI {ci}."
    else:
        sentence = f"No difference detected: {gap}; the always-valid {level} CI {ci} includes zero."
    return Comparison(arm, control, outcome, sentence, diff, relative, ci, level)


def _winner(data: Mapping[str, Any]) -> tuple[str | None, str]:
    """The winning arm (or None) and the headline that names it."""
    tests, control = data.get("tests", {}), data["control"]
    better = [a for a, t in tests.items() if t.get("verdict") == "treatment_better"]
    if better:
        best = max(better, key=lambda a: tests[a].get("diff") or 0.0)
        t = tests[best]
        lift = fmt.signed_pct(t.get("relative_lift"))
        return best, f"{best} wins: CTR {fmt.pp(t.get('diff'))} over {control} ({lift})"
    if tests and all(t.get("verdict") == "control_better" for t in tests.values()):
        margin = min(abs(t.get("diff") or 0.0) for t in tests.values())
        others = ", ".join(tests)
        return control, f"{control} (control) wins: CTR {fmt.pp(margin).lstrip('+')} above {others}"
    if tests and all(t.get("ci_low") is None for t in tests.values()):
        return None, "No winner yet: too few users for a verdict"
    if any(t.get("verdict") == "control_better" for t in tests.values()):
        return None, "No winner yet: not every comparison has a verdict"
    return None, "No winner: no difference detected"


def _stop(data: Mapping[str, Any]) -> str:
    reason = data.get("stop_reason")
    requests = fmt.count(data.get("requests"))
    wall = data.get("demo", {}).get("wall_s")
    after = f"after {requests} requests" + (f" ({fmt.duration(wall)})" if wall is not None else "")
    decided = [t.get("stopped_at_request") for t in data.get("tests", {}).values()]
    if reason == "evidence":
        return f"Stopped on evidence {after}: every treatment reached an always-valid verdict."
    if reason is None:
        return f"Stop reason not recorded; ran {after}."
    text = f"Ran all {after[len('after '):]}" if reason == "request_budget" else \
        f"Stopped {STOP_REASONS.get(reason, reason)} {after}"
    if decided and all(d is not None for d in decided):
        return text + f"; the always-valid verdict came at request {fmt.count(max(decided))}."
    return text + "; the always-valid test had not reached a verdict by then."


def _unit(data: Mapping[str, Any]) -> str:
    config = data.get("config", {})
    unit, assignment = config.get("unit", "user"), config.get("assignment", "user")
    how = ("CTR as clicks ÷ impressions per user, variance by the delta method over users"
           if unit == "user" else "each request's CTR is one observation")
    return f"{unit} (randomised by {assignment}; {how})"


def _verdict(data: Mapping[str, Any]) -> Verdict:
    winner, headline = _winner(data)
    comparisons = [_comparison(data, arm, t) for arm, t in data.get("tests", {}).items()]
    policy = data.get("headline", {}).get("training_data") or data.get("config", {}).get("training_data")
    final = data.get("final", {})
    users = sum(int(s.get("users") or 0) for s in final.values())
    facts = [
        Fact("Unit", _unit(data)),
        Fact("Training data", f"{policy}: {_POLICIES.get(policy, 'see the experiment config')}"
             if policy else fmt.NONE),
        Fact("Stopped", _stop(data)),
        Fact("Traffic", f"{fmt.count(data.get('requests'))} requests from {fmt.count(users)} users, "
                        f"control {data['control']}"),
    ]
    return Verdict(headline, winner, comparisons, facts)


# --------------------------------------------------------------------------- learning


def _window_name(data: Mapping[str, Any], line: str) -> str:
    """What a line's prequential window covers: ``"minute"``, ``"30 s"``, or ``"window"``
    (a count of samples, or an older report)."""
    seconds = data.get("learners", {}).get(line, {}).get("prequential", {}).get("window_s")
    if not seconds:
        return "window"
    return "minute" if seconds == 60 else f"{seconds:g} s"


def _learning(data: Mapping[str, Any], clock: "_Clock") -> Learning:
    head = data["headline"]
    targets = head.get("targets")
    if not targets:  # an older report: the demo's checks as written, without figures
        checks = [Check(label, fmt.NONE, fmt.NONE, bool(ok)) for label, ok in head.get("checks", {}).items()]
        return Learning(bool(head.get("learning_shows")), checks, _auc_chart(data, clock, None))
    checks = []
    t_auc = targets.get("window_auc")
    for line, auc in (head.get("window_auc", {}) if t_auc is not None else {}).items():
        checks.append(Check(f"{line}: prequential AUC, last {_window_name(data, line)}", fmt.fixed(auc), f"≥ {t_auc:g}",
                            auc is not None and auc >= t_auc))
    lines = data.get("demo", {}).get("config", {}).get("lines") or list(head.get("window_auc", {}))
    if len(lines) >= 2 and "cold_ctr_ratio" in targets:
        r, t_r = head.get("cold_ctr_ratio"), targets["cold_ctr_ratio"]
        checks.append(Check(f"{lines[0]} ÷ {lines[1]}: CTR on cold-start items", fmt.ratio(r), f"≥ {t_r:g}×",
                            r is not None and r >= t_r))
    if "requests_per_s" in targets:
        rate, t_rate = head.get("requests_per_s"), targets["requests_per_s"]
        checks.append(Check("ranked requests per second", fmt.per_s(rate), f"≥ {fmt.per_s(t_rate)}",
                            rate is not None and rate >= t_rate))
    return Learning(bool(head.get("learning_shows")), checks, _auc_chart(data, clock, t_auc))


def _auc_chart(data: Mapping[str, Any], clock: "_Clock", target: float | None) -> Chart | None:
    name = "learner_window_auc" if "learner_window_auc" in _metric_names(data) else "prequential_auc"
    series = _metric_series(data, name, clock)
    if not series:
        return None
    rules = [Rule(target, f"target {target:g}")] if target is not None else []
    low = min([0.5] + [float(y) for s in series for y in s.y if y is not None and math.isfinite(y)])
    svg = line_chart("chart-learning-auc", series, title="Prequential AUC over the last window, per line",
                     x_label=clock.label, x_fmt=clock.fmt, x_min=0.0, y_fmt=lambda y: f"{y:g}", rules=rules,
                     y_min=low, y_max=1.0, width=560, height=240)
    return Chart("chart-learning-auc", "Window AUC per line vs target", svg,
                 "Each learner scores every sample before it trains on it; AUC over its last window.")


# --------------------------------------------------------------------------- charts


@dataclass(frozen=True)
class _Clock:
    """Event time as the charts show it: since the experiment's start, in s, min or h."""

    t0: float
    scale: float
    label: str

    @staticmethod
    def of(data: Mapping[str, Any]) -> "_Clock":
        times = [e["t"] for e in data.get("timeline", []) if e.get("t") is not None]
        start = data.get("config", {}).get("start_time")
        t0 = start if start is not None else (times[0] if times else 0.0)
        span = (max(times) - t0) if times else 0.0
        if span <= 300:
            return _Clock(t0, 1.0, "seconds since the start")
        if span <= 3 * 3600:
            return _Clock(t0, 60.0, "minutes since the start")
        return _Clock(t0, 3600.0, "hours since the start")

    def x(self, t: float) -> float:
        """Chart x of event time ``t`` (Unix time, or seconds already relative to the start)."""
        rel = t - self.t0 if t > 1e8 and self.t0 > 1e8 else t
        return rel / self.scale

    def fmt(self, x: float) -> str:
        return f"{x:g}"


def _metric_names(data: Mapping[str, Any]) -> list[str]:
    names: list[str] = []
    for entry in data.get("timeline", []):
        names += [n for n in entry.get("metrics", {}) if n not in names]
    return names


def _metric_series(data: Mapping[str, Any], name: str, clock: _Clock) -> list[Series]:
    points = [(e["t"], e["metrics"][name]) for e in data.get("timeline", []) if name in e.get("metrics", {})]
    arms = [a for a in data.get("arms", [])] + sorted({a for _, s in points for a in s} - set(data.get("arms", [])))
    out = []
    for arm in arms:
        xs = [clock.x(t) for t, s in points if arm in s]
        if xs:
            out.append(Series(arm, xs, [s[arm] for _, s in points if arm in s]))
    return out


def _banded(data: Mapping[str, Any], key: str, value: str, clock: _Clock, label: Callable[[str], str],
            lo: str = "ci_low", hi: str = "ci_high") -> list[Series]:
    timeline = data.get("timeline", [])
    names = list(dict.fromkeys(n for e in timeline for n in e.get(key, {})))
    out = []
    for name in names:
        rows = [(e["t"], e[key][name]) for e in timeline if name in e.get(key, {})]
        if any(value in r for _, r in rows):
            out.append(Series(label(name), [clock.x(t) for t, _ in rows], [r.get(value) for _, r in rows],
                              [r.get(lo) for _, r in rows], [r.get(hi) for _, r in rows]))
    return out


_METRIC_CHARTS = {
    "prequential_auc": ("Served-score AUC per arm", lambda y: f"{y:g}",
                        "AUC of the scores each arm served against the clicks that followed, all requests so far."),
    "learner_window_auc": ("Learner window AUC per line", lambda y: f"{y:g}",
                           "The learners' prequential AUC over their last window (also in the verdict card)."),
    "freshness_s": ("Freshness: age of the served snapshot", lambda y: f"{y:g} s",
                    "Seconds between a snapshot's publication and the request it served."),
}


def _charts(data: Mapping[str, Any], clock: _Clock) -> list[Chart]:
    pct_axis = lambda y: f"{100 * y:.1f}%"  # noqa: E731
    control = data.get("control", "")
    level = _level(data.get("config", {}).get("alpha", 0.05))
    charts = []
    ctr = _banded(data, "arms", "ctr", clock, str)
    if ctr:
        charts.append(Chart("chart-ctr", "CTR per arm", line_chart(
            "chart-ctr", ctr, title="CTR per arm", x_label=clock.label, x_fmt=clock.fmt, x_min=0.0, y_fmt=pct_axis,
            y_min=0.0), f"Bands: {level} confidence intervals at each look (requests whose window has closed)."))
    diff = _banded(data, "tests", "diff", clock, lambda arm: f"{arm} − {control}")
    if diff:
        charts.append(Chart("chart-diff", "Difference from control", line_chart(
            "chart-diff", diff, title="CTR difference from control", x_label=clock.label, x_fmt=clock.fmt, x_min=0.0,
            y_fmt=lambda y: f"{100 * y:+.1f} pp", rules=[Rule(0.0, "no difference")]),
            "Bands: the always-valid (mSPRT) interval; it may be read at every look."))
    cvr = _banded(data, "arms", "cvr", clock, str, "cvr_ci_low", "cvr_ci_high")
    if cvr:
        charts.append(Chart("chart-cvr", "CVR per arm", line_chart(
            "chart-cvr", cvr, title="CVR per arm", x_label=clock.label, x_fmt=clock.fmt, x_min=0.0, y_fmt=pct_axis,
            y_min=0.0), "Conversions per click, per arm."))
    cold = data.get("cold_start", {})
    if cold:
        bars = [Bar(arm, s.get("ctr"), s.get("ci_low"), s.get("ci_high")) for arm, s in cold.items()]
        charts.append(Chart("chart-cold", "CTR on cold-start items", bar_chart(
            "chart-cold", bars, title="CTR on items that arrived during the run", y_fmt=pct_axis),
            "Whiskers: 95% intervals. Cold-start items arrived after the run began."))
    for name in _metric_names(data):
        title, y_fmt, note = _METRIC_CHARTS.get(name, (name.replace("_", " "), lambda y: f"{y:g}", ""))
        series = _metric_series(data, name, clock)
        if series:
            charts.append(Chart(f"chart-{name}", title, line_chart(
                f"chart-{name}", series, title=title, x_label=clock.label, x_fmt=clock.fmt, x_min=0.0,
                y_fmt=y_fmt), note))
    for arm, points in _modality(data).items():
        xs = [clock.x(p["t"]) for p in points]
        layers = {m: [p.get(m) for p in points] for m in _MODALITIES}
        chart_id = f"chart-modality-{_slug(arm)}"
        charts.append(Chart(chart_id, f"Modality contribution: {arm}", stacked_area(
            chart_id, xs, layers, title=f"Share of attention per modality, {arm}", x_label=clock.label,
            x_fmt=clock.fmt, x_min=0.0, y_fmt=lambda y: f"{100 * y:.0f}%"),
            "Mean share of the Fusion-Q-Former's attention on text, image and missing-modality slots."))
    return charts


def _modality(data: Mapping[str, Any]) -> dict[str, list[Mapping[str, Any]]]:
    """``{arm: [{"t", "text", "image", "missing"}, ...]}`` wherever the report keeps it."""
    top = data.get("modality_contribution")
    if isinstance(top, Mapping):
        return {arm: list(v) for arm, v in top.items() if v}
    return {arm: list(s["modality_contribution"]) for arm, s in data.get("final", {}).items()
            if s.get("modality_contribution")}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name)


# --------------------------------------------------------------------------- tables


def _versions(versions: Sequence[int] | None) -> str:
    """A list of snapshot versions as a count and a range, never as the list.

    >>> _versions([1, 2, 3, 7])
    '4 (v1–v7)'
    """
    if not versions:
        return fmt.NONE
    return f"{len(versions):,} (v{min(versions)}–v{max(versions)})"


def _arms_table(data: Mapping[str, Any]) -> Table:
    final, control = data.get("final", {}), data.get("control")
    level = _level(data.get("config", {}).get("alpha", 0.05))
    has_cvr = any("cvr" in s for s in final.values())
    has_conv = any("conversions" in s for s in final.values())
    head = ["Arm", "Users", "Requests", "Impressions", "Clicks", "CTR", f"{level} CI"]
    head += ["Conversions"] if has_conv else []
    head += ["CVR", f"CVR {level} CI"] if has_cvr else []
    rows = []
    for arm, s in final.items():
        row = [arm + (" (control)" if arm == control else ""), fmt.count(s.get("users")),
               fmt.count(s.get("requests")), fmt.count(s.get("impressions")), fmt.count(s.get("clicks")),
               fmt.pct(s.get("ctr")), fmt.interval(s.get("ci_low"), s.get("ci_high"), fmt.pct)]
        row += [fmt.count(s.get("conversions"))] if has_conv else []
        row += [fmt.pct(s.get("cvr")), fmt.interval(s.get("cvr_ci_low"), s.get("cvr_ci_high"), fmt.pct)] \
            if has_cvr else []
        rows.append(row)
    return Table("table-arms", "Outcome per arm", head, rows,
                 "CTR per the unit of analysis; intervals by the normal approximation.")


def _tests_table(data: Mapping[str, Any]) -> Table:
    words = {"treatment_better": "treatment better", "control_better": "control better",
             "no_difference_detected": "no difference detected"}
    rows = []
    for arm, t in data.get("tests", {}).items():
        fh = t.get("fixed_horizon") or {}
        rows.append([f"{arm} − {data['control']}", words.get(t.get("verdict"), str(t.get("verdict"))),
                     fmt.pp(t.get("diff")), fmt.signed_pct(t.get("relative_lift")),
                     fmt.interval(t.get("ci_low"), t.get("ci_high"), fmt.pp), fmt.p_value(t.get("p_value")),
                     fmt.count(t.get("stopped_at_request")), fmt.interval(fh.get("ci_low"), fh.get("ci_high"), fmt.pp),
                     fmt.p_value(fh.get("p_value"))])
    alpha = next((t.get("alpha_per_test") for t in data.get("tests", {}).values()), None)
    return Table("table-tests", "Always-valid test against the control (mSPRT)",
                 ["Comparison", "Verdict", "Difference", "Relative", f"Always-valid {_level(alpha)} CI",
                  "p-value", "Verdict at request", "Fixed-horizon CI", "Fixed-horizon p"], rows,
                 "The fixed-horizon readout (one look at the end) is shown for reference only; the "
                 "always-valid interval is the one that may be read at every look.")


def _kv(table_id: str, title: str, pairs: Sequence[tuple[str, str]], note: str = "") -> Table | None:
    rows = [[k, v] for k, v in pairs if v != fmt.NONE]
    return Table(table_id, title, ["Measure", "Value"], rows, note, kind="kv") if rows else None


def _system_tables(data: Mapping[str, Any]) -> list[Table | None]:
    tables: list[Table | None] = []
    cold = data.get("cold_start", {})
    if cold:
        ratio = data.get("headline", {}).get("cold_ctr_ratio")
        lines = data.get("demo", {}).get("config", {}).get("lines") or list(cold)
        tables.append(Table("table-cold", "Cold-start items (arrived during the run)",
                            ["Arm", "Impressions", "Clicks", "CTR", "95% CI"],
                            [[arm, fmt.count(s.get("impressions")), fmt.count(s.get("clicks")), fmt.pct(s.get("ctr")),
                              fmt.interval(s.get("ci_low"), s.get("ci_high"), fmt.pct)] for arm, s in cold.items()],
                            f"CTR ratio {' ÷ '.join(lines[:2])}: {fmt.ratio(ratio)}." if ratio else ""))
    learners = data.get("learners", {})
    if learners:
        rows = []
        for line, s in learners.items():
            pre = s.get("prequential") or {}
            rows.append([line, fmt.count(s.get("latest_version")), _versions(s.get("versions_kept")),
                         fmt.count(s.get("samples_applied")), fmt.fixed(pre.get("window_auc")),
                         fmt.pct(pre.get("window_ctr")), fmt.fixed(pre.get("window_logloss")),
                         fmt.count(pre.get("window_n"))])
        tables.append(Table("table-learners", "Learners", ["Line", "Latest version", "Versions kept",
                            "Samples applied", "Window AUC", "Window CTR", "Window log-loss", "Window samples"], rows))
    served, fresh = data.get("versions_served", {}), data.get("freshness_s", {})
    if served or fresh:
        rows = [[arm, _versions(served.get(arm)), fmt.seconds((fresh.get(arm) or {}).get("p50")),
                 fmt.seconds((fresh.get(arm) or {}).get("p99")), fmt.count((fresh.get(arm) or {}).get("n"))]
                for arm in dict.fromkeys([*served, *fresh])]
        tables.append(Table("table-snapshots", "Snapshots served", ["Arm", "Versions served", "Age p50",
                            "Age p99", "Requests measured"], rows,
                            "Age: seconds from a snapshot's publication to the request it served."))
    modality = _modality(data)
    if modality:
        rows = [[arm] + [fmt.pct(_mean([p.get(m) for p in points]), 1) for m in _MODALITIES]
                for arm, points in modality.items()]
        tables.append(Table("table-modality", "Modality contribution (mean over the run)",
                            ["Arm", "Text", "Image", "Missing"], rows))
    tp = data.get("throughput", {})
    lat = tp.get("rank_latency_ms") or {}
    pairs = [("Ranked requests", fmt.count(tp.get("requests"))), ("Ranked requests per second",
             fmt.per_s(tp.get("requests_per_s"))), ("Rank latency p50", fmt.ms(lat.get("p50"))),
             ("Rank latency p99", fmt.ms(lat.get("p99"))), ("Clicks posted", fmt.count(tp.get("clicks_posted"))),
             ("Click errors", fmt.count(tp.get("click_errors"))),
             ("New items registered", fmt.count(tp.get("new_items_registered")))]
    pairs += [(f"Samples applied per second, {line}", fmt.per_s(v, "samples/s"))
              for line, v in (tp.get("samples_applied_per_s") or {}).items()]
    tables.append(_kv("table-throughput", "Throughput", pairs))
    join = data.get("join", {})
    names = [("events_in", "Events in"), ("impressions_in", "Impressions in"), ("clicks_in", "Clicks in"),
             ("samples_out", "Samples out"), ("positive", "Positive samples"), ("negative", "Negative samples"),
             ("correction", "Delayed-feedback corrections"), ("dead_letters", "Dead letters"),
             ("quarantined", "Quarantined"), ("batch_failures", "Batch failures"), ("recoveries", "Recoveries")]
    pairs = [(label, fmt.count(join.get(key))) for key, label in names]
    pairs.append(("Event-time delay", fmt.seconds(join.get("event_time_delay_s"))))
    tables.append(_kv("table-join", "Stream join", pairs))
    return tables


def _run_table(data: Mapping[str, Any]) -> Table | None:
    config, demo = data.get("config", {}), data.get("demo", {})
    dc, startup = demo.get("config", {}), demo.get("startup_s", {})
    pairs = [("Lines (arms)", ", ".join(dc.get("lines") or data.get("arms", []))),
             ("Model", dc.get("model_scale", fmt.NONE)),
             ("Run length (wall clock)", fmt.duration(demo.get("wall_s"))),
             ("Requests", fmt.count(data.get("requests"))),
             ("Request rate (planned)", fmt.per_s(config.get("request_rate_per_s"))),
             ("Items shown per request", fmt.count(config.get("k"))),
             ("Simulated users", fmt.count(dc.get("n_users"))),
             ("Initial catalogue", fmt.count(dc.get("n_items"))),
             ("New items per minute", fmt.fixed(dc.get("new_items_per_minute"), 1)),
             ("Attribution window", fmt.seconds(config.get("attribution_window_s"))),
             ("Family-wise α", fmt.fixed(config.get("alpha"), 2)),
             ("mSPRT mixing variance τ²", fmt.fixed(config.get("tau2"), 4)),
             ("Minimum units per arm before a verdict", fmt.count(config.get("min_samples"))),
             ("Requests between looks", fmt.count(config.get("check_every"))),
             ("Startup: services", fmt.seconds(startup.get("services_s"))),
             ("Startup: first snapshot of every line", fmt.seconds(startup.get("first_snapshots_s"))),
             ("Startup: server ready", fmt.seconds(startup.get("server_ready_s"))),
             ("Seed", fmt.count(config.get("seed")))]
    return _kv("table-run", "Run settings", pairs)


def _tables(data: Mapping[str, Any]) -> list[Table]:
    tables = [_arms_table(data), _tests_table(data), *_system_tables(data), _run_table(data)]
    return [t for t in tables if t is not None]


def _mean(values: Sequence[Any]) -> float | None:
    ok = [float(v) for v in values if v is not None and math.isfinite(v)]
    return sum(ok) / len(ok) if ok else None
