"""A/B bucketing is stable and uniform; arm configs are checked; baselines behave."""
from __future__ import annotations

import random

import pytest

from em3.experiment import ArmConfig, ExperimentConfig, bucket
from serving.ab import PopularityRanker, RandomRanker


def _users(n: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    return [f"user-{rng.getrandbits(48):012x}" for _ in range(n)]


def _experiment(salt: str = "s1") -> ExperimentConfig:
    return ExperimentConfig(
        name="exp",
        salt=salt,
        arms=(
            ArmConfig("control", 0.5, "line", "main"),
            ArmConfig("pinned", 0.3, "snapshot", "main", version=3),
            ArmConfig("pop", 0.2, "popularity"),
        ),
    )


def test_bucketing_is_stable_across_calls_and_instances():
    users = _users(500)
    a = [_experiment().arm_for(u).name for u in users]
    b = [_experiment().arm_for(u).name for u in reversed(users)][::-1]
    assert a == b


def test_bucketing_matches_fractions_chi_square():
    users = _users(30_000)
    exp = _experiment()
    counts = {a.name: 0 for a in exp.arms}
    for u in users:
        counts[exp.arm_for(u).name] += 1
    n = len(users)
    chi2 = sum((counts[a.name] - n * a.fraction) ** 2 / (n * a.fraction) for a in exp.arms)
    assert chi2 < 13.82, (counts, chi2)  # 2 degrees of freedom, p = 0.001


def test_bucket_is_uniform_over_ten_bins():
    users = _users(20_000, seed=3)
    bins = [0] * 10
    for u in users:
        bins[int(bucket(u, "salt") * 10)] += 1
    expected = len(users) / 10
    chi2 = sum((b - expected) ** 2 / expected for b in bins)
    assert chi2 < 27.88, bins  # 9 degrees of freedom, p = 0.001


def test_a_new_salt_reshuffles_users():
    users = _users(4000)
    a = [_experiment("s1").arm_for(u).name for u in users]
    b = [_experiment("s2").arm_for(u).name for u in users]
    same = sum(x == y for x, y in zip(a, b)) / len(users)
    # Independent assignment agrees with probability 0.5^2 + 0.3^2 + 0.2^2 = 0.38.
    assert abs(same - 0.38) < 0.04


def test_changing_fractions_moves_only_border_users():
    users = _users(4000)
    before = ExperimentConfig("e", (ArmConfig("a", 0.5, "random"), ArmConfig("b", 0.5, "random")), salt="x")
    after = ExperimentConfig("e", (ArmConfig("a", 0.6, "random"), ArmConfig("b", 0.4, "random")), salt="x")
    moved = [(before.arm_for(u).name, after.arm_for(u).name) for u in users]
    assert all(not (x == "a" and y == "b") for x, y in moved)  # nobody leaves the growing arm
    assert 0.05 < sum(x != y for x, y in moved) / len(users) < 0.15


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(name="a", fraction=-3), "fraction must be in (0, 1], but -3 is given"),
        (dict(name="a", fraction=0.5, kind="bandit"), "kind must be one of"),
        (dict(name="a", fraction=0.5, kind="line"), "model_line must be given for a 'line' arm"),
        (dict(name="a", fraction=0.5, kind="snapshot", model_line="m"), "version must be > 0"),
        (dict(name="a", fraction=0.5, kind="popularity", popularity="views"), "popularity must be"),
        (dict(name="", fraction=0.5), "name must be a non-empty string"),
    ],
)
def test_arm_config_errors_say_what_was_given(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ArmConfig(**kwargs)


def test_experiment_config_checks_fractions_and_names():
    with pytest.raises(ValueError, match="add up to 1, but they add up to 0.9"):
        ExperimentConfig("e", (ArmConfig("a", 0.5, "random"), ArmConfig("b", 0.4, "random")))
    with pytest.raises(ValueError, match="arm names must be unique"):
        ExperimentConfig("e", (ArmConfig("a", 0.5, "random"), ArmConfig("a", 0.5, "random")))
    with pytest.raises(ValueError, match="unknown keys"):
        ExperimentConfig.from_dict({"name": "e", "arms": [{"name": "a", "fraction": 1.0, "weight": 2}]})


def test_experiment_round_trips_through_dict():
    exp = _experiment()
    again = ExperimentConfig.from_dict(exp.to_dict())
    assert again == exp
    assert again.arms[1].source_key == "main@3"


class _Counts:
    def __init__(self, counts):
        self.counts = counts

    def get_many(self, kind, ids):
        return [self.counts.get(i, 0.0) for i in ids]


def test_popularity_ranks_by_counter_with_stable_ties():
    ranker = PopularityRanker(_Counts({"b": 5, "c": 9}), "clicks")
    result = ranker.rank(["a", "b", "c", "d"], 3)
    assert result.item_ids == ["c", "b", "a"]
    assert result.propensities == [1.0, 1.0, 1.0]


def test_random_ranker_is_replayable_and_logs_uniform_propensity():
    ranker = RandomRanker(seed=1)
    ids = [f"i{n}" for n in range(8)]
    a = ranker.rank(ids, 5, "req-1")
    assert a == ranker.rank(ids, 5, "req-1")
    assert a.propensities == [1 / 8] * 5
    assert sorted(a.item_ids) == sorted(set(a.item_ids))
    orders = {tuple(ranker.rank(ids, 8, f"r{n}").item_ids) for n in range(20)}
    assert len(orders) > 15
