"""benchmarks/stages.py: the ladder, lifts over the stage before, and the stage to adopt."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import stages  # noqa: E402


def _row(name, auc, cold, cost):
    return {"name": name, "auc": auc, "gauc": auc - 0.01, "cold_auc": cold, "core_s_per_1m": cost}


def test_the_ladder_adds_one_thing_per_stage():
    ladder = stages.ladder(20)
    assert [(s.variant, s.history_len) for s in ladder] == [
        ("id_only", 20), ("text_only", 20), ("em3", 20), ("em3", 50), ("em3", 100), ("em3", 200)]


def test_lifts_and_lift_per_cost_are_against_the_stage_before():
    rows = stages.with_lifts([_row("a", 0.70, 0.60, 100.0), _row("b", 0.705, 0.65, 3700.0),
                              _row("c", 0.704, 0.66, 3600.0)])
    assert rows[0]["auc_lift"] is None and rows[1]["auc_lift"] == pytest.approx(0.005)
    assert rows[2]["auc_lift"] == pytest.approx(-0.001) and rows[2]["added_core_s_per_1m"] == -100.0
    assert stages.lift_per_cost(rows, "cold_auc") == [None, pytest.approx(0.05), None]  # c costs less: no ratio


def test_the_choice_skips_dominated_stages_and_stops_below_the_threshold():
    rows = [_row("id", 0.700, 0.60, 100.0), _row("text", 0.7004, 0.65, 3700.0),  # AUC: within noise
            _row("image", 0.712, 0.66, 7300.0), _row("h50", 0.7135, 0.661, 10900.0)]
    by_auc = stages.choose_stage(rows, "auc", threshold=0.002, noise=0.001)
    assert by_auc["frontier"] == ["id", "image", "h50"]  # text's +0.0004 AUC is no lift
    assert by_auc["ratios"]["image"] == pytest.approx(0.012 / 2.0)
    assert by_auc["ratios"]["h50"] == pytest.approx(0.0015) and by_auc["stage"] == "image"
    assert stages.choose_stage(rows, "auc", threshold=0.001, noise=0.001)["stage"] == "h50"
    assert stages.choose_stage(rows, "auc", threshold=0.002, noise=0.002)["frontier"] == ["id", "image"]
    assert stages.choose_stage(rows, "auc", threshold=1.0)["stage"] == "id"
    assert stages.choose_stage(rows, "cold_auc", threshold=0.02, noise=0.001)["stage"] == "text"  # image: +0.01/h


@pytest.mark.slow  # seconds: out of the fast lane (scripts/test.sh --fast), in the full suite
def test_a_stage_reports_quality_cost_and_size(capsys, tmp_path):
    out = tmp_path / "stages.json"
    report = stages.main(["--max-events", "1500", "--stages", "id_only", "--json-out", str(out),
                          "--batch-size", "256"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert last["variant"] and last["runtime"] and last["settings"]["events"] == 1500
    (row,) = last["stages"]
    assert row["name"] == "id_only" and row["history_len"] == 20 and 0.5 < row["auc"] < 0.9
    assert row["trainable_params"] > 1_000_000 and row["snapshot_bytes"] > 4 * row["trainable_params"]
    assert row["core_s_per_1m"] > 0 and row["samples_per_s"] > 0 and row["auc_lift"] is None
    assert last["choice"]["by_metric"]["auc"]["0.01"]["stage"] == "id_only"
