"""`em3 demo` end to end: real broker, Redis, Ray learners, server and simulated users.

Runs the actual command in a subprocess with a tiny model config and checks the
report's contents, then that nothing it started is still running.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{pid}: {cmdline[:200]}")
    return found


def test_short_demo_writes_a_truthful_report_and_leaves_nothing_running(tmp_path, report_problems):
    out = tmp_path / "demo-out"
    proc = subprocess.run(
        [sys.executable, "-m", "em3", "demo", "--minutes", "0.4", "--tiny", "--out", str(out), "--no-progress",
         "--rate", "5"],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["out"] == str(out.resolve())

    report = json.loads((out / "report.json").read_text())
    html = (out / "report.html").read_text()
    # The verdict on learning comes first, in the file and on stdout, each check beside its figure.
    assert next(iter(report)) == "headline" and len(report["headline"]["checks"]) == 3
    assert summary["learning_shows"] == report["headline"]["learning_shows"] == all(
        report["headline"]["checks"].values())
    assert set(report["headline"]["window_auc"]) == {"em3", "id_only"}
    assert proc.stdout.splitlines()[0].startswith(("PASS", "MISS")) and "Did learning work?" in html
    assert report["headline"]["targets"] == {"window_auc": 0.65, "cold_ctr_ratio": 1.2, "requests_per_s": 10.0}
    assert set(report["arms"]) == {"em3", "id_only"} and report["control"] == "em3"
    # Traffic really flowed through the server: ~5 req/s for 24 s.
    assert report["requests"] >= 40
    assert report["stop_reason"] == "time_budget" and "Stopped on its time budget" in html
    assert report["throughput"]["requests"] == report["requests"]
    for arm, stats in report["final"].items():
        assert stats["requests"] > 0, arm
        assert 0.0 <= stats["ci_low"] <= stats["ctr"] <= stats["ci_high"] <= 1.0
        # Conversions beside CTR: per arm, conversions / clicks and per user.
        assert stats["conversions"] >= 0 and stats["cvr"] == stats["conversions"] / stats["clicks"], arm
        assert stats["conversions_per_user"] == stats["conversions"] / stats["users"], arm
    assert sum(s["conversions"] for s in report["final"].values()) > 0
    assert report["throughput"]["conversions_posted"] > 0 and report["throughput"]["conversion_errors"] == 0
    assert report["join"]["conversions_in"] > 0 and report["join"]["conversion"] > 0
    assert report["tests"]["id_only"]["verdict"] in {"no_difference_detected", "treatment_better", "control_better"}
    # Clicks went back through the API and the join turned impressions into samples.
    assert report["throughput"]["clicks_posted"] > 0 and report["throughput"]["click_errors"] == 0
    assert report["join"]["impressions_in"] > 0 and report["join"]["samples_out"] > 0
    assert report["join"]["dead_letters"] == 0
    # Both learners trained on those samples and published several snapshots that were served.
    for line in ("em3", "id_only"):
        assert report["learners"][line]["samples_applied"] > 0, line
        assert report["learners"][line]["latest_version"] >= 3, line
        assert len(report["versions_served"][line]) >= 2, line
        assert report["freshness_s"][line]["p50"] is not None
    # Every few seconds one ranking was explained: the em3 line's modality mass over time
    # (each point a distribution), none for id_only, which has no Fusion-Q-Former.
    series = report["modality_contribution"]
    assert set(series) == {"em3", "id_only"} and series["id_only"] == [] and len(series["em3"]) >= 2
    for point in series["em3"]:
        assert set(point) == {"t", "text", "image", "missing"} and 0 <= point["t"] <= 60
        assert abs(point["text"] + point["image"] + point["missing"] - 1.0) < 1e-3
    assert [p["t"] for p in series["em3"]] == sorted(p["t"] for p in series["em3"])
    assert report["throughput"]["explain_latency_ms"]["n"] >= 2
    # New items arrived during the run and were shown (cold start).
    assert report["throughput"]["new_items_registered"] > 0
    assert sum(s["impressions"] for s in report["cold_start"].values()) > 0
    # The page: verdict and learning first, then plots, tables with units, the raw JSON appendix.
    assert report_problems(html) == []
    assert "mSPRT" in html and html.count('<svg id="chart-') >= 5 and "cold-start" in html
    # Nothing left behind: no broker, Redis, server or join of this run, no Ray of this run.
    processes = report["demo"]["processes"]
    for name in ("kafka", "redis", "join", "server"):
        assert isinstance(processes[name], int), name
        assert not _alive(processes[name]), f"{name} (pid {processes[name]}) is still running"
    assert processes["ray_temp_dir"]
    assert _processes_mentioning(processes["ray_temp_dir"]) == []
    assert _processes_mentioning(str(out.resolve())) == []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status").read_text() if Path(f"/proc/{pid}/status").exists() else ""
    return "State:\tZ" not in status  # a zombie has exited
