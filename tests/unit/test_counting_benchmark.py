"""benchmarks/counting.py: the user statistic, the learned stack and the frontier report."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import counting  # noqa: E402


def test_user_statistic_is_prequential_and_follows_the_users_rate():
    users = np.array([0, 1] * 600)
    labels = np.array([1, 0] * 600)  # user 0 always clicks, user 1 never
    stat, activity = counting.user_scores(users, labels, batch_size=4)
    assert stat[0] == 0 and stat[1] == 0  # the first batch knows nothing of either
    assert activity[0] == 0 and activity[4] == pytest.approx(np.log1p(2))  # counted after its batch
    assert stat[-2] > 1 and stat[-1] < -1  # the generous user above the running rate, the other below


def test_stack_learns_an_informative_feature_without_seeing_the_label_it_scores():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 2))
    y = (rng.random(4000) < 1 / (1 + np.exp(-2 * x[:, 0]))).astype(float)
    s = counting.stack_scores(x, y, rate=0.1, batch_size=100)
    assert np.all(s[:100] == 0)  # the first batch is scored before anything is learned
    assert np.corrcoef(s[2000:], x[2000:, 0])[0, 1] > 0.9  # the informative column carries the score
    assert abs(np.corrcoef(s[2000:], x[2000:, 1])[0, 1]) < 0.2


@pytest.mark.slow  # seconds: out of the fast lane
def test_frontier_report_names_the_best_scores_against_the_targets(capsys):
    report = counting.main(["--max-events", "3000", "--frontier"])
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith('{"dataset"')
    names = [r["score"] for r in report["frontier"]]
    assert "item + 0.0 pairs + 0.0 user" in names and "stack 0.1" in names
    assert report["best"]["auc"]["auc"] == max(r["auc"] for r in report["frontier"])
    assert all(0.5 < r["auc"] < 0.9 for r in report["frontier"])
    met = report["best"]["both_targets_met_by"]
    assert met == [r["score"] for r in report["frontier"]
                   if r["auc"] >= counting.TARGET_AUC and r["gauc"] >= counting.TARGET_GAUC]
