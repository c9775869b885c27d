"""The closed-loop A/B in one process: the server's router and reloads, the join, one
learner per line under the experiment's training-data policy, the A/B runner."""
from __future__ import annotations

import pytest

from em3.app.closed_loop import ClosedLoop, ClosedLoopConfig
from simulators.ab import ABConfig
from simulators.world import World, WorldConfig


def _run(**config):
    world = World(WorldConfig(seed=5, n_users=60, n_items=40, n_candidates=10, new_items_per_hour=0.0,
                              calibration="synthetic"))
    loop = ClosedLoop(world, ClosedLoopConfig(learn_every_s=30.0, batch_size=64, **config), salt="t")
    report = loop.run(ABConfig(n_requests=240, k=5, request_rate_per_s=2.0, seed=5, min_samples=5,
                               check_every=60, shadow_unit="request"))
    return loop, report


@pytest.fixture(scope="module")
def split():
    return _run(training_data="split")


def test_the_server_routes_users_and_each_split_learner_skips_the_other_arms_samples(split):
    loop, report = split
    a, b = loop.trainers
    assert report.final["aa_a"]["requests"] > 0 and report.final["aa_b"]["requests"] > 0
    assert a.loop.totals["other_arm_skipped"] == b.loop.totals["samples_applied"] > 0
    assert b.loop.totals["other_arm_skipped"] == a.loop.totals["samples_applied"] > 0
    assert a.loop.totals["records"] == b.loop.totals["records"] == loop.samples
    # Learners published and the server swapped their versions in.
    served = {key: r.current.version for key, r in loop.runtime.reloaders.items()}
    assert served == {"aa_a": a.version, "aa_b": b.version} and min(served.values()) > 1
    assert loop.state_difference() > 0  # different traffic, different models
    assert report.tests["aa_b"]["unit"] == "user" and report.shadow_tests["aa_b"]["unit"] == "request"


def test_pooled_lines_with_equal_seeds_stay_identical():
    loop, _ = _run(training_data="pooled")
    a, b = loop.trainers
    assert a.loop.totals["samples_applied"] == b.loop.totals["samples_applied"] == loop.samples > 0
    assert loop.state_difference() == 0.0


def test_frozen_arms_never_learn():
    loop, _ = _run(learn=False)
    assert loop.cycles == 0 and all(t.version == 1 for t in loop.trainers)
    assert {r.current.version for r in loop.runtime.reloaders.values()} == {1}


def test_config_messages():
    with pytest.raises(ValueError, match="line_seeds must give one seed per line"):
        ClosedLoopConfig(line_seeds=(0,))
    with pytest.raises(ValueError, match="training_data"):
        ClosedLoopConfig(training_data="mixed")
