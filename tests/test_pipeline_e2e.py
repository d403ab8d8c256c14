"""End to end: the six notebooks run headless with papermill, on the quick preset and on the shared CIFAR-10 npz."""
import json

import nbformat
import torch

from kdutils import report
from kdutils.layers import generalized_layer_count, layer_table
from kdutils.models import build_model
from kdutils.pipeline import run_pipeline
from kdutils.presets import resolve_config
from kdutils.rundir import NOTEBOOKS, VALIDATION_NOTEBOOK

SERIES = (*NOTEBOOKS, VALIDATION_NOTEBOOK)
from kdutils.checkpoints import load_checkpoint

RESULT_KEYS = {"final_acc_mean", "final_acc_std", "best_acc_mean", "best_acc_std", "seeds", "seconds"}


def check_run(run_dir, preset, dataset, params=None):
    """results.json matches the run's config (methods, seeds, epochs), feature students hold projectors of the
    paired layers' shapes, and no executed notebook holds an error."""
    config = resolve_config(preset, **(params or {}))
    results = json.loads((run_dir / "results.json").read_text())
    assert results["preset"] == preset and results["dataset"] == dataset
    assert results["teacher"]["model"] == config["teacher"] and results["teacher"]["pretrained"] is False
    assert list(results["methods"]) == config["methods"]
    for method, row in results["methods"].items():
        assert RESULT_KEYS <= set(row), method
        assert row["epochs"] == list(range(1, config["student_epochs"] + 1)), method   # every epoch ran
        assert row["seeds"] == len(config["seeds"]) == len(row["final_acc"]), method
    teacher = json.loads((run_dir / "teacher_metrics.json").read_text())
    assert teacher["epochs"] == len(teacher["history"]) == config["teacher_epochs"]
    selection = json.loads((run_dir / "kq_layers.json").read_text())
    assert len(selection["kq_layers"]) == len(selection["student_layers"]) == config["k"]
    # channel counts (shape[0]) do not depend on the input size, so 32 px serves every dataset here
    t_shapes = layer_table(build_model(config["teacher"], 10), 32)["shape"]
    s_shapes = layer_table(build_model(config["student"], 10), 32)["shape"]
    for method in set(config["methods"]) & {"feature_kd", "standard_layers"}:
        ck = load_checkpoint(run_dir / "students" / f"{method}-seed{config['seeds'][0]}.pt")
        t_layers = ck["meta"]["teacher_layers"]
        assert ck["meta"]["student_layers"] == selection["student_layers"]
        assert t_layers == (selection["kq_layers"] if method == "feature_kd" else selection["teacher_standard_layers"])
        weights = [ck["extra"][f"{i}.weight"] for i in range(len(ck["extra"]))]
        assert [tuple(w.shape) for w in weights] == [(t_shapes[t][0], s_shapes[s][0], 1, 1) for s, t in
                                                     zip(selection["student_layers"], t_layers)], method
        assert all(torch.isfinite(w).all() for w in weights)
    for name in SERIES:
        nb = nbformat.read(run_dir / "executed" / name, as_version=4)
        errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors, f"{name}: {errors[0]['ename']}: {errors[0]['evalue']}"
        assert nb.cells and all(c.get("execution_count") for c in nb.cells if c.cell_type == "code"), name
    for artifact in ("teacher.pt", "teacher_metrics.json", "kq_layers.json", "results.md", "manifests"):
        assert (run_dir / artifact).exists(), artifact
    check_validation(results["kq_validation"], config)
    return results


def check_validation(block, config):
    """Notebook 6's block: a value for every teacher layer, every predictor's rho in [-1, 1], the selections
    trained with the configured seeds, the paper's Q selection among them."""
    swept = (list(range(generalized_layer_count(config["teacher"]))) if config["validation_layers"] == "all"
             else sorted(config["validation_layers"]))
    assert sorted(map(int, block["layer_values"])) == swept
    assert all(-1 <= v["value"] <= 1 and v["seeds"] == config["validation_seeds"] for v in block["layer_values"].values())
    base = [str(t) for t in block["base_layers"] if str(t) in block["layer_values"]]
    assert all(block["layer_values"][t]["value"] == 0 for t in base)          # a standard layer against itself
    assert {"depth", "separation"} <= set(block["predictor_differences"]) and "quality" not in block["predictor_differences"]
    assert len(block["comparisons"]) == len(block["selection_accuracy"]) - 1
    assert all(c["b"].startswith("Q (the paper)") and c["n_seeds"] == config["validation_seeds"] for c in block["comparisons"])
    assert {"quality", "separation", "information", "efficiency", "sqrt_ie", "probe_acc", "depth"} <= set(
        block["correlations"])
    assert all(-1 <= c["spearman"] <= 1 for c in block["correlations"].values() if c["spearman"] is not None)
    assert block["seeds"] == config["seeds"][:config["validation_seeds"]] and block["epochs"] == config["validation_epochs"]
    chosen = {name for row in block["selection_accuracy"] for name in row["chosen by"].split(", ")}
    assert set(block["selections"]) == chosen and all(len(v) == config["k"] for v in block["selections"].values())


def test_pipeline_on_shared_cifar10_npz(tmp_path, shared_npz):
    """The six notebooks through the pipeline on real CIFAR-10 at a tiny budget, with k=2 pairs (the student's two
    deepest standard layers), two seeds and a subset of teacher layers for notebook 6; then the report command.
    (The quick preset itself runs in full in CI's nbval step, which executes the committed notebooks.)"""
    run_dir = tmp_path / "npz"
    params = {"dataset": str(shared_npz), "per_class": 30, "teacher_epochs": 1, "student_epochs": 1,
              "kq_samples": 300, "k": 2, "seeds": [0, 1], "methods": ["ce", "hinton_kd", "feature_kd",
                                                                      "feature_kd_ce", "standard_layers"],
              "validation_epochs": 1, "validation_seeds": 1, "validation_layers": [2, 5, 8]}
    run_pipeline(run_dir, "quick", params, progress=False, notebooks=SERIES)
    results = check_run(run_dir, "quick", "cifar10-subset", params)
    manifest = json.loads((run_dir / "manifests" / "01_train_teacher.json").read_text())
    assert manifest["config"]["seeds"] == [0, 1] and "sha256" in manifest["artifacts"]["teacher"]
    monitor = results["methods"]["feature_kd_ce"]["monitor"]      # the gradient conflict, recorded in notebook 5
    assert len(monitor["grad_cosine"]) == 2 and len(monitor["feature_mse"]) == 2 and monitor["seeds"] == 2
    assert "grad_cosine" not in results["methods"]["feature_kd"]["monitor"]   # CE-free: nothing to compare
    for figure in ("result_panel.png", "result_panel_best.png", "accuracy_curves.png"):    # notebook 5's report
        (run_dir / "figures" / figure).unlink()
    assert report.main([str(run_dir)]) == 0                                          # rewritten from results.json
    assert all((run_dir / "figures" / f).stat().st_size > 10_000 for f in ("result_panel.png", "accuracy_curves.png"))
