"""Tests of kdutils.notebook: the one-call setup, the Colab branch (simulated), and the repository URL in notebooks."""
import shutil
import sys
import types
from pathlib import Path

import nbformat
import pytest
import torch

from kdutils import notebook, pipeline, presets, rundir, runtime
from kdutils.notebook import ensure_inputs, missing_inputs, repository_url, resolve_run_dir, setup, sync_urls
from kdutils.presets import on_colab

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.fixture
def fake_colab(monkeypatch):
    """Pretend this kernel runs on Colab: a `google.colab` module in sys.modules (with a recording drive.mount)."""
    mounted = []
    colab = types.ModuleType("google.colab")
    colab.drive = types.SimpleNamespace(mount=lambda point: mounted.append(point))
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    return mounted


def test_on_colab_detects_the_module_and_obeys_the_override(fake_colab, monkeypatch):
    assert on_colab() and on_colab(True) and not on_colab(False)
    monkeypatch.delitem(sys.modules, "google.colab")
    assert not on_colab() and on_colab(True)


def test_auto_preset_is_colab_on_colab(fake_colab, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert presets.preset_name("auto") == "colab"
    assert presets.preset_name("auto", colab=False) == "cifar10"
    assert presets.preset_name("cifar10") == "cifar10"          # an explicit paper preset stays one parameter away
    assert presets.resolve_config("auto")["preset"] == "colab"


def test_setup_returns_what_every_notebook_computed(tmp_path, capsys):
    namespace = {"preset": "quick", "run_dir": str(tmp_path / "run"), "data_root": None, "seeds": [3, 4],
                 "student_epochs": None, "progress": True}
    config, run_dir, data_root, device, seed = setup(namespace, "01_train_teacher.ipynb", colab=False)
    assert config == presets.resolve_config("quick", seeds=[3, 4])
    assert run_dir == tmp_path / "run" and run_dir.is_dir()
    assert data_root == rundir.default_data_root() and device == torch.device("cpu") and seed == 3
    from kdutils.precision import describe, precision_for
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith(f"preset quick | device cpu, {describe(precision_for('cpu'))} | run_dir "), lines
    assert lines[1].startswith("run: dataset digits, seeds [3, 4], 20") and "torch " in lines[1]      # a date, torch
    assert lines[2] == "reproduce: python -m kdutils.pipeline --preset quick -p seeds [3,4] --validate-kq"
    assert lines[3].startswith("expected time: about ") and "measured for preset quick" in lines[3]
    assert lines[3].endswith("(for the preset's defaults; this run changes seeds)")


def test_the_reproduce_command_parses_back_to_the_same_overrides():
    from kdutils import pipeline
    from kdutils.notebook import reproduce_command
    overrides = {"dataset": str(rundir.project_base().parent / "shared" / "x.npz"), "seeds": [0, 1],
                 "methods": ["ce", "feature_kd"], "teacher_epochs": 2, "augment": True, "student_lr": 0.005}
    command = reproduce_command("cifar10-cpu", overrides)
    assert "-p dataset ../shared/x.npz" in command and str(rundir.project_base()) not in command   # no machine path
    args = command.split()
    parsed = {args[i + 1]: pipeline.parse_value(args[i + 2]) for i, a in enumerate(args) if a == "-p"}
    assert parsed == {**overrides, "dataset": "../shared/x.npz"}


def test_runtimes_come_from_measurements_or_labelled_estimates():
    table = runtime.runtime_table()
    assert set(table.index) == set(presets.PRESETS)
    quick = runtime.MEASURED["quick"]
    assert table.loc["quick", "how we know"] == f"measured, {quick['date']}"
    assert set(quick["seconds"]) == {n.removesuffix(".ipynb") for n in (*rundir.NOTEBOOKS, rundir.VALIDATION_NOTEBOOK)}
    assert all("estimate" in table.loc[p, "how we know"] for p in runtime.GPU_PRESETS)
    text = runtime.notebook_runtime_text(presets.resolve_config("quick"), "05_compare_to_hinton_kd.ipynb")
    assert text.startswith(f"expected time: about {quick['seconds']['05_compare_to_hinton_kd']} s for this notebook")
    assert "estimate, NOT measured" in runtime.notebook_runtime_text(presets.resolve_config("colab"), "03_compute_kq")


def test_setup_off_colab_names_the_notebook_to_run(tmp_path):
    namespace = {"preset": "quick", "run_dir": str(tmp_path)}
    with pytest.raises(FileNotFoundError, match=r"teacher\.pt: run notebooks/01_train_teacher\.ipynb first"):
        setup(namespace, "03_compute_kq.ipynb", colab=False)
    assert missing_inputs(tmp_path, "05_compare_to_hinton_kd.ipynb") == [
        ("teacher.pt", "01_train_teacher.ipynb"), ("teacher_metrics.json", "01_train_teacher.ipynb"),
        ("kq_layers.json", "03_compute_kq.ipynb")]
    assert missing_inputs(tmp_path, "06_new.ipynb", needs=[("x.json", "04_distill_without_ce.ipynb")]) == \
        [("x.json", "04_distill_without_ce.ipynb")]


def _recording_pipeline(calls, writes):
    """A stand-in for pipeline.run_pipeline that records its call and writes the named artifacts."""
    def run(run_dir, preset="auto", params=None, notebooks_dir=None, notebooks=(), **kw):
        calls.append({"run_dir": Path(run_dir), "preset": preset, "params": params, "notebooks": list(notebooks),
                      "notebooks_dir": Path(notebooks_dir)})
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        for name in writes:
            (Path(run_dir) / name).write_text("{}")
        raise FileNotFoundError("missing results.json: run notebooks/05 first")  # what a partial series ends with
    return run


def test_on_colab_missing_inputs_run_the_earlier_notebooks_headless(fake_colab, tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(pipeline, "run_pipeline", _recording_pipeline(calls, ["teacher.pt", "teacher_metrics.json",
                                                                              "kq_layers.json"]))
    namespace = {"preset": "quick", "run_dir": str(tmp_path), "student_epochs": 2, "data_root": str(tmp_path / "d")}
    config, run_dir, *_ = setup(namespace, "04_distill_without_ce.ipynb")      # detected: google.colab imported
    assert calls == [{"run_dir": tmp_path, "preset": "quick", "notebooks_dir": rundir.NOTEBOOKS_DIR,
                      "params": {"student_epochs": 2, "data_root": str(tmp_path / "d")},
                      "notebooks": ["01_train_teacher.ipynb", "02_probe_layer_geometry.ipynb",
                                    "03_compute_kq.ipynb"]}]
    assert "running 01_train_teacher.ipynb, 02_probe_layer_geometry.ipynb, 03_compute_kq.ipynb headless" in \
        capsys.readouterr().out
    # inputs present now: nothing runs again; only kq_layers.json missing: only notebook 3 runs
    assert ensure_inputs(tmp_path, "04_distill_without_ce.ipynb", config) == []
    (tmp_path / "kq_layers.json").unlink()
    assert ensure_inputs(tmp_path, "04_distill_without_ce.ipynb", config, colab=True) == ["03_compute_kq.ipynb"]


def test_producing_inputs_that_still_fail_raises(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "run_pipeline", _recording_pipeline([], []))
    with pytest.raises(FileNotFoundError, match="results.json"):
        ensure_inputs(tmp_path, "02_probe_layer_geometry.ipynb", presets.resolve_config("quick"), produce=True)


def test_colab_without_the_notebooks_fetches_them(tmp_path, monkeypatch):
    calls, fetched = [], []
    monkeypatch.setattr(pipeline, "run_pipeline", _recording_pipeline(calls, ["teacher.pt"]))
    monkeypatch.setattr(rundir, "NOTEBOOKS_DIR", tmp_path / "nowhere")
    monkeypatch.setattr(rundir, "project_base", lambda: tmp_path)
    monkeypatch.setattr(notebook.urllib.request, "urlretrieve",
                        lambda url, dest: (fetched.append(url), Path(dest).write_text("{}")))
    ensure_inputs(tmp_path / "run", "02_probe_layer_geometry.ipynb", presets.resolve_config("quick"), colab=True)
    assert fetched == [f"https://raw.githubusercontent.com/{repository_url().split('github.com/')[1]}/main/"
                       "notebooks/01_train_teacher.ipynb"]
    assert calls[0]["notebooks_dir"] == tmp_path / "kd-without-ce-notebooks"


def test_drive_run_dir(fake_colab, tmp_path):
    path = resolve_run_dir("drive:kd-without-ce/runs/colab", "colab")
    assert path == Path("/content/drive/MyDrive/kd-without-ce/runs/colab") and fake_colab == ["/content/drive"]
    mounted = []
    assert resolve_run_dir("drive:/x", "colab", colab=True, mount=mounted.append) == \
        Path("/content/drive/MyDrive/x") and mounted == ["/content/drive"]
    assert resolve_run_dir(None, "quick") == rundir.default_run_dir("quick")
    assert resolve_run_dir(tmp_path, "quick") == tmp_path
    with pytest.raises(ValueError, match="only Colab"):
        resolve_run_dir("drive:x", "quick", colab=False)


# ------------------------------------------------------------------------------------------------------------
# the repository URL

def test_repository_url_comes_from_pyproject(tmp_path):
    assert repository_url() == "https://github.com/kd-without-ce/kd-without-ce"
    fork = tmp_path / "pyproject.toml"
    shutil.copy(ROOT / "pyproject.toml", fork)
    notebook.set_repository_url("https://github.com/someone/fork/", fork)
    assert repository_url(fork) == "https://github.com/someone/fork"
    assert 'Homepage = "https://github.com/someone/fork"' in fork.read_text()


def _uses_kdutils(path: Path) -> bool:
    """Whether a notebook's code imports kdutils (notebook 0 is plain PyTorch: it installs nothing)."""
    return any("kdutils" in c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_notebook_badge_and_install_line_use_the_project_url(path):
    url, (badges, installs) = repository_url(), notebook.notebook_urls(path)
    assert badges == [notebook.badge_link(path.name, url)]
    assert installs == ([f"git+{url}@{notebook.DEFAULT_REF}"] if _uses_kdutils(path) else [])


def test_a_fork_rewrites_badges_and_install_lines(tmp_path):
    for path in NOTEBOOKS:
        shutil.copy(path, tmp_path / path.name)
    before = {p.name: nbformat.read(p, as_version=4) for p in tmp_path.glob("*.ipynb")}
    changed = sync_urls("https://github.com/someone/fork", tmp_path)
    assert sorted(p.name for p in changed) == sorted(p.name for p in NOTEBOOKS)
    for path in tmp_path.glob("*.ipynb"):
        badges, installs = notebook.notebook_urls(path)
        assert badges == [f"https://colab.research.google.com/github/someone/fork/blob/main/notebooks/{path.name}"]
        assert installs == (["git+https://github.com/someone/fork@main"] if _uses_kdutils(path) else [])
        after, old = nbformat.read(path, as_version=4), before[path.name]
        assert [c.get("id") for c in after.cells] == [c.get("id") for c in old.cells]
        untouched = [(a, b) for a, b in zip(after.cells, old.cells) if "/github/" not in b.source and "git+" not in b.source]
        assert all(a == b for a, b in untouched)                 # other cells, outputs included, as they were
    assert sync_urls("https://github.com/someone/fork", tmp_path) == []   # idempotent


def test_cli_check(capsys):
    assert notebook.main(["--check"]) == 0
    assert "all notebooks use https://github.com/kd-without-ce/kd-without-ce" in capsys.readouterr().out


def test_parameters_cells_keep_their_names():
    """The pipeline passes parameters by name: notebooks 1-3 keep theirs (and the one parameters cell each)."""
    expected = {
        "01_train_teacher": ["preset", "run_dir", "data_root", "progress", "dataset", "per_class", "pair", "teacher",
                             "student", "pretrained", "teacher_epochs", "teacher_lr", "batch_size", "weight_decay",
                             "augment", "teacher_augment", "seeds"],
        "02_probe_layer_geometry": ["preset", "run_dir", "data_root", "progress", "dataset", "per_class",
                                    "kq_samples", "kq_per_class", "seeds"],
        "03_compute_kq": ["preset", "run_dir", "data_root", "progress", "dataset", "per_class", "kq_samples",
                          "kq_per_class", "k", "seeds"],
    }
    for stem, names in expected.items():
        nb = nbformat.read(ROOT / "notebooks" / f"{stem}.ipynb", as_version=4)
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1
        assert [line.split("=")[0].strip() for line in tagged[0].source.splitlines() if "=" in line] == names


def test_notebooks_1_to_3_use_setup_and_end_with_try_next():
    for stem in ("01_train_teacher", "02_probe_layer_geometry", "03_compute_kq"):
        nb = nbformat.read(ROOT / "notebooks" / f"{stem}.ipynb", as_version=4)
        code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
        assert f'setup(globals(), "{stem}.ipynb")' in code and "default_run_dir" not in code
        last = nb.cells[-1]
        assert last.cell_type == "markdown" and "## Try next" in last.source and "## Check yourself" in last.source
        assert last.source.count("<details><summary>Answer</summary>") >= 2
    kq = nbformat.read(ROOT / "notebooks" / "03_compute_kq.ipynb", as_version=4)
    assert any("Q by hand" in c.source for c in kq.cells if c.cell_type == "markdown")
    assert any("assert math.isclose" in c.source for c in kq.cells if c.cell_type == "code")


def test_runtime_estimate_is_labelled_and_plausible():
    text = runtime.runtime_estimate_text(presets.resolve_config("colab"))
    assert "estimate, NOT measured" in text and "ASSUMED_TRAIN_FLOPS" in text
    colab = runtime.estimate_runtime(presets.resolve_config("colab"), "t4")
    paper = runtime.estimate_runtime(presets.resolve_config("cifar10"), "t4")
    assert 10 * 60 < colab["total"] <= 30 * 60                      # the colab budget: about 30 minutes on a T4
    assert paper["total"] > 4 * 3600                                 # the paper run does not fit a free session
    assert runtime.forward_flops("resnet34") == pytest.approx(2.32e9, rel=0.02)  # 1.16 G multiply-adds at 32x32
    with pytest.raises(ValueError, match="unknown device"):
        runtime.estimate_runtime(presets.resolve_config("colab"), "tpu")


def test_ci_copies_run_the_quick_preset(tmp_path):
    """CI's nbval step: copies of the notebooks with preset = "quick" injected after the parameters cell."""
    written = notebook.with_preset("quick", tmp_path / "ci")
    assert sorted(p.name for p in written) == sorted(p.name for p in NOTEBOOKS)
    for path in written:
        cells = nbformat.read(path, as_version=4).cells
        injected = [c for c in cells if "injected-parameters" in c.metadata.get("tags", [])]
        if _uses_kdutils(path):
            (cell,) = injected
            params = next(i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", []))
            assert cells.index(cell) == params + 1 and 'preset = "quick"' in cell.source
        else:                                                   # notebook 0 has no preset: copied as committed
            assert not injected and path.read_text() == (ROOT / "notebooks" / path.name).read_text()
    with pytest.raises(ValueError, match="unknown preset 'fast'"):
        notebook.with_preset("fast", tmp_path / "bad")


def test_publishing_a_run_drops_the_injected_cell_and_refuses_machine_paths(tmp_path):
    run = tmp_path / "run"
    notebook.with_preset("quick", run / "executed")         # stands in for executed copies: they carry the injection
    out = tmp_path / "published"
    out.mkdir()
    for path in (run / "executed").glob("*.ipynb"):
        nb = nbformat.read(path, as_version=4)
        nb.metadata["papermill"] = {"input_path": "x.ipynb", "output_path": "y.ipynb"}
        nbformat.write(nb, path)
    written = notebook.publish_executed(run, out)
    assert sorted(p.name for p in written) == sorted(p.name for p in NOTEBOOKS if p.name.startswith("0"))
    for path in written:
        nb = nbformat.read(path, as_version=4)
        assert "papermill" not in nb.metadata
        assert not any("injected-parameters" in c.metadata.get("tags", []) for c in nb.cells)
    leaky = run / "executed" / "01_train_teacher.ipynb"
    nb = nbformat.read(leaky, as_version=4)
    nb.cells[-1].outputs = [nbformat.v4.new_output("stream", text=f"saved to {rundir.project_base()}/runs/x\n")]
    nbformat.write(nb, leaky)
    with pytest.raises(ValueError, match="01_train_teacher.ipynb still holds machine paths"):
        notebook.publish_executed(run, out)
