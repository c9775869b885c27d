"""benchmarks/cold_start_sim.py and the demo's cold-start figures: deterministic in
simulated time, and the first-impression figures count what they say."""
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from em3.app.demo import ColdStartTracker
from em3.types import Click, Impression

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import cold_start_sim  # noqa: E402


def test_tracker_counts_first_impressions_and_positions_per_arm():
    world = SimpleNamespace(arrival_time=lambda item: 10.0 if item.startswith("new") else 0.0)
    seen = []
    tracker = ColdStartTracker(world, t0=5.0, forward=seen.append)
    tracker.FIRST_IMPRESSIONS = 2
    events = []
    for k in range(3):  # "new-a" shown three times in arm a: two first impressions, one later
        events.append(Impression(f"a{k}", "r", "u1", "new-a", k, 20.0 + k, arm="a"))
    events.append(Impression("b0", "r", "u2", "new-a", 4, 20.0, arm="b"))  # its first in arm b
    events.append(Impression("old", "r", "u1", "old-1", 0, 20.0, arm="a"))  # not cold: not counted
    events += [Click("a0", "u1", "new-a", 21.0), Click("a2", "u1", "new-a", 23.0), Click("old", "u1", "old-1", 21.0)]
    for e in events:
        tracker(e)
    assert seen == events  # everything goes on to the sink
    s = tracker.summary()
    assert (s["a"]["impressions"], s["a"]["clicks"], s["a"]["items"]) == (3, 2, 1)
    assert (s["a"]["first"]["impressions"], s["a"]["first"]["clicks"]) == (2, 1)
    assert s["a"]["first"]["mean_position"] == 0.5 and s["a"]["mean_position"] == 1.0
    assert (s["b"]["impressions"], s["b"]["clicks"], s["b"]["first"]["impressions"]) == (1, 0, 1)
    assert s["b"]["first"]["mean_position"] == 4.0


@pytest.mark.slow  # ~20 s: out of the fast lane, in the full suite
def test_a_seed_in_simulated_time_is_deterministic_and_reports_each_line(capsys):
    argv = ["--seeds", "3", "--set", 'model_scale="tiny"', "--set", "minutes=0.4", "--set", "new_items_per_minute=60"]
    cold_start_sim.main(argv)
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    cold_start_sim.main(argv)
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (run,), (again,) = first["runs"], second["runs"]
    run.pop("wall_s"), again.pop("wall_s")
    assert run == again  # the same seed, the same run: no wall clock in it
    assert run["requests"] == int(12.0 * 0.4 * 60)
    assert set(run["cold_start"]) == {"em3", "id_only"} and set(run["rank_spearman"]) == {"em3", "id_only"}
    assert all(s["impressions"] > 0 and s["first"]["impressions"] <= s["impressions"]
               for s in run["cold_start"].values())
    assert all(-1.0 <= v <= 1.0 for q in run["rank_spearman"].values() for v in q.values())
    assert all(steps > 0 for steps in run["steps"].values())  # both lines learned
    for cal in run["calibration"].values():  # prequential pairs: mean prediction and CTR, run and last minute
        assert cal["all"]["n"] >= cal["last_minute"]["n"] > 0 and 0 < cal["all"]["mean_prob"] < 1
        assert 0 <= cal["all"]["ctr"] <= 1


def test_calibration_compares_mean_prediction_with_ctr_overall_and_in_the_last_minute():
    from benchmarks.cold_start_sim import calibration

    pairs = [(t, int(t >= 100), 0.9 if t >= 100 else 0.2) for t in range(0, 130)]
    cal = calibration(pairs)
    assert cal["last_minute"] == {"n": 61, "mean_prob": round((31 * 0.2 + 30 * 0.9) / 61, 4),  # t 69-129
                                  "ctr": round(30 / 61, 4)}
    assert cal["all"]["n"] == 130 and calibration([]) == {}


def test_a_simulated_line_ranks_with_the_servers_slot_for_new_items():
    from em3.stores import InMemoryContentStore

    line = cold_start_sim.SimulatedLine("em3", "id_only", InMemoryContentStore([]), seed=0, window_s=10.0,
                                        batch_every_s=0.2, model_overrides={}, model_scale="tiny", fresh_slot=0)
    known = [f"old{k}" for k in range(5)]
    counted = [i for i in known for _ in range(20)]
    line.learner.model.observe_impressions(counted, ["u0"] * len(counted), [1.0] * len(counted))  # all clicked
    slot = line.rank("u1", [*known, "new"], {"t": "0"}, k=3)
    line.fresh_slot = None
    plain = line.rank("u1", [*known, "new"], {"t": "0"}, k=6)
    assert list(plain.scores) == sorted(plain.scores, reverse=True)  # no slot: by score alone
    assert plain.item_ids[-1] == "new"  # never shown, below items clicked every time
    assert slot.item_ids[0] == "new"  # the only fresh candidate, at the slot
    assert list(slot.item_ids[1:]) == [i for i in plain.item_ids if i != "new"][:2]  # the rest in score order


def test_demo_cli_takes_a_slot_position_or_none():
    import argparse

    from em3.app import demo

    parser = argparse.ArgumentParser()
    demo.register(parser.add_subparsers())
    assert parser.parse_args(["demo"]).fresh_slot == demo.DemoConfig().fresh_slot == 2
    assert parser.parse_args(["demo", "--fresh-slot", "none"]).fresh_slot is None
    assert parser.parse_args(["demo", "--fresh-slot", "0"]).fresh_slot == 0
