"""benchmarks/quality.py: per-seed figures beside their means, baselines beside the model."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import quality  # noqa: E402


@pytest.mark.slow  # seconds: out of the fast lane (scripts/test.sh --fast), in the full suite
def test_report_has_means_and_per_seed_figures_for_models_and_baselines(capsys):
    report = quality.main(["--max-events", "1500", "--variants", "id_only,item_ctr,user_item_bias,fm_genres",
                           "--seeds", "0,1", "--batch-size", "256"])
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith('{"dataset"')
    assert report["settings"]["seeds"] == [0, 1] and report["settings"]["events"] == 1500
    for name, fig in report["variants"].items():
        assert set(fig["seeds"]) == {"0", "1"}, name
        for key in ("auc", "gauc", "cold_auc", "samples_per_s", "wall_s", "mean_pred", "ctr"):
            mean = sum(fig["seeds"][s][key] for s in ("0", "1")) / 2
            assert abs(fig[key] - mean) < 1e-4, (name, key)
        assert 0.5 < fig["auc"] < 0.9, name  # every one of them learns something on MovieLens
    # The model's seed changes its initialisation, the counters' figures do not depend on it.
    assert report["variants"]["id_only"]["seeds"]["0"]["auc"] != report["variants"]["id_only"]["seeds"]["1"]["auc"]
    timing = ("wall_s", "samples_per_s")
    a, b = (
        {k: v for k, v in report["variants"]["item_ctr"]["seeds"][s].items() if k not in timing} for s in ("0", "1"))
    assert a == b


def test_variants_with_one_config_run_once():
    assert quality._identical_variants(["em3", "no_cic", "id_only", "item_ctr"], {}) == {"no_cic": "em3"}
    assert quality._identical_variants(["em3", "text_only", "image_only"], {}) == {}
