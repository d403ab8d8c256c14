"""benchmarks/gpu_check.py (the prepared GPU check) and prepare_gpu_check.py: the dry run end to end on the CPU, the
time boxes, the targets' verdicts, the extrapolation, the device call, and the carry folder's wheel and size rules."""
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    """Import a benchmarks/ script as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check = _load("gpu_check")
prepare = _load("prepare_gpu_check")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The dry run as the docstring gives it (a subprocess: its own signals, environment and threads)."""
    base = tmp_path_factory.mktemp("gpu_check")
    out, work = base / "out", base / "work"
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", str(out), "--work",
                           str(work)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - t0
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((out / check.JSON_NAME).read_text()), out, wall, done.stdout


def test_dry_run_records_every_stage_without_errors(dry_run):
    report, out, wall, stdout = dry_run
    assert report["dry_run"] is True and report["device"] == "cpu" and report["errors"] == []
    assert list(report["stages"]) == [name for name, *_ in check.STAGES]
    for name, rec in report["stages"].items():
        assert rec["status"] in ("ok", "skipped"), (name, rec.get("error"), rec.get("traceback"))
        assert rec["status"] == "ok" or rec["reason"], name              # nothing skipped silently
        for c in rec.get("cases", []):
            assert c["status"] == "ok", (name, c)
    assert report["stages"]["compiled"]["status"] == "skipped" and "dry run" in report["stages"]["compiled"]["reason"]
    assert report["elapsed_s"] < report["budget_s"] and wall < 300
    assert "0 error(s)" in stdout
    assert {p.name for p in out.iterdir()} == {check.JSON_NAME, check.LOG_NAME, check.PROFILES_NAME,
                                                check.NOTEBOOKS_TAR}      # flat, and few: what the device returns
    assert "throughput: ok" in (out / check.LOG_NAME).read_text()


def test_dry_run_measures_each_stage(dry_run):
    report, out, _, _ = dry_run
    stages = report["stages"]
    env = stages["environment"]
    assert env["device_type"] == "cpu" and env["torch"] and env["cuda_available"] is False
    assert env["precision_rule"]["precision.precision_for"]["device"] == "cpu" and env["torch_threads"] == 1

    names = {c["name"]: c["result"] for c in stages["throughput"]["cases"]}
    b1, b2 = report["scale"]["batch_sizes"]
    assert set(names) == {f"{m} b{b}" for m in ("resnet9 ce", "resnet9 feature_kd", "resnet34 teacher")
                          for b in (b1, b2)} | {"kq resnet34"}
    for name, result in names.items():
        if name != "kq resnet34":
            assert result["train_images_per_s"] > 0 and result["batch_size"] == int(name.rsplit("b", 1)[1])
    assert names["kq resnet34"]["seconds"] > 0 and names["kq resnet34"]["layers"] > 10

    fifty = stages["fifty_epochs"]
    assert len(fifty["test_acc"]) == len(fifty["epoch_seconds"]) == report["scale"]["fifty_epochs"]
    assert len(fifty["kq"]["teacher_layers"]) == 4 and fifty["recipe"]["lr"] == 0.0075
    assert fifty["extrapolation"]["extrapolated_seconds"] > sum(fifty["epoch_seconds"])   # 50 epochs of 50k > toy

    pipe = stages["pipeline"]
    assert pipe["teacher"]["pretrained"] is True and pipe["standin_weights"]["loaded_in_process"] is True
    assert pipe["notebooks"] == ["01_train_teacher.ipynb"] and len(pipe["notebooks_skipped"]["notebooks"]) == 4
    assert pipe["pair"] == "resnet34-resnet9" and pipe["executed"]["file"] == check.NOTEBOOKS_TAR

    pairs = {c["name"].split()[0]: c["result"] for c in stages["pairs"]["cases"]}
    assert list(pairs) == [p for p, _ in check.OTHER_PAIRS]
    for result in pairs.values():
        assert len(result["kq_layers"]) == 4 and len(result["student_layers"]) == 4
        assert set(result["seconds"]) == {"fit", "layer_analysis", "layer_qualities", "teacher_cache", "distill"}

    assert set(stages["profiles"]["targets_profiled"]) == set(check.gpu_bench.TARGETS)
    text = (out / check.PROFILES_NAME).read_text()
    assert text.count("=== ") == 4 and "aten::" in text                 # feature_kd's workload is profiled once
    for name, t in report["targets"].items():                           # measured, but never judged on a CPU
        assert t["value"] is not None and t["met"] is None and "not judged" in t["status"], name


def _ctx(tmp_path, budget):
    now = time.perf_counter()
    log = (tmp_path / "log.txt").open("w")
    return {"t0": now, "deadline": now + budget, "stage_deadline": now + budget, "selected": None, "log": log,
            "console": log, "out": tmp_path}


def _report():
    return {"dry_run": False, "stages": {}, "scale": {"batch_sizes": (128, 512), "fifty_batch": 128}}


def test_stages_are_time_boxed_and_failures_recorded(tmp_path):
    ran = []

    def slow(ctx, rec):
        rec["partial"] = 1
        time.sleep(5)

    def broken(ctx, rec):
        check.case(ctx, rec, "fine", lambda: {"x": 1}, min_s=0)
        check.case(ctx, rec, "bad", lambda: 1 / 0, min_s=0)
        check.case(ctx, rec, "too long", lambda: ran.append("too long"), min_s=60)   # 3 s budget: not started
        ran.append("broken")

    def measured_error(ctx, rec):          # gpu_bench.measure's way: it prints the traceback, returns "error"
        def fn():
            print("Traceback (most recent call last):\n  boom", file=sys.stderr)
            return {"error": "OutOfMemoryError: boom"}
        check.case(ctx, rec, "oom", fn, min_s=0)

    def late(ctx, rec):
        ran.append("late")

    ctx, report = _ctx(tmp_path, 3.0), _report()
    check.run_stages([("slow", slow, 0, 0.5), ("broken", broken, 0, 10), ("measured", measured_error, 0, 10),
                      ("late", late, 10, 10)], ctx, report)
    slow_rec, broken_rec = report["stages"]["slow"], report["stages"]["broken"]
    assert slow_rec["status"] == "timeout" and slow_rec["partial"] == 1 and slow_rec["seconds"] < 2
    assert "time box" in slow_rec["error"] and "Traceback" in slow_rec["traceback"]
    assert broken_rec["status"] == "error" and ran == ["broken"] and broken_rec["failed_cases"] == ["bad"]
    assert [c["status"] for c in broken_rec["cases"]] == ["ok", "error", "skipped"]
    assert "the case needs about 60 s" in broken_rec["cases"][2]["reason"]
    assert "ZeroDivisionError" in broken_rec["cases"][1]["traceback"]
    oom = report["stages"]["measured"]["cases"][0]
    assert oom["status"] == "error" and oom["traceback"].startswith("Traceback") and "boom" in oom["traceback"]
    assert report["stages"]["late"]["status"] == "skipped" and "needs at least 10 s" in \
        report["stages"]["late"]["reason"]                             # 3 s budget, 10 s needed
    written = json.loads((tmp_path / check.JSON_NAME).read_text())
    assert [(e["stage"], e["case"]) for e in written["errors"]] == [("slow", None), ("broken", "bad"),
                                                                     ("measured", "oom")]


def _case(name, **result):
    return {"name": name, "status": "ok", "result": result}


def test_targets_judge_batch_128_eager_and_name_the_best():
    report = _report()
    report["stages"]["throughput"] = {"cases": [
        _case("resnet9 ce b128", train_images_per_s=50_000.0), _case("resnet9 ce b512", train_images_per_s=70_000.0),
        _case("resnet9 feature_kd b128", train_images_per_s=30_000.0),
        _case("resnet9 feature_kd b512", train_images_per_s=63_000.0),
        _case("resnet34 teacher b128", train_images_per_s=11_000.0),
        {"name": "resnet34 teacher b512", "status": "error", "error": "OOM", "result": {"train_images_per_s": 9e9}},
        _case("kq resnet34", seconds=12.5)]}
    report["stages"]["compiled"] = {"cases": [_case("resnet9 ce b128 compiled", train_images_per_s=80_000.0)]}
    report["stages"]["fifty_epochs"] = {"extrapolation": {"extrapolated_seconds": 95.0}}
    t = check.targets_block(report)
    ce = t["resnet9_ce_train_images_per_s"]
    assert ce["value"] == 50_000.0 and ce["met"] is True and ce["status"] == "met"
    assert ce["best_config"] == "b128 compiled" and ce["best_value"] == 80_000.0
    ratio = t["resnet9_feature_kd_over_ce"]
    assert ratio["value"] == 0.6 and ratio["met"] is False and ratio["best_value"] == 0.9
    teacher = t["resnet34_teacher_train_images_per_s"]
    assert teacher["met"] is False and teacher["configs"]["b512"] is None      # a failed case is not a value
    assert t["resnet34_kq_seconds"]["met"] is True
    assert t["resnet9_50_epoch_run_seconds"]["met"] is False and t["resnet9_50_epoch_run_seconds"]["value"] == 95.0
    assert all(v["value"] is None and v["status"] == "not measured" for v in check.targets_block(_report()).values())


def test_extrapolation_to_full_cifar10():
    # 2 epochs on 10k/2k images: the first 1 s slower (warm-up); steady 3 s, of which 0.5 s evaluation
    e = check.extrapolate([4.0, 3.0, 3.0], eval_seconds=0.5, train_images=10_000, test_images=2_000)
    assert e["warmup_seconds"] == 1.0 and e["steady_epoch_seconds"] == 3.0
    assert e["full_epoch_seconds"] == pytest.approx(2.5 * 5 + 0.5 * 5)
    assert e["extrapolated_seconds"] == pytest.approx(1.0 + 50 * 15.0)
    assert e["train_images_per_s"] == 4000.0


def test_docstring_states_the_exact_device_call():
    doc = check.__doc__
    assert f"command:   {check.DEVICE_COMMAND}\n" in doc and f"carry:     {json.dumps(check.DEVICE_CARRY)}\n" in doc
    assert f"timeout_s: {check.DEVICE_TIMEOUT_S}\n" in doc
    assert len(check.DEVICE_COMMAND) <= 2000 and check.DEVICE_TIMEOUT_S <= 600   # the device tool's limits
    assert check.CARRY_DATA in check.DEVICE_COMMAND and f"{check.CARRY_WHEELS}/*.whl" in check.DEVICE_COMMAND
    assert "pip install -q --no-deps --no-build-isolation -e ." in check.DEVICE_COMMAND
    assert check.DEFAULT_BUDGET_S + 60 <= check.DEVICE_TIMEOUT_S <= 8 * 60 + 60
    assert prepare.device_call() == {"command": check.DEVICE_COMMAND, "carry": ["gpu_carry"], "timeout_s": 540}
    assert "gpu_carry/" in (ROOT / ".gitignore").read_text().splitlines()   # the data never gets committed


def test_wheels_the_image_holds_are_dropped_and_duplicates_refused():
    files = [Path(n) for n in ("papermill-2.7.0-py3-none-any.whl", "PyYAML-6.0.4-cp312-cp312-manylinux.whl",
                               "typing_extensions-4.16.0-py3-none-any.whl", "pyzmq-27.3.0-cp312-abi3-manylinux.whl")]
    keep, drop = prepare.split_wheels(files)
    assert [f.name.split("-")[0] for f in keep] == ["papermill", "pyzmq"]
    assert [f.name.split("-")[0] for f in drop] == ["PyYAML", "typing_extensions"]   # normalized: pyyaml, typing-...
    with pytest.raises(ValueError, match="two wheels of pyzmq"):
        prepare.split_wheels(files + [Path("pyzmq-26.0.0-cp312-abi3-manylinux.whl")])


def test_size_check_refuses_more_than_the_device_carries():
    assert "50.0 MiB of 64 MiB" in prepare.check_size(4 * 2**20, 46 * 2**20)
    with pytest.raises(SystemExit, match="over the device's limit"):
        prepare.check_size(4 * 2**20, 61 * 2**20)
