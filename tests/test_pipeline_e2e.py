"""End to end: the five notebooks run headless with papermill, on the quick preset and on the shared CIFAR-10 npz."""
import json

import nbformat
import pytest

from kdutils.pipeline import NOTEBOOKS, run_pipeline

RESULT_KEYS = {"final_acc_mean", "final_acc_std", "best_acc_mean", "best_acc_std", "seeds", "seconds"}


def check_run(run_dir, preset, dataset, methods):
    """results.json has the documented shape and sane numbers; no executed notebook holds an error."""
    results = json.loads((run_dir / "results.json").read_text())
    assert results["preset"] == preset and results["dataset"] == dataset
    assert 0.0 < results["teacher"]["test_acc"] <= 1.0 and results["teacher"]["model"] == "resnet18_narrow"
    assert set(results["methods"]) == set(methods)
    for method, row in results["methods"].items():
        assert RESULT_KEYS <= set(row), method
        assert 0.0 <= row["final_acc_mean"] <= row["best_acc_mean"] <= 1.0, method
    for name in NOTEBOOKS:
        nb = nbformat.read(run_dir / "executed" / name, as_version=4)
        errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors, f"{name}: {errors[0]['ename']}: {errors[0]['evalue']}"
        assert nb.cells and all(c.get("execution_count") for c in nb.cells if c.cell_type == "code"), name
    for artifact in ("teacher.pt", "teacher_metrics.json", "kq_layers.json", "results.md", "manifests"):
        assert (run_dir / artifact).exists(), artifact
    return results


def test_quick_pipeline(tmp_path):
    run_dir = tmp_path / "quick"
    run_pipeline(run_dir, "quick", progress=False)
    results = check_run(run_dir, "quick", "digits",
                        ["ce", "hinton_kd", "feature_kd", "feature_kd_ce", "standard_layers"])
    assert results["teacher"]["test_acc"] > 0.9  # digits is easy: a broken teacher would show here
    manifest = json.loads((run_dir / "manifests" / "01_train_teacher.json").read_text())
    assert manifest["config"]["seeds"] == [0] and "sha256" in manifest["artifacts"]["teacher"]


def test_pipeline_on_shared_cifar10_npz(tmp_path, shared_npz):
    run_dir = tmp_path / "npz"
    params = {"dataset": str(shared_npz), "per_class": 30, "teacher_epochs": 1, "student_epochs": 1,
              "kq_samples": 300, "methods": ["ce", "hinton_kd", "feature_kd"]}
    run_pipeline(run_dir, "quick", params, progress=False)
    check_run(run_dir, "quick", "cifar10-subset", params["methods"])
