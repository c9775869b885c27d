"""The report page in a real browser: headless Chromium lays it out and screenshots it.

Skipped where no Chromium is installed (CI has none); the outline test in
``test_sim_report.py`` always runs. Install with ``apt-get install -y chromium``.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from simulators.report import render_html

ROOT = Path(__file__).resolve().parents[3]
FIXTURE = Path(__file__).parent / "data" / "demo_report.json"
CHROMIUM = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt-get install -y chromium)")

#: Appended to a copy of the page only: the report itself carries no script.
_PROBE = """<script>addEventListener('load', () => {
  const out = {viewport: [innerWidth, innerHeight]};
  for (const id of ['verdict', 'learning', 'plots', 'tables', 'appendix', 'chart-learning-auc']) {
    const e = document.getElementById(id);
    if (e) { const r = e.getBoundingClientRect(); out[id] = [r.top, r.bottom, r.left, r.right]; }
  }
  const p = document.createElement('pre'); p.id = 'layout'; p.textContent = JSON.stringify(out);
  document.body.appendChild(p);
});</script>"""


def _layout(page: str, width: int = 1280, height: int = 900) -> dict:
    """Bounding boxes of the page's sections as Chromium lays them out."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "probe.html"
        path.write_text(page.replace("</body>", _PROBE + "</body>"), encoding="utf-8")
        dom = subprocess.run(
            [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             f"--user-data-dir={tmp}/profile", f"--window-size={width},{height}", "--dump-dom", path.as_uri()],
            capture_output=True, text=True, timeout=120, check=True).stdout
    return json.loads(re.search(r'<pre id="layout">(.*?)</pre>', dom).group(1))


@pytest.fixture(scope="module")
def page() -> str:
    return render_html(json.loads(FIXTURE.read_text()), "em3 demo: em3 vs id_only, online A/B test")


def test_the_first_screen_holds_the_verdict_and_the_learning_curves(page):
    box = _layout(page)
    screen = box["viewport"][1]
    assert box["verdict"][1] <= screen, f"the verdict ends at {box['verdict'][1]} px, below the first screen"
    assert box["learning"][0] < screen / 4 and box["chart-learning-auc"][1] <= screen, box
    assert box["verdict"][1] < box["plots"][0] < box["tables"][0] < box["appendix"][0]
    assert box["learning"][2] > box["verdict"][3], "on a wide screen learning sits beside the verdict"


def test_screenshot_script_renders_the_page(page, tmp_path):
    from PIL import Image

    html = tmp_path / "report.html"
    html.write_text(page, encoding="utf-8")
    png = tmp_path / "shot.png"
    subprocess.run(["bash", str(ROOT / "scripts" / "report_screenshot.sh"), str(html), str(png), "1280", "900"],
                   check=True, capture_output=True, timeout=120)
    image = Image.open(png).convert("RGB")
    assert image.size == (1280, 900)
    # The verdict card draws its coloured edge and headline in the top left: not a blank page.
    corner = image.crop((0, 0, 700, 500))
    colours = corner.getcolors(maxcolors=1 << 16) or []
    assert len(colours) > 50
    background = max(colours)[0]
    drawn = sum(n for n, c in colours if c != background)
    assert drawn > 0.05 * corner.width * corner.height
