"""Plots and an HTML page for an A/B report (matplotlib, Agg backend).

The only simulators module that imports matplotlib, and only inside functions.
Figures: CTR per arm over time with its interval band; the always-valid
interval of each treatment's difference from control; and, when the timeline
carries them (see :mod:`simulators.ab`), prequential AUC and freshness per arm.
:func:`write_report` writes ``report.json``, the PNGs and ``report.html`` with
the PNGs embedded (base64), so the page is one self-contained file.
"""
from __future__ import annotations

import base64
import html
import json
import logging
from pathlib import Path
from typing import Any, Callable, Mapping

from simulators.ab import ABReport, _clean

__all__ = ["plot_ctr", "plot_tests", "plot_metric", "write_report"]

logger = logging.getLogger(__name__)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _time_axis(times: list[float], t0: float | None = None) -> tuple[list[float], str]:
    """Times since ``t0`` (default the first) in hours, or in seconds for spans under two hours."""
    if not times:
        return [], "event time"
    t0 = times[0] if t0 is None else t0
    scale, unit = (3600.0, "hours") if times[-1] - t0 > 7200 else (1.0, "seconds")
    return [(t - t0) / scale for t in times], f"event time ({unit} since first look)"


def _nan(x: Any) -> float:
    return float("nan") if x is None else float(x)


def _banded(data: Mapping[str, Any], key: str, value: str, label: Callable[[str], str],
            ylabel: str, title: str, path: str | Path, zero_line: bool = False) -> Path:
    """Per-series lines with their confidence bands over event time, from
    ``timeline[i][key][name]`` (``value``, ``ci_low``, ``ci_high``); saved as PNG."""
    timeline = data["timeline"]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    x, xlabel = _time_axis([e["t"] for e in timeline])
    for name in data[key]:
        y = [_nan(e[key][name][value]) for e in timeline]
        lo = [_nan(e[key][name]["ci_low"]) for e in timeline]
        hi = [_nan(e[key][name]["ci_high"]) for e in timeline]
        line, = ax.plot(x, y, label=label(name))
        ax.fill_between(x, lo, hi, alpha=0.2, color=line.get_color())
    if zero_line:
        ax.axhline(0.0, color="black", linewidth=0.8)
    return _finish(plt, fig, ax, xlabel, ylabel, title, path)


def _finish(plt: Any, fig: Any, ax: Any, xlabel: str, ylabel: str, title: str, path: str | Path) -> Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, format="png")
    plt.close(fig)
    return out


def plot_ctr(report: ABReport | Mapping[str, Any], path: str | Path) -> Path:
    """CTR per arm over event time, with the per-arm confidence band; saved as PNG."""
    data = report.to_dict() if isinstance(report, ABReport) else report
    return _banded(data, "arms", "ctr", str, "CTR per request", "CTR per arm", path)


def plot_tests(report: ABReport | Mapping[str, Any], path: str | Path) -> Path:
    """Each treatment's difference from control with its always-valid interval."""
    data = report.to_dict() if isinstance(report, ABReport) else report
    return _banded(data, "tests", "diff", lambda arm: f"{arm} - {data['control']}",
                   "CTR difference (always-valid CI)", "mSPRT: difference from control", path, zero_line=True)


def plot_metric(report: ABReport | Mapping[str, Any], name: str, path: str | Path,
                ylabel: str | None = None) -> Path | None:
    """A per-arm series from ``timeline[i]["metrics"][name]``; None when absent."""
    data = report.to_dict() if isinstance(report, ABReport) else report
    points = [(e["t"], e["metrics"][name]) for e in data["timeline"] if name in e.get("metrics", {})]
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    t0 = data["timeline"][0]["t"]
    arms = sorted({a for _, series in points for a in series})
    xlabel = "event time"
    for arm in arms:
        xs, xlabel = _time_axis([t for t, s in points if arm in s], t0)
        ys = [_nan(s[arm]) for _, s in points if arm in s]
        ax.plot(xs, ys, label=arm)
    return _finish(plt, fig, ax, xlabel, ylabel or name, name, path)


def write_report(report: ABReport, out_dir: str | Path, title: str = "A/B experiment", *,
                 extra: Mapping[str, Any] | None = None, extra_html: str = "") -> dict[str, Path]:
    """Write ``report.json``, the PNGs and a self-contained ``report.html`` to ``out_dir``.

    ``extra`` is merged into the JSON report (under its own keys) and
    ``extra_html`` (already escaped by the caller) goes into the page after the
    verdicts: how the demo adds its system figures.

    Returns
    -------
    dict of str to Path
        What was written, by name.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    written["json"] = out / "report.json"
    body = report.to_dict()
    if extra:
        body.update(_clean(dict(extra)))
        if "headline" in extra:  # the reader's verdict comes first in the file
            body = {"headline": body.pop("headline"), **body}
    written["json"].write_text(json.dumps(_clean(body), indent=2))
    written["ctr"] = plot_ctr(report, out / "ctr.png")
    written["tests"] = plot_tests(report, out / "tests.png")
    labels = {"prequential_auc": "prequential AUC", "freshness_s": "snapshot age (s)"}
    names = sorted({n for e in report.timeline for n in e.get("metrics", {})},
                   key=lambda n: (n not in labels, n))
    for name in names:
        path = plot_metric(report, name, out / f"{name}.png", labels.get(name, name))
        if path is not None:
            written[name] = path
    figures = "".join(
        f'<h2>{html.escape(name)}</h2><img alt="{html.escape(name)}" '
        f'src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}">'
        for name, path in written.items() if path.suffix == ".png"
    )
    rows = "".join(
        f"<tr><td>{html.escape(arm)}</td><td>{s['requests']}</td><td>{s['clicks']}</td>"
        f"<td>{_fmt(s['ctr'])}</td><td>[{_fmt(s['ci_low'])}, {_fmt(s['ci_high'])}]</td></tr>"
        for arm, s in report.final.items()
    )
    verdicts = "".join(
        f"<tr><td>{html.escape(arm)}</td><td>{html.escape(v['verdict'])}</td><td>{_fmt(v['diff'])}</td>"
        f"<td>[{_fmt(v['ci_low'])}, {_fmt(v['ci_high'])}]</td><td>{_fmt(v['p_value'])}</td>"
        f"<td>{v['stopped_at_request']}</td></tr>"
        for arm, v in report.tests.items()
    )
    config = html.escape(json.dumps(_clean(report.config), indent=1))
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;max-width:960px;margin:auto}td,th{padding:2px 8px}</style>"
        f"</head><body><h1>{html.escape(title)}</h1>"
        f"<p>control: <b>{html.escape(report.control)}</b>; requests: {report.requests}; "
        f"stopped early: {report.stopped_early}</p>"
        "<h2>CTR per arm</h2><table><tr><th>arm</th><th>requests</th><th>clicks</th><th>CTR</th>"
        f"<th>CI</th></tr>{rows}</table>"
        "<h2>Sequential test (mSPRT) against control</h2><table><tr><th>arm</th><th>verdict</th>"
        "<th>difference</th><th>always-valid CI</th><th>p-value</th><th>stopped at request</th></tr>"
        f"{verdicts}</table>{extra_html}{figures}<h2>config</h2><pre>{config}</pre></body></html>"
    )
    written["html"] = out / "report.html"
    written["html"].write_text(page, encoding="utf-8")
    logger.info("A/B report written to %s", out)
    return written


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    try:
        return f"{float(x):.4g}"
    except (TypeError, ValueError):
        return html.escape(str(x))
