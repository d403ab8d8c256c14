"""The Ray sweep (kdutils.sweep) on `quick` with a tiny budget: killed mid-way, resumed, equal to notebook 5.

One local Ray instance serves the whole test session (2 CPUs). The module's fixture runs the sweep CLI as a
subprocess joined to it, kills the subprocess once some student runs have finished, resumes in-process, and runs
the sequential notebook 5 on a copy of the teacher's artifacts with one intra-op thread, as each Ray task has.
"""
import json
import shutil
import subprocess
import sys
import time

import pytest

ray = pytest.importorskip("ray")

from kdutils import sweep as sw  # noqa: E402
from kdutils.pipeline import run_pipeline  # noqa: E402
from kdutils.sweep_tasks import TEACHER_ARTIFACTS, combination_dir, student_checkpoint  # noqa: E402
from kdutils.checkpoints import checkpoint_finished, load_checkpoint  # noqa: E402

PAIR = "resnet18_narrow-resnet10_narrow"
METHODS = ["ce", "feature_kd"]
SEEDS = [0, 1]
PARAMS = {"teacher_epochs": 1, "student_epochs": 1, "per_class": 40, "kq_samples": 300}
RUNS = [(m, s) for s in SEEDS for m in METHODS]


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance (2 CPUs) for the test session."""
    for attempt in range(3):   # Ray's agents have fixed start-up timeouts that a loaded machine can miss
        try:
            ray.init(num_cpus=2)
            break
        except Exception as err:
            ray.shutdown()
            if "timed out during startup" not in str(err) or attempt == 2:
                raise
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _finished(run_dir):
    """(method, seed) -> whether its student checkpoint has all epochs."""
    return {(m, s): checkpoint_finished(student_checkpoint(run_dir, m, s), PARAMS["student_epochs"])
            for m, s in RUNS}


@pytest.fixture(scope="module")
def swept(tmp_path_factory, ray_session):
    """Sweep killed after its first finished student run, then resumed; plus notebook 5's sequential reference."""
    base = tmp_path_factory.mktemp("sweep")
    root, run_dir = base / "root", combination_dir(base / "root", "digits", PAIR)
    cli = [sys.executable, "-m", "kdutils.sweep", "--preset", "quick", "--root", str(root), "--seeds",
           *map(str, SEEDS), "--methods", *METHODS, "--address", ray_session, "--no-figures",
           *[a for k, v in PARAMS.items() for a in ("-p", k, str(v))]]
    log = base / "killed.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cli, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            done = _finished(run_dir) if (run_dir / "students").is_dir() else {}
            if any(done.values()):
                break
            time.sleep(0.2)
        proc.kill()
        proc.wait()
    at_kill = _finished(run_dir)
    assert any(at_kill.values()) and not all(at_kill.values()), \
        f"the kill came too early or too late: {at_kill}\n{log.read_text()[-3000:]}"
    time.sleep(3)              # let Ray stop the killed driver's tasks
    at_kill = _finished(run_dir)
    stamps = {r: student_checkpoint(run_dir, *r).stat().st_mtime_ns for r, ok in at_kill.items() if ok}
    teacher_stamp = (run_dir / "executed" / "01_train_teacher.ipynb").stat().st_mtime_ns

    resumed = sw.run_sweep(root, "quick", ["digits"], [PAIR], SEEDS, {**PARAMS, "methods": METHODS})

    reference_dir = base / "sequential"
    reference_dir.mkdir()
    for name in TEACHER_ARTIFACTS:
        shutil.copy(run_dir / name, reference_dir / name)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")      # the kernel's torch then runs one thread, as each sweep task does
        reference = run_pipeline(reference_dir, "quick", {**PARAMS, "methods": METHODS, "seeds": SEEDS},
                                 progress=False, notebooks=["05_compare_to_hinton_kd.ipynb"])
    return {"root": root, "run_dir": run_dir, "at_kill": at_kill, "stamps": stamps, "teacher_stamp": teacher_stamp,
            "sweep": resumed, "reference": reference}


def test_sweep_equals_sequential_notebook(swept):
    """Per method and seed, the sweep's final and best accuracies are exactly notebook 5's."""
    sweep, reference = swept["sweep"], swept["reference"]
    assert sweep["status"] == "complete" and not sweep["failures"]
    (cell,) = sweep["cells"]
    results = cell["results"]
    assert list(results["methods"]) == METHODS == list(reference["methods"])
    for method in METHODS:
        ours, seq = results["methods"][method], reference["methods"][method]
        assert ours["final_acc"] == seq["final_acc"] and ours["best_acc"] == seq["best_acc"], method
        assert ours["final_acc_mean"] == seq["final_acc_mean"] and ours["final_acc_std"] == seq["final_acc_std"]
        assert ours["curve"] == seq["curve"] and ours["seeds"] == len(SEEDS)
    assert results["teacher"] == reference["teacher"]
    assert all(r["threads"] == 1 and r["device"] == "cpu" for r in sweep["runs"])
    # collected: sweep.json, sweep.md with the grid row, the per-dataset figure and the combination's own report
    root, run_dir = swept["root"], swept["run_dir"]
    assert json.loads((root / "sweep.json").read_text())["cells"][0]["results"]["methods"]["ce"]["final_acc"] == \
        reference["methods"]["ce"]["final_acc"]
    md = (root / "sweep.md").read_text()
    ce = reference["methods"]["ce"]
    fkd = reference["methods"]["feature_kd"]
    row = (f"| digits | {PAIR} | {100 * reference['teacher']['test_acc']:.2f} | "
           f"{100 * ce['final_acc_mean']:.2f} ± {100 * ce['final_acc_std']:.2f} | "
           f"{100 * fkd['final_acc_mean']:.2f} ± {100 * fkd['final_acc_std']:.2f} "
           f"({100 * (fkd['final_acc_mean'] - ce['final_acc_mean']):+.2f}) |")
    assert row in md, md
    assert (root / "figures" / "digits.png").stat().st_size > 10_000
    assert json.loads((run_dir / "results.json").read_text())["methods"]["feature_kd"]["final_acc"] == \
        fkd["final_acc"]
    assert (run_dir / "figures" / "result_panel.png").is_file()


def test_resume_after_kill(swept):
    """The rerun skipped the finished teacher, reused the finished students untouched, and trained the rest."""
    run_dir, sweep = swept["run_dir"], swept["sweep"]
    assert (run_dir / "executed" / "01_train_teacher.ipynb").stat().st_mtime_ns == swept["teacher_stamp"]
    status = {(r["method"], r["seed"]): r["status"] for r in sweep["runs"]}
    for run, finished in swept["at_kill"].items():
        if finished:
            assert status[run] == "reused", run
            assert student_checkpoint(run_dir, *run).stat().st_mtime_ns == swept["stamps"][run], run
        else:
            assert status[run] in ("trained", "resumed"), (run, status[run])
    assert all(load_checkpoint(student_checkpoint(run_dir, *r))["epoch"] == PARAMS["student_epochs"] for r in RUNS)


def test_failing_task_is_reported_and_the_others_finish(swept):
    """An unreadable checkpoint fails its task, named by combination, method and seed; a deleted one retrains."""
    root, run_dir = swept["root"], swept["run_dir"]
    student_checkpoint(run_dir, "feature_kd", 1).write_bytes(b"not a checkpoint")
    student_checkpoint(run_dir, "ce", 0).unlink()
    argv = ["--preset", "quick", "--root", str(root), "--seeds", *map(str, SEEDS), "--methods", *METHODS,
            "--no-figures", "--no-progress", *[a for k, v in PARAMS.items() for a in ("-p", k, str(v))]]
    assert sw.main(argv) == 1
    sweep = json.loads((root / "sweep.json").read_text())
    (failure,) = sweep["failures"]
    assert (failure["combination"], failure["stage"], failure["method"], failure["seed"]) == \
        (f"digits/{PAIR}", "student", "feature_kd", 1)
    assert "could not read checkpoint" in failure["error"] and "delete it" in failure["error"]
    status = {(r["method"], r["seed"]): r["status"] for r in sweep["runs"]}
    assert status == {("ce", 0): "trained", ("feature_kd", 0): "reused", ("ce", 1): "reused",
                      ("feature_kd", 1): "failed"}
    results = sweep["cells"][0]["results"]
    assert list(results["methods"]) == ["ce"]          # feature_kd lacks a seed: left out, not averaged over one
    assert results["methods"]["ce"]["final_acc"] == swept["reference"]["methods"]["ce"]["final_acc"]
    md = (root / "sweep.md").read_text()
    assert "## Failures" in md and f"| digits | {PAIR} | student | feature_kd | 1 | RuntimeError: could not read" in md


def test_bad_arguments_are_refused_before_anything_runs(ray_session, tmp_path, capsys):
    """Clashing -p keys, GPU shares outside (0, 1] and task shapes no node can host exit with code 2."""
    base = ["--preset", "quick", "--root", str(tmp_path), "--no-progress"]
    for extra, message in ((["-p", "seeds", "[0]"], "--seeds"), (["--gpus-per-student", "0"], "(0, 1]"),
                           (["--threads", "3"], "largest Ray node has 2")):
        with pytest.raises(SystemExit) as exc:
            sw.main(base + extra)
        assert exc.value.code == 2 and message in capsys.readouterr().err, extra
    assert not (tmp_path / "sweep.json").exists()
