"""Runs that went wrong silently (issue 18): the runner's up-front checks, run-directory locks, notebook 6's ties and
the messages of failed runs. No test starts a kernel: papermill.execute_notebook is replaced by a recorder (or by
papermill's own prepare-only mode, which parameterises a notebook without running it)."""
import argparse
import asyncio
import errno
import gc
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import papermill
import pytest
import torch

from kdutils import pipeline, presets, rundir, runtime, validation
from kdutils.notebook import setup

KERNEL = {"name": "python3", "display_name": "Python 3", "language": "python"}


def _notebook(path: Path, params: str | None = 'preset = "auto"\nrun_dir = None\ndataset = None') -> Path:
    """A one-cell-of-work notebook; `params` is its parameters cell (None: the same cell without the tag)."""
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": KERNEL})
    tags = {"tags": ["parameters"]} if params is not None else {}
    nb.cells = [nbformat.v4.new_code_cell(params or 'preset = "auto"\nrun_dir = None', metadata=tags),
                nbformat.v4.new_code_cell("x = 1")]
    nbformat.write(nb, path)
    return path


@pytest.fixture
def executed(monkeypatch):
    """Replaces papermill.execute_notebook: records (notebook name, parameters) and writes the executed copy."""
    calls = []

    def fake(path, output, parameters=None, **kw):
        calls.append((Path(path).name, dict(parameters or {})))
        Path(output).write_text(Path(path).read_text())
    monkeypatch.setattr(papermill, "execute_notebook", fake)
    return calls


@pytest.fixture
def sleeper():
    """A live process that is not an ancestor of this one (it holds locks in the tests)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def _write_lock(folder: Path, pid: int, started: str = "2026-01-02T03:04:05+00:00") -> Path:
    """A lock record as run_lock writes it, for process `pid` on this host."""
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / "run.lock"
    lock.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": started,
                                "command": "python -m kdutils.pipeline --preset quick"}))
    return lock


# ------------------------------------------------------------------------------------------------------------
# item 6: a notebook without a `parameters` cell

def test_a_notebook_without_a_parameters_cell_is_refused_before_any_kernel(tmp_path, executed):
    _notebook(tmp_path / "ok.ipynb")
    _notebook(tmp_path / "untagged.ipynb", params=None)
    with pytest.raises(ValueError, match=r"untagged\.ipynb has no cell tagged `parameters`.*would then win"):
        pipeline.run_pipeline(tmp_path / "run", "quick", {"seeds": [3]}, notebooks_dir=tmp_path,
                              notebooks=["ok.ipynb", "untagged.ipynb"], progress=False)
    assert executed == [] and not (tmp_path / "run").exists()


def test_parameters_are_read_as_papermill_reads_them_without_importing_it(tmp_path):
    from papermill.translators import PythonTranslator
    odd = 'preset = "auto"  # a comment\nseeds: list = [0, 1]\nx = y = 3\nrun_dir = None\n\n\nk = {"a": 1}'
    notebooks = [*sorted(rundir.NOTEBOOKS_DIR.glob("0*.ipynb")), _notebook(tmp_path / "odd.ipynb", odd)]
    for path in notebooks:
        cell = next(c for c in nbformat.read(path, as_version=4).cells if "parameters" in c.metadata.get("tags", []))
        theirs = {p.name: p.default for p in PythonTranslator.inspect(cell)}
        assert pipeline.notebook_parameters(path) == theirs, path.name
    assert pipeline.notebook_parameters(tmp_path / "odd.ipynb") == {"preset": '"auto"', "seeds": "[0, 1]",
                                                                    "run_dir": "None", "k": '{"a": 1}'}
    assert pipeline.notebook_parameters(_notebook(tmp_path / "none.ipynb", params=None)) == {}
    magic = '%config InlineBackend.figure_format = "png"\npreset = "quick"  # IPython syntax: papermill reads it'
    assert pipeline.notebook_parameters(_notebook(tmp_path / "magic.ipynb", magic)) == {"preset": '"quick"'}
    code = ("import sys, kdutils.pipeline as p; from kdutils.rundir import NOTEBOOKS, NOTEBOOKS_DIR; "
            "[p.notebook_parameters(NOTEBOOKS_DIR / n) for n in NOTEBOOKS]; print('nbformat' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


# ------------------------------------------------------------------------------------------------------------
# item 7: one run per run directory

def test_a_second_run_into_a_locked_run_dir_is_refused_naming_the_holder(tmp_path, executed, sleeper):
    _notebook(tmp_path / "a.ipynb")
    lock = _write_lock(tmp_path / "run", sleeper)
    with pytest.raises(RuntimeError, match=rf"in use by another run: process {sleeper} on .* since "
                                           r"2026-01-02T03:04:05") as err:
        pipeline.run_pipeline(tmp_path / "run", "quick", notebooks_dir=tmp_path, notebooks=["a.ipynb"],
                              progress=False)
    assert isinstance(err.value, rundir.RunDirBusy) and str(lock) in str(err.value)
    assert executed == [] and json.loads(lock.read_text())["pid"] == sleeper   # the holder's lock is untouched


def test_the_run_holds_the_lock_and_takes_over_a_dead_processs_lock(tmp_path, monkeypatch, capsys):
    _notebook(tmp_path / "a.ipynb")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = _write_lock(tmp_path / "run", dead.pid)
    seen = []
    monkeypatch.setattr(papermill, "execute_notebook",
                        lambda path, output, **kw: seen.append(json.loads(lock.read_text())))
    pipeline.run_pipeline(tmp_path / "run", "quick", notebooks_dir=tmp_path, notebooks=["a.ipynb"], progress=False)
    assert [r["pid"] for r in seen] == [os.getpid()] and seen[0]["host"] == socket.gethostname()
    assert f"taking over the lock of process {dead.pid}" in capsys.readouterr().out
    assert not lock.exists()                                                    # released at the end


def test_ctrl_c_releases_the_lock(tmp_path, monkeypatch):
    _notebook(tmp_path / "a.ipynb")
    held = []

    def interrupted(path, output, **kw):
        held.append((tmp_path / "run" / "run.lock").is_file())
        raise KeyboardInterrupt
    monkeypatch.setattr(papermill, "execute_notebook", interrupted)
    with pytest.raises(pipeline.PipelineInterrupted):
        pipeline.run_pipeline(tmp_path / "run", "quick", notebooks_dir=tmp_path, notebooks=["a.ipynb"],
                              progress=False)
    assert held == [True] and not (tmp_path / "run" / "run.lock").exists()


def test_a_lock_held_by_an_ancestor_is_reentered_and_kept(tmp_path):
    lock = _write_lock(tmp_path, os.getppid())       # e.g. the pipeline whose notebook runs earlier notebooks
    with rundir.run_lock(tmp_path):
        assert json.loads(lock.read_text())["pid"] == os.getppid()
    assert lock.is_file()                            # the ancestor's lock, not ours to remove


def test_the_sweep_locks_each_combination_and_its_teacher_task_does_not(tmp_path, sleeper, monkeypatch):
    ray = pytest.importorskip("ray")
    from kdutils import sweep as sw
    from kdutils.sweep_tasks import combination_dir, prepare_combination
    monkeypatch.setattr(ray, "init", lambda **kw: pytest.fail("Ray started although a folder is locked"))
    root = tmp_path / "root"
    _write_lock(combination_dir(root, "digits", "resnet18_narrow-resnet10_narrow"), sleeper)
    with pytest.raises(RuntimeError, match=rf"sweep folder .*resnet10_narrow is in use by another run: "
                                           rf"process {sleeper}") as err:
        sw.run_sweep(root, "quick", ["digits"], ["resnet18_narrow-resnet10_narrow"], [0], progress=False)
    assert isinstance(err.value, rundir.RunDirBusy)
    assert not (root / "run.lock").exists()          # the root's lock, taken first, was released again
    calls = []
    monkeypatch.setattr(pipeline, "run_pipeline", lambda *a, **kw: calls.append(kw))
    prepare_combination(str(tmp_path / "combo"), "quick", {}, 1)
    assert calls[0]["lock"] is False                 # the sweep's driver holds the combination's lock


# ------------------------------------------------------------------------------------------------------------
# item 9: mistakes caught before the first kernel, in the user's own spelling

def test_a_missing_relative_dataset_names_the_users_directory(tmp_path, executed, monkeypatch):
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    _notebook(nbs / "a.ipynb")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.raises(FileNotFoundError) as err:
        pipeline.run_pipeline(tmp_path / "run", "quick", {"dataset": "data/subset.npz"}, notebooks_dir=nbs,
                              notebooks=["a.ipynb"], progress=False)
    text = str(err.value)
    assert "'data/subset.npz'" in text and str(elsewhere / "data" / "subset.npz") in text
    assert f"current directory {elsewhere}" in text and str(nbs) not in text
    assert executed == []


@pytest.mark.parametrize("dataset, error, words", [
    ("cifar-1O", ValueError, "is neither a dataset name"),
    ("broken.npz", ValueError, "is not a readable .npz archive"),
    ("labels.npz", ValueError, "y_train must be a 1-D array"),
])
def test_bad_datasets_are_refused_before_any_kernel(tmp_path, executed, monkeypatch, dataset, error, words):
    _notebook(tmp_path / "a.ipynb")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 not really a zip")
    x = np.zeros((20, 8, 8, 3), np.uint8)
    np.savez(tmp_path / "labels.npz", x_train=x, y_train=np.zeros((20, 2), np.int64), x_test=x,
             y_test=np.zeros(20, np.int64))
    with pytest.raises(error, match=words) as err:
        pipeline.run_pipeline(tmp_path / "run", "quick", {"dataset": dataset}, notebooks_dir=tmp_path,
                              notebooks=["a.ipynb"], progress=False)
    assert repr(dataset) in str(err.value) and executed == []


def test_a_pair_that_cannot_take_the_images_is_refused_before_any_kernel(tmp_path, executed):
    _notebook(tmp_path / "a.ipynb")
    with pytest.raises(ValueError, match=r"the teacher vit_b \(pair vitb-vitet\) cannot take the 16x16 images of "
                                         r"dataset 'digits'.*needs image_size 32"):
        pipeline.run_pipeline(tmp_path / "run", "quick", {"pair": "vitb-vitet"}, notebooks_dir=tmp_path,
                              notebooks=["a.ipynb"], progress=False)
    assert executed == []


def test_notebooks_may_be_named_without_ipynb(tmp_path, executed, capsys):
    _notebook(tmp_path / "01_first.ipynb")
    _notebook(tmp_path / "02_second.ipynb")
    code = pipeline.main(["--preset", "quick", "--run-dir", str(tmp_path / "run"), "--notebooks-dir", str(tmp_path),
                          "--notebooks", "01_first", "02_second.ipynb", "--no-progress"])
    assert code == 0 and [name for name, _ in executed] == ["01_first.ipynb", "02_second.ipynb"]
    assert pipeline.main(["--preset", "quick", "--run-dir", str(tmp_path / "run"), "--notebooks-dir",
                          str(tmp_path), "--notebooks", "03_third", "--no-progress"]) == 1
    assert "03_third.ipynb not found in" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------
# item 10: the README's one-seed example

@pytest.mark.parametrize("preset", ["cifar10", "cifar100", "tinyimagenet", "cifar10-cpu", "colab"])
def test_one_seed_is_accepted_by_every_preset(preset):
    config = presets.resolve_config(preset, seeds=[0])
    assert config["seeds"] == [0] and config["validation_seeds"] == 1


def test_too_many_validation_seeds_name_the_fix():
    with pytest.raises(ValueError, match=r"validation_seeds=2 but seeds has 1.*-p validation_seeds 1 .*or more "
                                         r"seeds, e.g. -p seeds \[0,1\]"):
        presets.resolve_config("quick", seeds=[0], validation_seeds=2)
    assert presets.resolve_config("cifar10-cpu", seeds=[4, 5], validation_seeds=2)["validation_seeds"] == 2


# ------------------------------------------------------------------------------------------------------------
# item 11: notebook 6 on ties and undefined correlations

def _study(values, finals, per_seed=None, q_rho=0.5):
    """Notebook 6's tables for given layer values and selection accuracies (the first selection is Q's)."""
    layers = range(len(values))
    table = pd.DataFrame({"value": values, "low": values, "high": values, "value_std": 0.0, "slot": 0,
                          "val_acc": 0.5, "seeds": 2}, index=pd.Index(layers))
    corr = pd.DataFrame({"score": ["Q = S + sqrt(IE)", "depth", "E"], "spearman": [q_rho, 0.5, float("nan")],
                         "ci_low": [0.1, 0.1, float("nan")], "ci_high": [0.9, 0.9, float("nan")], "layers": 4},
                        index=["quality", "depth", "efficiency"])
    diff = pd.DataFrame({"a": "Q = S + sqrt(IE)", "b": ["depth", "E"], "rho_a": q_rho, "rho_b": [0.5, float("nan")],
                         "diff": [q_rho - 0.5, float("nan")], "ci_low": [-0.4, float("nan")],
                         "ci_high": [0.4, float("nan")],
                         "verdict": ["cannot tell (the interval includes 0)",
                                     "undefined: a rho is undefined (a constant score or constant values)"]},
                        index=["depth", "efficiency"])
    held = pd.DataFrame({"score": ["a", "b"], "spearman": [float("nan"), 0.3], "ci_low": 0.0, "ci_high": 1.0,
                         "layers": 4}, index=["quality_train_small", "quality_val"])
    names = ["Q (the paper)", "deepest k", "E only"][:len(finals)]
    per_seed = per_seed or [[f, f] for f in finals]
    compared = pd.DataFrame({"layers": [[i, i + 1] for i in range(len(finals))], "chosen by": names,
                             "test_final": finals, "test_final_std": 0.01, "test_best": finals, "seeds": 2,
                             "final_acc": per_seed})
    return (table, corr, diff, held, compared, validation.selection_comparisons(compared),
            {"Q (the paper)": [0, 1]})


def test_when_every_selection_ties_none_is_called_the_best():
    lines = validation.summary_lines(*_study([0.0] * 4, [0.0955] * 3, q_rho=float("nan")), seeds=2, held_out=True)
    text = "\n".join(lines)
    assert "best one" not in text and "nan" not in text.lower()
    assert "Every selection scores the same (9.55%): a tie" in text
    assert "Every swept teacher layer has the same value (+0.00 points" in text
    assert "undefined: every swept layer has the same value, so there is no order to predict" in text


def test_a_tie_at_the_top_and_a_constant_score_are_stated():
    lines = validation.summary_lines(*_study([0.0, 0.02, -0.01, 0.03], [0.70, 0.70, 0.60]), seeds=2, held_out=True)
    text = "\n".join(lines)
    assert "deepest k +0.00 [+0.00, +0.00] (cannot tell (the interval includes 0))" in text      # a tie is a tie
    assert "E only -10.00 [-10.00, -10.00] (E only below Q (the paper)" in text
    assert "+nan" not in text and "E: undefined: the score is the same for every swept layer" in text
    assert "rho +0.30 vs undefined: the score is the same for every swept layer" in text
    assert "No predictor is separated from Q by this study" in text
    noisy = "\n".join(validation.summary_lines(*_study([0.0, 0.02, -0.01, 0.03], [0.71, 0.70],
                                                       [[0.70, 0.72], [0.71, 0.69]]), seeds=2, held_out=True))
    # +1 point in the mean, but -1 and -3 would be... per seed differences +1, -3: the interval includes 0
    assert "deepest k -1.00" in noisy and "cannot tell (the interval includes 0)" in noisy


# ------------------------------------------------------------------------------------------------------------
# item 12: notebook 6's validation split, checked up front

def test_a_validation_split_too_small_for_notebook_6_is_refused_up_front(tmp_path, executed):
    _notebook(tmp_path / "06_validate_kq.ipynb")
    with pytest.raises(ValueError, match=r"0.1 of 10 training images per class \(per_class 10\) holds out 1 and "
                                         r"keeps 9, but notebook 6 needs at least 2 validation images per class.*"
                                         r"-p per_class 15 or more or -p val_fraction 0.15\."):
        pipeline.run_pipeline(tmp_path / "run", "quick", {"per_class": 10}, notebooks_dir=tmp_path,
                              notebooks=["06_validate_kq"], progress=False)
    assert executed == []
    with pytest.raises(ValueError, match="notebook 6 needs at least 2 validation images per class"):
        setup({"preset": "quick", "run_dir": str(tmp_path / "nb6"), "per_class": 10}, "06_validate_kq.ipynb",
              colab=False)
    assert not (tmp_path / "nb6").exists()            # refused before its inputs were even looked for


# ------------------------------------------------------------------------------------------------------------
# item 14: runs that said less than they did

def test_a_teacher_without_its_imagenet_weights_is_reported_and_recorded(tmp_path, executed, monkeypatch, capsys):
    from kdutils import models

    def offline(weights):
        raise RuntimeError(f"the ImageNet weights {weights} could not be downloaded (offline)")
    monkeypatch.setattr(models, "download_weights", offline)
    config, *_ = setup({"preset": "cifar10", "run_dir": str(tmp_path / "nb")}, "01_train_teacher.ipynb",
                       colab=False)
    assert config["pretrained"] is False and config["pretrained_requested"] is True
    assert presets.config_frame(config).loc["pretrained", "value"] == "False"
    assert "resnet34 is trained from scratch instead" in capsys.readouterr().out
    _notebook(tmp_path / "01_train_teacher.ipynb")
    pipeline.run_pipeline(tmp_path / "run", "cifar10", notebooks_dir=tmp_path, notebooks=["01_train_teacher"],
                          progress=False)
    assert "notebook 1 trains resnet34 from scratch instead" in capsys.readouterr().err and len(executed) == 1


def test_the_runtime_estimate_reads_the_npz_sizes(tmp_path):
    x = np.zeros((100, 32, 32, 3), np.uint8)
    path = tmp_path / "small.npz"
    np.savez(path, x_train=x, y_train=np.arange(100) % 10, x_test=x[:20], y_test=np.arange(20) % 10)
    config = presets.resolve_config("colab", dataset=str(path))
    est = runtime.estimate_runtime(config, "t4")
    f_t = runtime.forward_flops(config["teacher"], 10, config["image_size"])
    assert est["teacher"] == pytest.approx(config["teacher_epochs"] * (3 * 100 + 20) * f_t / 6e12)
    assert est["kq"] == pytest.approx((config["kq_samples"] + 20) * f_t / 6e12)


def test_run_notebook_first_hints_name_the_preset(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"run notebooks/01_train_teacher\.ipynb first \(with preset = "
                                                r"'cifar10-cpu', or the whole pipeline: python -m kdutils.pipeline "
                                                r"--preset cifar10-cpu --run-dir"):
        setup({"preset": "cifar10-cpu", "run_dir": str(tmp_path)}, "03_compute_kq.ipynb", colab=False)


# ------------------------------------------------------------------------------------------------------------
# the smaller ones

def test_ctrl_c_prints_one_line_and_no_asyncio_traceback(monkeypatch, capsys, caplog):
    asyncio_log = logging.getLogger("asyncio")
    monkeypatch.setattr(asyncio_log, "disabled", False)   # restored after the test

    def interrupted(*a, **kw):
        raise pipeline.PipelineInterrupted(["01_train_teacher.ipynb"], "02_probe_layer_geometry.ipynb")
    monkeypatch.setattr(pipeline, "run_pipeline", interrupted)
    assert pipeline.main(["--preset", "quick"]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("interrupted during 02_probe_layer_geometry")

    async def cut_short():                # what papermill's event loop can leave behind after Ctrl-C
        raise RuntimeError("the kernel's reply never came")

    loop = asyncio.new_event_loop()
    task = loop.create_task(cut_short())
    loop.run_until_complete(asyncio.sleep(0.01))
    loop.close()
    with caplog.at_level(logging.ERROR):
        del task                          # its exception was never retrieved: asyncio logs that when collected
        gc.collect()
    assert "never retrieved" not in caplog.text and "never retrieved" not in capsys.readouterr().err


def test_a_read_only_run_dir_is_refused_before_any_kernel(tmp_path, executed, monkeypatch):
    import tempfile
    _notebook(tmp_path / "a.ipynb")

    def read_only(*a, **kw):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    with pytest.raises(RuntimeError, match=r"cannot write into the run directory .*run.executed \(Read-only file "
                                           r"system\): it is not writable .*choose another --run-dir"):
        pipeline.run_pipeline(tmp_path / "run", "quick", notebooks_dir=tmp_path, notebooks=["a.ipynb"],
                              progress=False)
    assert executed == []


def test_a_full_disk_is_reported_without_cell_none_or_a_copy_that_was_not_written(tmp_path, monkeypatch):
    _notebook(tmp_path / "a.ipynb")

    def full(path, output, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", str(output))
    monkeypatch.setattr(papermill, "execute_notebook", full)
    with pytest.raises(pipeline.NotebookFailed) as err:
        pipeline.run_pipeline(tmp_path / "run", "quick", notebooks_dir=tmp_path, notebooks=["a.ipynb"],
                              progress=False)
    text = str(err.value)
    assert "cell None" not in text and "a.ipynb failed outside its cells" in text
    assert "No space left on device" in text and "free space, or choose another --run-dir" in text
    assert "no executed copy was written" in text and "traceback in the executed copy" not in text
    assert "kernel's log" not in text                 # it was never written either


def test_the_divergence_hint_suggests_the_presets_learning_rate(tmp_path):
    from kdutils.data import load_dataset
    from kdutils.models import build_model
    from kdutils.train import TrainingDiverged, fit
    x = np.random.default_rng(0).integers(0, 255, (40, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "tiny.npz", x_train=x, y_train=np.arange(40) % 10, x_test=x[:10], y_test=np.arange(10))
    data = load_dataset(tmp_path / "tiny.npz")
    steps = []

    def exploding(model, xb, yb, idx):
        logits = model(xb)
        steps.append(1)
        loss = torch.nn.functional.cross_entropy(logits, yb)
        return (loss * 1e6 if len(steps) > 1 else loss), logits
    for lr, hint in ((1000.0, "-p student_lr 0.0075, the presets' value for resnet10_narrow"),
                     (0.005, "-p student_lr 0.0005, a tenth of it")):
        steps.clear()
        torch.manual_seed(0)
        model = build_model("resnet10_narrow", 10, image_size=8)
        with pytest.raises(TrainingDiverged) as err:
            fit(model, data, epochs=1, lr=lr, batch_size=8, loss_fn=exploding, lr_name="student_lr",
                device="cpu", progress=False)
        assert hint in str(err.value), str(err.value)


def test_a_refused_pickle_says_delete_and_retrain_not_weights_only_false(tmp_path):
    from kdutils.checkpoints import load_checkpoint
    path = tmp_path / "foreign.pt"
    torch.save({"model": {}, "args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(RuntimeError) as err:
        load_checkpoint(path)
    text = str(err.value)
    assert "weights_only" not in text and "delete it and train again" in text and "argparse.Namespace" in text


def test_papermill_warns_of_no_unknown_parameter_in_a_normal_run(tmp_path, monkeypatch, caplog):
    _notebook(tmp_path / "a.ipynb", params='preset = "auto"\nrun_dir = None')
    real = papermill.execute_notebook
    monkeypatch.setattr(papermill, "execute_notebook",        # papermill's own code, minus the kernel
                        lambda *a, **kw: real(*a, **{**kw, "prepare_only": True}))
    with caplog.at_level(logging.WARNING, logger="papermill"):
        pipeline.run_pipeline(tmp_path / "run", "quick", {"student_epochs": 2, "seeds": [1]},
                              notebooks_dir=tmp_path, notebooks=["a.ipynb"], progress=False)
    executed = nbformat.read(tmp_path / "run" / "executed" / "a.ipynb", as_version=4)
    assert "student_epochs = 2" in executed.cells[1].source        # papermill did inject the parameters
    assert "Passed unknown parameter" not in caplog.text
    logging.getLogger("papermill").warning("Passed unknown parameter: x")   # outside a run: papermill's own
    assert "Passed unknown parameter: x" in caplog.text
