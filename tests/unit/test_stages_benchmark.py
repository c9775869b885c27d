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
    assert by_auc["kept"] == ["id", "image", "h50"]  # text's +0.0004 AUC is no lift
    assert by_auc["ratios"]["image"] == pytest.approx(0.012 / 2.0)
    assert by_auc["ratios"]["h50"] == pytest.approx(0.0015) and by_auc["stage"] == "image"
    assert stages.choose_stage(rows, "auc", threshold=0.001, noise=0.001)["stage"] == "h50"
    assert stages.choose_stage(rows, "auc", threshold=0.002, noise=0.002)["kept"] == ["id", "image"]
    assert stages.choose_stage(rows, "auc", threshold=1.0)["stage"] == "id"
    assert stages.choose_stage(rows, "cold_auc", threshold=0.02, noise=0.001)["stage"] == "text"  # image: +0.01/h


def test_a_stage_measured_cheaper_than_the_one_before_adds_no_cost():
    rows = [_row("id", 0.700, 0.60, 100.0), _row("image", 0.710, 0.66, 1850.0), _row("h100", 0.714, 0.66, 1822.0)]
    choice = stages.choose_stage(rows, "auc", threshold=0.001, noise=0.001)
    assert choice["ratios"] == {"image": pytest.approx(0.01 / (1750 / 3600), abs=1e-6), "h100": None}
    assert choice["stage"] == "h100"  # +0.004 AUC at no measurable added cost
    assert stages.choose_stage(rows, "auc", threshold=1.0)["stage"] == "id"  # image's ratio is below 1.0: stop


def test_noise_is_half_the_largest_seed_spread():
    rows = [{"seeds": {"0": {"cold_auc": 0.65}, "1": {"cold_auc": 0.656}}}, {"seeds": {"0": {"cold_auc": 0.66}}}]
    assert stages.seed_noise(rows, "cold_auc", 0.001) == pytest.approx(0.003)
    assert stages.seed_noise(rows[1:], "cold_auc", 0.001) == 0.001


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
    assert last["choice"]["auc"]["by_threshold"]["0.01"]["stage"] == "id_only"
    assert last["choice"]["auc"]["noise"] == 0.001  # one seed: the default
    # --from-json derives the choice again from the written figures, training nothing.
    again = stages.main(["--from-json", str(out), "--thresholds", "0.5", "--noise", "0.002"])
    assert again["stages"][0]["auc"] == row["auc"] and again["settings"]["derived_from"] == str(out)
    assert again["choice"]["auc"]["noise"] == 0.002 and list(again["choice"]["auc"]["by_threshold"]) == ["0.5"]
