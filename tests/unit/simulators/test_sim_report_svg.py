"""Inline SVG charts and the report's number formats: pure functions, checked on their output."""
from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET

import pytest

from simulators.report import fmt
from simulators.report.svg import Bar, Rule, Series, bar_chart, line_chart, nice_ticks, stacked_area

NS = "{http://www.w3.org/2000/svg}"


def _y_ticks(svg: str) -> list[str]:
    return re.findall(r'<text class="tick" x="[\d.]+" y="[\d.]+" text-anchor="end">([^<]*)</text>', svg)


def test_line_chart_is_valid_svg_with_legend_title_and_a_path_per_run():
    svg = line_chart("c1", [Series("em3", [0, 1, 2, 3], [0.5, 0.6, None, 0.7]),
                            Series("id_only", [0, 1, 2, 3], [0.55, float("nan"), 0.6, 0.65])],
                     title="AUC & more", x_label="seconds", y_fmt=lambda y: f"{y:.2f}")
    root = ET.fromstring(svg)
    assert root.find(f"{NS}title").text == "AUC & more"
    paths = root.findall(f".//{NS}path")
    assert len(paths) == 4  # each line broken in two by its gap
    assert [t.text for t in root.findall(f".//{NS}text") if t.get("class") == "legend"] == ["em3", "id_only"]


def test_y_range_ignores_wide_early_bands_but_covers_rules_and_points():
    x = list(range(8))
    y = [0.05] * 8
    low = [-5.0, -5.0, 0.04, 0.04, 0.04, 0.04, 0.04, 0.04]
    high = [5.0, 5.0, 0.06, 0.06, 0.06, 0.06, 0.06, 0.07]
    ticks = _y_ticks(line_chart("c", [Series("a", x, y, low, high)], title="t", x_label="s",
                                y_fmt=lambda v: f"{v:.3f}", rules=[Rule(0.0, "zero")]))
    values = [float(t) for t in ticks]
    assert min(values) <= 0.0 and 0.07 <= max(values) < 1.0


def test_rule_is_drawn_and_labelled():
    svg = line_chart("c", [Series("a", [0, 1], [0.6, 0.7])], title="t", x_label="s", y_fmt=str,
                     rules=[Rule(0.65, "target 0.65")], y_min=0.5, y_max=1.0)
    assert 'class="rule"' in svg and ">target 0.65</text>" in svg


def test_bar_chart_draws_known_bars_and_whiskers():
    svg = bar_chart("b", [Bar("em3", 0.08, 0.05, 0.11), Bar("id_only", 0.04), Bar("none", None)],
                    title="t", y_fmt=lambda v: f"{100 * v:.0f}%")
    root = ET.fromstring(svg)
    assert len([r for r in root.iter(f"{NS}rect") if r.get("class") == "bar"]) == 2
    assert len([p for p in root.iter(f"{NS}path") if p.get("class") == "whisker"]) == 1


def test_stacked_area_tops_out_at_the_sum():
    svg = stacked_area("m", [0, 60, 120], {"text": [0.5, 0.4, None], "image": [0.3, 0.4, 0.5],
                                           "missing": [0.2, 0.2, 0.1]},
                       title="t", x_label="s", y_fmt=lambda v: f"{100 * v:.0f}%")
    root = ET.fromstring(svg)
    areas = [p for p in root.iter(f"{NS}polygon") if p.get("class") == "area"]
    assert len(areas) == 3
    assert all(len(a.get("points").split()) == 4 for a in areas)  # the point with a missing layer is left out
    assert _y_ticks(svg)[-1] == "100%"


def test_chart_text_is_escaped():
    svg = line_chart("c", [Series("<b>&", [0, 1], [1, 2])], title="<t>", x_label="<x>", y_fmt=str)
    ET.fromstring(svg)
    assert "<b>" not in svg and "&lt;b&gt;&amp;" in svg


@pytest.mark.parametrize("lo,hi", [(0.0, 1.0), (0.013, 0.087), (-0.031, 0.012), (3.0, 3.0), (0.4, 0.95),
                                   (1e-5, 3e-5), (12.0, 1900.0)])
def test_nice_ticks_cover_the_range_with_even_steps(lo, hi):
    ticks = nice_ticks(lo, hi)
    assert ticks[0] <= lo + 1e-12 and ticks[-1] >= hi - 1e-12
    steps = {round(b - a, 12) for a, b in zip(ticks, ticks[1:])}
    assert len(steps) == 1 and 2 <= len(ticks) <= 12


def test_formats_attach_units_and_dash_missing_values():
    assert fmt.pct(0.0589) == "5.89%" and fmt.pp(0.0123) == "+1.23 pp" and fmt.pp(-0.0005) == "−0.05 pp"
    assert fmt.count(1045) == "1,045" and fmt.ms(19.92) == "20 ms" and fmt.per_s(4.12) == "4.1 req/s"
    assert fmt.ratio(1.234) == "1.23×" and fmt.seconds(0.944) == "0.94 s"
    for f in (fmt.pct, fmt.pp, fmt.count, fmt.ms, fmt.per_s, fmt.ratio, fmt.seconds, fmt.fixed, fmt.duration):
        assert f(None) == fmt.NONE and f(math.nan) == fmt.NONE
    assert fmt.interval(-0.01, 0.02, fmt.pp) == "[−1.00 pp, +2.00 pp]"
