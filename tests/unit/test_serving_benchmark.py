"""benchmarks/serving.py --explain: what the comparison says it ran."""
import importlib.util
from pathlib import Path

from em3 import snapshot
from em3.model import ModelConfig

# By path: the name ``serving`` is the serving package.
_SPEC = importlib.util.spec_from_file_location(
    "benchmark_serving", Path(__file__).resolve().parents[2] / "benchmarks" / "serving.py")
serving = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(serving)


def test_the_objective_is_read_from_the_server_flags():
    assert serving._objective([]) == "ctr"
    assert serving._objective(["--rank-executor", "threads", "--objective", "ctcvr"]) == "ctcvr"
    assert serving._objective(["--objective=value"]) == "value"


def test_the_config_diff_names_what_only_todays_model_has():
    today = snapshot.config_dict(ModelConfig.tiny())
    before_conversions = {k: v for k, v in today.items() if k not in ("ctr_weight", "ctcvr_weight", "cvr_hidden",
                                                                       "cvr_pseudo_count")}
    before_conversions["embed_dim"] = 32
    diff = serving._config_diff(today, before_conversions)
    assert diff["only_current"] == {"ctcvr_weight": 1.0, "ctr_weight": 1.0, "cvr_hidden": [16],
                                    "cvr_pseudo_count": 10.0}
    assert diff["only_baseline"] == {} and diff["changed"] == {"embed_dim": [16, 32]}
    assert serving._config_diff(today, today) == {"only_current": {}, "only_baseline": {}, "changed": {}}
