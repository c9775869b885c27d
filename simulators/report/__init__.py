"""The A/B report as a page people read: ``report.json`` in, one self-contained HTML file out.

The page opens with the verdict (which arm wins, by how much, with its always-valid
interval, the unit of analysis, the training-data policy and why the test stopped)
and, for ``em3 demo``, whether learning showed (window AUC curves and cold-start CTR
against their targets). Then come the charts, inline SVG drawn in Python
(:mod:`simulators.report.svg`, no JavaScript), then tables whose cells carry units
(:mod:`simulators.report.fmt`), then the raw JSON in a collapsed appendix.

Pure core beside a thin shell: :func:`simulators.report.view.build_page` turns the
JSON into a view model, the Jinja2 template ``templates/report.html.j2`` (package
data) lays it out, :func:`render_html` joins the two and :func:`write_report` writes
the files.
"""
from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any, Mapping

from simulators.ab import ABReport, _clean

__all__ = ["render_html", "write_report"]

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def _template() -> Any:
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("simulators.report", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env.get_template("report.html.j2")


def render_html(data: Mapping[str, Any], title: str = "A/B experiment") -> str:
    """The HTML page for the JSON report ``data`` (as :func:`write_report` writes it).

    Parameters
    ----------
    data : mapping
        ``ABReport.to_dict()`` with any extra keys the caller added (see
        :mod:`simulators.report.view` for the keys it reads; unknown keys only
        appear in the appendix).
    title : str
        The page's title.
    """
    from simulators.report.view import build_page

    return _template().render(page=build_page(_clean(dict(data)), title))


def write_report(report: ABReport, out_dir: str | Path, title: str = "A/B experiment", *,
                 extra: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """Write ``report.json`` and a self-contained ``report.html`` to ``out_dir``.

    ``extra`` is merged into the JSON report under its own keys (how the demo adds
    its system figures); a ``headline`` in it goes first in the file.

    Returns
    -------
    dict of str to Path
        What was written: ``json`` and ``html``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    body = report.to_dict()
    if extra:
        body.update(dict(extra))
        if "headline" in extra:  # the reader's verdict comes first in the file
            body = {"headline": body.pop("headline"), **body}
    body = _clean(body)
    written = {"json": out / "report.json", "html": out / "report.html"}
    written["json"].write_text(json.dumps(body, indent=2))
    written["html"].write_text(render_html(body, title), encoding="utf-8")
    logger.info("A/B report written to %s", out)
    return written
