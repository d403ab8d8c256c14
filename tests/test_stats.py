"""Paired statistics over seeds: the interval, its verdict, and results.json's comparisons."""
import math

import pytest

from kdutils.results import comparisons, difference, summarize_runs
from kdutils.stats import paired_difference, verdict


def test_paired_t_interval_by_hand():
    d = paired_difference([51.0, 61.0, 71.5], [50.0, 60.0, 70.0])
    mean, sd = 7 / 6, math.sqrt(((1 - 7 / 6) ** 2 * 2 + (1.5 - 7 / 6) ** 2) / 2)
    half = 4.302652729911275 * sd / math.sqrt(3)           # t(0.975, df=2)
    assert d["mean_diff"] == pytest.approx(mean)
    assert (d["low"], d["high"]) == pytest.approx((mean - half, mean + half))
    assert d["n_seeds"] == 3 and d["method"] == "paired t interval over seeds"


def test_pairing_finds_a_consistent_gain_that_the_seed_spread_hides():
    # seeds differ by 10 points from one another, but m beats ce on every seed by 1-1.5 points
    d = paired_difference([51.0, 61.0, 71.5], [50.0, 60.0, 70.0])
    assert d["low"] > 0 and verdict(d, "m", "ce") == "m above ce (the interval excludes 0)"
    tie = paired_difference([51.0, 59.0, 70.5], [50.0, 60.0, 70.0])
    assert tie["low"] < 0 < tie["high"] and verdict(tie, "m", "ce") == "cannot tell (the interval includes 0)"
    below = paired_difference([40.0, 41.0], [50.0, 52.0])
    assert below["high"] < 0 and verdict(below, "m", "ce") == "m below ce (the interval excludes 0)"


def test_one_seed_gives_no_interval_and_mismatched_seeds_are_refused():
    d = paired_difference([60.0], [50.0])
    assert d["mean_diff"] == 10.0 and d["low"] is None and "no verdict" in verdict(d, "a", "b")
    with pytest.raises(ValueError, match="same seeds"):
        paired_difference([1.0, 2.0], [1.0])


def _results(rows):
    runs = {m: [[{"epoch": 1, "loss": 1, "train_acc": 0, "test_acc": a, "seconds": 1}] for a in accs]
            for m, accs in rows.items()}
    return summarize_runs(runs, teacher={"model": "t", "test_acc": 0.9}, preset="quick", dataset="d")


def test_results_json_lists_every_stated_comparison():
    results = _results({"ce": [0.50, 0.60, 0.70], "feature_kd": [0.51, 0.61, 0.715],
                        "standard_layers": [0.52, 0.60, 0.71], "fitnets_kd_nokl": [0.50, 0.61, 0.70],
                        "feature_kd_ce": [0.50, 0.60, 0.70]})
    listed = {(c["a"], c["b"]) for c in results["comparisons"]}
    assert listed == {("feature_kd", "ce"), ("standard_layers", "ce"), ("fitnets_kd_nokl", "ce"),
                      ("feature_kd_ce", "ce"), ("feature_kd", "standard_layers"),
                      ("standard_layers", "fitnets_kd_nokl"), ("feature_kd", "feature_kd_ce")}
    first = difference(results, "feature_kd", "ce")
    assert first["points"] == pytest.approx(7 / 6) and first["low"] > 0 and first["n_seeds"] == 3
    assert results["comparisons"] == comparisons(results)
    assert all({"a", "b", "points", "low", "high", "n_seeds", "method", "verdict"} <= set(c)
               for c in results["comparisons"])


def test_no_comparisons_when_methods_ran_different_seeds():
    assert "comparisons" not in _results({"ce": [0.5, 0.6], "feature_kd": [0.55]})


def test_the_plateau_rule_reads_the_last_quarter_of_the_ce_curve():
    from kdutils.results import last_quarter_gain, summarize_runs, verdicts

    def runs(curve):
        return [[{"epoch": e + 1, "loss": 1.0, "train_acc": a, "test_acc": a, "seconds": 1.0}
                 for e, a in enumerate(curve)]]
    assert last_quarter_gain([0.50, 0.55, 0.58, 0.60, 0.605, 0.61, 0.612, 0.615]) == pytest.approx(0.5)  # epochs 7-8 vs 6
    assert last_quarter_gain([0.3, 0.4, 0.45]) == pytest.approx(5.0) and last_quarter_gain([0.3]) is None
    teacher = {"model": "t", "test_acc": 0.9}
    flat = summarize_runs({"ce": runs([0.5, 0.6, 0.62, 0.625])}, teacher=teacher, preset="p", dataset="d")
    assert flat["methods"]["ce"]["last_quarter_gain"] == pytest.approx(0.5)
    assert any("gained +0.50 points over its last 1 of 4 epochs: at its plateau" in line for line in verdicts(flat))
    rising = summarize_runs({"ce": runs([0.5, 0.6, 0.65, 0.70])}, teacher=teacher, preset="p", dataset="d")
    assert any("+5.00 points" in line and "still climbing" in line for line in verdicts(rising))
