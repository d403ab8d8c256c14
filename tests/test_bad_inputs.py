"""A new user's mistakes, walked end to end where it is cheap: each must stop with a message that names the fix,
and none may leave a wrong result (a diverged checkpoint, a faked replication, a "pretrained" label that is false)."""
import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdutils import pipeline, presets, rundir
from kdutils.data import load_dataset
from kdutils.distill import distill
from kdutils.kq import knowledge_quality, layer_qualities
from kdutils.models import build_model
from kdutils.results import results_markdown, summarize_runs
from kdutils.train import TrainingDiverged, fit, load_model, seed_everything

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def small(ds, n_train=256, n_test=64):
    """A deterministic slice of a dataset, for fast loop tests."""
    return dataclasses.replace(ds, x_train=ds.x_train[:n_train], y_train=ds.y_train[:n_train],
                               x_test=ds.x_test[:n_test], y_test=ds.y_test[:n_test])


def fresh(name="resnet10_narrow", classes=10, seed=0):
    seed_everything(seed)
    return build_model(name, classes, image_size=16)


# ------------------------------------------------------------------------------------------------------------
# 1. a diverging run stops, names epoch, step and the LR to lower, and leaves no checkpoint

@pytest.mark.parametrize("lr", [1e3, 1e4])
def test_diverging_teacher_stops_and_writes_no_checkpoint(digits, tmp_path, lr):
    ck = tmp_path / "teacher.pt"
    with pytest.raises(TrainingDiverged) as err:
        fit(fresh(), digits, epochs=2, lr=lr, checkpoint=ck, progress=False, desc="teacher", lr_name="teacher_lr")
    message = str(err.value)
    assert "epoch 1, step" in message and "teacher_lr" in message and f"now {lr:g}" in message
    assert not ck.exists() and not list(tmp_path.iterdir())      # no checkpoint, no temporary file


def test_nan_loss_later_in_the_run_removes_the_partial_checkpoint(digits, tmp_path):
    ds, ck, calls = small(digits), tmp_path / "student.pt", {"n": 0}

    def loss_fn(model, xb, yb, idx):          # healthy for one epoch (2 steps), NaN from the 2nd step of epoch 2
        calls["n"] += 1
        logits = model(xb)
        loss = F.cross_entropy(logits, yb)
        return (loss * float("nan") if calls["n"] >= 4 else loss), logits

    with pytest.raises(TrainingDiverged, match=r"epoch 2, step 2 of 2: the loss nan is not finite") as err:
        fit(fresh(), ds, epochs=3, lr=0.005, loss_fn=loss_fn, checkpoint=ck, progress=False, lr_name="student_lr")
    assert "student_lr" in str(err.value) and "was removed" in str(err.value)
    assert not ck.exists()


def test_diverging_student_with_projectors_stops(digits, tmp_path):
    ds = small(digits)
    teacher = fresh("resnet10_narrow", seed=1).eval()
    ck = tmp_path / "feature_kd-seed0.pt"
    with pytest.raises(TrainingDiverged, match="student_lr"):
        distill(teacher, "resnet10_narrow", ds, "feature_kd", teacher_layers=[2, 3, 4, 5], epochs=2, lr=1e4,
                checkpoint=ck, progress=False)
    assert not ck.exists()


def test_healthy_run_is_not_flagged(digits):
    history = fit(fresh(), small(digits), epochs=2, lr=0.0075, progress=False)
    assert len(history) == 2 and all(np.isfinite(h["loss"]) for h in history)


# ------------------------------------------------------------------------------------------------------------
# 2, 3, 10, 11: configuration mistakes are refused before anything runs

@pytest.mark.parametrize("overrides, words", [
    ({"seeds": [0, 0]}, ["repeat [0]", "fakes a replication", "[0,1,2]"]),
    ({"seeds": [1, 2, 1]}, ["repeat [1]"]),
    ({"k": 5}, ["k=5", "4 standard", "1 <= k <= 4"]),
    ({"k": 20}, ["k=20", "1 <= k <= 4"]),
    ({"methods": "ce"}, ["methods", "-p methods [ce,feature_kd]"]),
    ({"teacher": "resnet35"}, ["unknown teacher model 'resnet35'", "resnet34"]),
    ({"student": "resnet8"}, ["unknown student model 'resnet8'"]),
    ({"methods": ["ce", "ce"]}, ["repeat ['ce']"]),
    ({"pretrained": True}, ["resnet18_narrow has no ImageNet weights", "pretrained False"]),
])
def test_bad_config_is_refused_with_the_fix(overrides, words):
    with pytest.raises(ValueError) as err:
        presets.resolve_config("quick", **overrides)
    for word in words:
        assert word in str(err.value), str(err.value)


def test_k_chooses_the_deepest_student_layers_and_per_class_all_restores_the_train_split():
    assert presets.resolve_config("quick", k=2)["k"] == 2
    config = presets.resolve_config("cifar10", per_class=500)
    assert config["per_class"] == 500 and presets.resolve_config("cifar10", per_class="all")["per_class"] is None
    assert pipeline.parse_value("all") == "all"   # so `-p per_class all` reaches resolve_config as "all"


def test_repeated_seeds_stop_the_pipeline_before_any_notebook(tmp_path):
    with pytest.raises(ValueError, match="repeat"):
        pipeline.run_pipeline(tmp_path / "run", "quick", {"seeds": [0, 0]}, progress=False)
    assert not (tmp_path / "run").exists()


def test_cli_exit_codes_for_bad_values(capsys, tmp_path):
    with pytest.raises(SystemExit) as code:
        pipeline.main(["--preset", "quick", "--run-dir", str(tmp_path / "r"), "-p", "k", "9"])
    assert code.value.code == 2 and "1 <= k <= 4" in capsys.readouterr().err
    file = tmp_path / "a-file"
    file.write_text("x")
    with pytest.raises(SystemExit) as code:
        pipeline.main(["--preset", "quick", "--run-dir", str(file), "-p", "teacher_epochs", "1"])
    err = capsys.readouterr().err
    assert code.value.code == 2 and "is a file" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------------------
# 4. an offline "pretrained" teacher is recorded as what it was

def test_offline_fallback_is_recorded_in_manifests_results_and_report(tmp_path):
    config = presets.resolve_config("cifar10")
    assert config["pretrained"] is True
    rundir.write_json_atomic(tmp_path / "teacher_metrics.json", {"pretrained": False, "final_test_acc": 0.5})
    real = rundir.teacher_config(config, tmp_path)
    assert real["pretrained"] is False and real["pretrained_requested"] is True
    (tmp_path / "a.txt").write_text("x")
    manifest = json.loads(rundir.write_manifest(tmp_path, "01_train_teacher", config,
                                                {"a": tmp_path / "a.txt"}).read_text())
    assert manifest["config"]["pretrained"] is False and manifest["config"]["pretrained_requested"] is True
    teacher = {"model": "resnet34", "test_acc": 0.5, "pretrained": False, "pretrained_requested": True}
    history = [{"epoch": 1, "loss": 1.0, "train_acc": 0.5, "test_acc": 0.4, "seconds": 1.0}]
    results = summarize_runs({"ce": [history]}, teacher=teacher, preset="cifar10", dataset="cifar10")
    assert results["teacher"]["pretrained"] is False
    assert "trained from scratch: the ImageNet weights it asked for were unavailable" in \
        results_markdown(results)
    # a teacher that really was pretrained keeps its label, and a run without metrics keeps the config
    rundir.write_json_atomic(tmp_path / "teacher_metrics.json", {"pretrained": True})
    assert "pretrained_requested" not in rundir.teacher_config(config, tmp_path)
    assert rundir.teacher_config(config, tmp_path / "none") == config


# ------------------------------------------------------------------------------------------------------------
# 5. Tiny ImageNet KQ samples 50 images per class for CNN teachers (METHOD.md 3.1)

def test_kq_per_class_follows_dataset_and_teacher():
    assert presets.resolve_config("tinyimagenet")["kq_per_class"] == 50
    assert presets.resolve_config("tinyimagenet", pair="vitb-vitet")["kq_per_class"] == 500
    assert presets.resolve_config("cifar10")["kq_per_class"] == 500
    assert presets.resolve_config("cifar10", dataset="tinyimagenet")["kq_per_class"] == 50
    assert presets.resolve_config("tinyimagenet", kq_per_class=20)["kq_per_class"] == 20
    assert all(presets.resolve_config(p)["kq_per_class"] == 500 for p in ("quick", "cifar10-cpu", "cifar100"))


# ------------------------------------------------------------------------------------------------------------
# 6, 7, 8: the wrong checkpoint, the wrong class count, non-finite features

def test_rerun_with_another_teacher_names_what_the_checkpoint_holds(digits, tmp_path):
    ds, ck = small(digits, 128, 32), tmp_path / "teacher.pt"
    fit(fresh("resnet10_narrow"), ds, epochs=1, lr=0.005, checkpoint=ck, progress=False, desc="teacher",
        meta={"model": "resnet10_narrow", "image_size": 16})
    with pytest.raises(ValueError) as err:
        fit(fresh("resnet18_narrow"), ds, epochs=1, lr=0.005, checkpoint=ck, progress=False, desc="teacher")
    message = str(err.value)
    assert f"{ck} holds a resnet10_narrow teacher for 10 classes" in message and "--run-dir" in message
    assert len(message) < 400
    with pytest.raises(ValueError, match="holds a resnet10_narrow teacher for 10 classes, not a resnet34"):
        load_model(ck, expect_model="resnet34", num_classes=10, role="teacher")
    with pytest.raises(ValueError, match="for 10 classes, not a resnet10_narrow for 7 classes"):
        load_model(ck, expect_model="resnet10_narrow", num_classes=7, role="teacher")
    assert load_model(ck, expect_model="resnet10_narrow", num_classes=10).kd_name == "resnet10_narrow"


def test_checkpoint_without_architecture_record_fails_in_one_line(digits, tmp_path):
    ds, ck = small(digits, 128, 32), tmp_path / "old.pt"
    fit(fresh("resnet10_narrow"), ds, epochs=1, lr=0.005, checkpoint=ck, progress=False)
    state = torch.load(ck, weights_only=True)
    del state["config"]["model"], state["config"]["num_classes"]     # as written by an older kdutils
    torch.save(state, ck)
    with pytest.raises(ValueError) as err:
        fit(fresh("resnet18_narrow"), ds, epochs=1, lr=0.005, checkpoint=ck, progress=False)
    assert "do not fit a resnet18_narrow" in str(err.value) and len(str(err.value)) < 600


def test_teacher_of_another_class_count_is_refused_up_front(digits):
    ds = small(digits, 64, 16)
    teacher = fresh("resnet10_narrow", classes=7).eval()
    for method in ("hinton_kd", "feature_kd"):
        with pytest.raises(ValueError, match="teacher .*outputs 7 classes but digits has 10"):
            distill(teacher, "resnet10_narrow", ds, method, teacher_layers=[2, 3, 4, 5] if method != "hinton_kd"
                    else None, epochs=1, lr=0.005, progress=False)
    with pytest.raises(ValueError, match="student .*outputs 7 classes"):
        distill(fresh(classes=10).eval(), fresh(classes=7, seed=2), ds, "ce", epochs=1, lr=0.005, progress=False)


def test_non_finite_features_name_the_layer(digits):
    x = np.random.default_rng(0).normal(size=(200, 16)).astype(np.float32)
    x[3, 2] = np.inf
    with pytest.raises(ValueError, match="features given to knowledge_quality: 1 non-finite"):
        knowledge_quality(x, np.repeat(np.arange(4), 50), num_train=1000)
    model = fresh("resnet10_narrow").eval()
    with torch.no_grad():
        model.layer3[0].bn2.weight.fill_(float("nan"))      # layer 3 onwards produce NaN
    with pytest.raises(ValueError, match=r"teacher layer 3 \(layer3.0\): .* non-finite"):
        layer_qualities(model, small(digits, 200, 20), max_samples=100, probe=False, cache_dir=None, progress=False)


# ------------------------------------------------------------------------------------------------------------
# 10. data mistakes

def write_npz(path, y_train, y_test, **extra):
    rng = np.random.default_rng(0)
    x = lambda n: rng.integers(0, 255, (n, 8, 8, 3), dtype=np.uint8)  # noqa: E731
    np.savez(path, x_train=x(len(y_train)), y_train=y_train, x_test=x(len(y_test)), y_test=y_test, **extra)
    return path


def test_dataset_path_mistakes(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"No (\.npz|dataset) file at .*cifar10-subst"):
        load_dataset(tmp_path / "cifar10-subst")
    with pytest.raises(FileNotFoundError, match="No dataset file at"):
        load_dataset(str(tmp_path / "data" / "cifar10-subst"))
    with pytest.raises(ValueError, match="Unknown dataset 'cifar11'"):
        load_dataset("cifar11")


def test_label_mistakes(tmp_path):
    y = np.arange(20) % 4
    with pytest.raises(ValueError, match=r"y_train has shape \(20, 1\).*y_train.reshape\(-1\)"):
        load_dataset(write_npz(tmp_path / "a.npz", y[:, None], y[:8]))
    even = (np.arange(20) % 5) * 2                                     # labels {0, 2, 4, 6, 8}
    with pytest.raises(ValueError, match=r"labels 0..8 include 4 class\(es\) with no training image \(1, 3, 5, 7\)"):
        load_dataset(write_npz(tmp_path / "b.npz", even, even[:8]))
    with pytest.raises(ValueError, match="listed classes include 1 class"):
        load_dataset(write_npz(tmp_path / "c.npz", y, y[:8], classes=np.array(list("abcde"))))
    assert load_dataset(write_npz(tmp_path / "d.npz", y, y[:8])).num_classes == 4


@pytest.mark.parametrize("n", [0, 1, -3, 2.0, True])
def test_build_model_refuses_a_classifier_without_classes(n):
    with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
        build_model("resnet10_narrow", n)


# ------------------------------------------------------------------------------------------------------------
# 9. Ctrl-C: one line, what finished, and that the same command resumes

def test_ctrl_c_prints_one_line_and_exit_130(monkeypatch, capsys, tmp_path):
    import papermill
    calls = []

    def fake_execute(path, executed, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(papermill, "execute_notebook", fake_execute)
    code = pipeline.main(["--preset", "quick", "--run-dir", str(tmp_path / "r"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 130 and len(err.splitlines()) == 1
    assert "interrupted during 02_probe_layer_geometry (finished: 01_train_teacher)" in err
    assert "Run the same command again to resume" in err
