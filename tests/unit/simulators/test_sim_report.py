"""The A/B report: PNG figures and a self-contained HTML page."""
from __future__ import annotations

import base64
import json
import re

from simulators.ab import ABConfig, ABRunner
from simulators.rankers import OracleRanker, RandomRanker
from simulators.report import write_report
from simulators.world import World, WorldConfig

PNG = b"\x89PNG\r\n\x1a\n"


def test_write_report(tmp_path):
    world = World(WorldConfig(seed=0, n_users=200, n_items=150))
    arms = {"random": RandomRanker("random", 0), "oracle": OracleRanker(world)}

    def metrics(t):
        return {"prequential_auc": {"oracle": 0.8, "random": 0.5}, "freshness_s": {"oracle": 12.0}}

    report = ABRunner(world, arms, ABConfig(n_requests=600, check_every=100), metrics=metrics).run()
    written = write_report(report, tmp_path, title="test <run>")
    for name in ("ctr", "tests", "prequential_auc", "freshness_s"):
        assert written[name].read_bytes()[:8] == PNG
    assert json.loads(written["json"].read_text())["requests"] == 600
    page = written["html"].read_text()
    assert "test &lt;run&gt;" in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 4
    assert all(base64.b64decode(img)[:8] == PNG for img in images)


def test_optional_series_are_skipped(tmp_path):
    world = World(WorldConfig(seed=1, n_users=100, n_items=100))
    report = ABRunner(world, {"a": RandomRanker("a"), "b": RandomRanker("b", 1)},
                      ABConfig(n_requests=200, check_every=100)).run()
    written = write_report(report, tmp_path)
    assert "prequential_auc" not in written and "freshness_s" not in written
