"""LearnerLoop: micro-batching, dedup, prequential order, offsets, resets."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings as hsettings, strategies as st

from em3 import codec
from em3.stores import InMemoryHistoryStore
from em3.types import Impression, Sample
from stream.dedup import DedupWindow
from learners.loop import LearnerLoop, LoopConfig, MemorySampleSource
from learners.publisher import SnapshotPolicy


class RecordingLearner:
    """Test double: records what it is asked to score and learn, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []
        self.histories: list[list[list[str]]] = []
        self.weight = 0.0

    def score(self, samples, histories):
        self.calls.append(("score", [s.sample_id for s in samples]))
        return np.full(len(samples), 1 / (1 + np.exp(-self.weight)))

    def learn_batch(self, samples, histories, weights=None):
        self.calls.append(("learn", [s.sample_id for s in samples]))
        self.sample_weights = None if weights is None else list(weights)
        self.histories.append([list(h) for h in histories])
        self.weight += 0.1 * len(samples)
        return {"loss": 0.5, "n": len(samples)}

    def state_dict(self):
        return {"w": self.weight}

    def load_state_dict(self, state):
        self.weight = float(state["w"])

    def learned(self) -> list[str]:
        return [i for kind, ids in self.calls if kind == "learn" for i in ids]


def sample(k: int, label: int = 0, correction: bool = False, user: str = "u1") -> Sample:
    imp = Impression(f"imp-{k}", f"r{k}", user, f"i{k % 5}", 0, 1.7e9 + k)
    return Sample(imp, label, 1.7e9 + k + 1, correction=correction)


def encoded(samples):
    return [codec.encode(s) for s in samples]


def make_loop(records, **cfg):
    learner = RecordingLearner()
    src = MemorySampleSource(records)
    loop = LearnerLoop(learner, src, InMemoryHistoryStore(), LoopConfig(**{"batch_size": 4, **cfg}))
    return learner, src, loop


def test_each_batch_is_scored_before_it_is_learned():
    learner, _, loop = make_loop({"t:0": encoded([sample(k, k % 2) for k in range(10)])})
    result = loop.run_cycle(SnapshotPolicy(interval_s=None, every_steps=3))
    kinds = [kind for kind, _ in learner.calls]
    assert kinds == ["score", "learn"] * 3
    assert [ids for kind, ids in learner.calls if kind == "score"] == [ids for kind, ids in learner.calls if kind == "learn"]
    assert result.counters["steps"] == 3 and result.applied == 10
    assert result.offsets == {"t:0": 10}
    assert list(result.labels) == [k % 2 for k in range(10)]
    assert list(result.times) == [1.7e9 + k for k in range(10)]  # each pair's served_at


def test_a_prequential_window_in_seconds_keeps_the_last_seconds_served():
    from learners.worker import PrequentialWindow

    window = PrequentialWindow(size=1000, seconds=60.0)
    t = np.arange(0, 300, 1.0)  # one pair a second for five minutes
    early = (t < 239).astype(np.int8)  # before the last minute (239-299 s): probability and label disagree
    window.update(np.where(early == 1, np.arange(300) % 2, 1 - np.arange(300) % 2), np.where(
        np.arange(300) % 2 == 1, 0.1, 0.9), t)
    summary = window.summary()
    assert summary["window_n"] == 61 and summary["window_s"] == 60.0 and summary["scored"] == 300
    assert summary["window_auc"] == 1.0  # only the last minute, where the two agree
    counted = PrequentialWindow(size=50)  # no seconds: the last 50 pairs, whatever their times
    counted.update(np.zeros(300, dtype=np.int8), np.zeros(300), t)
    assert counted.summary()["window_n"] == 50 and counted.summary()["window_s"] is None
    with pytest.raises(ValueError, match="seconds must be > 0"):
        PrequentialWindow(10, seconds=0)


def test_duplicates_are_dropped_within_a_batch_and_across_cycles():
    dup = sample(1)
    learner, src, loop = make_loop({"t:0": encoded([sample(0), dup, dup])})
    first = loop.run_cycle(SnapshotPolicy(interval_s=0.01))
    src.append("t:0", encoded([dup, sample(2)]))
    second = loop.run_cycle(SnapshotPolicy(interval_s=0.01))
    assert learner.learned() == [sample(0).sample_id, dup.sample_id, sample(2).sample_id]
    assert first.counters["duplicates_dropped"] == 1 and second.counters["duplicates_dropped"] == 1
    assert second.offsets == {"t:0": 5}
    assert second.applied_ids == {"t:0": [sample(2).sample_id]}
    assert loop.totals["duplicates_dropped"] == 2 and loop.totals["samples_applied"] == 3


def test_undecodable_records_are_counted_and_their_offsets_advance():
    learner, _, loop = make_loop({"t:0": [b"{not json", codec.encode(sample(0))]})
    result = loop.run_cycle(SnapshotPolicy(interval_s=0.01))
    assert result.counters["decode_errors"] == 1 and result.applied == 1
    assert result.offsets == {"t:0": 2}


def test_corrections_are_learned_but_kept_out_of_prequential_pairs():
    records = encoded([sample(0, 0), sample(0, 1, correction=True), sample(1, 1)])
    learner, _, loop = make_loop({"t:0": records})
    result = loop.run_cycle(SnapshotPolicy(interval_s=0.01))
    assert result.applied == 3 and result.counters["corrections_applied"] == 1
    assert list(result.labels) == [0, 1] and len(result.probs) == 2


def test_histories_are_those_before_the_impression():
    history = InMemoryHistoryStore()
    history.append("u1", "old", 1.7e9 - 10)
    history.append("u1", "future", 1.7e9 + 100)
    learner = RecordingLearner()
    loop = LearnerLoop(learner, MemorySampleSource({"t:0": encoded([sample(0)])}), history, LoopConfig(batch_size=4))
    loop.run_cycle(SnapshotPolicy(interval_s=0.01))
    assert learner.histories == [[["old"]]]


def test_reset_seeks_loads_state_and_replaces_window():
    learner, src, loop = make_loop({"t:0": encoded([sample(k) for k in range(6)]), "t:1": encoded([sample(9)])})
    loop.run_cycle(SnapshotPolicy(interval_s=0.01))
    loop.reset({"w": 7.0}, {"t:0": 4}, DedupWindow(10, [sample(4).sample_id]), {"samples_applied": 4})
    assert learner.weight == 7.0 and loop.positions == {"t:0": 4}
    learner.calls.clear()
    result = loop.run_cycle(SnapshotPolicy(interval_s=0.01))
    # t:0 from 4 (sample 4 already in the window), t:1 from its beginning.
    assert learner.learned() == [sample(5).sample_id, sample(9).sample_id]
    assert result.offsets == {"t:0": 6, "t:1": 1}
    assert loop.totals["samples_applied"] == 6


def test_batches_respect_batch_size_and_stop_is_honoured():
    learner, _, loop = make_loop({"t:0": encoded([sample(k) for k in range(9)])}, batch_size=2)
    result = loop.run_cycle(SnapshotPolicy(interval_s=60), should_stop=lambda: True)
    assert result.counters["steps"] == 1 and result.applied == 2


@pytest.mark.slow  # seconds: out of the fast lane (scripts/test.sh --fast), in the full suite
@hsettings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 30), min_size=1, max_size=60), st.integers(1, 7), st.integers(1, 5))
def test_one_big_batch_and_many_small_ones_apply_the_same_samples(ids, batch_size, steps):
    """Whatever the batching and cycling, every distinct sample is applied once, in order."""
    records = encoded([sample(k) for k in ids])
    learner, src, loop = make_loop({"t:0": records}, batch_size=batch_size)
    drained = lambda: src.positions["t:0"] >= len(records)  # noqa: E731
    while not drained():
        loop.run_cycle(SnapshotPolicy(interval_s=None, every_steps=steps), should_stop=drained)
    expected = list(dict.fromkeys(sample(k).sample_id for k in ids))
    assert learner.learned() == expected
    assert loop.positions == {"t:0": len(records)}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_size": 0}, "batch_size must be > 0, but 0 is given"),
        ({"max_batch_wait_s": -3}, "max_batch_wait_s must be > 0, but -3 is given"),
        ({"history_len": 0}, "history_len must be > 0 or None, but 0 is given"),
        ({"batch_size": True}, "batch_size must be an integer > 0, but True is given"),
    ],
)
def test_loop_config_validates(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoopConfig(**kwargs)


class FusedLearner(RecordingLearner):
    """A learner whose learn_batch returns the pre-update probabilities itself."""

    def learn_batch(self, samples, histories, return_probs=False):
        probs = np.full(len(samples), 0.25 + 0.01 * len(self.calls))
        stats = super().learn_batch(samples, histories)
        return {**stats, "probs": probs} if return_probs else stats


def test_a_fused_learner_is_not_scored_separately():
    learner = FusedLearner()
    loop = LearnerLoop(learner, MemorySampleSource({"t:0": encoded([sample(k) for k in range(6)])}),
                       InMemoryHistoryStore(), LoopConfig(batch_size=3))
    result = loop.run_cycle(SnapshotPolicy(interval_s=None, every_steps=2))
    assert [kind for kind, _ in learner.calls] == ["learn", "learn"]
    assert result.probs.tolist() == [0.25] * 3 + [0.26] * 3


class FlakyLearner(RecordingLearner):
    """Fails ``learn_batch`` with ``error`` for the first ``failures`` calls."""

    def __init__(self, error: BaseException, failures: int) -> None:
        super().__init__()
        self.error, self.failures = error, failures

    def learn_batch(self, samples, histories):
        if self.failures > 0:
            self.failures -= 1
            raise self.error
        return super().learn_batch(samples, histories)


def _flaky_loop(error, failures, **cfg):
    learner = FlakyLearner(error, failures)
    src = MemorySampleSource({"t:0": encoded([sample(k) for k in range(4)])})
    quarantined = []
    loop = LearnerLoop(learner, src, InMemoryHistoryStore(), LoopConfig(batch_size=4, **cfg),
                       transient=(ConnectionError,), sleep=lambda s: None,
                       on_quarantine=lambda records, reason: quarantined.append((len(records), reason)))
    return learner, src, loop, quarantined


def test_an_outage_is_retried_until_it_ends_and_the_batch_is_learned_once():
    learner, src, loop, quarantined = _flaky_loop(ConnectionError("redis down"), failures=20)
    loop.process(src.poll(4, 0.01))
    assert len(learner.learned()) == 4 and not quarantined
    result = loop.finish_cycle()
    assert result.counters["batch_retries"] == 20 and result.counters["records"] == 4
    assert result.offsets == {"t:0": 4}


def test_a_poison_batch_is_quarantined_after_max_attempts_and_the_loop_goes_on():
    learner, src, loop, quarantined = _flaky_loop(ValueError("poison"), failures=3, max_batch_attempts=3)
    loop.process(src.poll(4, 0.01))
    assert learner.learned() == [] and quarantined == [(4, "learn_failed: ValueError('poison')")]
    result = loop.finish_cycle()
    assert result.counters["quarantined"] == 4 and result.offsets == {"t:0": 4}  # skipped, not retried forever


def test_a_stop_during_an_outage_leaves_the_batch_unconsumed():
    learner, src, loop, quarantined = _flaky_loop(ConnectionError("redis down"), failures=10**9)
    loop._should_stop = lambda: True
    loop.process(src.poll(4, 0.01))
    assert loop.finish_cycle().offsets == {}  # read again after the restart


def test_split_training_data_skips_what_other_model_arms_served():
    from em3.experiment import ArmConfig, ExperimentConfig

    def served_by(k, line):
        imp = Impression(f"imp-{k}", f"r{k}", "u1", f"i{k}", 0, 1.7e9 + k, model_line=line)
        return Sample(imp, k % 2, 1.7e9 + k + 1)

    samples = [served_by(k, line) for k, line in enumerate(["em3", "id_only", "random", "em3", "id_only", ""])]
    experiment = ExperimentConfig("x", (ArmConfig("a", 0.5, "line", "em3"), ArmConfig("b", 0.5, "line", "id_only")))
    learner, src, loop = make_loop({"t:0": encoded(samples)}, batch_size=10,
                                   exclude_lines=experiment.excluded_lines("em3"))
    loop.process(src.poll(10, 0.01))
    assert learner.learned() == [s.sample_id for s in samples if s.impression.model_line != "id_only"]
    result = loop.finish_cycle()
    assert result.counters["other_arm_skipped"] == 2 and result.offsets == {"t:0": 6}
    pooled = ExperimentConfig("x", experiment.arms, training_data="pooled")
    learner, src, loop = make_loop({"t:0": encoded(samples)}, batch_size=10, exclude_lines=pooled.excluded_lines("em3"))
    loop.process(src.poll(10, 0.01))
    assert len(learner.learned()) == 6


def test_weighted_training_data_learns_everything_weighted_by_how_this_arm_serves_the_item():
    from em3.experiment import ArmConfig, ExperimentConfig

    def served_by(k, line, item):
        imp = Impression(f"imp-{k}", f"r{k}", "u1", item, 0, 1.7e9 + k, model_line=line)
        return Sample(imp, k % 2, 1.7e9 + k + 1)

    # "shared" is served by both lines alike, "theirs" only by id_only.
    samples = [served_by(k, line, item) for k, (line, item) in
               enumerate([("em3", "shared"), ("id_only", "shared"), ("id_only", "theirs")] * 10)]
    experiment = ExperimentConfig("x", (ArmConfig("a", 0.5, "line", "em3"), ArmConfig("b", 0.5, "line", "id_only")),
                                  training_data="weighted")
    learner, src, loop = make_loop({"t:0": encoded(samples)}, batch_size=30, **experiment.loop_settings("em3"))
    loop.process(src.poll(30, 0.01))
    assert len(learner.learned()) == 30
    by_item = {}
    for s, w in zip(samples, learner.sample_weights):
        by_item.setdefault(s.impression.item_id, set()).add(round(w, 6))
    (shared,), (theirs,) = by_item["shared"], by_item["theirs"]
    assert theirs < 0.2 < 1.0 < shared  # em3 alone would never have shown "theirs"


def test_the_weighted_policy_propensities_travel_in_the_loop_checkpoint():
    from em3.experiment import ArmConfig, ExperimentConfig

    def served_by(k, line, item):
        imp = Impression(f"imp-{k}", f"r{k}", "u1", item, 0, 1.7e9 + k, model_line=line)
        return Sample(imp, k % 2, 1.7e9 + k + 1)

    first = [served_by(k, line, "theirs" if line == "id_only" else "mine") for k, line in
             enumerate(["em3", "id_only"] * 10)]
    later = [served_by(100 + k, "id_only", "theirs") for k in range(4)]
    experiment = ExperimentConfig("x", (ArmConfig("a", 0.5, "line", "em3"), ArmConfig("b", 0.5, "line", "id_only")),
                                  training_data="weighted")
    settings = experiment.loop_settings("em3")
    learner, src, loop = make_loop({"t:0": encoded(first + later)}, batch_size=20, **settings)
    loop.process(src.poll(20, 0.01))
    meta = loop.checkpoint_meta()
    loop.process(src.poll(4, 0.01))
    restarted, src2, loop2 = make_loop({"t:0": encoded(later)}, batch_size=4, **settings)
    loop2.load_checkpoint_meta(meta)
    loop2.process(src2.poll(4, 0.01))
    assert restarted.sample_weights == learner.sample_weights and max(learner.sample_weights) < 0.2
    fresh, src3, loop3 = make_loop({"t:0": encoded(later)}, batch_size=4, **settings)
    loop3.process(src3.poll(4, 0.01))
    assert fresh.sample_weights != learner.sample_weights  # without it the weights start near 1
