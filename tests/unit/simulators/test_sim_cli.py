"""``em3 replay --dry-run`` and ``em3 ab`` end to end through the command line."""
from __future__ import annotations

import json

import pytest

from em3.app.cli import main


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_replay_dry_run_and_resume(capsys):
    assert main(["replay", "--obd", "women", "--dry-run", "--no-progress", "--max-events", "4000"]) == 0
    first = _last_json(capsys)
    assert first["replay"]["events"] == 4000 and first["resume_with"] == "--start-at 4000"
    assert main(["replay", "--obd", "women", "--dry-run", "--no-progress", "--start-at", "4000"]) == 0
    rest = _last_json(capsys)
    assert rest["replay"]["skipped"] == 4000
    total_clicks = first["replay"]["clicks"] + rest["replay"]["clicks"]
    assert rest["replay"]["position"] == 4000 + rest["replay"]["events"] == 10_000 + total_clicks


def test_replay_file_counts_malformed(tmp_path, capsys):
    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id,served_at,clicked\nu,i,1700000000,1\n,j,1700000001,0\nu,k,oops,0\n")
    assert main(["replay", "--file", str(path), "--dry-run", "--no-progress"]) == 0
    out = _last_json(capsys)
    assert out["replay"]["impressions"] == 1 and out["replay"]["clicks"] == 1
    assert out["replay"]["malformed"] == {"missing_field": 1, "bad_value": 1}


def test_ab_writes_a_report(tmp_path, capsys):
    args = ["ab", "--arms", "random,oracle", "--n-requests", "1500", "--n-users", "200", "--n-items", "150",
            "--check-every", "250", "--min-units", "50", "--out", str(tmp_path)]
    assert main(args) == 0
    out = _last_json(capsys)
    assert out["control"] == "random" and out["requests"] == 1500
    assert out["verdicts"]["oracle"]["verdict"] == "treatment_better"
    assert out["stop_reason"] == "request_budget" and out["report"] == str(tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text()
    assert "oracle wins" in page and '<svg id="chart-ctr"' in page
    report = json.loads((tmp_path / "report.json").read_text())
    for arm in ("random", "oracle"):  # conversions beside CTR, in the readout and in report.json
        final = report["final"][arm]
        assert final["conversions"] == out["conversions"][arm] > 0
        assert final["cvr"] == pytest.approx(final["conversions"] / final["clicks"]) == out["cvr"][arm]
        assert out["conversions_per_user"][arm] == pytest.approx(final["conversions"] / final["users"])
