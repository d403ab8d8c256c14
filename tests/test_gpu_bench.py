"""benchmarks/gpu_bench.py: the tiny CPU mode end to end (about 15 s on one thread), and the targets' verdicts."""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]


def _load_bench():
    """Import benchmarks/gpu_bench.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks" / "gpu_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the tiny mode is the CPU configuration")
def test_tiny_cpu_run_reports_real_throughput(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--tiny", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    report = json.loads(stdout)                      # stdout is exactly one JSON object
    assert json.loads(out.read_text()) == report

    assert report["device"] == "cpu" and report["device_type"] == "cpu" and report["tiny"] is True
    assert report["torch"] == torch.__version__ and report["epochs"] == 2
    assert report["data"]["16"]["source"] == "synthetic"

    found = {(e["role"], e["model"], e["method"]) for e in report["entries"]}
    expected = {("teacher", "resnet18_narrow", "ce")} | {
        ("student", s, m) for s in ("resnet10_narrow", "resnet9") for m in ("ce", "hinton_kd", "feature_kd")}
    assert found == expected
    for e in report["entries"]:
        assert "error" not in e, e
        assert e["device"] == "cpu" and e["torch"] == torch.__version__ and e["batch_size"] == 64
        assert e["precision"] == "fp32" and e["compile"] is False and e["compile_seconds"] is None
        assert e["image_size"] == 16 and e["train_images_per_epoch"] == 256 and len(e["epoch_seconds"]) == 2
        for key in ("images_per_s", "train_images_per_s", "eval_images_per_s"):
            assert math.isfinite(e[key]) and e[key] > 0, (key, e)
        # the numbers are consistent with each other: 256 images over the steady (second) epoch, eval excluded is faster
        assert e["images_per_s"] == pytest.approx(256 / e["epoch_seconds"][1], rel=0.01)
        assert e["train_images_per_s"] > e["images_per_s"]
        assert 0 < e["eval_seconds"] < e["steady_epoch_seconds"]
    students = [e for e in report["entries"] if e["role"] == "student"]
    assert all(e["teacher"] == "resnet18_narrow" for e in students)
    assert all((e["teacher_layers"] is not None) == (e["method"] == "feature_kd") for e in students)

    [kq] = report["kq"]
    assert kq["model"] == "resnet18_narrow" and kq["layers"] == 10 and kq["seconds"] > 0 and kq["data"] == "synthetic"
    assert report["notebooks"] is None
    assert set(report["targets"]) == set(bench.TARGETS)
    for t in report["targets"].values():          # no fake pass on a CPU
        assert t["value"] is None and t["met"] is None and "not measured on CPU" in t["status"]


def _entry(model, method, rate, role="student", compile=False, precision="bf16", eval_rate=100_000.0):
    return {"role": role, "model": model, "method": method, "image_size": 32, "precision": precision,
            "compile": compile, "train_images_per_s": rate, "eval_images_per_s": eval_rate}


def test_targets_judge_the_default_config_and_name_the_best():
    entries = [_entry("resnet34", "ce", 13_000.0, role="teacher"),
               _entry("resnet9", "ce", 50_000.0), _entry("resnet9", "hinton_kd", 45_000.0),
               _entry("resnet9", "feature_kd", 30_000.0),
               _entry("resnet9", "ce", 60_000.0, compile=True), _entry("resnet9", "feature_kd", 54_000.0, compile=True),
               {**_entry("resnet9", "hinton_kd", 1.0, compile=True), "error": "OutOfMemoryError"}]
    kq = [{"model": "resnet34", "image_size": 32, "data": "cifar10-subset.npz", "seconds": 20.0},
          {"model": "resnet34", "image_size": 32, "data": "synthetic", "seconds": 1.0}]     # synthetic: not judged
    configs = [("bf16", False), ("fp32", False), ("bf16", True)]
    t = bench.targets_block(entries, kq, configs, torch.device("cuda"))   # only the device's type is read
    assert t["resnet9_ce_train_images_per_s"]["value"] == 50_000.0 and t["resnet9_ce_train_images_per_s"]["met"]
    assert t["resnet9_ce_train_images_per_s"]["best_value"] == 60_000.0
    assert t["resnet9_ce_train_images_per_s"]["best_config"] == {"precision": "bf16", "compile": True}
    assert t["resnet9_feature_kd_over_ce"]["value"] == 0.6 and t["resnet9_feature_kd_over_ce"]["status"] == "not met"
    assert t["resnet9_feature_kd_over_ce"]["best_value"] == 0.9 and t["resnet9_feature_kd_over_ce"]["best_met"]
    assert t["resnet34_teacher_train_images_per_s"]["met"] is True
    assert t["resnet34_kq_seconds"]["met"] is False
    # slowest eager method (feature_kd): 50 x (50k / 30k + 10k / 100k) s; the compiled config lacks hinton_kd (its
    # run failed), so it has no value and is not the best
    run = t["resnet9_50_epoch_run_seconds"]
    assert run["value"] == pytest.approx(50 * (50_000 / 30_000 + 0.1), abs=0.1) and run["met"] is True
    assert run["best_value"] == run["value"] and run["best_config"] == {"precision": "bf16", "compile": False}

    empty = bench.targets_block([], [], configs, torch.device("cuda"))
    assert all(v["value"] is None and v["met"] is None and v["status"] == "not measured" for v in empty.values())


def test_epochs_below_two_are_refused():
    with pytest.raises(SystemExit):
        bench.parse_args(["--epochs", "1"])
