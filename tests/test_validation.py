"""Notebook 6's machinery: the held-out validation split, Spearman with its bootstrap interval, top-k, the sweep and
the selection comparison (deduplicated, resumable), the summary sentences, and the series' data split."""
import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from kdutils import presets, rundir, validation
from kdutils.data import load_dataset, split_validation
from kdutils.models import build_model
from kdutils.train import seed_everything

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_split_validation_is_class_balanced_disjoint_and_seeded(digits):
    train, val = split_validation(digits, 0.1, seed=3)
    counts = np.bincount(val.y_test.numpy(), minlength=10)
    full = np.bincount(digits.y_train.numpy(), minlength=10)
    assert (counts == np.round(0.1 * full)).all()                       # 10% of every class
    assert train.num_train + len(val.y_test) == digits.num_train
    assert torch.equal(val.x_train, train.x_train) and torch.equal(train.x_test, digits.x_test)   # test untouched
    rows = {bytes(x.numpy()) for x in train.x_train}
    assert not any(bytes(x.numpy()) in rows for x in val.x_test[:50])   # held-out images are not trained on
    again, _ = split_validation(digits, 0.1, seed=3)
    other, _ = split_validation(digits, 0.1, seed=4)
    assert torch.equal(again.y_train, train.y_train) and not torch.equal(other.x_train, train.x_train)
    assert train.mean != digits.mean                                    # stats of the images that remain
    with pytest.raises(ValueError, match="validation fraction must be in"):
        split_validation(digits, 0.0)
    tiny = dataclasses.replace(digits, x_train=digits.x_train[:20], y_train=digits.y_train[:20])
    with pytest.raises(ValueError, match="use more images per class"):
        split_validation(tiny, 0.1)


def test_series_data_holds_out_the_validation_split(digits):
    config = presets.resolve_config("quick")
    train, val = rundir.series_data(config, validation=True)
    assert train.num_train == digits.num_train - len(val.y_test) and config["val_fraction"] == 0.1
    assert rundir.series_data(config).num_train == train.num_train     # what notebooks 1-5 train on
    paper = {**config, "val_fraction": 0.0}
    assert rundir.series_data(paper).num_train == digits.num_train   # the paper's protocol: every image
    assert len(rundir.series_data(paper, validation=True)[1].y_test) == len(val.y_test)
    with pytest.raises(ValueError, match=r"val_fraction must be a number in \[0, 1\)"):
        presets.resolve_config("quick", val_fraction=1.5)


def _swap_table(values_by_layer: dict[int, list[float]], base: list[float]) -> pd.DataFrame:
    """A swap_sweep-shaped table: per layer, per-seed final accuracies, against per-seed base accuracies."""
    rows = [{"layer": t, "seed": s, "slot": 0, "val_final": v, "base_final": base[s], "delta": v - base[s]}
            for t, vs in values_by_layer.items() for s, v in enumerate(vs)]
    return pd.DataFrame(rows)


def test_spearman_and_bootstrap_interval():
    assert validation.spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert validation.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks (1,2,3,4) vs (2,1,4,3): d^2 = 4 -> rho = 1 - 6*4/(4*15) = 0.6
    assert validation.spearman([1, 2, 3, 4], [2, 1, 4, 3]) == pytest.approx(0.6)
    assert math.isnan(validation.spearman([1, 1, 1], [1, 2, 3]))
    # the vectorised rho agrees with scipy's, ties included, and is NaN for a constant row
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 4, (50, 7)).astype(float), rng.normal(size=(50, 7))
    x[0] = 1.0
    rows = validation._row_spearman(x, y)
    assert math.isnan(rows[0]) and rows[1:] == pytest.approx([validation.spearman(a, b) for a, b in zip(x[1:], y[1:])])
    levels = np.linspace(0.2, 0.9, 8)
    sweep = _swap_table({t: [levels[t], levels[t] + 0.01] for t in range(8)}, [0.5, 0.5])
    scores = pd.DataFrame({"quality": np.arange(8.0), "depth": -np.arange(8.0),
                           "probe_acc": [0, 3, 1, 2, 7, 5, 6, 4.0]})
    one_seed = sweep[sweep["seed"] == 0]
    perfect = validation.rank_correlations(one_seed, scores, n_boot=300, seed=0)
    assert perfect.loc["quality", "ci_low"] == pytest.approx(1.0)       # one seed: a perfect order stays perfect
    corr = validation.rank_correlations(sweep, scores, n_boot=300, seed=0)
    assert corr.loc["quality", "spearman"] == pytest.approx(1.0)
    assert corr.loc["depth", "spearman"] == pytest.approx(-1.0)
    mid = corr.loc["probe_acc"]
    assert mid.ci_low < mid.spearman < mid.ci_high and mid.ci_high - mid.ci_low > 0.2
    assert set(corr.index) == {"quality", "depth", "probe_acc"} and (corr["layers"] == 8).all()
    # seed noise as large as the gaps between layers: resampled seeds reorder the layers, the interval widens
    noisy = _swap_table({t: [levels[t] - 0.15, levels[t] + 0.15] for t in range(8)}, [0.5, 0.5])
    assert 0.3 < validation.rank_correlations(noisy, scores, n_boot=300, seed=0).loc["quality", "ci_low"] < 1.0


def test_values_are_paired_changes_against_the_base_set():
    sweep = _swap_table({2: [0.50, 0.52], 3: [0.55, 0.58], 1: [0.45, 0.46]}, [0.50, 0.52])
    values = validation.layer_values(sweep)
    assert values.loc[2, "value"] == pytest.approx(0.0) and values.loc[2, "low"] == pytest.approx(0.0)
    assert values.loc[3, "value"] == pytest.approx(0.055) and values.loc[1, "value"] == pytest.approx(-0.055)
    # per-seed changes +0.05, +0.06: mean 0.055, sd 0.00707, t(0.975, 1) = 12.706 -> half-width 0.0635
    assert values.loc[3, "high"] - values.loc[3, "value"] == pytest.approx(12.7062 * 0.0070711 / math.sqrt(2), rel=1e-3)
    assert values.loc[3, "val_acc"] == pytest.approx(0.565) and (values["seeds"] == 2).all()


def test_stage_slots_and_swaps():
    base = [2, 4, 6, 8]
    assert [validation.stage_slot(t, base) for t in range(10)] == [0, 0, 0, 1, 1, 2, 2, 3, 3, 3]
    assert validation.swapped(0, base) == [0, 4, 6, 8] and validation.swapped(9, base) == [2, 4, 6, 9]
    assert validation.swapped(5, base) == [2, 4, 5, 8] and validation.swapped(4, base) == base
    assert [validation.swapped(t, [6, 8]) for t in (0, 7)] == [[0, 8], [6, 7]]      # k = 2: two slots
    values = pd.DataFrame({"value": [0.0, 0.02, -0.01, 0.0, 0.01, 0.01], "slot": [0, 0, 1, 1, 2, 2]},
                          index=[2, 1, 3, 4, 5, 6])
    # slot 0: layer 1 beats the base; slot 1: no swap beats 4; slot 2: a tie goes to the base layer 6
    assert validation.stagewise_best(values, [2, 4, 6]) == [1, 4, 6]


def test_predictor_differences_decide_only_when_the_interval_excludes_zero():
    rng = np.random.default_rng(1)
    truth = np.arange(10.0)
    sweep = _swap_table({t: [0.01 * truth[t] + e for e in rng.normal(0, 0.002, 3)] for t in range(10)}, [0, 0, 0])
    scores = pd.DataFrame({"quality": truth, "depth": truth[::-1].copy(), "separation": truth + rng.normal(0, 0.3, 10),
                           "efficiency": rng.permutation(truth)})
    diff = validation.predictor_differences(sweep, scores, "quality", n_boot=500, seed=0)
    assert set(diff.index) == {"depth", "separation", "efficiency"}
    assert diff.loc["depth", "diff"] == pytest.approx(2.0) and diff.loc["depth", "ci_low"] > 0
    assert "Q = S + sqrt(IE) orders the layers better than depth" in diff.loc["depth", "verdict"]
    # S is a slightly noisy copy of the true order: rho(Q) - rho(S) is small and its interval includes 0
    assert diff.loc["separation", "ci_low"] <= 0 <= diff.loc["separation", "ci_high"]
    assert diff.loc["separation", "verdict"] == "cannot tell (the interval includes 0)"
    again = validation.predictor_differences(sweep, scores, "quality", n_boot=500, seed=0)
    pd.testing.assert_frame_equal(diff, again)                                     # seeded: reproducible
    flip = validation.predictor_differences(sweep, scores, "depth", ["quality"], n_boot=500, seed=0)
    assert flip.loc["quality", "diff"] == pytest.approx(-2.0) and "worse than" in flip.loc["quality", "verdict"]


def test_top_k_ties_and_nan():
    s = pd.Series([0.5, np.nan, 0.9, 0.5, 0.1], index=[0, 1, 2, 3, 4])
    assert validation.top_k(s, 2) == [0, 2]            # the tie between 0 and 3 goes to the shallower layer
    with pytest.raises(ValueError, match="cannot pick k=5"):
        validation.top_k(s, 5)


@pytest.fixture(scope="module")
def tiny(digits):
    def up(x):
        return F.interpolate(x[:48].float(), size=(32, 32), mode="bilinear").round().to(torch.uint8)
    ds = dataclasses.replace(digits, x_train=up(digits.x_train), y_train=digits.y_train[:48],
                             x_test=up(digits.x_test), y_test=digits.y_test[:48])
    return ds


def test_sweep_and_selections_train_resume_and_deduplicate(tiny, tmp_path, monkeypatch):
    seed_everything(0)
    teacher = build_model("resnet10_narrow", 10).eval().requires_grad_(False)
    recipe = {"epochs": 1, "lr": 0.005, "weight_decay": 0.01, "schedule": "onecycle", "batch_size": 16,
              "augment": False}
    calls = []
    real = validation._run
    monkeypatch.setattr(validation, "_run", lambda *a, **k: calls.append(list(a[3])) or real(*a, **k))
    sweep = validation.swap_sweep(teacher, "resnet10_narrow", tiny, [1, 3, 4], [3, 4], [3, 4], [0, 1],
                                  recipe=recipe, checkpoint_dir=tmp_path, progress=False)
    assert calls == [[3, 4], [1, 4], [3, 4], [1, 4]]          # per seed: the base set, then layer 1 in slot 0
    assert list(zip(sweep["layer"], sweep["seed"])) == [(1, 0), (3, 0), (4, 0), (1, 1), (3, 1), (4, 1)]
    assert sweep["val_final"].between(0, 1).all() and (sweep["val_best"] >= sweep["val_final"]).all()
    assert (sweep.loc[sweep["layer"] != 1, "delta"] == 0).all()                      # base layers: 0 by construction
    assert sweep.loc[sweep["layer"] == 1, "delta"].to_numpy() == pytest.approx(
        (sweep.loc[sweep["layer"] == 1, "val_final"] - sweep.loc[sweep["layer"] == 1, "base_final"]).to_numpy())
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["base-seed0.pt", "base-seed1.pt", "swap1-seed0.pt",
                                                             "swap1-seed1.pt"]
    values = validation.layer_values(sweep)
    assert list(values.index) == [1, 3, 4] and (values["seeds"] == 2).all() and list(values["slot"]) == [0, 0, 1]
    with pytest.raises(ValueError, match="must pair one to one"):
        validation.swap_sweep(teacher, "resnet10_narrow", tiny, [1], [2, 3, 4], [3, 4], [0], recipe=recipe)

    calls.clear()
    again = validation.swap_sweep(teacher, "resnet10_narrow", tiny, [1, 3, 4], [3, 4], [3, 4], [0, 1],
                                  recipe=recipe, checkpoint_dir=tmp_path, progress=False)
    pd.testing.assert_frame_equal(again, sweep)              # finished checkpoints are reused, numbers identical
    calls.clear()
    rules = {"Q (the paper)": [2, 3, 4, 5], "other": [1, 2, 4, 5], "same as Q": [5, 4, 3, 2]}
    table = validation.compare_selections(teacher, "resnet10_narrow", tiny, rules, [1, 2, 3, 4], [0],
                                          recipe=recipe, checkpoint_dir=tmp_path, progress=False)
    assert len(calls) == 2 and len(table) == 2               # identical selections trained once
    assert table.loc[0, "chosen by"] == "Q (the paper), same as Q" and table.loc[0, "layers"] == [2, 3, 4, 5]
    assert math.isnan(table.loc[0, "test_final_std"])        # one seed: no spread
    (other,) = validation.selection_comparisons(table)
    assert other["a"] == "other" and other["low"] is None and other["verdict"] == "one seed: no interval, no verdict"
    assert other["points"] == pytest.approx(100 * (table.loc[1, "test_final"] - table.loc[0, "test_final"]))


def _tables(q_is_best: bool):
    layers = range(6)
    values = pd.DataFrame({"value": [-0.03, 0.01, 0.02, 0.05, 0.0, -0.01], "low": [-0.05, 0, 0, 0.03, 0, -0.02],
                           "high": [-0.01, 0.02, 0.04, 0.07, 0, 0.0], "value_std": [0.01] * 6,
                           "slot": [0, 0, 0, 1, 1, 1], "val_acc": [0.5] * 6, "seeds": [2] * 6}, index=pd.Index(layers))
    corr = pd.DataFrame({"score": ["Q = S + sqrt(IE)", "depth"], "spearman": [0.9 if q_is_best else 0.1, 0.5],
                         "ci_low": [0.6 if q_is_best else -0.5, 0.3], "ci_high": [1.0 if q_is_best else 0.4, 0.8],
                         "layers": [6, 6]}, index=["quality", "depth"])
    diff = pd.DataFrame({"a": "Q = S + sqrt(IE)", "b": ["depth"], "rho_a": [corr.spearman.iloc[0]], "rho_b": [0.5],
                         "diff": [corr.spearman.iloc[0] - 0.5], "ci_low": [0.1 if q_is_best else -0.9],
                         "ci_high": [0.6 if q_is_best else -0.1],
                         "verdict": ["Q = S + sqrt(IE) orders the layers better than depth (the interval excludes 0)"
                                     if q_is_best else
                                     "Q = S + sqrt(IE) orders the layers worse than depth (the interval excludes 0)"]},
                        index=["depth"])
    held = pd.DataFrame({"score": ["a", "b"], "spearman": [0.2, 0.4], "ci_low": [0, 0], "ci_high": [1, 1],
                         "layers": [6, 6]}, index=["quality_train_small", "quality_val"])
    compared = pd.DataFrame({"layers": [[3, 4], [4, 5]], "chosen by": ["Q (the paper)", "deepest k"],
                             "test_final": [0.70, 0.75], "test_final_std": [0.01, 0.01], "test_best": [0.7, 0.75],
                             "seeds": [2, 2], "final_acc": [[0.69, 0.71], [0.74, 0.76]]})
    rules = {"Q (the paper)": [3, 4], "deepest k": [4, 5], "Q on validation images": [3, 4]}
    return values, corr, diff, held, compared, validation.selection_comparisons(compared), rules


def test_summary_lines_state_the_measured_result():
    tables = _tables(False)
    (c,) = tables[5]
    assert c["a"] == "deepest k" and c["points"] == pytest.approx(5.0) and c["low"] == pytest.approx(5.0)
    assert c["verdict"] == "deepest k above Q (the paper) (the interval excludes 0)"   # +5 in both seeds: sd 0
    text = "\n".join(validation.summary_lines(*tables, seeds=2, held_out=True))
    assert "3 (+5.00)" in text and "smallest: 0 (-3.00)" in text
    assert "Q orders this teacher's layers worse than depth" in text
    assert "never trained on" in text and "deepest k +5.00 [+5.00, +5.00] (deepest k above Q" in text
    best = "\n".join(validation.summary_lines(*_tables(True), seeds=2, held_out=False))
    assert "Q orders this teacher's layers better than depth" in best and "(val_fraction 0)" in best
    block = validation.results_block(*_tables(True), {"seeds": [0, 1], "validation_epochs": 2, "k": 2,
                                                       "val_fraction": 0.1}, [2, 4])
    assert block["layer_values"]["3"]["value"] == 0.05 and block["selections"]["deepest k"] == [4, 5]
    assert block["selection_accuracy"][1]["test_final"] == 0.75 and block["base_layers"] == [2, 4]
    assert block["comparisons"][0]["b"] == "Q (the paper)" and block["predictor_differences"]["depth"]["ci_low"] == 0.1


def test_the_sweep_runs_the_teacher_over_the_data_once_for_all_its_runs(tiny, monkeypatch):
    seed_everything(0)
    teacher = build_model("resnet10_narrow", 10).eval().requires_grad_(False)
    recipe = {"epochs": 1, "lr": 0.005, "weight_decay": 0.01, "schedule": "onecycle", "batch_size": 16,
              "augment": False}
    images = []                                       # images per teacher forward (shape probes use 2)
    handle = teacher.register_forward_pre_hook(lambda module, args: images.append(len(args[0])))
    try:
        shared = validation.swap_sweep(teacher, "resnet10_narrow", tiny, [0, 1, 2, 3, 4], [3, 4], [3, 4], [0],
                                       recipe=recipe, progress=False)
    finally:
        handle.remove()
    assert sum(n for n in images if n > 2) == tiny.num_train   # 4 runs, one pass over the training images
    monkeypatch.setattr(validation, "_fill_cache", lambda *a, **k: None)     # each run caches its own targets
    alone = validation.swap_sweep(teacher, "resnet10_narrow", tiny, [0, 1, 2, 3, 4], [3, 4], [3, 4], [0],
                                  recipe=recipe, progress=False)
    pd.testing.assert_frame_equal(shared, alone)             # the same targets, so the same runs
