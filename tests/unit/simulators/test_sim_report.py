"""The A/B report page: rendered from a fixture report.json and from a real A/B run.

``data/demo_report.json`` is the report.json of a real `em3 demo` run (default
config, seed 0, 3 minutes; the run behind docs/img/report.png) with the optional keys
other parts of the system are adding written in by hand (per-arm ``cvr``,
``conversions`` and their intervals in ``final`` and the timeline: 12% and 10% of
clicks; a ``modality_contribution`` series per arm), so every section renders.
"""
from __future__ import annotations

import copy
import html as html_lib
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from simulators.ab import ABConfig, ABRunner
from simulators.rankers import OracleRanker, RandomRanker
from simulators.report import render_html, write_report
from simulators.report.view import Table, build_page
from simulators.world import World, WorldConfig

FIXTURE = Path(__file__).parent / "data" / "demo_report.json"


@pytest.fixture
def demo() -> dict:
    return json.loads(FIXTURE.read_text())


def _sections(page: str) -> list[str]:
    return re.findall(r'<section id="([^"]+)"', page)


def _section(page: str, sid: str) -> str:
    """The HTML of the top-level section ``sid`` (up to the next top-level one)."""
    start = page.index(f'<section id="{sid}"')
    ends = [page.find(f'<section id="{s}"', start + 1) for s in ("learning", "plots", "tables", "appendix")]
    ends = [e for e in ends if e > start]
    return page[start:min(ends) if ends else len(page)]


def _text(fragment: str) -> str:
    return " ".join(html_lib.unescape(re.sub(r"<[^>]+>", " ", fragment)).split())


# --------------------------------------------------------------------------- the whole page


def test_fixture_page_has_every_section(demo, report_problems):
    page = render_html(demo, "em3 demo")
    assert report_problems(page) == []
    order = [s for s in _sections(page) if s in ("verdict", "learning", "plots", "tables", "appendix")]
    assert order == ["verdict", "learning", "plots", "tables", "appendix"]
    assert "<script" not in page


@pytest.mark.parametrize("section", ["verdict", "learning", "plots", "tables", "appendix"])
def test_the_outline_check_fails_when_a_section_is_missing(demo, report_problems, section):
    page = render_html(demo, "em3 demo")
    start = page.index(f'<section id="{section}"')
    end = page.index("</section>", start)
    if section == "tables":  # it holds nested sections: cut to the appendix
        end = page.index('<section id="appendix"') - len("</section>")
    broken = page[:start] + page[end + len("</section>"):]
    assert f"section {section!r} is missing" in report_problems(broken)


def test_the_outline_check_fails_on_a_raw_dict_or_a_long_list_in_a_cell(demo, report_problems):
    page = render_html(demo, "em3 demo")
    cell = '<td>{&#34;impressions&#34;: 414, &#34;clicks&#34;: 20}</td>'
    assert any("raw value" in p for p in report_problems(page.replace("<td>", cell, 1)))
    versions = "<td>" + ", ".join(str(v) for v in range(1, 81)) + "</td>"
    assert any("too long" in p or "raw value" in p for p in report_problems(page.replace("<td>", versions, 1)))
    assert any("raw value" in p for p in report_problems(page.replace("<td>", "<td>[1, 2, 3]</td><td>", 1)))


def test_every_chart_is_well_formed_svg(demo):
    page = render_html(demo, "em3 demo")
    charts = re.findall(r"<svg .*?</svg>", page, re.S)
    assert len(charts) >= 8
    for svg in charts:
        root = ET.fromstring(svg)  # raises on malformed markup
        assert root.tag.endswith("svg") and root.find("{http://www.w3.org/2000/svg}title").text
    ids = re.findall(r'<svg id="([^"]+)"', page)
    assert len(ids) == len(set(ids)), "chart ids (and their clip paths) must be unique in the page"


def test_appendix_holds_the_report_as_json(demo):
    page = render_html(demo, "em3 demo")
    appendix = _section(page, "appendix")
    assert "<details>" in appendix
    raw = re.search(r"<pre>(.*?)</pre>", appendix, re.S).group(1)
    assert json.loads(html_lib.unescape(raw)) == demo


# --------------------------------------------------------------------------- the verdict


def test_verdict_names_unit_policy_and_stop_reason(demo):
    verdict = _text(_section(render_html(demo, "t"), "verdict"))
    assert "user (randomised by user" in verdict
    assert "split: each line learns only from its own arm's traffic" in verdict
    assert "Stopped on its time budget after" in verdict
    assert "stopped early" not in verdict.lower()


def _with_test(demo: dict, **test) -> dict:
    data = copy.deepcopy(demo)
    data["tests"]["id_only"].update(test)
    return data


def test_verdict_when_the_treatment_wins(demo):
    data = _with_test(demo, verdict="treatment_better", diff=0.0123, ci_low=0.004, ci_high=0.0206,
                      relative_lift=0.151, stopped_at_request=1500)
    page = build_page(data, "t")
    assert page.verdict.winner == "id_only"
    assert page.verdict.headline == "id_only wins: CTR +1.23 pp over em3 (+15.1%)"
    (comparison,) = page.verdict.comparisons
    assert comparison.interval == "[+0.40 pp, +2.06 pp]" and comparison.level == "95%"
    assert "always-valid verdict came at request 1,500" in page.verdict.facts[2].value


def test_verdict_when_the_control_wins(demo):
    data = _with_test(demo, verdict="control_better", diff=-0.031, ci_low=-0.05, ci_high=-0.012,
                      relative_lift=-0.3)
    page = build_page(data, "t")
    assert page.verdict.winner == "em3"
    assert page.verdict.headline == "em3 (control) wins: CTR 3.10 pp above id_only"
    assert "em3 beats id_only" in page.verdict.comparisons[0].sentence
    assert "[−5.00 pp, −1.20 pp]" in page.verdict.comparisons[0].sentence


def test_verdict_without_a_difference_or_without_enough_users(demo):
    undecided = build_page(_with_test(demo, verdict="no_difference_detected", diff=0.002, ci_low=-0.01,
                                      ci_high=0.014), "t").verdict
    assert undecided.winner is None and undecided.headline == "No winner: no difference detected"
    assert "includes zero" in undecided.comparisons[0].sentence
    early = build_page(_with_test(demo, verdict="no_difference_detected", ci_low=None, ci_high=None), "t").verdict
    assert early.headline == "No winner yet: too few users for a verdict"
    assert "needs 50 users per arm" in early.comparisons[0].sentence


def test_verdict_over_several_treatments(demo):
    data = _with_test(demo, verdict="treatment_better", diff=0.01, ci_low=0.002, ci_high=0.018, relative_lift=0.1)
    data["tests"]["content_frozen"] = dict(data["tests"]["id_only"], diff=0.02, relative_lift=0.2)
    data["tests"]["no_cic"] = dict(data["tests"]["id_only"], verdict="no_difference_detected", diff=0.03,
                                   ci_low=-0.01, ci_high=0.07)
    page = build_page(data, "t")
    assert page.verdict.winner == "content_frozen" and len(page.verdict.comparisons) == 3
    mixed = _with_test(demo, verdict="control_better", diff=-0.02, ci_low=-0.03, ci_high=-0.01)
    mixed["tests"]["no_cic"] = dict(mixed["tests"]["id_only"], verdict="no_difference_detected", ci_low=-0.04,
                                    ci_high=0.01)
    assert build_page(mixed, "t").verdict.headline == "No winner yet: not every comparison has a verdict"


@pytest.mark.parametrize("reason,words", [("evidence", "Stopped on evidence"),
                                          ("request_budget", "Ran all"),
                                          (None, "Stop reason not recorded")])
def test_stop_reason_in_words(demo, reason, words):
    data = copy.deepcopy(demo)
    if reason is None:
        data.pop("stop_reason")
    else:
        data["stop_reason"] = reason
    assert build_page(data, "t").verdict.facts[2].value.startswith(words)


# --------------------------------------------------------------------------- learning


def test_learning_checks_stand_beside_their_targets(demo):
    learning = build_page(demo, "t").learning
    head = demo["headline"]
    figures = {c.label: (c.figure, c.target, c.ok) for c in learning.checks}
    for line, auc in head["window_auc"].items():
        assert figures[f"{line}: prequential AUC, last window"] == (f"{auc:.3f}", "≥ 0.65", auc >= 0.65)
    cold = figures["em3 ÷ id_only: CTR on cold-start items"]
    assert cold[:2] == (f"{head['cold_ctr_ratio']:.2f}×", "≥ 1.2×")
    assert learning.shows == head["learning_shows"]
    assert learning.chart is not None and "target 0.65" in learning.chart.svg


def test_a_window_in_seconds_is_named_by_its_length(demo):
    data = copy.deepcopy(demo)
    for n, line in enumerate(data["headline"]["window_auc"]):
        data["learners"].setdefault(line, {}).setdefault("prequential", {})["window_s"] = (60.0, 30.0)[n % 2]
    labels = [c.label for c in build_page(data, "t").learning.checks]
    lines = list(data["headline"]["window_auc"])
    assert f"{lines[0]}: prequential AUC, last minute" in labels
    assert f"{lines[1]}: prequential AUC, last 30 s" in labels


def test_a_missed_target_is_marked_missed(demo, report_problems):
    data = copy.deepcopy(demo)
    data["headline"].update(window_auc={"em3": 0.61, "id_only": 0.7}, learning_shows=False)
    page = render_html(data, "t")
    card = _section(page, "learning")
    assert "Not fully: 1 of 4 checks missed their target" in _text(card)
    assert card.count("✗ missed") == 1 and report_problems(page) == []


def test_no_learning_card_without_a_headline(demo, report_problems):
    data = copy.deepcopy(demo)
    data.pop("headline")
    page = render_html(data, "t")
    assert "learning" not in _sections(page)
    assert report_problems(page, learning=False) == []


# --------------------------------------------------------------------------- optional sections


def test_cvr_and_modality_sections_render_when_present(demo):
    page = render_html(demo, "t")
    assert "<th>CVR</th>" in page and "<th>Conversions</th>" in page
    assert 'id="chart-cvr"' in page
    for arm in demo["modality_contribution"]:
        assert f'id="chart-modality-{arm.replace("_", "-")}"' in page
    assert 'id="table-modality"' in page
    arms = build_page(demo, "t").tables[0]
    row = arms.rows[0]
    s = demo["final"]["em3"]
    assert row[arms.head.index("Conversions")] == f"{s['conversions']:,}"
    assert row[arms.head.index("CVR")] == f"{100 * s['cvr']:.2f}%"


def test_optional_sections_are_left_out_when_absent(demo, report_problems):
    data = copy.deepcopy(demo)
    data.pop("modality_contribution")
    for s in data["final"].values():
        for key in ("cvr", "conversions", "cvr_ci_low", "cvr_ci_high"):
            s.pop(key, None)
    for entry in data["timeline"]:
        for s in entry["arms"].values():
            for key in ("cvr", "cvr_ci_low", "cvr_ci_high"):
                s.pop(key, None)
    page = render_html(data, "t")
    assert "CVR" not in _section(page, "tables") and "Conversions" not in page
    assert "chart-cvr" not in page and "modality" not in _section(page, "plots")
    assert report_problems(page) == []


def test_modality_series_kept_per_arm_in_final_renders_too(demo):
    data = copy.deepcopy(demo)
    for arm, series in data.pop("modality_contribution").items():
        data["final"][arm]["modality_contribution"] = series
    assert 'id="chart-modality-em3"' in render_html(data, "t")


# --------------------------------------------------------------------------- tables and escaping


def test_table_cells_carry_units(demo):
    tables = {t.id: t for t in build_page(demo, "t").tables}
    throughput = dict(tables["table-throughput"].rows)
    assert throughput["Ranked requests per second"].endswith(" req/s")
    assert throughput["Rank latency p50"].endswith(" ms")
    assert re.fullmatch(r"\d{1,3}(,\d{3})*", throughput["Ranked requests"])
    learners = tables["table-learners"]
    assert all(re.fullmatch(r"[\d,]+ \(v\d+–v\d+\)", r[learners.head.index("Versions kept")]) for r in learners.rows)
    assert all(r[-1].endswith("%]") for r in tables["table-arms"].rows if "CI" in tables["table-arms"].head[-1])


def test_a_table_refuses_raw_values():
    with pytest.raises(TypeError, match="strings"):
        Table("t", "T", ["a", "b"], [["x", {"impressions": 414}]])


def test_names_and_title_are_escaped(demo):
    data = copy.deepcopy(demo)
    data["final"]["<b>x</b>"] = data["final"].pop("id_only")
    page = render_html(data, "run <1> & co")
    assert "<title>run &lt;1&gt; &amp; co</title>" in page
    assert "<b>x</b>" not in page and "&lt;b&gt;x&lt;/b&gt;" in page


# --------------------------------------------------------------------------- from a real A/B run


def test_write_report_from_a_run(tmp_path, report_problems):
    world = World(WorldConfig(seed=0, n_users=200, n_items=150))
    arms = {"random": RandomRanker("random", 0), "oracle": OracleRanker(world)}

    def metrics(t):
        return {"freshness_s": {"oracle": 12.0, "random": 3.0}}

    report = ABRunner(world, arms, ABConfig(n_requests=600, check_every=100, min_samples=20),
                      metrics=metrics).run()
    written = write_report(report, tmp_path, title="test <run>")
    assert set(written) == {"json", "html"}
    data = json.loads(written["json"].read_text())
    assert data["requests"] == 600 and data["stop_reason"] == "request_budget"
    page = written["html"].read_text()
    assert "test &lt;run&gt;" in page
    assert report_problems(page, learning=False) == []
    assert "Ran all 600 requests" in _text(_section(page, "verdict"))


def test_write_report_puts_the_headline_first(tmp_path, demo):
    world = World(WorldConfig(seed=1, n_users=100, n_items=100))
    report = ABRunner(world, {"a": RandomRanker("a"), "b": RandomRanker("b", 1)},
                      ABConfig(n_requests=200, check_every=100)).run()
    written = write_report(report, tmp_path, extra={"throughput": {"requests": 200}, "headline": demo["headline"]})
    data = json.loads(written["json"].read_text())
    assert next(iter(data)) == "headline" and data["throughput"] == {"requests": 200}
    assert 'id="learning"' in written["html"].read_text()
