"""Tests of the series' settings (kdutils.presets), run-directory artifacts and manifests (kdutils.rundir), result
tables (kdutils.results), and the papermill runner and its CLI (kdutils.pipeline)."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch

from kdutils import models, pipeline, presets, rundir
from kdutils.distill import METHODS, REGISTRY
from kdutils.pipeline import NotebookFailed, current_kernel_name, main, parse_value, run_pipeline
from kdutils.presets import PRESETS, config_overrides, resolve_config
from kdutils.results import difference, results_markdown, summarize_runs, verdicts
from kdutils.rundir import git_commit, require_artifact, write_json_atomic, write_manifest


# ------------------------------------------------------------------------------------------------------------
# presets and overrides

def test_every_preset_resolves_to_the_same_keys():
    from kdutils.models import MODELS
    assert set(models.PEAK_LR) == set(MODELS)  # every model has a peak LR, every LR a model
    keys = {"preset", *presets.PARAMETERS}
    for name in PRESETS:
        config = resolve_config(name)
        assert set(config) == keys, name
        assert config["preset"] == name
        assert config["teacher_lr"] == models.PEAK_LR[config["teacher"]]
        assert config["student_lr"] == models.PEAK_LR[config["student"]]


def test_preset_values():
    quick = resolve_config("quick")
    assert (quick["dataset"], quick["teacher"], quick["student"]) == ("digits", "resnet18_narrow", "resnet10_narrow")
    assert quick["seeds"] == [0] and quick["teacher_lr"] == quick["student_lr"] == 0.0075
    assert quick["methods"] == ["ce", "hinton_kd", "feature_kd", "feature_kd_ce", "standard_layers", "fitnets_kd_nokl"]
    assert (quick["pretrained"], quick["augment"], quick["batch_size"], quick["k"]) == (False, False, 128, 4)
    cpu = resolve_config("cifar10-cpu")
    assert cpu["dataset"] == "cifar10-subset" and cpu["seeds"] == [0, 1, 2] and cpu["teacher"] == "resnet18_narrow"
    assert cpu["per_class"] is None and quick["per_class"] is None
    assert (cpu["teacher_augment"], cpu["augment"], quick["teacher_augment"]) == (True, False, False)   # teacher only
    for name, dataset, size in [("cifar10", "cifar10", 32), ("cifar100", "cifar100", 32),
                                ("tinyimagenet", "tinyimagenet", 64)]:
        paper = resolve_config(name)
        assert (paper["dataset"], paper["image_size"], paper["pair"]) == (dataset, size, "resnet34-resnet9")
        assert (paper["teacher_epochs"], paper["student_epochs"], paper["seeds"]) == (50, 50, [0, 1, 2])
        assert paper["pretrained"] and not paper["augment"]
        assert paper["methods"] == ["ce", "feature_kd", "hinton_kd", "hinton_kd_std", "fitnets_kd", "fitnets_fc_kd",
                                    "sp_kd", "simkd", "semckd"]


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "tinyimagenet"])
def test_paper_presets_match_method_md_literally(name):
    """METHOD.md sections 3.1, 5 and 7, written out here as literals (not read back from kdutils' own tables)."""
    import inspect
    from kdutils import distill, train
    config = resolve_config(name)
    assert (config["weight_decay"], config["batch_size"]) == (0.01, 128)              # AdamW wd 0.01, batch 128
    assert (config["teacher_epochs"], config["student_epochs"]) == (50, 50)
    assert config["backbone_lr_scale"] == 0.01 and config["pretrained"] is True        # fine-tuned ImageNet teacher
    assert config["kq_samples"] == 5000 and config["k"] == 4
    assert config["kq_per_class"] == (50 if name == "tinyimagenet" else 500)          # CNN teacher on TIN: 50
    assert config["augment"] is False and config["seeds"] == [0, 1, 2]
    assert (config["teacher"], config["student"], config["teacher_lr"], config["student_lr"]) == \
        ("resnet34", "resnet9", 0.0075, 0.0075)                                          # MaxLR peaks
    assert train.ONE_CYCLE_PCT_START == 0.3
    assert distill.REGISTRY["hinton_kd"].temperature == 4.0 and distill.REGISTRY["hinton_kd_t2"].temperature == 2.0
    z, zt = torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]])         # the weight is T^2: 16 at T = 4
    assert distill.kd_loss(z, zt, 4.0).item() == pytest.approx(16 * distill.kd_loss(z, zt, 4.0).item() / 16)
    assert distill.kd_loss(z, zt, 4.0).item() / torch.nn.functional.kl_div(
        torch.log_softmax(z / 4, 1), torch.softmax(zt / 4, 1), reduction="batchmean").item() == pytest.approx(16.0)
    assert inspect.signature(train.fit).parameters["weight_decay"].default == 0.01
    peaks = {pair: (resolve_config(name, pair=pair)["teacher_lr"], resolve_config(name, pair=pair)["student_lr"])
             for pair in ("vgg19-vgg11", "resnet34-mobilenetv2", "vitb-vitet")}
    assert peaks == {"vgg19-vgg11": (0.005, 0.005), "resnet34-mobilenetv2": (0.0075, 0.0075),
                     "vitb-vitet": (0.0001, 0.001)}


def test_auto_is_quick_on_cpu_and_cifar10_with_cuda(monkeypatch):
    assert not torch.cuda.is_available()  # this test machine
    assert resolve_config()["preset"] == "quick"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_config("auto")["preset"] == "cifar10"


def test_auto_is_colab_on_colab(monkeypatch, capsys):
    import types
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))   # simulated Colab
    assert resolve_config()["preset"] == "colab" and resolve_config(colab=False)["preset"] == "quick"
    colab = resolve_config("colab")
    assert (colab["dataset"], colab["pair"], colab["pretrained"], colab["per_class"]) == \
        ("cifar10", "resnet34-resnet9", True, None)
    assert 1 <= len(colab["seeds"]) <= 2 and colab["teacher_epochs"] < 50 and colab["student_epochs"] < 50
    # the CLI prints the (labelled) estimate of a GPU preset before it starts
    assert main(["--preset", "cifar10", "--notebooks-dir", "/nonexistent"]) == 1
    assert "Estimated time of the whole series for preset cifar10 (an estimate, NOT measured" in \
        capsys.readouterr().out


def test_overrides_apply_and_leave_presets_untouched():
    config = resolve_config("quick", student_epochs=2, seeds=(1, 2), teacher_lr=1, per_class=50)
    assert config["student_epochs"] == 2 and config["seeds"] == [1, 2] and config["per_class"] == 50
    assert config["teacher_lr"] == 1.0 and isinstance(config["teacher_lr"], float)
    assert config["teacher_epochs"] == PRESETS["quick"]["teacher_epochs"]
    config["methods"].append("fitnets_kd")
    assert "fitnets_kd" not in PRESETS["quick"]["methods"]
    assert resolve_config("cifar10", dataset="tinyimagenet")["image_size"] == 64
    assert resolve_config("tinyimagenet", dataset="cifar100")["image_size"] == 32


def test_pair_override_sets_models_and_learning_rates():
    vit = resolve_config("cifar10", pair="vitb-vitet")
    assert (vit["teacher"], vit["student"], vit["teacher_lr"], vit["student_lr"]) == ("vit_b", "vit_et", 1e-4, 1e-3)
    vgg = resolve_config("cifar100", pair="vgg19-vgg11")
    assert (vgg["teacher"], vgg["student"], vgg["teacher_lr"], vgg["student_lr"]) == \
        ("vgg19_bn", "vgg11_bn", 0.005, 0.005)
    assert resolve_config("cifar10", pair="vgg19-vgg11", student_lr=0.002)["student_lr"] == 0.002
    mnv2 = resolve_config("cifar10", student="mobilenet_v2")
    assert (mnv2["pair"], mnv2["teacher"], mnv2["student_lr"]) == ("resnet34-mobilenetv2", "resnet34", 0.0075)
    custom = resolve_config("cifar10", teacher="vgg19_bn")
    assert (custom["pair"], custom["teacher_lr"], custom["student_lr"]) == ("vgg19_bn-resnet9", 0.005, 0.0075)


@pytest.mark.parametrize("preset, overrides, words", [
    ("quick", {"student_epoch": 2}, ["student_epoch", "student_epochs", "kq_samples"]),
    ("cifar-10", {}, ["cifar-10", "cifar10-cpu", "tinyimagenet", "auto"]),
    ("quick", {"pair": "resnet50-resnet9"}, ["resnet50-resnet9", "vgg19-vgg11"]),
    ("quick", {"seeds": 3}, ["seeds", "list"]),
    ("quick", {"teacher_epochs": 0}, ["teacher_epochs", "positive int"]),
    ("quick", {"augment": "yes"}, ["augment", "True or False"]),
    ("quick", {"methods": ["ce", "kd"]}, ["'kd'", "hinton_kd"]),
    ("quick", {"seeds": [0, "1"]}, ["seeds", "ints"]),
    ("quick", {"teacher": "resnet50"}, ["unknown teacher model", "resnet50", "resnet34"]),
])
def test_bad_configs_raise_with_the_fix(preset, overrides, words):
    with pytest.raises(ValueError) as err:
        resolve_config(preset, **overrides)
    for word in words:
        assert word in str(err.value)


def test_config_overrides_picks_set_preset_keys_only():
    namespace = {"preset": "quick", "student_epochs": None, "seeds": [1], "k": 2, "x": 5, "run_dir": "r"}
    assert config_overrides(namespace) == {"seeds": [1], "k": 2}


# ------------------------------------------------------------------------------------------------------------
# artifacts and manifests

def test_write_json_atomic_round_trip(tmp_path):
    path = write_json_atomic(tmp_path / "sub" / "a.json", {"x": [1, 2.5], "p": Path("a/b")})
    assert json.loads(path.read_text()) == {"x": [1, 2.5], "p": "a/b"}
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.json"]  # no temporary file left behind


def test_require_artifact(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing .*teacher\.pt: run notebooks/01_train_teacher\.ipynb first"):
        require_artifact(tmp_path / "teacher.pt", "01_train_teacher.ipynb")
    (tmp_path / "teacher.pt").write_bytes(b"w")
    assert require_artifact(str(tmp_path / "teacher.pt"), "01_train_teacher.ipynb") == tmp_path / "teacher.pt"


def test_write_manifest_records_config_versions_and_hashes(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "teacher").mkdir(parents=True)
    weights = run_dir / "teacher" / "teacher.pt"
    weights.write_bytes(b"not really weights")
    outside = tmp_path / "metrics.json"
    outside.write_text("{}")
    config = resolve_config("quick", seeds=[3, 4])
    path = write_manifest(run_dir, "01_train_teacher.ipynb", config, {"teacher": weights, "metrics": outside})
    assert path == run_dir / "manifests" / "01_train_teacher.json"
    manifest = json.loads(path.read_text())
    assert manifest["notebook"] == "01_train_teacher.ipynb" and manifest["config"] == config
    assert manifest["seeds"] == [3, 4] and manifest["preset"] == "quick" and manifest["device"] == "cpu"
    assert manifest["versions"]["torch"] == torch.__version__ and manifest["versions"]["numpy"] == np.__version__
    assert {"python", "torchvision", "timm"} <= set(manifest["versions"])
    assert manifest["artifacts"]["teacher"] == {"path": "teacher/teacher.pt", "bytes": 18,
                                                "sha256": hashlib.sha256(b"not really weights").hexdigest()}
    assert manifest["artifacts"]["metrics"]["path"] == str(outside.resolve())
    assert manifest["created"].endswith("+00:00")
    with pytest.raises(FileNotFoundError, match="run notebooks/01_train_teacher.ipynb first"):
        write_manifest(run_dir, "01_train_teacher.ipynb", config, {"kq": run_dir / "kq.json"})


def test_git_commit_reports_commit_and_dirty_state(tmp_path):
    assert git_commit(tmp_path) is None  # not a repository
    git = lambda *a: subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t",  # noqa
                                     *a], check=True, capture_output=True, text=True).stdout.strip()
    git("init", "-q")
    (tmp_path / "f.txt").write_text("x")
    git("add", "f.txt")
    git("commit", "-q", "-m", "c")
    assert git_commit(tmp_path) == {"commit": git("rev-parse", "HEAD"), "dirty": False}
    (tmp_path / "f.txt").write_text("y")
    assert git_commit(tmp_path)["dirty"] is True


# ------------------------------------------------------------------------------------------------------------
# results

def _history(accs: list[float], seconds: list[float]) -> list[dict]:
    return [{"epoch": e, "loss": 1.0 / e, "train_acc": a, "test_acc": a, "seconds": s}
            for e, (a, s) in enumerate(zip(accs, seconds), 1)]


RUNS = {
    "ce": [_history([0.50, 0.85, 0.80], [1, 2, 3]), _history([0.60, 0.70, 0.90], [2, 2, 2])],
    "feature_kd": [_history([0.70, 0.86, 0.88], [4, 4, 4]), _history([0.80, 0.86, 0.92], [4, 4, 4])],
    "hinton_kd": [_history([0.40, 0.60, 0.70], [1, 1, 1])],
}


def test_summarize_runs_numbers():
    results = summarize_runs(RUNS, teacher={"model": "resnet18_narrow", "test_acc": 0.975, "other": 1},
                             preset="quick", dataset="digits")
    assert set(results) == {"preset", "dataset", "teacher", "methods"}
    assert results["teacher"] == {"model": "resnet18_narrow", "test_acc": 0.975}
    assert (results["preset"], results["dataset"]) == ("quick", "digits")
    ce, fkd, hinton = (results["methods"][m] for m in ("ce", "feature_kd", "hinton_kd"))
    assert {"final_acc_mean", "final_acc_std", "best_acc_mean", "best_acc_std", "seeds", "seconds"} <= set(ce)
    assert ce["final_acc"] == [0.80, 0.90] and ce["best_acc"] == [0.85, 0.90]
    assert ce["final_acc_mean"] == pytest.approx(0.85) and ce["final_acc_std"] == pytest.approx(0.1 / 2 ** 0.5)
    assert ce["best_acc_mean"] == pytest.approx(0.875) and ce["best_acc_std"] == pytest.approx(0.05 / 2 ** 0.5)
    assert ce["final_acc_std"] == pytest.approx(np.std([0.8, 0.9], ddof=1))
    assert ce["seconds"] == pytest.approx(6.0) and ce["seeds"] == 2
    assert ce["curve"] == pytest.approx([0.55, 0.775, 0.85]) and ce["epochs"] == [1, 2, 3]
    assert fkd["final_acc_mean"] == pytest.approx(0.90) and fkd["final_acc_std"] == pytest.approx(0.04 / 2 ** 0.5)
    assert fkd["best_acc_mean"] == pytest.approx(0.90) and fkd["seconds"] == pytest.approx(12.0)
    assert (hinton["final_acc_mean"], hinton["final_acc_std"], hinton["best_acc_std"]) == (0.70, 0.0, 0.0)
    assert (hinton["seeds"], hinton["best_acc_mean"]) == (1, 0.70)
    assert (ce["epochs_to_ce_final"], fkd["epochs_to_ce_final"], hinton["epochs_to_ce_final"]) == (3, 2, None)
    json.dumps(results)  # plain JSON data

    no_ce = summarize_runs({"hinton_kd": RUNS["hinton_kd"]}, teacher={"model": "t", "test_acc": 0.9},
                           preset="quick", dataset="digits")
    assert no_ce["methods"]["hinton_kd"]["epochs_to_ce_final"] is None


def test_summarize_runs_rejects_ragged_or_empty_runs():
    with pytest.raises(ValueError, match="different lengths"):
        summarize_runs({"ce": [_history([0.5, 0.6], [1, 1]), _history([0.5], [1])]},
                       teacher={"model": "t", "test_acc": 0.9}, preset="quick", dataset="digits")
    with pytest.raises(ValueError, match="'ce'"):
        summarize_runs({"ce": []}, teacher={"model": "t", "test_acc": 0.9}, preset="quick", dataset="digits")


def test_results_markdown_shows_percentages_gains_and_teacher():
    table = results_markdown(summarize_runs(RUNS, teacher={"model": "resnet18_narrow", "test_acc": 0.975},
                                            preset="quick", dataset="digits"))
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert set(rows) == {"method", "ce", "feature_kd", "hinton_kd"}
    assert "| Student | 85.00 ± 7.07 | 87.50 ± 3.54 |  | 3 | 2 |  | 6.0 |" in rows["ce"]      # no params recorded
    assert "| Ours | 90.00 ± 2.83 | 90.00 ± 2.83 | +5.00 | 2 | 2 |  | 12.0 |" in rows["feature_kd"]
    assert "| Van. KD | 70.00 (1 seed) | 70.00 (1 seed) | -15.00 | never | 1 |  | 3.0 |" in rows["hinton_kd"]
    assert "`resnet18_narrow`: 97.50%" in table and "`quick`" in table and "`digits`" in table


# ------------------------------------------------------------------------------------------------------------
# command line

@pytest.mark.parametrize("text, value", [
    ("True", True), ("False", False), ("None", None), ("3", 3), ("-2", -2), ("0.5", 0.5), ("1e-3", 1e-3),
    ("[0,1,2]", [0, 1, 2]), ("[0, 1]", [0, 1]), ("[ce, hinton_kd]", ["ce", "hinton_kd"]),
    ('["ce"]', ["ce"]), ('{"a": 1}', {"a": 1}), ("cifar10", "cifar10"), ("../data/c.npz", "../data/c.npz"),
    ("true", "true"),
])
def test_parse_value_like_papermill(text, value):
    parsed = parse_value(text)
    assert parsed == value and type(parsed) is type(value)


def test_parse_value_rejects_broken_lists():
    with pytest.raises(ValueError, match="could not parse"):
        parse_value("[0, 1")


def test_cli_arguments():
    args = pipeline.build_parser().parse_args(["-p", "seeds", "[0,1]", "-p", "student_epochs", "2",
                                               "--run-dir", "runs/x"])
    assert args.preset == "auto" and args.run_dir == Path("runs/x") and args.notebooks is None   # the five
    assert not args.validate_kq and pipeline.build_parser().parse_args(["--validate-kq"]).validate_kq
    assert {k: parse_value(v) for k, v in args.parameter} == {"seeds": [0, 1], "student_epochs": 2}
    with pytest.raises(SystemExit):
        pipeline.build_parser().parse_args(["--preset", "imagenet"])


def test_list_presets(capsys):
    assert main(["--list-presets"]) == 0
    out = capsys.readouterr().out
    for word in [*PRESETS, *presets.PAIRS, *METHODS, *presets.PARAMETERS]:
        assert word in out
    assert "seeds=[0,1,2]" in out and "teacher_epochs=50" in out


# ------------------------------------------------------------------------------------------------------------
# the papermill runner, on tiny generated notebooks

RESULTS = {"preset": "quick", "dataset": "digits", "teacher": {"model": "t", "test_acc": 0.9},
           "methods": {"ce": {"final_acc_mean": 0.5, "final_acc_std": 0.0, "best_acc_mean": 0.6,
                              "best_acc_std": 0.0, "seeds": 1, "seconds": 1.0}}}


def _notebook(path: Path, *cells: str) -> None:
    """Write a notebook: a markdown title, a `parameters` cell, then the given code cells."""
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                           "language": "python"}})
    params = 'preset = "auto"\nrun_dir = None\nstudent_epochs = None\nflavour = "plain"'
    nb.cells = [nbformat.v4.new_markdown_cell(f"# {path.stem}"),
                nbformat.v4.new_code_cell(params, metadata={"tags": ["parameters"]}),
                *(nbformat.v4.new_code_cell(c) for c in cells)]
    nbformat.write(nb, path)


@pytest.fixture(scope="module")
def notebooks_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("notebooks")
    _notebook(folder / "a.ipynb", "import json, os, sys\nfrom pathlib import Path",
              "seen = dict(preset=preset, run_dir=run_dir, student_epochs=student_epochs, flavour=flavour,\n"
              "            executable=sys.executable, cwd=os.getcwd())\n"
              "Path(run_dir, 'a.json').write_text(json.dumps(seen))")
    _notebook(folder / "fail.ipynb", "x = 1", "# the failing cell\nraise ValueError('boom')")
    _notebook(folder / "z.ipynb", "import json\nfrom pathlib import Path",
              f"results = {RESULTS!r}\nresults['preset'] = preset\n"
              "Path(run_dir, 'results.json').write_text(json.dumps(results))")
    return folder


def test_kernel_runs_this_interpreter():
    assert current_kernel_name() == "python3"
    assert pipeline._launches_current_python(["python", "-m", "ipykernel_launcher"])
    assert pipeline._launches_current_python([sys.executable])
    assert pipeline._launches_current_python([str(Path(sys.executable).parent / "python3")])
    assert not pipeline._launches_current_python(["/opt/elsewhere/bin/python3"])


def test_run_pipeline_success(notebooks_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    results = run_pipeline(run_dir, "quick", {"student_epochs": 2, "flavour": "salty"}, notebooks_dir=notebooks_dir,
                           notebooks=["a.ipynb", "z.ipynb"], progress=False)
    assert results == {**RESULTS, "preset": "quick"} == json.loads((run_dir / "results.json").read_text())
    assert (run_dir / "results.md").read_text() == results_markdown(results)
    assert "| ce | Student | 50.00 (1 seed) | 60.00 (1 seed) |" in capsys.readouterr().out
    seen = json.loads((run_dir / "a.json").read_text())
    assert seen == {"preset": "quick", "run_dir": str(run_dir.resolve()), "student_epochs": 2, "flavour": "salty",
                    "executable": sys.executable, "cwd": str(notebooks_dir.resolve())}
    for name in ("a.ipynb", "z.ipynb"):
        executed = nbformat.read(run_dir / "executed" / name, as_version=4)
        assert not [o for c in executed.cells if c.cell_type == "code" for o in c.outputs
                    if o.output_type == "error"]
        assert all(c.get("execution_count") for c in executed.cells if c.cell_type == "code")


def test_each_notebook_gets_its_own_prestarted_kernel(tmp_path, monkeypatch):
    folder = tmp_path / "nbs"
    folder.mkdir()
    probe = ("import json, os, sys\nfrom pathlib import Path\n"
             "names = sorted(n for n in globals() if not n.startswith('_'))\n"
             "Path(run_dir, Path(os.getcwd()).name + str(len(list(Path(run_dir).glob('*.json')))) + '.json')"
             ".write_text(json.dumps({'pid': os.getpid(), 'names': names,\n"
             "                        'imported': [m for m in pipeline_imports if m in sys.modules]}))")
    for name in ("one", "two"):
        _notebook(folder / f"{name}.ipynb", f"pipeline_imports = {list(pipeline.PRESTART_IMPORTS)!r}", probe)
    started = []
    real = pipeline._prestarted_kernel
    monkeypatch.setattr(pipeline, "_prestarted_kernel", lambda *a: started.append(real(*a)) or started[-1])
    run_dir = tmp_path / "run"
    run_pipeline(run_dir, "quick", notebooks_dir=folder, notebooks=["one", "two"], progress=False)
    seen = [json.loads((run_dir / f"nbs{i}.json").read_text()) for i in range(2)]
    assert seen[0]["pid"] != seen[1]["pid"]              # a fresh process per notebook
    for s in seen:    # the course's modules were imported before the first cell, none of their names bound
        assert s["imported"] == list(pipeline.PRESTART_IMPORTS)
        assert not {"torch", "kdutils", "matplotlib", "plt"} & set(s["names"])
    assert len(started) == 2 and all(m is not None and not m.has_kernel for m in started)  # all shut down


def test_kernels_are_shut_down_when_a_notebook_fails(notebooks_dir, tmp_path, monkeypatch):
    started = []
    real = pipeline._prestarted_kernel
    monkeypatch.setattr(pipeline, "_prestarted_kernel", lambda *a: started.append(real(*a)) or started[-1])
    with pytest.raises(NotebookFailed):
        run_pipeline(tmp_path / "run", "quick", notebooks_dir=notebooks_dir,
                     notebooks=["fail.ipynb", "a.ipynb", "z.ipynb"], progress=False)
    assert len(started) == 2 and not any(m.has_kernel for m in started)  # fail's and a's (started ahead)


def test_a_kernel_that_cannot_prestart_is_left_to_papermill(tmp_path):
    class Broken:
        def __init__(self, kernel_name: str):
            self.kernel_name = kernel_name

        async def start_kernel(self, **kw):
            raise OSError("no such kernel")
    assert pipeline._prestarted_kernel(Broken, "python3", tmp_path) is None
    pipeline._shut_down(None)   # a no-op


def test_relative_dataset_paths_are_resolved_from_the_callers_directory(tmp_path, monkeypatch):
    folder = tmp_path / "nbs"
    folder.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell('run_dir = None\ndata_root = None', metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("import json\nfrom pathlib import Path\n"
                                          "Path(run_dir, 'p.json').write_text(json.dumps({'dataset': dataset, "
                                          "'data_root': data_root}))")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, folder / "p.ipynb")
    monkeypatch.chdir(tmp_path)
    # a partial series (no notebook 5) writes no results.json and returns no table
    assert run_pipeline(tmp_path / "run", "quick", {"dataset": "sub/x.npz", "data_root": "datasets"},
                        notebooks_dir=folder, notebooks=["p.ipynb"], progress=False) == {}
    seen = json.loads((tmp_path / "run" / "p.json").read_text())
    assert seen == {"dataset": str(tmp_path / "sub" / "x.npz"), "data_root": str(tmp_path / "datasets")}
    same = {"dataset": "cifar10", "data_root": "/abs/data"}
    assert pipeline.absolute_paths(same) == same and pipeline.absolute_paths({"seeds": [0]}) == {"seeds": [0]}


def test_run_pipeline_stops_at_the_failing_cell(notebooks_dir, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(NotebookFailed) as err:
        run_pipeline(run_dir, "quick", notebooks_dir=notebooks_dir, notebooks=["a.ipynb", "fail.ipynb", "z.ipynb"],
                     progress=False)
    failed = err.value
    assert (failed.notebook, failed.cell_index, failed.ename, failed.evalue) == ("fail.ipynb", 3, "ValueError", "boom")
    assert failed.executed_cell_index == 4  # papermill's index also counts its injected-parameters cell
    assert failed.executed == run_dir.resolve() / "executed" / "fail.ipynb" and failed.executed.exists()
    assert "fail.ipynb failed in cell 3 ('# the failing cell'): ValueError: boom" in str(failed)
    assert (run_dir / "executed" / "a.ipynb").exists()
    assert not (run_dir / "executed" / "z.ipynb").exists() and not (run_dir / "results.json").exists()
    assert not (run_dir / "results.md").exists()


def test_cli_exit_code_and_message_on_failure(notebooks_dir, tmp_path, capsys):
    code = main(["--preset", "quick", "--run-dir", str(tmp_path / "cli"), "--notebooks-dir", str(notebooks_dir),
                 "--notebooks", "fail.ipynb", "--no-progress"])
    assert code == 1
    err = capsys.readouterr().err
    assert "error: fail.ipynb failed in cell 3" in err and "ValueError: boom" in err


def test_run_pipeline_checks_inputs_before_running(notebooks_dir, tmp_path):
    run_dir = tmp_path / "never"
    with pytest.raises(ValueError, match="unknown parameter.*flavor.*flavour"):
        run_pipeline(run_dir, "quick", {"flavor": "x"}, notebooks_dir=notebooks_dir, notebooks=["a.ipynb"])
    with pytest.raises(ValueError, match="student_epochs must be a positive int"):
        run_pipeline(run_dir, "quick", {"student_epochs": 0}, notebooks_dir=notebooks_dir, notebooks=["a.ipynb"])
    with pytest.raises(ValueError, match="run_dir"):
        run_pipeline(run_dir, "quick", {"run_dir": "x"}, notebooks_dir=notebooks_dir, notebooks=["a.ipynb"])
    with pytest.raises(FileNotFoundError, match="missing.ipynb"):
        run_pipeline(run_dir, "quick", notebooks_dir=notebooks_dir, notebooks=["a.ipynb", "missing.ipynb"])
    assert not run_dir.exists()
    with pytest.raises(SystemExit) as exit_:
        main(["--preset", "quick", "--notebooks-dir", str(notebooks_dir), "--notebooks", "a.ipynb",
              "-p", "student_epoch", "2"])
    assert exit_.value.code == 2


def _results(rows, teacher_acc=0.9):
    """results with given (final accuracies per seed) per method, 2 epochs each."""
    runs = {m: [[{"epoch": 1, "loss": 1, "train_acc": 0, "test_acc": a / 2, "seconds": 1},
                 {"epoch": 2, "loss": 1, "train_acc": 0, "test_acc": a, "seconds": 1}] for a in accs]
            for m, accs in rows.items()}
    return summarize_runs(runs, teacher={"model": "t", "test_acc": teacher_acc}, preset="quick", dataset="d")


def test_differences_and_verdicts_state_both_effects_with_their_interval():
    results = _results({"ce": [0.50, 0.52], "feature_kd": [0.60, 0.62], "standard_layers": [0.55, 0.58],
                        "fitnets_kd_nokl": [0.56, 0.57], "feature_kd_ce": [0.40, 0.41]})
    d = difference(results, "feature_kd", "ce")             # per-seed differences 10, 10: no spread at all
    assert d["points"] == pytest.approx(10.0) and (d["low"], d["high"]) == pytest.approx((10.0, 10.0))
    assert d["verdict"] == "feature_kd above ce (the interval excludes 0)"
    tie = difference(results, "standard_layers", "fitnets_kd_nokl")   # -1, +1: t(0.975, 1) = 12.71
    assert (tie["low"], tie["high"]) == pytest.approx((-12.706, 12.706), abs=1e-3)
    assert tie["verdict"] == "cannot tell (the interval includes 0)"
    assert difference(results, "feature_kd_ce", "ce")["verdict"] == "feature_kd_ce below ce (the interval excludes 0)"
    lines = verdicts(results)
    assert lines[0].startswith("Teacher t: 90.00%. Ranking by final-epoch accuracy (2 seeds): feature_kd 61.00%")
    assert any(line.startswith("Effect of layer choice") and "feature_kd - standard_layers = +4.50 points" in line
               and "95% CI" in line for line in lines)
    assert any(line.startswith("Effect of removing CE from the backbone, standard layers") and "+0.00" in line
               and "cannot tell" in line for line in lines)
    assert not any("not better than" in line for line in lines)
    one = _results({"ce": [0.9], "feature_kd": [0.8]}, teacher_acc=0.85)
    lines = verdicts(one)
    assert "(1 seed)" in lines[0] and any("one seed: no interval" in line for line in lines)
    assert any("is not better than the ce student" in line for line in lines)
    assert "± 0.00" not in results_markdown(one)


def test_long_schedule_recipe():
    config = resolve_config("cifar10", schedule="long")
    assert (config["student_epochs"], config["student_lr"]) == (240, 0.05)
    assert presets.student_recipe(config) == {"epochs": 240, "lr": 0.05, "schedule": "long", "weight_decay": 5e-4}
    assert resolve_config("cifar10", pair="vgg19-vgg11", schedule="long")["student_lr"] == 0.01
    assert resolve_config("cifar10", schedule="long", student_epochs=30)["student_epochs"] == 30
    assert presets.student_recipe(resolve_config("quick"))["weight_decay"] == 0.01
    with pytest.raises(ValueError, match="unknown schedule 'cosine'"):
        resolve_config("quick", schedule="cosine")


def _row(epoch, acc, cos=None, mse=(0.5, 0.4)):
    monitor = {"feature_mse": list(mse), "feature_cka": [0.9, 0.8]}
    if cos is not None:
        monitor["grad_cosine"] = {"layer 1": cos, "layer 2": -cos}
    return {"epoch": epoch, "loss": 1.0, "train_acc": acc, "test_acc": acc, "seconds": 1.0,
            "terms": {"ce": 0.6, "feature": 0.4}, "monitor": monitor}


def test_training_curves_and_conflict_summary():
    from kdutils.results import conflict_summary
    runs = {"feature_kd": [[_row(1, 0.5, mse=(0.3, 0.2)), _row(2, 0.6, mse=(0.2, 0.1))],
                           [_row(1, 0.5, mse=(0.5, 0.4)), _row(2, 0.6, mse=(0.4, 0.3))]],
            "feature_kd_ce": [[_row(1, 0.5, 0.2), _row(2, 0.7, -0.1)], [_row(1, 0.5, 0.4), _row(2, 0.7, 0.3)]],
            "ce": [[{"epoch": 1, "loss": 1, "train_acc": 0.5, "test_acc": 0.5, "seconds": 1.0}] * 2] * 2}
    res = summarize_runs(runs, teacher={"model": "t", "test_acc": 0.9}, preset="quick", dataset="digits")
    free = res["methods"]["feature_kd"]
    assert free["terms"] == {"ce": [0.6, 0.6], "feature": [0.4, 0.4]}
    assert free["monitor"]["feature_mse"] == [pytest.approx([0.4, 0.3]), pytest.approx([0.3, 0.2])]  # [pair][epoch]
    assert "grad_cosine" not in free["monitor"] and free["monitor"]["seeds"] == 2
    cos = res["methods"]["feature_kd_ce"]["monitor"]["grad_cosine"]
    assert cos["layer 1"] == pytest.approx([0.3, 0.1]) and cos["layer 2"] == pytest.approx([-0.3, -0.1])
    assert "monitor" not in res["methods"]["ce"] and "terms" not in res["methods"]["ce"]
    text = "\n".join(conflict_summary(res))
    assert "feature_kd_ce: cosine" in text and "layer 1 +0.100, layer 2 -0.100" in text   # second half: epoch 2
    assert "feature_kd vs feature_kd_ce" in text and "closer to the teacher (lower MSE) at 2 of 2 layers" in text
    assert conflict_summary({"methods": {"ce": res["methods"]["ce"]}}) == [
        "No run of this study was recorded with monitor=True (config key `monitor`)."]


def test_shown_paths_have_no_machine_prefix(tmp_path, monkeypatch):
    project = tmp_path / "course" / "main"
    (project / "runs").mkdir(parents=True)
    (project / "pyproject.toml").write_text("")
    monkeypatch.setattr(rundir, "REPO_ROOT", project)
    shared = tmp_path / "course" / "shared" / "data" / "cifar10-subset.npz"
    assert rundir.shown_path(project / "runs" / "x") == "runs/x"
    assert rundir.shown_path(shared) == "../shared/data/cifar10-subset.npz"
    config = {"dataset": str(shared), "data_root": str(project / "data"), "seeds": [0]}
    shown = rundir.shown_config(config)
    assert shown == {"dataset": "../shared/data/cifar10-subset.npz", "data_root": "data", "seeds": [0]}
    assert config["dataset"] == str(shared)                     # the config itself is left alone
    assert rundir.shown_config({"dataset": "cifar10"})["dataset"] == "cifar10"   # a name is not a path
    assert str(tmp_path) not in presets.config_frame(config).to_string()


def test_dataset_paths_keep_symlinked_folders(tmp_path, monkeypatch):
    """A dataset beside the project reached through a symlink (../shared -> elsewhere) still prints as ../shared."""
    project = tmp_path / "course" / "main"
    project.mkdir(parents=True)
    (project / "pyproject.toml").write_text("")
    elsewhere = tmp_path / "elsewhere" / "data"
    elsewhere.mkdir(parents=True)
    (elsewhere / "x.npz").write_bytes(b"")
    (tmp_path / "course" / "shared").symlink_to(tmp_path / "elsewhere")
    monkeypatch.setattr(rundir, "REPO_ROOT", project)
    monkeypatch.chdir(project)
    params = pipeline.absolute_paths({"dataset": "../shared/data/x.npz"})
    assert Path(params["dataset"]).is_absolute() and Path(params["dataset"]).is_file()
    assert rundir.shown_path(params["dataset"]) == "../shared/data/x.npz"


def test_monitored_methods():
    config = resolve_config("quick")
    assert [m for m in METHODS if presets.monitored(config, m)] == \
        [m for m in METHODS if REGISTRY[m].feature == "mse"]
    assert presets.monitored(config, "feature_kd_ce") and not presets.monitored(config, "hinton_kd")
    assert not presets.monitored(config, "simkd") and not presets.monitored(config, "sp_kd")
    assert not presets.monitored({**config, "monitor": False}, "feature_kd_ce")


def test_a_prestarting_kernel_runs_at_nice_19_until_its_notebook_starts():
    """Linux autogroup: each kernel's session gets nice 19 while prestarting and 0 again for its notebook."""
    import types
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)
    try:
        group = Path(f"/proc/{child.pid}/autogroup")
        if not group.exists():
            pytest.skip("no Linux autogroup here: _in_background is a no-op")
        manager = types.SimpleNamespace(provisioner=types.SimpleNamespace(pid=child.pid))
        pipeline._in_background(manager, True)
        assert group.read_text().split()[-1] == "19"
        pipeline._in_background(manager, False)
        assert group.read_text().split()[-1] == "0"
        pipeline._in_background(None, True)          # a kernel that never started: nothing to do, no error
    finally:
        child.kill()
        child.wait()
