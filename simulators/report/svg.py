"""Inline SVG charts for the HTML report: pure functions from numbers to markup.

No plotting library and no JavaScript: each chart is a string of SVG that the page
embeds as is, so the report is one self-contained file that any browser (or a
headless one, for the screenshot) draws the same way. Three kinds cover the report:
:func:`line_chart` (lines over time with optional interval bands and reference
rules), :func:`bar_chart` (one bar per arm with interval whiskers) and
:func:`stacked_area` (shares that sum to one, over time).

Missing points (``None`` or NaN) break a line rather than draw through the gap.
Text is escaped here; the markup is trusted by the template.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape
from typing import Callable, Mapping, Sequence

__all__ = ["Series", "Rule", "Bar", "nice_ticks", "line_chart", "bar_chart", "stacked_area", "PALETTE"]

#: Colour of the i-th series (colour-blind safe, Okabe-Ito order).
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")
_MARGIN = {"left": 62, "right": 14, "top": 30, "bottom": 38}

Number = float | int | None
Fmt = Callable[[float], str]


@dataclass(frozen=True)
class Series:
    """One line: ``y[i]`` at ``x[i]``, with an optional band ``[low[i], high[i]]``."""

    name: str
    x: Sequence[float]
    y: Sequence[Number]
    low: Sequence[Number] | None = None
    high: Sequence[Number] | None = None


@dataclass(frozen=True)
class Rule:
    """A horizontal reference line (a target, or zero), drawn dashed and labelled."""

    y: float
    label: str


@dataclass(frozen=True)
class Bar:
    """One bar with an optional interval whisker."""

    name: str
    value: Number
    low: Number = None
    high: Number = None


def _ok(v: Number) -> bool:
    return v is not None and math.isfinite(v)


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering ``[lo, hi]`` (steps of 1, 2, 2.5 or 5 x 10^k).

    >>> nice_ticks(0.0, 1.0)
    [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    >>> nice_ticks(0.013, 0.087, 4)
    [0.0, 0.02, 0.04, 0.06, 0.08, 0.1]
    >>> nice_ticks(-0.031, 0.012, 4)
    [-0.04, -0.02, 0.0, 0.02]
    """
    if not hi > lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(n, 1)
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1.0, 2.0, 2.5, 5.0, 10.0) if m * mag >= raw)
    start = math.floor(lo / step + 1e-9) * step
    ticks, k = [], 0
    while True:
        t = start + k * step
        ticks.append(round(t, 12) + 0.0)
        if t >= hi - 1e-9 * step:
            return ticks
        k += 1


class _Frame:
    """The plot area of one chart: scales data to pixels and draws axes and legend."""

    def __init__(self, width: int, height: int, x_range: tuple[float, float], y_ticks: list[float]) -> None:
        self.w, self.h = width, height
        self.x0, self.x1 = _MARGIN["left"], width - _MARGIN["right"]
        self.y0, self.y1 = height - _MARGIN["bottom"], _MARGIN["top"]  # pixel y of the bottom and the top
        self.xr = x_range if x_range[1] > x_range[0] else (x_range[0], x_range[0] + 1.0)
        self.yr = (y_ticks[0], y_ticks[-1])
        self.y_ticks = y_ticks

    def px(self, x: float) -> float:
        return self.x0 + (x - self.xr[0]) / (self.xr[1] - self.xr[0]) * (self.x1 - self.x0)

    def py(self, y: float) -> float:
        return self.y0 - (y - self.yr[0]) / (self.yr[1] - self.yr[0]) * (self.y0 - self.y1)

    def axes(self, y_fmt: Fmt, x_ticks: Sequence[tuple[float, str]], x_label: str) -> list[str]:
        out = []
        for t in self.y_ticks:
            y = self.py(t)
            out.append(f'<line class="grid" x1="{self.x0}" y1="{y:.1f}" x2="{self.x1}" y2="{y:.1f}"/>')
            out.append(f'<text class="tick" x="{self.x0 - 6}" y="{y + 4:.1f}" text-anchor="end">'
                       f"{escape(y_fmt(t))}</text>")
        for x, label in x_ticks:
            out.append(f'<text class="tick" x="{self.px(x):.1f}" y="{self.y0 + 16}" text-anchor="middle">'
                       f"{escape(label)}</text>")
        out.append(f'<line class="axis" x1="{self.x0}" y1="{self.y0}" x2="{self.x1}" y2="{self.y0}"/>')
        out.append(f'<text class="label" x="{(self.x0 + self.x1) / 2:.1f}" y="{self.h - 4}" '
                   f'text-anchor="middle">{escape(x_label)}</text>')
        return out

    def legend(self, names: Sequence[str], colours: Sequence[str]) -> list[str]:
        out, x = [], self.x0
        for name, colour in zip(names, colours):
            out.append(f'<rect x="{x}" y="8" width="12" height="12" rx="2" fill="{colour}"/>')
            out.append(f'<text class="legend" x="{x + 17}" y="18">{escape(name)}</text>')
            x += 30 + 7 * len(name)
        return out


def _svg(chart_id: str, title: str, width: int, height: int, body: list[str]) -> str:
    return (f'<svg id="{escape(chart_id)}" class="chart" viewBox="0 0 {width} {height}" width="{width}" '
            f'height="{height}" role="img" aria-labelledby="{escape(chart_id)}-t" '
            f'xmlns="http://www.w3.org/2000/svg"><title id="{escape(chart_id)}-t">{escape(title)}</title>'
            + "".join(body) + "</svg>")


def _segments(idx: Sequence[int], keep: Callable[[int], bool]) -> list[list[int]]:
    """Runs of consecutive indices for which ``keep`` holds (a gap breaks a run)."""
    runs: list[list[int]] = [[]]
    for i in idx:
        if keep(i):
            runs[-1].append(i)
        elif runs[-1]:
            runs.append([])
    return [r for r in runs if r]


def _x_ticks(lo: float, hi: float, fmt: Fmt) -> list[tuple[float, str]]:
    return [(t, fmt(t)) for t in nice_ticks(lo, hi, 6) if lo - 1e-9 <= t <= hi + 1e-9]


def _y_ticks(values: list[float], y_min: float | None, y_max: float | None) -> list[float]:
    lo = y_min if y_min is not None else min(values, default=0.0)
    hi = y_max if y_max is not None else max(values, default=1.0)
    if hi - lo < 1e-12:
        pad = abs(hi) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    return nice_ticks(lo, hi, 5)


def line_chart(chart_id: str, series: Sequence[Series], *, title: str, x_label: str, y_fmt: Fmt,
               x_fmt: Fmt = lambda x: f"{x:g}", rules: Sequence[Rule] = (), x_min: float | None = None,
               y_min: float | None = None, y_max: float | None = None, width: int = 640,
               height: int = 260) -> str:
    """Lines over ``x`` with their bands and dashed reference rules, as SVG markup.

    The y range covers every point, every rule and the bands from the second quarter
    of each series on: early intervals are often very wide, and a range fitted to
    them would flatten the rest (the band is clipped to the plot instead).
    ``x_min``, ``y_min`` and ``y_max`` fix those ends (``x_min=0``: time from the start).

    >>> svg = line_chart("c", [Series("a", [0, 1, 2], [0.5, None, 0.7])], title="t", x_label="s",
    ...                  y_fmt=lambda y: f"{y:.1f}")
    >>> svg.startswith("<svg") and svg.count("<path") == 2  # the gap splits the line in two
    True
    """
    xs = [x for s in series for x in s.x]
    values = [float(v) for s in series for v in s.y if _ok(v)] + [r.y for r in rules]
    for s in series:
        for band in (s.low, s.high):
            if band is not None:
                values += [float(v) for v in band[len(band) // 4:] if _ok(v)]
    x_lo = x_min if x_min is not None else min(xs, default=0.0)
    frame = _Frame(width, height, (x_lo, max(xs, default=1.0)), _y_ticks(values, y_min, y_max))
    clip = f"{chart_id}-clip"
    body = [f'<clipPath id="{escape(clip)}"><rect x="{frame.x0}" y="{frame.y1}" '
            f'width="{frame.x1 - frame.x0}" height="{frame.y0 - frame.y1}"/></clipPath>']
    body += frame.axes(y_fmt, _x_ticks(frame.xr[0], frame.xr[1], x_fmt), x_label)
    colours = [PALETTE[i % len(PALETTE)] for i in range(len(series))]
    for s, colour in zip(series, colours):
        idx = range(len(s.x))
        if s.low is not None and s.high is not None:
            low, high = s.low, s.high
            for run in _segments(idx, lambda i: _ok(low[i]) and _ok(high[i])):
                upper = [f"{frame.px(s.x[i]):.1f},{frame.py(high[i]):.1f}" for i in run]
                lower = [f"{frame.px(s.x[i]):.1f},{frame.py(low[i]):.1f}" for i in reversed(run)]
                body.append(f'<polygon class="band" clip-path="url(#{escape(clip)})" fill="{colour}" '
                            f'points="{" ".join(upper + lower)}"/>')
        for run in _segments(idx, lambda i: _ok(s.y[i])):
            points = " L".join(f"{frame.px(s.x[i]):.1f},{frame.py(s.y[i]):.1f}" for i in run)
            body.append(f'<path class="line" clip-path="url(#{escape(clip)})" stroke="{colour}" d="M{points}"/>')
            if len(run) == 1:
                i = run[0]
                body.append(f'<circle cx="{frame.px(s.x[i]):.1f}" cy="{frame.py(s.y[i]):.1f}" r="2.5" '
                            f'fill="{colour}"/>')
    for rule in rules:
        y = frame.py(rule.y)
        body.append(f'<line class="rule" x1="{frame.x0}" y1="{y:.1f}" x2="{frame.x1}" y2="{y:.1f}"/>')
        body.append(f'<text class="rule-label" x="{frame.x1 - 4}" y="{y - 4:.1f}" text-anchor="end">'
                    f"{escape(rule.label)}</text>")
    body += frame.legend([s.name for s in series], colours)
    return _svg(chart_id, title, width, height, body)


def bar_chart(chart_id: str, bars: Sequence[Bar], *, title: str, y_fmt: Fmt, rules: Sequence[Rule] = (),
              width: int = 640, height: int = 260) -> str:
    """One bar per entry, from zero, with its interval as a whisker, as SVG markup.

    >>> bar_chart("b", [Bar("a", 0.1, 0.05, 0.15), Bar("b", None)], title="t",
    ...           y_fmt=lambda y: f"{y:.2f}").count('class="bar"')
    1
    """
    values = [0.0] + [float(v) for b in bars for v in (b.value, b.high) if _ok(v)] + [r.y for r in rules]
    frame = _Frame(width, height, (0.0, float(max(len(bars), 1))), _y_ticks(values, 0.0, None))
    body = frame.axes(y_fmt, [(i + 0.5, b.name) for i, b in enumerate(bars)], "")
    for i, bar in enumerate(bars):
        colour = PALETTE[i % len(PALETTE)]
        if not _ok(bar.value):
            continue
        left, right = frame.px(i + 0.2), frame.px(i + 0.8)
        top = frame.py(bar.value)
        body.append(f'<rect class="bar" x="{left:.1f}" y="{top:.1f}" width="{right - left:.1f}" '
                    f'height="{frame.y0 - top:.1f}" fill="{colour}"/>')
        label_y = frame.py(max(bar.value, bar.high)) if _ok(bar.high) else top  # above the whisker
        body.append(f'<text class="value" x="{(left + right) / 2:.1f}" y="{max(label_y - 5, 10):.1f}" '
                    f'text-anchor="middle">{escape(y_fmt(bar.value))}</text>')
        if _ok(bar.low) and _ok(bar.high):
            mid, lo, hi = (left + right) / 2, frame.py(bar.low), frame.py(min(bar.high, frame.yr[1]))
            body.append(f'<path class="whisker" d="M{mid:.1f},{lo:.1f} L{mid:.1f},{hi:.1f} '
                        f'M{mid - 6:.1f},{lo:.1f} L{mid + 6:.1f},{lo:.1f} M{mid - 6:.1f},{hi:.1f} '
                        f'L{mid + 6:.1f},{hi:.1f}"/>')
    for rule in rules:
        y = frame.py(rule.y)
        body.append(f'<line class="rule" x1="{frame.x0}" y1="{y:.1f}" x2="{frame.x1}" y2="{y:.1f}"/>')
        body.append(f'<text class="rule-label" x="{frame.x1 - 4}" y="{y - 4:.1f}" text-anchor="end">'
                    f"{escape(rule.label)}</text>")
    return _svg(chart_id, title, width, height, body)


def stacked_area(chart_id: str, x: Sequence[float], layers: Mapping[str, Sequence[Number]], *, title: str,
                 x_label: str, y_fmt: Fmt, x_fmt: Fmt = lambda x: f"{x:g}", x_min: float | None = None,
                 width: int = 640, height: int = 260) -> str:
    """Shares stacked from the bottom (the layers of each point summing to about one), as SVG.

    A point with a missing layer is left out of every layer.

    >>> stacked_area("m", [0, 1], {"text": [0.6, 0.5], "image": [0.4, 0.5]}, title="t", x_label="s",
    ...              y_fmt=lambda y: f"{y:.0%}").count('class="area"')
    2
    """
    keep = [i for i in range(len(x)) if all(_ok(v[i]) for v in layers.values())]
    values = [sum(float(v[i]) for v in layers.values()) for i in keep]
    top = max([1.0] + [round(v, 2) for v in values])  # shares rounded to sum 1.0001 still top out at 100%
    frame = _Frame(width, height, (x_min if x_min is not None else min(x, default=0.0), max(x, default=1.0)),
                   _y_ticks([0.0, top], 0.0, top))
    body = frame.axes(y_fmt, _x_ticks(frame.xr[0], frame.xr[1], x_fmt), x_label)
    base = [0.0] * len(keep)
    colours = [PALETTE[i % len(PALETTE)] for i in range(len(layers))]
    for (name, v), colour in zip(layers.items(), colours):
        top = [b + float(v[i]) for b, i in zip(base, keep)]
        upper = [f"{frame.px(x[i]):.1f},{frame.py(t):.1f}" for i, t in zip(keep, top)]
        lower = [f"{frame.px(x[i]):.1f},{frame.py(b):.1f}" for i, b in reversed(list(zip(keep, base)))]
        if upper:
            body.append(f'<polygon class="area" fill="{colour}" points="{" ".join(upper + lower)}"/>')
        base = top
    body += frame.legend(list(layers), colours)
    return _svg(chart_id, title, width, height, body)
