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


def test_spearman_and_bootstrap_interval():
    assert validation.spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert validation.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks (1,2,3,4) vs (2,1,4,3): d^2 = 4 -> rho = 1 - 6*4/(4*15) = 0.6
    assert validation.spearman([1, 2, 3, 4], [2, 1, 4, 3]) == pytest.approx(0.6)
    assert math.isnan(validation.spearman([1, 1, 1], [1, 2, 3]))
    sweep = pd.DataFrame({"layer": np.repeat(np.arange(8), 2), "seed": np.tile([0, 1], 8),
                          "val_final": np.repeat(np.linspace(0.2, 0.9, 8), 2) + np.tile([0.0, 0.01], 8)})
    scores = pd.DataFrame({"quality": np.arange(8.0), "depth": -np.arange(8.0),
                           "probe_acc": [0, 3, 1, 2, 7, 5, 6, 4.0]})
    one_seed = sweep[sweep["seed"] == 0]
    perfect = validation.rank_correlations(one_seed, scores, n_boot=300, seed=0)
    assert perfect.loc["quality", "ci_low"] == pytest.approx(1.0)       # one seed: a perfect order stays perfect
    corr = validation.rank_correlations(sweep, scores, n_boot=300, seed=0)
    assert corr.loc["quality", "spearman"] == pytest.approx(1.0)
    assert 0.5 < corr.loc["quality", "ci_low"] < 1.0      # resampled seeds make tied layers differ: the seed noise
    assert corr.loc["depth", "spearman"] == pytest.approx(-1.0)
    mid = corr.loc["probe_acc"]
    assert mid.ci_low < mid.spearman < mid.ci_high and mid.ci_high - mid.ci_low > 0.2
    assert set(corr.index) == {"quality", "depth", "probe_acc"} and (corr["layers"] == 8).all()


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
    sweep = validation.single_layer_sweep(teacher, "resnet10_narrow", tiny, [1, 3], 4, [0, 1], recipe=recipe,
                                          checkpoint_dir=tmp_path, progress=False)
    assert list(zip(sweep["layer"], sweep["seed"])) == [(1, 0), (3, 0), (1, 1), (3, 1)]
    assert sweep["val_final"].between(0, 1).all() and (sweep["val_best"] >= sweep["val_final"]).all()
    assert sorted(p.name for p in tmp_path.glob("layer*.pt")) == ["layer1-seed0.pt", "layer1-seed1.pt",
                                                                 "layer3-seed0.pt", "layer3-seed1.pt"]
    values = validation.layer_values(sweep)
    assert list(values.index) == [1, 3] and (values["seeds"] == 2).all()

    calls = []
    real = validation._run
    monkeypatch.setattr(validation, "_run", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    again = validation.single_layer_sweep(teacher, "resnet10_narrow", tiny, [1, 3], 4, [0, 1], recipe=recipe,
                                          checkpoint_dir=tmp_path, progress=False)
    pd.testing.assert_frame_equal(again, sweep)              # finished checkpoints are reused, numbers identical
    calls.clear()
    rules = {"Q": [2, 3, 4, 5], "other": [1, 2, 4, 5], "same as Q": [5, 4, 3, 2]}
    table = validation.compare_selections(teacher, "resnet10_narrow", tiny, rules, [1, 2, 3, 4], [0],
                                          recipe=recipe, checkpoint_dir=tmp_path, progress=False)
    assert len(calls) == 2 and len(table) == 2               # identical selections trained once
    assert table.loc[0, "chosen by"] == "Q, same as Q" and table.loc[0, "layers"] == [2, 3, 4, 5]
    assert math.isnan(table.loc[0, "test_final_std"])        # one seed: no spread


def _tables(q_is_best: bool):
    layers = range(6)
    values = pd.DataFrame({"value": [0.3, 0.5, 0.6, 0.8, 0.7, 0.4], "value_std": [0.01] * 6,
                           "best": [0.35, 0.5, 0.6, 0.8, 0.7, 0.4], "seeds": [2] * 6}, index=pd.Index(layers))
    corr = pd.DataFrame({"score": ["Q = S + sqrt(IE)", "depth"], "spearman": [0.9 if q_is_best else 0.1, 0.5],
                         "ci_low": [0.6 if q_is_best else -0.5, 0.3], "ci_high": [1.0 if q_is_best else 0.4, 0.8],
                         "layers": [6, 6]}, index=["quality", "depth"])
    held = pd.DataFrame({"score": ["a", "b"], "spearman": [0.2, 0.4], "ci_low": [0, 0], "ci_high": [1, 1],
                         "layers": [6, 6]}, index=["quality_train_small", "quality_val"])
    compared = pd.DataFrame({"layers": [[3, 4], [4, 5]], "chosen by": ["Q (the paper)", "deepest k"],
                             "test_final": [0.70, 0.75], "test_final_std": [0.01, 0.01], "test_best": [0.7, 0.75],
                             "seeds": [2, 2], "final_acc": [[0.69, 0.71], [0.74, 0.76]]})
    rules = {"Q (the paper)": [3, 4], "deepest k": [4, 5], "Q on validation images": [3, 4]}
    return values, corr, held, compared, rules


def test_summary_lines_state_the_measured_result():
    lines = validation.summary_lines(*_tables(False), seeds=2, held_out=True)
    text = "\n".join(lines)
    assert "3 (80.00%)" in text and "least: 0 (30.00%)" in text
    assert "Here depth orders the layers better than Q (+0.50 vs +0.10)" in text
    assert "its interval lies clear of Q's estimate" in text                    # 0.3 > 0.1
    assert "never trained on" in text and "The best selection (deepest k) beats Q's by 5.00 points, more than" in text
    best = "\n".join(validation.summary_lines(*_tables(True), seeds=2, held_out=False))
    assert "Q is the best predictor here (+0.90)" in best and "(val_fraction 0)" in best
    block = validation.results_block(*_tables(True), {"seeds": [0, 1], "validation_epochs": 2, "k": 2,
                                                       "val_fraction": 0.1})
    assert block["layer_values"]["3"]["value"] == 0.8 and block["selections"]["deepest k"] == [4, 5]
    assert block["selection_accuracy"][1]["test_final"] == 0.75
